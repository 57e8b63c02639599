import glob
import hashlib
import os
import tempfile

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors in the interpreter. Triton reads this when a kernel
# is defined, so it is set before any test imports wam_fast.kernels (CI sets it too).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Inductor's on-disk cache keys a compiled graph on the graph, not on the fake (meta) kernels of the
# custom ops in it: a graph compiled before an op changed its output strides would be reused and fail.
# Tests get a cache of their own per version of the ops' sources (warm across runs of the same code).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OPS = sorted(glob.glob(os.path.join(_ROOT, "wam_fast", "ops", "*.py"))
              + glob.glob(os.path.join(_ROOT, "wam_fast", "kernels", "*.py")))
_DIGEST = hashlib.sha256(b"".join(open(p, "rb").read() for p in _OPS)).hexdigest()[:16]
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"wam_fast_inductor_{_DIGEST}"))


@pytest.fixture(autouse=True)
def _seed():
    # every test starts from the same RNG state, so a failure reproduces
    torch.manual_seed(0)
    yield
