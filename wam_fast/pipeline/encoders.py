"""Frame encoders: one camera frame per control step -> the clean image latent a WAM reads.

Every encoder takes pixels (B, 3, H, W) as floats in [-1, 1] (``pixels_from_images`` makes them, in one
place) and returns latents (B, C, h, w). An encoder is found by name in ``FRAME_ENCODERS`` when a saved
pipeline is loaded; a higher layer registers its own (``wam_fast.eval.pipeline_encoders`` registers
the Meta-World autoencoder) and names the module that registers it, which the loader imports.
"""
from __future__ import annotations

import abc
import json
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch

from wam_fast.utils.files import atomic_write
from wam_fast.utils.optional import missing_reason

FRAME_ENCODERS: Dict[str, type] = {}  # registry name -> encoder class (with classmethod ``load``)


def register_frame_encoder(cls: type) -> type:
    """Class decorator: ``cls.name`` becomes loadable by ``WAMPipeline.from_pretrained``."""
    FRAME_ENCODERS[cls.name] = cls
    return cls


def require(package: str) -> None:
    """Raise ImportError with the install line when the optional ``package`` is missing."""
    reason = missing_reason(package)
    if reason is not None:
        raise ImportError(reason)


def write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def pixels_from_images(images: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """Checked images (B, H, W, 3), uint8 or float in [0, 255] -> (B, 3, H, W) in [-1, 1], ``dtype``."""
    pixels = images.to(device=device).movedim(-1, -3).float() / 127.5 - 1.0
    return pixels.to(dtype).contiguous()


def images_from_pixels(pixels: torch.Tensor) -> np.ndarray:
    """Inverse of ``pixels_from_images`` (clamped): (..., 3, H, W) in [-1, 1] -> (..., H, W, 3) uint8."""
    return ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(-3, -1).cpu().numpy()


class FrameEncoder(abc.ABC):
    """Base of the frame encoders: ``name`` (registry key), ``image_size`` (H, W), ``latent_shape``
    (C, h, w), ``encode(pixels)``, ``save(directory)`` and ``load(directory, device, dtype)``."""

    name = ""
    module = "wam_fast.pipeline.encoders"  # the module whose import registers the class
    image_size: Tuple[int, int]

    @abc.abstractmethod
    def latent_shape(self) -> Tuple[int, int, int]:
        """(C, h, w) of one frame's latent."""

    @abc.abstractmethod
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels in [-1, 1] -> (B, 1, C, h, w) latents."""

    def to(self, device=None, dtype=None) -> "FrameEncoder":
        return self

    @abc.abstractmethod
    def save(self, directory: Path) -> None:
        """Write the encoder into ``directory`` (safetensors + JSON)."""


@register_frame_encoder
class PixelsEncoder(FrameEncoder):
    """The identity: a pixel-patch WAM (Meta-World drawer-open) reads the pixels themselves."""

    name = "pixels"

    def __init__(self, image_size: Tuple[int, int]):
        self.image_size = (int(image_size[0]), int(image_size[1]))

    def latent_shape(self):
        return (3, *self.image_size)

    def encode(self, pixels):
        return pixels

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(B, F, 3, H, W) predicted pixels -> (B, F, H, W, 3) uint8 frames (the optional video decode)."""
        return images_from_pixels(latents)

    def save(self, directory):
        write_json(Path(directory) / "config.json", {"image_size": list(self.image_size)})

    @classmethod
    def load(cls, directory, device=None, dtype=None):
        return cls(json.loads((Path(directory) / "config.json").read_text())["image_size"])


@register_frame_encoder
class CogVideoXEncoder(FrameEncoder):
    """diffusers' AutoencoderKLCogVideoX: the frame as a 1-frame video; the latent is the posterior's
    MEAN (deterministic: the same frame gives the same latent) times the VAE's scaling_factor."""

    name = "cogvideox"

    def __init__(self, vae, image_size: Tuple[int, int]):
        require("diffusers")
        self.vae = vae.eval().requires_grad_(False)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        factor = self.spatial_factor()
        if self.image_size[0] % factor or self.image_size[1] % factor:
            raise ValueError(f"CogVideoXEncoder: image_size must be a multiple of the VAE's spatial factor "
                             f"{factor}, got {self.image_size}")

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def spatial_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self):
        factor = self.spatial_factor()
        return (self.vae.config.latent_channels, self.image_size[0] // factor, self.image_size[1] // factor)

    @torch.no_grad()
    def encode(self, pixels):
        posterior = self.vae.encode(pixels[:, :, None]).latent_dist  # (B, 3, 1, H, W): one frame
        return (posterior.mean * self.vae.config.scaling_factor)[:, :, 0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(B, F, C, h, w) latents -> (B, F', H, W, 3) uint8 frames (the optional video decode)."""
        video = self.vae.decode(latents.movedim(1, 2).to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return images_from_pixels(video.movedim(1, 2))

    def to(self, device=None, dtype=None):
        self.vae.to(device=device, dtype=dtype)
        return self

    def save(self, directory):
        self.vae.save_pretrained(str(directory), safe_serialization=True)
        write_json(Path(directory) / "frame_encoder.json", {"image_size": list(self.image_size)})

    @classmethod
    def load(cls, directory, device=None, dtype=None):
        require("diffusers")
        from diffusers import AutoencoderKLCogVideoX

        vae = AutoencoderKLCogVideoX.from_pretrained(str(directory), torch_dtype=dtype)
        image_size = json.loads((Path(directory) / "frame_encoder.json").read_text())["image_size"]
        return cls(vae.to(device), image_size)
