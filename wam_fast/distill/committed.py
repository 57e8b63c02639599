"""Distillation rows with a committed action prefix: how a student learns to read ``committed`` rows
(``WAMConfig.action_prefix``) and continue them (``wam_fast.prefix``, real-time chunking)."""
from __future__ import annotations

import numbers
from typing import Dict, Optional

import torch

from wam_fast.configs import WAMConfig


class CommittedPrefix:
    """Training rows with a committed action prefix (``WAMConfig.action_prefix``, ``wam_fast.prefix``): a
    ``fraction`` of the rows get d ~ U{1..K-1} committed actions, the data's own, clean in the student's
    input and flagged; such a row learns the data's velocity (the teacher does not see the prefix) on
    everything but the committed actions: the chunk that continues them."""

    def __init__(self, config: WAMConfig, fraction: float):
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 <= fraction < 1.0:
            raise ValueError(f"prefix_fraction must be a fraction in [0, 1), got {fraction!r}")
        if fraction > 0 and not config.action_prefix:
            raise ValueError("prefix_fraction > 0 trains a student that reads committed actions: make it with "
                             "make_student(..., action_prefix=True)")
        if fraction > 0 and config.action_len < 2:
            raise ValueError(f"a committed prefix needs action_len >= 2, got {config.action_len}")
        self.config, self.fraction = config, float(fraction)

    def draw(self, rows: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        if not self.fraction:  # no draw: runs without a prefix keep the draws of earlier versions
            return {}
        has = torch.rand((rows,), generator=generator) < self.fraction
        length = torch.randint(1, self.config.action_len, (rows,), generator=generator)
        return {"prefix": torch.where(has, length, torch.zeros_like(length))}

    def committed(self, draws, device) -> Optional[torch.Tensor]:
        """(rows, K, 1) bool: the committed action rows of each training row; None without prefixes."""
        if "prefix" not in draws:
            return None
        positions = torch.arange(self.config.action_len)
        return (positions[None, :] < draws["prefix"][:, None])[..., None].to(device)

    def state_mask(self, committed: torch.Tensor) -> torch.Tensor:
        """The committed rows as a mask over the flat (rows, video + actions) state."""
        c = self.config
        video_size = c.noisy_frames * c.latent_channels * c.latent_height * c.latent_width
        video = torch.zeros((committed.shape[0], video_size), dtype=torch.bool, device=committed.device)
        return torch.cat((video, committed.expand(-1, -1, c.action_dim).flatten(1)), dim=1)

    def apply(self, schedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor, draws):
        """(the student's input, its target, committed (rows, K, 1) or None): on prefixed rows the committed
        actions are the data's, clean, and the target is the data's velocity."""
        committed = self.committed(draws, x_t.device)
        if committed is None:
            return x_t, target, None
        x_t = torch.where(self.state_mask(committed), x0, x_t)
        data = schedule.velocity_target(x0, draws["noise"].to(x0.device), t.to(x0.device))
        prefixed = (draws["prefix"] > 0).to(x0.device)[:, None]
        return x_t, torch.where(prefixed, data, target), committed

    def untrained_committed(self, out: torch.Tensor, target: torch.Tensor, committed) -> torch.Tensor:
        """``target`` with the committed positions set to the output: nothing to learn on them."""
        return target if committed is None else torch.where(self.state_mask(committed), out.detach(), target)
