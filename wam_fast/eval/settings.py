"""The fidelity run's settings: the evaluated rows (``MODELS``), ``Settings`` with the per-task
``TASK_SETTINGS`` on top, and the teacher's ``model_config``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from wam_fast.configs import WAMConfig
from wam_fast.eval import autoencoder
from wam_fast.eval import metaworld as mw


@dataclass(frozen=True)
class ModelRow:
    """One evaluated policy: which checkpoint, how it samples, and how it is compiled."""

    name: str
    source: str  # "teacher", or a key of STUDENTS: "shortcut", "consistency", "action-only-shortcut", ...
    steps: int
    cache: bool = False
    fp8: bool = False

    @property
    def precision(self) -> str:
        return "fp8" if self.fp8 else "fp32"


DISTILL_METHODS = ("shortcut", "consistency")
# Each distilled student of the run: source name -> (method, future_frames). The action-only students
# (future_frames=0) denoise the action chunk alone: no predicted frame, the fastest chunk.
STUDENTS: Dict[str, Tuple[str, Optional[int]]] = {
    **{method: (method, None) for method in DISTILL_METHODS},
    **{f"action-only-{method}": (method, 0) for method in DISTILL_METHODS},
}
MODELS: Tuple[ModelRow, ...] = (
    ModelRow("teacher", "teacher", 10),
    ModelRow("teacher-1step", "teacher", 1),
    ModelRow("teacher-2step", "teacher", 2),
    *(ModelRow(f"{method}-{k}step", method, k, cache=True) for method in DISTILL_METHODS for k in (1, 2, 4)),
    *(ModelRow(f"shortcut-{k}step-fp8", "shortcut", k, cache=True, fp8=True) for k in (1, 2, 4)),
    *(ModelRow(f"action-only-{method}-{k}step", f"action-only-{method}", k, cache=True)
      for method in DISTILL_METHODS for k in (1, 2, 4)),
    ModelRow("action-only-shortcut-1step-fp8", "action-only-shortcut", 1, cache=True, fp8=True),
)


@dataclass
class Settings:
    """Everything a run computes from (stored in the results; a stage is reused only when they match)."""

    task: str
    episodes: int = 50
    horizon: int = 200  # control steps per episode (the expert needs 55-110 on push / drawer-open)
    execute: int = 4  # actions executed from each chunk before replanning
    chunk: int = 8
    latent_space: str = "pixels"  # "pixels": patches of the 64x64 frame; "autoencoder": eval.autoencoder, frozen
    patch_size: int = 16  # of the latent frame (64x64 pixels, or the autoencoder's 8x8 cells)
    autoencoder_channels: int = 16
    autoencoder_steps: int = 2500
    autoencoder_action_weight: float = 1.0
    num_layers: int = 4
    demo_layouts: int = 50
    noise_levels: Tuple[float, ...] = (0.0, 0.1, 0.2, 0.3)
    teacher_pretrain_steps: int = 0  # steps of the regression stage before the teacher's (0: none)
    teacher_pretrain_lr: float = 1e-3
    teacher_steps: int = 2000
    teacher_batch: int = 64
    teacher_lr: float = 1e-3
    action_weight: float = 1.0  # teacher loss = video MSE + action_weight * action MSE
    teacher_random_shift: int = 0  # both teacher stages: frames moved by up to this many pixels (augmentation)
    # Consistency distillation needs more steps than shortcut for its 1-step student: at 600 steps push-v3's
    # 1-step consistency student kept 80% of the teacher, at 1200 100% (README); shortcut kept 113% at 600.
    shortcut_distill_steps: int = 600
    consistency_distill_steps: int = 1200
    distill_batch: int = 64
    distill_lr: float = 3e-4
    solver_steps: int = 10
    seed: int = 0
    camera: str = mw.CAMERA
    expert: str = "metaworld"  # or "two-routes": the multimodal expert of eval.routes
    video_rounds: int = 3  # chunks per episode whose predicted frame is compared with the observed one
    models: Tuple[str, ...] = tuple(row.name for row in MODELS)

    @property
    def multimodal(self) -> bool:
        """Whether the demonstrations reach the goal by several routes (``expert`` "two-routes")."""
        return self.expert != "metaworld"

    def distill_steps(self, method: str) -> int:
        """Optimizer steps of ``python -m wam_fast.distill`` for the ``method`` student."""
        if method not in DISTILL_METHODS:
            raise ValueError(f"unknown distillation method {method!r}; expected one of {DISTILL_METHODS}")
        return getattr(self, f"{method}_distill_steps")

    @classmethod
    def for_task(cls, task: str) -> "Settings":
        """The full run's settings: the defaults, with ``TASK_SETTINGS[task]`` on top."""
        return cls(task=task, **TASK_SETTINGS.get(task, {}))

    @classmethod
    def smoke(cls, task: str) -> "Settings":
        """The CI version: the task's settings (camera, model) at 2 episodes and a few training steps."""
        smoke = dataclasses.replace(cls.for_task(task), episodes=2, horizon=12, demo_layouts=2, noise_levels=(0.0,),
                                    teacher_steps=3, teacher_batch=8, shortcut_distill_steps=2,
                                    consistency_distill_steps=2, distill_batch=8, num_layers=1, autoencoder_steps=2)
        return dataclasses.replace(smoke, teacher_pretrain_steps=min(2, smoke.teacher_pretrain_steps))


# push-v3: the expert re-lifts the hand 20 cm whenever it is more than 2 cm off the puck in x-y, so
# demonstrations with strong action noise are full of restarts; weaker noise keeps them on the expert's
# path. Over 16x16 pixel patches the teacher read the puck's few pixels only as a regressor of the chunk
# that memorised the 50 training layouts (42% held out; benchmarks/results/metaworld-push-v3-teacher-attempts.json),
# so push-v3's WAMs work on a frozen autoencoder's latents (eval.autoencoder: conv, 8x8 cells, trained to
# also predict the chunk), and the teacher starts from a regression stage on them, then trains at a lower lr.
# button-press-wall-v3: the multimodal task (eval.routes); the right route takes the expert up to ~170 steps.
TASK_SETTINGS = {"push-v3": {"noise_levels": (0.0, 0.03, 0.06, 0.1), "latent_space": "autoencoder", "patch_size": 2,
                             "teacher_pretrain_steps": 2000, "teacher_lr": 3e-4},
                 "button-press-wall-v3": {"expert": "two-routes", "horizon": 250}}


LATENT_SPACES = ("pixels", "autoencoder")


def model_config(settings: Settings):
    """The teacher: a small WAMTransformer over the latent frame (64x64 RGB pixels, or the frozen
    autoencoder's 8x8 cells; 16 tokens a frame at patch 16 / patch 2), the current frame and the frame
    after the chunk, a chunk of ``chunk`` 4-D actions."""
    if settings.latent_space == "pixels":
        channels, size = 3, mw.IMAGE_SIZE
    elif settings.latent_space == "autoencoder":
        channels, size = settings.autoencoder_channels, mw.IMAGE_SIZE // autoencoder.DOWNSAMPLE
    else:
        raise ValueError(f"latent_space must be one of {LATENT_SPACES}, got {settings.latent_space!r}")
    return WAMConfig(name=f"metaworld-{settings.task}", num_layers=settings.num_layers, num_heads=4, head_dim=32,
                     ffn_mult=4, time_embed_dim=128, text_len=4, text_dim=32, latent_channels=channels, image_concat=True,
                     latent_frames=2, latent_height=size, latent_width=size,
                     patch_size=settings.patch_size, action_len=settings.chunk, action_dim=4, mask="full")
