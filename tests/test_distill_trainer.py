"""The distillation trainer (wam_fast.distill.trainer): exact resume after SIGKILL, DDP / FSDP2 on 2
CPU ranks vs 1 rank, gradient accumulation, EMA, clipping, bf16 autocast, checkpoints, metrics log.

The tiny WAMTransformer runs, the toy objectives and the worker script live in tests/distill_worker.py.
Runs that are compared bit for bit use one thread, as the worker processes do, and every run is on the
CPU (device="cpu", also in the worker), whatever the machine.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import distill_worker as worker
from wam_fast.distill import train_state as ts
from wam_fast.distill.trainer import BatchPlan, TrainConfig, TrainResult, train

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distill_worker.py")


# ---- helpers -----------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _single_thread():
    # tiny models gain nothing from threads, and idle OpenMP workers spin on a loaded 2-core machine;
    # runs compared bit for bit with the worker processes (OMP_NUM_THREADS=1) must use one thread too
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _worker_run(out, *argv, parallel="auto"):
    """Train the worker's tiny WAM in this process (with the file's one thread, as the worker)."""
    model, objective, dataset, config = worker.build(worker.parser().parse_args(["--out", str(out), *argv]), parallel)
    return train(model, objective, dataset, config, out)


def _ckpt(out, step):
    return Path(out) / ts.CHECKPOINTS_DIR / ts.step_dir_name(step)


def _assert_files_equal(a: Path, b: Path):
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys(), f"{a} and {b} hold different tensors"
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), f"{key} differs: {a} vs {b}"


def _assert_files_close(a: Path, b: Path, rtol=1e-5, atol=1e-6):
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=rtol, atol=atol, msg=lambda m: f"{key} ({a} vs {b}): {m}")


def _snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _mlp_run(out, model=None, objective=None, dataset=None, **overrides) -> TrainResult:
    settings = dict(steps=4, batch_size=8, lr=1e-2, grad_clip=0.0, ema_decay=0.5, precision="fp32", log_every=1,
                    checkpoint_every=2, progress=False, tensorboard=False, device="cpu")
    settings.update(overrides)
    return train(model if model is not None else worker.MLP(), objective or worker.Regression(),
                 dataset if dataset is not None else worker.regression_dataset(), TrainConfig(**settings), out)


# ---- resume ------------------------------------------------------------------------------------
def test_resume_after_sigkill_is_exact(tmp_path):
    """Kill a run with SIGKILL past a checkpoint, run again: the same final weights, EMA and optimizer
    state (bit for bit) as an uninterrupted run, and each step once in metrics.jsonl."""
    args = ["--steps", "16", "--checkpoint-every", "4", "--teacher"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(WORKER), "--out", str(killed), "--slow", "0.2", *args],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:  # wait for a checkpoint of step >= 4 and a logged step past it
            found = ts.list_checkpoints(killed)
            logged = [row["step"] for row in ts.read_metrics(killed / ts.METRICS_NAME)]
            if found and found[-1][0] >= 4 and logged and logged[-1] > found[-1][0]:
                break
            if proc.poll() is not None:
                pytest.fail(f"the worker ended before it was killed: {proc.stdout.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the worker wrote no checkpoint in 120 s")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    checkpoint_step = ts.list_checkpoints(killed)[-1][0]
    logged = [row["step"] for row in ts.read_metrics(killed / ts.METRICS_NAME)]
    assert checkpoint_step < 16 and not (killed / "final").exists(), "the run was not killed mid-way"
    assert logged[-1] > checkpoint_step  # lines past the checkpoint exist: the resume must drop them

    resumed = _worker_run(killed, *args)
    reference = _worker_run(tmp_path / "reference", *args)
    assert resumed.resumed_from == checkpoint_step and reference.resumed_from is None
    assert resumed.step == reference.step == 16
    for name in ("final/model.safetensors", "final-online/model.safetensors"):
        _assert_files_equal(killed / name, tmp_path / "reference" / name)
    for name in (ts.MODEL_FILE, ts.EMA_FILE, ts.OPTIMIZER_FILE):
        _assert_files_equal(_ckpt(killed, 16) / name, _ckpt(tmp_path / "reference", 16) / name)
    rows = ts.read_metrics(killed / ts.METRICS_NAME)
    reference_rows = ts.read_metrics(tmp_path / "reference" / ts.METRICS_NAME)
    assert [row["step"] for row in rows] == list(range(1, 17))
    for row, ref in zip(rows, reference_rows):  # the same numbers, not only the same step list
        assert {k: row[k] for k in ("loss", "lr", "grad_norm", "distill", "ema_out")} == \
               {k: ref[k] for k in ("loss", "lr", "grad_norm", "distill", "ema_out")}
    assert rows[-1]["elapsed"] > rows[checkpoint_step - 1]["elapsed"]  # elapsed carries over
    # final/ is the EMA in save_pretrained form
    import wam_fast

    ema = wam_fast.load_pretrained(killed / "final")
    saved = load_file(str(_ckpt(killed, 16) / ts.EMA_FILE))
    assert all(torch.equal(tensor, saved[name]) for name, tensor in ema.state_dict().items())


def test_ddp_and_fsdp_match_one_rank(tmp_path):
    """2 CPU ranks (gloo, torchrun) with DDP and with FSDP2, each 2 micro-batches of 2 rows per rank,
    vs 1 rank with one micro-batch of 8 rows: the same per-step losses and weights within 1e-5
    relative (fp32); then the FSDP run's checkpoint resumes on 1 rank."""
    common = ["--steps", "6", "--checkpoint-every", "6", "--teacher", "--schedule", "constant"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), "--out", str(tmp_path / "two"), "--parallel", "ddp,fsdp", "--micro", "2", *common]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    reference = tmp_path / "one"
    _worker_run(reference, "--steps", "8", "--checkpoint-every", "6", "--teacher", "--schedule", "constant")
    ref_rows = {row["step"]: row for row in ts.read_metrics(reference / ts.METRICS_NAME)}
    keys = ("loss", "video_loss", "action_loss", "distill", "ema_out", "grad_norm", "lr")
    for mode in ("ddp", "fsdp"):
        out = tmp_path / "two" / mode
        state = ts.read_state(_ckpt(out, 6))
        assert state["world_size"] == 2 and state["parallel"] == mode and state["micro_batch"] == 2
        rows = ts.read_metrics(out / ts.METRICS_NAME)
        assert [row["step"] for row in rows] == list(range(1, 7))
        for row in rows:
            for key in keys:
                assert math.isclose(row[key], ref_rows[row["step"]][key], rel_tol=1e-5, abs_tol=1e-7), \
                    f"{mode} step {row['step']} {key}: {row[key]} vs 1 rank {ref_rows[row['step']][key]}"
        for name in (ts.MODEL_FILE, ts.EMA_FILE, ts.OPTIMIZER_FILE):
            _assert_files_close(_ckpt(out, 6) / name, _ckpt(reference, 6) / name)

    # a checkpoint written by 2 FSDP ranks resumes on 1 rank (steps may grow, micro-batch and parallel change)
    resumed = _worker_run(tmp_path / "two" / "fsdp", "--steps", "8", "--teacher", "--schedule", "constant")
    assert resumed.resumed_from == 6 and resumed.world_size == 1
    for name in ("final/model.safetensors", "final-online/model.safetensors"):
        _assert_files_close(tmp_path / "two" / "fsdp" / name, reference / name)


