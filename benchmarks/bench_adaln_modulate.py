"""adaln_modulate: LayerNorm + per-segment (1 + scale), shift, against torch eager (the tests' reference,
functional.adaln_modulate) and torch.compile of it; with ``out="fp8"`` also the row-wise FP8
quantization (reference: functional.quantize_rowwise of the eager result).

On a GPU: W1 shapes (1 x 1256 tokens x 3072, segments text | video | actions with sets (1, 0, 0),
bf16), the forced Triton and CUDA backends too, and achieved GB/s against the measured copy
bandwidth. On CPU: tiny shapes in fp32, the wam_fast op running interpreted (a smoke run).

    python -m pytest benchmarks/bench_adaln_modulate.py --benchmark-only -q
"""
import importlib

import op_bench  # benchmarks/op_bench.py (pytest puts benchmarks/ on sys.path)
import pytest
import torch

from wam_fast.ops import reference as WF  # the tests' reference

op_module = importlib.import_module("wam_fast.ops.adaln_modulate")

IMPLS = ["wam_fast", "torch-eager", "torch-compile", "triton", "cuda"]
MOD_INDEX = (1, 0, 0)  # text uses set 1, video and actions set 0 (repeated set)


def reference(x, shift, scale, segments, mod_index, weight, bias, fp8=False):
    y = WF.adaln_modulate(x, shift, scale, segments, mod_index, weight, bias)
    return WF.quantize_rowwise(y) if fp8 else y


def make_inputs(device):
    s = op_bench.shapes(device)
    B, N, D, segments = s["batch"], s["tokens"], s["dim"], s["segments"]
    S = max(MOD_INDEX) + 1
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, N, D, device=device, dtype=dtype, generator=g)
    shift = torch.randn(B, S, D, device=device, dtype=dtype, generator=g)
    scale = torch.randn(B, S, D, device=device, dtype=dtype, generator=g)
    weight = torch.randn(D, device=device, dtype=dtype, generator=g)
    bias = torch.randn(D, device=device, dtype=dtype, generator=g)
    info = dict(B=B, N=N, D=D, segments=segments, mod_index=MOD_INDEX, dtype=str(dtype))
    return (x, shift, scale, segments, MOD_INDEX, weight, bias), info


def bytes_moved(x, shift, weight, fp8):
    B, N, D = x.shape
    e = x.element_size()
    out = B * N * D * 1 + B * N * 4 if fp8 else B * N * D * e
    return B * N * D * e + out + 2 * shift.numel() * e + 2 * weight.numel() * e


@pytest.mark.parametrize("out", ["dtype", "fp8"])
@pytest.mark.parametrize("impl", IMPLS)
def test_adaln_modulate(benchmark, device, impl, out):
    on_gpu = device.type == "cuda"
    fp8 = out == "fp8"
    if impl == "torch-compile" and fp8 and not on_gpu:
        pytest.skip("one torch.compile per file on CPU (a first compile costs ~25 s)")
    args, info = make_inputs(device)

    impl_fn = op_bench.implementation(impl, op_module.adaln_modulate, reference, device)
    fn = lambda: impl_fn(*args, fp8=fp8)  # noqa: E731

    result = op_bench.run(benchmark, fn, device, bytes_moved=bytes_moved(args[0], args[1], args[5], fp8),
                          impl=impl, out=out, **info)
    y = result[0] if fp8 else result
    assert y.shape == args[0].shape and y.dtype == (torch.float8_e4m3fn if fp8 else args[0].dtype)
