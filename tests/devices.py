"""The devices the tests run on, chosen in one place (tests/test_gpu_harness.py checks these choices on a
faked CUDA machine).

On a GPU machine TRITON_INTERPRET is not set (conftest.py sets it only without a GPU), so a test that
forces the Triton backend must give it CUDA tensors; without a GPU the interpreter runs the kernels on
CPU tensors. Tests that compare runs bit for bit, or run several ranks on one machine, choose the CPU
explicitly instead of the library's default device (cuda:LOCAL_RANK on a GPU machine).
"""
import os

import torch


def kernel_device() -> torch.device:
    """Where the Triton backend can run in the tests: the GPU, or the CPU under the Triton interpreter."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def cpu_only_env(env=None) -> dict:
    """A copy of ``env`` (default ``os.environ``) for a subprocess that must see no GPU (CUDA_VISIBLE_DEVICES
    empty): e.g. 2 torchrun ranks on gloo, which on a 1-GPU machine would otherwise ask for cuda:1."""
    return dict(os.environ if env is None else env, CUDA_VISIBLE_DEVICES="")
