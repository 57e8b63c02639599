"""Meta-World MT1 for world action models: rendering, scripted-expert demonstrations, closed-loop episodes.

    env = MetaWorldEnv("push-v3", split="heldout")     # layouts of metaworld.MT1(task, seed=1)
    image = env.reset(layout=0)                        # (64, 64, 3) uint8, upright, "corner" camera
    image, success = env.step(action)                  # action: 4 numbers in [-1, 1]

The observation is the rendered image only (no proprioception, no goal vector): 64x64 RGB from a
corner camera, upright (MuJoCo renders corner cameras upside down, so both axes are flipped). Shadows,
multisampling, reflections and the skybox are off, which makes a render ~10 ms on a CPU.
Layouts (object and goal positions) come from ``metaworld.MT1(task, seed)``: seed 0 ("train") for
demonstrations, seed 1 ("heldout") for evaluation; any MT1 task name works.

The model's latent space is pixel patches: ``image_to_latent`` maps uint8 RGB to (3, 64, 64) in
[-1, 1] and the model's patch embedding (``patch_size``) makes the tokens. The instruction is a
fixed embedding per task (``instruction_embedding``), since MT1 trains one task per model.

Demonstrations (``collect_demos``) run Meta-World's own scripted expert (``metaworld.policies``)
with Gaussian noise added to the executed actions for some episodes (DART-style, so the data visits
states near the expert's path), labelled with the expert's clean actions. Every control step t of an
episode becomes one sample: image_t, the frame after the chunk (image_{t+K}) and the expert's chunk
a_t .. a_{t+K-1}.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from wam_fast.distill.data import DatasetWriter
from wam_fast.pipeline.encoders import images_from_pixels
from wam_fast.utils import optional

logger = logging.getLogger("wam_fast.eval")

INSTALL = 'pip install "wam_fast[sim]"  (or: pip install metaworld packaging)'
SPLITS = {"train": 0, "heldout": 1}  # split -> seed of metaworld.MT1
IMAGE_SIZE = 64
CAMERA = "corner"


def require_metaworld() -> None:
    """Raise ImportError with the install line when Meta-World (or MuJoCo) is missing."""
    missing = [name for name in ("metaworld", "mujoco", "packaging") if not optional.installed(name)]
    if missing:
        raise ImportError(f"Meta-World evaluation needs {', '.join(missing)}, which is not installed: {INSTALL}")


def _import_metaworld():
    require_metaworld()
    os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must be set before mujoco loads
    if optional.installed("triton"):
        # Loading libtriton after an EGL context exists segfaults here (both bundle LLVM), and torch
        # imports triton lazily (e.g. in the first optimizer), so it is loaded before any render.
        importlib.import_module("triton")
    import metaworld

    return metaworld


def task_names() -> List[str]:
    """Every MT1 task name (e.g. "push-v3", "drawer-open-v3")."""
    metaworld = _import_metaworld()
    return sorted(metaworld.ALL_V3_ENVIRONMENTS)


def check_task(task: str) -> str:
    names = task_names()
    if task not in names:
        close = [n for n in names if task.split("-")[0] in n][:5]
        raise ValueError(f"unknown Meta-World task {task!r}; expected an MT1 task name such as "
                         f"'push-v3' or 'drawer-open-v3'{f' (close: {close})' if close else ''}; "
                         f"all {len(names)} are listed by wam_fast.eval.metaworld.task_names()")
    return task


def expert_policy(task: str):
    """Meta-World's scripted expert for ``task`` (``metaworld.policies.Sawyer<Task>V3Policy``)."""
    _import_metaworld()
    import metaworld.policies as policies

    name = "Sawyer" + "".join(part.capitalize() for part in re.split(r"[-_]", task.removesuffix("-v3"))) + "V3Policy"
    cls = getattr(policies, name, None)
    if cls is None:
        raise ValueError(f"Meta-World has no scripted expert for {task!r} (looked for metaworld.policies.{name})")
    return cls()


def instruction_embedding(task: str, text_len: int, text_dim: int) -> torch.Tensor:
    """A fixed (text_len, text_dim) N(0, 1) embedding per task name (seeded by the name's sha256)."""
    seed = int.from_bytes(hashlib.sha256(task.encode()).digest()[:8], "little")
    return torch.randn((text_len, text_dim), generator=torch.Generator().manual_seed(seed))


