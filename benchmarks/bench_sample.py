"""Latency of one action chunk from the eager reference model (`wam_fast.sample`).

The paper baseline: 10 DDIM steps with classifier-free guidance batched (20 sample-forwards), on
"tiny" in fp32 on CPU and on W1 ("videovla-5b") in bf16 on a GPU, random weights.
`python -m wam_fast.bench` reports the same row with medians from device events.
"""
import pytest
import torch

import wam_fast
from wam_fast import bench, configs


@pytest.mark.parametrize("steps", [10])
def test_sample_paper_baseline(benchmark, device, steps):
    on_gpu = device.type == "cuda"
    workload = "videovla-5b" if on_gpu else "tiny"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    cfg = configs.get(workload)
    torch.manual_seed(0)
    model = bench.build_model(cfg, device, dtype)
    inputs = bench.make_inputs(cfg, batch=1, device=device, dtype=dtype, seed=0)

    def chunk():
        out = wam_fast.sample(model, **inputs, sampler="ddim", steps=steps, cfg_scale=6.0, seed=0)
        if on_gpu:
            torch.cuda.synchronize(device)  # pytest-benchmark's clock is the host's
        return out

    benchmark.extra_info.update(workload=workload, dtype=str(dtype), steps=steps, nfe=2 * steps,
                                tokens=cfg.num_tokens)
    result = benchmark.pedantic(chunk, warmup_rounds=1, rounds=5 if on_gpu else 10)
    assert result.actions.shape == (1, cfg.action_len, cfg.action_dim)
    assert torch.isfinite(result.actions).all()
