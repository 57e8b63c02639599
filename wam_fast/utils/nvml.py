"""GPU driver, clocks, power and memory from NVML (nvidia-ml-py), matched to a torch device by UUID.

Each reading that a board does not support (power on some boards, MIG slices) comes back as None;
NVML missing or failing is an ``NvmlUnavailable`` with the reason."""
from __future__ import annotations

from typing import Sequence

READINGS = {
    "name": lambda nv, h: _text(nv.nvmlDeviceGetName(h)),
    "driver": lambda nv, h: _text(nv.nvmlSystemGetDriverVersion()),
    "sm_clock_mhz": lambda nv, h: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
    "sm_clock_max_mhz": lambda nv, h: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM),
    "mem_clock_mhz": lambda nv, h: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM),
    "power_w": lambda nv, h: nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
    "power_limit_w": lambda nv, h: nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0,
    "memory_used_bytes": lambda nv, h: int(nv.nvmlDeviceGetMemoryInfo(h).used),
    "memory_total_bytes": lambda nv, h: int(nv.nvmlDeviceGetMemoryInfo(h).total),
    "temperature_c": lambda nv, h: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU),
}


class NvmlUnavailable(RuntimeError):
    """NVML cannot be queried here; the message says why."""


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def query(keys: Sequence[str], device=None) -> dict:
    """The readings ``keys`` (names in READINGS) of a torch CUDA device (an index, "cuda:N" or a
    torch.device; None: the current one)."""
    import torch

    try:
        import pynvml
    except ImportError:
        raise NvmlUnavailable("nvidia-ml-py is not installed (pip install nvidia-ml-py)") from None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # no driver: NVML raises its own error types
        raise NvmlUnavailable(f"NVML did not initialise ({type(exc).__name__}: {exc})") from None
    try:
        device = torch.device("cuda", device) if isinstance(device, int) else device
        torch_index = torch.device(device).index if device is not None and torch.device(device).index is not None \
            else torch.cuda.current_device()
        try:  # match by UUID: CUDA_VISIBLE_DEVICES may renumber devices between torch and NVML
            uuid = str(torch.cuda.get_device_properties(torch_index).uuid)
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else "GPU-" + uuid)
        except Exception:
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch_index)
        out = {}
        for key in keys:
            try:
                out[key] = READINGS[key](pynvml, handle)
            except Exception:  # a reading this board does not support
                out[key] = None
        return out
    except Exception as exc:
        raise NvmlUnavailable(f"NVML query failed ({type(exc).__name__}: {exc})") from None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
