"""On-disk state of a training run (``wam_fast.distill.trainer``): checkpoints, resume, metrics log.

Layout of ``out_dir``::

    metrics.jsonl                      one JSON object per logged step (step, loss, ..., elapsed)
    checkpoints/step-00001000/         one complete checkpoint per directory
        model.safetensors              the online weights (full, unsharded state dict)
        ema.safetensors                the EMA weights
        optimizer.safetensors          the optimizer state, flattened: "state.<param fqn>.<key>"
        state.json                     step, TrainConfig, scheduler, world size, model config,
                                       optimizer param groups, elapsed time (written last)
    checkpoints/latest                 the name of the newest checkpoint directory
    checkpoints/.step-00002000.XXXX.tmp/   a checkpoint being written (or torn by a crash)
    final/, final-online/              EMA and online weights at the end (save_pretrained)

A checkpoint is written into a temporary sibling directory (every file fsync'ed) and renamed into
place, so a ``step-*`` directory is always complete; a crash leaves at most a ``.step-*.tmp``
directory, which is ignored and removed by the next run. ``latest`` is swapped atomically after the
rename. Resume takes the newest complete ``step-*`` directory (which ``latest`` names unless the
crash fell between the rename and the swap). Tensors are safetensors, everything else JSON: no pickle.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

from wam_fast.utils.checksums import file_sha256
from wam_fast.utils.files import atomic_write, fsync_dir, plain_mode

logger = logging.getLogger("wam_fast.distill")

CHECKPOINTS_DIR = "checkpoints"
LATEST_NAME = "latest"
STATE_NAME = "state.json"
MODEL_FILE, EMA_FILE, OPTIMIZER_FILE = "model.safetensors", "ema.safetensors", "optimizer.safetensors"
METRICS_NAME = "metrics.jsonl"
FORMAT = "wam_fast.distill.checkpoint/1"
_STEP_RE = re.compile(r"^step-(\d{8,})$")
_TORN_RE = re.compile(r"^\.step-\d{8,}\..*\.tmp$")

PathLike = Union[str, Path]


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# ---- finding checkpoints -----------------------------------------------------------------------
def list_checkpoints(out_dir: PathLike) -> List[Tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first, as (step, directory)."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_RE.match(entry.name)
        if match and entry.is_dir() and (entry / STATE_NAME).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def torn_checkpoints(out_dir: PathLike) -> List[Path]:
    """Temporary checkpoint directories left by a run that died while writing one."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted(entry for entry in root.iterdir() if _TORN_RE.match(entry.name))


def remove_torn(out_dir: PathLike) -> List[Path]:
    """Delete torn temporary checkpoint directories; returns what was removed."""
    removed = torn_checkpoints(out_dir)
    for path in removed:
        logger.warning("removing torn checkpoint %s (a run died while writing it)", path)
        shutil.rmtree(path, ignore_errors=True)
    return removed


def latest_checkpoint(out_dir: PathLike) -> Optional[Path]:
    """The newest complete checkpoint directory of a run, or None."""
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def checkpoint_damage(directory: PathLike) -> Optional[str]:
    """None when ``directory``'s state.json reads and every file matches its sha256 there, else why not.
    (A checkpoint written before checksums has none to check: only its state is read.)"""
    directory = Path(directory)
    try:
        state = read_state(directory)
    except ValueError as exc:
        return str(exc)
    for file_name, digest in (state.get("sha256") or {}).items():
        path = directory / file_name
        if not path.is_file():
            return f"{path} is missing"
        if file_sha256(path) != digest:
            return f"{path} does not match its sha256 in {STATE_NAME} (damaged or changed after the save)"
    return None


def latest_intact_checkpoint(out_dir: PathLike) -> Tuple[Optional[Path], List[Tuple[Path, str]]]:
    """The newest checkpoint that passes ``checkpoint_damage`` (or None), and the newer ones skipped, with why."""
    skipped = []
    for _, directory in reversed(list_checkpoints(out_dir)):
        why = checkpoint_damage(directory)
        if why is None:
            return directory, skipped
        skipped.append((directory, why))
    return None, skipped


