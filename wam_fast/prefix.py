"""Committed action prefixes: the actions a robot executes while the next chunk is being inferred.

Real-time chunking (``wam_fast.realtime``) starts chunk n+1 from an observation taken while chunk n still
runs. By the time chunk n+1 arrives the robot has executed ``d`` more actions of chunk n: they are
committed. Chunk n+1 must start with them and continue them without a jump. The sampler
(``run_sampler(prefix=...)``) guides the chunk's action state after every denoising step:

- the d committed positions are replaced by the committed actions at the state's noise level,
  ``alpha * committed + sigma * eps`` (inpainting; the final step sets them exactly);
- the next ``blend`` positions (default ``BLEND_ACTIONS``, 4) are pulled toward the last committed action,
  with weights falling linearly to 0 (0.8, 0.6, 0.4, 0.2 for 4): a soft mask, as real-time chunking's
  guidance has, so the chunk leaves the committed motion gradually instead of at the seam. A blend averages
  the committed motion with the new chunk: where the new chunk may switch to another mode (a route round an
  obstacle), a model that does not read the prefix can be eased into neither; ``blend=0`` turns it off.

``eps`` is the chunk's own initial action noise (no extra draw: the noise stream, and a chunk without a
prefix, are unchanged). A model sees the guided positions from its second evaluation on; with one step
the guidance acts on the output alone. A student distilled to read committed actions
(``config.action_prefix``, ``python -m wam_fast.distill --prefix-fraction``) also gets the committed
positions clean and flagged at every step, from the first.

The prefix travels as full-length tensors (target actions, weights, a mask), so its length ``d`` is data,
not a shape: a CUDA graph of the chunk serves every ``d``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

import torch

BLEND_ACTIONS = 4  # positions after the committed ones eased from the committed motion into the new chunk


@dataclass
class ActionPrefix:
    """A checked committed prefix for a batch, over the chunk's K actions: ``actions`` (B, K, A) float32,
    the committed actions in the first ``length`` positions, then the last of them repeated over the blend
    (zeros after); ``weight`` (B, K, 1) float32, how strongly each position is guided (1 on the committed
    positions); ``known`` (B, K, 1) bool, True on the committed positions."""

    actions: torch.Tensor
    weight: torch.Tensor
    known: torch.Tensor
    length: int


def check_blend(blend) -> int:
    if isinstance(blend, bool) or not isinstance(blend, numbers.Integral) or blend < 0:
        raise ValueError(f"blend must be an int >= 0 (positions after the committed actions eased out of them; "
                         f"0: none), got {blend!r}")
    return int(blend)


def make_prefix(committed, batch: int, action_len: int, action_dim: int, device,
                blend: int = BLEND_ACTIONS) -> ActionPrefix:
    """``committed`` (B, d, A), model units (a floating tensor on the model's device), 0 <= d < K -> an
    ``ActionPrefix`` over the chunk's K actions; ``blend`` positions after them are eased out of the last
    committed action with weights (blend - j) / (blend + 1) (0: the committed actions alone). Checks shapes,
    not values: the caller folds ``committed`` into its one ``check_values`` (one device sync per chunk)."""
    blend = check_blend(blend)
    if not isinstance(committed, torch.Tensor):
        raise TypeError(f"prefix must be a torch.Tensor (B, d, action_dim) of committed actions, "
                        f"got {type(committed).__name__}")
    if committed.dim() != 3 or committed.shape[0] != batch or committed.shape[2] != action_dim:
        raise ValueError(f"prefix must have shape (B={batch}, d, action_dim={action_dim}), got {tuple(committed.shape)}")
    length = committed.shape[1]
    if length >= action_len:
        raise ValueError(f"a prefix of {length} committed actions leaves nothing of a {action_len}-action chunk to "
                         f"sample; expected d in [0, {action_len - 1}]")
    if not committed.dtype.is_floating_point:
        raise TypeError(f"prefix must be a floating tensor, got dtype {committed.dtype}")
    if committed.device != torch.device(device):
        raise ValueError(f"prefix is on {committed.device} but the model is on {device}")
    actions = torch.zeros(batch, action_len, action_dim, device=device, dtype=torch.float32)
    weight = torch.zeros(batch, action_len, 1, device=device, dtype=torch.float32)
    if length:
        eased = min(blend, action_len - length)
        actions[:, :length] = committed
        actions[:, length:length + eased] = committed[:, -1:].float()
        weight[:, :length] = 1.0
        weight[:, length:length + eased, 0] = torch.arange(blend, blend - eased, -1, device=device) / (blend + 1)
    return ActionPrefix(actions, weight, weight == 1.0, length)


def committed_kwargs(config, prefix: Optional[ActionPrefix], rows: int) -> dict:
    """The forward's ``committed`` argument: the prefix's rows (repeated for guidance's ``rows``) for an
    ``action_prefix`` model given a prefix; nothing otherwise."""
    if prefix is None or not config.action_prefix:
        return {}
    return {"committed": prefix.known.repeat(rows, 1, 1)}


def set_committed(actions: torch.Tensor, prefix: ActionPrefix) -> torch.Tensor:
    """The action state (B, K, A) with its committed positions clean (what a prefix-reading model reads)."""
    return torch.where(prefix.known, prefix.actions, actions)


def guide(actions: torch.Tensor, prefix: ActionPrefix, noise: torch.Tensor, alpha: float, sigma: float,
          clean_committed: bool = False) -> torch.Tensor:
    """The action state (B, K, A) at noise level (alpha, sigma), guided: the committed positions replaced by
    the committed actions at that level (clean with ``clean_committed``), the blend positions moved toward
    the last committed action at that level by their weights. ``noise``: the chunk's initial action noise."""
    target = alpha * prefix.actions + sigma * noise
    guided = torch.where(prefix.known, prefix.actions if clean_committed else target,
                         torch.lerp(actions, target, prefix.weight))
    return guided