def image_to_latent(image: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) uint8 RGB -> (..., 3, H, W) float32 in [-1, 1]: the pixel-patch latent space."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 RGB image array (..., H, W, 3), got "
                         f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")
    return torch.from_numpy(np.ascontiguousarray(image)).movedim(-1, -3).float() / 127.5 - 1.0


def latent_to_image(latent: torch.Tensor) -> np.ndarray:
    """Inverse of ``image_to_latent`` (clamped): (..., 3, H, W) -> (..., H, W, 3) uint8."""
    return images_from_pixels(latent)


@functools.lru_cache(maxsize=None)
def _benchmark(task: str, seed: int):
    """``metaworld.MT1(task, seed)``: its 50 layouts (about a second to build, so built once)."""
    return _import_metaworld().MT1(task, seed=seed)


class MetaWorldEnv:
    """One MT1 task with rendered observations. ``split``: "train" (MT1 seed 0) or "heldout" (seed 1)."""

    def __init__(self, task: str, split: str = "heldout", *, camera: str = CAMERA, size: int = IMAGE_SIZE):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        _import_metaworld()
        import mujoco

        self.task, self.split, self.camera, self.size = check_task(task), split, camera, size
        benchmark = _benchmark(task, SPLITS[split])
        self.layouts = list(benchmark.train_tasks)
        self.env = benchmark.train_classes[task](render_mode="rgb_array", camera_name=camera, width=size,
                                                 height=size)
        model = self.env.model
        model.vis.quality.offsamples = 0  # no multisampling (read when the render context is made)
        model.vis.quality.shadowsize = 0
        model.mat_reflectance[:] = 0
        self.max_steps = int(self.env.max_path_length)
        self._viewer = None
        self._flags = (mujoco.mjtRndFlag.mjRND_SKYBOX, mujoco.mjtRndFlag.mjRND_SHADOW,
                       mujoco.mjtRndFlag.mjRND_REFLECTION)
        self.obs = None

    @property
    def num_layouts(self) -> int:
        return len(self.layouts)

    def reset(self, layout: int) -> np.ndarray:
        """Start an episode on layout ``layout`` (0 .. num_layouts-1); returns the first image."""
        if not 0 <= layout < self.num_layouts:
            raise ValueError(f"layout must be in [0, {self.num_layouts}) for {self.task} ({self.split}), got {layout}")
        import mujoco

        self.env.set_task(self.layouts[layout])
        self.obs, _ = self.env.reset()
        # Meta-World's reset leaves some derived positions the renderer reads as the last episode left them
        # (2 pixels of the first frame differed after an episode), so a row's success depended on the rows
        # evaluated before it on the same envs. Recompute only those: a full mj_forward would also change
        # the next steps' physics in the last float bits, and the demonstrations with them.
        model, data = self.env.unwrapped.model, self.env.unwrapped.data
        mujoco.mj_kinematics(model, data)
        mujoco.mj_comPos(model, data)
        mujoco.mj_camlight(model, data)
        self.steps = 0
        return self.render()

    def render(self) -> np.ndarray:
        """The current (size, size, 3) uint8 image, upright."""
        image = self.env.render()
        if self._viewer is None:  # the render context exists after the first render: switch effects off
            self._viewer = self.env.mujoco_renderer._get_viewer("rgb_array")
            for flag in self._flags:
                self._viewer.scn.flags[flag] = 0
            image = self.env.render()
        return np.ascontiguousarray(image[::-1, ::-1])  # corner cameras render upside down

    def step(self, action, render: bool = True):
        """Execute one action (clipped to [-1, 1]); returns (image or None, success)."""
        action = np.clip(np.asarray(action, dtype=np.float64).reshape(4), -1.0, 1.0)
        self.obs, _, _, _, info = self.env.step(action)
        self.steps += 1
        return (self.render() if render else None), bool(info["success"])

    def expert_action(self, expert) -> np.ndarray:
        """The scripted expert's action for the current state, clipped to [-1, 1]."""
        return np.clip(expert.get_action(self.obs), -1.0, 1.0).astype(np.float32)

    def close(self) -> None:
        self.env.close()


# ---- demonstrations --------------------------------------------------------------------------------
@dataclass
class Episode:
    images: np.ndarray  # (T + 1, H, W, 3) uint8: the image before each step, and the last one
    actions: np.ndarray  # (T, 4) the expert's clean actions at the visited states
    success_step: Optional[int]  # first step after which info["success"] held, None if never
    route: Optional[str] = None  # the route a multimodal expert drew for this episode (eval.routes)


