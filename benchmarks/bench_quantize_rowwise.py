"""quantize_rowwise: per-token FP8 e4m3 codes + float32 scales in one kernel, against torch eager (the
tests' reference, reference.quantize_rowwise / quantize_rowwise_gelu: about 8 kernels) and torch.compile
of it. ``input="attn-out"``: the out-projection's input (tokens x dim); ``input="ffn-out"``: the FFN's
hidden state (tokens x ffn_dim) with the GELU fused (``gelu=True``).

On a GPU: W1 shapes (774 noisy tokens; dim 3072, ffn_dim 12288; bf16), the forced Triton backend too,
and achieved GB/s against the measured copy bandwidth. On CPU: tiny shapes in fp32, the wam_fast op
running interpreted (a smoke run).

    python -m pytest benchmarks/bench_quantize_rowwise.py --benchmark-only -q
"""
import importlib

import op_bench  # benchmarks/op_bench.py (pytest puts benchmarks/ on sys.path)
import pytest
import torch

from wam_fast.ops import reference as WF  # the tests' reference

op_module = importlib.import_module("wam_fast.ops.quantize_rowwise")

IMPLS = ["wam_fast", "torch-eager", "torch-compile", "triton"]
INPUTS = {"attn-out": ("dim", False), "ffn-out": ("ffn_dim", True)}


def reference(x, gelu=False):
    return WF.quantize_rowwise_gelu(x) if gelu else WF.quantize_rowwise(x)


@pytest.mark.parametrize("input", sorted(INPUTS))
@pytest.mark.parametrize("impl", IMPLS)
def test_quantize_rowwise(benchmark, device, impl, input):
    if impl == "torch-compile" and input == "ffn-out" and device.type != "cuda":
        pytest.skip("one torch.compile per file on CPU (a first compile costs ~25 s)")
    s = op_bench.shapes(device)
    width, gelu = INPUTS[input]
    M, K = s["noisy_tokens"], s[width]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(s["batch"], M, K, device=device, dtype=dtype, generator=g)

    impl_fn = op_bench.implementation(impl, op_module.quantize_rowwise, reference, device)
    fn = lambda: impl_fn(x, gelu=gelu)  # noqa: E731

    # x read once (the kernel's second pass reads it again from cache), codes and scales written
    bytes_moved = x.numel() * x.element_size() + x.numel() + x.numel() // K * 4
    codes, scales = op_bench.run(benchmark, fn, device, bytes_moved=bytes_moved, impl=impl, input=input,
                                 B=s["batch"], M=M, K=K, gelu=gelu, dtype=str(dtype))
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == x.shape
    assert scales.dtype == torch.float32 and scales.shape == (s["batch"], M, 1)
