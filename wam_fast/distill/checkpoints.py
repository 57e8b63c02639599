"""Checkpoints of a distillation run's modules and optimizer, for ``wam_fast.distill.trainer``.

``plan_resume`` decides which checkpoint a run resumes from (or why it cannot); ``load_module`` /
``load_optimizer`` restore one; ``save_checkpoint`` gathers the full (unsharded) state dicts on every
rank and rank 0 writes them; ``write_finals`` writes ``final/`` (EMA) and ``final-online/`` (online
weights). The files themselves are ``wam_fast.distill.train_state``'s.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from wam_fast.distill import train_state as ts
from wam_fast.distill.distributed import Dist, full_options, full_state_dict
from wam_fast.distill.train_config import RESUMABLE_FIELDS, TrainConfig
from wam_fast.models.transformer import WAMTransformer, save_pretrained
from wam_fast.utils.files import atomic_write

FINAL_DIR, FINAL_ONLINE_DIR = "final", "final-online"
logger = logging.getLogger("wam_fast.distill")


# ---- resume: which checkpoint, and does it fit --------------------------------------------------
def config_mismatch(saved: dict, config: TrainConfig) -> List[str]:
    """The fields outside ``RESUMABLE_FIELDS`` where a checkpoint's TrainConfig differs from ``config``."""
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


def state_dict_mismatch(module: nn.Module, shapes: Dict[str, Tuple[int, ...]]) -> Optional[str]:
    """Why a checkpoint's tensors (name -> shape) do not fit ``module``, or None."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    other = sorted(k for k in expected if k in shapes and shapes[k] != expected[k])
    if not (missing or unexpected or other):
        return None
    return (f"weights: the checkpoint's do not fit the model (missing {missing[:8]}, unexpected "
            f"{unexpected[:8]}, other shapes {other[:8]})")


def model_config_dict(model) -> Optional[dict]:
    """``model.config.to_dict()`` as it reads back from JSON (tuples become lists), or None."""
    to_dict = getattr(getattr(model, "config", None), "to_dict", None)
    return json_safe(to_dict()) if callable(to_dict) else None


def json_safe(value):
    return json.loads(json.dumps(value, default=str))


def plan_resume(out_dir: Path, resume: bool, config: TrainConfig, model: nn.Module,
                dataset_len: int) -> Tuple[Optional[Path], Optional[str]]:
    """(checkpoint to resume from or None, error message or None) for a run into ``out_dir``. Damaged
    checkpoints (unreadable state, a file off its sha256) are skipped for the newest intact one, each with a
    log line; if none is intact the run refuses rather than start over on top of them."""
    newest = ts.latest_checkpoint(out_dir)
    if newest is None:
        return None, None
    if not resume:
        return None, (f"{out_dir} already holds a run (checkpoint {newest.name}) and "
                      "resume=False: choose another out_dir, or resume it")
    checkpoint, skipped = ts.latest_intact_checkpoint(out_dir)
    for directory, why in skipped:
        logger.warning("not resuming from %s: %s", directory, why)
    if checkpoint is None:
        return None, (f"every checkpoint in {out_dir / ts.CHECKPOINTS_DIR} is damaged ("
                      + "; ".join(why for _, why in skipped) + "): restore them from a copy, or start the run "
                      "in another out_dir")
    if skipped:
        logger.warning("resuming from %s, the newest intact checkpoint", checkpoint)
    try:
        state = ts.read_state(checkpoint)
    except ValueError as exc:
        return None, str(exc)
    problems = config_mismatch(state.get("config", {}), config)
    if state["step"] > config.steps:
        problems.append(f"steps: the checkpoint is at step {state['step']}, beyond steps={config.steps}")
    saved_model, model_config = state.get("model_config"), model_config_dict(model)
    if saved_model is not None and model_config is not None and saved_model != model_config:
        diff = sorted(k for k in set(saved_model) | set(model_config)
                      if saved_model.get(k) != model_config.get(k))
        problems.append(f"model config: differs in {diff}")
    try:
        problem = state_dict_mismatch(model, ts.tensor_shapes(checkpoint, ts.MODEL_FILE))
    except Exception as exc:  # noqa: BLE001 - a missing file, or safetensors' own header errors
        problem = f"cannot read {checkpoint / ts.MODEL_FILE}: {type(exc).__name__}: {exc}"
    if problem:
        problems.append(problem)
    if state.get("dataset_len") not in (None, dataset_len):
        problems.append(f"dataset: the checkpoint was trained on {state['dataset_len']} samples, "
                        f"this dataset has {dataset_len} (the sample order would change)")
    if problems:
        return None, (f"cannot resume {checkpoint}: the run differs from the checkpoint's in "
                      + "; ".join(problems) + ". Nothing was changed: use the checkpoint's settings "
                      "or another out_dir.")
    return checkpoint, None


# ---- loading ------------------------------------------------------------------------------------
def load_module(module: nn.Module, checkpoint: Path, file_name: str) -> None:
    tensors = ts.read_tensors(checkpoint, file_name)
    problem = state_dict_mismatch(module, {k: tuple(v.shape) for k, v in tensors.items()})
    if problem:
        raise ValueError(f"{checkpoint / file_name}: {problem}")
    module.load_state_dict(tensors)


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Path, state: dict) -> None:
    """Restore the optimizer state of ``checkpoint`` (``state``: its state.json) into a (sharded) model's."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    meta = state["optimizer"]
    osd = ts.unflatten_optimizer_state(ts.read_tensors(checkpoint, ts.OPTIMIZER_FILE), meta)
    set_optimizer_state_dict(model, optimizer, osd, options=full_options())


