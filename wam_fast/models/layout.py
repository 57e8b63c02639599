"""Segment layout: how the N tokens of one sample-forward split into consecutive segments.

Each segment has a length, a modulation set (0 = text set, 1 = video set; actions use the video
set), an attention group (for ``mask="temporal"`` a query of group i sees keys of groups <= i) and
whether it carries the denoising timestep (noisy) or timestep 0 (clean context).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

TEXT_SET, VIDEO_SET = 0, 1


@dataclass(frozen=True)
class SegmentLayout:
    names: Tuple[str, ...]
    lengths: Tuple[int, ...]
    mod_set: Tuple[int, ...]
    groups: Tuple[int, ...]
    noisy: Tuple[bool, ...]
    mask: str  # "full" | "temporal"
    frame_positions: Tuple[int, ...]  # RoPE frame index of each video frame, in token order
    tokens_per_frame: int

    @property
    def num_segments(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    def start(self, name: str) -> int:
        index = self.names.index(name)
        return sum(self.lengths[:index])

    def span(self, name: str) -> Tuple[int, int]:
        start = self.start(name)
        return start, start + self.lengths[self.names.index(name)]

    def index(self, name: str) -> int:
        return self.names.index(name)

    @property
    def video_span(self) -> Tuple[int, int]:
        """[start, end) of all video tokens (history, current and noisy frames): the RoPE slice."""
        start = sum(n for n, name in zip(self.lengths, self.names) if name == "text")
        return start, start + len(self.frame_positions) * self.tokens_per_frame

    def token_segments(self, device=None) -> torch.Tensor:
        """(N,) segment index of every token."""
        # built on the CPU explicitly: under a torch.device("meta") context the default would be meta
        cpu = torch.device("cpu")
        return torch.repeat_interleave(torch.arange(self.num_segments, device=cpu),
                                       torch.tensor(self.lengths, device=cpu)).to(device)

    def token_groups(self, device=None) -> torch.Tensor:
        """(N,) attention group of every token (what the temporal mask compares)."""
        return torch.tensor(self.groups, device="cpu")[self.token_segments("cpu")].to(device)

    def segment_timesteps(self, timestep: torch.Tensor) -> torch.Tensor:
        """(B,) denoising timestep -> (B, S): noisy segments get it, clean context gets 0."""
        noisy = torch.tensor(self.noisy, device=timestep.device)
        return torch.where(noisy, timestep[:, None], torch.zeros_like(timestep)[:, None])


def build_layout(config, num_history: int = 0, has_image: bool = True) -> SegmentLayout:
    """The layout of one forward of a model with ``config``.

    full:     text | video (all frames, noisy) | actions          groups 0 | 1 | 1
              (the image is concatenated channel-wise, zeros without one: ``has_image`` is moot)
    temporal: text | history | current | video (future) | actions  groups 0 | 1 | 2 | 3 | 3
    RoPE frame positions count from the oldest history slot: the current frame sits at
    ``config.history_frames`` whatever the number of history frames present, so a frame keeps its
    position relative to the current one (history frame i steps back is at history_frames - i).
    """
    if config.mask == "full" and num_history:
        raise ValueError(f"history frames need mask='temporal'; the full (VideoVLA) layout has none, "
                         f"got num_history={num_history}")
    if not 0 <= num_history <= config.history_frames:
        raise ValueError(f"num_history must be in [0, {config.history_frames}] (config.history_frames), "
                         f"got {num_history}")
    tpf = config.tokens_per_frame
    if config.mask == "full":
        frames = config.latent_frames
        return SegmentLayout(
            names=("text", "video", "actions"),
            lengths=(config.text_len, frames * tpf, config.action_len),
            mod_set=(TEXT_SET, VIDEO_SET, VIDEO_SET), groups=(0, 1, 1),
            noisy=(True, True, True), mask="full",
            frame_positions=tuple(range(frames)), tokens_per_frame=tpf)

    current = config.history_frames
    names, lengths, mod_set, noisy, positions = ["text"], [config.text_len], [TEXT_SET], [False], []
    if num_history:
        names.append("history")
        lengths.append(num_history * tpf)
        mod_set.append(VIDEO_SET)
        noisy.append(False)
        positions += list(range(current - num_history, current))
    if has_image:
        names.append("current")
        lengths.append(tpf)
        mod_set.append(VIDEO_SET)
        noisy.append(False)
        positions.append(current)
    future = config.latent_frames - 1
    names += ["video", "actions"]
    lengths += [future * tpf, config.action_len]
    mod_set += [VIDEO_SET, VIDEO_SET]
    noisy += [True, True]
    positions += list(range(current + 1, current + 1 + future))
    groups = tuple(range(len(names) - 1)) + (len(names) - 2,)  # actions share the video's group
    return SegmentLayout(names=tuple(names), lengths=tuple(lengths), mod_set=tuple(mod_set),
                         groups=groups, noisy=tuple(noisy), mask="temporal",
                         frame_positions=tuple(positions), tokens_per_frame=tpf)