def test_resume_config_mismatch_is_an_error_that_changes_nothing(tmp_path):
    _mlp_run(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"lr: checkpoint 0\.01, now 0\.02.*Nothing was changed"):
        _mlp_run(tmp_path, steps=6, lr=2e-2)
    with pytest.raises(ValueError, match="steps: the checkpoint is at step 4, beyond steps=3"):
        _mlp_run(tmp_path, steps=3)
    with pytest.raises(ValueError, match="dataset: the checkpoint was trained on 32 samples, this dataset has 16"):
        _mlp_run(tmp_path, steps=6, dataset=worker.regression_dataset(16))
    with pytest.raises(ValueError, match=r"weights: the checkpoint's do not fit the model \(missing \[\], "
                                         r"unexpected \[\], other shapes \['net.0.bias'"):
        _mlp_run(tmp_path, steps=6, model=worker.MLP(width=8))
    with pytest.raises(ValueError, match="resume=False"):
        train(worker.MLP(), worker.Regression(), worker.regression_dataset(),
              TrainConfig(steps=6, batch_size=8, progress=False, tensorboard=False, device="cpu"), tmp_path,
              resume=False)
    assert _snapshot(tmp_path) == before
    # fields that say how to run, not what to compute, may change; steps may grow
    result = _mlp_run(tmp_path, steps=6, log_every=2, micro_batch=4, keep_checkpoints=1)
    assert result.resumed_from == 4 and result.step == 6
    assert [row["step"] for row in ts.read_metrics(result.metrics_path)] == [1, 2, 3, 4, 6]
    assert [step for step, _ in ts.list_checkpoints(tmp_path)] == [6]


