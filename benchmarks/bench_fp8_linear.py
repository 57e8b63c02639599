"""fp8_linear (e4m3 x e4m3 GEMM, per-token x scales, per-channel weight scales, bias in the epilogue)
against the bf16 GEMM it replaces (F.linear) and the float32 dequantized reference.

On a GPU: the W1 backbone linears (M = 1256 tokens and 774 noisy tokens; QKV 3072 -> 9216, out
3072 -> 3072, FFN 3072 -> 12288 and 12288 -> 3072), TFLOP/s (2 M K N) against the measured bf16
matmul ceiling, for the auto-dispatched op, each forced backend (Triton; torch = torch._scaled_mm,
cuBLASLt) and "fp8-module": an FP8Linear on a bf16 input, i.e. the GEMM plus its own per-token
quantize pass (what the fused norm -> FP8 path saves for QKV and FFN-in). On CPU: tiny shapes, the op
running interpreted / torch._scaled_mm on CPU (a smoke run, not a measurement).
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

import op_bench  # benchmarks/op_bench.py (pytest puts benchmarks/ on sys.path)
from wam_fast.ops import reference as WF
from wam_fast.ops.reference import fp8_linear as reference

ops = importlib.import_module("wam_fast.ops.fp8_linear")  # wam_fast.ops.fp8_linear is the function

IMPLS = ["bf16-linear", "wam_fast", "triton", "torch", "fp8-module", "torch-eager"]
LINEARS = {"qkv": ("dim", "qkv"), "out": ("dim", "dim"), "ffn_in": ("dim", "ffn_dim"), "ffn_out": ("ffn_dim", "dim")}


def _sizes(s):
    return {"dim": s["dim"], "qkv": 3 * s["dim"], "ffn_dim": s["ffn_dim"]}


@pytest.mark.parametrize("linear", sorted(LINEARS))
@pytest.mark.parametrize("rows", ["tokens", "noisy_tokens"])
@pytest.mark.parametrize("impl", IMPLS)
def test_fp8_linear(benchmark, device, impl, rows, linear):
    s = op_bench.shapes(device)
    sizes = _sizes(s)
    M, K, N = s[rows], sizes[LINEARS[linear][0]], sizes[LINEARS[linear][1]]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the model dtype / output dtype
    if impl == "torch-eager" and device.type == "cuda" and M * N * K > 2 ** 34:
        pytest.skip("the fp32 dequantized reference is a correctness baseline; timed on small shapes only")
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(s["batch"], M, K, device=device, generator=g).to(dtype)
    w = torch.randn(N, K, device=device, generator=g) / K ** 0.5
    b = torch.randn(N, device=device, generator=g).to(dtype)
    x_fp8, x_scale = WF.quantize_rowwise(x)
    w_fp8, w_scale = WF.quantize_rowwise(w)
    w_hp = w.to(dtype)
    if impl == "bf16-linear":
        def fn():
            return F.linear(x, w_hp, b)
    elif impl == "fp8-module":
        from wam_fast.quant import FP8Linear

        layer = FP8Linear(K, N, True, "dynamic", dtype, device=device)
        layer.weight.copy_(w_fp8)
        layer.weight_scale.copy_(w_scale)
        layer.bias.data.copy_(b)

        def fn():
            return layer(x)
    else:
        op = op_bench.implementation(impl, ops.fp8_linear, reference, device)

        def fn():
            return op(x_fp8, x_scale, w_fp8, w_scale, b, dtype)
    batch = x.shape[0]
    with torch.no_grad():
        out = op_bench.run(benchmark, fn, device, flops=2 * batch * M * K * N, impl=impl, linear=linear,
                           shape=f"x ({batch}, {M}, {K}) @ W ({N}, {K})^T", dtype=str(dtype),
                           operands="bf16" if impl == "bf16-linear" else "float8_e4m3fn")
    assert out.shape == (batch, M, N) and out.dtype == dtype
    ref = F.linear(x.float(), w, b.float())
    # FP8 vs the full-precision product: e4m3 quantization of both operands is ~27-30 dB SQNR
    err = (out.float() - ref).norm() / ref.norm()
    assert err.item() < (0.01 if impl == "bf16-linear" else 0.06), err.item()
