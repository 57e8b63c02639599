"""qk_norm_rope: LayerNorm over head_dim on q and k + interleaved RoPE on the video tokens, on the
model's strided views of the fused qkv projection, against torch eager (the test reference) and
torch.compile of it. On a GPU (W1: 48 heads x 64, 1256 tokens, RoPE on [226, 1250), bf16) also
the forced Triton and CUDA backends, with achieved GB/s against the measured copy bandwidth.

    python -m pytest benchmarks/bench_qk_norm_rope.py --benchmark-only -q
"""
import importlib

import op_bench  # benchmarks/op_bench.py (pytest puts benchmarks/ on sys.path)
import pytest
import torch

from wam_fast.ops.reference import qk_norm_rope as reference  # the tests' reference

op_module = importlib.import_module("wam_fast.ops.qk_norm_rope")

IMPLS = ["wam_fast", "torch-eager", "torch-compile", "triton", "cuda"]


def make_inputs(device):
    s = op_bench.shapes(device)
    B, N, H, hd = s["batch"], s["tokens"], s["heads"], s["head_dim"]
    text, video = s["segments"][0], s["segments"][1]
    rope_start, rope_end = text, text + video
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    qkv = torch.randn(B, N, 3 * H * hd, device=device, dtype=dtype)
    q, k, _ = qkv.view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
    params = [torch.randn(hd, device=device, dtype=dtype) for _ in range(4)]
    angles = torch.rand(rope_end - rope_start, hd, device=device) * 6.3
    args = (q, k, *params, angles.cos(), angles.sin(), rope_start, rope_end, 1e-6)
    # q, k read once, outputs written once, the tables and affine parameters read once
    bytes_moved = (4 * q.numel() * q.element_size() + 2 * angles.numel() * 4
                   + 4 * hd * q.element_size())
    info = dict(B=B, H=H, N=N, head_dim=hd, rope=(rope_start, rope_end), dtype=str(dtype))
    return args, bytes_moved, info


@pytest.mark.parametrize("impl", IMPLS)
def test_qk_norm_rope(benchmark, device, impl):
    args, bytes_moved, info = make_inputs(device)
    impl_fn = op_bench.implementation(impl, op_module.qk_norm_rope, reference, device)
    fn = lambda: impl_fn(*args)  # noqa: E731

    q_out, k_out = op_bench.run(benchmark, fn, device, bytes_moved=bytes_moved, impl=impl, **info)
    assert q_out.shape == args[0].shape and k_out.dtype == args[0].dtype
