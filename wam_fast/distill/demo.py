"""The embedded demo of ``python -m wam_fast.distill`` (no --teacher / --data): a tiny teacher trained
on a tiny synthetic dataset, then distilled and evaluated, in a few minutes on a CPU (``run_demo``)."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Sequence

import torch

from wam_fast.configs import get as get_config
from wam_fast.distill import objectives, trainer
from wam_fast.distill.commands import (METHODS, RUN_FILE, CLIError, check_run_file, distill, jsonable,
                                       open_dataset, rank, say, write_json)
from wam_fast.distill.data import INDEX_NAME
from wam_fast.distill.synthetic import make_synthetic_dataset
from wam_fast.models.transformer import WAMTransformer

DEMO_OUT = "wam_fast_distill_demo"


def demo_config():
    """The demo's tiny teacher: "tiny" with 4x4 latents, 4 text tokens and 2-D actions (16 tokens a forward)."""
    return dataclasses.replace(get_config("tiny"), name="demo-tiny", latent_height=4, latent_width=4, text_len=4,
                               action_dim=2)


def run_demo(out=DEMO_OUT, *, teacher_steps: int = 1200, distill_steps: int = 400, method: str = "shortcut",
             steps: Sequence[int] = (1, 2, 4), mask: str = "temporal", num_samples: int = 2048,
             batch_size: int = 64, teacher_lr: float = 2e-3, lr: float = 1e-3, teacher_ema_decay: float = 0.99,
             ema_decay: float = 0.95, cfg_scale: float = 2.0, solver_steps: int = 10, eval_conditions: int = 64,
             eval_seeds: int = 4, seed: int = 0, checkpoint_every: int = 200, progress: bool = True,
             tensorboard: bool = False):
    """The embedded demo; returns the EvalReport. Each stage resumes or reuses what OUT holds:

    1. OUT/data: ``make_synthetic_dataset`` of the ``demo_config`` model (bimodal actions given text
       and image, future frames a function of image and mode);
    2. OUT/teacher: a full-mask teacher trained on it with ``DiffusionObjective`` (cosine schedule,
       EMA ``teacher_ema_decay``; OUT/teacher/final holds the EMA weights);
    3. OUT/student-METHOD: ``distill`` of that teacher (guidance ``cfg_scale`` baked in), evaluated on
       ``eval_conditions`` held-out conditions; the table is printed and OUT/student-METHOD/eval.json
       written. Consistency distillation steps along the ``solver_steps``-point grid of the teacher's
       DDIM (10: the grid of the 10-step reference).
    """
    if method not in METHODS:
        raise CLIError(f"--method: unknown distillation method {method!r}; expected one of {METHODS}")
    out = Path(out)
    config = demo_config()
    settings = {"command": "demo", "num_samples": num_samples, "seed": seed, "teacher_steps": teacher_steps,
                "batch_size": batch_size, "teacher_lr": teacher_lr, "teacher_ema_decay": teacher_ema_decay,
                "config": config.to_dict()}
    check_run_file(out, settings)
    data_dir, teacher_dir, student_dir = out / "data", out / "teacher", out / f"student-{method}"
    if (data_dir / INDEX_NAME).is_file():
        dataset = open_dataset(data_dir, "the demo's data")
        expected = jsonable({"seed": seed, "num_instructions": 4, "config": config.to_dict()})
        if dataset.metadata.get("synthetic") != expected or len(dataset) != num_samples:
            raise CLIError(f"{data_dir} holds another dataset; nothing was changed: choose another --out")
    if rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / RUN_FILE, settings)
    # The demo's model is tiny (64-wide matmuls over 16 tokens): intra-op threads only add overhead,
    # and on a shared machine their spin-waits make training several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _demo_stages(out, config, data_dir, teacher_dir, student_dir, teacher_steps=teacher_steps,
                            distill_steps=distill_steps, method=method, steps=steps, mask=mask,
                            num_samples=num_samples, batch_size=batch_size, teacher_lr=teacher_lr, lr=lr,
                            teacher_ema_decay=teacher_ema_decay, ema_decay=ema_decay, cfg_scale=cfg_scale,
                            solver_steps=solver_steps, eval_conditions=eval_conditions, eval_seeds=eval_seeds,
                            seed=seed, checkpoint_every=checkpoint_every, progress=progress,
                            tensorboard=tensorboard)
    finally:
        torch.set_num_threads(threads)


def _demo_stages(out, config, data_dir, teacher_dir, student_dir, *, teacher_steps, distill_steps, method, steps,
                 mask, num_samples, batch_size, teacher_lr, lr, teacher_ema_decay, ema_decay, cfg_scale, solver_steps,
                 eval_conditions, eval_seeds, seed, checkpoint_every, progress, tensorboard):
    start = time.perf_counter()
    if not (data_dir / INDEX_NAME).is_file():
        say(f"demo: synthetic dataset of {num_samples} samples in {data_dir}")
        make_synthetic_dataset(data_dir, config, num_samples, seed=seed)
    dataset = open_dataset(data_dir, "the demo's data")
    torch.manual_seed(seed)
    teacher = WAMTransformer(config)
    say(f"demo: training the teacher ({config.name}: {sum(p.numel() for p in teacher.parameters())} parameters, "
         f"{config.num_tokens} tokens a forward) for {teacher_steps} steps of {batch_size} in {teacher_dir}")
    teacher_config = trainer.TrainConfig(
        steps=teacher_steps, batch_size=batch_size, lr=teacher_lr, warmup_steps=min(50, teacher_steps // 10),
        lr_schedule="cosine", min_lr_ratio=0.05, ema_decay=teacher_ema_decay, precision="fp32", seed=seed,
        checkpoint_every=checkpoint_every, log_every=max(1, min(50, teacher_steps // 20)), progress=progress,
        tensorboard=tensorboard)
    result = trainer.train(teacher, objectives.DiffusionObjective(config, cond_dropout=0.1), dataset, teacher_config,
                           teacher_dir)
    say(f"demo: teacher loss {result.metrics.get('loss', float('nan')):.4f} at step {result.step} "
         f"({time.perf_counter() - start:.0f} s so far)")
    report = distill(teacher_dir / trainer.FINAL_DIR, data_dir, student_dir, method=method, steps=steps,
                     mask=mask, cfg_scale=cfg_scale, train_steps=distill_steps, batch_size=batch_size, lr=lr,
                     ema_decay=ema_decay, checkpoint_every=checkpoint_every, precision="fp32", seed=seed,
                     eval_conditions=eval_conditions, eval_seeds=eval_seeds,
                     solver_steps=solver_steps if method == "consistency" else None, progress=progress,
                     tensorboard=tensorboard)
    say(f"demo: done in {time.perf_counter() - start:.0f} s")
    return report
