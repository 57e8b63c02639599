"""The arithmetic per action chunk, from the configs: a row's block tokens and FLOPs (linears vs
attention), the W1/W2 accounting table with and without the KV cache, W1's weight bytes, and the
FLOPs of the VAE encode of one frame (the pixels -> actions rows)."""
from __future__ import annotations

import dataclasses
from typing import List

from wam_fast import configs
from wam_fast.cache import cache_bytes, chunk_cost
from wam_fast.quant import weight_bytes
from wam_fast.bench.rows import Variant


def chunk_flops(cfg, variant: Variant, batch: int) -> dict:
    """Block FLOPs of one chunk of ``variant`` (``wam_fast.cache.chunk_cost``: the accounting table's
    arithmetic), split into linears (24 d^2 per token per layer) and attention (the rest)."""
    rows = batch * (2 if variant.cfg_scale != 1.0 or variant.cfg_schedule != "constant" else 1)
    model_cfg = (dataclasses.replace(cfg, mask="temporal", future_frames=variant.future_frames) if variant.student
                 else cfg)
    cost = chunk_cost(model_cfg, variant.steps, rows, cache=variant.cache)
    linear = cfg.num_layers * 24 * cfg.hidden_dim ** 2 * cost["tokens"]
    return {"tokens": cost["tokens"], "flops": cost["flops"], "linear_flops": linear,
            "attention_flops": cost["flops"] - linear}


ACCOUNTING_WORKLOADS = ("videovla-5b", "videovla-5b-sim")


def accounting(steps: int, rows: int) -> List[dict]:
    """Tokens and FLOPs per action chunk for W1 and W2: the full-mask model (VideoVLA), its temporal
    twin uncached and cached (no history), its action-only student cached (``future_frames=0``: the noisy
    tokens are the action chunk alone), and the cache's bf16 memory."""
    out = []
    for name in ACCOUNTING_WORKLOADS:
        full = configs.get(name)
        temporal = dataclasses.replace(full, mask="temporal")
        action_only = dataclasses.replace(temporal, future_frames=0)
        for label, cfg, cache in (("full (VideoVLA)", full, False), ("temporal", temporal, False),
                                  ("temporal + KV cache", temporal, True),
                                  ("action-only + KV cache", action_only, True)):
            cost = chunk_cost(cfg, steps, rows, cache=cache)
            out.append({"workload": name, "model": label, "cache": cache, "steps": steps, "rows": rows,
                        "noisy_tokens": cfg.noisy_tokens, "tokens": cost["tokens"],
                        "tflop": round(cost["flops"] / 1e12, 3),
                        "text_tokens": cost["text_tokens"], "text_tflop": round(cost["text_flops"] / 1e12, 3),
                        "cache_bytes_bf16": cache_bytes(cfg, rows) if cache else 0})
    return out


def weight_accounting(workload: str = "videovla-5b") -> dict:
    """Weight bytes of a workload in bf16 and with FP8 linears, from meta-device builds."""
    cfg = configs.get(workload)
    default = weight_bytes(cfg)
    with_adaln = weight_bytes(cfg, filter_fn=lambda module, name: name.startswith("blocks."))
    return {"workload": workload, "bf16": default["bf16"], "fp8": default["fp8"], "fp8_with_adaln": with_adaln["fp8"]}


def vae_encoder_cost(workload: str = "videovla-5b") -> dict:
    """FLOPs of CogVideoX's VAE encoder on one frame whose latent is ``workload``'s (W1: 256x256), counted
    by torch's FlopCounterMode on the meta device (no memory, no weights); a reason when diffusers is missing."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from wam_fast.utils.optional import missing_reason

    reason = missing_reason("diffusers")
    if reason is not None:
        return {"workload": workload, "skipped": reason}
    from diffusers import AutoencoderKLCogVideoX

    cfg = configs.get(workload)
    with torch.device("meta"):
        vae = AutoencoderKLCogVideoX(latent_channels=cfg.latent_channels)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        height, width = cfg.latent_height * factor, cfg.latent_width * factor
        with FlopCounterMode(display=False) as counter:
            vae.encoder(torch.empty(1, 3, 1, height, width))
    return {"workload": workload, "image_shape": [height, width, 3],
            "tflop": round(counter.get_total_flops() / 1e12, 3),
            "params": sum(p.numel() for p in vae.encoder.parameters()),
            "note": "diffusers' AutoencoderKLCogVideoX default (CogVideoX's VAE) encoder, one frame; meta-device count"}