def test_model_config_mismatch_on_resume(tmp_path):
    model, objective, dataset, config = worker.build(worker.parser().parse_args(["--out", "x", "--steps", "1"]))
    train(model, objective, dataset, config, tmp_path)
    before = _snapshot(tmp_path)
    other = worker.tiny_wam(ffn_mult=2)
    with pytest.raises(ValueError, match=r"model config: differs in \['ffn_mult'\]"):
        train(other, worker.ToyDiffusion(other.config), dataset, TrainConfig(**{**config.to_dict(), "steps": 2}),
              tmp_path)
    assert _snapshot(tmp_path) == before


def test_torn_checkpoint_is_ignored_and_removed(tmp_path):
    reference = _mlp_run(tmp_path / "reference", steps=6)
    run = tmp_path / "run"
    _mlp_run(run, steps=4)
    torn = run / ts.CHECKPOINTS_DIR / ".step-00000006.k2j4.tmp"  # a crash while writing step 6
    torn.mkdir()
    (torn / ts.MODEL_FILE).write_bytes(b"\0" * 10)
    assert ts.latest_checkpoint(run).name == "step-00000004" and ts.torn_checkpoints(run) == [torn]
    result = _mlp_run(run, steps=6)
    assert result.resumed_from == 4 and not torn.exists()
    _assert_files_equal(run / "final" / "model.safetensors", reference.final / "model.safetensors")


def test_damaged_newest_checkpoint_falls_back_to_an_intact_one(tmp_path, caplog):
    """A flipped bit in the newest checkpoint: resume says so, uses the older intact one and ends exactly
    where an uninterrupted run does; with every checkpoint damaged it refuses instead of starting over."""
    reference = _mlp_run(tmp_path / "reference", steps=6)
    run = tmp_path / "run"
    _mlp_run(run, steps=4, keep_checkpoints=3)
    model_file = _ckpt(run, 4) / ts.MODEL_FILE
    data = bytearray(model_file.read_bytes())
    data[-1] ^= 0x01
    model_file.write_bytes(bytes(data))
    assert "does not match its sha256" in ts.checkpoint_damage(_ckpt(run, 4))
    with caplog.at_level("WARNING"):
        result = _mlp_run(run, steps=6, keep_checkpoints=3)
    assert result.resumed_from == 2
    assert any("not resuming from" in r.getMessage() and "step-00000004" in r.getMessage() for r in caplog.records)
    _assert_files_equal(run / "final" / "model.safetensors", reference.final / "model.safetensors")
    for step in (2, 4, 6):
        state = _ckpt(run, step) / ts.STATE_NAME
        state.write_text(state.read_text()[:20])  # torn JSON everywhere
    with pytest.raises(ValueError, match="every checkpoint in .* is damaged"):
        _mlp_run(run, steps=8, keep_checkpoints=3)


# ---- the arithmetic of a step ------------------------------------------------------------------
def test_grad_accumulation_matches_one_micro_batch(tmp_path):
    """A global batch of 8 as 1 x 8 and as 4 x 2 micro-batches: the same weights (the loss of each
    micro-batch is scaled by 1/4 before backward, every row is seen)."""
    results, datasets = [], []
    for micro in (None, 2):
        dataset = worker.regression_dataset()
        results.append(_mlp_run(tmp_path / f"micro-{micro}", dataset=dataset, micro_batch=micro, steps=5))
        datasets.append(dataset)
    assert len(datasets[1].calls) == 4 * len(datasets[0].calls) == 20
    assert torch.equal(torch.cat(datasets[0].calls), torch.cat(datasets[1].calls))
    _assert_files_close(results[0].final_online / "model.safetensors", results[1].final_online / "model.safetensors",
                        rtol=1e-6, atol=1e-7)
    for key in ("loss", "grad_norm"):  # grad_norm: AdamW would hide a wrongly scaled gradient
        values = [[row[key] for row in ts.read_metrics(r.metrics_path)] for r in results]
        assert values[0] == pytest.approx(values[1], rel=1e-6), key


