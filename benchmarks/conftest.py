"""Benchmarks (`pytest benchmarks/ --benchmark-only`): the environment goes beside every number.

Every benchmark's extra_info gets ``gpu_telemetry``: a snapshot from NVML (nvidia-ml-py) taken right
after its timed rounds (name, SM and memory clocks, power, memory used, temperature; see
``wam_fast.bench.gpu_telemetry``), or, without a GPU, ``{"skipped": "<why>"}``.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run interpreted on CPU (small shapes only)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_benchmark_update_machine_info(config, machine_info):
    from wam_fast.utils.environment import environment

    machine_info["wam_fast"] = environment("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def gpu_telemetry(request):
    """After a benchmark's rounds, store the GPU's state in its extra_info (skipped cleanly without a GPU)."""
    if "benchmark" not in request.fixturenames:
        yield
        return
    benchmark = request.getfixturevalue("benchmark")  # set up before this fixture, so torn down after it
    yield
    from wam_fast.bench import gpu_telemetry as snapshot

    benchmark.extra_info["gpu_telemetry"] = snapshot("cuda" if torch.cuda.is_available() else None)
