"""Noise schedules and the training objective of the teacher (docs/design.md, Model anatomy and Distillation).

Both schedules write a noisy sample as ``x_t = alpha(t) * x0 + sigma(t) * noise``:

- ``DDPMSchedule`` (VideoVLA / CogVideoX): v-prediction, "scaled_linear" betas rescaled to zero
  terminal SNR, so ``alpha(T-1) == 0`` and the first sampling step sees pure noise.
- ``FlowMatchingSchedule``: ``alpha = 1 - s``, ``sigma = s`` with ``s = t / T``; the model predicts
  the velocity ``d x_t / d s = noise - x0``.

Timesteps are in model units: ``[0, num_train_timesteps)`` for DDPM (integers in training, any
float is interpolated), ``[0, num_train_timesteps]`` for flow matching.
"""
from __future__ import annotations

import abc
import numbers
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from wam_fast.configs import WAMConfig

Timesteps = Union[torch.Tensor, float, int]


def _as_tensor(t: Timesteps) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"timesteps must be a tensor or a number, got {type(t).__name__}")
    return torch.tensor(float(t))


def _expand(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) or () coefficients -> broadcastable against x (B, ...), in x's dtype and device."""
    coef = coef.to(device=x.device, dtype=x.dtype)
    return coef.reshape(coef.shape + (1,) * (x.dim() - coef.dim()))


class _Schedule(abc.ABC):
    """Shared algebra of ``x_t = alpha x0 + sigma noise``; subclasses define alpha_sigma and the target."""

    objective: str
    num_train_timesteps: int

    @abc.abstractmethod
    def alpha_sigma(self, t: Timesteps, dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
        """alpha(t), sigma(t) as tensors shaped like t."""

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: Timesteps) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t)
        return _expand(alpha, x0) * x0 + _expand(sigma, x0) * noise

    @abc.abstractmethod
    def sampling_timesteps(self, steps: int) -> List[float]:
        """The ``steps`` model timesteps a sampler evaluates, from the noisiest down."""

    @abc.abstractmethod
    def train_timesteps(self, batch: int, generator: Optional[torch.Generator] = None,
                        device=None) -> torch.Tensor:
        """One float32 timestep per sample, drawn uniformly over the training range."""

    def _check_steps(self, steps) -> None:
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
            raise TypeError(f"steps must be an int, got {type(steps).__name__} {steps!r}")
        if not 1 <= steps <= self.num_train_timesteps:
            raise ValueError(f"steps must be in [1, {self.num_train_timesteps}] "
                             f"(num_train_timesteps), got {steps}")


