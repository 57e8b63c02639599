"""gated_residual_adaln: r = residual + gate[set] * x and the next AdaLN of r in one pass, against torch
eager (the tests' reference, functional.gated_residual_adaln) and torch.compile of it; with
``out="fp8"`` the modulated output is also quantized row-wise to FP8 (reference: quantize_rowwise).

On a GPU: W1 shapes (1 x 1256 tokens x 3072, segments text | video | actions with sets (1, 0, 0),
bf16), the forced Triton and CUDA backends too, and achieved GB/s against the measured copy
bandwidth. On CPU: tiny shapes in fp32, the wam_fast op running interpreted (a smoke run).

    python -m pytest benchmarks/bench_gated_residual_adaln.py --benchmark-only -q
"""
import importlib

import op_bench  # benchmarks/op_bench.py (pytest puts benchmarks/ on sys.path)
import pytest
import torch

from wam_fast.ops import reference as WF  # the tests' reference

op_module = importlib.import_module("wam_fast.ops.gated_residual_adaln")

IMPLS = ["wam_fast", "torch-eager", "torch-compile", "triton", "cuda"]
MOD_INDEX = (1, 0, 0)  # text uses set 1, video and actions set 0 (repeated set)


def reference(residual, x, gate, shift, scale, segments, mod_index, weight, bias, fp8=False):
    r, y = WF.gated_residual_adaln(residual, x, gate, shift, scale, segments, mod_index, weight, bias)
    return (r, *WF.quantize_rowwise(y)) if fp8 else (r, y)


def make_inputs(device):
    s = op_bench.shapes(device)
    B, N, D, segments = s["batch"], s["tokens"], s["dim"], s["segments"]
    S = max(MOD_INDEX) + 1
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    rows = [torch.randn(B, N, D, device=device, dtype=dtype, generator=g) for _ in range(2)]
    tables = [torch.randn(B, S, D, device=device, dtype=dtype, generator=g) for _ in range(3)]
    affine = [torch.randn(D, device=device, dtype=dtype, generator=g) for _ in range(2)]
    info = dict(B=B, N=N, D=D, segments=segments, mod_index=MOD_INDEX, dtype=str(dtype))
    return (*rows, *tables, segments, MOD_INDEX, *affine), info


def bytes_moved(residual, gate, weight, fp8):
    B, N, D = residual.shape
    e = residual.element_size()
    y = B * N * D * 1 + B * N * 4 if fp8 else B * N * D * e
    # residual and x read, r written, y written; three (B, S, D) tables and the affine read once
    return 3 * B * N * D * e + y + 3 * gate.numel() * e + 2 * weight.numel() * e


@pytest.mark.parametrize("out", ["dtype", "fp8"])
@pytest.mark.parametrize("impl", IMPLS)
def test_gated_residual_adaln(benchmark, device, impl, out):
    on_gpu = device.type == "cuda"
    fp8 = out == "fp8"
    if impl == "torch-compile" and fp8 and not on_gpu:
        pytest.skip("one torch.compile per file on CPU (a first compile costs ~25 s)")
    args, info = make_inputs(device)

    impl_fn = op_bench.implementation(impl, op_module.gated_residual_adaln, reference, device)
    fn = lambda: impl_fn(*args, fp8=fp8)  # noqa: E731

    result = op_bench.run(benchmark, fn, device, bytes_moved=bytes_moved(args[0], args[2], args[7], fp8),
                          impl=impl, out=out, **info)
    assert len(result) == (3 if fp8 else 2)
    assert result[0].shape == args[0].shape and result[0].dtype == args[0].dtype
    assert result[1].dtype == (torch.float8_e4m3fn if fp8 else args[0].dtype)
