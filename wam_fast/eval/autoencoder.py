"""A small frozen autoencoder: the latent space of a Meta-World teacher that must read a few pixels.

The issue allows pixel patches or a small frozen autoencoder. On push-v3 a teacher over 16x16 pixel
patches reads the puck's 3x3 pixels only as a regressor that memorises the 50 training layouts
(benchmarks/results/metaworld-push-v3-teacher-attempts.json), while a plain conv net generalises. So:

* ``FrameAutoencoder``: 64x64 RGB pixel latents in [-1, 1] (plus two channels holding each pixel's row
  and column) -> stride-2 convs -> ``(channels, 8, 8)``; transposed convs back to pixels.
* ``AutoencoderObjective``: reconstruction (weighted ``foreground_weight`` x where a pixel differs from
  the mean training frame: the arm, the puck, the goal) + ``action_weight`` x the MSE of an action-chunk
  head that reads the latent through a mean over its cells. The mean makes every cell carry where things
  are (absolute position, from the coordinate channels), which the WAM's tokens need: its RoPE reaches
  queries and keys, not the values attention reads.
* ``train_autoencoder``: ``wam_fast.distill.trainer.train`` on the pixel demos (atomic checkpoints,
  exact resume), then frozen: per-channel latent mean and std measured on the demos are stored with it,
  so ``encode`` returns normalised latents.
* ``encode_demos``: the pixel demos dataset -> the same samples in the latent space (what the teacher
  and ``python -m wam_fast.distill`` train on).
* The harness's policies encode frames with it through ``wam_fast.WAMPipeline``
  (``wam_fast.eval.pipeline_policy``: the frame encoder "metaworld-autoencoder"), so the encoder's time
  counts in the per-chunk latency.
"""
from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict

import torch
from torch import nn

from wam_fast.utils.files import atomic_write
from wam_fast.distill import trainer
from wam_fast.distill.data import DatasetWriter, LatentDataset

DOWNSAMPLE = 8  # three stride-2 convs: 64x64 pixels -> 8x8 latent cells


@dataclass(frozen=True)
class AutoencoderConfig:
    channels: int = 16
    width: int = 32
    image_size: int = 64
    action_len: int = 8
    action_dim: int = 4

    def __post_init__(self):
        for name in ("channels", "width", "image_size", "action_len", "action_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"AutoencoderConfig.{name} must be a positive int, got {value!r}")
        if self.image_size % DOWNSAMPLE:
            raise ValueError(f"AutoencoderConfig.image_size must be a multiple of {DOWNSAMPLE}, got {self.image_size}")
        if self.width % 8:
            raise ValueError(f"AutoencoderConfig.width must be a multiple of 8 (GroupNorm groups), got {self.width}")

    def to_dict(self) -> dict:
        return asdict(self)


def _conv_block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.GELU())


