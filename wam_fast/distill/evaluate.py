"""How well a distilled student acts like its teacher: ``evaluate(teacher, student, conditions)``.

Every number compares samples that start from the SAME initial noise, so it measures the sampler
and the model, not the luck of the draw. For each condition (a row of text + image, optional
history / robot id) and each of ``seeds`` seeds, one noise draw is made from that (condition, seed)'s
own generator: video noise for all ``latent_frames`` latent frames and action noise. A full-mask
model denoises every latent frame and gets all of it; a temporal model denoises the future frames
1.. and gets frames 1.. of the same draw, with the same action noise. Video is only ever compared on
the future frames 1.. (frame 0 is the observation), those the student predicts: an action-only student
(``future_frames=0``) has no video numbers (shown as "-"). Because the noise belongs to the row and not to
the batch, the results do not depend on ``batch_size``.

Models sampled from that noise:

- the teacher reference: the teacher with its default sampler (ddim / euler, 10 steps:
  ``wam_fast.sampling.default_options``) and classifier-free guidance ``cfg_scale`` (uncond text zeros);
- teacher-k: the same teacher and sampler with only k steps, same guidance: the undistilled baseline
  a k-step student has to beat;
- the student with k steps, its own sampler (ddim / euler for shortcut students, "consistency" for
  consistency students) and no guidance (it is baked in). An undistilled "student" (a plain model,
  e.g. the teacher itself) is sampled like teacher-k: the teacher's sampler and ``cfg_scale``.

Per step count k (one ``StepResult``), with RMSE taken over the elements of one sample and then
averaged over conditions and seeds:

==========================  ===================================================================
student_action_error        (a) student actions vs the teacher reference's
teacher_action_error        (b) teacher-k actions vs the teacher reference's (the baseline)
student_video_error         (e) student future latents vs the reference's
teacher_video_error         teacher-k future latents vs the reference's
*_data_error                (c) vs the dataset's targets (``actions`` / ``future``), when it has them
student_spread              (d) per condition, the std across seeds of each action element,
teacher_spread                  averaged over elements and conditions (student, teacher-k); the
spread_ratio                    reference's is ``EvalReport.reference_spread``; ratio = student /
                                reference: about 1 for a student that keeps the teacher's modes,
                                about 0 for a collapsed one
==========================  ===================================================================

Stochastic samplers (``consistency`` with more than one step, ``dpm++2m-sde``) draw fresh noise at
each step; to keep that noise a property of the row as well, such runs go one row at a time, each
with its own generator. A multistep consistency student re-noises its own x0 prediction with that
fresh noise, so from the 2nd step on it leaves the deterministic trajectory the reference follows
from the shared initial noise: its error vs the reference at k > 1 mixes in a choice among the
teacher's modes (judge those rows by the spread and the error vs data); at k = 1 it is deterministic.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from wam_fast.configs import WAMConfig
from wam_fast.distill.objectives import check_teacher_student
from wam_fast.ops.registry import note_fallback
from wam_fast import sampling

# Samplers that draw fresh noise inside the loop (at more than one step).
STOCHASTIC_SAMPLERS = ("consistency", "dpm++2m-sde")
CONDITION_FIELDS = ("text", "image", "history", "robot_id")
TARGET_FIELDS = ("future", "actions")


@dataclass
class StepResult:
    """The comparison at one step count (see the module docstring for each number)."""

    steps: int
    student_action_error: float
    teacher_action_error: float
    student_video_error: float
    teacher_video_error: float
    student_spread: float
    teacher_spread: float
    spread_ratio: float
    student_action_data_error: Optional[float] = None
    teacher_action_data_error: Optional[float] = None
    student_video_data_error: Optional[float] = None
    teacher_video_data_error: Optional[float] = None
    student_nfe: int = 0
    teacher_nfe: int = 0

    @property
    def action_error_ratio(self) -> float:
        """student / teacher-k action error vs the reference: < 1 when distillation helped."""
        return _ratio(self.student_action_error, self.teacher_action_error)


@dataclass
class EvalReport:
    """What ``evaluate`` measured: one ``StepResult`` per step count, plus the reference's numbers."""

    results: List[StepResult]
    num_conditions: int
    seeds: int
    cfg_scale: float
    reference_sampler: str
    reference_steps: int
    reference_nfe: int
    student_sampler: str
    student_method: str  # the student's config.distillation ("" for an undistilled model)
    teacher_mask: str
    student_mask: str
    reference_spread: float
    reference_action_data_error: Optional[float] = None
    reference_video_data_error: Optional[float] = None
    extra: Dict[str, object] = field(default_factory=dict)

    def result(self, steps: int) -> StepResult:
        for r in self.results:
            if r.steps == steps:
                return r
        raise KeyError(f"no result for {steps} steps; evaluated {[r.steps for r in self.results]}")

    def to_dict(self) -> dict:
        """JSON-ready (NaN becomes None)."""
        data = dataclasses.asdict(self)
        for row, result in zip(data["results"], self.results):
            row["action_error_ratio"] = result.action_error_ratio
        return _json_clean(data)


