"""``python -m wam_fast.distill``: distill a multi-step world action model into a 1-4 step student.

Three commands (``python -m wam_fast.distill --help`` documents every option):

  python -m wam_fast.distill --teacher CKPT --data DIR --out DIR [--method shortcut|consistency]
        [--steps 1,2,4] [--mask temporal|full] [--history N] [--cfg-scale S] [--rollout]
        [--train-steps N] [--batch-size N] [--micro-batch-size N] [--lr F] [--ema-decay F]
        [--checkpoint-every N] [--precision bf16|fp32] [--parallel auto|none|ddp|fsdp] [--seed N]
        [--solver-steps N] [--eval-conditions N] [--eval-seeds N] [--teacher-steps N]
      Loads the teacher (``wam_fast.load_pretrained``), checks that the dataset fits it, with
      ``--rollout`` first makes targets from the teacher alone (``data.teacher_rollout`` into
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
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

logger = logging.getLogger("wam_fast.distill")

METHODS = ("shortcut", "consistency")
MASKS = ("temporal", "full")
DEMO_OUT = "wam_fast_distill_demo"
RUN_FILE, EVAL_FILE, ROLLOUT_DIR = "run.json", "eval.json", "rollout"
# run.json keys that may differ when a run resumes (how long and how it runs, not what it computes)
RESUMABLE = ("train_steps", "checkpoint_every", "micro_batch_size", "parallel", "eval_batch_size", "eval_seeds",
             "teacher_steps", "progress")


class CLIError(Exception):
    """A bad input: printed as one line, exit code 2."""


def _one_line(message: str) -> str:
    return " ".join(str(message).replace("\n  - ", "; ").split())


@contextlib.contextmanager
def _checking(what: str):
    """Turn the input errors of the block into a CLIError naming ``what``."""
    try:
        yield
    except CLIError:
        raise
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError) as error:
        raise CLIError(f"{what}: {_one_line(error)}") from None


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
        self.exit(2, f"{self.prog}: error: {_one_line(message)}\n")


def parse_steps(text: str) -> Tuple[int, ...]:
    """"1,2,4" -> (1, 2, 4): positive ints in strictly increasing order."""
    try:
        steps = tuple(int(part) for part in str(text).split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps takes step counts separated by commas such as 1,2,4, "
                                         f"got {text!r}") from None
    if any(s < 1 for s in steps) or list(steps) != sorted(set(steps)):
        raise argparse.ArgumentTypeError(f"--steps must be positive step counts in strictly increasing order "
                                         f"such as 1,2,4, got {text!r}")
    return steps


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


# ---- small helpers -------------------------------------------------------------------------------
def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _say(message: str) -> None:
    if _rank() == 0:
        print(message, flush=True)


def _write_json(path: Path, data: dict) -> None:
    from wam_fast.checkpoint import atomic_write

    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def load_model(path, what: str):
    """A WAMTransformer checkpoint directory -> the model (float32, on this process's device)."""
    import wam_fast

    if path is None:
        raise CLIError(f"{what}: no checkpoint directory given")
    path = Path(path)
    if not path.is_dir():
        raise CLIError(f"{what}: checkpoint directory {path} not found")
    with _checking(f"{what} {path}"):
        return wam_fast.load_pretrained(path, device=_device()).float().eval()


def open_dataset(path, what: str = "--data"):
    from wam_fast.distill.data import LatentDataset

    if path is None:
        raise CLIError(f"{what}: no dataset directory given")
    with _checking(f"{what} {path}"):
        return LatentDataset(path)


def _check_data_fits(dataset, config, what: str = "--data") -> None:
    """The dataset's tensors fit a model of ``config`` (``LatentDataset.mismatches``), except that more
    history frames than ``config.history_frames`` are allowed: the most recent ones are used."""
    from wam_fast.distill.data import FIELDS

    fields = list(FIELDS)
    if "history" in dataset.fields and dataset.fields["history"].shape[0] > config.history_frames:
        fields.remove("history")
    problems = dataset.mismatches(config, fields)
    if problems:
        raise CLIError(f"{what} {dataset.directory} does not fit the model ({config.name!r}): " + "; ".join(problems))


class Rows:
    """The rows ``indices`` of a dataset, itself a dataset (``len``, ``get``) for the trainer."""

    def __init__(self, dataset, indices: torch.Tensor):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, indices) -> Dict[str, torch.Tensor]:
        return self.dataset.get(self.indices[torch.as_tensor(indices, dtype=torch.int64)])


