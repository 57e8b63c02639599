"""A GPU telemetry snapshot from NVML (nvidia-ml-py): clocks, power, memory, temperature; without a GPU
or NVML, the one-line reason it was skipped. The bench's JSON and the benchmark suite store it."""
from __future__ import annotations

import torch


def gpu_telemetry(device=None) -> dict:
    """A snapshot of the GPU from NVML (nvidia-ml-py): name, SM and memory clocks (MHz), power (W) and
    its limit, memory used (bytes), temperature (C). Without a GPU or NVML: {"skipped": why}."""
    if not torch.cuda.is_available():
        return {"skipped": f"no CUDA device (torch {torch.__version__}"
                           f"{', a CPU build' if not torch.version.cuda else ''}): GPU telemetry not taken"}
    try:
        import pynvml
    except ImportError:
        return {"skipped": "nvidia-ml-py is not installed (pip install nvidia-ml-py): GPU telemetry not taken"}
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVML raises its own error types
        return {"skipped": f"NVML did not initialise ({type(exc).__name__}: {exc}): GPU telemetry not taken"}
    try:
        index = torch.device(device).index if device is not None and torch.device(device).index is not None \
            else torch.cuda.current_device()
        try:  # match by UUID: CUDA_VISIBLE_DEVICES may renumber devices between torch and NVML
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else "GPU-" + uuid)
        except Exception:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
        out = {"name": name.decode() if isinstance(name, bytes) else name}
        readings = {
            "sm_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "sm_clock_max_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "power_w": lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            "power_limit_w": lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0,
            "memory_used_bytes": lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used),
            "memory_total_bytes": lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
            "temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
        }
        for key, read in readings.items():
            try:
                out[key] = read()
            except Exception:  # e.g. power readings are not supported on some boards / MIG slices
                out[key] = None
        return out
    except Exception as exc:
        return {"skipped": f"NVML query failed ({type(exc).__name__}: {exc}): GPU telemetry not taken"}
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
