"""The distill and eval commands of ``python -m wam_fast.distill`` as functions (``distill``,
``evaluate_checkpoints``), with the input checks and run files they share with the demo.

Every input is checked before anything is written; a bad one raises ``CLIError`` (``cli.main``
prints it as one line and exits with code 2). OUT/run.json records the settings of a run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

from wam_fast.distill import objectives, trainer
from wam_fast.distill.data import FIELDS, INDEX_NAME, LatentDataset
from wam_fast.distill.distributed import default_device
from wam_fast.distill.evaluate import evaluate, format_table
from wam_fast.distill.objectives import check_teacher_student
from wam_fast.distill.rollout import teacher_rollout
from wam_fast.models.transformer import load_pretrained
from wam_fast.sampling import default_options
from wam_fast.utils.files import atomic_write
from wam_fast.utils.run_lock import RunLockedError

METHODS = ("shortcut", "consistency")
MASKS = ("temporal", "full")
RUN_FILE, EVAL_FILE, ROLLOUT_DIR = "run.json", "eval.json", "rollout"
# run.json keys that may differ when a run resumes (how long and how it runs, not what it computes)
RESUMABLE = ("train_steps", "checkpoint_every", "micro_batch_size", "parallel", "eval_batch_size", "eval_seeds",
             "teacher_steps", "progress")


class CLIError(Exception):
    """A bad input: printed as one line, exit code 2."""


def one_line(message: str) -> str:
    return " ".join(str(message).replace("\n  - ", "; ").split())


@contextlib.contextmanager
def _checking(what: str):
    """Turn the input errors of the block into a CLIError naming ``what``."""
    try:
        yield
    except CLIError:
        raise
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, RunLockedError) as error:
        raise CLIError(f"{what}: {one_line(error)}") from None


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


# ---- small helpers -------------------------------------------------------------------------------
def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _device() -> torch.device:
    """This process's device (cuda:LOCAL_RANK or cpu: ``distributed.default_device``), or a CLIError."""
    try:
        return default_device()
    except ValueError as error:
        raise CLIError(one_line(error)) from None


def say(message: str) -> None:
    if rank() == 0:
        print(message, flush=True)


def write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def load_model(path, what: str):
    """A WAMTransformer checkpoint directory -> the model (float32, on this process's device)."""
    if path is None:
        raise CLIError(f"{what}: no checkpoint directory given")
    path = Path(path)
    if not path.is_dir():
        raise CLIError(f"{what}: checkpoint directory {path} not found")
    with _checking(f"{what} {path}"):
        return load_pretrained(path, device=_device()).float().eval()


def open_dataset(path, what: str = "--data"):
    if path is None:
        raise CLIError(f"{what}: no dataset directory given")
    with _checking(f"{what} {path}"):
        dataset = LatentDataset(path)
        dataset.check_finite()  # one read of the data: a NaN is named here, not found as a diverged run
        return dataset


def _check_data_fits(dataset, config, what: str = "--data") -> None:
    """The dataset's tensors fit a model of ``config`` (``LatentDataset.mismatches``), except that more
    history frames than ``config.history_frames`` are allowed: the most recent ones are used."""
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


def jsonable(data):
    """``data`` as it reads back from JSON (tuples become lists), for comparisons with files."""
    return json.loads(json.dumps(data))


