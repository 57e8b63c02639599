"""A GPU telemetry snapshot from NVML (nvidia-ml-py): clocks, power, memory, temperature; without a GPU
or NVML, the one-line reason it was skipped. The bench stores one per row (read right after the row's
timed calls: the clocks and temperature it ran at) and one per run; the benchmark suite one per benchmark."""
from __future__ import annotations

import torch

from wam_fast.utils import nvml

TELEMETRY = ("name", "sm_clock_mhz", "sm_clock_max_mhz", "mem_clock_mhz", "power_w", "power_limit_w",
             "memory_used_bytes", "memory_total_bytes", "temperature_c")


def gpu_telemetry(device=None) -> dict:
    """A snapshot of the GPU from NVML (nvidia-ml-py): name, SM and memory clocks (MHz), power (W) and
    its limit, memory used (bytes), temperature (C). Without a GPU or NVML: {"skipped": why}."""
    if not torch.cuda.is_available():
        return {"skipped": f"no CUDA device (torch {torch.__version__}"
                           f"{', a CPU build' if not torch.version.cuda else ''}): GPU telemetry not taken"}
    if device is not None and torch.device(device).type != "cuda":
        return {"skipped": f"the run is on {device}, not a GPU: GPU telemetry not taken"}
    try:
        return nvml.query(TELEMETRY, device)
    except nvml.NvmlUnavailable as exc:
        return {"skipped": f"{exc}: GPU telemetry not taken"}
