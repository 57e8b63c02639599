"""Tiny models, objectives and datasets for the trainer tests, and a script that trains them.

Run as a script (by tests/test_distill_trainer.py, alone or under ``torch.distributed.run``)::

    python tests/distill_worker.py --out DIR --steps 12 --batch 8 [--micro 2] [--parallel fsdp] ...

It builds the same tiny WAMTransformer, frozen teacher, ``ToyDiffusion`` objective and in-memory
dataset on every rank from the seeds, calls ``wam_fast.distill.trainer.train`` and exits.
``--slow S`` sleeps S seconds in every ``dataset.get`` so a test can kill the run mid-way.
``--device`` is cpu unless told: the tests compare runs bit for bit (CUDA's gather / index_select
backward adds with atomics, in no fixed order) and run 2 ranks on machines with one GPU or none.
Imported by the tests for the same pieces (``tests/`` is on sys.path under pytest).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wam_fast.configs import get as get_config  # noqa: E402
from wam_fast.models.transformer import WAMTransformer  # noqa: E402
from wam_fast.schedules import schedule_for  # noqa: E402


class TensorDataset:
    """In-memory dataset: ``get(indices)`` -> {name: tensor[indices]}; ``slow`` seconds per call."""

    def __init__(self, tensors, slow: float = 0.0):
        self.tensors, self.slow = tensors, slow
        self.calls = []  # the indices of every get() call (tests read them)

    def __len__(self):
        return len(next(iter(self.tensors.values())))

    def get(self, indices):
        self.calls.append(indices.clone())
        if self.slow:
            time.sleep(self.slow)
        return {k: v[indices] for k, v in self.tensors.items()}


def wam_dataset(config, num_samples=24, seed=1, slow=0.0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    c = config
    frame = (c.latent_channels, c.latent_height, c.latent_width)
    return TensorDataset({
        "video": torch.randn(num_samples, c.noisy_frames, *frame, generator=g),
        "image": torch.randn(num_samples, 1, *frame, generator=g),
        "text": torch.randn(num_samples, c.text_len, c.text_dim, generator=g),
        "actions": torch.randn(num_samples, c.action_len, c.action_dim, generator=g).tanh(),
    }, slow=slow)


def tiny_wam(seed=0, **overrides) -> WAMTransformer:
    torch.manual_seed(seed)
    return WAMTransformer(get_config("tiny", **overrides) if overrides else get_config("tiny"))


class ToyDiffusion:
    """The teacher's v-prediction loss with all randomness in ``draw``; with a ``teacher`` it adds a
    distillation term (MSE to the frozen teacher's prediction); the EMA's loss is a metric."""

    def __init__(self, config, teacher=None, check_modes=False):
        self.config, self.schedule, self.check_modes = config, schedule_for(config), check_modes
        if teacher is not None:
            self.teacher = teacher

    def draw(self, rows, generator):
        c = self.config
        return {"t": self.schedule.train_timesteps(rows, generator),
                "video_noise": torch.randn((rows, c.noisy_frames, c.latent_channels, c.latent_height,
                                            c.latent_width), generator=generator),
                "action_noise": torch.randn((rows, c.action_len, c.action_dim), generator=generator)}

    def _predict(self, model, batch, draws):
        t = draws["t"]
        noisy_video = self.schedule.add_noise(batch["video"], draws["video_noise"], t)
        noisy_actions = self.schedule.add_noise(batch["actions"], draws["action_noise"], t)
        return model(noisy_video, batch["text"], noisy_actions, t, image=batch["image"])

    def loss(self, student, ema, batch, draws):
        if self.check_modes:  # what the trainer promises about the modules it passes
            assert student.training and not ema.training
            assert student.config == self.config  # under DDP: forwarded to the wrapped model
            assert not any(p.requires_grad for p in ema.parameters())
            if hasattr(self, "teacher"):
                assert not self.teacher.training
                assert not any(p.requires_grad for p in self.teacher.parameters())
        video_out, action_out = self._predict(student, batch, draws)
        t = draws["t"]
        video_loss = F.mse_loss(video_out.float(), self.schedule.target(batch["video"], draws["video_noise"], t))
        action_loss = F.mse_loss(action_out.float(), self.schedule.target(batch["actions"], draws["action_noise"], t))
        loss = video_loss + action_loss
        metrics = {"video_loss": video_loss.detach(), "action_loss": action_loss.detach()}
        with torch.no_grad():
            ema_video, ema_actions = self._predict(ema, batch, draws)
            metrics["ema_out"] = ema_video.float().square().mean() + ema_actions.float().square().mean()
            if hasattr(self, "teacher"):
                teacher_video, teacher_actions = self._predict(self.teacher, batch, draws)
        if hasattr(self, "teacher"):
            distill = (F.mse_loss(video_out.float(), teacher_video.float())
                       + F.mse_loss(action_out.float(), teacher_actions.float()))
            loss = loss + 0.5 * distill
            metrics["distill"] = distill.detach()
        return loss, metrics


class MLP(nn.Module):
    def __init__(self, width=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 2))

    def forward(self, x):
        return self.net(x)


class Regression:
    """MSE of model(x + noise) against y; the noise is the draw (so draws matter to the result)."""

    def __init__(self, noise=0.1):
        self.noise = noise

    def draw(self, rows, generator):
        return {"noise": torch.randn((rows, 4), generator=generator) * self.noise}

    def loss(self, student, ema, batch, draws):
        out = student(batch["x"] + draws["noise"])
        loss = F.mse_loss(out.float(), batch["y"])
        return loss, {"out_mean": out.detach().float().mean()}


def regression_dataset(num_samples=32, seed=1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, 4, generator=g)
    y = torch.stack([x[:, 0] * x[:, 1], x[:, 2].sin() + 0.5 * x[:, 3]], dim=1)
    return TensorDataset({"x": x, "y": y})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--micro", type=int, default=None)
    p.add_argument("--parallel", default="auto", help="one mode, or several comma-separated "
                   "(each trains into OUT/<mode>)")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--checkpoint-every", type=int, default=4)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--ema-decay", type=float, default=0.9)
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--schedule", default="cosine")
    p.add_argument("--teacher", action="store_true")
    p.add_argument("--slow", type=float, default=0.0)
    p.add_argument("--device", default="cpu", help="TrainConfig.device (default cpu; see the module docstring)")
    return p


def build(args, parallel="auto"):
    """(model, objective, dataset, TrainConfig) of a worker run: the same on every rank and in the tests."""
    from wam_fast.distill.trainer import TrainConfig

    model = tiny_wam(seed=0)
    teacher = tiny_wam(seed=1) if args.teacher else None
    objective = ToyDiffusion(model.config, teacher=teacher, check_modes=True)
    dataset = wam_dataset(model.config, args.samples, slow=args.slow)
    config = TrainConfig(steps=args.steps, batch_size=args.batch, micro_batch=args.micro, lr=args.lr,
                         warmup_steps=2, lr_schedule=args.schedule, grad_clip=1.0, ema_decay=args.ema_decay,
                         precision=args.precision, seed=0, log_every=args.log_every,
                         checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep,
                         progress=False, tensorboard=False, parallel=parallel, weight_decay=0.01,
                         device=args.device)
    return model, objective, dataset, config


def main(argv=None):
    args = parser().parse_args(argv)
    torch.set_num_threads(1)

    from wam_fast.distill.trainer import train

    modes = args.parallel.split(",")
    group = len(modes) > 1 and "RANK" in os.environ
    if group:  # one process group for all runs (re-creating it on torchrun's store is not supported)
        torch.distributed.init_process_group("gloo")
    for mode in modes:
        model, objective, dataset, config = build(args, mode)
        out = Path(args.out) / mode if len(modes) > 1 else Path(args.out)
        result = train(model, objective, dataset, config, out)
        if result.step != args.steps:
            raise SystemExit(f"ended at step {result.step}, expected {args.steps}")
    if group:
        torch.distributed.destroy_process_group()
    if os.environ.get("RANK", "0") == "0":
        print("worker done", flush=True)


if __name__ == "__main__":
    main()
