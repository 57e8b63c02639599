"""A KV cache for causal transformer policies (GR-1 style: a GPT over [OBS] / [ACT] tokens), for models built
from torch's own ``nn.TransformerEncoder`` / ``nn.TransformerEncoderLayer`` (batch_first), as wam_fast
does not know their code otherwise.

    cache = CausalKVCache(model.transformer)       # the nn.TransformerEncoder the policy runs causally
    cache.reset()                                  # new episode
    h = cache.step(tokens)                         # (B, n, D) new tokens -> their (B, n, D) outputs

``step`` returns exactly what ``encoder(all_tokens, mask=causal_mask, is_causal=True)[:, -n:]`` gives (to
rounding: tested at 1e-5 in fp32), computing only the new tokens: every layer keeps the keys and values of
the tokens seen so far. Attention runs through ``wam_fast.ops.attention`` with one segment id per position
(a query sees the keys of positions <= its own). Nothing of the module is changed.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from wam_fast import ops


def _check_layer(i: int, layer: nn.Module) -> None:
    if type(layer) is not nn.TransformerEncoderLayer:
        raise TypeError(f"CausalKVCache: layer {i} is {type(layer).__name__}; it takes nn.TransformerEncoderLayer")
    mha = layer.self_attn
    if not mha.batch_first or not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError(f"CausalKVCache: layer {i}'s attention must be batch_first with one in_proj and no "
                         f"bias_k / add_zero_attn")


class CausalKVCache:
    """Step-by-step causal inference of an ``nn.TransformerEncoder`` with per-layer K/V caches.
    max_tokens: refuse to grow past this many tokens (None: no limit)."""

    def __init__(self, encoder: nn.TransformerEncoder, max_tokens: Optional[int] = None):
        if not isinstance(encoder, nn.TransformerEncoder):
            raise TypeError(f"CausalKVCache expects an nn.TransformerEncoder, got {type(encoder).__name__}")
        for i, layer in enumerate(encoder.layers):
            _check_layer(i, layer)
        self.encoder, self.max_tokens = encoder, max_tokens
        self.reset()

    def reset(self) -> None:
        """Forget every token (a new episode)."""
        self.keys: List[Optional[torch.Tensor]] = [None] * len(self.encoder.layers)
        self.values: List[Optional[torch.Tensor]] = [None] * len(self.encoder.layers)
        self.length = 0

    def _attend(self, i: int, layer: nn.TransformerEncoderLayer, x: torch.Tensor) -> torch.Tensor:
        mha = layer.self_attn
        b, n, d = x.shape
        h = mha.num_heads
        q, k, v = (t.reshape(b, n, h, d // h).transpose(1, 2)
                   for t in F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1))
        if self.keys[i] is not None:
            k, v = torch.cat([self.keys[i], k], dim=2), torch.cat([self.values[i], v], dim=2)
        self.keys[i], self.values[i] = k, v
        positions = torch.arange(k.shape[2], device=x.device)
        o = ops.attention(q, k.contiguous(), v.contiguous(), positions[-n:], positions, mask="temporal")
        return layer.dropout1(mha.out_proj(o.transpose(1, 2).reshape(b, n, d)))

    def _feed_forward(self, layer: nn.TransformerEncoderLayer, x: torch.Tensor) -> torch.Tensor:
        return layer.dropout2(layer.linear2(layer.dropout(layer.activation(layer.linear1(x)))))

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """The encoder's causal outputs for ``tokens`` (B, n, D), after every token given since ``reset``."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
            raise ValueError(f"CausalKVCache.step takes (B, n, D) tokens, got "
                             f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
        if self.encoder.training:
            raise ValueError("CausalKVCache runs an encoder in eval mode (dropout would differ per token)")
        if self.keys[0] is not None and tokens.shape[0] != self.keys[0].shape[0]:
            raise ValueError(f"batch {tokens.shape[0]} differs from the cached episode's {self.keys[0].shape[0]}; "
                             f"reset() first")
        if self.max_tokens is not None and self.length + tokens.shape[1] > self.max_tokens:
            raise ValueError(f"{self.length} cached + {tokens.shape[1]} new tokens exceed max_tokens="
                             f"{self.max_tokens}; reset() for a new episode")
        x = tokens
        for i, layer in enumerate(self.encoder.layers):
            if layer.norm_first:
                x = x + self._attend(i, layer, layer.norm1(x))
                x = x + self._feed_forward(layer, layer.norm2(x))
            else:
                x = layer.norm1(x + self._attend(i, layer, x))
                x = layer.norm2(x + self._feed_forward(layer, x))
        self.length += tokens.shape[1]
        return self.encoder.norm(x) if self.encoder.norm is not None else x
