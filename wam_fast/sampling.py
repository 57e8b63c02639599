"""Samplers, classifier-free guidance and ``sample()``: noise -> action chunk (+ video latents).

A sampler walks a fixed grid of ``steps`` model timesteps from pure noise to clean data. Each
step is one model evaluation (a "sample-forward"; with guidance the cond and uncond rows ride in
the same batched forward and count as two). Samplers work on a float32 state that holds the
video latents and the actions flattened side by side, so one set of scalar coefficients per step
serves both modalities (they share the timestep, as in VideoVLA).

Registry ``SAMPLERS`` (name -> class):

=============  ===============  =============================================================
name           objective        what
=============  ===============  =============================================================
ddim           v_prediction     DDIM, eta 0, last step to alpha 1 (returns the x0 prediction)
dpm++2m        v_prediction     DPM-Solver++(2M): data prediction, multistep, 2nd order
dpm++2m-sde    v_prediction     stochastic DPM-Solver++(2M) SDE (VideoVLA's released sampler)
euler          flow_matching    Euler on the flow ODE from s = 1 to s = 0
consistency    both             multistep consistency sampling (LCM): x0 prediction, re-noised
                                with fresh noise to the next level; the last step returns x0
=============  ===============  =============================================================

Distilled students (``config.distillation``, docs/design.md, Distillation) carry their own defaults
(``default_options``): a shortcut student samples with ddim (v_prediction) or euler (flow_matching)
at one of its ``distilled_steps``, and every forward gets ``step_size = num_train_timesteps / steps``
(the length of the step its output is used for); a consistency student samples with "consistency".
Both have classifier-free guidance baked in, so they refuse a guidance scale other than 1.
"""
from __future__ import annotations

import abc
import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Type

import torch

from wam_fast.models.validation import check_robot_id, check_values, inputs_checked
from wam_fast.prefix import ActionPrefix, committed_kwargs, guide, make_prefix, set_committed
from wam_fast.schedules import Schedule, schedule_for

CFG_SCHEDULES = ("constant", "dynamic")
MAX_SEED = 2 ** 64 - 1  # torch generators take a 64-bit unsigned seed


@dataclass
class ActionChunk:
    """What ``sample`` returns.

    actions  (B, K, A) float32 action chunk
    video    (B, F, C, H, W) float32 predicted video latents (``return_video=True``), else None; always
             None for an action-only model (``config.future_frames == 0``: it predicts no video), and the
             first ``future_frames`` future frames for a model with ``future_frames`` set
    sampler, steps  what produced it
    nfe      sample-forwards spent: steps, times 2 when guidance batched cond + uncond rows
    """

    actions: torch.Tensor
    video: Optional[torch.Tensor]
    sampler: str
    steps: int
    nfe: int


# ---- samplers -------------------------------------------------------------------------------------
class Sampler(abc.ABC):
    """A fixed-grid sampler: evaluate the model at ``timesteps[i]``, then ``x = step(i, x, out)``.

    ``alphas``/``sigmas`` (python floats, float64) hold the noise level at each evaluated timestep
    plus the end point (alpha 1, sigma 0: clean data), so ``len(alphas) == steps + 1``.
    """

    name: str = ""
    objectives: Tuple[str, ...] = ()

    def __init__(self, schedule: Schedule, steps: int, generator: Optional[torch.Generator] = None):
        self.schedule = schedule
        self.steps = steps
        self.generator = generator
        self.timesteps: List[float] = schedule.sampling_timesteps(steps)
        alpha, sigma = schedule.alpha_sigma(torch.tensor(self.timesteps, dtype=torch.float64),
                                            dtype=torch.float64)
        self.alphas: List[float] = alpha.tolist() + [1.0]
        self.sigmas: List[float] = sigma.tolist() + [0.0]

    @abc.abstractmethod
    def step(self, i: int, x: torch.Tensor, model_out: torch.Tensor) -> torch.Tensor:
        """The state after step i, from the state x at timesteps[i] and the model's output there."""

    def _x0_eps(self, i: int, x: torch.Tensor, model_out: torch.Tensor):
        return self.schedule.x0_eps_at(x, model_out, self.alphas[i], self.sigmas[i])


