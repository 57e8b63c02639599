"""The bytes on the wire: msgpack with numpy arrays, in the format openpi's ``msgpack_numpy`` uses, so an
unmodified ``openpi_client.websocket_client_policy.WebsocketClientPolicy`` talks to this server.

An array travels as a map {b"__ndarray__": True, b"data": raw bytes, b"dtype": numpy dtype string, b"shape":
[...]}, a numpy scalar as {b"__npgeneric__": True, b"data": value, b"dtype": ...}. Only plain numeric and bool
dtypes are accepted (never object, void or complex arrays: nothing here can run code, and there is no pickle).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from wam_fast.utils.optional import missing_reason

# dtype kinds an array may have on the wire: bool, signed / unsigned int, float
ARRAY_KINDS = "biuf"
MAX_DIMS = 8


class WireError(ValueError):
    """A message that is not a msgpack observation this server can read."""


def _msgpack():
    reason = missing_reason("msgpack")
    if reason is not None:
        raise ImportError(reason)
    import msgpack

    return msgpack


def _pack_default(obj: Any):
    if isinstance(obj, (np.ndarray, np.generic)):
        if obj.dtype.kind not in ARRAY_KINDS:
            raise TypeError(f"cannot send a numpy {obj.dtype} value (only bool, int and float arrays travel)")
        if isinstance(obj, np.generic):
            return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
        obj = np.ascontiguousarray(obj)
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": list(obj.shape)}
    raise TypeError(f"cannot send a {type(obj).__name__} (msgpack types and numpy arrays only)")


def _dtype(text) -> np.dtype:
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    if not isinstance(text, str):
        raise WireError(f"an array's dtype must be a numpy dtype string, got {type(text).__name__}")
    try:
        dtype = np.dtype(text)
    except TypeError as exc:
        raise WireError(f"unknown array dtype {text!r}") from exc
    if dtype.kind not in ARRAY_KINDS or dtype.fields is not None:
        raise WireError(f"array dtype {text!r} is not accepted (only bool, int and float arrays)")
    return dtype


def _unpack_hook(obj: dict):
    if b"__ndarray__" in obj:
        dtype = _dtype(obj.get(b"dtype"))
        shape, data = obj.get(b"shape"), obj.get(b"data")
        if (not isinstance(shape, (list, tuple)) or len(shape) > MAX_DIMS
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise WireError(f"an array's shape must be a list of at most {MAX_DIMS} non-negative ints, got {shape!r}")
        if not isinstance(data, bytes) or len(data) != math.prod(shape) * dtype.itemsize:
            raise WireError(f"array data of {len(data) if isinstance(data, bytes) else type(data).__name__} bytes "
                            f"does not match shape {list(shape)} of {dtype}")
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()  # writable, owns its memory
    if b"__npgeneric__" in obj:
        dtype = _dtype(obj.get(b"dtype"))
        try:
            return dtype.type(obj.get(b"data"))
        except (TypeError, ValueError, OverflowError) as exc:
            raise WireError(f"bad numpy scalar of dtype {dtype}: {exc}") from exc
    return obj


def packb(obj: Any) -> bytes:
    """``obj`` (dicts, lists, str, numbers, numpy arrays) as msgpack bytes."""
    return _msgpack().packb(obj, default=_pack_default, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    """msgpack bytes -> Python objects with numpy arrays; WireError when ``data`` is not such a message."""
    msgpack = _msgpack()
    try:
        return msgpack.unpackb(data, object_hook=_unpack_hook, raw=False, strict_map_key=False)
    except WireError:
        raise
    except Exception as exc:  # msgpack's own errors (garbage, truncation, extra bytes) and bad strings
        raise WireError(f"not a msgpack message ({type(exc).__name__}: {exc})") from exc