def split(num_samples: int, eval_conditions: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train rows, held-out rows): a seeded permutation, the last ``eval_conditions`` held out, each sorted."""
    if num_samples < 2:
        raise CLIError(f"--data holds {num_samples} sample(s); at least 2 are needed (training rows and "
                       "held-out conditions)")
    if eval_conditions >= num_samples:
        raise CLIError(f"--eval-conditions {eval_conditions} leaves no training rows of the {num_samples} in --data")
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return perm[:-eval_conditions].sort().values, perm[-eval_conditions:].sort().values


def _jsonable(data):
    """``data`` as it reads back from JSON (tuples become lists), for comparisons with files."""
    return json.loads(json.dumps(data))


def _check_run_file(out: Path, settings: dict) -> None:
    """Refuse an OUT that holds a run with other settings (nothing is written here)."""
    path = out / RUN_FILE
    settings = _jsonable(settings)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")
    if not path.is_file():
        if (out / "checkpoints").exists():
            raise CLIError(f"--out {out} holds checkpoints but no {RUN_FILE}: it is not a run of this command; "
                           "choose another --out")
        return
    try:
        old = json.loads(path.read_text())
    except ValueError as error:
        raise CLIError(f"--out {out}: {path} is not valid JSON ({error}); choose another --out") from None
    diffs = [f"{key}: {old.get(key)!r} there, {settings.get(key)!r} now"
             for key in sorted(set(old) | set(settings)) if key not in RESUMABLE and old.get(key) != settings.get(key)]
    if diffs:
        raise CLIError(f"--out {out} holds a run with other settings ({'; '.join(diffs)}); nothing was changed: "
                       "re-run with its settings to resume it, or choose another --out")


def _check_steps(steps) -> Tuple[int, ...]:
    try:
        return parse_steps(",".join(str(s) for s in steps))
    except (argparse.ArgumentTypeError, TypeError) as error:
        raise CLIError(str(error)) from None


def _init_group_for_rollout() -> bool:
    """Under torchrun, a process group so the ranks can wait for rank 0's rollout; True if made here."""
    import torch.distributed as dist

    if _world() <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(_device())
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return True


def _rollout_ready(path: Path, dataset, teacher_config, cfg_scale: float, seed: int) -> bool:
    """True when ``path`` holds the complete rollout this run would make; a CLIError when it holds another."""
    from wam_fast.distill.data import INDEX_NAME, LatentDataset

    if not (path / INDEX_NAME).is_file():
        return False
    with _checking(f"the rollout in {path}"):
        rolled = LatentDataset(path)
    meta = rolled.metadata.get("teacher_rollout", {})
    problems = []
    if len(rolled) != len(dataset):
        problems.append(f"{len(rolled)} rows, --data has {len(dataset)}")
    if meta.get("teacher") != _jsonable(teacher_config.to_dict()):
        problems.append("made by another teacher")
    if meta.get("cfg_scale") != cfg_scale or meta.get("seed") != seed:
        problems.append(f"cfg_scale {meta.get('cfg_scale')} and seed {meta.get('seed')}, this run uses "
                        f"{cfg_scale} and {seed}")
    if problems:
        raise CLIError(f"{path} holds another rollout ({'; '.join(problems)}); nothing was changed: "
                       "choose another --out")
    return True


