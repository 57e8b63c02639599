"""The on-disk latent dataset of distillation: format, loader, synthetic data and teacher rollout.

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
at all: a dataset without them is a *conditions-only* dataset, which ``teacher_rollout`` turns into
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

Without the original data, write text + image only and run ``teacher_rollout``.

Reading: ``LatentDataset(directory)`` checks the index and every shard's header at once (clear
errors for a missing directory, index or shard, another format or version, a shard with the wrong
tensors, shapes or dtypes, a truncated or corrupt file), then reads rows lazily from memory-mapped
shards: ``ds.get(indices)``. ``ds.check_fits(config)`` lists every mismatch with a model config.

Synthetic data: ``make_synthetic_dataset(directory, config, num_samples, seed)`` writes a tiny,
structured, multimodal task (the generative story is ``SyntheticTask``'s docstring) on which a tiny
WAM trains in minutes on CPU and where few-step sampling of an undistilled teacher is visibly worse
than many-step sampling.

Teacher rollout (data-free): ``teacher_rollout(teacher, conditions, directory)`` samples future
latents and actions from a teacher for every row of a conditions dataset and writes a complete
dataset; row i is what ``wam_fast.sample`` gives that row alone with seed ``row_seed(seed, i)``,
whatever the batch size.

Safety: nothing is a dataset until ``dataset.json`` exists, and it is written after every shard
(each shard itself through a temporary file + fsync + rename). An existing dataset is only replaced
with ``overwrite=True``: the new shards get names that no existing file has, the index is swapped
atomically, then the old shards are removed; a crash at any point leaves either the old dataset or
the new one, both complete. A killed writer may leave unreferenced shard files; they are never
read (only files named in the index are), and a write that fails with an exception removes its own.
"""
from __future__ import annotations

import collections
import hashlib
import inspect
import json
import logging
import numbers
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from wam_fast.checkpoint import atomic_write

logger = logging.getLogger("wam_fast.distill")

FORMAT = "wam_fast.latents"
VERSION = 1
INDEX_NAME = "dataset.json"
DEFAULT_SHARD_SIZE = 1024

# field -> (dims per sample, what it is); the order is the order of the format table above.
FIELDS: Dict[str, Tuple[int, str]] = {
    "text": (2, "(text_len, text_dim)"),
    "image": (4, "(1, C, H, W)"),
    "future": (4, "(F, C, H, W)"),
    "actions": (2, "(action_len, action_dim)"),
    "history": (4, "(h, C, H, W)"),
    "robot_id": (0, "()"),
}
REQUIRED = ("text", "image")
TARGETS = ("future", "actions")
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INT_DTYPES = {"int64": torch.int64}
_DTYPE_NAMES = {dtype: name for name, dtype in {**FLOAT_DTYPES, **INT_DTYPES}.items()}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64}

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class Field:
    """One tensor of every sample: its per-sample shape and dtype."""

    shape: Tuple[int, ...]
    dtype: torch.dtype


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
            if t.dtype not in _DTYPE_NAMES or t.dtype == torch.int64:
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


def _check_shard_size(shard_size) -> int:
    if isinstance(shard_size, bool) or not isinstance(shard_size, numbers.Integral) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    return int(shard_size)


