"""``wam_fast.distill.evaluate`` and the ``python -m wam_fast.distill`` CLI (issue #6, parts 5-6).

The slow test of this file is ``test_quality_slow_demo_distillation_beats_teacher_in_one_step``: a small
demo run (teacher trained to a loss plateau, shortcut and consistency distillation, temporal student,
about 1.5 CPU-minutes). Everything else runs on tiny random models in seconds.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import wam_fast
from wam_fast.distill.cli import main
from wam_fast.distill.data import LatentDataset, write_dataset
from wam_fast.distill.demo import demo_config, run_demo
from wam_fast.distill.synthetic import make_synthetic_dataset, synthetic_task
from wam_fast.distill.evaluate import evaluate, format_table
from wam_fast.distill.objectives import make_student
from wam_fast.schedules import schedule_for
from devices import cpu_only_env

ROOT = Path(__file__).resolve().parents[1]

# The quality test's factors. Measured 1-step ratios (student / teacher-1 action error) with seeds 0, 1, 2:
# shortcut 0.39, 0.30, 0.41; consistency 0.34, 0.26, 0.43: the factors leave a margin of about 1.5x.
SHORTCUT_FACTOR = 0.6
CONSISTENCY_FACTOR = 0.75


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: one intra-op thread is as fast, and much faster on a shared, loaded machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _teacher(seed: int = 0, **overrides) -> wam_fast.WAMTransformer:
    torch.manual_seed(seed)
    config = demo_config()
    if overrides:
        config = dataclasses.replace(config, **overrides)
    return wam_fast.WAMTransformer(config).eval()


def _conditions(config, n: int, seed: int = 0, targets: bool = True):
    g = torch.Generator().manual_seed(seed)
    frame = (config.latent_channels, config.latent_height, config.latent_width)
    out = {"text": torch.randn((n, config.text_len, config.text_dim), generator=g),
           "image": torch.randn((n, 1) + frame, generator=g)}
    if targets:
        out["future"] = torch.randn((n, config.latent_frames - 1) + frame, generator=g)
        out["actions"] = torch.randn((n, config.action_len, config.action_dim), generator=g)
    return out


def _randomise_step_embed(student, seed: int = 1):
    # a "trained-looking" shortcut student: its step embedding no longer starts at zero
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.step_embed.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return student


# ---- evaluate() -----------------------------------------------------------------------------------
def test_evaluate_student_equal_to_teacher_matches_teacher_k():
    """A "student" that is the teacher: (a) == (b) at every k, and at k = the reference's steps it
    IS the reference (error 0, spread ratio 1)."""
    teacher = _teacher()
    conditions = _conditions(teacher.config, 5)
    report = evaluate(teacher, copy.deepcopy(teacher), conditions, steps=(1, 2, 10), seeds=3, teacher_steps=10,
                      cfg_scale=2.0, batch_size=4)
    for r in report.results:
        assert r.student_action_error == pytest.approx(r.teacher_action_error, rel=1e-6, abs=1e-7)
        assert r.student_video_error == pytest.approx(r.teacher_video_error, rel=1e-6, abs=1e-7)
        assert r.student_spread == pytest.approx(r.teacher_spread, rel=1e-6)
        assert r.student_action_data_error == pytest.approx(r.teacher_action_data_error, rel=1e-6)
    last = report.result(10)
    assert last.student_action_error == pytest.approx(0.0, abs=1e-6)
    assert last.spread_ratio == pytest.approx(1.0, rel=1e-6)
    assert report.result(1).teacher_action_error > report.result(2).teacher_action_error > 0
    assert report.reference_steps == 10 and report.cfg_scale == 2.0 and report.reference_nfe == 20
    table = format_table(report)
    assert "teacher-k" in table and len(table.splitlines()) == 4 + 3 + 1


class ConstantActions(nn.Module):
    """A collapsed "student": whatever the noise, its sampled actions are ``level`` (it predicts the v
    that makes the clean prediction x0 = level at every step); video from the wrapped model."""

    def __init__(self, model, level: float = 0.5):
        super().__init__()
        self.model, self.config, self.level = model, model.config, level
        self.schedule = schedule_for(model.config)

    def forward(self, video, text, actions, timestep, image=None, history=None, robot_id=None, **kw):
        video_out, _ = self.model(video, text, actions, timestep, image=image, history=history, robot_id=robot_id)
        alpha, sigma = self.schedule.alpha_sigma(timestep)
        alpha, sigma = alpha.view(-1, 1, 1), sigma.view(-1, 1, 1)
        return video_out, (alpha * actions - self.level) / sigma  # x0 = alpha x - sigma v = level


def test_evaluate_collapsed_student_has_spread_ratio_zero():
    teacher = _teacher()
    report = evaluate(teacher, ConstantActions(copy.deepcopy(teacher)), _conditions(teacher.config, 4), steps=(1, 2),
                      seeds=3, cfg_scale=2.0)
    for r in report.results:
        assert r.student_spread == pytest.approx(0.0, abs=1e-5)
        assert r.spread_ratio == pytest.approx(0.0, abs=1e-5)
    assert report.reference_spread > 0.1


def test_evaluate_temporal_student_gets_future_frames_of_the_same_noise(monkeypatch):
    """A full teacher denoises all latent frames; the temporal student gets frames 1.. of the same
    draw and the same action noise, and video is compared on frames 1.. only."""
    import wam_fast.sampling as sampling

    teacher = _teacher()
    student = _randomise_step_embed(make_student(teacher, "shortcut", steps=(1, 2), mask="temporal", cfg_scale=2.0))
    calls = []
    real_sample = sampling.sample

    def spy(model, text, image=None, **kwargs):
        chunk = real_sample(model, text, image, **kwargs)
        calls.append((model.config.mask, kwargs["steps"], kwargs["noise"], chunk))
        return chunk

    monkeypatch.setattr(sampling, "sample", spy)
    report = evaluate(teacher, student, _conditions(teacher.config, 3), seeds=2, batch_size=64)
    reference = [c for c in calls if c[0] == "full" and c[1] == 10]
    students = [c for c in calls if c[0] == "temporal"]
    assert len(reference) == 1 and [c[1] for c in students] == [1, 2]
    ref_video_noise, ref_action_noise = reference[0][2]
    ref_chunk = reference[0][3]
    assert ref_video_noise.shape[1] == teacher.config.latent_frames
    for _, k, (video_noise, action_noise), chunk in students:
        assert video_noise.shape[1] == teacher.config.latent_frames - 1
        assert torch.equal(video_noise, ref_video_noise[:, 1:])
        assert torch.equal(action_noise, ref_action_noise)
        # the student's video (future frames) against the reference's frames 1..
        rmse = (chunk.video - ref_chunk.video[:, 1:]).flatten(1).pow(2).mean(1).sqrt().mean().item()
        assert report.result(k).student_video_error == pytest.approx(rmse, rel=1e-5)
    assert report.student_mask == "temporal" and report.teacher_mask == "full"
    # the spread: std across the seeds of one condition (rows are condition-major), averaged
    spread = ref_chunk.actions.reshape(3, 2, -1).std(dim=1).mean().item()
    assert report.reference_spread == pytest.approx(spread, rel=1e-5)


@pytest.mark.parametrize("method", ["shortcut", "consistency"])
def test_evaluate_does_not_depend_on_batch_size(method):
    teacher = _teacher()
    student = make_student(teacher, method, steps=(1, 2), mask="temporal", cfg_scale=2.0)
    if method == "shortcut":
        _randomise_step_embed(student)
    conditions = _conditions(teacher.config, 5)
    big = evaluate(teacher, student, conditions, seeds=2, batch_size=64, teacher_steps=4).to_dict()
    small = evaluate(teacher, student, conditions, seeds=2, batch_size=3, teacher_steps=4).to_dict()
    assert big.keys() == small.keys()
    for a, b in zip(big["results"], small["results"]):
        for key, value in a.items():
            assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # another noise seed gives other numbers (the noise really is the rows')
    other = evaluate(teacher, student, conditions, seeds=2, teacher_steps=4, noise_seed=1).to_dict()
    assert other["results"][0]["student_action_error"] != big["results"][0]["student_action_error"]


def test_evaluate_bad_inputs():
    teacher = _teacher()
    conditions = _conditions(teacher.config, 2)
    with pytest.raises(ValueError, match="do not match"):
        evaluate(teacher, _teacher(num_layers=3), conditions, steps=(1,))
    with pytest.raises(ValueError, match="not distilled.*pass steps="):
        evaluate(teacher, copy.deepcopy(teacher), conditions)
    with pytest.raises(ValueError, match="strictly increasing"):
        evaluate(teacher, copy.deepcopy(teacher), conditions, steps=(2, 1))
    with pytest.raises(ValueError, match="actions: expected per-row shape"):
        evaluate(teacher, copy.deepcopy(teacher), dict(conditions, actions=torch.zeros(2, 3, 3)), steps=(1,))
    with pytest.raises(ValueError, match="needs 'image'|need 'image'"):
        evaluate(teacher, copy.deepcopy(teacher), {"text": conditions["text"]}, steps=(1,))


# ---- the quality test of the issue (slow) ---------------------------------------------------------
@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    options = dict(teacher_steps=500, distill_steps=200, num_samples=1024, teacher_lr=3e-3, eval_conditions=32,
                   progress=False)
    shortcut = run_demo(out, method="shortcut", **options)
    consistency = run_demo(out, method="consistency", **options)  # the same teacher, reused
    return out, shortcut, consistency


def test_quality_slow_demo_distillation_beats_teacher_in_one_step(demo_runs):
    """THE quality test: a temporal student distilled from a full teacher (trained to a loss plateau)
    samples in 1 step much closer to the teacher's 10-step reference than the teacher does in 1 step."""
    out, shortcut, consistency = demo_runs
    print()
    print(format_table(shortcut))
    print(format_table(consistency))
    # the teacher reached a plateau: its loss over the last quarter of training is no longer falling
    losses = [json.loads(line)["loss"] for line in (out / "teacher" / "metrics.jsonl").read_text().splitlines()]
    quarter = len(losses) // 4
    last, before = sum(losses[-quarter:]) / quarter, sum(losses[-2 * quarter:-quarter]) / quarter
    print(f"teacher loss: first {losses[0]:.3f}, quarter before last {before:.3f}, last quarter {last:.3f}")
    assert last > 0.9 * before, "the teacher was still improving: train it longer"
    # few-step sampling of the undistilled teacher is clearly worse than many steps (the task is multimodal)
    one, four = shortcut.result(1), shortcut.result(4)
    assert one.teacher_action_error > 3 * four.teacher_action_error
    assert one.teacher_spread < 0.5 * shortcut.reference_spread  # the 1-step teacher averages modes
    for name, report, factor in (("shortcut", shortcut, SHORTCUT_FACTOR), ("consistency", consistency,
                                                                             CONSISTENCY_FACTOR)):
        r = report.result(1)
        print(f"{name}: 1-step action error {r.student_action_error:.4f} vs teacher 1-step "
              f"{r.teacher_action_error:.4f} (ratio {r.action_error_ratio:.3f}, required <= {factor}); "
              f"spread ratio {r.spread_ratio:.3f}")
        assert r.student_action_error <= factor * r.teacher_action_error
        assert r.student_video_error < r.teacher_video_error
        assert r.spread_ratio > 0.6  # it kept the teacher's modes (no collapse)
    # shortcut: one checkpoint serves 2 steps as well, better than the teacher in 2
    assert shortcut.result(2).student_action_error < shortcut.result(2).teacher_action_error
    eval_json = json.loads((out / "student-shortcut" / "eval.json").read_text())
    assert eval_json["report"]["results"][0]["steps"] == 1
    # in the task's own terms: the share of action chunks that land in one of the allowed modes
    # (measured: teacher 1 step 0, 10 steps 0.92-0.94; students in 1 step 0.55-0.77, seeds 1-2)
    task = synthetic_task(demo_config(), 0)
    rows = LatentDataset(out / "data").get(torch.arange(128))

    def in_mode(model, **options):
        chunk = wam_fast.sample(model, rows["text"], rows["image"], **options)
        return (task.classify(rows["text"], rows["image"], chunk.actions)[3] < task.IN_MODE).float().mean().item()

    teacher = wam_fast.load_pretrained(out / "teacher" / "final")
    shares = {"teacher-1": in_mode(teacher, steps=1, cfg_scale=2.0), "teacher-10": in_mode(teacher, cfg_scale=2.0)}
    for method in ("shortcut", "consistency"):
        shares[method + "-1"] = in_mode(wam_fast.load_pretrained(out / f"student-{method}" / "final"), steps=1)
    print("in-mode shares:", {k: round(v, 3) for k, v in shares.items()})
    assert shares["teacher-10"] >= 0.8 and shares["teacher-1"] <= 0.1
    assert shares["shortcut-1"] >= 0.35 and shares["consistency-1"] >= 0.35


