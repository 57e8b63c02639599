"""Action-chunk latency of WAMPolicy with and without the temporal KV cache, same model, same run.

W1's mask="temporal" twin in bf16 on a GPU ("videovla-5b": 774 noisy of 1256 tokens per denoising
step), "tiny" in fp32 on CPU; 4 DDIM steps, guidance batched (cond + uncond rows), no history. One
act() = the new frame's pass (cached only) + 4 denoising sample-forwards. The uncached policy is
timed in the same test (CUDA events, warm-up, median on a GPU) and the ratio stored in extra_info.
"""
import dataclasses
import statistics

import torch

import wam_fast
from wam_fast import bench, configs
from wam_fast.bench import time_calls

STEPS = 4


def test_kv_cache_policy_act(benchmark, device):
    on_gpu = device.type == "cuda"
    workload = "videovla-5b" if on_gpu else "tiny"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    cfg = dataclasses.replace(configs.get(workload), mask="temporal")
    torch.manual_seed(0)
    model = bench.build_model(cfg, device, dtype)
    inputs = bench.make_inputs(cfg, batch=1, device=device, dtype=dtype, seed=0)
    policies = {}
    for cache in (False, True):
        policies[cache] = wam_fast.WAMPolicy(model, steps=STEPS, sampler="ddim", cache=cache, history=0, seed=0,
                                             cfg_scale=6.0)
        policies[cache].reset(inputs["text"])

    def act(cache):
        chunk = policies[cache].act(inputs["image"])
        if on_gpu:
            torch.cuda.synchronize(device)  # pytest-benchmark's clock is the host's
        return chunk

    with torch.inference_mode():
        repeats = 10 if on_gpu else 5
        medians = {cache: statistics.median(time_calls(lambda: act(cache), device, 2, repeats)[0])
                   for cache in (False, True)}
        benchmark.extra_info.update(
            workload=workload + " (mask=temporal)", dtype=str(dtype), steps=STEPS, rows=2,
            tokens_uncached=cfg.num_tokens, tokens_cached=cfg.noisy_tokens,
            uncached_median_ms=round(medians[False], 3), cached_median_ms=round(medians[True], 3),
            speedup=round(medians[False] / medians[True], 3),
            cache_bytes=policies[True].cache_bytes,
            timer="CUDA events" if on_gpu else "perf_counter (CPU: not performance data)")
        chunk = benchmark.pedantic(lambda: act(True), warmup_rounds=1, rounds=repeats)
    assert chunk.actions.shape == (1, cfg.action_len, cfg.action_dim)
    assert torch.isfinite(chunk.actions).all()
