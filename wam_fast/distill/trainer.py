"""The distillation trainer: ``train(model, objective, dataset, TrainConfig(...), out_dir)``.

Generic over what it trains:

- ``model``: any ``nn.Module`` with float32 parameters (a ``WAMTransformer`` student or teacher).
- ``objective``: ``draw(rows, generator) -> dict[str, Tensor]`` (all randomness of ``rows`` samples,
  leading dim ``rows``, CPU) and ``loss(student, ema, batch, draws) -> (loss, metrics)`` (a scalar
  loss, the mean over the rows, and a dict of scalar metrics). An optional attribute ``teacher`` is a
  frozen module: the trainer moves it to the device, puts it in eval mode with requires_grad False
  and shards it under FSDP. ``student`` is the model as trained (under DDP a wrapper that forwards
  attribute access, e.g. ``student.config``, to the model); ``ema`` the EMA copy, in eval mode.
- ``dataset``: ``len(dataset)`` and ``dataset.get(indices: LongTensor) -> dict[str, Tensor]`` (rows in
  the order given), e.g. ``wam_fast.distill.data.LatentDataset``.

Determinism (exact resume, any world size). Step ``s`` (0-based) uses the samples at positions
``s * batch_size ... (s + 1) * batch_size - 1`` of an endless stream made of one random permutation
of the dataset per epoch, the permutation of epoch ``e`` drawn from a CPU generator seeded by
(seed, e): every sample is seen once per epoch. Its ``draws`` (timesteps, noise, ...) come from
``objective.draw(batch_size, generator)`` with a CPU generator seeded by (seed, s). The global batch
is cut into ``world_size`` rank slices of ``grad_accum`` micro-batches of ``micro_batch`` rows, so 1
and 2 ranks see the same samples with the same draws, and a resumed run needs no RNG state (the
model must not use the global RNG, e.g. dropout, for that to hold).

Each step: AdamW (decoupled weight decay on every parameter) at the step's learning rate (linear
warm-up over ``warmup_steps``, then constant or cosine down to ``min_lr_ratio * lr`` at ``steps``),
loss / grad_accum backward per micro-batch (gradient sync only on the last: DDP ``no_sync``, FSDP2
``set_requires_gradient_sync``), global-norm gradient clipping (the norm before clipping is logged),
then ``ema = ema_decay * ema + (1 - ema_decay) * params`` (buffers copied). ``precision="bf16"``
runs ``objective.loss`` under ``torch.autocast(device_type, bfloat16)``; parameters, gradients
and the optimizer state stay float32.

Output (``wam_fast.distill.train_state`` documents the files): ``metrics.jsonl`` every
``log_every`` steps, TensorBoard events in ``out_dir/tensorboard`` when ``torch.utils.tensorboard``
imports, atomic checkpoints every ``checkpoint_every`` steps and at the end, ``final/`` (EMA weights)
and ``final-online/`` (online weights), both ``wam_fast.save_pretrained`` for a WAMTransformer.

Distributed: under ``torchrun`` (RANK / WORLD_SIZE set) the process group is initialised if it is
not (gloo on CPU, nccl on CUDA) and the model is wrapped in DDP (``parallel="auto"`` or ``"ddp"``) or
sharded with FSDP2 (``"fsdp"``: ``fully_shard`` on each of ``model.blocks``, then the root; the EMA
and the teacher likewise). Checkpoints hold full (gathered) state dicts written by rank 0, so a run
resumes on any world size.

This module holds the loop; the parts below it: ``train_config`` (``TrainConfig``), ``distributed``
(process group, DDP / FSDP2), ``ema``, ``metrics`` (metrics.jsonl, TensorBoard, progress bar),
``checkpoints`` (resume, checkpoints, final weights) and ``train_state`` (the files).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

import torch
import torch.nn as nn

from wam_fast.distill import train_state as ts
from wam_fast.distill.checkpoints import (FINAL_DIR, FINAL_ONLINE_DIR, load_module, load_optimizer,
                                          plan_resume, save_checkpoint, write_finals)
from wam_fast.distill.distributed import Dist, forwarding_ddp, fully_shard, setup_distributed
from wam_fast.distill.ema import EMAUpdate
from wam_fast.distill.metrics import RESERVED_METRICS, TENSORBOARD_DIR, MetricsLog
from wam_fast.distill.train_config import (LR_SCHEDULES, PARALLEL_MODES, PRECISIONS, RESUMABLE_FIELDS,
                                           TrainConfig)
from wam_fast.utils.run_lock import run_lock

# The trainer's public names, some defined in the modules below it (callers use ``trainer.<name>``).
__all__ = ["train", "TrainConfig", "TrainResult", "BatchPlan", "PRECISIONS", "LR_SCHEDULES", "PARALLEL_MODES",
           "RESUMABLE_FIELDS", "RESERVED_METRICS", "FINAL_DIR", "FINAL_ONLINE_DIR", "TENSORBOARD_DIR"]

logger = logging.getLogger("wam_fast.distill")


@dataclass
class TrainResult:
    """What ``train`` returns (the same on every rank).

    ``metrics`` is the last logged line of metrics.jsonl; ``final`` / ``final_online`` hold the EMA /
    online weights; ``resumed_from`` is the checkpoint step the run started from (None: fresh)."""

    step: int
    metrics: Dict[str, float]
    out_dir: Path
    checkpoint: Path
    final: Path
    final_online: Path
    metrics_path: Path
    resumed_from: Optional[int] = None
    world_size: int = 1
    parallel: str = "none"


# ---- reproducible batches ----------------------------------------------------------------------
def _seed_of(*parts) -> int:
    """A 63-bit generator seed from (seed, kind, number): stable across processes and platforms."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class BatchPlan:
    """Which samples and which draws a step uses, from (seed, step) alone (see the module docstring)."""

    def __init__(self, num_samples: int, batch_size: int, seed: int):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self._perms: Dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            generator = torch.Generator().manual_seed(_seed_of(self.seed, "epoch", epoch))
            self._perms[epoch] = torch.randperm(self.num_samples, generator=generator)
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        """(batch_size,) int64 dataset indices of step ``step``."""
        positions = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, offsets = positions // self.num_samples, positions % self.num_samples
        out = torch.empty_like(positions)
        for epoch in torch.unique(epochs).tolist():
            rows = epochs == epoch
            out[rows] = self.permutation(epoch)[offsets[rows]]
        return out

    def generator(self, step: int) -> torch.Generator:
        """The CPU generator of step ``step``'s draws."""
        return torch.Generator().manual_seed(_seed_of(self.seed, "draw", step))


