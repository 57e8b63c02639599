"""attention (flash-style, segment-aware) against torch eager (SDPA, the test reference; a boolean mask
for "temporal") and torch.compile of it.

Cases: "full" (Nq = Nk = all tokens, no mask), "temporal-cached" (the noisy tokens against the cached
prefix + themselves: Nq = 774, Nk = 1256 at W1) and "temporal" (uncached, Nq = Nk, where the kernel
skips key blocks the context queries cannot see). Groups: text 0 | current frame 1 | noisy video and
actions 2. On a GPU: W1 shapes (B=1, H=48, hd=64) in bf16, TFLOP/s with FLOPs = 4 * B * H * hd *
(visible query-key pairs) against the measured bf16 matmul ceiling, and the forced Triton backend as
well. On CPU: tiny shapes in fp32, the wam_fast op running interpreted (a smoke run, not a measurement).
"""
import importlib

import pytest
import torch

import op_bench  # benchmarks/op_bench.py (pytest puts benchmarks/ on sys.path)
from wam_fast.ops.reference import attention as reference
from wam_fast.ops.reference import temporal_mask

ops = importlib.import_module("wam_fast.ops.attention")  # wam_fast.ops.attention is the function

IMPLS = ["wam_fast", "torch-eager", "torch-compile", "triton"]  # no CUDA kernel: the Triton kernel is it
CASES = ["full", "temporal-cached", "temporal"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_attention(benchmark, device, impl, case):
    fn = op_bench.implementation(impl, ops.attention, reference, device)
    s = op_bench.shapes(device)
    b, h, hd, nk = s["batch"], s["heads"], s["head_dim"], s["tokens"]
    nq = s["noisy_tokens"] if case == "temporal-cached" else nk
    mask = "full" if case == "full" else "temporal"
    lengths = s["temporal_segments"]
    groups = tuple(range(len(lengths) - 1)) + (len(lengths) - 2,)  # the actions share the noisy group
    k_seg = torch.repeat_interleave(torch.tensor(groups), torch.tensor(lengths)).to(device)
    q_seg = k_seg[nk - nq:]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, n, hd, device=device, dtype=dtype, generator=g) for n in (nq, nk, nk))
    pairs = nq * nk if mask == "full" else int(temporal_mask(q_seg, k_seg).sum())
    out = op_bench.run(benchmark, lambda: fn(q, k, v, q_seg, k_seg, mask), device,
                       flops=4 * b * h * hd * pairs, impl=impl, case=case, dtype=str(dtype),
                       shape=f"q ({b}, {h}, {nq}, {hd}), k/v ({b}, {h}, {nk}, {hd})",
                       visible_fraction=pairs / (nq * nk))
    assert out.shape == (b, h, nq, hd) and out.dtype == dtype
    ref = reference(q.float(), k.float(), v.float(), q_seg, k_seg, mask)
    assert (out.float() - ref).abs().max().item() < (3e-2 if dtype == torch.bfloat16 else 1e-3)
