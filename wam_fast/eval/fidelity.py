"""Does the distilled, cached, FP8 student succeed as often as its teacher? Meta-World MT1, end to end.

    python -m wam_fast.eval --task push-v3 --task drawer-open-v3          # everything, CPU
    python -m wam_fast.eval --task button-press-wall-v3                   # the multimodal task
    python -m wam_fast.eval --task push-v3 --smoke                        # minutes: the pipeline only
    python -m wam_fast.eval --rtc --task push-v3                          # real-time chunking under delay

Per task, each stage reuses what OUT/<task> already holds (a re-run resumes where it stopped):

1. ``demos/``: scripted-expert demonstrations on the train layouts (``metaworld.collect_demos``);
   with ``latent_space="autoencoder"``, ``autoencoder/`` (a small conv autoencoder trained on them, then
   frozen: ``eval.autoencoder``) and ``latents/`` (the demos encoded), which everything after trains on;
2. ``teacher/``: a small WAMTransformer (``model_config``: pixel patches or autoencoder latents, full
   mask, joint future frame + action chunk) trained with ``DiffusionObjective``; sampled with DDIM, 10 steps;
3. ``student-shortcut/``, ``student-consistency/``: ``python -m wam_fast.distill`` of that teacher
   (temporal mask, KV-cacheable, 1/2/4 steps), run as a subprocess with the command printed (reused
   only for the same command and teacher weights); ``student-action-only-shortcut/``,
   ``student-action-only-consistency/``: the same with ``--future-frames 0`` (no predicted frame);
4. closed-loop evaluation on the held-out layouts (MT1 seed 1) of every row of ``MODELS``: all
   episodes of a row run as one batch, each replans after ``execute`` actions of its chunk; success =
   Meta-World's ``info["success"]`` within ``horizon`` steps, with a 95% Wilson interval; latency =
   the median wall time of one ``policy.act`` at batch 1 on this machine (encoding the frame included);
   on a multimodal task (``Settings.expert`` "two-routes", ``eval.routes``) the route each episode
   took; then the video fidelity (``eval.video_fidelity``: PSNR / SSIM of the predicted frame after
   the chunk against the one observed, ``video_rounds`` chunks per episode);
5. ``benchmarks/results/metaworld-<task>.json`` (rewritten after every row; ``"multimodal"``) and a PNG chart.

The run's settings are in ``eval.settings``, stages 1-3 in ``eval.stages``, 4 in ``eval.rollout``, 5 in
``eval.results``; this module chains them (``run_task``, ``retime``) behind the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from wam_fast.distill.commands import jsonable
from wam_fast.utils.cli import OneLineParser, output_dir, positive_int
from wam_fast.distill.data import LatentDataset
from wam_fast.eval import metaworld as mw
from wam_fast.eval.results import RESULTS_DIR, environment, markdown_table, plot, write_results
from wam_fast.eval.rollout import chunk_latency_ms, evaluate_row, make_policy, measure_row_video
from wam_fast.eval.realtime_eval import RTC_DELAYS, RTC_EPISODES, RTC_MODELS, rtc_table, run_rtc
from wam_fast.eval.settings import MODELS, STUDENTS, Settings, model_config
from wam_fast.eval.stages import distill_command, distill_student, make_demos, make_latents, train_teacher
from wam_fast.eval.video_fidelity import VIDEO_KEYS

logger = logging.getLogger("wam_fast.eval")


def retime(settings: Settings, results_dir: Path = RESULTS_DIR) -> dict:
    """Time every recorded row of ``results_dir/metaworld-<task>.json`` again (e.g. on an idle machine):
    latency_ms, latency_ms_raw and the environment are replaced, success rates are kept."""
    path = results_dir / f"metaworld-{settings.task}.json"
    if not path.is_file():
        raise ValueError(f"--retime: no recorded results at {path}; run python -m wam_fast.eval --task "
                         f"{settings.task} first")
    results = json.loads(path.read_text())
    rows = {row.name: row for row in MODELS}
    config = model_config(settings)
    text = mw.instruction_embedding(settings.task, config.text_len, config.text_dim)
    env = mw.MetaWorldEnv(settings.task, "heldout", camera=results["settings"]["camera"])
    try:
        image = env.reset(0)
    finally:
        env.close()
    frozen = results.get("autoencoder")
    for measured in results["models"]:
        row = rows[measured["name"]]
        policy = make_policy(row, {row.source: Path(measured["checkpoint"]),
                                   "autoencoder": Path(frozen) if frozen else None}, settings.seed,
                             settings.task)
        measured["latency_ms"], measured["latency_ms_raw"] = chunk_latency_ms(
            policy, text, image, repeats=5 if results["episodes"] <= 2 else 20)
    results["environment"] = environment()
    results["retimed"] = True
    write_results(path, results)
    plot(results, path.with_suffix(".png"))
    return results


RECORDED_TASKS = ("push-v3", "drawer-open-v3", "button-press-wall-v3")  # benchmarks/results/metaworld-<task>.json
# Settings that do not change a row's success: the rows asked for (each is measured alone) and the
# video pass (a row recorded with other video_rounds gets its video measured again, nothing else).
ROW_ONLY_SETTINGS = ("models", "video_rounds")


def same_run(old: Optional[dict], new: dict) -> bool:
    """Whether rows recorded with settings ``old`` belong to a run with settings ``new``: every setting
    equal except ``ROW_ONLY_SETTINGS``. A setting added after ``old`` was written counts at its default
    (what the code did before it existed)."""
    if old is None:
        return False
    defaults = jsonable(dataclasses.asdict(Settings(task=new["task"])))
    old = {**{k: defaults[k] for k in new if k not in old}, **old}
    return {k: v for k, v in old.items() if k not in ROW_ONLY_SETTINGS} == \
        {k: v for k, v in new.items() if k not in ROW_ONLY_SETTINGS}


def _last_metrics(path: Path) -> Optional[dict]:
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1]) if lines else None


def _distill_summary(settings: Settings, teacher: Path, demos: Path, out: Path, source: str) -> dict:
    """The distill command, its last training metrics and its own evaluation table (OUT/eval.json)."""
    report = json.loads((out / "eval.json").read_text())
    command = distill_command(settings, teacher, demos, out, *STUDENTS[source])
    return {"command": "python " + " ".join(command[1:]), "metrics": report.get("train", {}).get("metrics"),
            "distill_eval_table": report.get("table")}


def run_task(settings: Settings, out: Path, results_dir: Path = RESULTS_DIR, progress: bool = True) -> dict:
    """Every stage for one task (module docstring); returns the results dict (also in results_dir)."""
    rows = [row for row in MODELS if row.name in settings.models]
    unknown = sorted(set(settings.models) - {row.name for row in MODELS})
    if unknown:
        raise ValueError(f"unknown model rows {unknown}; expected names from {[row.name for row in MODELS]}")
    mw.check_task(settings.task)
    task_dir = out / settings.task
    pixel_demos = make_demos(settings, task_dir / "demos")
    demos, frozen = make_latents(settings, pixel_demos, task_dir, progress=progress)
    checkpoints = {"teacher": train_teacher(settings, demos, task_dir / "teacher", progress=progress),
                   "autoencoder": frozen}
    path = results_dir / f"metaworld-{settings.task}.json"
    settings_dict = jsonable(dataclasses.asdict(settings))
    demo_data = LatentDataset(pixel_demos)
    results = {"task": settings.task, "episodes": settings.episodes, "multimodal": settings.multimodal,
               "models": [], "settings": settings_dict,
               "environment": environment(),
               "command": f"python -m wam_fast.eval --task {settings.task} --out {out}",
               "demos": demo_data.metadata.get("metaworld", {}) | {"samples": len(demo_data)},
               "training": {"teacher": _last_metrics(task_dir / "teacher" / "metrics.jsonl")}}
    if frozen is not None:
        results["autoencoder"] = str(frozen)
        results["training"]["autoencoder"] = _last_metrics(task_dir / "autoencoder" / "metrics.jsonl")
    if settings.teacher_pretrain_steps > 0:
        results["training"]["teacher_pretrain"] = _last_metrics(task_dir / "teacher" / "pretrain" / "metrics.jsonl")
    if path.is_file():  # resume: keep rows measured with the same settings, and how they were timed
        old = json.loads(path.read_text())
        if same_run(old.get("settings"), settings_dict):
            results["models"] = [m for m in old["models"] if m["name"] in settings.models]
            results.update({key: old[key] for key in ("environment", "retimed") if key in old})
    config = model_config(settings)
    text = mw.instruction_embedding(settings.task, config.text_len, config.text_dim)
    envs = [mw.MetaWorldEnv(settings.task, "heldout", camera=settings.camera) for _ in range(settings.episodes)]

    def evaluate(selected):
        for row in selected:
            recorded = next((m for m in results["models"] if m["name"] == row.name), None)
            if recorded is not None:
                if recorded.get("video_rounds") != settings.video_rounds or not set(VIDEO_KEYS) <= set(recorded):
                    # recorded before its video pass (or one with other keys or rounds): that pass only
                    recorded.update(measure_row_video(row, checkpoints, settings, text, envs),
                                    video_commit=environment()["commit"])
                    write_results(path, results)
                continue
            measured = evaluate_row(row, checkpoints, settings, text, envs)
            results["environment"] = environment()  # this row's; the file is no longer all retimed
            measured["commit"] = results["environment"]["commit"]  # a resumed file mixes rows of several
            measured["video_commit"] = measured["commit"]
            results.pop("retimed", None)
            video = f", video PSNR {measured['video_psnr']:.1f} dB" if measured["video_psnr"] is not None else ""
            logger.info(f"{settings.task} {row.name}: success {measured['success']:.0%} "
                        f"[{measured['ci95'][0]:.0%}, {measured['ci95'][1]:.0%}] of {settings.episodes}, "
                        f"{measured['latency_ms']:.1f} ms/chunk{video}"
                        + (f", routes {measured['routes']}" if "routes" in measured else ""))
            results["models"].append(measured)
            results["models"].sort(key=lambda m: [r.name for r in rows].index(m["name"]))
            write_results(path, results)

    try:
        # The teacher first: whether it learned the task is known before any student is trained.
        evaluate([row for row in rows if row.source == "teacher"])
        for source, (method, future_frames) in STUDENTS.items():
            if any(row.source == source for row in rows):
                checkpoints[source] = distill_student(settings, checkpoints["teacher"], demos,
                                                      task_dir / f"student-{source}", method, future_frames)
                results["training"][source] = _distill_summary(settings, checkpoints["teacher"], demos,
                                                               task_dir / f"student-{source}", source)
        evaluate([row for row in rows if row.source != "teacher"])
    finally:
        for env in envs:
            env.close()
    write_results(path, results)
    plot(results, path.with_suffix(".png"))
    return results


# ---- command line ------------------------------------------------------------------------------------
def delay_list(text: str) -> tuple:
    try:
        delays = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 0, got {text!r}") from None
    if not delays or min(delays) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 0, got {text!r}")
    return delays


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m wam_fast.eval",
        description="Meta-World MT1 fidelity: demonstrations from the scripted expert, a small WAM teacher, "
                    "shortcut and consistency students from python -m wam_fast.distill (temporal mask, KV "
                    "cache, FP8), closed-loop success on held-out layouts with 95% intervals and CPU latency, "
                    "video PSNR / SSIM of each row's predicted frame, the route of each episode on the multimodal "
                    "task. Results: benchmarks/results/metaworld-<task>.json and .png. Re-running resumes.")
    parser.add_argument("--task", action="append", help="an MT1 task name (repeatable; default the recorded "
                        f"tasks: {', '.join(RECORDED_TASKS)})")
    parser.add_argument("--out", default="wam_fast_metaworld", type=output_dir,
                        help="working directory (demos, checkpoints)")
    parser.add_argument("--results", default=str(RESULTS_DIR), type=output_dir, help="where the JSON and PNG go")
    parser.add_argument("--smoke", action="store_true", help="the CI version: 2 episodes, a few training steps")
    parser.add_argument("--episodes", type=positive_int, help="held-out episodes per model (default 50)")
    parser.add_argument("--models", help=f"comma-separated rows (default all: {','.join(r.name for r in MODELS)})")
    parser.add_argument("--retime", action="store_true", help="only time the recorded rows again (latency at "
                        "batch 1, e.g. on an idle machine); success rates are kept (with --rtc: the chunk times)")
    parser.add_argument("--rtc", action="store_true", help="real-time chunking instead (eval.realtime_eval): rows "
                        "under an injected inference delay, sync / naive async / rtc; "
                        "benchmarks/results/metaworld-<task>-rtc.json")
    parser.add_argument("--rtc-models", default=",".join(RTC_MODELS), help="--rtc: comma-separated rows, the first "
                        f"judged by the targets (default {','.join(RTC_MODELS)})")
    parser.add_argument("--delays", type=delay_list, default=RTC_DELAYS, help="--rtc: comma-separated inference "
                        f"delays in control ticks (default {','.join(map(str, RTC_DELAYS))})")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (1: the fastest per core "
                        "for this small model; run tasks in parallel processes)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("OpenGL").setLevel(logging.WARNING)
    try:
        mw.require_metaworld()
    except ImportError as error:
        print(f"python -m wam_fast.eval: error: {error}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    for task in args.task or RECORDED_TASKS:
        settings = Settings.smoke(task) if args.smoke else Settings.for_task(task)
        overrides = {}
        if args.episodes is not None or (args.rtc and not args.smoke):
            overrides["episodes"] = args.episodes or RTC_EPISODES
        if args.models:
            overrides["models"] = tuple(args.models.split(","))
        settings = dataclasses.replace(settings, **overrides)
        try:
            if args.rtc:
                results = run_rtc(settings, Path(args.out), Path(args.results), models=args.rtc_models.split(","),
                                  delays=args.delays, progress=not args.no_progress, retime=args.retime)
                print(rtc_table(results))
                continue
            if args.retime:
                results = retime(settings, Path(args.results))
            else:
                results = run_task(settings, Path(args.out), Path(args.results), progress=not args.no_progress)
        except ValueError as error:
            print(f"python -m wam_fast.eval: error: {error}", file=sys.stderr)
            return 2
        print(markdown_table(results))
    return 0