class _Linear(nn.Module):
    """One parameter vector w; the objective's loss is w . c, so every gradient is c."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))


class _ConstantGradient:
    c = torch.tensor([0.3, -1.0, 2.0])

    def draw(self, rows, generator):
        return {}

    def loss(self, student, ema, batch, draws):
        return (student.w * self.c).sum(), {}


def test_ema_matches_the_closed_form(tmp_path):
    """With a constant gradient and eps=0 AdamW moves w by exactly lr * sign(c) per step, so after n
    steps ema = d^n w0 + (1 - d) sum_k d^(n-k) w_k; with d=0.75 and n=5 each term matters."""
    lr, d, n = 0.1, 0.75, 5
    model = _Linear()
    w0 = model.w.detach().clone()
    result = _mlp_run(tmp_path, model=model, objective=_ConstantGradient(), steps=n, lr=lr, eps=0.0, ema_decay=d,
                      weight_decay=0.0, grad_clip=0.0)
    sign = torch.sign(_ConstantGradient.c)
    online = [w0 - k * lr * sign for k in range(n + 1)]
    expected = d ** n * w0 + (1 - d) * sum(d ** (n - k) * online[k] for k in range(1, n + 1))
    ema = load_file(str(result.final / "model.safetensors"))["w"]  # not a WAMTransformer: a plain state dict
    torch.testing.assert_close(load_file(str(result.final_online / "model.safetensors"))["w"], online[n])
    torch.testing.assert_close(ema, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(ema, online[n], atol=1e-3)  # the EMA lags the online weights


def _first_step_gradient_norm(objective, dataset, batch_size, seed=0):
    """The global gradient norm of step 0, by hand, from the trainer's BatchPlan."""
    plan = BatchPlan(len(dataset), batch_size, seed)
    model = worker.MLP()
    loss, _ = objective.loss(model, None, dataset.get(plan.indices(0)), objective.draw(batch_size, plan.generator(0)))
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()


def test_gradient_clipping_takes_effect(tmp_path):
    """AdamW's first moment after one step is (1 - beta1) * the clipped gradient, and the logged
    grad_norm is the norm before clipping."""
    objective, dataset = worker.Regression(), worker.regression_dataset()
    norm = _first_step_gradient_norm(objective, dataset, 8)
    for clip, expected in ((0.01, 0.01), (0.0, norm)):
        result = _mlp_run(tmp_path / f"clip-{clip}", objective=objective, dataset=dataset, steps=1, grad_clip=clip)
        opt = load_file(str(_ckpt(tmp_path / f"clip-{clip}", 1) / ts.OPTIMIZER_FILE))
        exp_avg = torch.cat([v.flatten() for k, v in sorted(opt.items()) if k.endswith(".exp_avg")])
        assert exp_avg.norm().item() == pytest.approx(0.1 * expected, rel=1e-5)
        assert result.metrics["grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert norm > 0.1  # so clipping at 0.01 changed the gradient


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_precision_autocast(tmp_path, precision):
    """bf16 runs the model's matmuls in bfloat16 (a forward hook sees bf16 outputs) while parameters and
    the optimizer state stay float32, and it trains (the loss falls)."""
    model = worker.MLP(width=32)
    seen = set()
    model.net[0].register_forward_hook(lambda module, args, out: seen.add(out.dtype))
    result = _mlp_run(tmp_path, model=model, precision=precision, steps=30, lr=2e-2, checkpoint_every=30)
    assert seen == {torch.bfloat16 if precision == "bf16" else torch.float32}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    checkpoint = _ckpt(tmp_path, 30)
    for name in (ts.MODEL_FILE, ts.EMA_FILE, ts.OPTIMIZER_FILE):
        assert {t.dtype for t in load_file(str(checkpoint / name)).values()} == {torch.float32}, name
    losses = [row["loss"] for row in ts.read_metrics(result.metrics_path)]
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5]), losses


