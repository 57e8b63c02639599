"""Synthetic latent data: ``SyntheticTask`` (a tiny bimodal task, its story in the class docstring),
``synthetic_task`` and ``make_synthetic_dataset`` (writes it as a latent dataset,
``wam_fast.distill.data``)."""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from wam_fast.configs import WAMConfig
from wam_fast.distill.data import DatasetWriter, row_seed
from wam_fast.distill.dataset_format import DEFAULT_SHARD_SIZE, PathLike


@dataclass(frozen=True)
class SyntheticTask:
    """The generative story of ``make_synthetic_dataset`` (constants drawn from ``seed``).

    A sample:
      1. instruction c, uniform over ``num_instructions``: text = ``texts[c]`` (fixed N(0, 1)
         embeddings, (text_len, text_dim)).
      2. scene s in {0, 1}, uniform ("which side the object is on"): image = (2s - 1) * pattern
         + IMAGE_NOISE * N(0, 1), pattern a fixed N(0, 1) latent (C, H, W). The scene is plain to
         see (the image's correlation with the pattern has sign 2s - 1).
      3. mode m in {2s, 2s + 1}, uniform: each instruction has 4 mode centres (``centres[c]``,
         distinct corners of the cube [-1, 1]^action_dim, or the levels -1.5, -0.5, 0.5, 1.5 when
         action_dim = 1), and the scene allows 2 of them. So given text and image the action
         distribution is bimodal (modes >= 2 apart, 1 when action_dim = 1: >= 10 in-mode stds): a sampler that averages
         modes (an undistilled teacher in 1 step) lands between them.
      4. robot r, uniform over num_robots (when num_robots > 0), with gain g_r = 1 + 0.5 r / num_robots
         (g = 1 without robots): every row of the action chunk is g_r * centres[c, m] + MODE_STD * N(0, 1).
      5. future frame j = 1 .. latent_frames - 1 (deterministic given image and mode):
         FRAME_DECAY**j * roll(image, j * d_m, width axis) + LEVELS[m], with the direction of motion
         d_m = +1 for even m, -1 for odd m: the two modes of a scene move the scene opposite ways and
         shift its level differently, so video and actions are coupled.
      6. history (history_frames > 0): the scene moved before at a direction d' = +-1 (uniform,
         independent of the mode): the frame a steps back is roll(image, -a * d'), oldest first.
    """

    config: object
    seed: int
    texts: torch.Tensor  # (num_instructions, text_len, text_dim)
    pattern: torch.Tensor  # (C, H, W)
    centres: torch.Tensor  # (num_instructions, 4, action_dim)

    IMAGE_NOISE = 0.25
    MODE_STD = 0.1
    IN_MODE = 0.5  # L-infinity distance to a mode centre below which a chunk is in that mode
    FRAME_DECAY = 0.8
    LEVELS = (-0.75, -0.25, 0.25, 0.75)
    BLOCK = 256  # samples drawn per generator: the data do not depend on how they are sharded

    @property
    def num_instructions(self) -> int:
        return self.texts.shape[0]

    def gains(self, robot: Optional[torch.Tensor], rows: int) -> torch.Tensor:
        """(rows,) action gain of each row's robot (1 without robots)."""
        if robot is None:
            return torch.ones(rows)
        return 1.0 + 0.5 * robot.float() / self.config.num_robots

    def future(self, image: torch.Tensor, mode: torch.Tensor) -> torch.Tensor:
        """(N, 1, C, H, W) image, (N,) mode -> (N, latent_frames - 1, C, H, W) future frames (step 5)."""
        frames = []
        forward = (mode % 2 == 0).view(-1, 1, 1, 1)
        level = torch.tensor(self.LEVELS)[mode].view(-1, 1, 1, 1)
        for j in range(1, self.config.latent_frames):
            moved = torch.where(forward, image[:, 0].roll(j, dims=-1), image[:, 0].roll(-j, dims=-1))
            frames.append(self.FRAME_DECAY ** j * moved + level)
        return torch.stack(frames, dim=1)

    def draw(self, num_samples: int, generator: torch.Generator):
        """(tensors, labels): ``num_samples`` samples of the story, all randomness from ``generator``.
        labels: instruction, scene, mode (LongTensors (N,)), robot (or None)."""
        c, n = self.config, num_samples
        instruction = torch.randint(self.num_instructions, (n,), generator=generator)
        scene = torch.randint(2, (n,), generator=generator)
        mode = 2 * scene + torch.randint(2, (n,), generator=generator)
        robot = torch.randint(c.num_robots, (n,), generator=generator) if c.num_robots else None
        sign = (2 * scene - 1).float().view(-1, 1, 1, 1, 1)
        image = sign * self.pattern + self.IMAGE_NOISE * torch.randn(
            (n, 1, c.latent_channels, c.latent_height, c.latent_width), generator=generator)
        gain = self.gains(robot, n).view(-1, 1, 1)
        actions = gain * self.centres[instruction, mode][:, None, :] + self.MODE_STD * torch.randn(
            (n, c.action_len, c.action_dim), generator=generator)
        tensors = {"text": self.texts[instruction], "image": image, "future": self.future(image, mode),
                   "actions": actions}
        if c.history_frames:
            came_forward = (torch.randint(2, (n,), generator=generator) == 1).view(-1, 1, 1, 1)  # d' = +1
            tensors["history"] = torch.stack(  # oldest (age history_frames) first
                [torch.where(came_forward, image[:, 0].roll(-age, dims=-1), image[:, 0].roll(age, dims=-1))
                 for age in range(c.history_frames, 0, -1)], dim=1)
        if robot is not None:
            tensors["robot_id"] = robot
        return tensors, {"instruction": instruction, "scene": scene, "mode": mode, "robot": robot}

    def samples(self, num_samples: int, start: int = 0):
        """Samples start .. start + num_samples - 1 of the task's fixed sequence (what
        ``make_synthetic_dataset`` writes): block b of BLOCK samples comes from its own generator,
        seeded ``row_seed(seed, b)``. Returns (tensors, labels) like ``draw``."""
        parts = []
        first, last = start // self.BLOCK, (start + num_samples - 1) // self.BLOCK
        for block in range(first, last + 1):
            tensors, labels = self.draw(self.BLOCK, torch.Generator().manual_seed(row_seed(self.seed, block)))
            lo = max(start - block * self.BLOCK, 0)
            hi = min(start + num_samples - block * self.BLOCK, self.BLOCK)
            parts.append(({k: v[lo:hi] for k, v in tensors.items()},
                          {k: None if v is None else v[lo:hi] for k, v in labels.items()}))
        tensors = {k: torch.cat([p[0][k] for p in parts]) for k in parts[0][0]}
        labels = {k: None if parts[0][1][k] is None else torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}
        return tensors, labels

    def classify(self, text: torch.Tensor, image: torch.Tensor, actions: torch.Tensor,
                 robot_id: Optional[torch.Tensor] = None):
        """Which allowed mode each action chunk is in, e.g. for samples of a model.

        Returns (instruction, scene, mode, distance): the instruction whose embedding is nearest
        the text, the scene from the image's sign against the pattern, the nearer of the scene's
        two modes to the chunk, and each chunk's largest coordinate distance (L-infinity over rows
        and action dims, in action units) to that mode's centre: a chunk is in its mode when the
        distance is below ``IN_MODE`` (5 in-mode stds; modes are >= 1 apart in that norm)."""
        text, image, actions = text.float(), image.float(), actions.float()
        instruction = torch.cdist(text.flatten(1), self.texts.flatten(1)).argmin(dim=1)
        scene = ((image[:, 0] * self.pattern).flatten(1).sum(dim=1) > 0).long()
        gain = self.gains(robot_id, len(text)).view(-1, 1, 1)
        allowed = gain * self.centres[instruction][torch.arange(len(text))[:, None], 2 * scene[:, None] + torch.arange(2)]
        chunk_mean = actions.mean(dim=1, keepdim=True)  # (N, 1, A)
        pick = (chunk_mean - allowed).norm(dim=-1).argmin(dim=1)  # (N,)
        mode = 2 * scene + pick
        centre = allowed[torch.arange(len(text)), pick]  # (N, A)
        distance = (actions - centre[:, None]).abs().flatten(1).amax(dim=1)
        return instruction, scene, mode, distance