def distill(teacher, data, out, *, method: str = "shortcut", steps: Sequence[int] = (1, 2, 4),
            mask: str = "temporal", history: Optional[int] = None, cfg_scale: Optional[float] = None,
            rollout: bool = False, train_steps: int = 2000, batch_size: int = 32,
            micro_batch_size: Optional[int] = None, lr: float = 1e-4, ema_decay: float = 0.999,
            checkpoint_every: int = 500, precision: Optional[str] = None, parallel: str = "auto", seed: int = 0,
            eval_conditions: Optional[int] = None, eval_seeds: int = 4, teacher_steps: Optional[int] = None,
            eval_batch_size: int = 64, solver_steps: Optional[int] = None, progress: bool = True,
            tensorboard: bool = True):
    """The distill command (module docstring) as a function; returns the EvalReport (None on ranks > 0).

    teacher, data, out   directories: the teacher checkpoint, the latent dataset, the run's output
    Raises CLIError (before writing anything) for a bad input.
    """
    from wam_fast.distill import objectives, trainer
    from wam_fast.distill.data import teacher_rollout
    from wam_fast.distill.evaluate import evaluate, format_table
    from wam_fast.sampling import default_options

    if method not in METHODS:
        raise CLIError(f"--method: unknown distillation method {method!r}; expected one of {METHODS}")
    if mask not in MASKS:
        raise CLIError(f"--mask: expected one of {MASKS}, got {mask!r}")
    steps = _check_steps(steps)
    if solver_steps is not None and method != "consistency":
        raise CLIError("--solver-steps is an option of --method consistency")
    objective_options = {} if solver_steps is None else {"solver_steps": solver_steps}
    out = Path(out)
    teacher_model = load_model(teacher, "--teacher")
    tc = teacher_model.config
    if tc.distillation:
        raise CLIError(f"--teacher {teacher} is a {tc.distillation} student (distilled_steps "
                       f"{tc.distilled_steps}); distill from a multi-step teacher")
    dataset = open_dataset(data)
    if history is None:
        history = dataset.fields["history"].shape[0] if mask == "temporal" and "history" in dataset.fields else 0
    if history and mask != "temporal":
        raise CLIError(f"--history {history} needs --mask temporal (history frames are clean context)")
    if cfg_scale is None:
        cfg_scale = default_options(tc)[2]
    if cfg_scale < 0:
        raise CLIError(f"--cfg-scale must be >= 0, got {cfg_scale}")
    with _checking("the student"):
        student = objectives.make_student(teacher_model, method, steps, mask=mask, history_frames=history,
                                          cfg_scale=float(cfg_scale))
    with _checking(f"--method {method}"):
        objective = objectives.objective_for(method, teacher_model, student.config, **objective_options)
    _check_data_fits(dataset, student.config)
    if not dataset.has_targets and not rollout:
        raise CLIError(f"--data {data} holds conditions only (no future / actions targets): pass --rollout to "
                       "sample targets from the teacher")
    n = len(dataset)
    if eval_conditions is None:
        eval_conditions = max(1, min(64, n // 8))
    train_rows, heldout = split(n, eval_conditions, seed)
    if precision is None:
        precision = "bf16" if _device().type == "cuda" else "fp32"
    with _checking("training settings"):
        train_config = trainer.TrainConfig(
            steps=train_steps, batch_size=batch_size, micro_batch=micro_batch_size, lr=lr, ema_decay=ema_decay,
            precision=precision, seed=seed, checkpoint_every=checkpoint_every, parallel=parallel,
            progress=progress, tensorboard=tensorboard, log_every=max(1, min(50, train_steps // 20)))
    world = _world()
    if batch_size % world or (micro_batch_size and (batch_size // world) % micro_batch_size):
        raise CLIError(f"--batch-size {batch_size} must split into {world} processes of whole micro-batches "
                       f"(--micro-batch-size {micro_batch_size})")
    settings = {"command": "distill", "teacher": str(Path(teacher).resolve()), "data": str(Path(data).resolve()),
                "method": method, "steps": list(steps), "mask": mask, "history": history,
                "cfg_scale": float(cfg_scale), "rollout": bool(rollout), "train_steps": train_steps,
                "batch_size": batch_size, "micro_batch_size": micro_batch_size, "lr": lr, "ema_decay": ema_decay,
                "checkpoint_every": checkpoint_every, "precision": precision, "parallel": parallel, "seed": seed,
                "eval_conditions": eval_conditions, "eval_seeds": eval_seeds, "teacher_steps": teacher_steps,
                "eval_batch_size": eval_batch_size, "solver_steps": solver_steps}
    _check_run_file(out, settings)
    rollout_path = out / ROLLOUT_DIR
    # under torchrun the ranks agree on rank 0's view of the rollout (rank 0 may be writing it already)
    made_group = _init_group_for_rollout() if rollout else False
    rollout_done = rollout and _rollout_ready(rollout_path, dataset, tc, float(cfg_scale), seed)
    if made_group:
        box = [rollout_done]
        torch.distributed.broadcast_object_list(box, src=0)
        rollout_done = box[0]

    # ---- everything checked: from here on the run writes into OUT ----
    if _rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / RUN_FILE, settings)
    train_data = dataset
    if rollout:
        if not rollout_done and _rank() == 0:
            _say(f"teacher rollout: sampling targets for {n} conditions into {rollout_path}")
            teacher_rollout(teacher_model, dataset, rollout_path, cfg_scale=float(cfg_scale), seed=seed,
                            batch_size=eval_batch_size)
        if made_group:
            torch.distributed.barrier()
        train_data = open_dataset(rollout_path, "the rollout")
    try:
        _say(f"distilling {tc.name!r} ({tc.mask} mask) into a {method} student ({mask} mask, steps "
             f"{','.join(map(str, steps))}, guidance {float(cfg_scale):g} baked in): {train_steps} steps of "
             f"{batch_size} on {len(train_rows)} samples, {eval_conditions} held out; output in {out}")
        result = trainer.train(student, objective, Rows(train_data, train_rows), train_config, out)
    finally:
        if made_group:
            torch.distributed.destroy_process_group()
    if _rank() != 0:
        return None
    final = load_model(out / trainer.FINAL_DIR, "the trained student")
    report = evaluate(teacher_model, final, dataset.get(heldout), steps=steps, seeds=eval_seeds,
                      teacher_steps=teacher_steps, cfg_scale=float(cfg_scale), batch_size=eval_batch_size,
                      noise_seed=seed)
    table = format_table(report)
    _write_json(out / EVAL_FILE, {"report": report.to_dict(), "table": table, "run": settings,
                                  "train": {"step": result.step, "metrics": result.metrics},
                                  "student": str(out / trainer.FINAL_DIR)})
    _say(table)
    _say(f"student: {out / trainer.FINAL_DIR} (wam_fast.load_pretrained); report: {out / EVAL_FILE}")
    return report


# ---- eval ------------------------------------------------------------------------------------------
def random_conditions(config, num: int, seed: int) -> Dict[str, torch.Tensor]:
    """N(0, 1) text embeddings and image latents (+ robot ids): conditions when there is no data."""
    g = torch.Generator().manual_seed(seed)
    out = {"text": torch.randn((num, config.text_len, config.text_dim), generator=g),
           "image": torch.randn((num, 1, config.latent_channels, config.latent_height, config.latent_width),
                                generator=g)}
    if config.num_robots:
        out["robot_id"] = torch.randint(config.num_robots, (num,), generator=g)
    return out


def evaluate_checkpoints(teacher, student, data=None, *, conditions: int = 64, seeds: int = 4,
                         steps: Optional[Sequence[int]] = None, cfg_scale: Optional[float] = None,
                         teacher_steps: Optional[int] = None, batch_size: int = 64, seed: int = 0,
                         json_path=None):
    """The eval command as a function: returns the EvalReport, prints its table (CLIError on bad input)."""
    from wam_fast.distill.evaluate import evaluate, format_table
    from wam_fast.distill.objectives import check_teacher_student

    teacher_model = load_model(teacher, "--teacher")
    student_model = load_model(student, "--student")
    with _checking(f"--student {student} does not fit --teacher {teacher}"):
        check_teacher_student(teacher_model.config, student_model.config)
    if steps is not None:
        steps = _check_steps(steps)
    elif not student_model.config.distillation:
        raise CLIError(f"--student {student} is not a distilled student (config.distillation is empty): pass --steps")
    if data is not None:
        dataset = open_dataset(data)
        _check_data_fits(dataset, student_model.config)
        conds = dataset.get(torch.arange(min(conditions, len(dataset))))
        source = f"the first {len(conds['text'])} rows of {data}"
    else:
        conds = random_conditions(teacher_model.config, conditions, seed)
        source = f"{conditions} random N(0, 1) conditions (no --data: no error vs data)"
    if json_path is not None:
        json_path = Path(json_path)
        if json_path.is_dir() or not json_path.parent.is_dir():
            raise CLIError(f"--json {json_path}: expected a file path in an existing directory")
    with _checking("evaluation"):
        report = evaluate(teacher_model, student_model, conds, steps=steps, seeds=seeds, teacher_steps=teacher_steps,
                          cfg_scale=cfg_scale, batch_size=batch_size, noise_seed=seed)
    table = format_table(report)
    _say(f"conditions: {source}")
    _say(table)
    if json_path is not None:
        _write_json(json_path, {"report": report.to_dict(), "table": table, "teacher": str(teacher),
                                "student": str(student), "conditions": source})
    return report


# ---- demo ------------------------------------------------------------------------------------------
def demo_config():
    """The demo's tiny teacher: "tiny" with 4x4 latents, 4 text tokens and 2-D actions (16 tokens a forward)."""
    from wam_fast.configs import get

    return dataclasses.replace(get("tiny"), name="demo-tiny", latent_height=4, latent_width=4, text_len=4,
                               action_dim=2)


def run_demo(out=DEMO_OUT, *, teacher_steps: int = 1200, distill_steps: int = 400, method: str = "shortcut",
             steps: Sequence[int] = (1, 2, 4), mask: str = "temporal", num_samples: int = 2048,
             batch_size: int = 64, teacher_lr: float = 2e-3, lr: float = 1e-3, teacher_ema_decay: float = 0.99,
             ema_decay: float = 0.95, cfg_scale: float = 2.0, solver_steps: int = 10, eval_conditions: int = 64,
             eval_seeds: int = 4, seed: int = 0, checkpoint_every: int = 200, progress: bool = True,
             tensorboard: bool = False):
    """The embedded demo; returns the EvalReport. Each stage resumes or reuses what OUT holds:

    1. OUT/data: ``make_synthetic_dataset`` of the ``demo_config`` model (bimodal actions given text
       and image, future frames a function of image and mode);
    2. OUT/teacher: a full-mask teacher trained on it with ``DiffusionObjective`` (cosine schedule,
       EMA ``teacher_ema_decay``; OUT/teacher/final holds the EMA weights);
    3. OUT/student-METHOD: ``distill`` of that teacher (guidance ``cfg_scale`` baked in), evaluated on
       ``eval_conditions`` held-out conditions; the table is printed and OUT/student-METHOD/eval.json
       written. Consistency distillation steps along the ``solver_steps``-point grid of the teacher's
       DDIM (10: the grid of the 10-step reference).
    """
    from wam_fast.distill.data import INDEX_NAME

    if method not in METHODS:
        raise CLIError(f"--method: unknown distillation method {method!r}; expected one of {METHODS}")
    out = Path(out)
    config = demo_config()
    settings = {"command": "demo", "num_samples": num_samples, "seed": seed, "teacher_steps": teacher_steps,
                "batch_size": batch_size, "teacher_lr": teacher_lr, "teacher_ema_decay": teacher_ema_decay,
                "config": config.to_dict()}
    _check_run_file(out, settings)
    data_dir, teacher_dir, student_dir = out / "data", out / "teacher", out / f"student-{method}"
    if (data_dir / INDEX_NAME).is_file():
        dataset = open_dataset(data_dir, "the demo's data")
        expected = _jsonable({"seed": seed, "num_instructions": 4, "config": config.to_dict()})
        if dataset.metadata.get("synthetic") != expected or len(dataset) != num_samples:
            raise CLIError(f"{data_dir} holds another dataset; nothing was changed: choose another --out")
    if _rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / RUN_FILE, settings)
    # The demo's model is tiny (64-wide matmuls over 16 tokens): intra-op threads only add overhead,
    # and on a shared machine their spin-waits make training several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _demo_stages(out, config, data_dir, teacher_dir, student_dir, teacher_steps=teacher_steps,
                            distill_steps=distill_steps, method=method, steps=steps, mask=mask,
                            num_samples=num_samples, batch_size=batch_size, teacher_lr=teacher_lr, lr=lr,
                            teacher_ema_decay=teacher_ema_decay, ema_decay=ema_decay, cfg_scale=cfg_scale,
                            solver_steps=solver_steps, eval_conditions=eval_conditions, eval_seeds=eval_seeds,
                            seed=seed, checkpoint_every=checkpoint_every, progress=progress,
                            tensorboard=tensorboard)
    finally:
        torch.set_num_threads(threads)


def _demo_stages(out, config, data_dir, teacher_dir, student_dir, *, teacher_steps, distill_steps, method, steps,
                 mask, num_samples, batch_size, teacher_lr, lr, teacher_ema_decay, ema_decay, cfg_scale, solver_steps,
                 eval_conditions, eval_seeds, seed, checkpoint_every, progress, tensorboard):
    import wam_fast
    from wam_fast.distill import objectives, trainer
    from wam_fast.distill.data import INDEX_NAME, make_synthetic_dataset

    start = time.perf_counter()
    if not (data_dir / INDEX_NAME).is_file():
        _say(f"demo: synthetic dataset of {num_samples} samples in {data_dir}")
        make_synthetic_dataset(data_dir, config, num_samples, seed=seed)
    dataset = open_dataset(data_dir, "the demo's data")
    torch.manual_seed(seed)
    teacher = wam_fast.WAMTransformer(config)
    _say(f"demo: training the teacher ({config.name}: {sum(p.numel() for p in teacher.parameters())} parameters, "
         f"{config.num_tokens} tokens a forward) for {teacher_steps} steps of {batch_size} in {teacher_dir}")
    teacher_config = trainer.TrainConfig(
        steps=teacher_steps, batch_size=batch_size, lr=teacher_lr, warmup_steps=min(50, teacher_steps // 10),
        lr_schedule="cosine", min_lr_ratio=0.05, ema_decay=teacher_ema_decay, precision="fp32", seed=seed,
        checkpoint_every=checkpoint_every, log_every=max(1, min(50, teacher_steps // 20)), progress=progress,
        tensorboard=tensorboard)
    result = trainer.train(teacher, objectives.DiffusionObjective(config, cond_dropout=0.1), dataset, teacher_config,
                           teacher_dir)
    _say(f"demo: teacher loss {result.metrics.get('loss', float('nan')):.4f} at step {result.step} "
         f"({time.perf_counter() - start:.0f} s so far)")
    report = distill(teacher_dir / trainer.FINAL_DIR, data_dir, student_dir, method=method, steps=steps,
                     mask=mask, cfg_scale=cfg_scale, train_steps=distill_steps, batch_size=batch_size, lr=lr,
                     ema_decay=ema_decay, checkpoint_every=checkpoint_every, precision="fp32", seed=seed,
                     eval_conditions=eval_conditions, eval_seeds=eval_seeds,
                     solver_steps=solver_steps if method == "consistency" else None, progress=progress,
                     tensorboard=tensorboard)
    _say(f"demo: done in {time.perf_counter() - start:.0f} s")
    return report


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
                ("--parallel", args.parallel != "auto"), ("--teacher-steps", args.teacher_steps is not None)) if given]
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
                solver_steps=args.solver_steps, progress=not args.no_progress)
        return 0
    except CLIError as error:
        print(f"python -m wam_fast.distill: error: {error}", file=sys.stderr, flush=True)
        return 2