# ---- the CLI --------------------------------------------------------------------------------------
def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny random teacher, a shortcut student of it, a student of another backbone, and datasets."""
    root = tmp_path_factory.mktemp("ckpt")
    teacher = _teacher()
    teacher.save_pretrained(root / "teacher")
    _randomise_step_embed(make_student(teacher, "shortcut", mask="temporal", cfg_scale=2.0)).save_pretrained(
        root / "student")
    other = _teacher(num_layers=3)
    make_student(other, "shortcut", mask="temporal").save_pretrained(root / "other-student")
    make_synthetic_dataset(root / "data", teacher.config, 48, seed=0)
    conds = _conditions(teacher.config, 24, targets=False)
    write_dataset(root / "conditions", conds)
    make_synthetic_dataset(root / "wrong-data", dataclasses.replace(teacher.config, action_dim=3), 16, seed=0)
    (root / "empty").mkdir()
    return root


def test_help_documents_every_command():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "wam_fast.distill", "--help"], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in ("--teacher", "--data", "--method", "--steps", "--out", "--mask", "--history", "--future-frames",
                 "--cfg-scale",
                 "--rollout", "--train-steps", "--batch-size", "--micro-batch-size", "--lr", "--ema-decay",
                 "--checkpoint-every", "--precision", "--parallel", "--seed", "eval --teacher CKPT --student CKPT",
                 "demo", "eval.json"):
        assert flag in result.stdout, flag


def test_eval_help(capsys):
    code, out, _ = _run(["eval", "--help"], capsys)
    assert code == 0
    for flag in ("--teacher", "--student", "--data", "--seeds", "--json", "--steps", "--conditions"):
        assert flag in out, flag


def test_eval_subcommand(checkpoints, capsys, tmp_path):
    root = checkpoints
    code, out, err = _run(["eval", "--teacher", str(root / "teacher"), "--student", str(root / "student"),
                           "--data", str(root / "data"), "--conditions", "4", "--seeds", "2",
                           "--json", str(tmp_path / "report.json")], capsys)
    assert code == 0, err
    assert "teacher reference" in out and "data act" in out
    report = json.loads((tmp_path / "report.json").read_text())["report"]
    assert [r["steps"] for r in report["results"]] == [1, 2, 4]
    assert report["num_conditions"] == 4 and report["seeds"] == 2 and report["cfg_scale"] == 2.0
    # without data: random conditions, no error vs data
    code, out, err = _run(["eval", "--teacher", str(root / "teacher"), "--student", str(root / "student"),
                           "--conditions", "2", "--seeds", "2", "--steps", "1"], capsys)
    assert code == 0, err
    assert "random" in out and "data act" not in out


def _one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_bad_inputs_exit_2_with_one_line_and_keep_out(checkpoints, capsys, tmp_path):
    root = checkpoints
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("written before")
    before = _tree(out)
    good = ["--teacher", str(root / "teacher"), "--data", str(root / "data"), "--out", str(out), "--no-progress",
            "--train-steps", "2", "--batch-size", "4"]

    def bad(argv, *needles):
        code, _, err = _run(argv, capsys)
        _one_line_error(code, err, *needles)
        assert _tree(out) == before

    def replace(flag, value):
        argv = list(good)
        argv[argv.index(flag) + 1] = value
        return argv

    bad(replace("--teacher", str(root / "missing")), "--teacher", "not found")
    bad(replace("--teacher", str(root / "empty")), "--teacher", "model.safetensors")
    bad(replace("--teacher", str(root / "student")), "--teacher", "student")
    bad(replace("--data", str(root / "missing")), "--data", "not found")
    bad(replace("--data", str(root / "empty")), "--data", "dataset.json")
    bad(replace("--data", str(root / "wrong-data")), "does not fit", "actions")
    bad(replace("--data", str(root / "conditions")), "--rollout")
    bad(good + ["--steps", "3,1"], "--steps", "increasing")
    bad(good + ["--steps", "1,x"], "--steps")
    bad(good + ["--method", "progressive"], "--method", "invalid choice")
    bad(good + ["--mask", "full", "--history", "1"], "--history")
    bad(good + ["--eval-conditions", "48"], "--eval-conditions")
    bad(good + ["--batch-size", "6", "--micro-batch-size", "4"], "batch_size")
    bad(good + ["--solver-steps", "5"], "--solver-steps")
    bad(["--teacher", str(root / "teacher"), "--out", str(out)], "--teacher and --data")
    bad(["--out", str(out), "--precision", "fp32"], "--precision")  # demo does not take it
    # eval: a student of another backbone
    bad(["eval", "--teacher", str(root / "teacher"), "--student", str(root / "other-student")],
        "does not fit", "num_layers")
    bad(["eval", "--teacher", str(root / "teacher"), "--student", str(root / "missing")], "--student")


def test_distill_command_runs_resumes_and_refuses_other_settings(checkpoints, capsys, tmp_path):
    root = checkpoints
    out = tmp_path / "run"
    argv = ["--teacher", str(root / "teacher"), "--data", str(root / "data"), "--out", str(out), "--steps", "1,2",
            "--train-steps", "3", "--batch-size", "4", "--lr", "1e-3", "--eval-conditions", "4", "--eval-seeds", "2",
            "--teacher-steps", "4", "--checkpoint-every", "2", "--no-progress"]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    assert stdout.count("teacher reference: action spread") == 1
    for name in ("run.json", "eval.json", "metrics.jsonl", "final/model.safetensors", "final-online/config.json"):
        assert (out / name).is_file(), name
    student = wam_fast.load_pretrained(out / "final")
    assert student.config.distillation == "shortcut" and student.config.distilled_steps == (1, 2)
    assert student.config.mask == "temporal" and student.config.distilled_cfg_scale == 6.0  # teacher default
    first = json.loads((out / "eval.json").read_text())
    assert first["train"]["step"] == 3
    # the same command again: nothing left to train, same weights, same report
    weights = load_file(out / "final" / "model.safetensors")
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    again = load_file(out / "final" / "model.safetensors")
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)
    assert json.loads((out / "eval.json").read_text())["report"] == first["report"]
    # more steps: resumes from the checkpoint
    code, _, err = _run(argv[:argv.index("--train-steps") + 1] + ["5"] + argv[argv.index("--train-steps") + 2:], capsys)
    assert code == 0, err
    assert json.loads((out / "eval.json").read_text())["train"]["step"] == 5
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()][-1] == 5
    # other settings on the same OUT: refused, nothing changed
    before = _tree(out)
    code, _, err = _run(argv + ["--method", "consistency"], capsys)
    _one_line_error(code, err, "other settings", "method")
    code, _, err = _run(argv + ["--cfg-scale", "3"], capsys)
    _one_line_error(code, err, "cfg_scale")
    assert _tree(out) == before


def test_rollout_makes_targets_once(checkpoints, capsys, tmp_path):
    root = checkpoints
    out = tmp_path / "rollout-run"
    argv = ["--teacher", str(root / "teacher"), "--data", str(root / "conditions"), "--rollout", "--out", str(out),
            "--method", "consistency", "--steps", "1,2", "--train-steps", "2", "--batch-size", "4",
            "--eval-conditions", "3", "--eval-seeds", "2", "--teacher-steps", "2", "--cfg-scale", "1.5",
            "--no-progress"]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    rolled = LatentDataset(out / "rollout")
    assert len(rolled) == 24 and rolled.has_targets
    assert rolled.metadata["teacher_rollout"]["cfg_scale"] == 1.5
    stamp = (out / "rollout" / "dataset.json").stat().st_mtime_ns
    assert "data act" not in stdout  # conditions only: no error vs data
    code, _, err = _run(argv + ["--train-steps", "3"], capsys)
    assert code == 0, err
    assert (out / "rollout" / "dataset.json").stat().st_mtime_ns == stamp  # reused, not redone


def test_demo_command_small(capsys, tmp_path):
    """``python -m wam_fast.distill`` with no --teacher / --data: the demo (here with tiny step counts)."""
    code, stdout, err = _run(["--out", str(tmp_path / "demo"), "--teacher-train-steps", "6", "--train-steps", "3",
                              "--batch-size", "8", "--eval-conditions", "4", "--eval-seeds", "2", "--steps", "1,2",
                              "--no-progress"], capsys)
    assert code == 0, err
    assert "demo: done" in stdout and "teacher reference" in stdout
    for name in ("run.json", "data/dataset.json", "teacher/final/model.safetensors", "student-shortcut/eval.json"):
        assert (tmp_path / "demo" / name).is_file(), name


def test_torchrun_two_ranks_rank0_evaluates(checkpoints, tmp_path):
    """Under torchrun both ranks train (DDP on gloo); only rank 0 evaluates and prints; --rollout is
    made once by rank 0 while rank 1 waits. The ranks see no GPU (on a 1-GPU machine rank 1 would ask
    for cuda:1), so this runs on the CPU on any machine."""
    root = checkpoints
    out = tmp_path / "ddp"
    env = cpu_only_env(dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "wam_fast.distill", "--teacher", str(root / "teacher"), "--data", str(root / "conditions"), "--rollout",
         "--out", str(out), "--steps", "1", "--train-steps", "2", "--batch-size", "4", "--eval-conditions", "2",
         "--eval-seeds", "2", "--teacher-steps", "2", "--no-progress"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("teacher reference: action spread") == 1
    assert json.loads((out / "eval.json").read_text())["train"]["step"] == 2
    state = json.loads(sorted((out / "checkpoints").glob("step-*"))[-1].joinpath("state.json").read_text())
    assert state["world_size"] == 2