def _mode_centres(num_instructions: int, action_dim: int, generator: torch.Generator) -> torch.Tensor:
    """(num_instructions, 4, action_dim): per instruction 4 distinct corners of [-1, 1]^A (A >= 2),
    or a permutation of the levels -1.5, -0.5, 0.5, 1.5 (A = 1)."""
    out = []
    for _ in range(num_instructions):
        if action_dim == 1:
            out.append(torch.tensor([-1.5, -0.5, 0.5, 1.5])[torch.randperm(4, generator=generator)][:, None])
            continue
        corners: List[Tuple[float, ...]] = []
        while len(corners) < 4:
            corner = tuple((torch.randint(2, (action_dim,), generator=generator) * 2 - 1).float().tolist())
            if corner not in corners:
                corners.append(corner)
        out.append(torch.tensor(corners))
    return torch.stack(out)


def synthetic_task(config, seed: int = 0, num_instructions: int = 4) -> SyntheticTask:
    """The task (constants of the generative story, ``SyntheticTask``) for ``config`` and ``seed``."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    if isinstance(num_instructions, bool) or not isinstance(num_instructions, numbers.Integral) or num_instructions < 1:
        raise ValueError(f"num_instructions must be a positive int, got {num_instructions!r}")
    g = torch.Generator().manual_seed(int(seed))
    texts = torch.randn((num_instructions, config.text_len, config.text_dim), generator=g)
    pattern = torch.randn((config.latent_channels, config.latent_height, config.latent_width), generator=g)
    centres = _mode_centres(num_instructions, config.action_dim, g)
    return SyntheticTask(config=config, seed=int(seed), texts=texts, pattern=pattern, centres=centres)


def make_synthetic_dataset(directory: PathLike, config, num_samples: int, seed: int = 0, *,
                           num_instructions: int = 4, shard_size: int = DEFAULT_SHARD_SIZE,
                           overwrite: bool = False) -> Path:
    """Write ``num_samples`` samples of ``synthetic_task(config, seed)`` (story in ``SyntheticTask``).

    A tiny WAM learns it in minutes on CPU; its actions are bimodal given text and image, so an
    undistilled teacher sampled in 1 step (mode averaging) is clearly worse than in many steps.
    History frames (config.history_frames > 0) and robot ids (config.num_robots > 0) are included.
    The same (config, seed, num_samples) gives the same tensors whatever the shard size.
    The index metadata records {"synthetic": {"seed", "num_instructions", "config"}}.
    """
    if not isinstance(config, WAMConfig):
        raise TypeError(f"config must be a WAMConfig, got {type(config).__name__}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    task = synthetic_task(config, seed, num_instructions)
    metadata = {"synthetic": {"seed": int(seed), "num_instructions": int(num_instructions),
                              "config": config.to_dict()}}
    with DatasetWriter(directory, shard_size, overwrite=overwrite) as writer:
        for start in range(0, num_samples, task.BLOCK):
            tensors, _ = task.samples(min(task.BLOCK, num_samples - start), start)
            writer.add(tensors)
        return writer.close(metadata)
