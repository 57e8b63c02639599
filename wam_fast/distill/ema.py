"""The exponential moving average (EMA) of a trained model's weights, for ``wam_fast.distill.trainer``.

After each optimizer step ``ema = decay * ema + (1 - decay) * params`` over the trainable
parameters; buffers are copied. Works on plain and FSDP2-sharded modules (local shards).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from wam_fast.distill.distributed import local_shard


class EMAUpdate:
    """Pairs ``ema``'s parameters and buffers with ``model``'s (same architecture, same sharding)."""

    def __init__(self, ema: nn.Module, model: nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ema_params = [e for e, q in zip(ema.parameters(), model.parameters()) if q.requires_grad]
        self.buffers = list(zip(ema.buffers(), model.buffers()))

    def update(self, decay: float) -> None:
        with torch.no_grad():
            torch._foreach_lerp_([local_shard(e) for e in self.ema_params],
                                 [local_shard(p) for p in self.params], 1.0 - decay)
            for e, b in self.buffers:
                e.copy_(b)