# ---- logs and files ----------------------------------------------------------------------------
def test_metrics_jsonl_checkpoints_and_result(tmp_path):
    result = _mlp_run(tmp_path, steps=6, log_every=2, checkpoint_every=2, keep_checkpoints=2, warmup_steps=2,
                      lr_schedule="cosine", min_lr_ratio=0.1, lr=1e-2)
    rows = ts.read_metrics(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in rows] == [2, 4, 6]
    config = TrainConfig.from_dict(ts.read_state(_ckpt(tmp_path, 6))["config"])
    for row in rows:
        assert set(row) == {"step", "loss", "out_mean", "lr", "grad_norm", "samples_per_s", "elapsed"}
        assert row["lr"] == pytest.approx(config.lr_at(row["step"] - 1))
        assert row["samples_per_s"] > 0 and row["loss"] > 0 and row["grad_norm"] > 0
    assert [row["elapsed"] for row in rows] == sorted(row["elapsed"] for row in rows)
    assert config.lr_at(0) == pytest.approx(5e-3) and config.lr_at(1) == pytest.approx(1e-2)
    assert config.lr_at(5) == pytest.approx(1e-3 + 9e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))
    # checkpoints: the last two, "latest" names the newest, no temporary directory left
    assert [step for step, _ in ts.list_checkpoints(tmp_path)] == [4, 6]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000006"
    assert ts.torn_checkpoints(tmp_path) == [] and not list((tmp_path / "checkpoints").glob(".*"))
    state = ts.read_state(_ckpt(tmp_path, 6))
    assert state["step"] == 6 and state["world_size"] == 1 and state["samples_seen"] == 48
    assert state["scheduler"]["lr"] == pytest.approx(config.lr_at(5)) and state["model_config"] is None
    assert result.step == 6 and result.metrics == rows[-1] and result.checkpoint == _ckpt(tmp_path, 6)
    assert (result.final / "model.safetensors").is_file() and (result.final_online / "model.safetensors").is_file()
    # running again at the end trains nothing and changes no weights
    again = _mlp_run(tmp_path, steps=6, log_every=2, checkpoint_every=2, keep_checkpoints=2, warmup_steps=2,
                     lr_schedule="cosine", min_lr_ratio=0.1, lr=1e-2)
    assert again.resumed_from == 6 and again.metrics == rows[-1]
    assert ts.read_metrics(tmp_path / "metrics.jsonl") == rows


def test_tensorboard_absent_is_one_log_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with caplog.at_level("WARNING", logger="wam_fast.distill"):
        result = _mlp_run(tmp_path, steps=2, tensorboard=True)
    hints = [r for r in caplog.records if "pip install tensorboard" in r.getMessage()]
    assert len(hints) == 1 and result.step == 2


