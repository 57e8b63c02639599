"""Training objectives of ``wam_fast.distill`` (docs/design.md, Distillation) and ``make_student``.

Every objective has the same two methods, which is all the trainer (``wam_fast.distill.trainer``)
knows of it:

- ``draw(rows, generator) -> dict``: ALL the randomness of ``rows`` samples (timesteps, noise, which
  rows are which kind), drawn up front on the CPU. The trainer draws a global batch and hands each
  rank and micro-batch its slice of rows, so 1 rank and N ranks train on identical samples, and a
  resumed run needs no RNG state.
- ``loss(student, ema, batch, draws) -> (loss, metrics)``: a float32 scalar and a dict of float
  tensors. ``batch`` holds the dataset's tensors of the same rows (``wam_fast.distill.data``):
  ``text``, ``image`` (the clean current frame), ``future`` (the following latent frames),
  ``actions``, optionally ``history`` and ``robot_id``.

Objectives:

- ``DiffusionObjective``: the teacher's own denoising loss (v-prediction or flow matching).
- ``ShortcutObjective`` (shortcut models, Frans et al. 2024, on this model's DDIM / Euler step):
  the student takes a step size d (``model(..., step_size=d)``, in model timesteps). Fine rows (d = 0)
  regress the teacher's velocity with classifier-free guidance of ``cfg_scale`` baked in. Coarse rows
  (d = T / s for s in ``config.distilled_steps``, t on the s-step sampling grid) regress the velocity
  that makes ONE sampler step of size d land where TWO steps of size d/2 of the EMA student land
  (d/2 = T / 2s if the student is distilled for 2s steps, else the EMA student's d = 0 velocity).
  One checkpoint then samples at every step count in ``distilled_steps``.
- ``ConsistencyObjective`` (latent consistency distillation, Luo et al. 2023): the student's clean
  prediction at a noisy point x_t must equal the EMA student's clean prediction at the point one
  guided DDIM step of the teacher further along (or that point itself when the step reaches clean
  data). Sampled with the multistep "consistency" sampler.

Asymmetric distillation: a ``mask="temporal"`` student (clean current frame as context, the future
frames noisy) may learn from a ``mask="full"`` teacher, which denoises all latent frames. The teacher
then sees latent frame 0 noised to the same timestep along a fixed noise (``noise0``), i.e. exactly
on its own trajectory of the known clean frame, and its prediction of frame 0 is not a target.

Action-only students (``future_frames=k``, k below the teacher's future frames; 0: actions alone): the
teacher still denoises every frame. The frames the student leaves out are the data's future frames
noised to the student's timestep along a fixed noise (``noise_later``), and only the teacher's output
for the student's own tokens is a target. So the student regresses the teacher's velocity of the
actions averaged over the futures it does not see: the velocity of the actions' own marginal flow,
which is what a sampler of the actions alone needs (the frame and text stay its condition).

Row kinds (fine / coarse) are set by row position (every ``period``-th row is coarse), so every
micro-batch of a multiple of ``period`` rows has the same number of each and every rank runs the same
forwards (FSDP's collectives need that).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from wam_fast.configs import WAMConfig
from wam_fast.distill.committed import CommittedPrefix
from wam_fast.models.transformer import WAMTransformer
from wam_fast.schedules import DDPMSchedule, schedule_for

METHODS = ("shortcut", "consistency")


# ---- schedule algebra on per-row timesteps --------------------------------------------------------
def alpha_sigma(schedule, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """float32 (rows,) alpha, sigma at model timesteps t, extended to "clean" for a DDPM schedule:
    t <= -1 is clean data (alpha 1, sigma 0; where a DDIM sampler's last step ends), and -1 < t < 0
    interpolates alpha between clean and timestep 0."""
    t = t.detach().to(torch.float64).cpu()
    if isinstance(schedule, DDPMSchedule):
        table = schedule.alphas
        last = schedule.num_train_timesteps - 1
        if (t > last).any():
            raise ValueError(f"DDPM timesteps must be <= {last}, got {t.max().item():g}")
        extended = torch.cat((torch.ones(1, dtype=table.dtype), table))  # index 0 is t = -1
        pos = (t + 1).clamp(0, last + 1)
        low = pos.floor().long().clamp(max=last + 1)
        high = (low + 1).clamp(max=last + 1)
        frac = pos - low
        alpha = extended[low] * (1 - frac) + extended[high] * frac
        sigma = (1.0 - alpha ** 2).clamp_min(0).sqrt()
    else:
        s = (t / schedule.num_train_timesteps).clamp(0, 1)
        alpha, sigma = 1.0 - s, s
    return alpha.float(), sigma.float()


def _rows(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return coef.to(x.device).reshape((-1,) + (1,) * (x.dim() - 1))


def clean_prediction(schedule, x: torch.Tensor, model_out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 predicted from the state x at t and the model's output there (v or flow velocity)."""
    alpha, sigma = alpha_sigma(schedule, t)
    x0, _ = schedule.x0_eps_at(x, model_out, _rows(alpha, x), _rows(sigma, x))
    return x0


def sampler_step(schedule, x: torch.Tensor, model_out: torch.Tensor, t: torch.Tensor,
                 t_end: torch.Tensor) -> torch.Tensor:
    """One DDIM step (v-prediction; Euler for flow matching, the same formula) from t to t_end."""
    alpha, sigma = alpha_sigma(schedule, t)
    alpha_end, sigma_end = alpha_sigma(schedule, t_end)
    x0, eps = schedule.x0_eps_at(x, model_out, _rows(alpha, x), _rows(sigma, x))
    return _rows(alpha_end, x) * x0 + _rows(sigma_end, x) * eps


def implied_output(schedule, x: torch.Tensor, t: torch.Tensor, t_end: torch.Tensor,
                   x_end: torch.Tensor) -> torch.Tensor:
    """The model output with which ``sampler_step(x, out, t, t_end)`` lands exactly on x_end.

    The step is affine in the output: step(x, out) = step(x, 0) + b * out, with b per row and
    non-zero whenever t != t_end."""
    zero = torch.zeros_like(x)
    b = sampler_step(schedule, zero, torch.ones_like(x), t, t_end)
    return (x_end - sampler_step(schedule, x, zero, t, t_end)) / b


def sampling_grid_timestep(config: WAMConfig, steps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The timestep of step ``index`` of a ``steps``-step sampler (the samplers' trailing grid);
    ``index == steps`` is where the last step ends: clean data (-1 for DDPM, 0 for flow matching)."""
    T = config.num_train_timesteps
    steps, index = steps.double(), index.double()
    if config.objective == "v_prediction":
        return (torch.round(T - index * T / steps) - 1).float()
    return (T * (1 - index / steps)).float()


# ---- batches -> model inputs ---------------------------------------------------------------------
REQUIRED_FIELDS = ("text", "image", "future", "actions")


def _check_batch(batch: Dict[str, torch.Tensor]) -> None:
    missing = [name for name in REQUIRED_FIELDS if name not in batch]
    if missing:
        raise ValueError(f"a training batch needs {list(REQUIRED_FIELDS)}, missing {missing} (a conditions-only "
                         "dataset needs teacher targets first: wam_fast.distill.rollout.teacher_rollout)")


def clean_targets(config: WAMConfig, batch) -> torch.Tensor:
    """The clean latents a model of ``config`` denoises: all frames (full) or the future ones (temporal;
    the first ``config.future_frames`` of them, none for an action-only model)."""
    if config.mask == "full":
        return torch.cat((batch["image"], batch["future"]), dim=1)
    return batch["future"][:, :config.noisy_frames]


def predicted_future_frames(config: WAMConfig) -> int:
    """Future latent frames (after the current one) a model of ``config`` predicts."""
    return config.noisy_frames - 1 if config.mask == "full" else config.noisy_frames


def context(config: WAMConfig, batch) -> dict:
    """Keyword inputs besides the noisy ones: image, history (last config.history_frames), robot_id."""
    history = batch.get("history")
    if history is not None:
        keep = config.history_frames if config.mask == "temporal" else 0
        history = history[:, max(history.shape[1] - keep, 0):] if keep and history.shape[1] else None
    return {"image": batch["image"], "history": history,
            "robot_id": batch.get("robot_id") if config.num_robots else None}


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def run_model(model, config, video, text, actions, t, ctx, step_size=None, committed=None):
    """float32 outputs of one forward; latents and text cast to the model's dtype, times float32.
    ``committed``: (rows, K, 1) bool, the clean committed action rows of an ``action_prefix`` student."""
    dtype = _model_dtype(model)
    kwargs = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in ctx.items()}
    if step_size is not None:
        kwargs["step_size"] = step_size.float().to(video.device)
    if committed is not None:
        kwargs["committed"] = committed.to(video.device)
    video_out, action_out = model(video.to(dtype), text.to(dtype), actions.to(dtype), t.to(video.device), **kwargs)
    return video_out.float(), action_out.float()


def _split(config: WAMConfig, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A flat (rows, video + actions) state -> (video, actions) shaped for ``config``."""
    rows = x.shape[0]
    video_size = config.noisy_frames * config.latent_channels * config.latent_height * config.latent_width
    video = x[:, :video_size].reshape(rows, config.noisy_frames, config.latent_channels,
                                      config.latent_height, config.latent_width)
    return video, x[:, video_size:].reshape(rows, config.action_len, config.action_dim)


def _flat(video: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    return torch.cat((video.flatten(1), actions.flatten(1)), dim=1)


def _weighted_mse(config, pred: torch.Tensor, target: torch.Tensor, video_weight: float, action_weight: float,
                  rows: Optional[torch.Tensor] = None):
    """(loss, video mse, action mse); per-modality means over ``rows`` (a bool mask) or all rows."""
    pv, pa = _split(config, pred)
    tv, ta = _split(config, target)
    if rows is not None:
        pv, pa, tv, ta = pv[rows], pa[rows], tv[rows], ta[rows]
    if pv.shape[0] == 0:
        zero = pred.sum() * 0.0
        return zero, zero.detach(), zero.detach()
    action_mse = F.mse_loss(pa, ta)
    # an action-only model has no video: its video term is 0 (the mean of no elements would be NaN)
    video_mse = F.mse_loss(pv, tv) if pv.numel() else action_mse * 0.0
    return video_weight * video_mse + action_weight * action_mse, video_mse.detach(), action_mse.detach()


def _check_weights(video_weight, action_weight):
    for name, w in (("video_weight", video_weight), ("action_weight", action_weight)):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {w!r}")
    if video_weight == 0 and action_weight == 0:
        raise ValueError("video_weight and action_weight are both 0: nothing would be trained")


# ---- teacher training ----------------------------------------------------------------------------
def shift_frames(frames: torch.Tensor, shifts: torch.Tensor, pad: int) -> torch.Tensor:
    """``frames`` (rows, ..., H, W), each row moved by its ``shifts`` (rows, 2) = (dy, dx) in [-pad, pad]:
    out[..., y, x] = frames[..., y + dy, x + dx], the edge pixels repeated where that leaves the frame."""
    if shifts.shape != (frames.shape[0], 2):
        raise ValueError(f"shifts must be (rows, 2) = ({frames.shape[0]}, 2), got {tuple(shifts.shape)}")
    if pad <= 0:
        return frames
    if int(shifts.abs().max()) > pad:
        raise ValueError(f"shifts must lie in [-{pad}, {pad}], got up to {int(shifts.abs().max())}")
    rows, (height, width) = frames.shape[0], frames.shape[-2:]
    flat = frames.reshape(rows, -1, height, width)
    padded = F.pad(flat.float(), (pad, pad, pad, pad), mode="replicate").to(frames.dtype)
    shifts = shifts.to(frames.device)
    y = torch.arange(height, device=frames.device) + pad + shifts[:, :1]  # (rows, H)
    x = torch.arange(width, device=frames.device) + pad + shifts[:, 1:]  # (rows, W)
    row = torch.arange(rows, device=frames.device)[:, None, None, None]
    channel = torch.arange(flat.shape[1], device=frames.device)[None, :, None, None]
    return padded[row, channel, y[:, None, :, None], x[:, None, None, :]].reshape(frames.shape)


class DiffusionObjective:
    """The teacher's denoising loss (as ``schedules.diffusion_loss``, with the draws made up front).

    One timestep per sample shared by video and actions, uniform over the training range, or always
    ``timestep`` when given (at the last one the input is pure noise under zero terminal SNR, and the
    model a plain regressor of the clean sample: a pretraining stage that must read the condition);
    ``cond_dropout`` zeroes the text of that fraction of samples (the unconditional model that
    guidance needs). Loss = video_weight * MSE(video) + action_weight * MSE(actions).
    ``random_shift`` > 0 moves every frame of a sample (image, future, history) by one random offset of
    up to that many latent pixels in each direction (``shift_frames``): an augmentation that keeps a
    model trained on few scene layouts from memorising where things are in the frame.
    """

    def __init__(self, config: WAMConfig, cond_dropout: float = 0.1, video_weight: float = 1.0,
                 action_weight: float = 1.0, timestep: Optional[int] = None, random_shift: int = 0):
        if not isinstance(config, WAMConfig):
            raise TypeError(f"DiffusionObjective expects a WAMConfig, got {type(config).__name__}")
        if not 0.0 <= cond_dropout <= 1.0:
            raise ValueError(f"cond_dropout must be a fraction in [0, 1], got {cond_dropout!r}")
        _check_weights(video_weight, action_weight)
        if timestep is not None and (isinstance(timestep, bool) or not isinstance(timestep, numbers.Integral)
                                     or not 0 <= timestep < config.num_train_timesteps):
            raise ValueError(f"timestep must be None (uniform) or an int in [0, {config.num_train_timesteps - 1}] "
                             f"(num_train_timesteps - 1), got {timestep!r}")
        if isinstance(random_shift, bool) or not isinstance(random_shift, numbers.Integral) or not (
                0 <= random_shift < min(config.latent_height, config.latent_width)):
            raise ValueError(f"random_shift must be an int in [0, {min(config.latent_height, config.latent_width) - 1}] "
                             f"(latent pixels, less than the frame), got {random_shift!r}")
        self.config, self.schedule = config, schedule_for(config)
        self.cond_dropout, self.video_weight, self.action_weight = cond_dropout, video_weight, action_weight
        self.timestep, self.random_shift = timestep, int(random_shift)

    def draw(self, rows: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        c = self.config
        t = self.schedule.train_timesteps(rows, generator, "cpu")  # drawn either way: same noise below
        draws = {
            "t": t if self.timestep is None else torch.full_like(t, float(self.timestep)),
            "noise": torch.randn((rows, c.noisy_frames * c.latent_channels * c.latent_height * c.latent_width
                                  + c.action_len * c.action_dim), generator=generator),
            "drop": torch.rand((rows,), generator=generator) < self.cond_dropout,
        }
        if self.random_shift:  # drawn last: without a shift, the draws are those of earlier versions
            draws["shift"] = torch.randint(-self.random_shift, self.random_shift + 1, (rows, 2), generator=generator)
        return draws

    def loss(self, student, ema, batch, draws):
        _check_batch(batch)
        c = self.config
        if "shift" in draws:
            batch = dict(batch, **{name: shift_frames(batch[name], draws["shift"], self.random_shift)
                                   for name in ("image", "future", "history") if batch.get(name) is not None})
        x0 = _flat(clean_targets(c, batch).float(), batch["actions"].float())
        noise, t = draws["noise"].to(x0.device), draws["t"]
        alpha, sigma = alpha_sigma(self.schedule, t)
        x_t = _rows(alpha, x0) * x0 + _rows(sigma, x0) * noise
        target = _rows(alpha, x0) * noise - _rows(sigma, x0) * x0 if c.objective == "v_prediction" else noise - x0
        text = torch.where(draws["drop"].to(x0.device)[:, None, None], torch.zeros_like(batch["text"]), batch["text"])
        video, actions = _split(c, x_t)
        out = _flat(*run_model(student, c, video, text, actions, t, context(c, batch)))
        loss, video_mse, action_mse = _weighted_mse(c, out, target, self.video_weight, self.action_weight)
        return loss, {"loss_video": video_mse, "loss_actions": action_mse}


# ---- students ------------------------------------------------------------------------------------
def _check_steps(steps) -> Tuple[int, ...]:
    try:
        steps = tuple(steps)
    except TypeError:
        raise TypeError(f"steps must be a sequence of ints such as (1, 2, 4), got {steps!r}") from None
    if not steps or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in steps) or \
            list(steps) != sorted(set(steps)):
        raise ValueError(f"steps must be distinct positive ints in increasing order such as (1, 2, 4), got {steps!r}")
    return tuple(int(s) for s in steps)


BACKBONE_FIELDS = ("num_layers", "num_heads", "head_dim", "ffn_mult", "time_embed_dim", "text_len", "text_dim",
                   "latent_channels", "image_concat", "latent_frames", "latent_height", "latent_width",
                   "patch_size", "action_len", "action_dim", "num_robots", "rope_axes_dim", "rope_theta",
                   "objective", "num_train_timesteps")


def check_teacher_student(teacher_config: WAMConfig, student_config: WAMConfig) -> None:
    """A student must share the teacher's backbone and data shapes; a full-mask student cannot learn
    from a temporal teacher (the teacher never denoises the current frame)."""
    diffs = [f"{f}: teacher {getattr(teacher_config, f)!r}, student {getattr(student_config, f)!r}"
             for f in BACKBONE_FIELDS if getattr(teacher_config, f) != getattr(student_config, f)]
    if diffs:
        raise ValueError("teacher and student configs do not match: " + "; ".join(diffs))
    if teacher_config.mask == "temporal" and student_config.mask == "full":
        raise ValueError("a mask='full' student cannot learn from a mask='temporal' teacher (the teacher does not "
                         "denoise the current frame); use a temporal student")
    if predicted_future_frames(student_config) > predicted_future_frames(teacher_config):
        raise ValueError(f"the student predicts {predicted_future_frames(student_config)} future frames, its teacher "
                         f"only {predicted_future_frames(teacher_config)} (future_frames "
                         f"{teacher_config.future_frames}); a student can leave frames out, not add them")


def make_student(teacher, method: str, steps: Sequence[int] = (1, 2, 4), mask: Optional[str] = None,
                 history_frames: Optional[int] = None, cfg_scale: float = 1.0, future_frames: Optional[int] = None,
                 action_prefix: bool = False):
    """A student initialised from the teacher's weights (a WAMTransformer on the teacher's device,
    float32): ``distillation=method``, ``distilled_steps=steps``, ``distilled_cfg_scale=cfg_scale``,
    ``mask`` (default the teacher's) and ``history_frames`` (temporal students; default the teacher's,
    0 for a full teacher). ``future_frames`` (temporal students): the future frames the student
    denoises, 0 for an action-only student (default: the teacher's, all of them). A shortcut
    student's step embedding starts at zero, so at first it predicts exactly what the teacher does
    (with every frame it denoises). ``action_prefix``: the student reads committed action rows
    (``WAMConfig.action_prefix``; its ``action_embed.committed`` starts at zero)."""
    if method not in METHODS:
        raise ValueError(f"unknown distillation method {method!r}; expected one of {METHODS}")
    tc = getattr(teacher, "config", None)
    if not isinstance(tc, WAMConfig):
        raise TypeError(f"make_student expects a WAMTransformer teacher, got {type(teacher).__name__}")
    if tc.distillation:
        raise ValueError(f"the teacher is itself a {tc.distillation} student; distil from a multi-step teacher")
    mask = tc.mask if mask is None else mask
    if history_frames is None:
        history_frames = tc.history_frames if mask == "temporal" else 0
    if future_frames is None and mask == "temporal" and tc.mask == "temporal":
        future_frames = tc.future_frames
    suffix = "" if future_frames is None else f"-future{future_frames}"
    config = dataclasses.replace(tc, name=f"{tc.name}-{method}{suffix}", mask=mask, history_frames=history_frames,
                                 distillation=method, distilled_steps=_check_steps(steps),
                                 distilled_cfg_scale=float(cfg_scale), future_frames=future_frames,
                                 action_prefix=bool(action_prefix))
    check_teacher_student(tc, config)
    param = next(teacher.parameters())
    student = WAMTransformer(config).to(param.device)
    state = {k: v.detach().float() for k, v in teacher.state_dict().items()}
    missing, unexpected = student.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("step_embed.") and k != "action_embed.committed" for k in missing):
        raise ValueError(f"teacher weights do not fit the student: missing {missing}, unexpected {unexpected}")
    if config.action_only:  # its video head never runs: kept as the teacher's, out of DDP's gradient reduction
        for head in (student.video_out_norm, student.video_proj):
            head.requires_grad_(False)
    return student


class _Distillation:
    """What shortcut and consistency distillation share: the teacher, guidance, noise draws."""

    method = ""  # the student config's ``distillation`` the subclass trains

    def __init__(self, teacher, config: WAMConfig, cfg_scale: Optional[float], video_weight: float,
                 action_weight: float):
        tc = getattr(teacher, "config", None)
        if not isinstance(tc, WAMConfig) or not isinstance(config, WAMConfig):
            raise TypeError("a distillation objective needs a WAMTransformer teacher and the student's WAMConfig")
        check_teacher_student(tc, config)
        if config.distillation != self.method:
            raise ValueError(f"{type(self).__name__} needs a {self.method} student config (distillation="
                             f"'{self.method}'), got distillation={config.distillation!r}: make it with "
                             f"make_student(teacher, '{self.method}')")
        _check_weights(video_weight, action_weight)
        self.teacher, self.teacher_config, self.config = teacher, tc, config
        self.schedule = schedule_for(config)
        self.cfg_scale = float(config.distilled_cfg_scale if cfg_scale is None else cfg_scale)
        if not math.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be a finite number >= 0, got {cfg_scale!r}")
        self.video_weight, self.action_weight = video_weight, action_weight
        # a full teacher of a temporal student also denoises frame 0, and a teacher of a student with fewer
        # future frames (an action-only one) the frames after the student's (see the module docstring)
        self.teacher_adds_frame0 = tc.mask == "full" and config.mask == "temporal"
        self.teacher_adds_frames = predicted_future_frames(tc) - predicted_future_frames(config)

    def _state_size(self) -> int:
        c = self.config
        return c.noisy_frames * c.latent_channels * c.latent_height * c.latent_width + c.action_len * c.action_dim

    def _noise(self, rows, generator):
        c = self.config
        frame = (c.latent_channels, c.latent_height, c.latent_width)
        draws = {"noise": torch.randn((rows, self._state_size()), generator=generator),
                 "noise0": torch.randn((rows, 1) + frame, generator=generator)}
        if self.teacher_adds_frames:  # drawn last: other students keep the draws of earlier versions
            draws["noise_later"] = torch.randn((rows, self.teacher_adds_frames) + frame, generator=generator)
        return draws

    @torch.no_grad()
    def teacher_output(self, x: torch.Tensor, t: torch.Tensor, batch, noise0: torch.Tensor,
                       noise_later: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The teacher's guided output (uncond + cfg_scale * (cond - uncond), zero uncond text) at
        the student's state x (rows, video + actions), flattened like x. Frames the teacher denoises
        and the student does not (frame 0, the future frames after the student's) are the data's own,
        noised to t along ``noise0`` / ``noise_later``: the teacher's trajectory of the known frames."""
        video, actions = _split(self.config, x)
        tc = self.teacher_config
        alpha, sigma = alpha_sigma(self.schedule, t)
        if self.teacher_adds_frames:
            known = predicted_future_frames(self.config)
            later = batch["future"][:, known:known + self.teacher_adds_frames].float()
            if noise_later is None:
                raise ValueError("teacher_output: this student leaves out future frames the teacher denoises; "
                                 "pass the draws' noise_later")
            later = _rows(alpha, later) * later + _rows(sigma, later) * noise_later.to(later.device)
            video = torch.cat((video, later), dim=1)
        if self.teacher_adds_frame0:
            image = batch["image"].float()
            frame0 = _rows(alpha, image) * image + _rows(sigma, image) * noise0.to(image.device)
            video = torch.cat((frame0, video), dim=1)
        ctx = context(tc, batch)
        text = batch["text"]
        guided = self.cfg_scale != 1.0
        if guided:
            ctx = {k: (None if v is None else torch.cat((v, v))) for k, v in ctx.items()}
            text = torch.cat((text, torch.zeros_like(text)))
            video, actions, t = torch.cat((video, video)), torch.cat((actions, actions)), torch.cat((t, t))
        video_out, action_out = run_model(self.teacher, tc, video, text, actions, t, ctx)
        first = 1 if self.teacher_adds_frame0 else 0
        video_out = video_out[:, first:first + self.config.noisy_frames]
        out = _flat(video_out, action_out)
        if guided:
            cond, uncond = out.chunk(2)
            out = uncond + self.cfg_scale * (cond - uncond)
        return out

    def _x0_and_noisy(self, batch, draws, t):
        x0 = _flat(clean_targets(self.config, batch).float(), batch["actions"].float())
        noise = draws["noise"].to(x0.device)
        alpha, sigma = alpha_sigma(self.schedule, t)
        return x0, _rows(alpha, x0) * x0 + _rows(sigma, x0) * noise


class ShortcutObjective(_Distillation):
    """Shortcut distillation (see the module docstring). ``config`` is the student's
    (``make_student(teacher, "shortcut", ...)``); every ``period``-th row is a coarse
    (self-consistency) row, the others fine (teacher velocity) rows."""

    method = "shortcut"

    def __init__(self, teacher, config: WAMConfig, cfg_scale: Optional[float] = None, period: int = 4,
                 video_weight: float = 1.0, action_weight: float = 1.0, prefix_fraction: float = 0.0):
        super().__init__(teacher, config, cfg_scale, video_weight, action_weight)
        if isinstance(period, bool) or not isinstance(period, numbers.Integral) or period < 2:
            raise ValueError(f"period must be an int >= 2 (one coarse row in `period`), got {period!r}")
        self.period = int(period)
        self.steps = torch.tensor(config.distilled_steps)
        self.prefix = CommittedPrefix(config, prefix_fraction)

    def draw(self, rows: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        c = self.config
        T = c.num_train_timesteps
        coarse = torch.arange(rows) % self.period == self.period - 1
        fine_t = schedule_for(c).train_timesteps(rows, generator, "cpu")
        level = torch.randint(0, len(self.steps), (rows,), generator=generator)
        steps = self.steps[level]
        index = (torch.rand((rows,), generator=generator) * steps).floor().clamp(max=steps - 1)
        # a coarse row is step `index` of a `steps`-step sampler: it starts, passes half way and ends on
        # the samplers' own grid (t - d is off the grid when T is not a multiple of 2 * steps)
        coarse_t = sampling_grid_timestep(c, steps, index)
        return {"coarse": coarse,
                "t": torch.where(coarse, coarse_t, fine_t),
                "t_mid": sampling_grid_timestep(c, 2 * steps, 2 * index + 1),
                "t_end": sampling_grid_timestep(c, steps, index + 1),
                "step_size": torch.where(coarse, T / steps.float(), torch.zeros(rows)),
                **self._noise(rows, generator), **self.prefix.draw(rows, generator)}

    def half_step_size(self, d: torch.Tensor) -> torch.Tensor:
        """The step size the EMA student is asked for on a half step of d: d / 2 when the student is
        distilled for that many steps, else 0 (its teacher-like instantaneous velocity)."""
        T = self.config.num_train_timesteps
        half = d / 2
        trained = torch.zeros_like(half, dtype=torch.bool)
        for s in self.config.distilled_steps:
            trained |= torch.isclose(half, torch.tensor(T / s))
        return torch.where(trained, half, torch.zeros_like(half))

    def loss(self, student, ema, batch, draws):
        _check_batch(batch)
        c = self.config
        coarse, t, d = draws["coarse"], draws["t"], draws["step_size"]
        x0, x_t = self._x0_and_noisy(batch, draws, t)
        ctx = context(c, batch)
        # fine rows: the guided teacher; coarse rows: two half steps of the EMA student
        target = self.teacher_output(x_t, t, batch, draws["noise0"], draws.get("noise_later"))
        if bool(coarse.any()):
            rows = coarse.to(x_t.device)
            sub = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            target_coarse = self._two_half_steps(ema, x_t[rows], t[coarse], draws["t_mid"][coarse],
                                                 draws["t_end"][coarse], d[coarse], sub)
            target = target.clone()
            target[rows] = target_coarse
        x_t, target, committed = self.prefix.apply(self.schedule, x0, x_t, t, target, draws)
        video, actions = _split(c, x_t)
        out = _flat(*run_model(student, c, video, batch["text"], actions, t, ctx, step_size=d, committed=committed))
        target = self.prefix.untrained_committed(out, target, committed)
        loss, video_mse, action_mse = _weighted_mse(c, out, target, self.video_weight, self.action_weight)
        fine_mse = _weighted_mse(c, out.detach(), target, self.video_weight, self.action_weight,
                                 rows=~coarse.to(out.device))[0]
        coarse_mse = _weighted_mse(c, out.detach(), target, self.video_weight, self.action_weight,
                                   rows=coarse.to(out.device))[0]
        return loss, {"loss_video": video_mse, "loss_actions": action_mse, "loss_fine": fine_mse.detach(),
                      "loss_coarse": coarse_mse.detach()}

    @torch.no_grad()
    def _two_half_steps(self, ema, x_t, t, t_mid, t_end, d, batch):
        """The output that takes x_t from t to t_end in one step, landing where two EMA steps
        (t -> t_mid -> t_end, of step size d / 2) land."""
        c = self.config
        ctx = context(c, batch)
        half = self.half_step_size(d)
        video, actions = _split(c, x_t)
        v1 = _flat(*run_model(ema, c, video, batch["text"], actions, t, ctx, step_size=half))
        x_mid = sampler_step(self.schedule, x_t, v1, t, t_mid)
        video, actions = _split(c, x_mid)
        v2 = _flat(*run_model(ema, c, video, batch["text"], actions, t_mid, ctx, step_size=half))
        x_end = sampler_step(self.schedule, x_mid, v2, t_mid, t_end)
        return implied_output(self.schedule, x_t, t, t_end, x_end)


class ConsistencyObjective(_Distillation):
    """Latent consistency distillation (see the module docstring) over a ``solver_steps``-point
    grid of the teacher's DDIM (Euler) solver: the student's clean prediction at x_t matches the
    EMA student's at the point one guided teacher step further (toward clean data)."""

    method = "consistency"

    def __init__(self, teacher, config: WAMConfig, cfg_scale: Optional[float] = None, solver_steps: int = 50,
                 video_weight: float = 1.0, action_weight: float = 1.0):
        super().__init__(teacher, config, cfg_scale, video_weight, action_weight)
        if isinstance(solver_steps, bool) or not isinstance(solver_steps, numbers.Integral) or \
                not 1 <= solver_steps <= config.num_train_timesteps:
            raise ValueError(f"solver_steps must be an int in [1, {config.num_train_timesteps}], got {solver_steps!r}")
        self.solver_steps = int(solver_steps)

    def draw(self, rows: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        c = self.config
        n = torch.full((rows,), self.solver_steps)
        index = torch.randint(0, self.solver_steps, (rows,), generator=generator)
        return {"t": sampling_grid_timestep(c, n, index), "t_next": sampling_grid_timestep(c, n, index + 1),
                **self._noise(rows, generator)}

    def loss(self, student, ema, batch, draws):
        _check_batch(batch)
        c = self.config
        t, t_next = draws["t"], draws["t_next"]
        x0, x_t = self._x0_and_noisy(batch, draws, t)
        ctx = context(c, batch)
        with torch.no_grad():
            v_teacher = self.teacher_output(x_t, t, batch, draws["noise0"], draws.get("noise_later"))
            x_next = sampler_step(self.schedule, x_t, v_teacher, t, t_next)
            video, actions = _split(c, x_next)
            ema_out = _flat(*run_model(ema, c, video, batch["text"], actions, t_next.clamp_min(0), ctx))
            target = clean_prediction(self.schedule, x_next, ema_out, t_next)
            alpha_next, _ = alpha_sigma(self.schedule, t_next)
            reached_clean = _rows(alpha_next == 1.0, x_next)
            target = torch.where(reached_clean, x_next, target)
        video, actions = _split(c, x_t)
        out = _flat(*run_model(student, c, video, batch["text"], actions, t, ctx))
        pred = clean_prediction(self.schedule, x_t, out, t)
        loss, video_mse, action_mse = _weighted_mse(c, pred, target, self.video_weight, self.action_weight)
        return loss, {"loss_video": video_mse, "loss_actions": action_mse}


def objective_for(method: str, teacher, student_config: WAMConfig, **options):
    """``ShortcutObjective`` or ``ConsistencyObjective`` by method name."""
    if method == "shortcut":
        return ShortcutObjective(teacher, student_config, **options)
    if method == "consistency":
        return ConsistencyObjective(teacher, student_config, **options)
    raise ValueError(f"unknown distillation method {method!r}; expected one of {METHODS}")