def check_run_file(out: Path, settings: dict) -> None:
    """Refuse an OUT that holds a run with other settings (nothing is written here)."""
    path = out / RUN_FILE
    settings = jsonable(settings)
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
    device = _device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def _rollout_ready(path: Path, dataset, teacher_config, cfg_scale: float, seed: int) -> bool:
    """True when ``path`` holds the complete rollout this run would make; a CLIError when it holds another."""
    if not (path / INDEX_NAME).is_file():
        return False
    with _checking(f"the rollout in {path}"):
        rolled = LatentDataset(path)
    meta = rolled.metadata.get("teacher_rollout", {})
    problems = []
    if len(rolled) != len(dataset):
        problems.append(f"{len(rolled)} rows, --data has {len(dataset)}")
    if meta.get("teacher") != jsonable(teacher_config.to_dict()):
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
            tensorboard: bool = True, future_frames: Optional[int] = None, prefix_fraction: Optional[float] = None):
    """The distill command (``cli`` module docstring) as a function; returns the EvalReport (None on ranks > 0).

    teacher, data, out   directories: the teacher checkpoint, the latent dataset, the run's output
    future_frames  the future frames a temporal student denoises (None: the teacher's, all; 0: an
                   action-only student, which predicts no video)
    prefix_fraction  shortcut students: the share of training rows with a committed action prefix; the
                   student then reads committed actions (real-time chunking, ``wam_fast.prefix``)
    Raises CLIError (before writing anything) for a bad input.
    """
    if method not in METHODS:
        raise CLIError(f"--method: unknown distillation method {method!r}; expected one of {METHODS}")
    if mask not in MASKS:
        raise CLIError(f"--mask: expected one of {MASKS}, got {mask!r}")
    steps = _check_steps(steps)
    if solver_steps is not None and method != "consistency":
        raise CLIError("--solver-steps is an option of --method consistency")
    objective_options = {} if solver_steps is None else {"solver_steps": solver_steps}
    if prefix_fraction is not None:
        if method != "shortcut":
            raise CLIError("--prefix-fraction is an option of --method shortcut (its committed rows learn the data's "
                           "velocity beside the teacher's rows)")
        if not 0.0 < prefix_fraction < 1.0:
            raise CLIError(f"--prefix-fraction must be in (0, 1) (the share of rows with a committed prefix), "
                           f"got {prefix_fraction}")
        objective_options["prefix_fraction"] = float(prefix_fraction)
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
    if future_frames is not None and mask != "temporal":
        raise CLIError(f"--future-frames {future_frames} needs --mask temporal (the current frame is clean context "
                       f"there, so the student's noisy tokens can leave out future frames)")
    if cfg_scale is None:
        cfg_scale = default_options(tc)[2]
    if cfg_scale < 0:
        raise CLIError(f"--cfg-scale must be >= 0, got {cfg_scale}")
    with _checking("the student"):
        student = objectives.make_student(teacher_model, method, steps, mask=mask, history_frames=history,
                                          cfg_scale=float(cfg_scale), future_frames=future_frames,
                                          action_prefix=prefix_fraction is not None)
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
    if future_frames is not None:  # only when given: runs of earlier versions resume with the same settings
        settings["future_frames"] = future_frames
    if prefix_fraction is not None:
        settings["prefix_fraction"] = float(prefix_fraction)
    check_run_file(out, settings)
    rollout_path = out / ROLLOUT_DIR
    # under torchrun the ranks agree on rank 0's view of the rollout (rank 0 may be writing it already)
    made_group = _init_group_for_rollout() if rollout else False
    rollout_done = rollout and _rollout_ready(rollout_path, dataset, tc, float(cfg_scale), seed)
    if made_group:
        box = [rollout_done]
        torch.distributed.broadcast_object_list(box, src=0)
        rollout_done = box[0]

    # ---- everything checked: from here on the run writes into OUT ----
    if rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / RUN_FILE, settings)
    train_data = dataset
    if rollout:
        if not rollout_done and rank() == 0:
            say(f"teacher rollout: sampling targets for {n} conditions into {rollout_path}")
            teacher_rollout(teacher_model, dataset, rollout_path, cfg_scale=float(cfg_scale), seed=seed,
                            batch_size=eval_batch_size)
        if made_group:
            torch.distributed.barrier()
        train_data = open_dataset(rollout_path, "the rollout")
    try:
        frames = "" if future_frames is None else (", action-only: no video" if student.config.action_only
                                                   else f", {future_frames} future frames")
        say(f"distilling {tc.name!r} ({tc.mask} mask) into a {method} student ({mask} mask{frames}, steps "
             f"{','.join(map(str, steps))}, guidance {float(cfg_scale):g} baked in): {train_steps} steps of "
             f"{batch_size} on {len(train_rows)} samples, {eval_conditions} held out; output in {out}")
        with _checking(f"training into {out}"):  # a run already in out, a damaged or different checkpoint
            result = trainer.train(student, objective, Rows(train_data, train_rows), train_config, out)
    finally:
        if made_group:
            torch.distributed.destroy_process_group()
    if rank() != 0:
        return None
    final = load_model(out / trainer.FINAL_DIR, "the trained student")
    report = evaluate(teacher_model, final, dataset.get(heldout), steps=steps, seeds=eval_seeds,
                      teacher_steps=teacher_steps, cfg_scale=float(cfg_scale), batch_size=eval_batch_size,
                      noise_seed=seed)
    table = format_table(report)
    write_json(out / EVAL_FILE, {"report": report.to_dict(), "table": table, "run": settings,
                                  "train": {"step": result.step, "metrics": result.metrics},
                                  "student": str(out / trainer.FINAL_DIR)})
    say(table)
    say(f"student: {out / trainer.FINAL_DIR} (wam_fast.load_pretrained); report: {out / EVAL_FILE}")
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
    say(f"conditions: {source}")
    say(table)
    if json_path is not None:
        write_json(json_path, {"report": report.to_dict(), "table": table, "teacher": str(teacher),
                                "student": str(student), "conditions": source})
    return report