def test_tensorboard_present_gets_every_metric(tmp_path, monkeypatch):
    calls = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            calls.append(("init", log_dir, purge_step))

        def add_scalar(self, tag, value, step):
            calls.append((tag, step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    _mlp_run(tmp_path, steps=2, tensorboard=True)
    _mlp_run(tmp_path, steps=3, tensorboard=True)  # resumed from 2: events from step 3 on are purged
    assert calls[0] == ("init", str(tmp_path / "tensorboard"), 1)
    assert ("train/loss", 2) in calls and ("train/grad_norm", 1) in calls and ("train/out_mean", 3) in calls
    assert ("init", str(tmp_path / "tensorboard"), 3) in calls and calls[-1] == ("close",)


def test_progress_bar(tmp_path, capsys):
    _mlp_run(tmp_path, steps=3, progress=True)
    assert "3/3" in capsys.readouterr().err


# ---- config, sampling, bad input ---------------------------------------------------------------
def test_train_config_round_trip_and_validation():
    config = TrainConfig(steps=10, batch_size=16, micro_batch=4, betas=(0.8, 0.95), lr_schedule="cosine",
                         precision="fp32", device="cpu")
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad, match in (({"precision": "fp16"}, "precision"), ({"batch_size": 10, "micro_batch": 4}, "multiple"),
                       ({"steps": 0}, "steps"), ({"ema_decay": 1.5}, "ema_decay"), ({"betas": (0.9,)}, "betas"),
                       ({"lr": 0.0}, "lr"), ({"parallel": "deepspeed"}, "parallel"), ({"steps": 2.0}, "steps")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"steps": 3, "learning_rate": 1})


def test_batch_plan_epochs_and_draws():
    plan = BatchPlan(10, 4, seed=3)
    stream = torch.cat([plan.indices(step) for step in range(5)])  # 20 positions = 2 epochs
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:])  # a new permutation per epoch
    fresh = BatchPlan(10, 4, seed=3)
    assert torch.equal(fresh.indices(3), plan.indices(3))  # no state: any step, any order
    assert torch.equal(torch.randn(3, generator=fresh.generator(7)), torch.randn(3, generator=plan.generator(7)))
    assert not torch.equal(BatchPlan(10, 4, seed=4).indices(0), plan.indices(0))


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="float32"):
        _mlp_run(tmp_path, model=worker.MLP().to(torch.bfloat16))
    with pytest.raises(TypeError, match="draw"):
        _mlp_run(tmp_path, objective=types.SimpleNamespace(loss=lambda *a: None))
    with pytest.raises(ValueError, match="torchrun"):
        _mlp_run(tmp_path, parallel="ddp")

    class VectorLoss(worker.Regression):
        def loss(self, student, ema, batch, draws):
            return student(batch["x"]).sum(-1), {}

    with pytest.raises(TypeError, match="scalar tensor"):
        _mlp_run(tmp_path / "vector", objective=VectorLoss())

    class Clash(worker.Regression):
        def loss(self, student, ema, batch, draws):
            return super().loss(student, ema, batch, draws)[0], {"lr": torch.tensor(1.0)}

    with pytest.raises(ValueError, match="trainer's own"):
        _mlp_run(tmp_path / "clash", objective=Clash())

    class ShortDraws(worker.Regression):
        def draw(self, rows, generator):
            return {"noise": torch.zeros(rows - 1, 4)}

    with pytest.raises(ValueError, match="leading dim 8"):
        _mlp_run(tmp_path / "short", objective=ShortDraws())

    class Diverges(worker.Regression):
        def loss(self, student, ema, batch, draws):
            return super().loss(student, ema, batch, draws)[0] * float("nan"), {}

    with pytest.raises(FloatingPointError, match="diverged at step 1"):
        _mlp_run(tmp_path / "nan", objective=Diverges())


# ---- the real pieces ---------------------------------------------------------------------------
def test_real_diffusion_objective_on_latent_dataset(tmp_path):
    """wam_fast.distill's DiffusionObjective on a LatentDataset (2 micro-batches): trains, writes
    a loadable final/, and a run stopped at step 2 and resumed ends where an uninterrupted one does."""
    import wam_fast
    from wam_fast.distill.data import LatentDataset
    from wam_fast.distill.synthetic import make_synthetic_dataset
    from wam_fast.distill.objectives import DiffusionObjective

    config = wam_fast.configs.get("tiny")
    make_synthetic_dataset(tmp_path / "data", config, 24, seed=0)
    dataset = LatentDataset(tmp_path / "data")
    settings = dict(batch_size=8, micro_batch=4, lr=1e-3, precision="fp32", log_every=1, checkpoint_every=2,
                    progress=False, tensorboard=False, ema_decay=0.9, device="cpu")
    results = {}
    for name, stops in (("straight", (4,)), ("resumed", (2, 4))):
        for steps in stops:
            torch.manual_seed(0)
            model = wam_fast.WAMTransformer(config)
            results[name] = train(model, DiffusionObjective(config), dataset, TrainConfig(steps=steps, **settings),
                                  tmp_path / name)
    straight, resumed = results["straight"], results["resumed"]
    assert resumed.resumed_from == 2 and straight.step == resumed.step == 4
    assert {"loss_video", "loss_actions"} <= set(straight.metrics) and math.isfinite(straight.metrics["loss"])
    for name in ("final", "final-online"):
        _assert_files_equal(tmp_path / "straight" / name / "model.safetensors",
                            tmp_path / "resumed" / name / "model.safetensors")
    student = wam_fast.load_pretrained(straight.final)
    assert student.config == config
