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
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from wam_fast.distill import train_state as ts

logger = logging.getLogger("wam_fast.distill")

PRECISIONS = ("bf16", "fp32")
LR_SCHEDULES = ("constant", "cosine")
PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")
# Fields that may change when a run resumes: how it runs, not what it computes. ``steps`` may grow;
# ``micro_batch`` changes only the summation order of the gradient (rounding).
RESUMABLE_FIELDS = ("steps", "micro_batch", "log_every", "checkpoint_every", "keep_checkpoints",
                    "progress", "tensorboard", "parallel", "device")
RESERVED_METRICS = ("step", "loss", "lr", "grad_norm", "samples_per_s", "elapsed")
FINAL_DIR, FINAL_ONLINE_DIR, TENSORBOARD_DIR = "final", "final-online", "tensorboard"


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a training run (JSON-serialisable: ``to_dict`` / ``from_dict``).

    ``batch_size`` is the global batch of one optimizer step: world_size * grad_accum * micro_batch;
    ``micro_batch`` (rows per forward per rank) defaults to batch_size // world_size (no accumulation).
    ``grad_clip`` <= 0 turns clipping off (the norm is still logged). Every ``log_every`` steps
    metrics.jsonl gets that step's loss and metrics (averaged over its global batch, not over the
    steps since the last line), so a resumed run logs exactly what an uninterrupted one does. ``device`` None: cuda (the
    LOCAL_RANK-th GPU under torchrun) when available, else cpu.
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


# ---- distributed -------------------------------------------------------------------------------
@dataclass
class _Dist:
    mode: str  # none | ddp | fsdp
    rank: int
    world: int
    device: torch.device
    created_group: bool

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def barrier(self):
        if self.active:
            torch.distributed.barrier()

    def broadcast_object(self, obj):
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def _setup_distributed(config: TrainConfig) -> _Dist:
    import torch.distributed as dist

    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    initialised = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialised else (int(os.environ["WORLD_SIZE"]) if launched else 1)
    mode = config.parallel
    if mode == "auto":
        mode = "ddp" if world > 1 else "none"
    if mode == "none" and world > 1:
        raise ValueError(f"parallel='none' with {world} processes would train {world} independent copies; "
                         "use parallel='ddp' or 'fsdp' (or 'auto') under torchrun")
    if mode != "none" and not (initialised or launched):
        raise ValueError(f"parallel={mode!r} needs torchrun (RANK and WORLD_SIZE in the environment) or an "
                         "initialised torch.distributed process group; use parallel='none' or 'auto' "
                         "for one process")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if config.device is not None:
        device = torch.device(config.device)
    else:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = False
    if mode != "none" and not initialised:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    rank = dist.get_rank() if mode != "none" else 0
    world = dist.get_world_size() if mode != "none" else 1
    return _Dist(mode, rank, world, device, created)


def _forwarding_ddp():
    from torch.nn.parallel import DistributedDataParallel

    class ForwardingDDP(DistributedDataParallel):
        """DDP whose missing attributes (``config``, ``noisy_video_shape``, ...) come from the model,
        so an objective can treat the student like the model itself."""

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                module = self.__dict__.get("_modules", {}).get("module")
                if module is None or name == "module":
                    raise
                return getattr(module, name)

    return ForwardingDDP


