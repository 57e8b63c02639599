"""Closed-loop evaluation of the fidelity run's rows: the policy of a row, batched held-out episodes,
per-chunk latency, and the success rate's 95% Wilson interval."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

import wam_fast
from wam_fast.configs import WAMConfig
from wam_fast.models.checkpoint import CONFIG_NAME, read_json
from wam_fast.eval import metaworld as mw
from wam_fast.eval.pipeline_policy import PipelinePolicy, build_pipeline
from wam_fast.eval.routes import RouteTracker
from wam_fast.eval.video_fidelity import VIDEO_KEYS, measure_video
from wam_fast.eval.settings import ModelRow, Settings


def wilson_interval(successes: int, trials: int, z: float = 1.959963984540054) -> Tuple[float, float]:
    """95% Wilson score interval of a success rate (sensible at 0% and 100%, unlike the normal one)."""
    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials > 0, got {successes}/{trials}")
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the ends (no rounding residue)
    hi = 1.0 if successes == trials else min(1.0, centre + half)
    return lo, hi


def make_policy(row: ModelRow, checkpoints: Dict[str, Path], seed: int, task: str, decode_video: bool = False):
    """A fresh ``PipelinePolicy`` for ``row``: a WAMPipeline (a fresh model too: FP8 quantizes its model in
    place) from uint8 frames to actions, through ``checkpoints["autoencoder"]`` when given (push-v3),
    else the pixels themselves, with ``task``'s fixed instruction embedding. ``decode_video``: each
    chunk's predicted frames are decoded too (``policy.session.last_video``)."""
    model = wam_fast.load_pretrained(checkpoints[row.source]).float().eval()
    sampler_options = {"cfg_scale": 1.0} if row.source == "teacher" else {}
    pipeline = build_pipeline(model, task, checkpoints.get("autoencoder"), steps=row.steps, cache=row.cache,
                              decode_video=decode_video, **sampler_options)
    policy = PipelinePolicy(pipeline, task, seed)
    if row.fp8:
        wam_fast.compile(policy.session.policy, wam_fast.CompileConfig(fp8=True, backend="eager", fused=False,
                                                                       cache=row.cache))
    return policy


@dataclass
class EpisodeResults:
    success: List[bool]
    success_step: List[Optional[int]]
    chunks: int
    seconds: float


def run_episodes(policy, task: str, episodes: int, *, horizon: int, execute: int, text: torch.Tensor,
                 camera: str = mw.CAMERA, envs: Optional[List["mw.MetaWorldEnv"]] = None,
                 tracker: Optional[RouteTracker] = None) -> EpisodeResults:
    """``episodes`` closed-loop held-out episodes as one batch: episode i on held-out layout i mod 50.
    Every round renders each running episode, samples one chunk for all (``policy.act``) and executes
    the first ``execute`` actions of each; an episode stops at its first success or at ``horizon``.

    ``policy``: anything with ``reset(text)`` and ``act(images uint8 (B, H, W, 3)) -> .actions`` (a
    ``PipelinePolicy``: pixels to actions through one WAMPipeline). ``tracker``: a ``RouteTracker`` that
    sees the hand after every step (which route each episode took)."""
    if not 1 <= execute:
        raise ValueError(f"execute must be >= 1 (actions run per chunk), got {execute}")
    envs = envs if envs is not None else [mw.MetaWorldEnv(task, "heldout", camera=camera) for _ in range(episodes)]
    images = [env.reset(i % env.num_layouts) for i, env in enumerate(envs)]
    policy.reset(text.expand(episodes, -1, -1).contiguous())
    success_step: List[Optional[int]] = [None] * episodes
    start, chunks, t = time.perf_counter(), 0, 0
    while t < horizon and any(s is None for s in success_step):
        actions = policy.act(np.stack(images)).actions.float().numpy()
        chunks += 1
        execute_now = min(execute, actions.shape[1], horizon - t)
        for i, env in enumerate(envs):
            if success_step[i] is not None:
                continue
            for k in range(execute_now):
                _, success = env.step(actions[i, k], render=False)
                if tracker is not None:
                    tracker.observe(i, env.obs)
                if success:
                    success_step[i] = t + k + 1
                    break
            if success_step[i] is None:
                images[i] = env.render()
        t += execute_now
    return EpisodeResults([s is not None for s in success_step], success_step, chunks, time.perf_counter() - start)