class DDIMSampler(Sampler):
    """Deterministic DDIM (eta 0): x_next = alpha_next x0 + sigma_next eps; the last step returns x0."""

    name = "ddim"
    objectives = ("v_prediction",)

    def step(self, i, x, model_out):
        x0, eps = self._x0_eps(i, x, model_out)
        return self.alphas[i + 1] * x0 + self.sigmas[i + 1] * eps


def _log_snr(alpha: float, sigma: float) -> float:
    """lambda = log(alpha / sigma); -inf at zero SNR (alpha 0), +inf at clean data (sigma 0)."""
    if alpha == 0.0:
        return -math.inf
    if sigma == 0.0:
        return math.inf
    return math.log(alpha / sigma)


class DPMSolverPP2MSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022), data prediction, multistep.

    With h = lambda_next - lambda_t and D the (extrapolated) x0 prediction,
    ``x_next = (sigma_next / sigma_t) x_t + alpha_next (1 - exp(-h)) D`` where
    ``D = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev``, ``r = h_prev / h``. ``exp(-h)`` is computed as
    ``sigma_next alpha_t / (alpha_next sigma_t)``, which is exactly 0 at the zero-SNR first step
    (alpha_t = 0, lambda_t = -inf), so no inf or NaN appears. First order (D = x0_t) on the first
    step, on the step after a zero-SNR point (r = inf there), and on the final step to t = 0
    (where the update reduces to x0, as diffusers' ``lower_order_final``).
    """

    name = "dpm++2m"
    objectives = ("v_prediction",)

    def __init__(self, schedule, steps, generator=None):
        super().__init__(schedule, steps, generator)
        self.lambdas = [_log_snr(a, s) for a, s in zip(self.alphas, self.sigmas)]
        self.prev_x0: Optional[torch.Tensor] = None

    def _extrapolated_x0(self, i: int, x0: torch.Tensor) -> torch.Tensor:
        final = i == self.steps - 1
        lam_prev, lam, lam_next = (self.lambdas[i - 1] if i > 0 else -math.inf), self.lambdas[i], self.lambdas[i + 1]
        prev_x0, self.prev_x0 = self.prev_x0, x0
        if prev_x0 is None or final or not math.isfinite(lam_prev):
            return x0
        half_inv_r = (lam_next - lam) / (2.0 * (lam - lam_prev))  # 1 / (2 r)
        return (1.0 + half_inv_r) * x0 - half_inv_r * prev_x0

    def _exp_neg_h(self, i: int) -> float:
        a, s, a_next, s_next = self.alphas[i], self.sigmas[i], self.alphas[i + 1], self.sigmas[i + 1]
        return (s_next * a) / (a_next * s)

    def step(self, i, x, model_out):
        x0, _ = self._x0_eps(i, x, model_out)
        d = self._extrapolated_x0(i, x0)
        ratio = self._exp_neg_h(i)
        return (self.sigmas[i + 1] / self.sigmas[i]) * x + self.alphas[i + 1] * (1.0 - ratio) * d


class DPMSolverPP2MSDESampler(DPMSolverPP2MSampler):
    """Stochastic DPM-Solver++(2M) SDE, the sampler of VideoVLA's release (CogVideoX's DPM scheduler).

    ``x_next = (sigma_next / sigma_t) exp(-h) x_t + alpha_next (1 - exp(-2h)) D
    + sigma_next sqrt(1 - exp(-2h)) z`` with the same D as the ODE solver and z drawn from the
    sampler's generator (on CPU, then moved, so runs repeat across devices). At the zero-SNR first
    step exp(-h) = 0: the state is replaced by alpha_next x0 + fresh noise. The final step returns x0.
    """

    name = "dpm++2m-sde"

    def step(self, i, x, model_out):
        x0, _ = self._x0_eps(i, x, model_out)
        d = self._extrapolated_x0(i, x0)
        ratio = self._exp_neg_h(i)
        sigma_next = self.sigmas[i + 1]
        x_next = (sigma_next / self.sigmas[i]) * ratio * x + self.alphas[i + 1] * (1.0 - ratio ** 2) * d
        noise_scale = sigma_next * math.sqrt(max(1.0 - ratio ** 2, 0.0))
        if noise_scale > 0:
            z = torch.randn(x.shape, generator=self.generator,
                            device=self.generator.device if self.generator is not None else x.device)
            x_next = x_next + noise_scale * z.to(device=x.device, dtype=x.dtype)
        return x_next


class EulerSampler(Sampler):
    """Euler on the flow-matching ODE dx/ds = v, s from 1 to 0 in equal steps: x += (s_next - s) v."""

    name = "euler"
    objectives = ("flow_matching",)

    def step(self, i, x, model_out):
        return x + (self.sigmas[i + 1] - self.sigmas[i]) * model_out  # sigma == s for flow matching


class ConsistencySampler(Sampler):
    """Multistep consistency sampling (LCM, Luo et al. 2023), for either objective.

    At step i the model's output gives the clean prediction x0 (``x0_eps_at``); the next state is
    ``alpha_next x0 + sigma_next z`` with fresh z from the sampler's generator (on CPU, then moved);
    the last step (alpha 1, sigma 0) returns x0. With one step it is one x0 prediction from pure noise.
    """

    name = "consistency"
    objectives = ("v_prediction", "flow_matching")

    def step(self, i, x, model_out):
        x0, _ = self._x0_eps(i, x, model_out)
        sigma_next = self.sigmas[i + 1]
        if sigma_next == 0.0:
            return x0
        z = torch.randn(x.shape, generator=self.generator,
                        device=self.generator.device if self.generator is not None else x.device)
        return self.alphas[i + 1] * x0 + sigma_next * z.to(device=x.device, dtype=x.dtype)


SAMPLERS: Dict[str, Type[Sampler]] = {
    cls.name: cls for cls in (DDIMSampler, DPMSolverPP2MSampler, DPMSolverPP2MSDESampler, EulerSampler,
                              ConsistencySampler)
}
SHORTCUT_SAMPLERS = ("ddim", "euler")  # first-order one-step updates: what a shortcut student's average velocity fits


def samplers_for(objective: str) -> List[str]:
    """Names of the samplers that accept a model trained with ``objective``."""
    return [name for name, cls in SAMPLERS.items() if objective in cls.objectives]


def default_options(config) -> Tuple[str, int, float]:
    """(sampler, steps, cfg_scale) that ``sample`` and ``WAMPolicy`` use for options left None.

    teacher:             ("ddim" for v_prediction, "euler" for flow_matching, 10, 6.0)
    shortcut student:    (the same ddim / euler, max(distilled_steps), 1.0)
    consistency student: ("consistency", max(distilled_steps), 1.0)
    """
    first_order = "ddim" if config.objective == "v_prediction" else "euler"
    if config.distillation == "shortcut":
        return first_order, max(config.distilled_steps), 1.0
    if config.distillation == "consistency":
        return "consistency", max(config.distilled_steps), 1.0
    return first_order, 10, 6.0


def resolve_options(config, sampler, steps, cfg_scale):
    """``sampler``, ``steps``, ``cfg_scale`` with each None replaced by ``default_options(config)``."""
    defaults = default_options(config)
    return tuple(default if value is None else value for value, default in zip((sampler, steps, cfg_scale), defaults))


def step_size_for(config, steps: int) -> Optional[float]:
    """The step size a shortcut student's forwards get when sampled in ``steps`` steps
    (num_train_timesteps / steps, model-timestep units); None for every other model."""
    return config.num_train_timesteps / steps if config.distillation == "shortcut" else None


# ---- guidance -------------------------------------------------------------------------------------
def guidance_scale(cfg_scale: float, cfg_schedule: str, timestep: float, num_train_timesteps: int) -> float:
    """The guidance scale used at a step whose (noisy) model timestep is ``timestep``.

    "constant": ``cfg_scale``. "dynamic": CogVideoX / VideoVLA's cosine ramp
    ``1 + cfg_scale * (1 - cos(pi * p**5)) / 2`` with ``p = 1 - timestep / num_train_timesteps``
    the fraction of the way through the schedule: no guidance at pure noise, rising to
    ``1 + cfg_scale`` at clean data. (CogVideoX's code computes p from timestep and the number of
    inference steps; we use the fraction of the noise range so the ramp does not depend on the
    step count.)
    """
    if cfg_schedule == "constant":
        return float(cfg_scale)
    p = 1.0 - timestep / num_train_timesteps
    return 1.0 + cfg_scale * (1.0 - math.cos(math.pi * p ** 5)) / 2.0


def uses_guidance(cfg_scale: float, cfg_schedule: str) -> bool:
    # Dynamic guidance is 1 everywhere only when cfg_scale is 0.
    return cfg_scale != 1.0 if cfg_schedule == "constant" else cfg_scale != 0.0


# ---- sample ---------------------------------------------------------------------------------------
def _check_batched(name: str, x, batch: int) -> None:
    if x is None:
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[0] != batch:
        raise ValueError(f"{name} must have batch size {batch} (text's), got shape {tuple(x.shape)}")


def check_text(name: str, text, batches: Tuple[int, ...], config, dtype, device) -> None:
    if not isinstance(text, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (B, {config.text_len}, {config.text_dim}), "
                        f"got {type(text).__name__}")
    if text.dim() != 3 or text.shape[1:] != (config.text_len, config.text_dim) or (
            batches and text.shape[0] not in batches):
        batch_text = "B" if not batches else " or ".join(str(b) for b in batches)
        raise ValueError(f"{name} must have shape ({batch_text}, text_len={config.text_len}, "
                         f"text_dim={config.text_dim}), got {tuple(text.shape)}")
    if text.shape[0] == 0:
        raise ValueError(f"{name} must have a batch of at least 1, got shape {tuple(text.shape)}")
    if text.dtype != dtype:
        raise TypeError(f"{name} must have the model's dtype {dtype}, got {text.dtype}")
    if text.device != device:
        raise ValueError(f"{name} is on {text.device} but the model is on {device}")


def check_options(config, sampler, steps, cfg_scale, cfg_schedule, seed) -> None:
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; known samplers: {sorted(SAMPLERS)}")
    if config.objective not in SAMPLERS[sampler].objectives:
        raise ValueError(f"sampler {sampler!r} does not fit this model's objective {config.objective!r}; "
                         f"it accepts {samplers_for(config.objective)}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be an int, got {type(steps).__name__} {steps!r}")
    if not 1 <= steps <= config.num_train_timesteps:
        raise ValueError(f"steps must be in [1, {config.num_train_timesteps}] (num_train_timesteps), got {steps}")
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, numbers.Real):
        raise TypeError(f"cfg_scale must be a number, got {type(cfg_scale).__name__} {cfg_scale!r}")
    if not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise ValueError(f"cfg_scale must be a finite number >= 0, got {cfg_scale!r}")
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")
    check_seed(seed)
    _check_student_options(config, sampler, steps, cfg_scale, cfg_schedule)


def check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**64 - 1] (what a torch generator takes), got {seed}")


def _check_student_options(config, sampler, steps, cfg_scale, cfg_schedule) -> None:
    """A distilled student samples the way it was distilled: guidance off (it is baked in) and, for
    a shortcut student, a first-order sampler at one of its distilled step counts."""
    kind = config.distillation
    if not kind:
        return
    if uses_guidance(cfg_scale, cfg_schedule):
        raise ValueError(f"guidance scale {config.distilled_cfg_scale:g} is baked in: this {kind} student "
                         f"(config.distilled_cfg_scale) samples without classifier-free guidance, cfg_scale=1 "
                         f"(or None); got cfg_scale={cfg_scale!r} with the {cfg_schedule!r} schedule")
    if kind == "shortcut":
        if sampler not in SHORTCUT_SAMPLERS:
            raise ValueError(f"a shortcut student samples with {SHORTCUT_SAMPLERS[0]!r} (v_prediction) or "
                             f"{SHORTCUT_SAMPLERS[1]!r} (flow_matching): it predicts the average velocity over "
                             f"one step, which a first-order update uses; got sampler {sampler!r}")
        if steps not in config.distilled_steps:
            raise ValueError(f"this shortcut student was distilled for steps {config.distilled_steps} "
                             f"(config.distilled_steps), got steps={steps}")


@torch.no_grad()
def sample(model, text: torch.Tensor, image: Optional[torch.Tensor] = None, *, sampler: Optional[str] = None,
           steps: Optional[int] = None, cfg_scale: Optional[float] = None, cfg_schedule: str = "constant",
           uncond_text: Optional[torch.Tensor] = None, seed: int = 0, return_video: bool = False,
           history: Optional[torch.Tensor] = None, robot_id: Optional[torch.Tensor] = None,
           noise: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
           prefix: Optional[torch.Tensor] = None) -> ActionChunk:
    """Denoise one action chunk (and future video latents) per row of ``text``.

    model      a WAMTransformer (or anything with its call signature, ``config`` and parameters)
    text       (B, text_len, text_dim) in the model's dtype and device
    image, history, robot_id   passed to the model unchanged (see WAMTransformer.forward)
    sampler, steps, cfg_scale   None: the model's defaults, ``default_options(model.config)``
               (a teacher: ddim (v_prediction) / euler (flow_matching), 10 steps, cfg_scale 6;
               a distilled student: its own sampler, max(distilled_steps), 1)
    sampler    a name of ``SAMPLERS`` that fits ``model.config.objective`` (``samplers_for``)
    steps      model evaluations, 1 .. num_train_timesteps (a shortcut student: one of
               config.distilled_steps; its forwards get step_size = num_train_timesteps / steps)
    cfg_scale  classifier-free guidance: ``out = uncond + scale * (cond - uncond)``; 1 turns it
               off (constant schedule), 0 gives the unconditional model. Students refuse guidance
               (it is baked in: config.distilled_cfg_scale)
    cfg_schedule  "constant", or "dynamic": CogVideoX / VideoVLA's ramp
               ``scale(p) = 1 + cfg_scale * (1 - cos(pi * p**5)) / 2`` with ``p = 1 - t / T`` the
               fraction of the way through the schedule at the step's timestep t (see
               ``guidance_scale``)
    uncond_text   text of the unconditional rows, (B or 1, text_len, text_dim); zeros when None
               (what ``diffusion_loss(cond_dropout=...)`` trains)
    seed       the initial noise (video first, then actions) and any sampler noise come from
               ``torch.Generator("cpu").manual_seed(seed)``, so a seed gives the same draws on
               every device
    noise      (video_noise (B, noisy_frames, C, H, W), action_noise (B, K, A)) float32: the
               initial noise instead of the seed's first draws (the seed still drives any sampler
               noise), so two models can start from the same noise
    return_video  also return the predicted video latents (an action-only model has none: video is None)
    prefix     (B, d, action_dim) committed actions (model units, 0 <= d < action_len): the chunk's first d
               actions are these and the rest continues them (``wam_fast.prefix``)

    With guidance on, every step runs ONE forward of 2B rows (cond rows first, then uncond),
    also at steps where the dynamic scale happens to be 1, so shapes stay static.
    The sampler state is float32; the model runs in its own dtype.
    """
    if not callable(model) or not hasattr(model, "config") or not hasattr(model, "parameters"):
        raise TypeError(f"model must be a WAMTransformer (callable, with .config and .parameters()), "
                        f"got {type(model).__name__}")
    config = model.config
    param = next(iter(model.parameters()), None)
    if param is None:
        raise ValueError("model has no parameters, so its dtype and device are unknown")
    dtype, device = param.dtype, param.device
    sampler, steps, cfg_scale = resolve_options(config, sampler, steps, cfg_scale)
    check_options(config, sampler, steps, cfg_scale, cfg_schedule, seed)
    steps, cfg_scale, seed = int(steps), float(cfg_scale), int(seed)
    check_text("text", text, (), config, dtype, device)
    batch = text.shape[0]
    for name, x in (("image", image), ("history", history), ("robot_id", robot_id)):
        _check_batched(name, x, batch)
    check_robot_id(config, robot_id, batch, device, read_values=False)  # values: in check_values below
    if uncond_text is not None:
        check_text("uncond_text", uncond_text, (batch, 1), config, dtype, device)
    made = None if prefix is None else make_prefix(prefix, batch, config.action_len, config.action_dim, device)
    # values once here (one sync on an accelerator); the forwards of the loop then read none back
    check_values({"text": text, "uncond_text": uncond_text, "image": image, "history": history, "prefix": prefix},
                 robot_id, config.num_robots)
    prefix = made if made is not None and made.length else None  # an empty prefix: the plain chunk
    guided = uses_guidance(cfg_scale, cfg_schedule)
    if guided:
        if uncond_text is None:
            uncond_text = torch.zeros_like(text)
        else:
            uncond_text = uncond_text.expand_as(text)
        text = torch.cat((text, uncond_text))
        image, history, robot_id = (None if x is None else torch.cat((x, x)) for x in (image, history, robot_id))

    generator = torch.Generator("cpu").manual_seed(seed)

    committed = committed_kwargs(config, prefix, 2 if guided else 1)

    def forward(video, actions, timestep, step_size):
        # step_size only where there is one: a teacher (or a wrapper of one) keeps its call signature
        extra = {} if step_size is None else {"step_size": step_size}
        return model(video, text, actions, timestep, image=image, history=history, robot_id=robot_id, **extra,
                     **committed)

    chunk = run_sampler(forward, config, batch, device, dtype, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                        cfg_schedule=cfg_schedule, generator=generator, noise=noise, prefix=prefix)
    return chunk if return_video and not config.action_only else dataclasses.replace(chunk, video=None)


def initial_noise(noise, video_shape, action_shape, generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """``noise`` checked, or (video, actions) drawn from ``generator`` (video first)."""
    if noise is None:  # drawn on the generator's device (a policy's generator lives on the model's device)
        device = generator.device if generator is not None else None
        return (torch.randn(video_shape, generator=generator, device=device),
                torch.randn(action_shape, generator=generator, device=device))
    if not isinstance(noise, (tuple, list)) or len(noise) != 2:
        raise TypeError(f"noise must be a pair (video_noise, action_noise) of tensors, got {type(noise).__name__}"
                        + (f" of length {len(noise)}" if isinstance(noise, (tuple, list)) else ""))
    for name, x, shape in (("video", noise[0], video_shape), ("action", noise[1], action_shape)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"noise: the {name} noise must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"noise: the {name} noise must have shape {tuple(shape)}, got {tuple(x.shape)}")
        if x.dtype != torch.float32:
            raise TypeError(f"noise: the {name} noise must be float32 (the sampler state's dtype), got {x.dtype}")
    check_values({"noise (video)": noise[0], "noise (actions)": noise[1]})
    return noise[0], noise[1]


def run_sampler(forward, config, batch: int, device, dtype, *, sampler: str, steps: int, cfg_scale: float,
                cfg_schedule: str, generator: torch.Generator,
                noise: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                prefix: Optional[ActionPrefix] = None) -> ActionChunk:
    """The sampling loop of ``sample`` (and of ``WAMPolicy``), with validated options.

    ``forward(video, actions, timestep, step_size)`` evaluates the model on rows * batch rows
    (rows = 2 with guidance: cond rows first, then uncond) and returns (video_out, action_out).
    ``timestep`` is a float32 (rows * batch,) tensor; ``step_size`` is None, except for a shortcut
    student (config.distillation == "shortcut"): a float32 (rows * batch,) tensor filled with
    num_train_timesteps / steps. The initial noise (video first, then actions) comes from
    ``noise`` = (video (B, noisy_frames, C, H, W), actions (B, K, A)) float32 when given (the
    generator is then not used for it), else from ``generator`` (a CPU generator), which also
    gives any sampler noise. ``prefix``: committed actions the state is guided toward after every step
    (``wam_fast.prefix``); an ``action_prefix`` model also gets them clean before every step, and its
    ``forward`` passes ``prefix.known`` as ``committed``. Returns the chunk with its video latents.
    """
    # a model that reads committed rows (config.action_prefix) sees them clean at every step; any other
    # model sees them noised to each step's level (inpainting), from the second step on
    clean_prefix = prefix is not None and config.action_prefix
    guided = uses_guidance(cfg_scale, cfg_schedule)
    video_shape = (batch, config.noisy_frames, config.latent_channels, config.latent_height, config.latent_width)
    action_shape = (batch, config.action_len, config.action_dim)
    video_size = math.prod(video_shape[1:])
    video_noise, action_noise = initial_noise(noise, video_shape, action_shape, generator)
    video_noise, action_noise = video_noise.to(device), action_noise.to(device)
    x = torch.cat((video_noise.flatten(1), action_noise.flatten(1)), dim=1)

    solver = SAMPLERS[sampler](schedule_for(config), steps, generator)
    rows = 2 if guided else 1
    size = step_size_for(config, steps)
    # one tensor for every step: the step size is the same at each step of a fixed-grid sampler
    step_size = None if size is None else torch.full((rows * batch,), size, device=device, dtype=torch.float32)

    def with_prefix(x, update):  # update: the action state (B, K, A) -> the guided one
        return torch.cat((x[:, :video_size], update(x[:, video_size:].reshape(action_shape)).flatten(1)), dim=1)

    with inputs_checked():  # the grid is in range by construction; the callers checked their inputs
        for i, t in enumerate(solver.timesteps):
            if clean_prefix:
                x = with_prefix(x, lambda a: set_committed(a, prefix))
            x_in = x.to(dtype).repeat(rows, 1)
            timestep = torch.full((rows * batch,), t, device=device, dtype=torch.float32)
            video_out, action_out = forward(x_in[:, :video_size].reshape((rows * batch,) + video_shape[1:]),
                                            x_in[:, video_size:].reshape((rows * batch,) + action_shape[1:]), timestep,
                                            step_size)
            out = torch.cat((video_out.flatten(1), action_out.flatten(1)), dim=1).float()
            if guided:
                cond, uncond = out.chunk(2)
                scale = guidance_scale(cfg_scale, cfg_schedule, t, config.num_train_timesteps)
                out = uncond + scale * (cond - uncond)
            x = solver.step(i, x, out)
            if prefix is not None:  # guided toward the committed actions at the new state's noise level
                level = solver.alphas[i + 1], solver.sigmas[i + 1]
                x = with_prefix(x, lambda a: guide(a, prefix, action_noise, *level, clean_committed=clean_prefix))

    return ActionChunk(actions=x[:, video_size:].reshape(action_shape), video=x[:, :video_size].reshape(video_shape),
                       sampler=sampler, steps=steps, nfe=steps * rows)
