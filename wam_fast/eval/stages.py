"""The fidelity run's training stages, each keyed by its settings and reused when the key matches:
demonstrations, the frozen autoencoder and its latents, the teacher, the distilled students."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import torch

import wam_fast
from wam_fast.utils.files import atomic_write
from wam_fast.distill import objectives, trainer
from wam_fast.distill.commands import jsonable
from wam_fast.distill.data import LatentDataset
from wam_fast.eval import autoencoder
from wam_fast.eval import metaworld as mw
from wam_fast.eval import routes
from wam_fast.eval.settings import Settings, model_config
from wam_fast.utils.checksums import CHECKSUMS_NAME

logger = logging.getLogger("wam_fast.eval")


def _stage_file(directory: Path) -> Path:
    return directory / "wam_fast_eval_stage.json"


def _stage_done(directory: Path, key: dict) -> bool:
    path = _stage_file(directory)
    return path.is_file() and json.loads(path.read_text()) == jsonable(key)


def _mark_done(directory: Path, key: dict) -> None:
    text = json.dumps(jsonable(key), indent=2, sort_keys=True)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(_stage_file(directory), lambda tmp: Path(tmp).write_text(text))


def demos_key(settings: Settings) -> dict:
    config = model_config(settings)
    return {"stage": "demos", "task": settings.task, "layouts": settings.demo_layouts, "chunk": settings.chunk,
            "noise_levels": settings.noise_levels, "seed": settings.seed, "camera": settings.camera,
            "text": [config.text_len, config.text_dim]} | routes.expert_key(settings.expert)


def make_demos(settings: Settings, directory: Path) -> Path:
    """Collect the demonstrations into ``directory`` unless it holds those of these settings."""
    config, key = model_config(settings), demos_key(settings)
    if not _stage_done(directory, key):
        mw.collect_demos(settings.task, directory, chunk=settings.chunk, text_len=config.text_len,
                         text_dim=config.text_dim, noise_levels=settings.noise_levels, layouts=settings.demo_layouts,
                         seed=settings.seed, camera=settings.camera,
                         expert=routes.make_expert(settings.task, settings.expert))
        _mark_done(directory, key)
    return directory


def autoencoder_key(settings: Settings) -> dict:
    return {"stage": "autoencoder", "demos": demos_key(settings), "channels": settings.autoencoder_channels,
            "steps": settings.autoencoder_steps, "action_weight": settings.autoencoder_action_weight,
            "seed": settings.seed}


def make_latents(settings: Settings, demos: Path, task_dir: Path, progress: bool = True) -> Tuple[Path, Optional[Path]]:
    """(the dataset the teacher and students train on, the frozen autoencoder or None). With
    ``latent_space="autoencoder"``: trains (or resumes) it in ``task_dir/autoencoder`` on the pixel demos,
    then encodes them into ``task_dir/latents``; with "pixels", the demos themselves."""
    if settings.latent_space == "pixels":
        return demos, None
    model_config(settings)  # a clear error for an unknown latent space
    key = autoencoder_key(settings)
    directory = task_dir / "autoencoder"
    if not _stage_done(directory, key):
        steps = settings.autoencoder_steps
        train_config = _train_config(settings, steps, lr=1e-3, weight_decay=1e-4, progress=progress)
        autoencoder.train_autoencoder(demos, directory, train_config, channels=settings.autoencoder_channels,
                                      action_weight=settings.autoencoder_action_weight)
        _mark_done(directory, key)
    frozen = directory / "frozen"
    latents, latents_key = task_dir / "latents", {"stage": "latents", "autoencoder": key}
    if not _stage_done(latents, latents_key):
        autoencoder.encode_demos(autoencoder.load_autoencoder(frozen), demos, latents)
        _mark_done(latents, latents_key)
    return latents, frozen


def _train_config(settings: Settings, steps: int, lr: float, progress: bool, weight_decay: float = 0.0):
    return trainer.TrainConfig(
        steps=steps, batch_size=settings.teacher_batch, lr=lr, warmup_steps=min(100, steps // 10),
        lr_schedule="cosine", min_lr_ratio=0.05, weight_decay=weight_decay, ema_decay=0.995 if steps >= 500 else 0.5,
        precision="fp32", seed=settings.seed, log_every=max(1, min(50, steps // 20)),
        checkpoint_every=max(1, min(250, steps)), progress=progress, tensorboard=False)


def train_teacher(settings: Settings, demos: Path, directory: Path, progress: bool = True) -> Path:
    """Train (or resume) the teacher; returns its EMA checkpoint (``directory/final``).

    With ``teacher_pretrain_steps``, the network is first trained in ``directory/pretrain`` as a
    regressor of the action chunk (the action loss at the last timestep only, where the input is pure
    noise), and the teacher starts from that stage's EMA weights."""
    config = model_config(settings)
    torch.manual_seed(settings.seed)
    model = wam_fast.WAMTransformer(config)
    dataset = LatentDataset(demos)
    if settings.teacher_pretrain_steps > 0:
        regression = objectives.DiffusionObjective(config, cond_dropout=0.0, video_weight=0.0, action_weight=1.0,
                                                   timestep=config.num_train_timesteps - 1,
                                                   random_shift=settings.teacher_random_shift)
        pretrain = trainer.train(model, regression, dataset, _train_config(
            settings, settings.teacher_pretrain_steps, settings.teacher_pretrain_lr, progress), directory / "pretrain")
        logger.info(f"teacher {settings.task} pretraining: step {pretrain.step}, "
                    f"action loss {pretrain.metrics.get('loss', float('nan')):.4f}")
        model = wam_fast.load_pretrained(pretrain.final).float()
    # cond_dropout 0: MT1 has one instruction per model, so guidance has nothing to amplify (cfg 1).
    objective = objectives.DiffusionObjective(config, cond_dropout=0.0, action_weight=settings.action_weight,
                                              random_shift=settings.teacher_random_shift)
    result = trainer.train(model, objective, dataset, _train_config(
        settings, settings.teacher_steps, settings.teacher_lr, progress), directory)
    logger.info(f"teacher {settings.task}: step {result.step}, loss {result.metrics.get('loss', float('nan')):.4f}")
    return result.final


