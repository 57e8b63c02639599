"""WAMConfig and the named workloads of docs/design.md, Workloads ("tiny", "videovla-5b", "videovla-5b-sim")."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

MASKS = ("full", "temporal")
OBJECTIVES = ("v_prediction", "flow_matching")
DISTILLATIONS = ("", "shortcut", "consistency")  # "" = a teacher (undistilled model)


@dataclass(frozen=True)
class WAMConfig:
    """Hyper-parameters of a world action model (video latents + action chunk, denoised together).

    ``mask="full"`` is VideoVLA's layout: text | video (all frames noisy, the clean image latent
    concatenated channel-wise) | actions, everything attends to everything.
    ``mask="temporal"`` is the cacheable layout of docs/design.md, KV cache: text | history frames
    (clean, up to ``history_frames``) | current frame (clean) | future frames + actions (noisy);
    text sees text, each clean frame sees the text and itself, the noisy tokens see everything
    (``wam_fast.models.layout``). ``dataclasses.replace(cfg, mask="temporal")``
    gives the masked variant of a preset with the same weights.

    Distilled students (``wam_fast.distill``, docs/design.md, Distillation): ``distillation`` is "" for a
    teacher, "shortcut" (the model gains a step-size embedding ``step_embed`` and takes
    ``step_size`` in forward) or "consistency"; ``distilled_steps`` are the step counts it was
    distilled for (e.g. (1, 2, 4)); ``distilled_cfg_scale`` is the classifier-free guidance scale
    baked into it (a student samples with cfg_scale 1). ``wam_fast.sampling.default_options`` turns
    these into the sampler, steps and guidance ``sample()`` and ``WAMPolicy`` use by default.

    Action-only models (docs/design.md, Distillation: Action-only students): with ``mask="temporal"``,
    ``future_frames=k`` (0 <= k < latent_frames) makes the noisy tokens the action chunk plus only the
    first k future frames; ``future_frames=0`` predicts no video at all (``ActionChunk.video`` is None).
    None (the default) denoises every future frame. ``latent_frames`` stays the clip length of the
    data the model learned from (a student keeps its teacher's), and the weights are the same either way.

    ``action_prefix=True`` (a student distilled with ``--prefix-fraction``): forward takes ``committed``
    (B, action_len, 1) bool, the action rows that are clean committed actions, not noise; their tokens gain
    the learned ``action_embed.committed`` vector. Real-time chunking gives such a model the actions the
    robot executes while it infers, and the chunk continues them (``wam_fast.prefix``).
    """

    name: str = "custom"
    num_layers: int = 2
    num_heads: int = 4
    head_dim: int = 16
    ffn_mult: int = 4
    time_embed_dim: int = 32
    text_len: int = 8
    text_dim: int = 32
    latent_channels: int = 4
    image_concat: bool = True  # patch embedding takes [latent, image latent] channels (VideoVLA)
    latent_frames: int = 2  # all latent frames of a clip, the current observation's included
    latent_height: int = 8
    latent_width: int = 8
    patch_size: int = 2
    action_len: int = 4
    action_dim: int = 7
    num_robots: int = 0  # > 0 adds a robot-id embedding to the action tokens
    mask: str = "full"
    history_frames: int = 0  # temporal mask only: most clean past frames a forward may carry
    rope_axes_dim: Optional[Tuple[int, int, int]] = None  # (t, h, w); default head_dim/4, 3/8, 3/8
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm_eps: float = 1e-6
    objective: str = "v_prediction"
    num_train_timesteps: int = 1000
    distillation: str = ""  # "" (teacher), "shortcut" or "consistency"
    distilled_steps: Tuple[int, ...] = ()  # step counts a student was distilled for, increasing
    distilled_cfg_scale: float = 1.0  # guidance scale baked into a student
    future_frames: Optional[int] = None  # temporal only: future frames denoised (None: all; 0: action-only)
    action_prefix: bool = False  # reads committed actions as clean, flagged action rows (wam_fast.prefix)

    def __post_init__(self):
        def positive(field_name):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"WAMConfig.{field_name} must be a positive int, got {value!r}")

        for field_name in ("num_layers", "num_heads", "head_dim", "ffn_mult", "time_embed_dim",
                           "text_len", "text_dim", "latent_channels", "latent_frames",
                           "latent_height", "latent_width", "patch_size", "action_len",
                           "action_dim", "num_train_timesteps"):
            positive(field_name)
        self._check_types()
        if self.mask not in MASKS:
            raise ValueError(f"WAMConfig.mask must be one of {MASKS}, got {self.mask!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"WAMConfig.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.history_frames and self.mask != "temporal":
            raise ValueError(f"WAMConfig.history_frames={self.history_frames} needs mask='temporal' "
                             f"(history frames are clean context), got mask={self.mask!r}")
        if self.mask == "temporal" and self.latent_frames < 2:
            raise ValueError("mask='temporal' splits the clip into a clean current frame and noisy "
                             f"future frames, so latent_frames must be >= 2, got {self.latent_frames}")
        for side in ("latent_height", "latent_width"):
            if getattr(self, side) % self.patch_size:
                raise ValueError(f"WAMConfig.{side}={getattr(self, side)} is not divisible by "
                                 f"patch_size={self.patch_size}")
        axes = self.rope_axes
        if sum(axes) != self.head_dim or any(a <= 0 or a % 2 for a in axes):
            raise ValueError(f"rope_axes_dim {axes} must be three positive even sizes summing to "
                             f"head_dim={self.head_dim}")
        self._check_distillation()
        self._check_future_frames()

    def _check_future_frames(self) -> None:
        k = self.future_frames
        if k is None:
            return
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.latent_frames:
            raise ValueError(f"WAMConfig.future_frames must be None (all future frames) or an int in "
                             f"[0, {self.latent_frames - 1}] (latent_frames - 1), got {k!r}")
        if self.mask != "temporal":
            raise ValueError(f"WAMConfig.future_frames={k} needs mask='temporal' (the current frame is clean "
                             f"context there, so the noisy tokens can leave out future frames); got mask={self.mask!r}")

    def _check_types(self) -> None:
        """Fields without a range check of their own: types, signs, finiteness (a NaN eps or theta
        would only show as NaN outputs)."""
        for field_name in ("name", "mask", "objective", "distillation"):
            if not isinstance(getattr(self, field_name), str):
                raise ValueError(f"WAMConfig.{field_name} must be a str, got {getattr(self, field_name)!r}")
        if not isinstance(self.image_concat, bool):
            raise ValueError(f"WAMConfig.image_concat must be a bool, got {self.image_concat!r}")
        for field_name in ("num_robots", "history_frames"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"WAMConfig.{field_name} must be an int >= 0, got {value!r}")
        for field_name in ("rope_theta", "norm_eps", "qk_norm_eps"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"WAMConfig.{field_name} must be a finite number > 0, got {value!r}")
            object.__setattr__(self, field_name, float(value))
        axes = self.rope_axes_dim
        if axes is not None:
            if not isinstance(axes, (tuple, list)) or len(axes) != 3 or any(
                    isinstance(a, bool) or not isinstance(a, int) for a in axes):
                raise ValueError(f"WAMConfig.rope_axes_dim must be None or three ints (t, h, w), got {axes!r}")
            object.__setattr__(self, "rope_axes_dim", tuple(axes))  # hashable, as from_dict stores it

    def _check_distillation(self) -> None:
        if self.distillation not in DISTILLATIONS:
            raise ValueError(f"WAMConfig.distillation must be one of {DISTILLATIONS} ('' for a teacher), "
                             f"got {self.distillation!r}")
        steps = self.distilled_steps
        if not isinstance(steps, (tuple, list)) or any(
                isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in steps):
            raise ValueError(f"WAMConfig.distilled_steps must be a tuple of ints, got {steps!r}")
        steps = tuple(int(s) for s in steps)  # a list (JSON, by hand) is stored as the hashable tuple
        object.__setattr__(self, "distilled_steps", steps)
        if self.distillation and not steps:
            raise ValueError(f"WAMConfig.distillation={self.distillation!r} needs distilled_steps, the step "
                             f"counts the student was distilled for (e.g. (1, 2, 4)), got {steps!r}")
        if not self.distillation and steps:
            raise ValueError(f"WAMConfig.distilled_steps={steps!r} given for a teacher (distillation=''); "
                             f"set distillation='shortcut' or 'consistency', or leave distilled_steps empty")
        if any(not 1 <= s <= self.num_train_timesteps for s in steps) or \
                any(a >= b for a, b in zip(steps, steps[1:])):
            raise ValueError(f"WAMConfig.distilled_steps must be strictly increasing ints in "
                             f"[1, {self.num_train_timesteps}] (num_train_timesteps), got {steps!r}")
        scale = self.distilled_cfg_scale
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale < 0:
            raise ValueError(f"WAMConfig.distilled_cfg_scale must be a finite number >= 0, got {scale!r}")
        object.__setattr__(self, "distilled_cfg_scale", float(scale))
        if not self.distillation and scale != 1.0:
            raise ValueError(f"WAMConfig.distilled_cfg_scale={scale!r} given for a teacher (distillation=''): "
                             f"a teacher takes its guidance scale at sampling time (cfg_scale); "
                             f"distilled_cfg_scale is the scale baked into a student")

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def hidden_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def ffn_dim(self) -> int:
        return self.ffn_mult * self.hidden_dim

    @property
    def in_channels(self) -> int:
        return self.latent_channels * (2 if self.image_concat else 1)

    @property
    def rope_axes(self) -> Tuple[int, int, int]:
        if self.rope_axes_dim is not None:
            return tuple(self.rope_axes_dim)
        t = self.head_dim // 4
        hw = (self.head_dim - t) // 2
        return (t, hw, self.head_dim - t - hw)

    @property
    def tokens_per_frame(self) -> int:
        return (self.latent_height // self.patch_size) * (self.latent_width // self.patch_size)

    @property
    def noisy_frames(self) -> int:
        """Latent frames the model denoises: all of them (full), the future ones (temporal), or the
        first ``future_frames`` of those."""
        if self.mask == "full":
            return self.latent_frames
        return self.latent_frames - 1 if self.future_frames is None else self.future_frames

    @property
    def action_only(self) -> bool:
        """True when the model denoises no video: its noisy tokens are the action chunk alone."""
        return self.noisy_frames == 0

    @property
    def num_tokens(self) -> int:
        """Tokens of one sample-forward with the current frame and no history."""
        frames = self.noisy_frames + (1 if self.mask == "temporal" else 0)
        return self.text_len + frames * self.tokens_per_frame + self.action_len

    @property
    def noisy_tokens(self) -> int:
        """Tokens that change at each denoising step (what a KV-cached step runs)."""
        return self.noisy_frames * self.tokens_per_frame + self.action_len

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for name, default in (("future_frames", None), ("action_prefix", False)):
            if data[name] == default:  # the default, left out: files of earlier versions still match
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "WAMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown WAMConfig fields {unknown}; known fields: {sorted(known)}")
        data = dict(data)
        for name in ("rope_axes_dim", "distilled_steps"):  # JSON has lists; the config holds tuples
            if isinstance(data.get(name), list):
                data[name] = tuple(data[name])
        return cls(**data)


_PRESETS = {
    "tiny": WAMConfig(name="tiny"),
    # VideoVLA real-robot config on CogVideoX-5B: 256x256 images, 13 frames -> 4 latent frames of 32x32.
    "videovla-5b": WAMConfig(
        name="videovla-5b", num_layers=42, num_heads=48, head_dim=64, time_embed_dim=512,
        text_len=226, text_dim=4096, latent_channels=16, latent_frames=4, latent_height=32,
        latent_width=32, patch_size=2, action_len=6, action_dim=7),
}
# VideoVLA simulation config: 49 frames -> 13 latent frames.
_PRESETS["videovla-5b-sim"] = dataclasses.replace(
    _PRESETS["videovla-5b"], name="videovla-5b-sim", latent_frames=13)


def names() -> Tuple[str, ...]:
    return tuple(_PRESETS)


def get(name: str, **overrides) -> WAMConfig:
    """A preset by name, optionally with fields replaced: ``get("tiny", mask="temporal")``."""
    if name not in _PRESETS:
        raise ValueError(f"unknown workload {name!r}; expected one of {names()}")
    return dataclasses.replace(_PRESETS[name], **overrides) if overrides else _PRESETS[name]