class FrameAutoencoder(nn.Module):
    """Pixel latents (B, 3, S, S) <-> latents (B, channels, S/8, S/8); ``forward`` is the training pass."""

    def __init__(self, config: AutoencoderConfig = AutoencoderConfig()):
        super().__init__()
        if not isinstance(config, AutoencoderConfig):
            raise TypeError(f"FrameAutoencoder expects an AutoencoderConfig, got {type(config).__name__}")
        self.config = config
        c, w = config.channels, config.width
        self.encoder = nn.Sequential(_conv_block(5, w, 2), _conv_block(w, 2 * w, 2), _conv_block(2 * w, 2 * w, 1),
                                     _conv_block(2 * w, 2 * w, 2), _conv_block(2 * w, 2 * w, 1), nn.Conv2d(2 * w, c, 1))
        self.decoder = nn.Sequential(nn.Conv2d(c, 2 * w, 3, 1, 1), nn.GELU(),
                                     nn.ConvTranspose2d(2 * w, 2 * w, 4, 2, 1), nn.GELU(),
                                     nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.GELU(),
                                     nn.ConvTranspose2d(w, 3, 4, 2, 1))
        self.action_cells = nn.Sequential(nn.Conv2d(c, 128, 1), nn.GELU(), nn.Conv2d(128, 128, 1))
        self.action_head = nn.Sequential(nn.GELU(), nn.Linear(128, 256), nn.GELU(),
                                         nn.Linear(256, config.action_len * config.action_dim))
        rows, cols = torch.meshgrid(torch.linspace(-1, 1, config.image_size), torch.linspace(-1, 1, config.image_size),
                                    indexing="ij")
        self.register_buffer("coordinates", torch.stack([rows, cols])[None], persistent=False)
        # Set when frozen (train_autoencoder): encode() returns (raw - mean) / std per channel.
        self.register_buffer("latent_mean", torch.zeros(1, c, 1, 1))
        self.register_buffer("latent_std", torch.ones(1, c, 1, 1))

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        size = self.config.image_size
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"FrameAutoencoder expects pixel latents (B, 3, {size}, {size}) in [-1, 1], got "
                             f"{tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__}")

    def raw_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        self._check_pixels(pixels)
        pixels = pixels.to(self.coordinates.dtype)
        return self.encoder(torch.cat([pixels, self.coordinates.expand(len(pixels), -1, -1, -1)], 1))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixel latents -> (B, channels, S/8, S/8) normalised latents."""
        return (self.raw_latents(pixels) - self.latent_mean) / self.latent_std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> (B, 3, S, S) pixel latents (not clamped)."""
        return self.decoder(latents * self.latent_std + self.latent_mean)

    def forward(self, pixels: torch.Tensor):
        """The training pass: (reconstruction, action chunk (B, action_len, action_dim))."""
        raw = self.raw_latents(pixels)
        actions = self.action_head(self.action_cells(raw).mean((2, 3)))
        return self.decoder(raw), actions.reshape(len(pixels), self.config.action_len, self.config.action_dim)


