"""The on-disk latent dataset of distillation: the format, its writer, and the names of its reader.

Modules: ``dataset_format`` (constants), ``dataset_reader`` (``LatentDataset``), this one (the format,
``DatasetWriter``, ``write_dataset``, ``row_seed``; ``LatentDataset`` and the constants are named here
too), ``synthetic`` (synthetic data) and ``rollout`` (teacher rollout).

Format (version 1)
------------------
A dataset is a directory::

    dataset.json                  the index, written LAST and atomically
    shard-00000.safetensors       rows [0, shard_size)
    shard-00001.safetensors       rows [shard_size, 2 shard_size) ...

``dataset.json``::

    {"format": "wam_fast.latents", "version": 1, "num_samples": N,
     "fields": {"text": {"shape": [text_len, text_dim], "dtype": "float32"}, ...},
     "shards": [{"file": "shard-00000.safetensors", "num_samples": n0, "bytes": size, "sha256": hex}, ...],
     "metadata": {...}}

Each shard is a safetensors file holding one tensor per field, its rows consecutive samples of the
dataset (shard k holds the rows after those of shards 0..k-1). Tensors per sample (a shard's
tensor has the shard's row count in front):

========  ========================  =====================  ==============================================
field     per-sample shape          dtype                  what
========  ========================  =====================  ==============================================
text      (text_len, text_dim)      float32 / bf16 / fp16  instruction embedding (T5 for VideoVLA)
image     (1, C, H, W)              float32 / bf16 / fp16  clean latent of the current observation
                                                           (latent frame 0)
future    (F, C, H, W)              float32 / bf16 / fp16  the following latent frames 1..F (targets;
                                                           F = latent_frames - 1 of the model)
actions   (action_len, action_dim)  float32 / bf16 / fp16  the action chunk (targets)
history   (h, C, H, W)              float32 / bf16 / fp16  clean past frames, oldest first, one control
                                                           step apart; the last is one step before image
robot_id  ()                        int64                  which robot (models with num_robots > 0)
========  ========================  =====================  ==============================================

``text`` and ``image`` are required; ``future`` and ``actions`` (the targets) come together or not
at all: a dataset without them is a *conditions-only* dataset, which ``rollout.teacher_rollout`` turns into
a complete one from a teacher alone (data-free distillation). ``history`` and ``robot_id`` are
optional. Float tensors must be finite. The ``robot_id`` entry of ``fields`` also records the
smallest and largest id (``min``/``max``), so ``check_fits`` needs no pass over the data.

Your own data
-------------
Encode your clips once with the model's VAE and text encoder (for VideoVLA: CogVideoX's 3D VAE and
T5-XXL), then::

    from wam_fast.distill.data import write_dataset
    write_dataset("my_data", {
        "text": t5_embeddings,        # (N, 226, 4096)
        "image": latents[:, :1],      # (N, 1, 16, 32, 32): latent frame 0, the observation
        "future": latents[:, 1:],     # (N, 3, 16, 32, 32): latent frames 1..3
        "actions": action_chunks,     # (N, 6, 7), normalised as the model was trained
    }, shard_size=1024)

or stream it (data larger than memory) with ``DatasetWriter``::

    with DatasetWriter("my_data", shard_size=1024) as writer:
        for batch in batches:
            writer.add(batch)   # a dict as above, any number of rows

Without the original data, write text + image only and run ``rollout.teacher_rollout``.

Reading: ``LatentDataset(directory)`` checks the index and every shard's header at once (clear
errors for a missing directory, index or shard, another format or version, a shard with the wrong
tensors, shapes or dtypes, a truncated or corrupt file), then reads rows lazily from memory-mapped
shards: ``ds.get(indices)``. ``ds.check_fits(config)`` lists every mismatch with a model config.

Synthetic data (``wam_fast.distill.synthetic``): ``make_synthetic_dataset(directory, config,
num_samples, seed)`` writes a tiny, structured, multimodal task (the generative story is
``SyntheticTask``'s docstring) on which a tiny WAM trains in minutes on CPU and where few-step
sampling of an undistilled teacher is visibly worse than many-step sampling.

Teacher rollout (data-free, ``wam_fast.distill.rollout``): ``teacher_rollout(teacher, conditions,
directory)`` samples future latents and actions from a teacher for every row of a conditions
dataset and writes a complete dataset; row i is what ``wam_fast.sample`` gives that row alone with
seed ``row_seed(seed, i)``, whatever the batch size.

Safety: nothing is a dataset until ``dataset.json`` exists, and it is written after every shard
(each shard itself through a temporary file + fsync + rename). An existing dataset is only replaced
with ``overwrite=True``: the new shards get names that no existing file has, the index is swapped
atomically, then the old shards are removed; a crash at any point leaves either the old dataset or
the new one, both complete. A killed writer may leave unreferenced shard files; they are never
read (only files named in the index are), and a write that fails with an exception removes its own.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from wam_fast.utils.files import atomic_write
# The format's constants and the reader live in lower modules; they are named here too, where the
# format is described (LatentDataset, FIELDS, INDEX_NAME, ... from wam_fast.distill.data).
from wam_fast.distill.dataset_format import (DEFAULT_SHARD_SIZE, DTYPE_NAMES, FIELDS, FLOAT_DTYPES, FORMAT,
                                             INDEX_NAME, INT_DTYPES, REQUIRED, TARGETS, VERSION, Field, PathLike,
                                             check_shard_size, describe_fields, file_sha256, is_plain_name)
from wam_fast.distill.dataset_reader import LatentDataset

__all__ = ["DEFAULT_SHARD_SIZE", "FIELDS", "FLOAT_DTYPES", "FORMAT", "INDEX_NAME", "INT_DTYPES", "REQUIRED",
           "TARGETS", "VERSION", "DatasetWriter", "Field", "LatentDataset", "PathLike", "check_shard_size",
           "row_seed", "write_dataset"]

logger = logging.getLogger("wam_fast.distill")


# ---- validation of tensors to write ----------------------------------------------------------------
def _validate_tensors(tensors, what: str = "tensors") -> Tuple[int, Dict[str, torch.Tensor]]:
    """Check a dict of dataset tensors (module docstring); returns (rows, CPU contiguous tensors)."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{what} must be a dict of field name -> tensor, got {type(tensors).__name__}")
    unknown = sorted(set(tensors) - set(FIELDS))
    if unknown:
        raise ValueError(f"{what}: unknown fields {unknown}; a latent dataset holds {list(FIELDS)}")
    missing = [name for name in REQUIRED if name not in tensors]
    if missing:
        raise ValueError(f"{what}: missing required fields {missing} (every sample needs text and image)")
    if ("future" in tensors) != ("actions" in tensors):
        present = "future" if "future" in tensors else "actions"
        raise ValueError(f"{what}: got {present!r} without {'actions' if present == 'future' else 'future'!r}; "
                         "the targets future and actions come together (or neither: a conditions-only "
                         "dataset for teacher_rollout)")
    rows = None
    out = {}
    for name in FIELDS:
        if name not in tensors:
            continue
        t = tensors[name]
        dims, shape_text = FIELDS[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: {name} must be a torch.Tensor (N, *{shape_text}), got {type(t).__name__}")
        if t.dim() != dims + 1:
            raise ValueError(f"{what}: {name} must be {dims + 1}-D (N, *{shape_text}), got shape {tuple(t.shape)}")
        if rows is None:
            rows = t.shape[0]
        elif t.shape[0] != rows:
            raise ValueError(f"{what}: every field needs the same number of samples; text has "
                             f"{out['text'].shape[0]}, {name} has {t.shape[0]}")
        if name == "robot_id":
            if t.dtype != torch.int64:
                raise TypeError(f"{what}: robot_id must be int64, got {t.dtype} (convert with .long())")
            if t.numel() and int(t.min()) < 0:
                raise ValueError(f"{what}: robot_id must be >= 0, got {int(t.min())}")
        else:
            if t.dtype not in DTYPE_NAMES or t.dtype == torch.int64:
                raise TypeError(f"{what}: {name} must be float32, bfloat16 or float16, got {t.dtype}")
            if any(s == 0 for s in t.shape[1:]):
                raise ValueError(f"{what}: {name} has an empty per-sample shape {tuple(t.shape[1:])}")
            if not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).flatten(1).any(dim=1).sum())
                raise ValueError(f"{what}: {name} holds NaN or inf values (in {bad} of {rows} samples)")
        out[name] = t.detach().to("cpu").contiguous()
    if out["image"].shape[1] != 1:
        raise ValueError(f"{what}: image must be (N, 1, C, H, W), one latent frame per sample, "
                         f"got shape {tuple(out['image'].shape)}")
    frame = tuple(out["image"].shape[2:])
    for name in ("future", "history"):
        if name in out and tuple(out[name].shape[2:]) != frame:
            raise ValueError(f"{what}: {name} frames must have the image's (C, H, W) = {frame}, "
                             f"got {tuple(out[name].shape[2:])}")
    return rows, out