def chunk_latency_ms(policy, text: torch.Tensor, image: np.ndarray, repeats: int = 20,
                     warmup: int = 3, prefix: Optional[np.ndarray] = None) -> Tuple[float, List[float]]:
    """(median, every timing) in ms of one ``policy.act`` at batch 1 on a real observation (CPU timer):
    uint8 pixels to actions (frame conversion and encoder included); ``prefix`` (d, A): with these
    committed actions (real-time chunking)."""
    policy.reset(text[None])
    options = {} if prefix is None else {"prefix": prefix[None]}
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        policy.act(image[None], **options)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times)), times


def evaluate_row(row: ModelRow, checkpoints: Dict[str, Path], settings: Settings, text: torch.Tensor,
                 envs) -> dict:
    """One row: success over ``settings.episodes`` held-out episodes with its 95% interval, the route of
    each episode on a multimodal task, the per-chunk latency, and the video fidelity (``measure_row_video``)."""
    policy = make_policy(row, checkpoints, settings.seed, settings.task)
    tracker = RouteTracker(settings.task, settings.episodes) if settings.multimodal else None
    result = run_episodes(policy, settings.task, settings.episodes, horizon=settings.horizon,
                          execute=settings.execute, text=text, envs=envs, tracker=tracker)
    wins = sum(result.success)
    latency_policy = make_policy(row, checkpoints, settings.seed, settings.task)
    image = envs[0].reset(0)
    latency, timings = chunk_latency_ms(latency_policy, text, image, repeats=5 if settings.episodes <= 2 else 20)
    lo, hi = wilson_interval(wins, settings.episodes)
    steps_to_success = [s for s in result.success_step if s is not None]
    config = policy.config  # future frames a temporal model denoises (0: action-only); None for a full-mask one
    future_frames = config.noisy_frames if config.mask == "temporal" else None
    measured = {"name": row.name, "steps": row.steps, "success": wins / settings.episodes, "ci95": [lo, hi],
                "episodes": settings.episodes, "latency_ms": latency, "latency_ms_raw": timings, "successes": wins,
                "sampler": policy.sampler, "cache": row.cache, "precision": row.precision,
                "mask": config.mask, "future_frames": future_frames, "checkpoint": str(checkpoints[row.source]),
                "mean_steps_to_success": float(np.mean(steps_to_success)) if steps_to_success else None,
                "batch_eval_s": result.seconds, "chunks_per_episode": result.chunks}
    if tracker is not None:
        measured["routes"] = route_shares(tracker.counts(), settings.episodes)
        measured["routes_of_successes"] = route_shares(tracker.counts(result.success), settings.episodes)
    return measured | measure_row_video(row, checkpoints, settings, text, envs)


def route_shares(counts: Dict[str, int], episodes: int) -> Dict[str, float]:
    """Episodes per route -> the share of all ``episodes`` (mode coverage)."""
    return {route: n / episodes for route, n in counts.items()}


def measure_row_video(row: ModelRow, checkpoints: Dict[str, Path], settings: Settings, text: torch.Tensor,
                      envs) -> dict:
    """The row's video fidelity (``video_fidelity.measure_video``, ``settings.video_rounds`` chunks per
    episode); an action-only row predicts no frame: its video keys are None."""
    config = WAMConfig.from_dict(read_json(Path(checkpoints[row.source]) / CONFIG_NAME))
    if config.action_only:
        return {**{key: None for key in VIDEO_KEYS}, "video_frames": 0, "video_rounds": settings.video_rounds}
    policy = make_policy(row, checkpoints, settings.seed, settings.task, decode_video=True)
    return measure_video(policy, envs, text, settings.video_rounds)