class DDPMSchedule(_Schedule):
    """v-prediction DDPM with CogVideoX's "scaled_linear" betas, rescaled to zero terminal SNR.

    Betas are ``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2``. The rescale (Lin et al.,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", 2024) shifts and scales
    ``sqrt(alpha_bar)`` so the last value is exactly 0 and the first is unchanged; without it the
    model never trains on pure noise, yet sampling starts from pure noise.
    """

    objective = "v_prediction"

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                 beta_end: float = 0.012, rescale_zero_snr: bool = True):
        self.num_train_timesteps = num_train_timesteps
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps,
                               dtype=torch.float64) ** 2
        alphas = torch.cumprod(1.0 - betas, dim=0).sqrt()  # sqrt(alpha_bar)
        if rescale_zero_snr:
            first, last = alphas[0].clone(), alphas[-1].clone()
            alphas = (alphas - last) * first / (first - last)
        # float64 tables; alpha_sigma hands out float32.
        self.alphas = alphas
        self.sigmas = (1.0 - alphas ** 2).clamp_min(0).sqrt()

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.alphas ** 2

    def alpha_sigma(self, t: Timesteps, dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
        """alpha = sqrt(alpha_bar(t)), sigma = sqrt(1 - alpha_bar(t)), float32, on t's device.

        Integer timesteps index the table; fractional ones interpolate alpha linearly between
        neighbours (sigma follows from alpha**2 + sigma**2 == 1). Samplers ask for float64
        coefficients (``dtype``).
        """
        t = _as_tensor(t)
        last = self.num_train_timesteps - 1
        tf = t.detach().to(torch.float64).cpu()
        if (tf < 0).any() or (tf > last).any():
            raise ValueError(f"DDPM timesteps must lie in [0, {last}], got "
                             f"{tf.min().item():g}..{tf.max().item():g}")
        low = tf.floor().long().clamp(max=last)
        high = (low + 1).clamp(max=last)
        frac = tf - low
        alpha = self.alphas[low] * (1 - frac) + self.alphas[high] * frac
        sigma = (1.0 - alpha ** 2).clamp_min(0).sqrt()
        return alpha.to(dtype).to(t.device), sigma.to(dtype).to(t.device)

    def velocity_target(self, x0: torch.Tensor, noise: torch.Tensor, t: Timesteps) -> torch.Tensor:
        """v = alpha * noise - sigma * x0 (Salimans & Ho 2022)."""
        alpha, sigma = self.alpha_sigma(t)
        return _expand(alpha, x0) * noise - _expand(sigma, x0) * x0

    target = velocity_target

    def to_x0_eps(self, x_t: torch.Tensor, model_out: torch.Tensor,
                  t: Timesteps) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x0, noise) from x_t and a v-prediction: x0 = alpha x_t - sigma v, eps = sigma x_t + alpha v."""
        alpha, sigma = self.alpha_sigma(t)
        return self.x0_eps_at(x_t, model_out, _expand(alpha, x_t), _expand(sigma, x_t))

    @staticmethod
    def x0_eps_at(x_t, model_out, alpha, sigma):
        """to_x0_eps with alpha, sigma given (python floats in samplers: no table lookup or copy per step)."""
        return alpha * x_t - sigma * model_out, sigma * x_t + alpha * model_out

    def sampling_timesteps(self, steps: int) -> List[float]:
        """"Trailing" spacing: round(T - i T / steps) - 1, so the first step is T - 1 (pure noise).

        Leading spacing would never visit the zero-SNR end the model was trained on.
        """
        self._check_steps(steps)
        T = self.num_train_timesteps
        return [float(round(T - i * T / steps) - 1) for i in range(int(steps))]

    def train_timesteps(self, batch: int, generator: Optional[torch.Generator] = None,
                        device=None) -> torch.Tensor:
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, self.num_train_timesteps, (batch,), generator=generator, device=gen_device)
        return t.float().to(device)


class FlowMatchingSchedule(_Schedule):
    """Rectified flow: x_t = (1 - s) x0 + s noise, s = t / T in [0, 1]; target noise - x0."""

    objective = "flow_matching"

    def __init__(self, num_train_timesteps: int = 1000):
        self.num_train_timesteps = num_train_timesteps

    def alpha_sigma(self, t: Timesteps, dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
        """alpha = 1 - s, sigma = s with s = t / T."""
        t = _as_tensor(t)
        s = t.to(dtype) / self.num_train_timesteps
        if (s < 0).any() or (s > 1).any():
            raise ValueError(f"flow-matching timesteps must lie in [0, {self.num_train_timesteps}], "
                             f"got {t.min().item():g}..{t.max().item():g}")
        return 1.0 - s, s

    def velocity_target(self, x0: torch.Tensor, noise: torch.Tensor, t: Timesteps = None) -> torch.Tensor:
        """d x_t / d s = noise - x0 (independent of t)."""
        return noise - x0

    target = velocity_target

    def to_x0_eps(self, x_t: torch.Tensor, model_out: torch.Tensor,
                  t: Timesteps) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x0, noise) from x_t and a velocity: x0 = x_t - s v, noise = x_t + (1 - s) v."""
        alpha, sigma = self.alpha_sigma(t)
        return self.x0_eps_at(x_t, model_out, _expand(alpha, x_t), _expand(sigma, x_t))

    @staticmethod
    def x0_eps_at(x_t, model_out, alpha, sigma):
        """to_x0_eps with alpha = 1 - s, sigma = s given (python floats in samplers)."""
        return x_t - sigma * model_out, x_t + alpha * model_out

    def sampling_timesteps(self, steps: int) -> List[float]:
        """Uniform in s from 1 (pure noise) down to 1/steps, in model units t = s T."""
        self._check_steps(steps)
        T = self.num_train_timesteps
        return [T * (1.0 - i / steps) for i in range(int(steps))]

    def train_timesteps(self, batch: int, generator: Optional[torch.Generator] = None,
                        device=None) -> torch.Tensor:
        gen_device = generator.device if generator is not None else device
        s = torch.rand((batch,), generator=generator, device=gen_device)
        return (s * self.num_train_timesteps).to(device)