def _fields_of(tensors: Dict[str, torch.Tensor]) -> Dict[str, Field]:
    return {name: Field(tuple(t.shape[1:]), t.dtype) for name, t in tensors.items()}


def _check_json(metadata) -> dict:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict (JSON-serialisable), got {type(metadata).__name__}")
    try:
        return json.loads(json.dumps(dict(metadata)))
    except (TypeError, ValueError) as error:
        raise TypeError(f"metadata must be JSON-serialisable: {error}") from None


# ---- writing ---------------------------------------------------------------------------------------
class DatasetWriter:
    """Streams samples into a dataset directory: ``add`` any number of rows, ``close`` writes the index.

    ``DatasetWriter(directory, shard_size=1024, overwrite=False)`` refuses (FileExistsError) a
    directory that already holds a dataset unless ``overwrite``; the old dataset stays readable
    until ``close`` swaps the index, then its shards are removed. ``abort()`` (or an exception in a
    ``with`` block) removes the shards written so far and leaves the directory as it was.
    Every ``add`` must have the fields, per-sample shapes and dtypes of the first.
    """

    def __init__(self, directory: PathLike, shard_size: int = DEFAULT_SHARD_SIZE, *, overwrite: bool = False):
        self.directory = Path(directory)
        self.shard_size = check_shard_size(shard_size)
        if self.directory.exists() and not self.directory.is_dir():
            raise NotADirectoryError(f"dataset directory {self.directory} exists and is not a directory")
        if (self.directory / INDEX_NAME).exists() and not overwrite:
            raise FileExistsError(f"{self.directory} already holds a dataset ({INDEX_NAME}); pass overwrite=True "
                                  "to replace it (the old one stays readable until the new one is complete)")
        self._created = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        # New shard names never collide with a file already there (an old dataset being replaced, or
        # the leftovers of a killed write), so nothing readable is touched before the index swap.
        taken = any(self.directory.glob("shard-*.safetensors"))
        self._prefix = f"shard-{secrets.token_hex(4)}-" if taken else "shard-"
        self.fields: Optional[Dict[str, Field]] = None
        self._pending: List[Dict[str, torch.Tensor]] = []
        self._pending_rows = 0
        self._shards: List[dict] = []
        self._robot_range: Optional[Tuple[int, int]] = None
        self._state = "open"

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.close()

    @property
    def num_samples(self) -> int:
        return sum(shard["num_samples"] for shard in self._shards) + self._pending_rows

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Append the rows of ``tensors`` (a dict as in the module docstring, leading dim = rows)."""
        if self._state != "open":
            raise RuntimeError(f"this DatasetWriter is {self._state}; make a new one")
        self._append(*_validate_tensors(tensors))

    def _append(self, rows: int, tensors: Dict[str, torch.Tensor]) -> None:
        """``add`` of tensors already checked by ``_validate_tensors``."""
        fields = _fields_of(tensors)
        if self.fields is None:
            self.fields = fields
        elif fields != self.fields:
            raise ValueError(f"add: these tensors have fields {describe_fields(fields)}, the first add had "
                             f"{describe_fields(self.fields)}; every add needs the same fields, shapes and dtypes")
        if rows == 0:
            return
        if "robot_id" in tensors:
            low, high = int(tensors["robot_id"].min()), int(tensors["robot_id"].max())
            old = self._robot_range or (low, high)
            self._robot_range = (min(old[0], low), max(old[1], high))
        self._pending.append(tensors)
        self._pending_rows += rows
        while self._pending_rows >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, rows: int) -> None:
        """Write the first ``rows`` pending rows as the next shard."""
        taken, left, need = [], [], rows
        for part in self._pending:
            n = next(iter(part.values())).shape[0]
            if need >= n:
                taken.append(part)
                need -= n
            elif need > 0:
                taken.append({k: v[:need] for k, v in part.items()})
                left.append({k: v[need:] for k, v in part.items()})
                need = 0
            else:
                left.append(part)
        self._pending, self._pending_rows = left, self._pending_rows - rows
        # clone: a slice shares (and would serialise) its parent's storage
        shard = {name: torch.cat([part[name] for part in taken]).contiguous().clone() for name in self.fields}
        name = f"{self._prefix}{len(self._shards):05d}.safetensors"
        path = self.directory / name
        if path.exists():
            raise FileExistsError(f"{path} appeared while writing the dataset (another writer in {self.directory}?)")
        entry = {"file": name, "num_samples": rows}

        def write(tmp):
            from safetensors.torch import save_file

            save_file(shard, tmp, metadata={"format": FORMAT, "version": str(VERSION)})
            entry["bytes"] = os.path.getsize(tmp)
            entry["sha256"] = file_sha256(tmp)

        self._shards.append(entry)  # before the write: abort() also removes a shard renamed into place
        atomic_write(path, write)

    def close(self, metadata: Optional[Mapping] = None) -> Path:
        """Write the last shard and the index (atomically), then remove a replaced dataset's shards."""
        if self._state != "open":
            raise RuntimeError(f"this DatasetWriter is {self._state}")
        metadata = _check_json(metadata)
        try:
            if self.fields is None or self.num_samples == 0:
                raise ValueError(f"no samples were added to the dataset at {self.directory}; a dataset "
                                 "holds at least one sample")
            if self._pending_rows:
                self._flush(self._pending_rows)
            fields = {}
            for name, field in self.fields.items():
                fields[name] = {"shape": list(field.shape), "dtype": DTYPE_NAMES[field.dtype]}
                if name == "robot_id":
                    fields[name]["min"], fields[name]["max"] = self._robot_range
            index = {"format": FORMAT, "version": VERSION, "num_samples": self.num_samples, "fields": fields,
                     "shards": self._shards, "metadata": metadata}
            old_files = _indexed_files(self.directory)
            text = json.dumps(index, indent=1) + "\n"
            atomic_write(self.directory / INDEX_NAME, lambda tmp: Path(tmp).write_text(text))
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        new_files = {shard["file"] for shard in self._shards}
        for name in old_files - new_files:
            try:
                (self.directory / name).unlink()
            except FileNotFoundError:
                pass
        return self.directory

    def abort(self) -> None:
        """Remove the shards written so far; the directory is left as it was (an old dataset intact)."""
        if self._state != "open":
            return
        self._state = "aborted"
        for shard in self._shards:
            try:
                (self.directory / shard["file"]).unlink()
            except FileNotFoundError:
                pass
        self._pending, self._pending_rows = [], 0
        if self._created:
            try:
                self.directory.rmdir()  # only if empty: a directory this writer made and filled with nothing else
            except OSError:
                pass


