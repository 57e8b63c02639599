"""The rows of ``python -m wam_fast.bench``: the workload dtypes and defaults, ``Variant`` (one row: which
model, how it samples, which levers), the rows of a run in the order they run, and the ``--rows`` filter."""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import List, Optional

import torch

from wam_fast import configs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Above this many parameters a CPU run needs --allow-cpu-large (W1: 5.57 B = 22 GB in fp32).
CPU_PARAM_LIMIT = 1_000_000_000
# Rows every other row's speedup is computed against. paper-baseline-compiled is the paper's teacher
# and sampler through wam_fast.compile: paper-baseline / it is the systems gain alone, it / a student
# row the algorithmic gain (steps, KV cache, FP8 linears) on top of the same compiler.
BASELINES = ("released-baseline", "paper-baseline", "paper-baseline-compiled")
DEFAULT_STEPS = (4, 2, 1)


@dataclass
class Variant:
    """One row: which model (the teacher or its shortcut student), how it samples, which levers.
    ``future_frames`` (students): the future frames the student denoises; 0 = action-only (None: all)."""

    name: str
    sampler: str
    steps: int
    cfg_scale: float
    cfg_schedule: str = "constant"
    student: bool = False  # False: the teacher; True: its shortcut student (always compiled)
    compiled: bool = False  # False: wam_fast.sample, eager; True: WAMPolicy.act after wam_fast.compile
    fp8: bool = False
    cache: bool = False
    future_frames: Optional[int] = None


def student_row_name(steps: int, fp8: bool, cache: bool, dtype: str, action_only: bool = False) -> str:
    kind = "action-only-" if action_only else ""
    return f"wam_fast-{kind}{steps}step-{'fp8' if fp8 else dtype}-{'cache' if cache else 'nocache'}"


def variants(args) -> List[Variant]:
    """Every row of a run (``args.workload``, ``args.steps``, ``args.dtype``), in the order it runs."""
    return variants_for(args.workload, args.dtype, args.steps)


def variants_for(workload: str, dtype: str, steps=DEFAULT_STEPS) -> List[Variant]:
    """Every row, in the order it runs: baselines, then bf16 (or the run's dtype) students, then FP8;
    after each precision's students, its action-only students (``future_frames=0``, cached only: the
    fastest chunk, the robot's path)."""
    first_order = "ddim" if configs.get(workload).objective == "v_prediction" else "euler"
    rows = [Variant("released-baseline", "dpm++2m-sde", 50, 6.0, "dynamic"),
            Variant("paper-baseline", "ddim", 10, 6.0),
            Variant("paper-baseline-compiled", "ddim", 10, 6.0, compiled=True)]
    if first_order != "ddim":  # a flow-matching teacher: the samplers that fit it
        rows = [dataclasses.replace(v, sampler=first_order) for v in rows]
    for fp8 in (False, True):  # FP8 last: quantize_fp8 swaps the student's linears in place
        for s in steps:
            for cache in (True, False):
                rows.append(Variant(student_row_name(s, fp8, cache, dtype), first_order, s, 1.0,
                                    student=True, compiled=True, fp8=fp8, cache=cache))
        for s in steps:
            rows.append(Variant(student_row_name(s, fp8, True, dtype, action_only=True), first_order, s, 1.0,
                                student=True, compiled=True, fp8=fp8, cache=True, future_frames=0))
    return rows


def select(rows: List[Variant], patterns: Optional[List[str]]) -> List[Variant]:
    """The rows whose name matches any of the glob ``patterns`` (all rows when None)."""
    if not patterns:
        return rows
    return [v for v in rows if any(fnmatch.fnmatchcase(v.name, p) for p in patterns)]
