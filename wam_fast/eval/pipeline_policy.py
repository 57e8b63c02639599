"""The Meta-World harness's policies are ``WAMPipeline`` sessions: one path from pixels to actions.

``AutoencoderFrameEncoder`` registers the frozen Meta-World autoencoder as the pipeline frame encoder
"metaworld-autoencoder" (push-v3's WAMs read its latents); a pixel-patch WAM (drawer-open) gets the
"pixels" encoder. The instruction is the task's fixed embedding (``mw.instruction_embedding``).
``PipelinePolicy`` gives a session the interface ``rollout.run_episodes`` drives: ``reset(text)`` and
``act(images uint8 (B, H, W, 3)) -> .actions``.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch

from wam_fast.eval import autoencoder as frame_autoencoder
from wam_fast.eval import metaworld as mw
from wam_fast.pipeline import FixedTextEncoder, FrameEncoder, PixelsEncoder, WAMPipeline, register_frame_encoder
from wam_fast.pipeline.encoders import images_from_pixels
from wam_fast.utils.files import atomic_write


@register_frame_encoder
class AutoencoderFrameEncoder(FrameEncoder):
    """The frozen ``FrameAutoencoder``: pixels (B, 3, S, S) -> normalised latents (B, channels, S/8, S/8)."""

    name = "metaworld-autoencoder"
    module = "wam_fast.eval.pipeline_policy"

    def __init__(self, model: frame_autoencoder.FrameAutoencoder):
        self.model = model.eval().requires_grad_(False)
        self.image_size = (model.config.image_size, model.config.image_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.coordinates.dtype

    def latent_shape(self):
        cells = self.model.config.image_size // frame_autoencoder.DOWNSAMPLE
        return (self.model.config.channels, cells, cells)

    @torch.no_grad()
    def encode(self, pixels):
        return self.model.encode(pixels)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(B, F, channels, h, w) predicted latents -> (B, F, S, S, 3) uint8 frames (the video decode)."""
        pixels = self.model.decode(latents.flatten(0, 1).to(self.dtype))
        return images_from_pixels(pixels.unflatten(0, latents.shape[:2]))

    def to(self, device=None, dtype=None):
        self.model.to(device=device)  # the autoencoder runs in float32 whatever the WAM's dtype
        return self

    def save(self, directory):
        from safetensors.torch import save_file

        tensors = {k: v.contiguous() for k, v in self.model.state_dict().items()}
        atomic_write(Path(directory) / "model.safetensors", lambda tmp: save_file(tensors, tmp))
        text = json.dumps(self.model.config.to_dict(), indent=2, sort_keys=True) + "\n"
        atomic_write(Path(directory) / "config.json", lambda tmp: Path(tmp).write_text(text))

    @classmethod
    def load(cls, directory, device=None, dtype=None):
        return cls(frame_autoencoder.load_autoencoder(Path(directory))).to(device)


def build_pipeline(model, task: str, autoencoder: Optional[Path] = None, **options) -> WAMPipeline:
    """A pipeline for a Meta-World WAM: its frame encoder (the autoencoder, or pixels) and the task's
    fixed instruction embedding, keyed by the task name."""
    config = model.config
    if autoencoder is not None:
        encoder = AutoencoderFrameEncoder(frame_autoencoder.load_autoencoder(autoencoder))
    else:
        encoder = PixelsEncoder((config.latent_height, config.latent_width))
    text = mw.instruction_embedding(task, config.text_len, config.text_dim)
    return WAMPipeline(model, encoder, FixedTextEncoder({task: text}), **options)


class PipelinePolicy:
    """``reset(text)`` / ``act(images) -> .actions`` over a pipeline session; other attributes (sampler,
    steps, cache, config, model, ...) are the session's WAMPolicy's."""

    def __init__(self, pipeline: WAMPipeline, task: str, seed: Optional[int] = None):
        self.pipeline, self.task = pipeline, task
        self.session = pipeline.new_session(seed)

    def __getattr__(self, name):
        return getattr(self.__dict__["session"].policy, name)

    def reset(self, text: torch.Tensor) -> None:
        """A new episode of ``text.shape[0]`` rows; ``text`` must be the task's embedding on every row."""
        expected = self.pipeline.text_embedding(self.task)
        if not isinstance(text, torch.Tensor) or text.dim() != 3 or \
                not torch.equal(text.to(expected.dtype), expected.expand_as(text)):
            got = tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__
            raise ValueError(f"PipelinePolicy for {self.task!r} runs its task's instruction embedding "
                             f"(text_len, text_dim) on every row; got another text {got}")
        self.session.reset()

    def act(self, images, prefix=None) -> SimpleNamespace:
        """uint8 RGB (B, H, W, 3) -> SimpleNamespace(actions=(B, K, A) float32 tensor). ``prefix``: (B, d, A)
        committed actions (real-time chunking, ``wam_fast.realtime``)."""
        return SimpleNamespace(actions=torch.from_numpy(self.session.act_batch(images, self.task, prefix)))