# ---- writing -----------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_checkpoint(out_dir: PathLike, step: int, tensors: Dict[str, Dict[str, torch.Tensor]],
                     state: dict, keep: int) -> Path:
    """Write one checkpoint atomically; returns its directory.

    ``tensors`` maps a file name (``model.safetensors``, ...) to a flat dict of CPU tensors;
    ``state`` is the JSON part. The directory appears under its final name only when complete; then
    ``latest`` is swapped to it and all but the newest ``keep`` checkpoints are deleted.
    """
    from safetensors.torch import save_file

    root = Path(out_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    try:
        os.chmod(tmp, plain_mode(0o777))  # mkdtemp's 0o700 would hide the run from the rest of a team
        for file_name, flat in tensors.items():
            path = tmp / file_name
            save_file({k: v.detach().contiguous().cpu() for k, v in flat.items()}, str(path),
                      metadata={"format": FORMAT, "step": str(step)})
            os.chmod(path, plain_mode(0o666))  # safetensors writes 0o600
            _fsync_file(path)
        # the files' sha256 go into state.json: a flipped bit is found before a resume loads it
        state = {**state, "sha256": {file_name: file_sha256(tmp / file_name) for file_name in tensors}}
        state_path = tmp / STATE_NAME  # written last: its presence marks a complete directory
        state_path.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        _fsync_file(state_path)
        fsync_dir(tmp)
        if final.exists():  # the same step written again (e.g. a rerun that found nothing to do)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(root)
    atomic_write(root / LATEST_NAME, lambda p: Path(p).write_text(name + "\n"))
    for _, old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---- reading -----------------------------------------------------------------------------------
def read_state(directory: PathLike) -> dict:
    """The JSON part of a checkpoint; ValueError when it is not one of ours."""
    path = Path(directory) / STATE_NAME
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read checkpoint state {path}: {exc}") from exc
    if state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a wam_fast distillation checkpoint of format {FORMAT!r} "
                         f"(format {state.get('format')!r})")
    return state


def read_tensors(directory: PathLike, file_name: str) -> Dict[str, torch.Tensor]:
    """One safetensors file of a checkpoint, on the CPU."""
    from safetensors.torch import load_file

    path = Path(directory) / file_name
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing; a checkpoint directory holds "
                                f"{MODEL_FILE}, {EMA_FILE}, {OPTIMIZER_FILE} and {STATE_NAME}")
    return load_file(str(path), device="cpu")


def tensor_shapes(directory: PathLike, file_name: str) -> Dict[str, Tuple[int, ...]]:
    """Name -> shape of the tensors of one checkpoint file, from its header (no data read)."""
    from safetensors import safe_open

    path = Path(directory) / file_name
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing")
    with safe_open(str(path), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


# ---- optimizer state <-> flat tensors + JSON ---------------------------------------------------
def flatten_optimizer_state(osd: dict) -> Tuple[Dict[str, torch.Tensor], dict]:
    """A full optimizer state dict keyed by parameter names (``get_optimizer_state_dict``) ->
    (tensors "state.<fqn>.<key>", JSON part: param groups and any non-tensor state values)."""
    tensors: Dict[str, torch.Tensor] = {}
    scalars: Dict[str, dict] = {}
    for fqn, entry in osd.get("state", {}).items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{fqn}.{key}"] = value
            else:
                scalars.setdefault(fqn, {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}
              for group in osd.get("param_groups", [])]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer_state(tensors: Dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of ``flatten_optimizer_state``."""
    state: Dict[str, dict] = {}
    for name, value in tensors.items():
        if not name.startswith("state."):
            raise ValueError(f"unexpected optimizer tensor {name!r} (expected 'state.<param>.<key>')")
        fqn, key = name[len("state."):].rsplit(".", 1)
        state.setdefault(fqn, {})[key] = value
    for fqn, entry in meta.get("scalars", {}).items():
        state.setdefault(fqn, {}).update(entry)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


# ---- metrics log -------------------------------------------------------------------------------
def read_metrics(path: PathLike) -> List[dict]:
    """The parsed lines of a metrics.jsonl (a torn last line from a killed run is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_metrics(path: PathLike, step: int) -> int:
    """Keep the lines of ``path`` with ``step`` <= ``step`` (and drop torn lines); atomic rewrite.

    A resumed run logs the steps after its checkpoint again, so the lines the dead run wrote past
    the checkpoint are dropped and the log holds each step once. Returns the number of lines dropped.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
    dropped = len(lines) - len(kept)
    if dropped:
        atomic_write(path, lambda p: Path(p).write_text("".join(line + "\n" for line in kept)))
    return dropped
