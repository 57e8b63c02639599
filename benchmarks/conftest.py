"""Benchmarks (`pytest benchmarks/ --benchmark-only`): the environment goes beside every number."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run interpreted on CPU (small shapes only)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_benchmark_update_machine_info(config, machine_info):
    from wam_fast.env import environment

    machine_info["wam_fast"] = environment("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