def _json_clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_clean(v) for v in x]
    return x


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def _fmt(x: Optional[float], width: int = 9, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-".rjust(width)
    return f"{x:{width}.{digits}f}"


def format_table(report: EvalReport) -> str:
    """A plain-text table of ``report``: one line per step count."""
    r = report
    method = r.student_method or "undistilled"
    lines = [
        f"student ({method}, mask={r.student_mask}, sampler {r.student_sampler}, no guidance) vs "
        f"teacher (mask={r.teacher_mask}, {r.reference_sampler} x {r.reference_steps} steps, "
        f"cfg {r.cfg_scale:g}, {r.reference_nfe} sample-forwards) from the same noise: "
        f"{r.num_conditions} conditions x {r.seeds} seeds",
        "action / video error = RMSE vs the teacher reference; teacher-k = the teacher sampled with k steps",
    ]
    has_data = r.reference_action_data_error is not None
    header = (f"{'steps':>5} | {'action err':>9} {'teacher-k':>9} {'ratio':>6} | {'video err':>9} {'teacher-k':>9} | "
              f"{'spread':>9} {'teacher-k':>9} {'vs ref':>6}")
    if has_data:
        header += f" | {'data act':>9} {'teacher-k':>9} | {'data vid':>9} {'teacher-k':>9}"
    lines += [header, "-" * len(header)]
    for s in r.results:
        line = (f"{s.steps:>5} | {_fmt(s.student_action_error)} {_fmt(s.teacher_action_error)} "
                f"{_fmt(s.action_error_ratio, 6, 3)} | "
                f"{_fmt(s.student_video_error)} {_fmt(s.teacher_video_error)} | "
                f"{_fmt(s.student_spread)} {_fmt(s.teacher_spread)} {_fmt(s.spread_ratio, 6, 3)}")
        if has_data:
            line += (f" | {_fmt(s.student_action_data_error)} {_fmt(s.teacher_action_data_error)} | "
                     f"{_fmt(s.student_video_data_error)} {_fmt(s.teacher_video_data_error)}")
        lines.append(line)
    tail = f"teacher reference: action spread {_fmt(r.reference_spread).strip()}"
    if has_data:
        tail += (f", data error actions {_fmt(r.reference_action_data_error).strip()}, "
                 f"video {_fmt(r.reference_video_data_error).strip()}")
    lines.append(tail)
    return "\n".join(lines)


# ---- checks ---------------------------------------------------------------------------------------
def _check_model(name: str, model) -> None:

    if not isinstance(getattr(model, "config", None), WAMConfig) or not callable(model):
        raise TypeError(f"{name} must be a WAMTransformer, got {type(model).__name__}")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _conditions_dict(conditions, data) -> Dict[str, torch.Tensor]:
    """conditions (LatentDataset or dict of tensors) + optional data targets -> one dict of CPU tensors."""
    if isinstance(conditions, Mapping):
        tensors = dict(conditions)
    elif hasattr(conditions, "get") and hasattr(conditions, "__len__"):
        tensors = conditions.get(torch.arange(len(conditions)))
    else:
        raise TypeError(f"conditions must be a LatentDataset or a dict of tensors "
                        f"(text, image, optional history / robot_id / future / actions), "
                        f"got {type(conditions).__name__}")
    if data is not None:
        if not isinstance(data, Mapping):
            if hasattr(data, "get") and hasattr(data, "__len__"):
                data = data.get(torch.arange(len(data)))
            else:
                raise TypeError(f"data must be a dict of target tensors (future, actions) or a LatentDataset, "
                                f"got {type(data).__name__}")
        for name in TARGET_FIELDS:
            if name in data:
                tensors[name] = data[name]
    for name in ("text", "image"):
        if name not in tensors:
            raise ValueError(f"conditions need {name!r} (text (N, text_len, text_dim) and image (N, 1, C, H, W)); "
                             f"got fields {sorted(tensors)}")
    n = tensors["text"].shape[0]
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"conditions[{name!r}] must be a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[0] != n:
            raise ValueError(f"conditions[{name!r}] has {x.shape[0] if x.dim() else 0} rows, text has {n}")
    if n == 0:
        raise ValueError("conditions are empty")
    return {k: v.detach().cpu() for k, v in tensors.items()}


def _check_conditions(tensors: Dict[str, torch.Tensor], config) -> None:
    c = config
    frame = (c.latent_channels, c.latent_height, c.latent_width)
    expected = {"text": (c.text_len, c.text_dim), "image": (1,) + frame,
                "future": (c.latent_frames - 1,) + frame, "actions": (c.action_len, c.action_dim)}
    problems = []
    for name, shape in expected.items():
        if name in tensors and tuple(tensors[name].shape[1:]) != shape:
            problems.append(f"{name}: expected per-row shape {shape}, got {tuple(tensors[name].shape[1:])}")
    if "history" in tensors and tuple(tensors["history"].shape[2:]) != frame:
        problems.append(f"history: expected per-frame shape {frame}, got {tuple(tensors['history'].shape[2:])}")
    if c.num_robots and "robot_id" not in tensors:
        problems.append(f"robot_id: the models have a robot-id embedding ({c.num_robots} robots) but the "
                        "conditions have no robot_id")
    if problems:
        raise ValueError("the conditions do not fit the models: " + "; ".join(problems))


# ---- noise ----------------------------------------------------------------------------------------
def _row_seed(noise_seed: int, condition: int, seed: int, stream: str = "initial") -> int:
    """A 63-bit seed of one (condition, seed) pair: the row's noise does not depend on batching.
    ``stream`` "initial": its initial noise; "sampler": the noise a stochastic sampler draws later."""
    digest = hashlib.blake2b(f"{noise_seed}:{condition}:{seed}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def row_noise(config, row_seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """float32 (latent_frames, C, H, W) video noise and (K, A) action noise of one row."""
    g = torch.Generator("cpu").manual_seed(row_seed)
    video = torch.randn((config.latent_frames, config.latent_channels, config.latent_height, config.latent_width),
                        generator=g)
    return video, torch.randn((config.action_len, config.action_dim), generator=g)


def _future(config, video: Optional[torch.Tensor], rows: int) -> torch.Tensor:
    """The future latent frames 1.. a model sampled (frame 0 dropped for full; a temporal model's are
    the future ones, the first ``future_frames`` of them: (rows, 0, C, H, W) for an action-only model)."""
    if video is None:
        return torch.zeros((rows, 0, config.latent_channels, config.latent_height, config.latent_width))
    return video[:, 1:] if config.mask == "full" else video


def _video_rmse(x: torch.Tensor, y: torch.Tensor) -> float:
    """``_rmse`` over the future frames both have (x's, the first of y's); nan when x has none (an
    action-only model: no video to compare)."""
    if x.shape[1] == 0:
        return math.nan
    return _rmse(x, y[:, :x.shape[1]])


# ---- sampling -------------------------------------------------------------------------------------
@dataclass
class _Run:
    actions: torch.Tensor  # (R, K, A) float32 CPU, rows ordered (condition, seed)
    future: torch.Tensor  # (R, future frames the model predicts, C, H, W)
    nfe: int


def _sample_rows(model, tensors, row_conditions: torch.Tensor, sampler_seeds: Sequence[int], noises, *,
                 sampler: str, steps: int, cfg_scale: float, batch_size: int) -> _Run:

    config = model.config
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    # the frames of the row's noise a model denoises: all (full), or future frames 1..k (temporal)
    first = 0 if config.mask == "full" else 1
    noisy = slice(first, first + config.noisy_frames)
    # One row at a time when the sampler draws noise inside the loop (see the module docstring).
    chunk = 1 if sampler in STOCHASTIC_SAMPLERS and steps > 1 else batch_size
    if chunk == 1 and batch_size > 1:

        note_fallback("distill.evaluate", "one row per sample() call",
                       [f"sampler {sampler!r} with {steps} steps draws noise for the whole batch during sampling"])
    actions, future, nfe = [], [], 0
    for start in range(0, len(sampler_seeds), chunk):
        rows = row_conditions[start:start + chunk]
        inputs = {"text": tensors["text"][rows].to(device=device, dtype=dtype),
                  "image": tensors["image"][rows].to(device=device, dtype=dtype)}
        if config.history_frames and "history" in tensors and tensors["history"].shape[1]:
            inputs["history"] = tensors["history"][rows][:, -config.history_frames:].to(device=device, dtype=dtype)
        if config.num_robots:
            inputs["robot_id"] = tensors["robot_id"][rows].to(device=device, dtype=torch.long)
        video_noise = torch.stack([noises[i][0] for i in range(start, start + len(rows))])
        action_noise = torch.stack([noises[i][1] for i in range(start, start + len(rows))])
        out = sampling.sample(model, inputs["text"], inputs["image"], sampler=sampler, steps=steps,
                              cfg_scale=cfg_scale, seed=sampler_seeds[start] if chunk == 1 else 0, return_video=True,
                              history=inputs.get("history"), robot_id=inputs.get("robot_id"),
                              noise=(video_noise[:, noisy], action_noise))
        actions.append(out.actions.float().cpu())
        future.append(_future(config, None if out.video is None else out.video.float().cpu(), len(rows)))
        nfe = out.nfe
    return _Run(torch.cat(actions), torch.cat(future), nfe)


def _rmse(x: torch.Tensor, y: torch.Tensor) -> float:
    """Per-row RMSE over all elements, averaged over rows."""
    return (x - y).flatten(1).pow(2).mean(1).sqrt().mean().item()


def _spread(actions: torch.Tensor, num_conditions: int, seeds: int) -> float:
    """Mean over conditions and elements of the std across seeds (nan with one seed)."""
    if seeds < 2:
        return math.nan
    return actions.reshape(num_conditions, seeds, -1).std(dim=1).mean().item()


# ---- evaluate -------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(teacher, student, conditions, *, steps: Optional[Sequence[int]] = None, seeds: int = 4,
             teacher_sampler: Optional[str] = None, teacher_steps: Optional[int] = None,
             cfg_scale: Optional[float] = None, batch_size: int = 64, data=None,
             noise_seed: int = 0) -> EvalReport:
    """Compare ``student`` with ``teacher`` from the same noise on ``conditions`` (module docstring).

    teacher, student  WAMTransformers with the same backbone and data shapes
               (``objectives.check_teacher_student``); the student may differ in mask, history and
               its distillation fields
    conditions a LatentDataset or a dict of tensors: text (N, text_len, text_dim), image (N, 1, C, H, W),
               optional history (N, h, C, H, W), robot_id (N,), and targets future (N, latent_frames - 1,
               C, H, W) / actions (N, K, A) for the errors vs data
    steps      the student's step counts (default ``student.config.distilled_steps``)
    seeds      noise draws per condition (>= 2 for the spread)
    teacher_sampler, teacher_steps   the reference (default ``sampling.default_options(teacher.config)``)
    cfg_scale  guidance of the reference and teacher-k (default ``student.config.distilled_cfg_scale``
               for a distilled student, else the teacher's default)
    batch_size rows (condition x seed) per sampling call; results do not depend on it
    data       optional targets (dict with future / actions, or a LatentDataset) aligned with conditions
    noise_seed seeds every row's noise generator
    """

    _check_model("teacher", teacher)
    _check_model("student", student)
    check_teacher_student(teacher.config, student.config)
    seeds = _positive_int("seeds", seeds)
    batch_size = _positive_int("batch_size", batch_size)
    if isinstance(noise_seed, bool) or not isinstance(noise_seed, numbers.Integral):
        raise TypeError(f"noise_seed must be an int, got {type(noise_seed).__name__}")
    sc = student.config
    distilled = bool(sc.distillation)
    if steps is None:
        if not distilled:
            raise ValueError("the student is not distilled (config.distillation is empty), so it has no "
                             "distilled_steps: pass steps=")
        steps = sc.distilled_steps
    if isinstance(steps, numbers.Integral) and not isinstance(steps, bool):
        steps = (steps,)
    steps = tuple(_positive_int("each step count", k) for k in steps)
    if not steps or list(steps) != sorted(set(steps)):
        raise ValueError(f"steps must be a non-empty, strictly increasing list of step counts, got {steps}")

    ref_sampler, ref_steps, ref_cfg = sampling.default_options(teacher.config)
    ref_sampler = teacher_sampler if teacher_sampler is not None else ref_sampler
    ref_steps = teacher_steps if teacher_steps is not None else ref_steps
    if cfg_scale is None:
        cfg_scale = sc.distilled_cfg_scale if distilled else ref_cfg
    cfg_scale = float(cfg_scale)
    if distilled:
        student_sampler, _, _ = sampling.default_options(sc)
        student_cfg = 1.0
    else:
        student_sampler, student_cfg = ref_sampler, cfg_scale

    tensors = _conditions_dict(conditions, data)
    _check_conditions(tensors, teacher.config)
    n = tensors["text"].shape[0]
    row_conditions = torch.arange(n).repeat_interleave(seeds)
    pairs = [(i, s) for i in range(n) for s in range(seeds)]
    noises = [row_noise(teacher.config, _row_seed(int(noise_seed), i, s)) for i, s in pairs]
    sampler_seeds = [_row_seed(int(noise_seed), i, s, "sampler") for i, s in pairs]

    def run(model, sampler, k, cfg):
        return _sample_rows(model, tensors, row_conditions, sampler_seeds, noises, sampler=sampler, steps=k,
                            cfg_scale=cfg, batch_size=batch_size)

    reference = run(teacher, ref_sampler, ref_steps, cfg_scale)
    targets = {name: tensors[name].float().repeat_interleave(seeds, 0) for name in TARGET_FIELDS if name in tensors}

    def data_error(r: _Run, name: str) -> Optional[float]:
        if name not in targets:
            return None
        return _rmse(r.actions, targets[name]) if name == "actions" else _video_rmse(r.future, targets[name])

    reference_spread = _spread(reference.actions, n, seeds)
    results = []
    for k in steps:
        stu = run(student, student_sampler, k, student_cfg)
        tk = run(teacher, ref_sampler, k, cfg_scale)
        student_spread = _spread(stu.actions, n, seeds)
        results.append(StepResult(
            steps=k,
            student_action_error=_rmse(stu.actions, reference.actions),
            teacher_action_error=_rmse(tk.actions, reference.actions),
            student_video_error=_video_rmse(stu.future, reference.future),
            teacher_video_error=_video_rmse(tk.future, reference.future),
            student_spread=student_spread,
            teacher_spread=_spread(tk.actions, n, seeds),
            spread_ratio=_ratio(student_spread, reference_spread),
            student_action_data_error=data_error(stu, "actions"),
            teacher_action_data_error=data_error(tk, "actions"),
            student_video_data_error=data_error(stu, "future"),
            teacher_video_data_error=data_error(tk, "future"),
            student_nfe=stu.nfe, teacher_nfe=tk.nfe))
    return EvalReport(
        results=results, num_conditions=n, seeds=seeds, cfg_scale=cfg_scale, reference_sampler=ref_sampler,
        reference_steps=int(ref_steps), reference_nfe=reference.nfe, student_sampler=student_sampler,
        student_method=sc.distillation, teacher_mask=teacher.config.mask, student_mask=sc.mask,
        reference_spread=reference_spread, reference_action_data_error=data_error(reference, "actions"),
        reference_video_data_error=data_error(reference, "future"))