def _indexed_files(directory: Path) -> set:
    """Shard files named by the index in ``directory`` (empty if none or unreadable)."""
    try:
        index = json.loads((directory / INDEX_NAME).read_text())
        return {shard["file"] for shard in index["shards"] if is_plain_name(shard["file"])}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def write_dataset(directory: PathLike, tensors: Mapping[str, torch.Tensor], shard_size: int = DEFAULT_SHARD_SIZE,
                  metadata: Optional[Mapping] = None, *, overwrite: bool = False) -> Path:
    """Write ``tensors`` (field -> (N, ...) tensor, module docstring) as a dataset; returns the directory.

    Shards of ``shard_size`` rows (the last may be shorter); ``metadata`` (JSON-serialisable) is
    kept in the index. Refuses (FileExistsError) to replace an existing dataset unless
    ``overwrite=True``, and then never leaves a torn one (module docstring).
    """
    shard_size = check_shard_size(shard_size)
    metadata = _check_json(metadata)
    rows, tensors = _validate_tensors(tensors)  # all checks before anything is written
    if rows == 0:
        raise ValueError("tensors hold 0 samples; a dataset holds at least one sample")
    writer = DatasetWriter(directory, shard_size, overwrite=overwrite)
    try:
        for start in range(0, rows, shard_size):
            writer._append(min(shard_size, rows - start), {name: t[start:start + shard_size] for name, t in tensors.items()})
    except BaseException:
        writer.abort()
        raise
    return writer.close(metadata)


# ---- per-row seeds ---------------------------------------------------------------------------------
_MASK64 = (1 << 64) - 1


def row_seed(seed: int, index: int) -> int:
    """A 63-bit seed for row ``index`` of a run with ``seed`` (splitmix64 of the pair): rows of one run,
    and the same row under different run seeds, get unrelated streams."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(index) + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1
