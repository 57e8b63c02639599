"""Does longer distillation close a student's gap on a Meta-World task? One student of a recorded
``python -m wam_fast.eval`` run, resumed to more distillation steps, and its rows evaluated on the same
held-out episodes (the run's settings, teacher and demonstrations are reused, not changed):

    python benchmarks/metaworld_longer_distill.py --task push-v3 --out OUT --student action-only-consistency \
        --train-steps 2400 --json benchmarks/results/metaworld-push-v3-action-only-consistency-2400.json

The student's checkpoint is copied from OUT/<task>/student-<student> into student-<student>-<steps> and
``python -m wam_fast.distill`` is run there with the run's own command and ``--train-steps`` changed (it
resumes from the last checkpoint); a second call reuses what that directory holds.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from wam_fast.eval import metaworld as mw
from wam_fast.eval.results import environment, write_results
from wam_fast.eval.rollout import evaluate_row
from wam_fast.eval.settings import MODELS, STUDENTS, Settings, model_config
from wam_fast.eval.stages import distill_command


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--out", required=True, type=Path, help="the --out of the recorded python -m wam_fast.eval run")
    parser.add_argument("--student", required=True, choices=sorted(STUDENTS))
    parser.add_argument("--train-steps", required=True, type=int)
    parser.add_argument("--json", required=True, type=Path)
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="where the run's metaworld-<task>.json is (its teacher row goes beside)")
    parser.add_argument("--smoke", action="store_true", help="the run was python -m wam_fast.eval --smoke")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = Settings.smoke(args.task) if args.smoke else Settings.for_task(args.task)
    method, future_frames = STUDENTS[args.student]
    if args.train_steps <= settings.distill_steps(method):
        parser.error(f"--train-steps must exceed the run's {settings.distill_steps(method)} ({method})")
    task_dir = args.out / args.task
    recorded, longer = task_dir / f"student-{args.student}", task_dir / f"student-{args.student}-{args.train_steps}"
    if not longer.exists():
        shutil.copytree(recorded, longer, ignore=shutil.ignore_patterns("wam_fast_eval_stage.json", ".run.lock"))
    demos = task_dir / ("latents" if settings.latent_space == "autoencoder" else "demos")
    command = distill_command(settings, task_dir / "teacher" / "final", demos, longer, method, future_frames)
    command[command.index("--train-steps") + 1] = str(args.train_steps)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    distill_s = time.perf_counter() - start
    config = model_config(settings)
    text = mw.instruction_embedding(args.task, config.text_len, config.text_dim)
    envs = [mw.MetaWorldEnv(args.task, "heldout", camera=settings.camera) for _ in range(settings.episodes)]
    autoencoder = task_dir / "autoencoder" / "frozen"
    checkpoints = {args.student: longer / "final", "autoencoder": autoencoder if autoencoder.exists() else None}
    try:
        rows = [evaluate_row(row, checkpoints, settings, text, envs) for row in MODELS
                if row.source == args.student and not row.fp8]
    finally:
        for env in envs:
            env.close()
    metrics = [json.loads(line) for line in (longer / "metrics.jsonl").read_text().splitlines()]
    result = {"task": args.task, "episodes": settings.episodes, "models": rows, "environment": environment(),
              "student": args.student, "recorded_student": str(recorded / "final"),
              "distill_steps": {"recorded": settings.distill_steps(method), "here": args.train_steps},
              "command": "python " + " ".join(command[1:]), "distill_seconds": distill_s,
              "distill_metrics": metrics[-1] if metrics else None,
              "tool": "python benchmarks/metaworld_longer_distill.py " + " ".join(argv or sys.argv[1:])}
    # the teacher's success, for the targets: from the recorded results file of the same run
    recorded_results = json.loads((args.results / f"metaworld-{args.task}.json").read_text())
    result["models"] = [m for m in recorded_results["models"] if m["name"] == "teacher"] + rows
    write_results(args.json, result)
    for row in rows:
        print(f"{row['name']} ({args.train_steps} distillation steps): success {row['success']:.0%} "
              f"[{row['ci95'][0]:.0%}, {row['ci95'][1]:.0%}] of {row['episodes']}")
    return result


if __name__ == "__main__":
    main()