# ---- checks ------------------------------------------------------------------------------------
def _check_arguments(model, objective, dataset, config):
    if not isinstance(model, nn.Module):
        raise TypeError(f"train expects an nn.Module model, got {type(model).__name__}")
    for name in ("draw", "loss"):
        if not callable(getattr(objective, name, None)):
            raise TypeError(f"the objective must have a {name}() method (draw(rows, generator), "
                            f"loss(student, ema, batch, draws)); {type(objective).__name__} has none")
    if not callable(getattr(dataset, "get", None)) or not hasattr(dataset, "__len__"):
        raise TypeError(f"the dataset must have __len__ and get(indices); got {type(dataset).__name__}")
    if len(dataset) < 1:
        raise ValueError("the dataset is empty")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    params = list(model.parameters())
    if not any(p.requires_grad for p in params):
        raise ValueError("the model has no trainable parameters")
    wrong = sorted({str(p.dtype) for p in params if p.dtype != torch.float32})
    if wrong:
        raise ValueError(f"train keeps parameters and optimizer state in float32 (precision='bf16' "
                         f"autocasts the compute); the model has {wrong} parameters: pass model.float()")


def _check_tensor_dict(what: str, value, rows: int) -> Dict[str, torch.Tensor]:
    if not isinstance(value, dict):
        raise TypeError(f"{what} must return a dict of tensors, got {type(value).__name__}")
    for key, tensor in value.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{what}[{key!r}] must be a tensor, got {type(tensor).__name__}")
        if tensor.dim() == 0 or tensor.shape[0] != rows:
            raise ValueError(f"{what}[{key!r}] must have leading dim {rows} (one row per sample), "
                             f"got shape {tuple(tensor.shape)}")
    return value


