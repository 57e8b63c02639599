"""``python -m wam_fast.distill``: distill a multi-step world action model into a 1-4 step student.

Three commands (``python -m wam_fast.distill --help`` documents every option):

  python -m wam_fast.distill --teacher CKPT --data DIR --out DIR [--method shortcut|consistency]
        [--steps 1,2,4] [--mask temporal|full] [--history N] [--future-frames K] [--prefix-fraction F]
        [--cfg-scale S] [--rollout]
        [--train-steps N] [--batch-size N] [--micro-batch-size N] [--lr F] [--ema-decay F]
        [--checkpoint-every N] [--precision bf16|fp32] [--parallel auto|none|ddp|fsdp] [--seed N]
        [--solver-steps N] [--eval-conditions N] [--eval-seeds N] [--teacher-steps N]
      Loads the teacher (``wam_fast.load_pretrained``), checks that the dataset fits it, with
      ``--rollout`` first makes targets from the teacher alone (``rollout.teacher_rollout`` into
      OUT/rollout, reused when complete), builds the student (``objectives.make_student``), trains
      it (``trainer.train``, checkpoints in OUT), evaluates it on held-out conditions
      (``evaluate.evaluate``), prints the table and writes OUT/eval.json. Running the same command
      again resumes where it stopped. Under torchrun every rank trains; rank 0 alone evaluates.

  python -m wam_fast.distill eval --teacher CKPT --student CKPT [--data DIR] [--seeds N] [--json PATH]
      The evaluation table of a student against its teacher.

  python -m wam_fast.distill [--out DIR] [--method ...]
      The embedded demo (no --teacher / --data): a tiny teacher trained on a tiny synthetic dataset,
      then distilled and evaluated, in a few minutes on a CPU (``run_demo``). Resumable like the rest.

Every input is checked before anything is written; a bad one ends the command with exit code 2
and one line on stderr, and leaves what OUT already held as it was. OUT/run.json records the
settings of the run in OUT; a later command with other settings on the same OUT is refused.

This module parses the command line (``main``); the commands themselves are ``commands.distill``,
``commands.evaluate_checkpoints`` and ``demo.run_demo``.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Optional, Sequence

from wam_fast.distill.commands import (MASKS, METHODS, CLIError, distill, evaluate_checkpoints, one_line,
                                       parse_steps)
from wam_fast.distill.demo import DEMO_OUT, run_demo

logger = logging.getLogger("wam_fast.distill")

# ---- argument parsing ----------------------------------------------------------------------------
class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written; "(default: X)" only where X says something."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (and exit code 2, as argparse's own)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def _parsed(text: str, cast, ok, expected: str):
    """An argparse type: ``cast(text)`` that passes ``ok``, else an error naming ``expected``."""
    try:
        value = cast(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _positive(text: str) -> int:
    return _parsed(text, int, lambda v: v >= 1, "a positive int")


def _non_negative(text: str) -> int:
    return _parsed(text, int, lambda v: v >= 0, "an int >= 0")


def _number(text: str) -> float:
    return _parsed(text, float, math.isfinite, "a finite number")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m wam_fast.distill",
        description=(
            "Distill a multi-step world action model (the teacher) into a student that samples in 1-4 steps\n"
            "with classifier-free guidance baked in (shortcut or consistency distillation), then compare it\n"
            "with the teacher from the same noise.\n\n"
            "  python -m wam_fast.distill --teacher CKPT --data DIR --out DIR [options]   distill, evaluate\n"
            "  python -m wam_fast.distill eval --teacher CKPT --student CKPT [...]        evaluate a student\n"
            "  python -m wam_fast.distill [--out DIR] [--method ...]                      the embedded demo:\n"
            "      a tiny teacher trained on synthetic data, distilled and evaluated (CPU minutes)\n\n"
            "The distill command loads the teacher, checks the data fits it (with --rollout first samples\n"
            "targets from the teacher), builds the student from the teacher's weights, trains it (resumable\n"
            "checkpoints in OUT; torchrun runs DDP / FSDP2), evaluates it on held-out conditions, prints the\n"
            "table and writes OUT/eval.json. Table columns, per student step count k: action / video err =\n"
            "RMSE of the student's actions / future latents vs the teacher reference (default sampler, 10\n"
            "steps, guidance) from the same noise; teacher-k = the undistilled teacher in k steps (the\n"
            "baseline); ratio = student / teacher-k; spread = std of the actions across seeds (vs ref: student\n"
            "/ reference, ~0 = mode collapse); data act / vid = RMSE vs the dataset's targets."),
        epilog="Evaluate a saved student: python -m wam_fast.distill eval --teacher CKPT --student CKPT "
               "[--data DIR] [--seeds N] [--json PATH] (see python -m wam_fast.distill eval --help). "
               "Inputs are checked before anything is written; a bad one exits with code 2 and one line "
               "on stderr. Re-running a command on the same --out resumes it; other settings on the same "
               "--out are refused (OUT/run.json records them). Files in OUT: run.json, rollout/ (with "
               "--rollout), checkpoints/, metrics.jsonl, tensorboard/, final/ (the EMA student: load it "
               "with wam_fast.load_pretrained), final-online/, eval.json.",
        formatter_class=_Formatter)
    io = parser.add_argument_group("what to distill")
    io.add_argument("--teacher", metavar="CKPT", help="teacher checkpoint directory (wam_fast.save_pretrained: "
                    "model.safetensors + config.json)")
    io.add_argument("--data", metavar="DIR", help="latent dataset directory (wam_fast.distill.data: dataset.json + "
                    "shards); a conditions-only dataset (text + image) needs --rollout")
    io.add_argument("--out", metavar="DIR", help=f"output directory (required with --teacher; the demo's "
                    f"default is ./{DEMO_OUT})")
    io.add_argument("--rollout", action="store_true", help="data-free mode: targets sampled from the teacher "
                    "for every condition of --data (into OUT/rollout, reused when complete)")
    student = parser.add_argument_group("the student")
    student.add_argument("--method", choices=METHODS, default="shortcut",
                         help="shortcut: one model for every step count, step size as input; consistency: "
                              "LCM-style multistep consistency sampling")
    student.add_argument("--steps", type=parse_steps, default="1,2,4", metavar="K,K,...",
                         help="step counts the student is distilled for and evaluated at, increasing")
    student.add_argument("--mask", choices=MASKS, default="temporal",
                         help="temporal: clean text and current-frame context, KV-cacheable "
                              "(wam_fast.WAMPolicy(cache=True)); full: the teacher's bidirectional layout")
    student.add_argument("--history", type=_non_negative, default=None, metavar="N",
                         help="clean past frames a temporal student sees (default: the history frames of "
                              "the data, 0 without)")
    student.add_argument("--future-frames", type=_non_negative, default=None, metavar="K",
                         help="temporal students: the future latent frames the student denoises beside the "
                              "action chunk; 0 = an action-only student that predicts no video (the fastest "
                              "chunk: its noisy tokens are the actions alone); default: all of the teacher's")
    student.add_argument("--prefix-fraction", type=_number, default=None, metavar="F",
                         help="shortcut students: give this share of training rows a committed action prefix (the "
                              "data's first d actions, clean); the student then continues the actions a robot commits "
                              "while it infers (real-time chunking: WAMPolicy.act(prefix=...))")
    student.add_argument("--cfg-scale", type=_number, default=None, metavar="S",
                         help="classifier-free guidance of the teacher baked into the student (default: the "
                              "teacher's default guidance, wam_fast.sampling.default_options)")
    student.add_argument("--solver-steps", type=_positive, default=None, metavar="N",
                         help="consistency only: points of the teacher's DDIM / Euler grid its one-step targets "
                              "move along (default 50; fewer converge faster)")
    train = parser.add_argument_group("training")
    train.add_argument("--train-steps", type=_positive, default=None, metavar="N",
                       help="optimizer steps (default 2000; the demo's 400); may grow when resuming")
    train.add_argument("--batch-size", type=_positive, default=None, metavar="N",
                       help="global batch per optimizer step (default 32; the demo's 64)")
    train.add_argument("--micro-batch-size", type=_positive, default=None, metavar="N",
                       help="rows per forward per process (gradient accumulation); default: no accumulation")
    train.add_argument("--lr", type=_number, default=None, metavar="F", help="AdamW learning rate (default 1e-4; "
                       "the demo's 1e-3)")
    train.add_argument("--ema-decay", type=_number, default=None, metavar="F",
                       help="EMA of the student's weights, the weights saved in OUT/final and the targets "
                            "of the objectives (default 0.999; the demo's 0.95)")
    train.add_argument("--checkpoint-every", type=_positive, default=500, metavar="N",
                       help="steps between checkpoints (one is also written at the end)")
    train.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                       help="autocast precision of the forward passes (default bf16 on CUDA, fp32 on CPU); "
                            "weights and optimizer state stay fp32")
    train.add_argument("--parallel", choices=("auto", "none", "ddp", "fsdp"), default="auto",
                       help="under torchrun: DDP or FSDP2 (auto: DDP with several processes)")
    train.add_argument("--seed", type=_non_negative, default=0, help="seeds the held-out split, the "
                       "training samples and draws, the rollout and the evaluation noise")
    ev = parser.add_argument_group("evaluation")
    ev.add_argument("--eval-conditions", type=_positive, default=None, metavar="N",
                    help="conditions of --data held out from training and evaluated on (default "
                         "min(64, N/8))")
    ev.add_argument("--eval-seeds", type=_positive, default=4, metavar="N",
                    help="noise draws per condition (the spread across seeds needs >= 2)")
    ev.add_argument("--teacher-steps", type=_positive, default=None, metavar="N",
                    help="steps of the teacher reference (default: the teacher's default, 10)")
    ev.add_argument("--eval-batch-size", type=_positive, default=64, metavar="N",
                    help="rows per sampling call in the evaluation (results do not depend on it)")
    demo = parser.add_argument_group("demo only (no --teacher / --data)")
    demo.add_argument("--teacher-train-steps", type=_positive, default=None, metavar="N",
                      help="optimizer steps of the demo's teacher (default 1200)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def build_eval_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m wam_fast.distill eval",
        description="Compare a distilled student with its teacher from the same noise: action and future "
                    "video latent error vs the teacher reference at each step count, the undistilled "
                    "teacher at the same step count (the baseline), error vs the data's targets, and the "
                    "spread across seeds (mode collapse). Inputs are checked first; a bad one exits "
                    "with code 2 and one line on stderr.",
        formatter_class=_Formatter)
    parser.add_argument("--teacher", metavar="CKPT", required=True, help="teacher checkpoint directory")
    parser.add_argument("--student", metavar="CKPT", required=True,
                        help="student checkpoint directory (e.g. OUT/final of a distillation run)")
    parser.add_argument("--data", metavar="DIR", help="latent dataset whose first --conditions rows are the "
                        "conditions (and targets); without it, random N(0, 1) text and image latents "
                        "(no error vs data)")
    parser.add_argument("--conditions", type=_positive, default=64, metavar="N", help="conditions evaluated")
    parser.add_argument("--seeds", type=_positive, default=4, metavar="N", help="noise draws per condition")
    parser.add_argument("--steps", type=parse_steps, default=None, metavar="K,K,...",
                        help="student step counts (default: those it was distilled for)")
    parser.add_argument("--cfg-scale", type=_number, default=None, metavar="S",
                        help="guidance of the teacher runs (default: the scale baked into the student)")
    parser.add_argument("--teacher-steps", type=_positive, default=None, metavar="N",
                        help="steps of the teacher reference (default: the teacher's default, 10)")
    parser.add_argument("--batch-size", type=_positive, default=64, metavar="N", help="rows per sampling call")
    parser.add_argument("--seed", type=_non_negative, default=0, help="seeds the evaluation noise")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    return parser


# ---- main ------------------------------------------------------------------------------------------
class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (it may be replaced after the handler is made)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging() -> None:
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m wam_fast.distill``; returns the exit code (2: a bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    try:
        if argv and argv[0] == "eval":
            args = build_eval_parser().parse_args(argv[1:])
            evaluate_checkpoints(args.teacher, args.student, args.data, conditions=args.conditions, seeds=args.seeds,
                                 steps=args.steps, cfg_scale=args.cfg_scale, teacher_steps=args.teacher_steps,
                                 batch_size=args.batch_size, seed=args.seed, json_path=args.json)
            return 0
        args = build_parser().parse_args(argv)
        if args.teacher is None and args.data is None:
            unused = [flag for flag, given in (
                ("--rollout", args.rollout), ("--history", args.history is not None),
                ("--precision", args.precision is not None), ("--micro-batch-size", args.micro_batch_size is not None),
                ("--parallel", args.parallel != "auto"), ("--teacher-steps", args.teacher_steps is not None),
                ("--future-frames", args.future_frames is not None),
                ("--prefix-fraction", args.prefix_fraction is not None)) if given]
            if unused:
                raise CLIError(f"{', '.join(unused)}: options of a run with --teacher and --data; the demo "
                               "(no --teacher / --data) does not take them")
            options = {name: value for name, value in (
                ("teacher_steps", args.teacher_train_steps), ("distill_steps", args.train_steps),
                ("batch_size", args.batch_size), ("lr", args.lr), ("ema_decay", args.ema_decay),
                ("cfg_scale", args.cfg_scale), ("eval_conditions", args.eval_conditions),
                ("solver_steps", args.solver_steps)) if value is not None}
            run_demo(args.out or DEMO_OUT, method=args.method, steps=args.steps, mask=args.mask, seed=args.seed,
                     eval_seeds=args.eval_seeds, checkpoint_every=args.checkpoint_every,
                     progress=not args.no_progress, **options)
            return 0
        if args.teacher is None or args.data is None:
            raise CLIError("--teacher and --data go together (or neither, for the demo)")
        if args.out is None:
            raise CLIError("--out is required with --teacher and --data (the run's output directory)")
        if args.teacher_train_steps is not None:
            raise CLIError("--teacher-train-steps is for the demo only (no --teacher / --data)")
        distill(args.teacher, args.data, args.out, method=args.method, steps=args.steps, mask=args.mask,
                history=args.history, cfg_scale=args.cfg_scale, rollout=args.rollout,
                train_steps=args.train_steps or 2000, batch_size=args.batch_size or 32,
                micro_batch_size=args.micro_batch_size, lr=args.lr if args.lr is not None else 1e-4,
                ema_decay=args.ema_decay if args.ema_decay is not None else 0.999,
                checkpoint_every=args.checkpoint_every, precision=args.precision, parallel=args.parallel,
                seed=args.seed, eval_conditions=args.eval_conditions, eval_seeds=args.eval_seeds,
                teacher_steps=args.teacher_steps, eval_batch_size=args.eval_batch_size,
                solver_steps=args.solver_steps, progress=not args.no_progress, future_frames=args.future_frames,
                prefix_fraction=args.prefix_fraction)
        return 0
    except CLIError as error:
        print(f"python -m wam_fast.distill: error: {error}", file=sys.stderr, flush=True)
        return 2