def _sha256(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


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
        self.shard_size = _check_shard_size(shard_size)
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
            raise ValueError(f"add: these tensors have fields {_describe_fields(fields)}, the first add had "
                             f"{_describe_fields(self.fields)}; every add needs the same fields, shapes and dtypes")
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
            entry["sha256"] = _sha256(tmp)

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
                fields[name] = {"shape": list(field.shape), "dtype": _DTYPE_NAMES[field.dtype]}
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
        return {shard["file"] for shard in index["shards"] if _plain_name(shard["file"])}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _describe_fields(fields: Mapping[str, Field]) -> str:
    return "{" + ", ".join(f"{name}: {tuple(f.shape)} {_DTYPE_NAMES.get(f.dtype, f.dtype)}"
                           for name, f in fields.items()) + "}"


def write_dataset(directory: PathLike, tensors: Mapping[str, torch.Tensor], shard_size: int = DEFAULT_SHARD_SIZE,
                  metadata: Optional[Mapping] = None, *, overwrite: bool = False) -> Path:
    """Write ``tensors`` (field -> (N, ...) tensor, module docstring) as a dataset; returns the directory.

    Shards of ``shard_size`` rows (the last may be shorter); ``metadata`` (JSON-serialisable) is
    kept in the index. Refuses (FileExistsError) to replace an existing dataset unless
    ``overwrite=True``, and then never leaves a torn one (module docstring).
    """
    shard_size = _check_shard_size(shard_size)
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


# ---- reading ---------------------------------------------------------------------------------------
class LatentDataset:
    """A dataset written by ``write_dataset`` / ``DatasetWriter``, read lazily (memory-mapped shards).

    ``LatentDataset(directory, verify=False)`` reads the index and checks every shard's header
    (present, size as indexed, the tensors, shapes and dtypes of the index) without reading data;
    ``verify=True`` also checks every shard's sha256 (a full read). ``len(ds)``, ``ds.fields``
    (name -> Field), ``ds.has_targets``, ``ds.metadata``, ``ds.get(indices)`` -> dict of
    (len(indices), ...) CPU tensors in the order given, ``ds[i]`` -> one sample (no leading dim).
    Picklable (open files are not carried), so it works with DataLoader workers.
    """

    max_open_shards = 32  # open safetensors handles kept (least recently used closed first)

    def __init__(self, directory: PathLike, verify: bool = False):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"dataset directory {self.directory} not found")
        index_path = self.directory / INDEX_NAME
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} not found: {self.directory} holds no dataset (a dataset is "
                                    "a directory with dataset.json and shards, written by write_dataset; "
                                    "an interrupted write leaves none)")
        try:
            index = json.loads(index_path.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"{index_path} is not valid JSON ({error}); rewrite the dataset") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            got = index.get("format") if isinstance(index, dict) else type(index).__name__
            raise ValueError(f"{index_path} is not a wam_fast latent dataset: format {got!r}, expected {FORMAT!r}")
        if index.get("version") != VERSION:
            raise ValueError(f"{index_path} has format version {index.get('version')!r}; this wam_fast reads "
                             f"version {VERSION} (a dataset written by another wam_fast version?)")
        self._index = index
        self.fields = self._parse_fields(index_path, index.get("fields"))
        self.num_samples, self._shards = self._parse_shards(index_path, index)
        self.metadata: dict = index.get("metadata") or {}
        self._offsets = torch.tensor([0] + [s["num_samples"] for s in self._shards]).cumsum(0)
        self._handles: "collections.OrderedDict[int, object]" = collections.OrderedDict()
        for k in range(len(self._shards)):
            self._check_shard(k, verify)

    # -- index parsing --
    @staticmethod
    def _parse_fields(index_path: Path, raw) -> Dict[str, Field]:
        if not isinstance(raw, dict) or not raw:
            raise ValueError(f"{index_path}: 'fields' must be a non-empty object, got {raw!r}")
        fields = {}
        for name, spec in raw.items():
            if name not in FIELDS:
                raise ValueError(f"{index_path}: unknown field {name!r}; a latent dataset holds {list(FIELDS)}")
            dtypes = INT_DTYPES if name == "robot_id" else FLOAT_DTYPES
            if (not isinstance(spec, dict) or spec.get("dtype") not in dtypes
                    or not isinstance(spec.get("shape"), list) or len(spec["shape"]) != FIELDS[name][0]
                    or not all(isinstance(s, int) and s > 0 for s in spec["shape"])):
                raise ValueError(f"{index_path}: field {name!r} must be {{'shape': {FIELDS[name][1]}, 'dtype': one "
                                 f"of {list(dtypes)}}}, got {spec!r}")
            fields[name] = Field(tuple(spec["shape"]), dtypes[spec["dtype"]])
        missing = [name for name in REQUIRED if name not in fields]
        if missing:
            raise ValueError(f"{index_path}: missing required fields {missing}")
        if ("future" in fields) != ("actions" in fields):
            raise ValueError(f"{index_path}: future and actions come together, got fields {list(fields)}")
        if fields["image"].shape[0] != 1:
            raise ValueError(f"{index_path}: image must be (1, C, H, W) per sample, got {fields['image'].shape}")
        for name in ("future", "history"):
            if name in fields and fields[name].shape[1:] != fields["image"].shape[1:]:
                raise ValueError(f"{index_path}: {name} frames are {fields[name].shape[1:]}, the image's "
                                 f"(C, H, W) is {fields['image'].shape[1:]}")
        return fields

    @staticmethod
    def _parse_shards(index_path: Path, index: dict):
        shards, total = index.get("shards"), index.get("num_samples")
        if not isinstance(shards, list) or not shards:
            raise ValueError(f"{index_path}: 'shards' must be a non-empty list, got {shards!r}")
        for shard in shards:
            if (not isinstance(shard, dict) or not _plain_name(shard.get("file"))
                    or not isinstance(shard.get("num_samples"), int) or shard["num_samples"] < 1):
                raise ValueError(f"{index_path}: a shard entry must be {{'file': a file name in the dataset "
                                 f"directory, 'num_samples': a positive int, ...}}, got {shard!r}")
        counted = sum(shard["num_samples"] for shard in shards)
        if total != counted:
            raise ValueError(f"{index_path}: num_samples is {total!r} but the shards hold {counted}")
        return total, shards

    def _check_shard(self, k: int, verify: bool) -> None:
        shard = self._shards[k]
        path = self.directory / shard["file"]
        if not path.is_file():
            raise FileNotFoundError(f"shard {shard['file']} of the dataset at {self.directory} is missing "
                                    f"({path}); the dataset is incomplete")
        size = path.stat().st_size
        if "bytes" in shard and size != shard["bytes"]:
            raise ValueError(f"shard {path} has {size} bytes, the index says {shard['bytes']}: the file is "
                             "truncated or corrupt")
        handle = self._open(k)
        expected = set(self.fields)
        found = set(handle.keys())
        if found != expected:
            missing, unexpected = sorted(expected - found), sorted(found - expected)
            raise ValueError(f"shard {path}: " + "; ".join(
                [f"tensor {name!r} missing" for name in missing] + [f"unexpected tensor {name!r}" for name in unexpected])
                + f" (it holds {sorted(found)}, the index expects {sorted(expected)})")
        for name, field in self.fields.items():
            view = handle.get_slice(name)
            shape, dtype = tuple(view.get_shape()), _SAFETENSORS_DTYPES.get(view.get_dtype(), view.get_dtype())
            want = (shard["num_samples"],) + field.shape
            if shape != want or dtype != field.dtype:
                raise ValueError(f"shard {path}: tensor {name!r} has shape {shape} dtype {dtype}, the index "
                                 f"expects shape {want} dtype {field.dtype}")
        if verify and "sha256" in shard and _sha256(path) != shard["sha256"]:
            raise ValueError(f"shard {path}: sha256 differs from the index: the file is corrupt")

    def _open(self, k: int):
        if k in self._handles:
            self._handles.move_to_end(k)
            return self._handles[k]
        from safetensors import safe_open

        path = self.directory / self._shards[k]["file"]
        try:
            handle = safe_open(str(path), framework="pt")
        except FileNotFoundError:
            raise FileNotFoundError(f"shard {self._shards[k]['file']} of the dataset at {self.directory} is "
                                    f"missing ({path})") from None
        except Exception as error:  # safetensors raises its own SafetensorError
            raise ValueError(f"shard {path} cannot be read as safetensors (truncated or corrupt): {error}") from None
        self._handles[k] = handle
        while len(self._handles) > self.max_open_shards:
            self._handles.popitem(last=False)
        return handle

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = collections.OrderedDict()
        return state

    # -- public --
    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (f"LatentDataset({str(self.directory)!r}, {self.num_samples} samples in {len(self._shards)} "
                f"shards, fields {_describe_fields(self.fields)})")

    @property
    def has_targets(self) -> bool:
        """True when every sample has future latents and actions (else a conditions-only dataset)."""
        return all(name in self.fields for name in TARGETS)

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def get(self, indices) -> Dict[str, torch.Tensor]:
        """Rows ``indices`` (1-D integer tensor or sequence, any order, repeats allowed) of every field:
        a dict of CPU tensors (len(indices), *field shape) in the stored dtypes."""
        if not isinstance(indices, torch.Tensor):
            try:
                indices = torch.as_tensor(indices, dtype=torch.int64)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"indices must be a 1-D integer tensor or sequence, got {type(indices).__name__}") from None
        if indices.dim() != 1 or indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"indices must be a 1-D integer tensor, got shape {tuple(indices.shape)} dtype "
                            f"{indices.dtype}")
        indices = indices.to("cpu", torch.int64)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_samples):
            raise IndexError(f"indices must lie in [0, {self.num_samples}), got values in "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        out = {name: torch.empty((len(indices),) + field.shape, dtype=field.dtype)
               for name, field in self.fields.items()}
        shard_of = torch.searchsorted(self._offsets[1:], indices, right=True)
        for k in torch.unique(shard_of).tolist():
            where = (shard_of == k).nonzero().squeeze(1)
            local, inverse = torch.unique(indices[where] - self._offsets[k], return_inverse=True)
            # read consecutive runs of the sorted unique rows: one slice per run
            breaks = ((local[1:] - local[:-1]) != 1).nonzero().squeeze(1) + 1
            starts = [0] + breaks.tolist()
            ends = breaks.tolist() + [len(local)]
            runs = [(int(local[s]), int(local[e - 1]) + 1) for s, e in zip(starts, ends)]
            handle = self._open(k)
            for name in self.fields:
                view = handle.get_slice(name)
                block = torch.cat([view[a:b] for a, b in runs]) if len(runs) > 1 else view[runs[0][0]:runs[0][1]]
                out[name][where] = block[inverse]
        return out

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"LatentDataset[i] takes an int (use .get(indices) for many), got {type(i).__name__}")
        i = int(i)
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.num_samples} samples")
        return {name: t[0] for name, t in self.get(torch.tensor([i % self.num_samples])).items()}

    def mismatches(self, config, fields: Sequence[str] = tuple(FIELDS)) -> List[str]:
        """Every way this dataset does not fit a model with ``config`` (empty list: it fits), looking
        at ``fields`` only (default all; a missing robot_id is a mismatch when "robot_id" is among them)."""
        c, problems = config, []
        f = {name: field for name, field in self.fields.items() if name in fields}
        frame = (c.latent_channels, c.latent_height, c.latent_width)
        if "text" in f and f["text"].shape != (c.text_len, c.text_dim):
            problems.append(f"text is {f['text'].shape} per sample, the model takes (text_len, text_dim) = "
                            f"{(c.text_len, c.text_dim)}")
        if "image" in f and f["image"].shape != (1,) + frame:
            problems.append(f"image is {f['image'].shape} per sample, the model's latent frame is "
                            f"(1, C, H, W) = {(1,) + frame}")
        if "future" in f:
            want = (c.latent_frames - 1,) + frame
            if f["future"].shape != want:
                problems.append(f"future is {f['future'].shape} per sample, the model predicts latent_frames - 1 "
                                f"= {c.latent_frames - 1} future frames of (C, H, W) {frame}: {want}")
        if "actions" in f and f["actions"].shape != (c.action_len, c.action_dim):
            problems.append(f"actions are {f['actions'].shape} per sample, the model's chunk is "
                            f"(action_len, action_dim) = {(c.action_len, c.action_dim)}")
        if "history" in f:
            h = f["history"].shape[0]
            if h > c.history_frames:
                problems.append(f"history holds {h} frames per sample, the model takes at most "
                                f"config.history_frames = {c.history_frames}"
                                + (" (mask='temporal' with history_frames > 0 takes history)"
                                   if c.history_frames == 0 else ""))
            if f["history"].shape[1:] != frame:
                problems.append(f"history frames are {f['history'].shape[1:]}, the model's latent frame is {frame}")
        if "robot_id" in f:
            top = self._index["fields"]["robot_id"].get("max")
            if c.num_robots == 0:
                problems.append("the dataset has robot_id but the model has no robot-id embedding (num_robots = 0)")
            elif top is not None and top >= c.num_robots:
                problems.append(f"robot_id goes up to {top}, the model has num_robots = {c.num_robots}")
        elif c.num_robots > 0 and "robot_id" in fields:
            problems.append(f"the model has a robot-id embedding (num_robots = {c.num_robots}) but the dataset "
                            "has no robot_id")
        return problems

    def check_fits(self, config) -> None:
        """Raise one ValueError listing every mismatch between this dataset and ``config``."""
        problems = self.mismatches(config)
        if problems:
            raise ValueError(f"the dataset at {self.directory} does not fit the model config "
                             f"{getattr(config, 'name', '?')!r}:\n  - " + "\n  - ".join(problems))


