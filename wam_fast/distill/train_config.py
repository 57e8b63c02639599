"""``TrainConfig``: the hyper-parameters of a distillation training run, and the choices they allow.

``wam_fast.distill.trainer`` re-exports everything here; ``RESUMABLE_FIELDS`` says which fields a
resumed run may change.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Tuple

PRECISIONS = ("bf16", "fp32")
LR_SCHEDULES = ("constant", "cosine")
PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")
# Fields that may change when a run resumes: how it runs, not what it computes. ``steps`` may grow;
# ``micro_batch`` changes only the summation order of the gradient (rounding).
RESUMABLE_FIELDS = ("steps", "micro_batch", "log_every", "checkpoint_every", "keep_checkpoints",
                    "progress", "tensorboard", "parallel", "device")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a training run (JSON-serialisable: ``to_dict`` / ``from_dict``).

    ``batch_size`` is the global batch of one optimizer step: world_size * grad_accum * micro_batch;
    ``micro_batch`` (rows per forward per rank) defaults to batch_size // world_size (no accumulation).
    ``grad_clip`` <= 0 turns clipping off (the norm is still logged). Every ``log_every`` steps
    metrics.jsonl gets that step's loss and metrics (averaged over its global batch, not over the
    steps since the last line), so a resumed run logs exactly what an uninterrupted one does. ``device`` None: cuda (the
    LOCAL_RANK-th GPU under torchrun; an error when there is no such GPU) when available, else cpu.
    """

    steps: int = 1000
    batch_size: int = 32
    micro_batch: Optional[int] = None
    lr: float = 1e-4
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    precision: str = "bf16"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    progress: bool = True
    tensorboard: bool = True
    parallel: str = "auto"
    device: Optional[str] = None

    def __post_init__(self):
        def check_int(name, low):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"TrainConfig.{name} must be an int >= {low}, got {value!r}")

        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            check_int(name, 1)
        for name in ("warmup_steps", "seed"):
            check_int(name, 0)
        if self.micro_batch is not None:
            check_int("micro_batch", 1)
            if self.batch_size % self.micro_batch:
                raise ValueError(f"TrainConfig.batch_size={self.batch_size} must be a multiple of "
                                 f"micro_batch={self.micro_batch}")

        def check_float(name, low, high=math.inf, low_open=False):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (value > low if low_open else value >= low) and value <= high
            if not ok:
                bounds = f"{'(' if low_open else '['}{low}, {high}]"
                raise ValueError(f"TrainConfig.{name} must be a number in {bounds}, got {value!r}")

        check_float("lr", 0.0, low_open=True)
        check_float("eps", 0.0)
        check_float("weight_decay", 0.0)
        check_float("min_lr_ratio", 0.0, 1.0)
        check_float("ema_decay", 0.0, 1.0)
        if not (isinstance(self.grad_clip, (int, float)) and not isinstance(self.grad_clip, bool)
                and not math.isnan(self.grad_clip)):
            raise ValueError(f"TrainConfig.grad_clip must be a number (<= 0 turns clipping off), "
                             f"got {self.grad_clip!r}")
        betas = self.betas
        if (not isinstance(betas, (tuple, list)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {betas!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in betas))
        for name, allowed in (("precision", PRECISIONS), ("lr_schedule", LR_SCHEDULES),
                              ("parallel", PARALLEL_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("progress", "tensorboard"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.device is not None and not isinstance(self.device, str):
            raise ValueError(f"TrainConfig.device must be a string such as 'cuda:0' or None, got {self.device!r}")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known fields: {sorted(known)}")
        data = dict(data)
        if isinstance(data.get("betas"), list):
            data["betas"] = tuple(data["betas"])
        return cls(**data)

    def lr_at(self, step: int) -> float:
        """Learning rate of step ``step`` (0-based): linear warm-up, then constant or cosine."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return self.lr
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