# ---- the run -----------------------------------------------------------------------------------
def train(model: nn.Module, objective, dataset, config: TrainConfig, out_dir: Union[str, Path], *,
          resume: bool = True) -> TrainResult:
    """Train ``model`` on ``objective`` over ``dataset`` for ``config.steps`` optimizer steps.

    ``out_dir`` holding a checkpoint: the run resumes from the newest one (its TrainConfig must
    match ``config`` except the fields of ``RESUMABLE_FIELDS``; ``steps`` may grow) and ends with the
    weights an uninterrupted run would have; with ``resume=False`` such an out_dir is an error
    (nothing is overwritten). The model's parameters are trained in place on the device; under
    FSDP the model (and the objective's teacher) stay sharded when ``train`` returns: load the
    weights from ``result.final`` / ``result.final_online``.
    Returns a ``TrainResult``; see the module docstring for everything else.
    """
    _check_arguments(model, objective, dataset, config)
    dist_info = setup_distributed(config.parallel, config.device)
    try:
        # one run per out_dir: rank 0 holds the lock (the ranks of one run share it)
        with run_lock(Path(out_dir)) if dist_info.rank == 0 else contextlib.nullcontext():
            return _Run(model, objective, dataset, config, Path(out_dir), resume, dist_info).run()
    finally:
        if dist_info.created_group:
            torch.distributed.destroy_process_group()



