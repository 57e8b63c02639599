"""The pixels -> actions rows of ``python -m wam_fast.bench``: a ``WAMPipeline`` around the compiled
cached student of a latent-only row (same policy, same compile), timed from a uint8 frame to actions in
robot units: the frame's VAE encode, the chunk, the readout to the host. The text encoder runs once per
instruction, so it is timed on its own (``text_encoder_ms``), not in the row.

Parts (random weights: latency does not depend on their values):
- "full" (a GPU, or --allow-cpu-large): CogVideoX's VAE (diffusers' AutoencoderKLCogVideoX defaults:
  4 blocks, 8x spatial, 16 latent channels; W1's 32x32 latents are a 256x256 frame) and a
  T5-v1.1-XXL-shaped encoder (24 layers, d_model 4096) padded to the workload's text_len;
- "tiny" (CPU): a 2-block CogVideoX VAE (2x spatial) and a 1-layer T5 whose sizes match the workload.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from wam_fast.bench.accounting import chunk_flops
from wam_fast.bench.measure import ops_since
from wam_fast.bench.models import compiled_policy, default_dtype
from wam_fast.bench.telemetry import gpu_telemetry
from wam_fast.ops import backends_used
from wam_fast.bench.rows import Variant
from wam_fast.bench.timing import percentile, time_calls
from wam_fast.pipeline import CogVideoXEncoder, T5TextEncoder, WAMPipeline
from wam_fast.pipeline.encoders import require
from wam_fast.pipeline.tiny import tiny_tokenizer
from wam_fast.quant import tensor_bytes

INSTRUCTION = "pick the red block and place it in the drawer"
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")


def pixels_row_name(steps: int, dtype: str) -> str:
    return f"pixels-to-actions-{steps}step-{dtype}-cache"


def build_parts(cfg, device, dtype, full: bool):
    """(vae, image_size, t5, tokenizer) of random weights whose latents / embeddings fit ``cfg``."""
    require("diffusers")
    require("transformers")
    from diffusers import AutoencoderKLCogVideoX
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny_tokenizer()  # the vocabulary does not change latency: padded to text_len either way
    with torch.device(device), default_dtype(dtype):
        if full:
            vae = AutoencoderKLCogVideoX(latent_channels=cfg.latent_channels)
            t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), **{**T5_XXL, "d_model": cfg.text_dim}))
        else:
            vae = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 2,
                                         up_block_types=("CogVideoXUpBlock3D",) * 2, block_out_channels=(8, 16),
                                         latent_channels=cfg.latent_channels, layers_per_block=1, norm_num_groups=4)
            t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=cfg.text_dim, d_kv=8, d_ff=64,
                                         num_layers=1, num_heads=4))
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return vae.eval(), (cfg.latent_height * factor, cfg.latent_width * factor), t5.eval(), tokenizer


def measure_pixels_row(student, cfg, steps: int, args, device, full: bool) -> dict:
    """One pixels -> actions row: ``steps``-step cached student, compiled as the latent rows are."""
    before = backends_used()
    dtype = next(student.parameters()).dtype
    vae, image_size, t5, tokenizer = build_parts(cfg, device, dtype, full)
    pipe = WAMPipeline(student, CogVideoXEncoder(vae, image_size), T5TextEncoder(t5, tokenizer, cfg.text_len),
                       steps=steps, cache=True)
    session = pipe.new_session(seed=args.seed)
    variant = Variant(pixels_row_name(steps, args.dtype), "euler" if cfg.objective != "v_prediction" else "ddim",
                      steps, 1.0, student=True, compiled=True, cache=True)
    session.policy, info = compiled_policy(student, variant, args.seed, args.backend)  # the latent row's policy
    image = np.random.default_rng(args.seed).integers(0, 256, (*image_size, 3), dtype=np.uint8)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    text_times = []
    for i in range(3):  # once per instruction: each call a new instruction (the cache bypassed)
        synchronize()
        start = time.perf_counter()
        pipe.text_encoder.encode(f"{INSTRUCTION} {i}")
        synchronize()
        text_times.append((time.perf_counter() - start) * 1e3)
    parts = {"encode_ms": [], "policy_ms": []}

    def timed():
        session(image, INSTRUCTION)
        for key in parts:
            parts[key].append(session.last_timing[key])

    with torch.inference_mode():
        start = time.perf_counter()
        timed()  # the first call: capture / compile, and the instruction's text encode
        first_ms = (time.perf_counter() - start) * 1e3
        times, peak = time_calls(timed, device, max(args.warmup - 1, 0), args.repeats)
    n = len(times)
    flops = chunk_flops(cfg, variant, 1)  # the WAM's blocks only; the VAE encoder's FLOPs are not counted
    return {
        "name": variant.name, "steps": steps, "fp8": False, "cache": True,
        "latency_ms": round(percentile(times, 50), 3), "p90_ms": round(percentile(times, 90), 3),
        "peak_mem_bytes": int(peak), "model": "pixels -> actions: CogVideoX VAE encode + shortcut student + readout",
        "sampler": session.policy.sampler, "cfg_scale": 1.0, "cfg_schedule": "constant", "nfe": steps,
        "tokens": flops["tokens"], "tflop": round(flops["flops"] / 1e12, 6),
        "compiled_with": info["compiled_with"], "backend": info["backend"],
        "levers": ["vae-encode"] + info["levers"], "first_call_ms": round(first_ms, 3),
        "cuda_graphs": info["cuda_graphs"], "fused_modules": info["fused_modules"], "fp8_layers": 0,
        "cache_bytes": session.policy.cache_bytes, "weight_bytes": tensor_bytes(student) + tensor_bytes(vae.encoder),
        "batch": 1, "dtype": args.dtype, "warmup": args.warmup, "repeats": args.repeats,
        "times_ms": [round(t, 4) for t in times], "op_backends": ops_since(before),
        "gpu_telemetry": gpu_telemetry(device),
        "pipeline": {"parts": "full (CogVideoX VAE, T5-XXL shape)" if full else "tiny (CPU: 2-block VAE, 1-layer T5)",
                     "image_shape": [*image_size, 3],
                     "vae_encoder_params": sum(p.numel() for p in vae.encoder.parameters()),
                     "text_encoder_params": sum(p.numel() for p in t5.parameters()),
                     "encode_ms_median": round(percentile(parts["encode_ms"][-n:], 50), 3),
                     "policy_ms_median": round(percentile(parts["policy_ms"][-n:], 50), 3),
                     "text_encoder_ms": round(percentile(text_times, 50), 3),
                     "text_encoder_ms_raw": [round(t, 3) for t in text_times],
                     "latent_note": "VAE posterior mean x scaling_factor; timings exclude the text encoder "
                                    "(once per instruction)"}}