Schedule = Union[DDPMSchedule, FlowMatchingSchedule]


def schedule_for(config: WAMConfig) -> Schedule:
    """The schedule of a model's training objective (``config.objective``)."""
    if config.objective == "v_prediction":
        return DDPMSchedule(config.num_train_timesteps)
    if config.objective == "flow_matching":
        return FlowMatchingSchedule(config.num_train_timesteps)
    raise ValueError(f"unknown objective {config.objective!r}; expected 'v_prediction' or 'flow_matching'")


def _randn_like(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Gaussian noise shaped like x, drawn on the generator's device (reproducible across devices)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device)


def diffusion_loss(model, video: torch.Tensor, text: torch.Tensor, actions: torch.Tensor,
                   image: Optional[torch.Tensor] = None, history: Optional[torch.Tensor] = None,
                   robot_id: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                   video_weight: float = 1.0, action_weight: float = 1.0,
                   cond_dropout: float = 0.0) -> torch.Tensor:
    """The teacher's denoising loss on one batch; returns a float32 scalar.

    One timestep per sample, shared by video and actions (VideoVLA), uniform over the training
    range; both are noised, and the loss is
    ``video_weight * MSE(video_out, target) + action_weight * MSE(action_out, target)`` with the
    schedule's target (v for v-prediction, noise - x0 for flow matching). ``cond_dropout`` zeroes
    the text of that fraction of samples so the model also learns the unconditional prediction
    classifier-free guidance needs. ``video`` holds the clean latents the model denoises
    (``config.noisy_frames`` frames); ``image``/``history`` are clean context passed through.
    All randomness comes from ``generator`` (the global RNG when None).
    """
    if not 0.0 <= cond_dropout <= 1.0:
        raise ValueError(f"cond_dropout must be a fraction in [0, 1], got {cond_dropout!r}")
    for name, x in (("video", video), ("text", text), ("actions", actions)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    schedule = schedule_for(model.config)
    batch = video.shape[0]
    t = schedule.train_timesteps(batch, generator, video.device)
    video_noise = _randn_like(video, generator)
    action_noise = _randn_like(actions, generator)
    # Noise in float32, then hand the model its own dtype.
    x0_video, x0_actions = video.float(), actions.float()
    noisy_video = schedule.add_noise(x0_video, video_noise, t).to(video.dtype)
    noisy_actions = schedule.add_noise(x0_actions, action_noise, t).to(actions.dtype)
    if cond_dropout > 0:
        gen_device = generator.device if generator is not None else text.device
        drop = torch.rand((batch,), generator=generator, device=gen_device).to(text.device) < cond_dropout
        text = torch.where(drop[:, None, None], torch.zeros_like(text), text)
    video_out, action_out = model(noisy_video, text, noisy_actions, t, image=image, history=history,
                                  robot_id=robot_id)
    video_loss = F.mse_loss(video_out.float(), schedule.target(x0_video, video_noise, t))
    action_loss = F.mse_loss(action_out.float(), schedule.target(x0_actions, action_noise, t))
    return video_weight * video_loss + action_weight * action_loss
