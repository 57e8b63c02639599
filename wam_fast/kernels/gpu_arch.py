"""The GPU the launchers choose tile configs for: compute capability, SM count, shared memory per block.

Read once per device from ``torch.cuda.get_device_properties``. ``target_arch(SM89)`` overrides it for
the code inside the ``with`` block, so a CPU-only machine can ask "what would dispatch launch on an
RTX 4090?" (benchmarks/aot_check.py compiles exactly that ahead of time).

Wave quantization: a GEMM of T output tiles on S SMs (one tile per SM at a time, as the big tiles'
shared memory allows) runs ceil(T / S) waves; ``wave_efficiency`` = T / (ceil(T / S) * S) is the busy
fraction. 84 tiles on 132 SMs is 0.64 (52 SMs idle for the whole GEMM); 336 tiles is 0.85.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Dict, NamedTuple, Optional, Sequence

import torch


class GpuArch(NamedTuple):
    name: str            # the ptxas target, e.g. "sm_90a"
    capability: int      # major * 10 + minor: 89, 90
    num_sms: int
    smem_per_block: int  # bytes a block may opt in to (the limit a Triton kernel's shared memory must fit)

    @property
    def family(self) -> str:
        """The config table to use: "sm90" (wgmma, 227 KiB of shared memory) or "sm89" (mma.sync,
        99 KiB: sm_89, and any other GPU without Hopper's shared memory, e.g. sm_120)."""
        return "sm90" if self.capability >= 90 and self.smem_per_block >= SM90.smem_per_block else "sm89"


SM89 = GpuArch("sm_89", 89, 128, 101_376)   # RTX 4090: 128 SMs, 99 KiB per block
SM90 = GpuArch("sm_90a", 90, 132, 232_448)  # H100 / H200 SXM: 132 SMs, 227 KiB per block
# Per-block opt-in shared memory by capability, for a torch without shared_memory_per_block_optin.
_SMEM_BY_CAPABILITY = {80: 166_912, 86: 101_376, 87: 166_912, 89: 101_376, 90: 232_448, 100: 232_448,
                       120: 101_376}

_override: contextvars.ContextVar[Optional[GpuArch]] = contextvars.ContextVar("wam_fast_gpu_arch", default=None)
_by_device: Dict[int, GpuArch] = {}


@contextlib.contextmanager
def target_arch(arch: GpuArch):
    """Launchers inside the block choose configs for ``arch`` instead of the running GPU."""
    if not isinstance(arch, GpuArch):
        raise TypeError(f"target_arch: expected a GpuArch (e.g. SM89, SM90), got {type(arch).__name__}")
    token = _override.set(arch)
    try:
        yield arch
    finally:
        _override.reset(token)


def overridden() -> Optional[GpuArch]:
    """The arch of the innermost active ``target_arch`` block, or None."""
    return _override.get()


def current_arch(device: Optional[torch.device] = None) -> GpuArch:
    """The ``target_arch`` override if one is active, else the properties of ``device`` (a CUDA device;
    None = the current one), cached per device."""
    arch = _override.get()
    if arch is not None:
        return arch
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"GPU configs need a cuda device, got {device}: run on a GPU, set TRITON_INTERPRET=1, "
                         "or choose an arch with wam_fast.kernels.gpu_arch.target_arch(SM89 / SM90)")
    if not torch.cuda.is_available():
        raise RuntimeError("GPU configs need a CUDA device and torch.cuda.is_available() is False: "
                           "set TRITON_INTERPRET=1 or use wam_fast.kernels.gpu_arch.target_arch(...)")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _by_device:
        props = torch.cuda.get_device_properties(index)
        capability = props.major * 10 + props.minor
        smem = getattr(props, "shared_memory_per_block_optin", 0) or _SMEM_BY_CAPABILITY.get(capability, 101_376)
        suffix = "a" if capability == 90 else ""  # wgmma needs the arch-specific sm_90a target
        _by_device[index] = GpuArch(f"sm_{capability}{suffix}", capability, props.multi_processor_count, smem)
    return _by_device[index]


def wave_efficiency(tiles: int, num_sms: int) -> float:
    """Busy fraction of the SMs over ceil(tiles / num_sms) waves of one tile per SM."""
    return tiles / (math.ceil(tiles / num_sms) * num_sms)


# A tile shape is taken when its waves keep at least this fraction of the SMs busy (0.8 admits 128x64
# tiles at M=774, N=3072: 336 tiles on 132 SMs = 0.85; 128x128 at M=1548, N=3072 is 0.79 and is not).
MIN_WAVE_EFFICIENCY = 0.8


def pick_by_waves(M: int, N: int, candidates: Sequence, num_sms: int):
    """The first (largest) candidate tile (with .block_m/.block_n) whose M x N grid reaches
    MIN_WAVE_EFFICIENCY on num_sms SMs; if none does, the one with the best efficiency (earliest on ties)."""
    if not candidates:
        raise ValueError("pick_by_waves: expected at least one candidate config, got none")

    def efficiency(c) -> float:
        return wave_efficiency(math.ceil(M / c.block_m) * math.ceil(N / c.block_n), num_sms)

    for c in candidates:
        if efficiency(c) >= MIN_WAVE_EFFICIENCY:
            return c
    return max(candidates, key=efficiency)  # max keeps the first of equal efficiencies


def gemm_smem_bytes(block_m: int, block_n: int, block_k: int, num_stages: int, itemsize: int, arch: GpuArch) -> int:
    """Triton's shared memory for a pipelined GEMM's operand buffers (measured with Triton 3.9 AOT
    compiles, see benchmarks/aot_check.py): sm_90 (wgmma) keeps num_stages buffers of the A and B
    tiles, sm_89 (cp.async + mma.sync) num_stages - 1. Epilogue scratch reuses the buffers."""
    buffers = num_stages if arch.family == "sm90" else max(1, num_stages - 1)
    return buffers * (block_m + block_n) * block_k * itemsize