def distill_command(settings: Settings, teacher: Path, demos: Path, out: Path, method: str,
                    future_frames: Optional[int] = None, prefix_fraction: Optional[float] = None) -> List[str]:
    """The ``python -m wam_fast.distill`` command line of one student (``future_frames=0``: action-only;
    ``prefix_fraction``: a student that reads committed actions, for real-time chunking)."""
    steps = settings.distill_steps(method)
    command = [sys.executable, "-m", "wam_fast.distill", "--teacher", str(teacher), "--data", str(demos),
               "--out", str(out), "--method", method, "--steps", "1,2,4", "--mask", "temporal", "--cfg-scale", "1",
               "--train-steps", str(steps), "--batch-size", str(settings.distill_batch),
               "--lr", str(settings.distill_lr), "--ema-decay", "0.99" if steps >= 200 else "0.5",
               "--checkpoint-every", str(max(1, min(200, steps))), "--seed", str(settings.seed),
               "--eval-conditions", str(16 if settings.episodes <= 2 else 64), "--eval-seeds", "2", "--no-progress"]
    if method == "consistency":
        command += ["--solver-steps", str(settings.solver_steps)]
    if future_frames is not None:
        command += ["--future-frames", str(future_frames)]
    if prefix_fraction is not None:
        command += ["--prefix-fraction", str(prefix_fraction)]
    return command


def _digest(directory: Path) -> str:
    """sha256 of a checkpoint's content: each safetensors file's tensors by name (a re-saved checkpoint may
    order them differently), every other file's bytes, except checksums.json (the hash of those bytes)."""
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for path in sorted(p for p in Path(directory).iterdir() if p.is_file() and p.name != CHECKSUMS_NAME):
        digest.update(path.name.encode() + b"\0")
        if path.suffix == ".safetensors":
            for name, tensor in sorted(load_file(str(path)).items()):
                digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(path.read_bytes())
    return digest.hexdigest()


def distill_student(settings: Settings, teacher: Path, demos: Path, out: Path, method: str,
                    future_frames: Optional[int] = None, prefix_fraction: Optional[float] = None) -> Path:
    """Run ``python -m wam_fast.distill`` for one student, unless ``out`` holds the one this command
    distils from this teacher. Other settings on the same ``out``: the CLI resumes (longer training) or
    refuses them; a teacher whose weights changed since is refused here (its old student would pass)."""
    command = distill_command(settings, teacher, demos, out, method, future_frames, prefix_fraction)
    key = {"stage": "student", "command": command[1:], "teacher_sha256": _digest(teacher)}
    if _stage_done(out, key):
        return out / "final"
    marker = _stage_file(out)
    if marker.is_file() and json.loads(marker.read_text()).get("teacher_sha256") != key["teacher_sha256"]:
        raise ValueError(f"{out} holds a {method} student of another teacher (the weights in {teacher} changed "
                         f"since it was distilled); remove {out} to distill it again")
    logger.info("$ " + " ".join(command[1:] if command[0] == sys.executable else command))
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # the --threads of this run, not all cores
    done = subprocess.run(command, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"python -m wam_fast.distill ({method}) failed with exit code {done.returncode}; "
                           f"its output is above; command: {' '.join(command)}")
    _mark_done(out, key)
    return out / "final"
