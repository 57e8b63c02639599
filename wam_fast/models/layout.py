"""Segment layout: how the N tokens of one sample-forward split into consecutive segments.

Each segment has a length, a modulation set (0 = text set, 1 = video set; actions use the video
set) and whether it carries the denoising timestep (noisy) or timestep 0 (clean context).

Who sees whom (``attention_mask``; docs/design.md, KV cache):
- ``mask="full"`` (VideoVLA): every token sees every token.
- ``mask="temporal"``: text sees text; each clean frame (a history frame or the current frame) sees
  the text and itself; the noisy tokens (future video + actions) see everything. A clean frame never
  sees another frame, so its K/V depend only on the text and the frame itself: they are the same
  whether it is the current frame or an old history frame, and whatever else is in the window.
  That is what makes a rolling KV cache exact (``wam_fast.cache``).

RoPE time positions (temporal): the current frame sits at ``P = config.history_frames``, a history
frame ``a`` control steps old at ``P - a``, future frame ``j`` at ``P + j``: the noisy tokens see
every frame at its age. A clean frame's own attention (its queries and the keys it sees of itself)
is computed at ``P`` whatever its age: a frame is encoded once, as the current frame, and the keys
the noisy tokens see of a history frame are that encoding rotated back by its age on the time axis
(``history_key_shifts``). Text carries no RoPE, so text-video scores depend on absolute positions;
keeping every position in [0, P + F) at every control step is what keeps the model's behaviour the
same at control step 1000 as at step 1.
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
    noisy: Tuple[bool, ...]
    mask: str  # "full" | "temporal"
    frame_positions: Tuple[int, ...]  # RoPE time position of each video frame as the noisy tokens see it
    tokens_per_frame: int
    current_position: int = 0  # temporal: P, the position at which every clean frame is encoded

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

    @property
    def text_len(self) -> int:
        return sum(n for n, name in zip(self.lengths, self.names) if name == "text")

    @property
    def clean_frames(self) -> int:
        """Clean video frames (history + current), each its own attention group under mask="temporal"."""
        clean = sum(n for n, name, noisy in zip(self.lengths, self.names, self.noisy)
                    if not noisy and name != "text")
        return clean // self.tokens_per_frame

    @property
    def context_len(self) -> int:
        """Tokens before the noisy ones: text + clean frames (the part a KV cache holds)."""
        return self.text_len + self.clean_frames * self.tokens_per_frame

    @property
    def rope_positions(self) -> Tuple[int, ...]:
        """Time position of each video frame in the forward's own RoPE: clean frames at P (encoded
        as the current frame), noisy frames where the noisy tokens are."""
        clean = self.clean_frames
        return (self.current_position,) * clean + self.frame_positions[clean:]

    @property
    def history_key_shifts(self) -> Tuple[int, ...]:
        """Per clean frame: position seen by the noisy tokens minus P (minus its age; 0 for the current frame)."""
        return tuple(p - self.current_position for p in self.frame_positions[:self.clean_frames])

    def token_segments(self, device=None) -> torch.Tensor:
        """(N,) segment index of every token."""
        # built on the CPU explicitly: under a torch.device("meta") context the default would be meta
        cpu = torch.device("cpu")
        return torch.repeat_interleave(torch.arange(self.num_segments, device=cpu),
                                       torch.tensor(self.lengths, device=cpu)).to(device)

    def attention_mask(self, device=None) -> torch.Tensor:
        """(N, N) boolean, True where query token i sees key token j (the rule in the module docstring).

        The model never builds it (it runs the rule as a few unmasked attention calls); tests and
        readers check the rule against it."""
        n = self.num_tokens
        if self.mask == "full":
            return torch.ones(n, n, dtype=torch.bool, device=device)
        text, tpf, context = self.text_len, self.tokens_per_frame, self.context_len
        owner = torch.zeros(n, dtype=torch.long)  # 0 text, f + 1 clean frame f, -1 noisy
        owner[text:context] = torch.arange(self.clean_frames).repeat_interleave(tpf) + 1
        owner[context:] = -1
        sees = (owner[:, None] == owner[None, :]) | (owner[None, :] == 0) | (owner[:, None] == -1)
        return sees.to(device)

    def segment_timesteps(self, timestep: torch.Tensor) -> torch.Tensor:
        """(B,) denoising timestep -> (B, S): noisy segments get it, clean context gets 0."""
        zeros = torch.zeros_like(timestep)  # no tensor from Python data: no host-to-device copy
        return torch.stack([timestep if noisy else zeros for noisy in self.noisy], dim=1)


def noisy_segments(config):
    """(names, lengths, RoPE time positions of the future frames) of a temporal model's noisy segments:
    video (the ``config.noisy_frames`` future frames, none for an action-only model) then actions."""
    future, tpf, current = config.noisy_frames, config.tokens_per_frame, config.history_frames
    names, lengths = (["video"], [future * tpf]) if future else ([], [])
    return names + ["actions"], lengths + [config.action_len], list(range(current + 1, current + 1 + future))


def build_layout(config, num_history: int = 0, has_image: bool = True) -> SegmentLayout:
    """The layout of one forward of a model with ``config``.

    full:     text | video (all frames, noisy) | actions
              (the image is concatenated channel-wise, zeros without one: ``has_image`` is moot)
    temporal: text | history (oldest first) | current | video (future frames) | actions
              (no video segment for an action-only model, config.future_frames == 0)
    RoPE positions (module docstring): the current frame at P = ``config.history_frames`` whatever
    the number of history frames present, history frame i steps back at P - i, futures at P + j.
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
            mod_set=(TEXT_SET, VIDEO_SET, VIDEO_SET),
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
    noisy_names, noisy_lengths, future_positions = noisy_segments(config)
    names += noisy_names
    lengths += noisy_lengths
    mod_set += [VIDEO_SET] * len(noisy_names)
    noisy += [True] * len(noisy_names)
    positions += future_positions
    return SegmentLayout(names=tuple(names), lengths=tuple(lengths), mod_set=tuple(mod_set),
                         noisy=tuple(noisy), mask="temporal", frame_positions=tuple(positions),
                         tokens_per_frame=tpf, current_position=current)
