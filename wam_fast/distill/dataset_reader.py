"""``LatentDataset``: reads a latent dataset (format in ``wam_fast.distill.data``) from memory-mapped shards."""
from __future__ import annotations

import collections
import json
import numbers
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from wam_fast.distill.dataset_format import (FIELDS, FLOAT_DTYPES, FORMAT, INDEX_NAME, INT_DTYPES, REQUIRED,
                                             SAFETENSORS_DTYPES, TARGETS, VERSION, Field, PathLike, describe_fields,
                                             file_sha256, is_plain_name)


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
            if (not isinstance(shard, dict) or not is_plain_name(shard.get("file"))
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
            shape, dtype = tuple(view.get_shape()), SAFETENSORS_DTYPES.get(view.get_dtype(), view.get_dtype())
            want = (shard["num_samples"],) + field.shape
            if shape != want or dtype != field.dtype:
                raise ValueError(f"shard {path}: tensor {name!r} has shape {shape} dtype {dtype}, the index "
                                 f"expects shape {want} dtype {field.dtype}")
        if verify and "sha256" in shard and file_sha256(path) != shard["sha256"]:
            raise ValueError(f"shard {path}: sha256 differs from the index: the file is corrupt")

    def check_finite(self) -> None:
        """Read every floating-point tensor of every shard once; ValueError naming the shard, the field and
        the first bad sample when any value is NaN or inf (it would otherwise surface only as a diverged
        training, on every resume alike)."""
        for k, shard in enumerate(self._shards):
            handle = self._open(k)
            for name, field in self.fields.items():
                if not field.dtype.is_floating_point:
                    continue
                values = handle.get_tensor(name)
                bad = ~torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=1)
                if bool(bad.any()):
                    first = int(bad.nonzero()[0, 0])
                    raise ValueError(f"shard {self.directory / shard['file']}: field {name!r} has NaN or inf values "
                                     f"in {int(bad.sum())} of {values.shape[0]} samples (first: sample {first} of "
                                     f"the shard, {int(self._offsets[k]) + first} of the dataset); fix or drop them")

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
                f"shards, fields {describe_fields(self.fields)})")

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