def expert_episode(env: MetaWorldEnv, expert, layout: int, *, noise: float = 0.0, horizon: int = 200,
                   extra_steps: int = 0, rng: Optional[np.random.Generator] = None) -> Episode:
    """Run the expert on ``layout``, executing its action plus N(0, noise^2); stop ``extra_steps``
    after the first success (so the chunks near the end are complete) or at ``horizon``. An expert with
    ``reset(rng)`` (a multimodal one, ``eval.routes``) draws its episode's route from ``rng`` first."""
    rng = rng if rng is not None else np.random.default_rng(0)
    route = expert.reset(rng) if hasattr(expert, "reset") else None
    images, actions, success_step = [env.reset(layout)], [], None
    for t in range(horizon):
        action = env.expert_action(expert)
        executed = action + (rng.normal(0.0, noise, size=4).astype(np.float32) if noise > 0 else 0.0)
        image, success = env.step(executed)
        images.append(image)
        actions.append(action)
        if success and success_step is None:
            success_step = t + 1
        if success_step is not None and t + 1 >= success_step + extra_steps:
            break
    return Episode(np.stack(images), np.stack(actions), success_step, route)


def episode_samples(episode: Episode, chunk: int) -> Dict[str, torch.Tensor]:
    """Samples of every step t with a complete chunk: image_t, future image_{t+chunk}, actions t..t+chunk-1."""
    steps = len(episode.actions)
    starts = np.arange(0, steps - chunk + 1)
    latents = image_to_latent(episode.images)
    return {"image": latents[starts][:, None],
            "future": latents[starts + chunk][:, None],
            "actions": torch.from_numpy(np.stack([episode.actions[s:s + chunk] for s in starts]))}


def collect_demos(task: str, directory: Union[str, Path], *, chunk: int, text_len: int, text_dim: int,
                  noise_levels: Sequence[float] = (0.0, 0.1, 0.2, 0.3), layouts: Optional[int] = None,
                  horizon: int = 200, seed: int = 0, camera: str = CAMERA, size: int = IMAGE_SIZE,
                  expert=None, progress: Callable[[str], None] = logger.info) -> dict:
    """Scripted-expert demonstrations on the train layouts (MT1 seed 0) -> a LatentDataset in ``directory``
    (float16 pixel latents; fields text, image, future, actions). One episode per (layout, noise level);
    episodes where the expert fails are dropped. ``expert``: default Meta-World's scripted one. Returns
    the dataset's metadata."""
    env = MetaWorldEnv(task, "train", camera=camera, size=size)
    expert = expert if expert is not None else expert_policy(task)
    layouts = env.num_layouts if layouts is None else min(int(layouts), env.num_layouts)
    rng = np.random.default_rng(seed)
    text = instruction_embedding(task, text_len, text_dim)
    start, kept, dropped, lengths, samples, routes = time.perf_counter(), 0, 0, [], 0, {}
    with DatasetWriter(directory, shard_size=4096, overwrite=True) as writer:
        for layout in range(layouts):
            for noise in noise_levels:
                episode = expert_episode(env, expert, layout, noise=noise, horizon=horizon, extra_steps=chunk, rng=rng)
                if episode.success_step is None or len(episode.actions) < chunk:
                    dropped += 1
                    continue
                rows = episode_samples(episode, chunk)
                n = len(rows["actions"])
                writer.add({"text": text.expand(n, -1, -1), "image": rows["image"].half(),
                            "future": rows["future"].half(), "actions": rows["actions"]})
                kept, samples = kept + 1, samples + n
                lengths.append(episode.success_step)
                if episode.route is not None:
                    routes[episode.route] = routes.get(episode.route, 0) + 1
            progress(f"demos {task}: layout {layout + 1}/{layouts}, {kept} episodes, {samples} samples "
                     f"({time.perf_counter() - start:.0f} s)")
        metadata = {"metaworld": {"task": task, "split": "train", "mt1_seed": SPLITS["train"], "layouts": layouts,
                                  "noise_levels": list(noise_levels), "episodes": kept, "failed_dropped": dropped,
                                  "horizon": horizon, "chunk": chunk, "camera": camera, "size": size,
                                  "seed": seed, "mean_success_step": float(np.mean(lengths)) if lengths else None}}
        if routes:
            metadata["metaworld"]["routes"] = dict(sorted(routes.items()))
        writer.close(metadata)
    env.close()
    return metadata