# ---- saving -------------------------------------------------------------------------------------
def save_checkpoint(d: Dist, out_dir: Path, step: int, config: TrainConfig, model: nn.Module, ema: nn.Module,
                    optimizer: torch.optim.Optimizer, run_info: dict) -> Path:
    """Checkpoint ``step``: every rank gathers, rank 0 writes (no barrier); returns the directory.

    ``run_info`` adds the trainer's own fields to state.json (micro_batch, model_class, objective,
    dataset_len, elapsed)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model_sd, ema_sd = full_state_dict(model), full_state_dict(ema)
    osd = get_optimizer_state_dict(model, optimizer, options=full_options(cpu_offload=True))
    path = out_dir / ts.CHECKPOINTS_DIR / ts.step_dir_name(step)
    if d.rank == 0:
        opt_tensors, opt_meta = ts.flatten_optimizer_state(osd)
        state = {
            "format": ts.FORMAT, "step": step, "config": config.to_dict(),
            "scheduler": {"lr": config.lr_at(step - 1), "lr_schedule": config.lr_schedule,
                          "warmup_steps": config.warmup_steps, "next_step": step},
            "world_size": d.world, "parallel": d.mode,
            "model_config": model_config_dict(model),
            "samples_seen": step * config.batch_size,
            "torch": torch.__version__, "optimizer": json_safe(opt_meta),
            **run_info,
        }
        path = ts.write_checkpoint(out_dir, step, {ts.MODEL_FILE: model_sd, ts.EMA_FILE: ema_sd,
                                                   ts.OPTIMIZER_FILE: opt_tensors},
                                   state, config.keep_checkpoints)
    return path


def write_finals(d: Dist, architecture: nn.Module, model: nn.Module, ema: nn.Module, out_dir: Path) -> None:
    """``final/`` (EMA weights) and ``final-online/`` (online weights) of ``architecture``'s kind."""
    model_sd, ema_sd = full_state_dict(model), full_state_dict(ema)
    if d.rank == 0:
        save_weights(architecture, ema_sd, out_dir / FINAL_DIR)
        save_weights(architecture, model_sd, out_dir / FINAL_ONLINE_DIR)
    d.barrier()


def save_weights(model: nn.Module, state_dict: Dict[str, torch.Tensor], directory: Path) -> Path:
    """Weights of ``model``'s architecture: ``save_pretrained`` for a WAMTransformer, else
    ``model.safetensors`` (+ ``config.json`` when the model has a ``config.to_dict()``)."""
    if isinstance(model, WAMTransformer):
        with torch.device("meta"):
            clone = WAMTransformer(model.config)
        clone.load_state_dict(state_dict, assign=True)
        return save_pretrained(clone, directory)
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(directory / "model.safetensors", lambda tmp: save_file(tensors, tmp))
    config = model_config_dict(model)
    if config is not None:
        atomic_write(directory / "config.json",
                     lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return directory
