"""The environment a number was measured in (device, clocks, versions, commit).

Every benchmark writes ``environment()`` beside its numbers, so a result can be traced to a machine
and a commit. Nothing here runs at import time: torch, CUDA and NVML are touched only when called.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from typing import Optional

from wam_fast import __version__
from wam_fast.utils import nvml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def package_version(name: str) -> Optional[str]:
    """Installed version of a distribution, without importing it (importing triton is slow)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit(path: str = REPO_ROOT, full: bool = False) -> Optional[str]:
    """Commit of the source checkout (12 hex digits, or all 40 with ``full``; "-dirty" for local edits),
    None outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", "-C", path, *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD") if full else git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None  # no git, not a checkout, or no commit yet
    return commit + ("-dirty" if dirty else "")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvml_info(torch_index: int) -> dict:
    """Driver and clocks from NVML; empty when NVML is not there."""
    try:
        return nvml.query(("driver", "sm_clock_mhz", "sm_clock_max_mhz", "mem_clock_mhz", "power_limit_w"),
                          torch_index)
    except nvml.NvmlUnavailable:
        return {}


def environment(device: Optional[str] = None) -> dict:
    """Device name, capability, driver, clocks, versions, commit and CPU count, as one flat dict.

    ``device`` is "cuda", "cuda:N" or "cpu"; by default the first GPU if there is one.
    """
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    env = {
        "device_type": dev.type,
        "device": None,
        "capability": None,
        "driver": None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "cuda": torch.version.cuda,
        "wam_fast": __version__,
        "commit": git_commit(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        env["device"] = torch.cuda.get_device_name(index)
        env["capability"] = f"{major}.{minor}"
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(index).total_memory
        env["cudnn"] = torch.backends.cudnn.version()
        env.update(_nvml_info(index))
    else:
        env["device"] = f"cpu: {env['cpu']}"
    return env


def versions(env: dict) -> dict:
    """The version fields of an ``environment()`` dict (what a result file calls "versions")."""
    keys = ("python", "torch", "triton", "cuda", "cudnn", "driver", "wam_fast", "commit")
    return {k: env.get(k) for k in keys}
