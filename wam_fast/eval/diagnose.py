"""Why does a teacher miss its task? Three measurements on the held-out layouts of an MT1 task.

    python -m wam_fast.eval.diagnose --task push-v3 --demos OUT/push-v3/demos --checkpoint OUT/push-v3/teacher/final

1. ``first_action_spread``: does the policy read the layout from the image? The first frame of each
   held-out layout, the same sampler seed for each, and the x-y spread (std over layouts) of the first
   action of the chunk beside the scripted expert's. A spread near 0 is the mean action: the policy
   ignores what differs between layouts (for push-v3, the puck's few pixels).
2. ``conv_bc_baseline``: do the demonstrations hold what the task needs? A plain convolutional network
   regressed onto the expert's action chunks (behaviour cloning, no diffusion) from the same demos,
   evaluated closed loop like the teacher. If it succeeds where the teacher does not, the gap is the
   teacher's latent space or capacity, not the data or the 64x64 camera.
3. ``wam_regression_baseline``: is it the diffusion objective or the network? The pixel-patch teacher
   WAMTransformer (``settings.model_config`` with pixels, patch 16) trained on the action loss at the last timestep only,
   where every noisy input is pure noise (zero terminal SNR): a deterministic regressor of the chunk,
   trained like the conv baseline. If it does not read the layout either, the network is the gap.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

import wam_fast
from wam_fast.utils.files import atomic_write
from wam_fast.distill import objectives
from wam_fast.distill.data import LatentDataset
from wam_fast.eval import metaworld as mw
from wam_fast.eval.results import environment
from wam_fast.eval.pipeline_policy import build_pipeline
from wam_fast.eval.rollout import run_episodes, wilson_interval
from wam_fast.eval.settings import Settings, model_config
from wam_fast.utils.cli import OneLineParser, output_file


def first_action_spread(act_first: Callable[[np.ndarray], np.ndarray], task: str, *, layouts: int = 50,
                        camera: str = mw.CAMERA) -> dict:
    """``act_first``: a uint8 RGB frame (1, 64, 64, 3) -> the policy's first action (4,), same noise each call.
    Returns the x-y spread of the policy's and the expert's first actions over the held-out layouts, and
    their correlation per axis (None where either is constant)."""
    env = mw.MetaWorldEnv(task, "heldout", camera=camera)
    expert = mw.expert_policy(task)
    policy_actions, expert_actions = [], []
    try:
        for layout in range(min(layouts, env.num_layouts)):
            image = env.reset(layout)
            expert_actions.append(env.expert_action(expert))
            policy_actions.append(np.asarray(act_first(image[None]), dtype=np.float64))
    finally:
        env.close()
    policy_actions, expert_actions = np.stack(policy_actions), np.stack(expert_actions)

    def correlation(k: int) -> Optional[float]:
        if policy_actions[:, k].std() < 1e-9 or expert_actions[:, k].std() < 1e-9:
            return None
        return float(np.corrcoef(policy_actions[:, k], expert_actions[:, k])[0, 1])

    return {"layouts": len(policy_actions), "spread_xy": policy_actions[:, :2].std(0).round(4).tolist(),
            "expert_spread_xy": expert_actions[:, :2].std(0).round(4).tolist(),
            "correlation_xy": [correlation(0), correlation(1)]}


def teacher_first_action(checkpoint: Path, task: str, steps: int, seed: int = 0,
                         autoencoder: Optional[Path] = None) -> Callable:
    """``act_first`` of a saved WAM (sampled with ``steps`` steps, a fresh policy and seed per call); a WAM
    over autoencoder latents needs its frozen autoencoder (``OUT/<task>/autoencoder/frozen``)."""
    model = wam_fast.load_pretrained(checkpoint).float().eval()
    if autoencoder is None and model.config.latent_channels != 3:
        raise ValueError(f"{checkpoint} works on {model.config.latent_channels}-channel autoencoder latents, not "
                         f"pixels: pass its autoencoder (--autoencoder OUT/{task}/autoencoder/frozen)")
    pipeline = build_pipeline(model, task, autoencoder, steps=steps, cache=False, cfg_scale=1.0)

    def act_first(images: np.ndarray) -> np.ndarray:
        return pipeline.new_session(seed).act_batch(images, task)[0, 0]

    return act_first


class ConvPolicy(nn.Module):
    """64x64 RGB pixel latent (B, 3, 64, 64) -> an action chunk (B, chunk, 4): four stride-2 conv blocks, an MLP."""

    def __init__(self, chunk: int, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.GroupNorm(8, cout), nn.GELU(),
                                 nn.Conv2d(cout, cout, 3, 1, 1), nn.GroupNorm(8, cout), nn.GELU())

        self.chunk = chunk
        self.net = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width),
                                 block(4 * width, 4 * width), nn.Flatten(), nn.Linear(4 * width * 16, 256), nn.GELU(),
                                 nn.Linear(256, chunk * 4))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-3:] != (3, mw.IMAGE_SIZE, mw.IMAGE_SIZE):
            raise ValueError(f"ConvPolicy expects (B, 3, {mw.IMAGE_SIZE}, {mw.IMAGE_SIZE}) pixel latents, "
                             f"got {tuple(image.shape)}")
        return self.net(image).reshape(-1, self.chunk, 4)


class ConvPolicyRunner:
    """``reset(text)`` / ``act(images uint8 (B, H, W, 3)) -> .actions``, as ``rollout.run_episodes`` drives a policy."""

    def __init__(self, net: ConvPolicy):
        self.net = net.eval()

    def reset(self, text: torch.Tensor) -> None:
        pass  # one task per model: the instruction carries nothing

    @torch.no_grad()
    def act(self, images: np.ndarray) -> SimpleNamespace:
        return SimpleNamespace(actions=self.net(mw.image_to_latent(images)))


def _fit(name: str, module: nn.Module, batch_loss: Callable, rows: int, *, steps: int, batch: int, lr: float,
         weight_decay: float, pct_start: float, seed: int, log: Callable[[str], None]) -> float:
    """AdamW with a one-cycle lr on ``batch_loss(index, generator)`` of random batches; returns the last loss."""
    optimizer = torch.optim.AdamW(module.parameters(), lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=pct_start)
    generator = torch.Generator().manual_seed(seed)
    start, loss = time.perf_counter(), float("nan")
    for step in range(steps):
        loss_t = batch_loss(torch.randint(0, rows, (batch,), generator=generator), generator)
        optimizer.zero_grad()
        loss_t.backward()
        optimizer.step()
        schedule.step()
        loss = loss_t.item()
        if step % 250 == 0 or step == steps - 1:
            log(f"{name} step {step + 1}/{steps}: loss {loss:.4f} ({time.perf_counter() - start:.0f} s)")
    return loss


def train_conv_bc(demos: Path, *, steps: int, batch: int = 64, lr: float = 1e-3, seed: int = 0,
                  log: Callable[[str], None] = print) -> tuple:
    """Regress a ConvPolicy onto the demos' expert chunks (MSE, AdamW, one-cycle lr); returns (net, last loss)."""
    dataset = LatentDataset(demos)
    data = dataset.get(list(range(len(dataset))))
    images, actions = data["image"][:, 0].float(), data["actions"].float()
    torch.manual_seed(seed)
    net = ConvPolicy(chunk=actions.shape[1])

    def batch_loss(index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return ((net(images[index]) - actions[index]) ** 2).mean()

    loss = _fit("conv-bc", net, batch_loss, len(images), steps=steps, batch=batch, lr=lr, weight_decay=1e-4,
                pct_start=0.3, seed=seed, log=log)
    return net.eval(), loss


def conv_bc_baseline(task: str, demos: Path, *, steps: int = 3000, episodes: int = 30, horizon: int = 200,
                     execute: int = 4, layouts: int = 50, camera: str = mw.CAMERA, seed: int = 0) -> dict:
    """Train the conv baseline on ``demos``; held-out closed-loop success and first-action spread."""
    start = time.perf_counter()
    net, loss = train_conv_bc(demos, steps=steps, seed=seed)
    train_s = time.perf_counter() - start
    result = run_episodes(ConvPolicyRunner(net), task, episodes, horizon=horizon, execute=execute,
                          text=torch.zeros(1, 1, 1), camera=camera)
    wins = sum(result.success)
    with torch.no_grad():
        spread = first_action_spread(lambda images: net(mw.image_to_latent(images))[0, 0].numpy(), task,
                                     layouts=layouts, camera=camera)
    return {"steps": steps, "final_loss": loss, "train_s": round(train_s, 1), "episodes": episodes,
            "successes": wins, "success": wins / episodes, "ci95": list(wilson_interval(wins, episodes)),
            "first_action": spread}


def wam_regression_baseline(task: str, demos: Path, *, steps: int = 1500, batch: int = 64, lr: float = 1e-3,
                            layouts: int = 50, camera: str = mw.CAMERA, seed: int = 0,
                            log: Callable[[str], None] = print) -> dict:
    """Train the task's teacher network as a regressor of the chunk (module docstring, 3); its final
    action MSE and first-action spread. At alpha 0 the v-prediction target is -x0."""
    # the pixel-patch network (the demos are pixels), as in the recorded diagnosis files
    config = model_config(dataclasses.replace(Settings.for_task(task), latent_space="pixels", patch_size=16))
    torch.manual_seed(seed)
    model = wam_fast.WAMTransformer(config)
    dataset = LatentDataset(demos)
    data = {k: v.float() for k, v in dataset.get(list(range(len(dataset)))).items()}
    last = config.num_train_timesteps - 1
    video_shape = (config.noisy_frames, config.latent_channels, config.latent_height, config.latent_width)
    action_shape = (config.action_len, config.action_dim)

    def predict(batch: dict, generator: torch.Generator) -> torch.Tensor:
        rows = len(batch["image"])
        noisy_video = torch.randn((rows, *video_shape), generator=generator)
        noisy_actions = torch.randn((rows, *action_shape), generator=generator)
        t = torch.full((rows,), last)
        _, action_v = objectives.run_model(model, config, noisy_video, batch["text"], noisy_actions, t,
                                      objectives.context(config, batch))
        return -action_v  # v = alpha * noise - sigma * x0 = -x0 at the last timestep

    def batch_loss(index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        rows = {k: v[index] for k, v in data.items()}
        return ((predict(rows, generator) - rows["actions"]) ** 2).mean()

    start = time.perf_counter()
    loss = _fit("wam-regression", model, batch_loss, len(data["image"]), steps=steps, batch=batch, lr=lr,
                weight_decay=0.0, pct_start=0.05, seed=seed, log=log)
    train_s = time.perf_counter() - start
    model.eval()
    text = mw.instruction_embedding(task, config.text_len, config.text_dim)

    @torch.no_grad()
    def act_first(images: np.ndarray) -> np.ndarray:
        latent = mw.image_to_latent(images)[:, None]
        return predict({"image": latent, "text": text[None]}, torch.Generator().manual_seed(seed))[0, 0].numpy()

    return {"steps": steps, "final_loss": loss, "train_s": round(train_s, 1),
            "mean_action_loss": float(data["actions"].var(0, unbiased=False).mean()),
            "first_action": first_action_spread(act_first, task, layouts=layouts, camera=camera)}


def _demos_camera(demos: Optional[str]) -> Optional[str]:
    """The camera a demos dataset of ``python -m wam_fast.eval`` was rendered with (None if unknown)."""
    if not demos:
        return None
    return LatentDataset(demos).metadata.get("metaworld", {}).get("camera")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = OneLineParser(prog="python -m wam_fast.eval.diagnose", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, help="an MT1 task name, e.g. push-v3")
    parser.add_argument("--demos", help="a demos dataset of python -m wam_fast.eval (OUT/<task>/demos): "
                                        "trains and evaluates the two baselines")
    parser.add_argument("--checkpoint", action="append", default=[],
                        help="a teacher checkpoint (OUT/<task>/teacher/final): its first-action spread (repeatable)")
    parser.add_argument("--autoencoder", help="the frozen autoencoder of --checkpoint teachers over autoencoder "
                                              "latents (OUT/<task>/autoencoder/frozen)")
    parser.add_argument("--camera", default=None, help="default: the demos' camera, else the task's in "
                                                       "eval.settings.TASK_SETTINGS")
    parser.add_argument("--conv-bc-steps", type=int, default=3000, help="training steps of the conv baseline "
                                                                          "(0: skip it)")
    parser.add_argument("--wam-regression-steps", type=int, default=1500,
                        help="training steps of the WAM regression baseline (0: skip it)")
    parser.add_argument("--episodes", type=int, default=30, help="closed-loop held-out episodes of the conv baseline")
    parser.add_argument("--layouts", type=int, default=50, help="held-out layouts of the first-action spread")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=output_file, help="write the report as JSON here (atomically)")
    args = parser.parse_args(argv)
    if not args.demos and not args.checkpoint:
        parser.error("nothing to measure: give --demos and/or --checkpoint")
    for flag, value, least in (("--conv-bc-steps", args.conv_bc_steps, 0), ("--wam-regression-steps",
                               args.wam_regression_steps, 0), ("--episodes", args.episodes, 1),
                               ("--layouts", args.layouts, 2), ("--threads", args.threads, 1)):
        if value < least:
            parser.error(f"{flag} must be >= {least}, got {value}")
    torch.set_num_threads(args.threads)
    camera = args.camera or _demos_camera(args.demos) or Settings.for_task(args.task).camera
    command = " ".join(["python -m wam_fast.eval.diagnose", *(sys.argv[1:] if argv is None else argv)])
    report = {"task": args.task, "camera": camera, "command": command, "environment": environment()}
    for checkpoint in args.checkpoint:
        try:
            acts = {steps: teacher_first_action(Path(checkpoint), args.task, steps,
                                                autoencoder=Path(args.autoencoder) if args.autoencoder else None)
                    for steps in (1, 10)}
        except (ValueError, FileNotFoundError) as error:
            print(f"python -m wam_fast.eval.diagnose: error: {error}", file=sys.stderr)
            return 2
        report.setdefault("teachers", {})[checkpoint] = {
            f"{steps}step": first_action_spread(act, args.task, layouts=args.layouts, camera=camera)
            for steps, act in acts.items()}
    if args.demos and args.conv_bc_steps > 0:
        report["conv_bc"] = conv_bc_baseline(args.task, Path(args.demos), steps=args.conv_bc_steps,
                                             episodes=args.episodes, layouts=args.layouts, camera=camera)
    if args.demos and args.wam_regression_steps > 0:
        report["wam_regression"] = wam_regression_baseline(args.task, Path(args.demos),
                                                           steps=args.wam_regression_steps, layouts=args.layouts,
                                                           camera=camera)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(text + "\n"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