# ---- per-row seeds ---------------------------------------------------------------------------------
_MASK64 = (1 << 64) - 1


def row_seed(seed: int, index: int) -> int:
    """A 63-bit seed for row ``index`` of a run with ``seed`` (splitmix64 of the pair): rows of one run,
    and the same row under different run seeds, get unrelated streams."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(index) + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


# ---- synthetic data --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticTask:
    """The generative story of ``make_synthetic_dataset`` (constants drawn from ``seed``).

    A sample:
      1. instruction c, uniform over ``num_instructions``: text = ``texts[c]`` (fixed N(0, 1)
         embeddings, (text_len, text_dim)).
      2. scene s in {0, 1}, uniform ("which side the object is on"): image = (2s - 1) * pattern
         + IMAGE_NOISE * N(0, 1), pattern a fixed N(0, 1) latent (C, H, W). The scene is plain to
         see (the image's correlation with the pattern has sign 2s - 1).
      3. mode m in {2s, 2s + 1}, uniform: each instruction has 4 mode centres (``centres[c]``,
         distinct corners of the cube [-1, 1]^action_dim, or the levels -1.5, -0.5, 0.5, 1.5 when
         action_dim = 1), and the scene allows 2 of them. So given text and image the action
         distribution is bimodal (modes >= 2 apart, 1 when action_dim = 1: >= 10 in-mode stds): a sampler that averages
         modes (an undistilled teacher in 1 step) lands between them.
      4. robot r, uniform over num_robots (when num_robots > 0), with gain g_r = 1 + 0.5 r / num_robots
         (g = 1 without robots): every row of the action chunk is g_r * centres[c, m] + MODE_STD * N(0, 1).
      5. future frame j = 1 .. latent_frames - 1 (deterministic given image and mode):
         FRAME_DECAY**j * roll(image, j * d_m, width axis) + LEVELS[m], with the direction of motion
         d_m = +1 for even m, -1 for odd m: the two modes of a scene move the scene opposite ways and
         shift its level differently, so video and actions are coupled.
      6. history (history_frames > 0): the scene moved before at a direction d' = +-1 (uniform,
         independent of the mode): the frame a steps back is roll(image, -a * d'), oldest first.
    """

    config: object
    seed: int
    texts: torch.Tensor  # (num_instructions, text_len, text_dim)
    pattern: torch.Tensor  # (C, H, W)
    centres: torch.Tensor  # (num_instructions, 4, action_dim)

    IMAGE_NOISE = 0.25
    MODE_STD = 0.1
    IN_MODE = 0.5  # L-infinity distance to a mode centre below which a chunk is in that mode
    FRAME_DECAY = 0.8
    LEVELS = (-0.75, -0.25, 0.25, 0.75)
    BLOCK = 256  # samples drawn per generator: the data do not depend on how they are sharded

    @property
    def num_instructions(self) -> int:
        return self.texts.shape[0]

    def gains(self, robot: Optional[torch.Tensor], rows: int) -> torch.Tensor:
        """(rows,) action gain of each row's robot (1 without robots)."""
        if robot is None:
            return torch.ones(rows)
        return 1.0 + 0.5 * robot.float() / self.config.num_robots

    def future(self, image: torch.Tensor, mode: torch.Tensor) -> torch.Tensor:
        """(N, 1, C, H, W) image, (N,) mode -> (N, latent_frames - 1, C, H, W) future frames (step 5)."""
        frames = []
        forward = (mode % 2 == 0).view(-1, 1, 1, 1)
        level = torch.tensor(self.LEVELS)[mode].view(-1, 1, 1, 1)
        for j in range(1, self.config.latent_frames):
            moved = torch.where(forward, image[:, 0].roll(j, dims=-1), image[:, 0].roll(-j, dims=-1))
            frames.append(self.FRAME_DECAY ** j * moved + level)
        return torch.stack(frames, dim=1)

    def draw(self, num_samples: int, generator: torch.Generator):
        """(tensors, labels): ``num_samples`` samples of the story, all randomness from ``generator``.
        labels: instruction, scene, mode (LongTensors (N,)), robot (or None)."""
        c, n = self.config, num_samples
        instruction = torch.randint(self.num_instructions, (n,), generator=generator)
        scene = torch.randint(2, (n,), generator=generator)
        mode = 2 * scene + torch.randint(2, (n,), generator=generator)
        robot = torch.randint(c.num_robots, (n,), generator=generator) if c.num_robots else None
        sign = (2 * scene - 1).float().view(-1, 1, 1, 1, 1)
        image = sign * self.pattern + self.IMAGE_NOISE * torch.randn(
            (n, 1, c.latent_channels, c.latent_height, c.latent_width), generator=generator)
        gain = self.gains(robot, n).view(-1, 1, 1)
        actions = gain * self.centres[instruction, mode][:, None, :] + self.MODE_STD * torch.randn(
            (n, c.action_len, c.action_dim), generator=generator)
        tensors = {"text": self.texts[instruction], "image": image, "future": self.future(image, mode),
                   "actions": actions}
        if c.history_frames:
            came_forward = (torch.randint(2, (n,), generator=generator) == 1).view(-1, 1, 1, 1)  # d' = +1
            tensors["history"] = torch.stack(  # oldest (age history_frames) first
                [torch.where(came_forward, image[:, 0].roll(-age, dims=-1), image[:, 0].roll(age, dims=-1))
                 for age in range(c.history_frames, 0, -1)], dim=1)
        if robot is not None:
            tensors["robot_id"] = robot
        return tensors, {"instruction": instruction, "scene": scene, "mode": mode, "robot": robot}

    def samples(self, num_samples: int, start: int = 0):
        """Samples start .. start + num_samples - 1 of the task's fixed sequence (what
        ``make_synthetic_dataset`` writes): block b of BLOCK samples comes from its own generator,
        seeded ``row_seed(seed, b)``. Returns (tensors, labels) like ``draw``."""
        parts = []
        first, last = start // self.BLOCK, (start + num_samples - 1) // self.BLOCK
        for block in range(first, last + 1):
            tensors, labels = self.draw(self.BLOCK, torch.Generator().manual_seed(row_seed(self.seed, block)))
            lo = max(start - block * self.BLOCK, 0)
            hi = min(start + num_samples - block * self.BLOCK, self.BLOCK)
            parts.append(({k: v[lo:hi] for k, v in tensors.items()},
                          {k: None if v is None else v[lo:hi] for k, v in labels.items()}))
        tensors = {k: torch.cat([p[0][k] for p in parts]) for k in parts[0][0]}
        labels = {k: None if parts[0][1][k] is None else torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}
        return tensors, labels

    def classify(self, text: torch.Tensor, image: torch.Tensor, actions: torch.Tensor,
                 robot_id: Optional[torch.Tensor] = None):
        """Which allowed mode each action chunk is in, e.g. for samples of a model.

        Returns (instruction, scene, mode, distance): the instruction whose embedding is nearest
        the text, the scene from the image's sign against the pattern, the nearer of the scene's
        two modes to the chunk, and each chunk's largest coordinate distance (L-infinity over rows
        and action dims, in action units) to that mode's centre: a chunk is in its mode when the
        distance is below ``IN_MODE`` (5 in-mode stds; modes are >= 1 apart in that norm)."""
        text, image, actions = text.float(), image.float(), actions.float()
        instruction = torch.cdist(text.flatten(1), self.texts.flatten(1)).argmin(dim=1)
        scene = ((image[:, 0] * self.pattern).flatten(1).sum(dim=1) > 0).long()
        gain = self.gains(robot_id, len(text)).view(-1, 1, 1)
        allowed = gain * self.centres[instruction][torch.arange(len(text))[:, None], 2 * scene[:, None] + torch.arange(2)]
        chunk_mean = actions.mean(dim=1, keepdim=True)  # (N, 1, A)
        pick = (chunk_mean - allowed).norm(dim=-1).argmin(dim=1)  # (N,)
        mode = 2 * scene + pick
        centre = allowed[torch.arange(len(text)), pick]  # (N, A)
        distance = (actions - centre[:, None]).abs().flatten(1).amax(dim=1)
        return instruction, scene, mode, distance


def _mode_centres(num_instructions: int, action_dim: int, generator: torch.Generator) -> torch.Tensor:
    """(num_instructions, 4, action_dim): per instruction 4 distinct corners of [-1, 1]^A (A >= 2),
    or a permutation of the levels -1.5, -0.5, 0.5, 1.5 (A = 1)."""
    out = []
    for _ in range(num_instructions):
        if action_dim == 1:
            out.append(torch.tensor([-1.5, -0.5, 0.5, 1.5])[torch.randperm(4, generator=generator)][:, None])
            continue
        corners: List[Tuple[float, ...]] = []
        while len(corners) < 4:
            corner = tuple((torch.randint(2, (action_dim,), generator=generator) * 2 - 1).float().tolist())
            if corner not in corners:
                corners.append(corner)
        out.append(torch.tensor(corners))
    return torch.stack(out)


def synthetic_task(config, seed: int = 0, num_instructions: int = 4) -> SyntheticTask:
    """The task (constants of the generative story, ``SyntheticTask``) for ``config`` and ``seed``."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    if isinstance(num_instructions, bool) or not isinstance(num_instructions, numbers.Integral) or num_instructions < 1:
        raise ValueError(f"num_instructions must be a positive int, got {num_instructions!r}")
    g = torch.Generator().manual_seed(int(seed))
    texts = torch.randn((num_instructions, config.text_len, config.text_dim), generator=g)
    pattern = torch.randn((config.latent_channels, config.latent_height, config.latent_width), generator=g)
    centres = _mode_centres(num_instructions, config.action_dim, g)
    return SyntheticTask(config=config, seed=int(seed), texts=texts, pattern=pattern, centres=centres)


def make_synthetic_dataset(directory: PathLike, config, num_samples: int, seed: int = 0, *,
                           num_instructions: int = 4, shard_size: int = DEFAULT_SHARD_SIZE,
                           overwrite: bool = False) -> Path:
    """Write ``num_samples`` samples of ``synthetic_task(config, seed)`` (story in ``SyntheticTask``).

    A tiny WAM learns it in minutes on CPU; its actions are bimodal given text and image, so an
    undistilled teacher sampled in 1 step (mode averaging) is clearly worse than in many steps.
    History frames (config.history_frames > 0) and robot ids (config.num_robots > 0) are included.
    The same (config, seed, num_samples) gives the same tensors whatever the shard size.
    The index metadata records {"synthetic": {"seed", "num_instructions", "config"}}.
    """
    from wam_fast.configs import WAMConfig

    if not isinstance(config, WAMConfig):
        raise TypeError(f"config must be a WAMConfig, got {type(config).__name__}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    task = synthetic_task(config, seed, num_instructions)
    metadata = {"synthetic": {"seed": int(seed), "num_instructions": int(num_instructions),
                              "config": config.to_dict()}}
    with DatasetWriter(directory, shard_size, overwrite=overwrite) as writer:
        for start in range(0, num_samples, task.BLOCK):
            tensors, _ = task.samples(min(task.BLOCK, num_samples - start), start)
            writer.add(tensors)
        return writer.close(metadata)


# ---- teacher rollout -------------------------------------------------------------------------------
# Samplers whose only randomness is the initial noise: a batch of rows gives each row what sampling it
# alone would. The others (dpm++2m-sde, consistency with > 1 step) draw noise for the whole batch
# during sampling, so rows are sampled one at a time to keep each row's draws its own.
DETERMINISTIC_SAMPLERS = ("ddim", "dpm++2m", "euler")


def _deterministic(sampler, steps) -> bool:
    return sampler in DETERMINISTIC_SAMPLERS or (sampler == "consistency" and steps == 1)


def _default_options(config) -> Tuple[str, int, float]:
    import wam_fast.sampling as sampling

    if hasattr(sampling, "default_options"):
        return tuple(sampling.default_options(config))
    return ("ddim" if config.objective == "v_prediction" else "euler"), 10, 6.0


def _row_noise(config, index: int, seed: int):
    """Row ``index``'s initial noise: what ``sample(seed=row_seed(seed, index))`` draws for one row."""
    g = torch.Generator("cpu").manual_seed(row_seed(seed, index))
    video = torch.randn((1, config.noisy_frames, config.latent_channels, config.latent_height, config.latent_width),
                        generator=g)
    return video, torch.randn((1, config.action_len, config.action_dim), generator=g)


def teacher_rollout(teacher, conditions, directory: PathLike, *, sampler: Optional[str] = None,
                    steps: Optional[int] = None, cfg_scale: Optional[float] = None, seed: int = 0,
                    batch_size: int = 64, shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False) -> Path:
    """Data-free targets: sample future latents and actions from ``teacher`` for every row of ``conditions``.

    teacher     a WAMTransformer (any dtype / device); it is only run, never changed
    conditions  a LatentDataset (or its directory) with text and image (+ history, robot_id);
                its targets, if any, are ignored
    directory   where the complete dataset is written (text, image, history, robot_id copied as
                stored; future and actions float32 from the teacher)
    sampler, steps, cfg_scale   None: the teacher's defaults (``wam_fast.sampling.default_options``)

    Row i's targets are exactly what ``wam_fast.sample(teacher, text[i:i+1], image[i:i+1], ...,
    seed=row_seed(seed, i), return_video=True)`` returns (up to float rounding of batched matmuls),
    so the dataset does not depend on ``batch_size``: deterministic samplers run ``batch_size`` rows
    per call with each row's initial noise drawn from its own generator (``noise=``); stochastic
    ones run one row per call. A full-mask teacher returns all latent frames: frame 0 (the
    observation) is dropped and frames 1.. are the future; a temporal teacher's frames are already
    the future. The teacher gets the last min(h, its history_frames) history frames (none for a
    full-mask teacher) and robot_id when it has a robot embedding; the dataset keeps all of them for
    the student. Written like ``write_dataset`` (refuses an existing dataset unless ``overwrite``);
    an error or interrupt leaves no new dataset at ``directory``. The index metadata records
    {"teacher_rollout": {sampler, steps, cfg_scale, seed, teacher config, conditions directory}}.
    """
    import wam_fast.sampling as sampling

    if not (callable(teacher) and hasattr(teacher, "config") and hasattr(teacher, "parameters")):
        raise TypeError(f"teacher must be a WAMTransformer, got {type(teacher).__name__}")
    if isinstance(conditions, (str, os.PathLike)):
        conditions = LatentDataset(conditions)
    if not isinstance(conditions, LatentDataset):
        raise TypeError(f"conditions must be a LatentDataset or its directory, got {type(conditions).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    _check_shard_size(shard_size)
    config = teacher.config
    param = next(iter(teacher.parameters()), None)
    if param is None:
        raise ValueError("teacher has no parameters, so its dtype and device are unknown")
    dtype, device = param.dtype, param.device

    defaults = _default_options(config)
    sampler, steps, cfg_scale = (d if v is None else v for v, d in zip((sampler, steps, cfg_scale), defaults))
    # history and robot_id are the student's business too: the teacher takes what it can (docstring)
    problems = conditions.mismatches(config, ("text", "image") + (("robot_id",) if config.num_robots else ()))
    if problems:
        raise ValueError(f"the conditions at {conditions.directory} do not fit the teacher {config.name!r}:\n  - "
                         + "\n  - ".join(problems))
    teacher_history = config.history_frames if config.mask == "temporal" else 0
    use_noise = _deterministic(sampler, steps) and "noise" in inspect.signature(sampling.sample).parameters
    if not use_noise:
        from wam_fast.ops._registry import _note_fallback

        _note_fallback("distill.teacher_rollout", "per-row sampling", [
            f"sampler {sampler!r} with {steps} steps draws noise for the whole batch during sampling"
            if not _deterministic(sampler, steps) else "wam_fast.sample has no noise= argument"])
    step = batch_size if use_noise else 1

    def run(rows: Dict[str, torch.Tensor], start: int):
        n = rows["text"].shape[0]
        kwargs = {}
        if "history" in rows and teacher_history:
            kwargs["history"] = rows["history"][:, -teacher_history:].to(device, dtype)
        if "robot_id" in rows and config.num_robots:
            kwargs["robot_id"] = rows["robot_id"].to(device)
        if use_noise:
            noises = [_row_noise(config, start + i, seed) for i in range(n)]
            kwargs["noise"] = (torch.cat([v for v, _ in noises]), torch.cat([a for _, a in noises]))
        chunk = sampling.sample(teacher, rows["text"].to(device, dtype), rows["image"].to(device, dtype),
                                sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=row_seed(seed, start),
                                return_video=True, **kwargs)
        video = chunk.video.float().cpu()
        future = video[:, 1:] if config.mask == "full" else video
        return future, chunk.actions.float().cpu()

    keep = [name for name in ("text", "image", "history", "robot_id") if name in conditions.fields]
    metadata = {"teacher_rollout": {"sampler": sampler, "steps": int(steps), "cfg_scale": float(cfg_scale),
                                    "seed": int(seed), "teacher": config.to_dict(),
                                    "conditions": str(conditions.directory)}}
    with DatasetWriter(directory, shard_size, overwrite=overwrite) as writer:
        for start in range(0, len(conditions), step):
            stop = min(start + step, len(conditions))
            rows = conditions.get(torch.arange(start, stop))
            rows = {name: rows[name] for name in keep}
            rows["future"], rows["actions"] = run(rows, start)
            writer.add(rows)
        return writer.close(metadata)
