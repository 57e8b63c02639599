"""gated_residual: the block's final residual ``residual + gate[set] * x`` in one kernel, against torch
eager (the tests' reference, reference.gated_residual: an index_select, a multiply and an add) and
torch.compile of it.

On a GPU: W1 shapes (1 x 1256 tokens x 3072, segments text | video | actions with sets (1, 0, 0),
bf16), the forced Triton backend too, and achieved GB/s against the measured copy bandwidth. On CPU:
tiny shapes in fp32, the wam_fast op running interpreted (a smoke run).

    python -m pytest benchmarks/bench_gated_residual.py --benchmark-only -q
"""
import importlib

import op_bench  # benchmarks/op_bench.py (pytest puts benchmarks/ on sys.path)
import pytest
import torch

from wam_fast.ops import reference as WF  # the tests' reference

op_module = importlib.import_module("wam_fast.ops.gated_residual")

IMPLS = ["wam_fast", "torch-eager", "torch-compile", "triton"]
MOD_INDEX = (1, 0, 0)  # text uses set 1, video and actions set 0 (repeated set)


@pytest.mark.parametrize("impl", IMPLS)
def test_gated_residual(benchmark, device, impl):
    s = op_bench.shapes(device)
    B, N, D, segments = s["batch"], s["tokens"], s["dim"], s["segments"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    residual, x = (torch.randn(B, N, D, device=device, dtype=dtype, generator=g) for _ in range(2))
    gate = torch.randn(B, max(MOD_INDEX) + 1, D, device=device, dtype=dtype, generator=g)

    impl_fn = op_bench.implementation(impl, op_module.gated_residual, WF.gated_residual, device)
    fn = lambda: impl_fn(residual, x, gate, segments, MOD_INDEX)  # noqa: E731

    # residual and x read, the result written, the (B, S, D) gate read once
    bytes_moved = 3 * residual.numel() * residual.element_size() + gate.numel() * gate.element_size()
    out = op_bench.run(benchmark, fn, device, bytes_moved=bytes_moved, impl=impl, B=B, N=N, D=D,
                       segments=segments, mod_index=MOD_INDEX, dtype=str(dtype))
    assert out.shape == residual.shape and out.dtype == dtype
