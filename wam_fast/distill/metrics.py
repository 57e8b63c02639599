"""Metrics logging of ``wam_fast.distill.trainer``: metrics.jsonl, TensorBoard events, progress bar.

Every logged step's row (loss and metrics averaged over the global batch, then lr, grad_norm,
samples_per_s, elapsed) is computed on every rank; rank 0 writes it to ``metrics.jsonl``, to
TensorBoard (``out_dir/tensorboard``, when ``torch.utils.tensorboard`` imports) and to the bar.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Dict

import torch

from wam_fast.distill import train_state as ts
from wam_fast.distill.distributed import Dist

logger = logging.getLogger("wam_fast.distill")

RESERVED_METRICS = ("step", "loss", "lr", "grad_norm", "samples_per_s", "elapsed")
TENSORBOARD_DIR = "tensorboard"


class MetricsLog:
    """The metrics outputs of one run (rank 0 writes; every rank reduces and checks the values)."""

    def __init__(self, dist: Dist, out_dir: Path, metrics_path: Path, objective_name: str):
        self.dist, self.out_dir, self.metrics_path = dist, out_dir, metrics_path
        self.objective_name = objective_name
        self.bar = self.writer = self.metrics_file = None

    def open(self, start: int, steps: int, progress: bool, tensorboard: bool) -> None:
        if self.dist.rank != 0:
            return
        self.metrics_file = open(self.metrics_path, "a")
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("TensorBoard logging is off: torch.utils.tensorboard needs the tensorboard "
                               "package (pip install tensorboard); metrics are in %s", self.metrics_path)
            else:
                # purge_step drops the events a killed run logged past the checkpoint
                self.writer = SummaryWriter(str(self.out_dir / TENSORBOARD_DIR), purge_step=start + 1)

    def log(self, step: int, loss_sum: torch.Tensor, metric_sums: Dict[str, torch.Tensor], grad_norm,
            lr: float, rate: float, elapsed: float) -> Dict[str, float]:
        """Reduce the step's values over the ranks, check them, write them; returns the row."""
        d = self.dist
        keys = sorted(metric_sums)
        clash = [k for k in keys if k in RESERVED_METRICS]
        if clash:
            raise ValueError(f"{self.objective_name}.loss returned metrics named {clash}; "
                             f"these names are the trainer's own ({RESERVED_METRICS})")
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        values = torch.stack([loss_sum] + [metric_sums[k] for k in keys]).float()
        if d.active:
            torch.distributed.all_reduce(values)
            values = values / d.world
        values = values.cpu().tolist()
        row = {"step": step, "loss": values[0]}
        row.update(zip(keys, values[1:]))
        row.update(lr=lr, grad_norm=float(grad_norm), samples_per_s=rate, elapsed=elapsed)
        if not math.isfinite(row["loss"]) or not math.isfinite(row["grad_norm"]):
            raise FloatingPointError(f"training diverged at step {step}: loss {row['loss']}, grad norm "
                                     f"{row['grad_norm']}; the last checkpoint is in "
                                     f"{self.out_dir / ts.CHECKPOINTS_DIR}")
        if d.rank != 0:
            return row
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        if self.writer is not None:
            for key, value in row.items():
                if key != "step":
                    self.writer.add_scalar(f"train/{key}", value, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{lr:.3g}", refresh=False)
        return row

    def advance(self) -> None:
        """One more step done (the progress bar)."""
        if self.bar is not None:
            self.bar.update(1)

    def flush(self) -> None:
        """Flush TensorBoard events (at a checkpoint, so they survive a kill)."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.metrics_file is not None:
            self.metrics_file.close()
