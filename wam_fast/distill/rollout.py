"""Teacher rollout (data-free distillation): ``teacher_rollout`` samples future latents and actions
from a teacher for every row of a conditions-only latent dataset (``wam_fast.distill.data``) and
writes a complete one."""
from __future__ import annotations

import inspect
import numbers
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

import wam_fast.sampling as sampling
from wam_fast.distill.data import DatasetWriter, row_seed
from wam_fast.distill.dataset_format import DEFAULT_SHARD_SIZE, PathLike, check_shard_size
from wam_fast.distill.dataset_reader import LatentDataset
from wam_fast.ops.registry import note_fallback

# Samplers whose only randomness is the initial noise: a batch of rows gives each row what sampling it
# alone would. The others (dpm++2m-sde, consistency with > 1 step) draw noise for the whole batch
# during sampling, so rows are sampled one at a time to keep each row's draws its own.
DETERMINISTIC_SAMPLERS = ("ddim", "dpm++2m", "euler")


def _deterministic(sampler, steps) -> bool:
    return sampler in DETERMINISTIC_SAMPLERS or (sampler == "consistency" and steps == 1)


def _default_options(config) -> Tuple[str, int, float]:
    if hasattr(sampling, "default_options"):
        return tuple(sampling.default_options(config))
    return ("ddim" if config.objective == "v_prediction" else "euler"), 10, 6.0


def _row_noise(config, index: int, seed: int):
    """Row ``index``'s initial noise: what ``sample(seed=row_seed(seed, index))`` draws for one row."""
    g = torch.Generator("cpu").manual_seed(row_seed(seed, index))
    video = torch.randn((1, config.noisy_frames, config.latent_channels, config.latent_height, config.latent_width),
                        generator=g)
    return video, torch.randn((1, config.action_len, config.action_dim), generator=g)


def teacher_rollout(teacher, conditions, directory: PathLike, *, sampler: Optional[str] = None,
                    steps: Optional[int] = None, cfg_scale: Optional[float] = None, seed: int = 0,
                    batch_size: int = 64, shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False) -> Path:
    """Data-free targets: sample future latents and actions from ``teacher`` for every row of ``conditions``.

    teacher     a WAMTransformer (any dtype / device); it is only run, never changed
    conditions  a LatentDataset (or its directory) with text and image (+ history, robot_id);
                its targets, if any, are ignored
    directory   where the complete dataset is written (text, image, history, robot_id copied as
                stored; future and actions float32 from the teacher)
    sampler, steps, cfg_scale   None: the teacher's defaults (``wam_fast.sampling.default_options``)

    Row i's targets are exactly what ``wam_fast.sample(teacher, text[i:i+1], image[i:i+1], ...,
    seed=row_seed(seed, i), return_video=True)`` returns (up to float rounding of batched matmuls),
    so the dataset does not depend on ``batch_size``: deterministic samplers run ``batch_size`` rows
    per call with each row's initial noise drawn from its own generator (``noise=``); stochastic
    ones run one row per call. A full-mask teacher returns all latent frames: frame 0 (the
    observation) is dropped and frames 1.. are the future; a temporal teacher's frames are already
    the future. The teacher gets the last min(h, its history_frames) history frames (none for a
    full-mask teacher) and robot_id when it has a robot embedding; the dataset keeps all of them for
    the student. Written like ``write_dataset`` (refuses an existing dataset unless ``overwrite``);
    an error or interrupt leaves no new dataset at ``directory``. The index metadata records
    {"teacher_rollout": {sampler, steps, cfg_scale, seed, teacher config, conditions directory}}.
    """
    if not (callable(teacher) and hasattr(teacher, "config") and hasattr(teacher, "parameters")):
        raise TypeError(f"teacher must be a WAMTransformer, got {type(teacher).__name__}")
    if isinstance(conditions, (str, os.PathLike)):
        conditions = LatentDataset(conditions)
    if not isinstance(conditions, LatentDataset):
        raise TypeError(f"conditions must be a LatentDataset or its directory, got {type(conditions).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    check_shard_size(shard_size)
    config = teacher.config
    param = next(iter(teacher.parameters()), None)
    if param is None:
        raise ValueError("teacher has no parameters, so its dtype and device are unknown")
    dtype, device = param.dtype, param.device
    if config.mask == "temporal" and config.noisy_frames < config.latent_frames - 1:
        raise ValueError(f"teacher_rollout writes every future frame ({config.latent_frames - 1}, latent_frames - 1) "
                         f"as a target, but the teacher {config.name!r} predicts {config.noisy_frames} "
                         f"(future_frames={config.future_frames}); roll out a teacher that predicts the whole clip")

    defaults = _default_options(config)
    sampler, steps, cfg_scale = (d if v is None else v for v, d in zip((sampler, steps, cfg_scale), defaults))
    # history and robot_id are the student's business too: the teacher takes what it can (docstring)
    problems = conditions.mismatches(config, ("text", "image") + (("robot_id",) if config.num_robots else ()))
    if problems:
        raise ValueError(f"the conditions at {conditions.directory} do not fit the teacher {config.name!r}:\n  - "
                         + "\n  - ".join(problems))
    teacher_history = config.history_frames if config.mask == "temporal" else 0
    use_noise = _deterministic(sampler, steps) and "noise" in inspect.signature(sampling.sample).parameters
    if not use_noise:
        note_fallback("distill.teacher_rollout", "per-row sampling", [
            f"sampler {sampler!r} with {steps} steps draws noise for the whole batch during sampling"
            if not _deterministic(sampler, steps) else "wam_fast.sample has no noise= argument"])
    step = batch_size if use_noise else 1

    def run(rows: Dict[str, torch.Tensor], start: int):
        n = rows["text"].shape[0]
        kwargs = {}
        if "history" in rows and teacher_history:
            kwargs["history"] = rows["history"][:, -teacher_history:].to(device, dtype)
        if "robot_id" in rows and config.num_robots:
            kwargs["robot_id"] = rows["robot_id"].to(device)
        if use_noise:
            noises = [_row_noise(config, start + i, seed) for i in range(n)]
            kwargs["noise"] = (torch.cat([v for v, _ in noises]), torch.cat([a for _, a in noises]))
        chunk = sampling.sample(teacher, rows["text"].to(device, dtype), rows["image"].to(device, dtype),
                                sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=row_seed(seed, start),
                                return_video=True, **kwargs)
        video = chunk.video.float().cpu()
        future = video[:, 1:] if config.mask == "full" else video
        return future, chunk.actions.float().cpu()

    keep = [name for name in ("text", "image", "history", "robot_id") if name in conditions.fields]
    metadata = {"teacher_rollout": {"sampler": sampler, "steps": int(steps), "cfg_scale": float(cfg_scale),
                                    "seed": int(seed), "teacher": config.to_dict(),
                                    "conditions": str(conditions.directory)}}
    with DatasetWriter(directory, shard_size, overwrite=overwrite) as writer:
        for start in range(0, len(conditions), step):
            stop = min(start + step, len(conditions))
            rows = conditions.get(torch.arange(start, stop))
            rows = {name: rows[name] for name in keep}
            rows["future"], rows["actions"] = run(rows, start)
            writer.add(rows)
        return writer.close(metadata)