class AutoencoderObjective:
    """Foreground-weighted reconstruction + ``action_weight`` x action-chunk MSE of the current frame
    (``wam_fast.distill.trainer``'s objective interface; nothing random, so ``draw`` is empty)."""

    def __init__(self, mean_frame: torch.Tensor, action_weight: float = 1.0, foreground_weight: float = 20.0,
                 foreground_threshold: float = 0.1):
        if not isinstance(mean_frame, torch.Tensor) or mean_frame.dim() != 3 or mean_frame.shape[0] != 3:
            raise ValueError(f"mean_frame must be a (3, H, W) pixel latent, got "
                             f"{tuple(mean_frame.shape) if isinstance(mean_frame, torch.Tensor) else mean_frame!r}")
        for name, value in (("action_weight", action_weight), ("foreground_weight", foreground_weight)):
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        self.mean_frame = mean_frame.float()
        self.action_weight, self.foreground_weight = float(action_weight), float(foreground_weight)
        self.foreground_threshold = float(foreground_threshold)

    def draw(self, rows: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        return {}

    def loss(self, student, ema, batch, draws):
        pixels, actions = batch["image"][:, 0].float(), batch["actions"].float()
        reconstruction, predicted = student(pixels)
        foreground = (pixels - self.mean_frame.to(pixels.device)).abs().amax(1, keepdim=True) > self.foreground_threshold
        weight = 1.0 + self.foreground_weight * foreground.float()
        reconstruction_mse = (weight * (reconstruction - pixels) ** 2).mean()
        action_mse = ((predicted - actions) ** 2).mean()
        return reconstruction_mse + self.action_weight * action_mse, {"loss_reconstruction": reconstruction_mse.detach(),
                                                                      "loss_actions": action_mse.detach()}


def _in_blocks(dataset, rows: int = 1024):
    """Every sample of ``dataset``, in blocks of ``rows`` (dicts of the stored tensors)."""
    for start in range(0, len(dataset), rows):
        yield dataset.get(torch.arange(start, min(start + rows, len(dataset))))


def train_autoencoder(demos: Path, directory: Path, train_config, *, channels: int = 16, width: int = 32,
                      action_weight: float = 1.0) -> Path:
    """Train (or resume) the autoencoder on the pixel demos in ``directory``, freeze it with the latent
    statistics of the demos and save it to ``directory/frozen`` (returned)."""
    from safetensors.torch import save_file

    dataset = LatentDataset(demos)
    sample = dataset.get(torch.tensor([0]))
    if "actions" not in sample or sample["image"].shape[-3] != 3:
        raise ValueError(f"train_autoencoder needs pixel demos with actions (image (1, 3, H, W)), got fields "
                         f"{ {k: tuple(v.shape[1:]) for k, v in sample.items()} } in {demos}")
    config = AutoencoderConfig(channels=channels, width=width, image_size=sample["image"].shape[-1],
                               action_len=sample["actions"].shape[1], action_dim=sample["actions"].shape[2])
    mean_frame = torch.zeros(3, config.image_size, config.image_size)
    for block in _in_blocks(dataset):
        mean_frame += block["image"][:, 0].float().sum(0)
    mean_frame /= len(dataset)
    torch.manual_seed(train_config.seed)
    model = FrameAutoencoder(config)
    result = trainer.train(model, AutoencoderObjective(mean_frame, action_weight=action_weight), dataset, train_config,
                           directory)
    frozen = load_autoencoder(result.final, normalised=False)
    with torch.no_grad():
        latents = torch.cat([frozen.raw_latents(block["image"][:, 0].float()) for block in _in_blocks(dataset)])
    frozen.latent_mean.copy_(latents.mean((0, 2, 3), keepdim=True))
    frozen.latent_std.copy_(latents.std((0, 2, 3), keepdim=True).clamp_min(1e-6))
    out = directory / "frozen"
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in frozen.state_dict().items()}
    atomic_write(out / "model.safetensors", lambda tmp: save_file(tensors, tmp))
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
    atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(text))  # last: marks it complete
    return out


def load_autoencoder(directory: Path, normalised: bool = True) -> FrameAutoencoder:
    """A saved autoencoder (``train_autoencoder``'s ``frozen`` directory, or a trainer ``final``), eval mode,
    no gradients. ``normalised=False`` accepts weights saved before the latent statistics were set."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
        raise FileNotFoundError(f"no autoencoder at {directory}: expected config.json and model.safetensors "
                                f"(written by wam_fast.eval.autoencoder.train_autoencoder)")
    model = FrameAutoencoder(AutoencoderConfig(**json.loads((directory / "config.json").read_text())))
    state = load_file(str(directory / "model.safetensors"))
    if not normalised:
        state = {k: v for k, v in state.items() if k not in ("latent_mean", "latent_std")}
    model.load_state_dict(state, strict=normalised)
    model.eval().requires_grad_(False)
    return model


def encode_demos(autoencoder: FrameAutoencoder, demos: Path, directory: Path) -> Path:
    """The pixel demos with ``image``, ``future`` and ``history`` frames encoded (the rest copied)."""
    dataset = LatentDataset(demos)
    metadata = dict(dataset.metadata, latent_space={"kind": "autoencoder", "config": autoencoder.config.to_dict()})
    writer = DatasetWriter(directory, overwrite=True)
    try:
        with torch.no_grad():
            for block in _in_blocks(dataset):
                for name in ("image", "future", "history"):
                    if name in block:
                        frames = block[name].float()
                        encoded = autoencoder.encode(frames.flatten(0, 1))
                        block[name] = encoded.reshape(*frames.shape[:2], *encoded.shape[1:])
                writer.add(block)
    except BaseException:
        writer.abort()
        raise
    return writer.close(metadata)