def _fully_shard(module: nn.Module) -> None:
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(module, FSDPModule):  # e.g. a teacher already sharded by an earlier run
        return
    blocks = getattr(module, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        for block in blocks:
            fully_shard(block)
    fully_shard(module)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


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


def _config_mismatch(saved: dict, config: TrainConfig) -> List[str]:
    try:
        old = TrainConfig.from_dict(saved)
    except (TypeError, ValueError) as exc:
        return [f"the checkpoint's TrainConfig cannot be read ({exc})"]
    problems = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in RESUMABLE_FIELDS:
            continue
        a, b = getattr(old, f.name), getattr(config, f.name)
        if a != b:
            problems.append(f"{f.name}: checkpoint {a!r}, now {b!r}")
    return problems


def _state_dict_mismatch(module: nn.Module, shapes: Dict[str, Tuple[int, ...]]) -> Optional[str]:
    """Why a checkpoint's tensors (name -> shape) do not fit ``module``, or None."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    other = sorted(k for k in expected if k in shapes and shapes[k] != expected[k])
    if not (missing or unexpected or other):
        return None
    return (f"weights: the checkpoint's do not fit the model (missing {missing[:8]}, unexpected "
            f"{unexpected[:8]}, other shapes {other[:8]})")


def _model_config_dict(model) -> Optional[dict]:
    """``model.config.to_dict()`` as it reads back from JSON (tuples become lists), or None."""
    to_dict = getattr(getattr(model, "config", None), "to_dict", None)
    return _json_safe(to_dict()) if callable(to_dict) else None


def _json_safe(value):
    return json.loads(json.dumps(value, default=str))


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
    dist_info = _setup_distributed(config)
    try:
        return _Run(model, objective, dataset, config, Path(out_dir), resume, dist_info).run()
    finally:
        if dist_info.created_group:
            torch.distributed.destroy_process_group()


class _Run:
    def __init__(self, model, objective, dataset, config, out_dir, resume, dist_info: _Dist):
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

    # -- start: decide where to begin (rank 0 decides, everyone learns the same answer) --
    def _plan_start(self) -> Tuple[Optional[Path], Optional[str]]:
        checkpoint = ts.latest_checkpoint(self.out_dir)
        if checkpoint is None:
            return None, None
        if not self.resume:
            return None, (f"{self.out_dir} already holds a run (checkpoint {checkpoint.name}) and "
                          "resume=False: choose another out_dir, or resume it")
        try:
            state = ts.read_state(checkpoint)
        except ValueError as exc:
            return None, str(exc)
        problems = _config_mismatch(state.get("config", {}), self.config)
        if state["step"] > self.config.steps:
            problems.append(f"steps: the checkpoint is at step {state['step']}, beyond steps={self.config.steps}")
        saved_model, model_config = state.get("model_config"), _model_config_dict(self.model)
        if saved_model is not None and model_config is not None and saved_model != model_config:
            diff = sorted(k for k in set(saved_model) | set(model_config)
                          if saved_model.get(k) != model_config.get(k))
            problems.append(f"model config: differs in {diff}")
        try:
            problem = _state_dict_mismatch(self.model, ts.tensor_shapes(checkpoint, ts.MODEL_FILE))
        except Exception as exc:  # noqa: BLE001 - a missing file, or safetensors' own header errors
            problem = f"cannot read {checkpoint / ts.MODEL_FILE}: {type(exc).__name__}: {exc}"
        if problem:
            problems.append(problem)
        if state.get("dataset_len") not in (None, len(self.dataset)):
            problems.append(f"dataset: the checkpoint was trained on {state['dataset_len']} samples, "
                            f"this dataset has {len(self.dataset)} (the sample order would change)")
        if problems:
            return None, (f"cannot resume {checkpoint}: the run differs from the checkpoint's in "
                          + "; ".join(problems) + ". Nothing was changed: use the checkpoint's settings "
                          "or another out_dir.")
        return checkpoint, None

    def run(self) -> TrainResult:
        d, config = self.dist, self.config
        decision = (None, None)
        if d.rank == 0:
            decision = self._plan_start()
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
            self._load_module(model, checkpoint, ts.MODEL_FILE)
        elif d.active:  # ranks may have initialised differently: rank 0's weights win
            with torch.no_grad():
                for tensor in list(model.parameters()) + list(model.buffers()):
                    torch.distributed.broadcast(tensor, src=0)
        ema = copy.deepcopy(model)
        if checkpoint is not None:
            self._load_module(ema, checkpoint, ts.EMA_FILE)
        ema.eval().requires_grad_(False)
        teacher = getattr(self.objective, "teacher", None)
        if isinstance(teacher, nn.Module):
            teacher.to(d.device).eval().requires_grad_(False)
        model.train()

        student = model
        self.frozen_sharded = []
        if d.mode == "ddp":
            device_ids = [d.device.index] if d.device.type == "cuda" else None
            student = _forwarding_ddp()(model, device_ids=device_ids)
        elif d.mode == "fsdp":
            self.frozen_sharded = [ema] + ([teacher] if isinstance(teacher, nn.Module) else [])
            for module in [model] + self.frozen_sharded:
                _fully_shard(module)

        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas,
                                      eps=config.eps, weight_decay=config.weight_decay)
        if checkpoint is not None:
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

            meta = state["optimizer"]
            osd = ts.unflatten_optimizer_state(ts.read_tensors(checkpoint, ts.OPTIMIZER_FILE), meta)
            set_optimizer_state_dict(model, optimizer, osd, options=_full_options())

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
            self._write_finals()
        finally:
            self._close()
        return TrainResult(step=max(start, config.steps), metrics=dict(self.last_metrics),
                           out_dir=self.out_dir, checkpoint=latest,
                           final=self.out_dir / FINAL_DIR, final_online=self.out_dir / FINAL_ONLINE_DIR,
                           metrics_path=self.metrics_path, resumed_from=start if checkpoint else None,
                           world_size=d.world, parallel=d.mode)

    def _load_module(self, module: nn.Module, checkpoint: Path, file_name: str):
        tensors = ts.read_tensors(checkpoint, file_name)
        problem = _state_dict_mismatch(module, {k: tuple(v.shape) for k, v in tensors.items()})
        if problem:
            raise ValueError(f"{checkpoint / file_name}: {problem}")
        module.load_state_dict(tensors)

    # -- the loop --
    def _loop(self, start: int) -> Path:
        d, config = self.dist, self.config
        plan = BatchPlan(len(self.dataset), config.batch_size, config.seed)
        params = [p for p in self.model_.parameters() if p.requires_grad]
        ema_params = [p for p, q in zip(self.ema.parameters(), self.model_.parameters()) if q.requires_grad]
        ema_buffers = list(zip(self.ema.buffers(), self.model_.buffers()))
        autocast = (torch.autocast(device_type=d.device.type, dtype=torch.bfloat16)
                    if config.precision == "bf16" else contextlib.nullcontext())
        max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
        self._open_loggers(start)
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
            with torch.no_grad():
                torch._foreach_lerp_([_local(e) for e in ema_params], [_local(p) for p in params],
                                     1.0 - config.ema_decay)
                for e, b in ema_buffers:
                    e.copy_(b)
            done = step + 1
            if done % config.log_every == 0 or done == config.steps:
                now = time.perf_counter()
                rate = (done - last_log_step) * config.batch_size / max(now - last_log_time, 1e-9)
                self._log(done, loss_sum, metric_sums, grad_norm, lr, rate)
                last_log_time, last_log_step = now, done
            if self.bar is not None:
                self.bar.update(1)
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

    # -- logging --
    def _open_loggers(self, start: int):
        d, config = self.dist, self.config
        self.bar = self.writer = None
        if d.rank != 0:
            return
        self.metrics_file = open(self.metrics_path, "a")
        if config.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("TensorBoard logging is off: torch.utils.tensorboard needs the tensorboard "
                               "package (pip install tensorboard); metrics are in %s", self.metrics_path)
            else:
                # purge_step drops the events a killed run logged past the checkpoint
                self.writer = SummaryWriter(str(self.out_dir / TENSORBOARD_DIR), purge_step=start + 1)

    def _log(self, step, loss_sum, metric_sums, grad_norm, lr, rate):
        d = self.dist
        keys = sorted(metric_sums)
        clash = [k for k in keys if k in RESERVED_METRICS]
        if clash:
            raise ValueError(f"{type(self.objective).__name__}.loss returned metrics named {clash}; "
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
        row.update(lr=lr, grad_norm=float(grad_norm), samples_per_s=rate,
                   elapsed=self.elapsed0 + time.perf_counter() - self.t0)
        if not math.isfinite(row["loss"]) or not math.isfinite(row["grad_norm"]):
            raise FloatingPointError(f"training diverged at step {step}: loss {row['loss']}, grad norm "
                                     f"{row['grad_norm']}; the last checkpoint is in "
                                     f"{self.out_dir / ts.CHECKPOINTS_DIR}")
        self.last_metrics = row
        if d.rank != 0:
            return
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        if self.writer is not None:
            for key, value in row.items():
                if key != "step":
                    self.writer.add_scalar(f"train/{key}", value, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{lr:.3g}", refresh=False)

    def _close(self):
        if getattr(self, "bar", None) is not None:
            self.bar.close()
        if getattr(self, "writer", None) is not None:
            self.writer.close()
        if getattr(self, "metrics_file", None) is not None:
            self.metrics_file.close()

    # -- checkpoints and final weights --
    def _full_state(self, module) -> Dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(module, options=_full_options(cpu_offload=True))

    def _checkpoint(self, step: int) -> Path:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        d, config = self.dist, self.config
        model_sd, ema_sd = self._full_state(self.model_), self._full_state(self.ema)
        osd = get_optimizer_state_dict(self.model_, self.optimizer, options=_full_options(cpu_offload=True))
        path = self.out_dir / ts.CHECKPOINTS_DIR / ts.step_dir_name(step)
        if d.rank == 0:
            opt_tensors, opt_meta = ts.flatten_optimizer_state(osd)
            state = {
                "format": ts.FORMAT, "step": step, "config": config.to_dict(),
                "scheduler": {"lr": config.lr_at(step - 1), "lr_schedule": config.lr_schedule,
                              "warmup_steps": config.warmup_steps, "next_step": step},
                "world_size": d.world, "parallel": d.mode, "micro_batch": self.micro,
                "model_config": _model_config_dict(self.model_),
                "model_class": self.model_class,
                "objective": type(self.objective).__name__, "dataset_len": len(self.dataset),
                "samples_seen": step * config.batch_size,
                "elapsed": self.elapsed0 + time.perf_counter() - self.t0,
                "torch": torch.__version__, "optimizer": _json_safe(opt_meta),
            }
            path = ts.write_checkpoint(self.out_dir, step, {ts.MODEL_FILE: model_sd, ts.EMA_FILE: ema_sd,
                                                            ts.OPTIMIZER_FILE: opt_tensors},
                                       state, config.keep_checkpoints)
            if self.writer is not None:
                self.writer.flush()
        d.barrier()
        return path

    def _write_finals(self):
        model_sd, ema_sd = self._full_state(self.model_), self._full_state(self.ema)
        if self.dist.rank == 0:
            _save_weights(self.model, ema_sd, self.out_dir / FINAL_DIR)
            _save_weights(self.model, model_sd, self.out_dir / FINAL_ONLINE_DIR)
        self.dist.barrier()


def _save_weights(model: nn.Module, state_dict: Dict[str, torch.Tensor], directory: Path) -> Path:
    """Weights of ``model``'s architecture: ``save_pretrained`` for a WAMTransformer, else
    ``model.safetensors`` (+ ``config.json`` when the model has a ``config.to_dict()``)."""
    from wam_fast.checkpoint import atomic_write, save_pretrained
    from wam_fast.models.transformer import WAMTransformer

    if isinstance(model, WAMTransformer):
        with torch.device("meta"):
            clone = WAMTransformer(model.config)
        clone.load_state_dict(state_dict, assign=True)
        return save_pretrained(clone, directory)
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(directory / "model.safetensors", lambda tmp: save_file(tensors, tmp))
    config = _model_config_dict(model)
    if config is not None:
        atomic_write(directory / "config.json",
                     lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return directory
