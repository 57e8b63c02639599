"""Real-time chunking on Meta-World: success and seam jumps under an injected inference delay.

    python -m wam_fast.eval --rtc --task push-v3 --task drawer-open-v3      # the recorded run, CPU

Rows of the fidelity run (``RTC_MODELS``: the 2-step shortcut student, judged by the targets; the 1-step
one; a 1-step student distilled to read committed actions, ``PREFIX_STUDENT``) are rolled out on the
held-out layouts with each inference taking ``delay`` control ticks (simulated: the env advances while the
policy "thinks"; ``wam_fast.realtime.RealTimeChunker(simulated=True)``), in each mode:

- sync: the robot holds still (zero motion, the gripper as it was) while each chunk is inferred;
- naive: it runs on through the chunk and enters the new one at the action for the current tick;
- rtc: as naive, with the ``delay`` actions executed meanwhile given to the new chunk as its committed
  prefix (``wam_fast.prefix``: the chunk starts with them and eases out of them).

Each chunk is clipped to the env's action box first (what the robot executes). Every row measures success
(95% Wilson interval) and the seam jump: the mean L2 distance between the first action taken from a new
chunk and the action executed just before it (the first chunk of an episode has no seam). ``step_jump`` is
the same distance between consecutive actions within a chunk, the scale of a smooth motion, and
``after_seam_jump`` its mean over the ``BLEND_ACTIONS`` ticks after a seam (where rtc eases into the new
chunk: a jump moved there would show). Per model, the CPU chunk time at batch 1 with and without a prefix.
Results: ``benchmarks/results/metaworld-<task>-rtc.json`` (rewritten after every row; a re-run keeps the
rows of the same settings), a markdown table and a PNG.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from wam_fast.distill.commands import jsonable
from wam_fast.eval import metaworld as mw
from wam_fast.eval.results import RESULTS_DIR, environment
from wam_fast.eval.rollout import chunk_latency_ms, make_policy, wilson_interval
from wam_fast.eval.settings import MODELS, STUDENTS, ModelRow, Settings, model_config
from wam_fast.eval.stages import distill_student, make_demos, make_latents, train_teacher
from wam_fast.prefix import BLEND_ACTIONS
from wam_fast.realtime import MODES, RealTimeChunker
from wam_fast.utils.files import atomic_write

logger = logging.getLogger("wam_fast.eval")
# The student that reads committed actions: shortcut distillation with PREFIX_FRACTION of its rows prefixed.
PREFIX_STUDENT, PREFIX_FRACTION = "shortcut-prefix", 0.5
RTC_ROWS = tuple(ModelRow(f"{PREFIX_STUDENT}-{k}step", PREFIX_STUDENT, k, cache=True) for k in (1, 2))
# The recorded models, the first judged by the targets: the 2-step student sees the guided prefix at its
# second evaluation; at one step the guidance acts on the output alone.
RTC_MODELS = ("shortcut-2step", "shortcut-1step", RTC_ROWS[0].name)
RTC_DELAYS = (0, 1, 2, 4)
RECORDED_RTC_TASKS = ("push-v3", "drawer-open-v3", "button-press-wall-v3")  # metaworld-<task>-rtc.json
RTC_EPISODES = 100  # layouts 0..49 twice: a tighter interval than the fidelity run's 50
TARGET_DELAY = 2
SUCCESS_KEEP = 0.95  # rtc at TARGET_DELAY keeps this share of the synchronous success at delay 0
SEAM_SHARE = 0.5  # rtc's seam jump at TARGET_DELAY is at most this share of naive async's


def run_delayed_episodes(policy, task: str, episodes: int, *, horizon: int, execute: int, delay: int, mode: str,
                         text: torch.Tensor, envs: List["mw.MetaWorldEnv"]) -> dict:
    """``episodes`` held-out episodes as one batch (episode i on layout i mod 50), each tick one action per
    running episode from a simulated ``RealTimeChunker``; a tick without one holds the hand still."""
    images = [env.reset(i % env.num_layouts) for i, env in enumerate(envs[:episodes])]
    policy.reset(text.expand(episodes, -1, -1).contiguous())
    config = policy.config

    def infer(observation, prefix):
        return np.clip(policy.act(observation, prefix=prefix).actions.float().numpy(), -1.0, 1.0)

    chunker = RealTimeChunker(infer, action_len=config.action_len, execute=execute, delay=delay, mode=mode,
                              simulated=True)
    success_step: List[Optional[int]] = [None] * episodes
    gripper = np.full(episodes, -1.0, dtype=np.float32)  # the hold keeps the gripper's last command
    last = [None] * episodes
    seams: List[float] = []
    steps: List[float] = []
    after_seam: List[float] = []
    chunks, since_switch, start = 0, 0, time.perf_counter()

    def observe():  # rendered only when an inference starts
        for i, env in enumerate(envs[:episodes]):
            if success_step[i] is None:
                images[i] = env.render()
        return np.stack(images)

    for t in range(horizon):
        running = [i for i in range(episodes) if success_step[i] is None]
        if not running:
            break
        action = chunker.act(observe)
        chunks += chunker.switched
        since_switch = 0 if chunker.switched else since_switch + (action is not None)
        for i in running:
            if action is None:
                executed = np.array([0.0, 0.0, 0.0, gripper[i]], dtype=np.float32)
            else:
                executed = action[i]
                if last[i] is not None:
                    jump = float(np.linalg.norm(executed - last[i]))
                    (seams if chunker.switched else steps).append(jump)
                    if 1 <= since_switch <= BLEND_ACTIONS and chunks > 1:
                        after_seam.append(jump)
                last[i], gripper[i] = executed, executed[3]
            _, success = envs[i].step(executed, render=False)
            if success:
                success_step[i] = t + 1
    return {"success": [s is not None for s in success_step], "success_step": success_step, "seams": seams,
            "steps": steps, "after_seam": after_seam, "chunks": chunks, "seconds": time.perf_counter() - start}


def evaluate_mode(row: ModelRow, checkpoints: Dict[str, Path], settings: Settings, text: torch.Tensor, envs,
                  mode: str, delay: int) -> dict:
    """One (mode, delay) row: success with its interval, seam and step jumps."""
    policy = make_policy(row, checkpoints, settings.seed, settings.task)
    result = run_delayed_episodes(policy, settings.task, settings.episodes, horizon=settings.horizon,
                                  execute=settings.execute, delay=delay, mode=mode, text=text, envs=envs)
    wins = sum(result["success"])
    lo, hi = wilson_interval(wins, settings.episodes)
    reached = [s for s in result["success_step"] if s is not None]
    seams = np.array(result["seams"])
    return {"mode": mode, "delay": delay, "success": wins / settings.episodes, "successes": wins,
            "episodes": settings.episodes, "ci95": [lo, hi],
            "seam_jump": float(seams.mean()) if len(seams) else None,
            "seam_jump_sem": float(seams.std(ddof=1) / np.sqrt(len(seams))) if len(seams) > 1 else None,
            "seams": len(seams), "step_jump": float(np.mean(result["steps"])) if result["steps"] else None,
            "after_seam_jump": float(np.mean(result["after_seam"])) if result["after_seam"] else None,
            "mean_steps_to_success": float(np.mean(reached)) if reached else None,
            "chunks": result["chunks"], "batch_eval_s": result["seconds"]}


def prefix_latency(row: ModelRow, checkpoints: Dict[str, Path], settings: Settings, text: torch.Tensor,
                   env) -> dict:
    """The CPU chunk time at batch 1 (pixels to actions, median of 20) without and with a committed prefix
    of ``TARGET_DELAY`` actions: what the guidance costs."""
    policy = make_policy(row, checkpoints, settings.seed, settings.task)
    image = env.reset(0)
    repeats = 5 if settings.episodes <= 2 else 20
    plain, plain_raw = chunk_latency_ms(policy, text, image, repeats=repeats)
    prefix = np.zeros((TARGET_DELAY, policy.config.action_dim), np.float32)
    guided, guided_raw = chunk_latency_ms(policy, text, image, repeats=repeats, prefix=prefix)
    return {"chunk_ms": plain, "chunk_ms_prefix": guided, "chunk_ms_raw": plain_raw, "chunk_ms_prefix_raw": guided_raw}


def rtc_targets(results: dict) -> dict:
    """The issue's targets at ``TARGET_DELAY``: rtc's success against sync at delay 0, its seam jump
    against naive async's (None where a row is missing)."""
    rows = {(r["mode"], r["delay"]): r for r in results["rows"] if r["model"] == results["model"]}
    base, rtc, naive = rows.get(("sync", 0)), rows.get(("rtc", TARGET_DELAY)), rows.get(("naive", TARGET_DELAY))
    out = {"delay": TARGET_DELAY, "success_keep_min": SUCCESS_KEEP, "seam_share_max": SEAM_SHARE}
    if base is not None and rtc is not None:  # None where sync at delay 0 never succeeded
        out["success_kept"] = rtc["success"] / base["success"] if base["success"] > 0 else None
        out["success_met"] = None if out["success_kept"] is None else out["success_kept"] >= SUCCESS_KEEP
    if rtc is not None and naive is not None and rtc["seam_jump"] is not None and naive["seam_jump"]:
        out["seam_share"] = rtc["seam_jump"] / naive["seam_jump"]
        out["seam_met"] = out["seam_share"] <= SEAM_SHARE
    return out