class _Run:
    def __init__(self, model, objective, dataset, config, out_dir, resume, dist_info: Dist):
        self.model, self.objective, self.dataset, self.config = model, objective, dataset, config
        self.model_class = type(model).__name__
        self.out_dir, self.resume, self.dist = out_dir, resume, dist_info
        self.metrics_path = out_dir / ts.METRICS_NAME
        world = dist_info.world
        if config.batch_size % world:
            raise ValueError(f"TrainConfig.batch_size={config.batch_size} must be divisible by the "
                             f"world size {world}")
        self.per_rank = config.batch_size // world
        self.micro = config.micro_batch or self.per_rank
        if self.per_rank % self.micro:
            raise ValueError(f"batch_size {config.batch_size} over {world} ranks gives {self.per_rank} rows "
                             f"per rank, not a multiple of micro_batch={config.micro_batch}")
        self.accum = self.per_rank // self.micro
        self.log = MetricsLog(dist_info, out_dir, self.metrics_path, type(objective).__name__)

    def run(self) -> TrainResult:
        d, config = self.dist, self.config
        # -- start: rank 0 decides where to begin, everyone learns the same answer --
        decision = (None, None)
        if d.rank == 0:
            decision = plan_resume(self.out_dir, self.resume, config, self.model, len(self.dataset))
        checkpoint, error = d.broadcast_object(decision)
        if error is not None:
            raise ValueError(error)
        state = ts.read_state(checkpoint) if checkpoint is not None else None
        start = state["step"] if state else 0
        if d.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            ts.remove_torn(self.out_dir)
            dropped = ts.truncate_metrics(self.metrics_path, start)
            if dropped:
                logger.info("dropped %d metrics lines past the checkpoint step %d", dropped, start)
        d.barrier()

        # -- modules: model (online), EMA copy, frozen teacher; all on the device --
        model = self.model.to(d.device)
        if checkpoint is not None:
            load_module(model, checkpoint, ts.MODEL_FILE)
        elif d.active:  # ranks may have initialised differently: rank 0's weights win
            with torch.no_grad():
                for tensor in list(model.parameters()) + list(model.buffers()):
                    torch.distributed.broadcast(tensor, src=0)
        ema = copy.deepcopy(model)
        if checkpoint is not None:
            load_module(ema, checkpoint, ts.EMA_FILE)
        ema.eval().requires_grad_(False)
        teacher = getattr(self.objective, "teacher", None)
        if isinstance(teacher, nn.Module):
            teacher.to(d.device).eval().requires_grad_(False)
        model.train()

        student = model
        self.frozen_sharded = []
        if d.mode == "ddp":
            device_ids = [d.device.index] if d.device.type == "cuda" else None
            student = forwarding_ddp()(model, device_ids=device_ids)
        elif d.mode == "fsdp":
            self.frozen_sharded = [ema] + ([teacher] if isinstance(teacher, nn.Module) else [])
            for module in [model] + self.frozen_sharded:
                fully_shard(module, d.device)

        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas,
                                      eps=config.eps, weight_decay=config.weight_decay)
        if checkpoint is not None:
            load_optimizer(model, optimizer, checkpoint, state)

        self.model_, self.ema, self.student, self.optimizer = model, ema, student, optimizer
        self.elapsed0 = state.get("elapsed", 0.0) if state else 0.0
        last_metrics = ts.read_metrics(self.metrics_path)[-1:] if d.rank == 0 else []
        last_metrics = d.broadcast_object(last_metrics)
        self.last_metrics = last_metrics[0] if last_metrics else {}
        latest = checkpoint
        try:
            if start < config.steps:
                latest = self._loop(start)
            elif d.rank == 0:
                logger.info("%s is already at step %d of %d: nothing to train", checkpoint, start, config.steps)
            write_finals(d, self.model, self.model_, self.ema, self.out_dir)
        finally:
            self.log.close()
        return TrainResult(step=max(start, config.steps), metrics=dict(self.last_metrics),
                           out_dir=self.out_dir, checkpoint=latest,
                           final=self.out_dir / FINAL_DIR, final_online=self.out_dir / FINAL_ONLINE_DIR,
                           metrics_path=self.metrics_path, resumed_from=start if checkpoint else None,
                           world_size=d.world, parallel=d.mode)

    # -- the loop --
    def _loop(self, start: int) -> Path:
        d, config = self.dist, self.config
        plan = BatchPlan(len(self.dataset), config.batch_size, config.seed)
        ema_update = EMAUpdate(self.ema, self.model_)
        params = ema_update.params
        autocast = (torch.autocast(device_type=d.device.type, dtype=torch.bfloat16)
                    if config.precision == "bf16" else contextlib.nullcontext())
        max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
        self.log.open(start, config.steps, config.progress, config.tensorboard)
        self.t0 = time.perf_counter()
        last_log_time, last_log_step = self.t0, start
        latest = None
        for step in range(start, config.steps):
            lr = config.lr_at(step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            indices = plan.indices(step)
            draws = _check_tensor_dict(f"{type(self.objective).__name__}.draw",
                                       self.objective.draw(config.batch_size, plan.generator(step)),
                                       config.batch_size)
            loss_sum, metric_sums = None, {}
            for micro in range(self.accum):
                lo = d.rank * self.per_rank + micro * self.micro
                rows = slice(lo, lo + self.micro)
                batch = _check_tensor_dict(f"{type(self.dataset).__name__}.get",
                                           self.dataset.get(indices[rows]), self.micro)
                batch = {k: v.to(d.device, non_blocking=True) for k, v in batch.items()}
                micro_draws = {k: v[rows].to(d.device, non_blocking=True) for k, v in draws.items()}
                last = micro == self.accum - 1
                with self._sync(last), autocast:
                    loss, metrics = self.objective.loss(self.student, self.ema, batch, micro_draws)
                if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                    raise TypeError(f"{type(self.objective).__name__}.loss must return (scalar tensor, "
                                    f"dict); got a loss of {type(loss).__name__} "
                                    f"{tuple(getattr(loss, 'shape', ()))}")
                (loss.float() / self.accum).backward()
                loss_sum = loss.detach().float() / self.accum + (0 if loss_sum is None else loss_sum)
                for key, value in (metrics or {}).items():
                    value = torch.as_tensor(value).detach().float().to(d.device) / self.accum
                    metric_sums[key] = metric_sums.get(key, 0) + value
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if d.mode == "fsdp":
                # a root FSDP module keeps its parameters unsharded after a forward without backward
                # (the EMA's, the teacher's); registering the shards again makes the next forward
                # gather the updated EMA, not reuse stale copies
                for module in self.frozen_sharded:
                    module.reshard()
            ema_update.update(config.ema_decay)
            done = step + 1
            if done % config.log_every == 0 or done == config.steps:
                now = time.perf_counter()
                rate = (done - last_log_step) * config.batch_size / max(now - last_log_time, 1e-9)
                self.last_metrics = self.log.log(done, loss_sum, metric_sums, grad_norm, lr, rate,
                                                 self._elapsed())
                last_log_time, last_log_step = now, done
            self.log.advance()
            if done % config.checkpoint_every == 0 or done == config.steps:
                latest = self._checkpoint(done)
        return latest

    def _sync(self, last: bool):
        """Gradient sync only on the last micro-batch of a step."""
        if self.dist.mode == "ddp" and not last:
            return self.student.no_sync()
        if self.dist.mode == "fsdp" and self.accum > 1:
            self.model_.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _elapsed(self) -> float:
        """Training seconds of the run, across resumes."""
        return self.elapsed0 + time.perf_counter() - self.t0

    def _checkpoint(self, step: int) -> Path:
        run_info = {"micro_batch": self.micro, "model_class": self.model_class,
                    "objective": type(self.objective).__name__, "dataset_len": len(self.dataset),
                    "elapsed": self._elapsed()}
        path = save_checkpoint(self.dist, self.out_dir, step, self.config, self.model_, self.ema,
                               self.optimizer, run_info)
        if self.dist.rank == 0:
            self.log.flush()
        self.dist.barrier()
        return path
