import os

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors in the interpreter. Triton reads this when a kernel
# is defined, so it is set before any test imports wam_fast.kernels (CI sets it too).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    # every test starts from the same RNG state, so a failure reproduces
    torch.manual_seed(0)
    yield