def rtc_table(results: dict) -> str:
    """The rows as a markdown table (model, mode, delay, success and interval, the jumps), then each model's
    chunk time with and without a prefix."""
    def cell(value):
        return "-" if value is None else f"{value:.3f}"

    lines = [f"| {results['task']} | mode | delay (ticks) | success | 95% interval | seam jump | step jump "
             f"| after-seam jump |", "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['model']} | {r['mode']} | {r['delay']} | {r['success']:.0%} ({r['successes']}/"
                     f"{r['episodes']}) | {r['ci95'][0]:.0%}-{r['ci95'][1]:.0%} | {cell(r['seam_jump'])} "
                     f"| {cell(r['step_jump'])} | {cell(r.get('after_seam_jump'))} |")
    for name, t in results.get("latency", {}).items():
        lines.append(f"\n{name}: {t['chunk_ms']:.1f} ms / chunk without a prefix, {t['chunk_ms_prefix']:.1f} ms with "
                     f"{TARGET_DELAY} committed actions (CPU, batch 1, median)")
    return "\n".join(lines)


def rtc_plot(results: dict, path: Path) -> Path:
    """Success (95% intervals) and seam jump against the delay, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    lines = [(name, mode, color, style) for name, style in zip(results["models"], ("-", ":", "--"))
             for mode, color in zip(MODES, ("#444444", "#d62728", "#1f77b4"))]
    for name, mode, color, style in lines:
        rows = sorted((r for r in results["rows"] if (r["model"], r["mode"]) == (name, mode)), key=lambda r: r["delay"])
        if not rows:
            continue
        label = f"{mode} ({name})"
        delays = [r["delay"] for r in rows]
        success = np.array([r["success"] for r in rows]) * 100
        err = [success - np.array([r["ci95"][0] for r in rows]) * 100,
               np.array([r["ci95"][1] for r in rows]) * 100 - success]
        ax1.errorbar(delays, success, yerr=err, color=color, linestyle=style, marker="o", capsize=3, label=label)
        ax2.plot(delays, [np.nan if r["seam_jump"] is None else r["seam_jump"] for r in rows], color=color,
                 linestyle=style, marker="o", label=label)
    ax1.set_xlabel("inference delay, control ticks")
    ax1.set_ylabel("success, % (95% Wilson interval)")
    ax1.set_ylim(0, 105)
    ax1.set_title(f"{results['task']}: {results['episodes']} held-out episodes a row", fontsize=10)
    ax2.set_xlabel("inference delay, control ticks")
    ax2.set_ylabel("mean action jump at a seam (L2)")
    ax2.set_title("seam jump: first action of a new chunk vs the one before", fontsize=10)
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_rtc_results(path: Path, results: dict) -> None:
    results["targets"] = rtc_targets(results)
    text = json.dumps(results, indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def checkpoints_for(settings: Settings, out: Path, row: ModelRow, progress: bool = True) -> Dict[str, Path]:
    """The trained stages ``row`` needs (each reused from ``out/<task>`` when its key matches)."""
    task_dir = out / settings.task
    demos, frozen = make_latents(settings, make_demos(settings, task_dir / "demos"), task_dir, progress=progress)
    checkpoints = {"teacher": train_teacher(settings, demos, task_dir / "teacher", progress=progress),
                   "autoencoder": frozen}
    if row.source == PREFIX_STUDENT:
        checkpoints[row.source] = distill_student(settings, checkpoints["teacher"], demos,
                                                  task_dir / f"student-{row.source}", "shortcut",
                                                  prefix_fraction=PREFIX_FRACTION)
    elif row.source != "teacher":
        method, future_frames = STUDENTS[row.source]
        checkpoints[row.source] = distill_student(settings, checkpoints["teacher"], demos,
                                                  task_dir / f"student-{row.source}", method, future_frames)
    return checkpoints


def run_rtc(settings: Settings, out: Path, results_dir: Path = RESULTS_DIR, models: Sequence[str] = RTC_MODELS,
            delays: Sequence[int] = RTC_DELAYS, modes: Sequence[str] = MODES, progress: bool = True,
            retime: bool = False) -> dict:
    """Every (model, mode, delay) row for one task (module docstring); the first model is the one the targets
    judge. ``retime``: only the chunk times again (e.g. on an idle machine); the rows are kept. Returns the
    results (also in results_dir)."""
    rows_by_name = {r.name: r for r in RTC_ROWS + MODELS}
    unknown = sorted(set(models) - set(rows_by_name)) or sorted(set(modes) - set(MODES))
    if unknown or not models:
        raise ValueError(f"unknown model rows or modes {unknown or 'none given'}; expected model rows from "
                         f"{list(rows_by_name)} and modes from {MODES}")
    mw.check_task(settings.task)
    checkpoints = {}
    for name in models:
        checkpoints.update(checkpoints_for(settings, out, rows_by_name[name], progress=progress))
    path = results_dir / f"metaworld-{settings.task}-rtc.json"
    settings_dict = jsonable(dataclasses.asdict(settings))
    results = {"task": settings.task, "model": models[0], "models": list(models), "episodes": settings.episodes,
               "settings": settings_dict, "environment": environment(),
               "checkpoints": {name: str(checkpoints[rows_by_name[name].source]) for name in models},
               "command": f"python -m wam_fast.eval --rtc --task {settings.task} --out {out}", "rows": []}
    order = [(name, mode, delay) for name in models for delay in delays for mode in modes]
    if path.is_file():  # resume: keep the rows of the same settings (and their chunk times)
        old = json.loads(path.read_text())
        if old.get("settings") == settings_dict:
            results["rows"] = [r for r in old["rows"] if (r["model"], r["mode"], r["delay"]) in order]
            results["latency"] = {k: v for k, v in old.get("latency", {}).items() if k in models}
            results["latency_commit"] = old.get("latency_commit")
    config = model_config(settings)
    text = mw.instruction_embedding(settings.task, config.text_len, config.text_dim)
    envs = [mw.MetaWorldEnv(settings.task, "heldout", camera=settings.camera) for _ in range(settings.episodes)]
    try:
        if retime or results.get("latency", {}).keys() != set(models):
            results["latency"] = {name: prefix_latency(rows_by_name[name], checkpoints, settings, text, envs[0])
                                  for name in models}
            results["latency_commit"] = environment()["commit"]
        if retime:  # the rows stay as recorded
            results["environment"], results["retimed"] = environment(), True
        for name, mode, delay in [] if retime else order:
            if any((r["model"], r["mode"], r["delay"]) == (name, mode, delay) for r in results["rows"]):
                continue
            measured = {"model": name} | evaluate_mode(rows_by_name[name], checkpoints, settings, text, envs, mode,
                                                      delay)
            results["environment"] = environment()
            measured["commit"] = results["environment"]["commit"]
            seam = "-" if measured["seam_jump"] is None else f"{measured['seam_jump']:.3f}"
            logger.info(f"{settings.task} {name} {mode} delay {delay}: success {measured['success']:.0%} "
                        f"[{measured['ci95'][0]:.0%}, {measured['ci95'][1]:.0%}], seam jump {seam}")
            results["rows"].append(measured)
            results["rows"].sort(key=lambda r: order.index((r["model"], r["mode"], r["delay"])))
            write_rtc_results(path, results)
    finally:
        for env in envs:
            env.close()
    write_rtc_results(path, results)
    rtc_plot(results, path.with_suffix(".png"))
    return results
