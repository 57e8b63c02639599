"""ffn_gelu (gelu_tanh(x @ W^T + b), the FFN's first GEMM with the GELU as its epilogue) against torch
eager (F.linear + F.gelu, the test reference) and torch.compile of it.

On a GPU: W1 shapes in bf16 (M = 1256 tokens and 774 noisy tokens, K = 3072, Nout = 12288), TFLOP/s
(2 M K Nout) against the measured bf16 matmul ceiling, and the forced Triton backend as well. On CPU:
tiny shapes in fp32, the wam_fast op running interpreted (a smoke run, not a measurement).
"""
import importlib

import pytest
import torch

import op_bench  # benchmarks/op_bench.py (pytest puts benchmarks/ on sys.path)
from wam_fast.ops.reference import ffn_gelu as reference

ops = importlib.import_module("wam_fast.ops.ffn_gelu")

IMPLS = ["wam_fast", "torch-eager", "torch-compile", "triton"]  # no CUDA kernel: the Triton matmul is the kernel


@pytest.mark.parametrize("rows", ["tokens", "noisy_tokens"])
@pytest.mark.parametrize("impl", IMPLS)
def test_ffn_gelu(benchmark, device, impl, rows):
    fn = op_bench.implementation(impl, ops.ffn_gelu, reference, device)
    s = op_bench.shapes(device)
    M, K, N = s[rows], s["dim"], s["ffn_dim"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(s["batch"], M, K, device=device, dtype=dtype, generator=g)
    w = (torch.randn(N, K, device=device, dtype=torch.float32, generator=g) / K ** 0.5).to(dtype)
    b = torch.randn(N, device=device, dtype=dtype, generator=g)
    batch = x.shape[0]
    out = op_bench.run(benchmark, lambda: fn(x, w, b), device, flops=2 * batch * M * K * N,
                       impl=impl, shape=f"x ({batch}, {M}, {K}) @ W ({N}, {K})^T", dtype=str(dtype))
    assert out.shape == (batch, M, N) and out.dtype == dtype
    ref = reference(x.float(), w.float(), b.float())
    assert (out.float() - ref).abs().max().item() < (0.1 if dtype == torch.bfloat16 else 1e-3)
