"""The latent dataset format's constants and small shared helpers (version 1).

The format itself (files, fields, shapes, dtypes, the safety rules) is described in
``wam_fast.distill.data``; ``dataset_reader`` reads it and ``data`` writes it.
"""
from __future__ import annotations

import hashlib
import numbers
import os
from dataclasses import dataclass
from typing import Dict, Mapping, Tuple, Union

import torch

FORMAT = "wam_fast.latents"
VERSION = 1
INDEX_NAME = "dataset.json"
DEFAULT_SHARD_SIZE = 1024

# field -> (dims per sample, what it is); the order is the order of the format table in wam_fast.distill.data.
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
DTYPE_NAMES = {dtype: name for name, dtype in {**FLOAT_DTYPES, **INT_DTYPES}.items()}
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64}

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class Field:
    """One tensor of every sample: its per-sample shape and dtype."""

    shape: Tuple[int, ...]
    dtype: torch.dtype


def check_shard_size(shard_size) -> int:
    if isinstance(shard_size, bool) or not isinstance(shard_size, numbers.Integral) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    return int(shard_size)


def file_sha256(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def is_plain_name(name) -> bool:
    """A bare file name (no directory part): the only shard names an index may hold."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def describe_fields(fields: Mapping[str, Field]) -> str:
    return "{" + ", ".join(f"{name}: {tuple(f.shape)} {DTYPE_NAMES.get(f.dtype, f.dtype)}"
                           for name, f in fields.items()) + "}"
