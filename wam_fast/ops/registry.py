"""Backend choice for the fused ops: CUDA extension where built, then Triton, then torch.

Each op (``wam_fast/ops/<name>.py``) registers its backends in priority order. A backend is
*unavailable* on this machine for a reason (the extension is not built, no GPU and no
TRITON_INTERPRET, ...) or *rejects* a call for reasons (dtype, head_dim, device); both are data,
so ``python -m wam_fast.info`` prints them and a rejection lists every reason (as xformers'
``not_supported_reasons``). The first backend that is available and accepts the call runs it.
Skipping a faster backend is logged once per (op, backend, reasons) and kept in ``fallbacks()``.

``use_backend("triton")`` forces one backend in a scope (tests, benchmarks); if it cannot take
the call, that is an error with its reasons, never a silent fallback.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from wam_fast.utils import optional

logger = logging.getLogger("wam_fast.ops")

BACKEND_NAMES = ("cuda", "triton", "torch")
_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("wam_fast_ops_backend", default=None)
_FALLBACKS: Dict[Tuple[str, str, Tuple[str, ...]], int] = {}
_USED: Dict[Tuple[str, str], int] = {}  # (op, backend) -> calls it ran


# ---- machine-level availability (None = usable, else why not) -----------------------------------
@functools.lru_cache(maxsize=None)
def cuda_extension_reason() -> Optional[str]:
    """Why the CUDA extension wam_fast._C cannot be used, or None."""
    import torch

    if importlib.util.find_spec("wam_fast._C") is None:
        if not torch.version.cuda:
            return f"extension not built: torch {torch.__version__} is a CPU build"
        return "extension not built (on a GPU machine: pip install --no-build-isolation -e .)"
    try:
        cuda_extension()
    except Exception as exc:  # a stale build: say what failed
        return f"extension wam_fast._C fails to import: {type(exc).__name__}: {exc}"
    return None


def cuda_extension():
    """The compiled extension wam_fast._C (csrc/); use it where cuda_extension_reason() is None."""
    import wam_fast._C as extension  # built only on CUDA machines: imported on first use

    return extension


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_reason() -> Optional[str]:
    if not optional.installed("triton"):
        return "triton is not installed (pip install triton; Linux x86-64)"
    return None


def triton_reason() -> Optional[str]:
    """Why Triton kernels cannot run on this machine at all, or None."""
    import torch

    reason = _triton_import_reason()
    if reason is None and not torch.cuda.is_available() and not triton_interpreting():
        reason = "no GPU and TRITON_INTERPRET is not set (set TRITON_INTERPRET=1 to run kernels on CPU, slowly)"
    return reason


def device_reasons(backend: str, *tensors) -> List[str]:
    """Reasons the tensors' devices rule a backend out: CUDA needs cuda tensors; Triton needs cuda
    tensors, or cpu tensors under TRITON_INTERPRET=1."""
    devices = {t.device.type for t in tensors if t is not None}
    if backend == "cuda" and devices != {"cuda"}:
        return [f"needs CUDA tensors, got {sorted(devices)}"]
    if backend == "triton":
        allowed = {"cuda", "cpu"} if triton_interpreting() else {"cuda"}
        if not devices <= allowed:
            return [f"needs CUDA tensors{' (or cpu under TRITON_INTERPRET=1)' if not triton_interpreting() else ''}, "
                    f"got {sorted(devices)}"]
    return []


def kernel_module(name: str):
    """The Triton launcher module wam_fast/kernels/<name>.py, imported on first use (it imports triton)."""
    return importlib.import_module(f"wam_fast.kernels.{name}")


_MACHINE_REASON = {"cuda": cuda_extension_reason, "triton": triton_reason, "torch": lambda: None}


# ---- per-op registry ---------------------------------------------------------------------------
@dataclass
class Backend:
    name: str                                 # "cuda" | "triton" | "torch"
    run: Callable                             # same arguments as the op
    rejects: Callable[..., List[str]]         # reasons it cannot take these arguments ([] = it can)
    supports: str = ""                        # one line for the info table: dtypes, shapes


@dataclass
class OpBackends:
    op: str
    backends: List[Backend] = field(default_factory=list)

    def register(self, name: str, run: Callable, rejects: Optional[Callable[..., List[str]]] = None,
                 supports: str = "") -> None:
        if name not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
        self.backends.append(Backend(name, run, rejects or (lambda *a, **k: []), supports))
        self.backends.sort(key=lambda b: BACKEND_NAMES.index(b.name))

    def reasons(self, backend: Backend, *args, **kwargs) -> List[str]:
        machine = _MACHINE_REASON[backend.name]()
        if machine is not None:
            return [machine]
        return list(backend.rejects(*args, **kwargs))

    def select(self, *args, **kwargs) -> Backend:
        forced = _forced.get()
        skipped = []
        for backend in self.backends:
            if forced is not None and backend.name != forced:
                continue
            why = self.reasons(backend, *args, **kwargs)
            if not why:
                if skipped:
                    note_fallback(self.op, backend.name, skipped)
                _USED[(self.op, backend.name)] = _USED.get((self.op, backend.name), 0) + 1
                return backend
            if forced is not None:
                raise RuntimeError(f"wam_fast.ops.{self.op}: backend {forced!r} was forced but cannot run "
                                   f"this call: {'; '.join(why)}")
            skipped.append(f"{backend.name}: {'; '.join(why)}")
        if forced is not None:
            raise RuntimeError(f"wam_fast.ops.{self.op}: no backend named {forced!r} "
                               f"(has {[b.name for b in self.backends]})")
        raise RuntimeError(f"wam_fast.ops.{self.op}: no backend can run this call: {' | '.join(skipped)}")

    def __call__(self, *args, **kwargs):
        return self.select(*args, **kwargs).run(*args, **kwargs)

    def table(self) -> List[dict]:
        """One row per backend: usable here or why not (machine level), and what it supports."""
        rows = []
        for backend in self.backends:
            machine = _MACHINE_REASON[backend.name]()
            rows.append({"op": self.op, "backend": backend.name,
                         "status": "available" if machine is None else "unavailable",
                         "detail": machine if machine is not None else backend.supports})
        return rows


_UNTRACED_NOTE: Optional[Callable] = None


def note_fallback(op: str, backend: str, skipped: List[str]) -> None:
    """Log a fallback once per (op, backend, reasons) and count it (``fallbacks()``). Under torch.compile
    the bookkeeping runs outside the graph: traced, the count would be a dynamo guard and every compiled
    call would recompile. (torch.compiler.disable is applied on first use: it imports dynamo and triton.)"""
    global _UNTRACED_NOTE
    if _UNTRACED_NOTE is None:
        _UNTRACED_NOTE = torch.compiler.disable(_note_fallback)
    _UNTRACED_NOTE(op, backend, skipped)


def _note_fallback(op: str, backend: str, skipped: List[str]) -> None:
    key = (op, backend, tuple(skipped))
    if key not in _FALLBACKS:
        logger.warning("wam_fast.ops.%s: running the %s backend (%s)", op, backend, " | ".join(skipped))
    _FALLBACKS[key] = _FALLBACKS.get(key, 0) + 1


def fallbacks() -> List[dict]:
    """Fallbacks taken in this process: op, backend used, reasons the faster ones were skipped, count."""
    return [{"op": op, "backend": backend, "skipped": list(skipped), "count": count}
            for (op, backend, skipped), count in _FALLBACKS.items()]


def backends_used() -> Dict[str, Dict[str, int]]:
    """Which backend each op actually ran in this process: {op: {backend: calls}} (calls replayed from a
    CUDA graph are not calls: the capture's choice stands for them)."""
    used: Dict[str, Dict[str, int]] = {}
    for (op, backend), count in sorted(_USED.items()):
        used.setdefault(op, {})[backend] = count
    return used


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Force every op to one backend in this scope (None: the automatic choice)."""
    if name is not None and name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES} or None, got {name!r}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)
