"""`python -m wam_fast.bench` (the JSON schema, the rows, the chart) and the benchmark suite's GPU
telemetry, on "tiny" on CPU. The CLI runs in a subprocess without TRITON_INTERPRET, as a user runs it
(the fused ops take their torch backend on CPU; the interpreter would make it minutes)."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from wam_fast import bench, configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MATPLOTLIB_MODULES = ("matplotlib", "matplotlib.figure", "matplotlib.patches", "matplotlib.backends",
                      "matplotlib.backends.backend_agg")


def run_python(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def has_matplotlib():
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One CLI run on tiny (every row, 1 repeat, no warm-up): its JSON, chart path and output."""
    out = tmp_path_factory.mktemp("bench")
    path = out / "bench.json"
    result = run_python("-m", "wam_fast.bench", "--workload", "tiny", "--device", "cpu", "--repeats", "1",
                        "--warmup", "0", "--threads", "1", "--json", str(path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(path.read_text()), out / "bench.png", result


def test_cli_json_schema_and_rows(tiny_run):
    data, _, result = tiny_run
    assert {"device", "workload", "versions", "rows", "environment", "accounting", "gpu_telemetry"} <= set(data)
    assert data["workload"] == "tiny" and data["device"].startswith("cpu") and data["complete"] is True
    assert {"torch", "python", "triton", "cuda", "commit"} <= set(data["versions"])
    rows = {r["name"]: r for r in data["rows"]}
    students = {f"wam_fast-{s}step-{p}-{c}" for s in (4, 2, 1) for p in ("fp32", "fp8") for c in ("cache", "nocache")}
    action_only = {f"wam_fast-action-only-{s}step-{p}-cache" for s in (4, 2, 1) for p in ("fp32", "fp8")}
    pixels = {f"pixels-to-actions-{s}step-fp32-cache" for s in (4, 2, 1)}  # next to the latent-only rows
    assert set(rows) == set(bench.BASELINES) | students | action_only | pixels and len(data["rows"]) == 24
    assert [r["name"] for r in data["rows"]][:3] == ["released-baseline", "paper-baseline", "paper-baseline-compiled"]
    assert all(not r["fp8"] for r in data["rows"][:15]) and all(r["fp8"] for r in data["rows"][15:])  # FP8 last
    for name in pixels:  # VAE encode + the same cached student + readout; the text encoder timed on its own
        row = rows[name]
        assert row["levers"][0] == "vae-encode" and row["pipeline"]["parts"].startswith("tiny")
        assert row["pipeline"]["image_shape"] == [16, 16, 3] and row["pipeline"]["text_encoder_ms"] > 0
        assert 0 < row["pipeline"]["encode_ms_median"] < row["latency_ms"] * 2
    vae = data["vae_encoder_w1"]  # W1's frame: 32x32 latents, CogVideoX's 8x VAE (about 0.9 TFLOP, 92 M params)
    assert vae["image_shape"] == [256, 256, 3] and 0.5 < vae["tflop"] < 1.5 and 50e6 < vae["params"] < 150e6
    assert "W1 VAE encode of one frame" in result.stdout
    required = {"name", "steps", "fp8", "cache", "latency_ms", "p90_ms", "peak_mem_bytes", "times_ms", "op_backends",
                "gpu_telemetry"}
    for r in data["rows"]:
        assert required <= set(r), r["name"]
        assert isinstance(r["fp8"], bool) and isinstance(r["cache"], bool) and isinstance(r["steps"], int)
        assert 0 < r["latency_ms"] <= r["p90_ms"] and r["peak_mem_bytes"] > 0
        # telemetry per row (clocks, temperature); a CPU run says why it has none
        assert set(r["gpu_telemetry"]) == {"skipped"} and "GPU telemetry not taken" in r["gpu_telemetry"]["skipped"]
    # the environment and the tables are printed beside the numbers
    for text in ("torch", "released-baseline", "wam_fast-1step-fp8-cache", "vs paper", "fewer FLOPs",
                 "W1 weights (meta-device arithmetic): bf16 11.15 GB"):
        assert text in result.stdout, text


def test_cli_speedups_are_the_measured_ratios(tiny_run):
    data, _, _ = tiny_run
    latency = {r["name"]: r["latency_ms"] for r in data["rows"]}
    for r in data["rows"]:
        expected = {b for b in bench.BASELINES if b != r["name"]}
        assert set(r["speedups"]) == expected, r["name"]
        for baseline, ratio in r["speedups"].items():
            assert ratio == round(latency[baseline] / r["latency_ms"], 3)


def test_cli_rows_differ_in_what_they_run(tiny_run):
    data, _, _ = tiny_run
    rows = {r["name"]: r for r in data["rows"]}
    cfg = configs.get("tiny")
    temporal = dataclasses.replace(cfg, mask="temporal")
    released, paper = rows["released-baseline"], rows["paper-baseline"]
    assert (released["sampler"], released["steps"], released["nfe"], released["cfg_schedule"]) == \
        ("dpm++2m-sde", 50, 100, "dynamic")
    assert (paper["sampler"], paper["steps"], paper["nfe"], paper["cfg_schedule"]) == ("ddim", 10, 20, "constant")
    for r in (released, paper):
        assert (r["cfg_scale"], r["fused_modules"], r["fp8_layers"], r["cache_bytes"]) == (6.0, 0, 0, 0)
        assert r["tokens"] == r["nfe"] * cfg.num_tokens  # cond + uncond rows, whole sequence
        assert r["model"] == "teacher (eager)" and r["op_backends"] == {}  # reference modules: no fused op ran
    # the compiled teacher: the paper's sampler, steps and guidance on the same weights, through
    # wam_fast.compile (fused ops, no FP8, no cache: mask="full"); every fused op ran once per layer per step
    compiled = rows["paper-baseline-compiled"]
    for key in ("sampler", "steps", "nfe", "cfg_scale", "cfg_schedule", "tokens", "tflop", "weight_bytes"):
        assert compiled[key] == paper[key], key
    assert (compiled["model"], compiled["compiled_with"]) == ("teacher (compiled)", "wam_fast.compile")
    assert compiled["fused_modules"] > 0 and (compiled["fp8_layers"], compiled["cache_bytes"]) == (0, 0)
    assert compiled["levers"] == ["fused"] and compiled["cuda_graphs"] is False  # CPU: no torch.compile, no graphs
    ops = {"adaln_modulate", "gated_residual_adaln", "gated_residual", "qk_norm_rope", "attention", "ffn_gelu"}
    assert compiled["op_backends"] == {op: {"torch": paper["steps"] * cfg.num_layers} for op in ops}
    fp8_layers = {r["fp8_layers"] for r in data["rows"] if r["fp8"]}
    assert len(fp8_layers) == 1 and fp8_layers.pop() == 4 * cfg.num_layers  # qkv, out, ffn in, ffn out
    for s in (4, 2, 1):
        for p in ("fp32", "fp8"):
            cached, uncached = rows[f"wam_fast-{s}step-{p}-cache"], rows[f"wam_fast-{s}step-{p}-nocache"]
            for r in (cached, uncached):
                assert (r["steps"], r["nfe"], r["cfg_scale"], r["sampler"]) == (s, s, 1.0, "ddim")  # guidance baked in
                assert r["step_size"] == cfg.num_train_timesteps / s
                assert r["fused_modules"] > 0 and r["compiled_with"]
                assert r["fp8_layers"] == (0 if p == "fp32" else 4 * cfg.num_layers)
            # with the cache: the frame once + the noisy tokens per step; without: everything per step
            assert cached["tokens"] == temporal.tokens_per_frame + s * temporal.noisy_tokens
            assert uncached["tokens"] == s * temporal.num_tokens
            assert cached["cache_bytes"] > 0 and uncached["cache_bytes"] == 0
        assert rows[f"wam_fast-{s}step-fp8-cache"]["weight_bytes"] < rows[f"wam_fast-{s}step-fp32-cache"]["weight_bytes"]
        for p in ("fp32", "fp8"):  # the action-only student (#26): the frame once, then the action tokens alone
            only, cached = rows[f"wam_fast-action-only-{s}step-{p}-cache"], rows[f"wam_fast-{s}step-{p}-cache"]
            assert only["model"] == "shortcut student (mask=temporal, action-only)"
            assert (only["steps"], only["nfe"], only["step_size"]) == (s, s, cfg.num_train_timesteps / s)
            assert only["tokens"] == temporal.tokens_per_frame + s * cfg.action_len
            assert only["tflop"] < cached["tflop"] and only["cache_bytes"] < cached["cache_bytes"]
            assert only["fp8_layers"] == (0 if p == "fp32" else 4 * cfg.num_layers)


def test_cli_accounting_table(tiny_run):
    data, _, _ = tiny_run
    # the paper baseline's arithmetic for W1: 10 steps x 2 rows of 1256 tokens, or the frame (256) once
    # and 774 noisy tokens per step; text (226) once per instruction
    settings = [(e["steps"], e["rows"]) for e in data["accounting"]]
    assert sorted(set(settings), key=settings.index) == [(10, 2), (4, 1), (2, 1), (1, 1)]  # paper, then students
    w1 = {e["model"]: e for e in data["accounting"] if e["workload"] == "videovla-5b" and e["steps"] == 10}
    assert w1["full (VideoVLA)"]["tokens"] == w1["temporal"]["tokens"] == 10 * 2 * 1256
    assert w1["temporal + KV cache"]["tokens"] == 2 * (256 + 10 * 774)
    assert w1["temporal + KV cache"]["text_tokens"] == 2 * 226
    # the action-only student (#26): 6 noisy tokens per step, the frame once
    only = w1["action-only + KV cache"]
    assert (only["noisy_tokens"], w1["temporal + KV cache"]["noisy_tokens"]) == (6, 774)
    assert only["tokens"] == 2 * (256 + 10 * 6) and only["tflop"] < w1["temporal + KV cache"]["tflop"] / 10
    assert "action-only + KV cache | 6 |" in " ".join(tiny_run[2].stdout.split())
    # docs/design.md, Workloads: 12.8 TFLOP per forward
    assert w1["full (VideoVLA)"]["tflop"] == pytest.approx(20 * 12.76, rel=1e-3)
    assert {e["workload"] for e in data["accounting"]} == {"videovla-5b", "videovla-5b-sim"}
    weights = data["weights_w1"]
    assert weights["bf16"] == pytest.approx(11.15e9, rel=0.01)  # docs/design.md, Workloads: 11.1 GB bf16
    assert weights["fp8_with_adaln"] == pytest.approx(5.61e9, rel=0.01)  # docs/design.md, FP8: 5.6 GB
    assert weights["fp8_with_adaln"] < weights["fp8"] < 6.5e9  # default: AdaLN projections stay bf16


def test_readme_quotes_the_accounting_the_bench_prints(tiny_run):
    data, _, _ = tiny_run
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    for steps, rows in ((4, 1), (10, 2)):
        w1 = {e["model"]: e for e in data["accounting"]
              if e["workload"] == "videovla-5b" and (e["steps"], e["rows"]) == (steps, rows)}
        cached, uncached = w1["temporal + KV cache"], w1["temporal"]
        quote = (f"{cached['tokens']} vs {uncached['tokens']} tokens, {cached['tflop']:.1f} vs {uncached['tflop']:.1f} "
                 f"TFLOP ({uncached['tflop'] / cached['tflop']:.2f}x fewer)")
        assert quote in " ".join(readme.split()), quote


def test_cli_chart_is_a_png(tiny_run):
    _, chart, result = tiny_run
    if not has_matplotlib():
        assert not chart.exists() and "pip install matplotlib" in result.stdout
        return
    assert f"wrote {chart}" in result.stdout
    assert chart.read_bytes()[:8] == PNG_SIGNATURE
    from PIL import Image  # matplotlib depends on pillow

    with Image.open(chart) as image:
        assert image.format == "PNG" and image.size[0] > 500 and image.size[1] > 500


def test_chart_without_matplotlib_is_a_message(tiny_run, tmp_path, monkeypatch, capsys):
    data, _, _ = tiny_run
    recorded = tmp_path / "run.json"
    recorded.write_text(json.dumps(data))
    for name in MATPLOTLIB_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib...` now raises ImportError
    message = bench.write_chart(data, str(tmp_path / "a.png"))
    assert "matplotlib is not installed" in message and "pip install matplotlib" in message
    assert not (tmp_path / "a.png").exists()
    # the CLI: the table of the recorded run, then the message; no exception, no file
    result = bench.main(["--from-json", str(recorded), "--chart", str(tmp_path / "b.png")])
    out = capsys.readouterr().out
    assert result["rows"] == data["rows"]
    assert "wam_fast-4step-fp8-nocache" in out and "pip install matplotlib" in out
    assert not (tmp_path / "b.png").exists()


@pytest.mark.skipif(not has_matplotlib(), reason="matplotlib is not installed (pip install matplotlib)")
def test_from_json_redraws_a_recorded_run(tiny_run, tmp_path, capsys):
    data, _, _ = tiny_run
    recorded = tmp_path / "gpu-run.json"
    recorded.write_text(json.dumps(data))
    bench.main(["--from-json", str(recorded)])  # chart next to the JSON by default
    assert (tmp_path / "gpu-run.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "| released-baseline |" in capsys.readouterr().out


def test_rows_filter_and_steps():
    rows = bench.variants_for("tiny", "bf16", steps=(8, 2))
    assert [v.name for v in rows][:5] == ["released-baseline", "paper-baseline", "paper-baseline-compiled",
                                          "wam_fast-8step-bf16-cache", "wam_fast-8step-bf16-nocache"]
    assert len(rows) == 3 + 2 * 2 * 2 + 2 * 2  # + the action-only students, cached, per precision
    assert [v.compiled for v in rows[:3]] == [False, False, True] and all(v.compiled for v in rows if v.student)
    picked = bench.select(rows, ["paper-baseline", "wam_fast-2step-*-cache"])
    assert [v.name for v in picked] == ["paper-baseline", "wam_fast-2step-bf16-cache", "wam_fast-2step-fp8-cache"]
    assert bench.select(rows, None) == rows


def test_repeats_default_to_30():
    _, args = bench.parse_args([])
    assert (args.repeats, args.warmup) == (30, 2)


def test_cli_rejects_bad_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cpu", "--rows", "nope-*"])
    assert exit_info.value.code == 2
    assert "--rows nope-* matches no row" in capsys.readouterr().err
    for argv, message in ((["--steps", "0"], "step counts must be ints >= 1"),
                          (["--steps", "4,x"], "expected step counts like 4,2,1"),
                          (["--repeats", "0"], "--repeats: must be >= 1"),
                          (["--warmup", "-1"], "--warmup: must be >= 0")):
        with pytest.raises(SystemExit) as exit_info:
            bench.parse_args(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, argv


def test_cli_refuses_w1_on_cpu(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--workload", "videovla-5b", "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "refusing to run videovla-5b on CPU" in err and "--allow-cpu-large" in err


def test_shortcut_student_shares_the_teachers_tensors():
    cfg = configs.get("tiny")
    teacher = bench.build_model(cfg, torch.device("cpu"), torch.float32)
    student = bench.shortcut_student(teacher, (4, 2, 1))
    assert (student.config.mask, student.config.distillation, student.config.distilled_steps) == \
        ("temporal", "shortcut", (1, 2, 4))
    teacher_params = dict(teacher.named_parameters())
    own = [n for n, p in student.named_parameters() if n not in teacher_params]
    assert own and all(n.startswith("step_embed.") for n in own)
    for name, p in student.named_parameters():
        if name in teacher_params:
            assert p.data_ptr() == teacher_params[name].data_ptr(), name  # no copy
        assert p.device.type == "cpu" and p.dtype == torch.float32 and torch.isfinite(p).all(), name


def test_chunk_flops_and_floor_follow_the_accounting():
    cfg = configs.get("videovla-5b")
    rows = {v.name: v for v in bench.variants_for("videovla-5b", "bf16")}
    paper = bench.chunk_flops(cfg, rows["paper-baseline"], batch=1)
    assert paper["tokens"] == 20 * 1256 and paper["flops"] / 1e12 == pytest.approx(20 * 12.76, rel=1e-3)
    cached = bench.chunk_flops(cfg, rows["wam_fast-1step-bf16-cache"], batch=1)
    assert cached["tokens"] == 256 + 774  # one row (guidance baked in), the frame once, the noisy tokens once
    ceilings = {"bf16_tflops": 800.0, "fp8_tflops": 1600.0}
    floor = bench.floor_ms(paper, fp8=False, ceilings=ceilings)
    # docs/design.md, Workloads: 16 ms per forward on an H100
    assert floor == pytest.approx(paper["flops"] / 800e12 * 1e3)
    fp8 = bench.floor_ms(paper, fp8=True, ceilings=ceilings)
    assert fp8 == pytest.approx((paper["linear_flops"] / 1600e12 + paper["attention_flops"] / 800e12) * 1e3)
    assert bench.floor_ms(paper, fp8=True, ceilings={"bf16_tflops": 800.0, "fp8_tflops": None}) is None
    assert bench.design_ceilings("NVIDIA H100 80GB HBM3") == {"bf16": 800.0, "fp8": 1500.0}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_telemetry_says_why_it_is_skipped(monkeypatch):
    report = bench.gpu_telemetry()
    assert set(report) == {"skipped"} and "no CUDA device" in report["skipped"]
    # a GPU but no nvidia-ml-py, or a GPU whose NVML does not start: a reason, not an exception
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert "pip install nvidia-ml-py" in bench.gpu_telemetry()["skipped"]
    monkeypatch.delitem(sys.modules, "pynvml")
    pynvml = pytest.importorskip("pynvml")

    def fail():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    assert "NVML did not initialise" in bench.gpu_telemetry()["skipped"]


def test_benchmark_suite_stores_telemetry(tmp_path, monkeypatch):
    """`pytest benchmarks/ --benchmark-only`: the chunk benchmark's extra_info has the row and the
    GPU telemetry (on CPU: the one-line reason it was skipped). On "tiny" on a GPU too (W1 is not a unit test)."""
    pytest.importorskip("pytest_benchmark")
    monkeypatch.setenv("WAM_BENCH_WORKLOAD", "tiny")
    path = tmp_path / "bench.json"
    result = run_python("-m", "pytest", "benchmarks/bench_chunk.py", "--benchmark-only", "-q", "-p",
                        "no:cacheprovider", "-k", "1step", "--benchmark-json", str(path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (entry,) = json.loads(path.read_text())["benchmarks"]
    info = entry["extra_info"]
    assert info["nfe"] == 1 and info["cache"] is True and info["cache_bytes"] > 0 and info["workload"] == "tiny"
    if torch.cuda.is_available():
        assert {"name", "sm_clock_mhz", "mem_clock_mhz", "power_w", "memory_used_bytes"} <= set(info["gpu_telemetry"])
    else:
        assert set(info["gpu_telemetry"]) == {"skipped"} and "no CUDA device" in info["gpu_telemetry"]["skipped"]


def test_table_and_chart_show_the_floor_on_a_gpu_run(tiny_run, tmp_path):
    # a GPU run's rows carry pct_of_floor (CPU runs do not): the table grows a column, the chart a label
    data, _, _ = tiny_run
    rows = [dict(r, floor_ms=r["latency_ms"] / 4, pct_of_floor=25.0) for r in data["rows"]]
    table = bench.format_table("videovla-5b", rows)
    assert "% of floor" in table and "| 25.0% |" in table
    assert "square 8192^3 GEMM rates" in table  # what the floor is (and is not) said under the table
    assert "% of floor" not in bench.format_table("tiny", data["rows"])
    # per-row clocks and temperature (NVML) get a column when a row has them
    assert "SM MHz" not in table
    clocked = [dict(r, gpu_telemetry={"sm_clock_mhz": 1980, "temperature_c": 41}) for r in rows]
    assert "SM MHz / C" in bench.format_table("videovla-5b", clocked) and "| 1980 / 41 |" in \
        bench.format_table("videovla-5b", clocked)
    if has_matplotlib():
        assert bench.write_chart(dict(data, rows=rows), str(tmp_path / "gpu.png")) is None
        assert (tmp_path / "gpu.png").read_bytes()[:8] == PNG_SIGNATURE


def test_gpu_telemetry_of_a_cpu_run_on_a_gpu_machine(monkeypatch):
    # a --device cpu run on a machine with a GPU: its rows must not carry the idle GPU's clocks
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    report = bench.gpu_telemetry(torch.device("cpu"))
    assert set(report) == {"skipped"} and "not a GPU" in report["skipped"]


def test_fp8_ceiling_uses_fast_accumulation(monkeypatch):
    """The FP8 ceiling runs the GEMM the FP8 linears run (fast accumulation), on a small n on CPU."""
    from wam_fast.ops.fp8_linear import FAST_ACCUM

    seen = []
    scaled_mm = torch._scaled_mm

    def recording(*args, **kwargs):
        seen.append(kwargs.get("use_fast_accum", False))
        return scaled_mm(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", recording)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    ceilings = bench.measure_ceilings(torch.device("cpu"), n=32)
    assert seen and set(seen) == {FAST_ACCUM}, seen
    if FAST_ACCUM:
        assert "fast accumulation" in ceilings["fp8_source"] and ceilings["fp8_tflops"] > 0, ceilings


def _run_and_drop_policy(model, variant, inputs) -> dict:
    """Compile a bench row's policy, act 3 times, return weak references to what it held: the policy
    dies with this frame, the only place that references it."""
    import weakref

    from wam_fast.compiler import graphs

    policy, _ = bench.compiled_policy(model, variant, seed=0, backend="eager")
    if policy.cache is not None:
        graphs.attach(policy, graphs.EagerCapture)  # the graph runner's path, as on a GPU
    policy.reset(inputs["text"])
    with torch.inference_mode():
        for _ in range(3):  # capture, then replays
            policy.act(inputs["image"])
    refs = {"policy": weakref.ref(policy), "model": weakref.ref(policy.model)}
    if policy.cache is not None:
        assert policy.graphs.captures == 1 and policy.graphs.replays == 2
        refs.update(cache=weakref.ref(policy.cache), k=weakref.ref(policy.cache.k), graphs=weakref.ref(policy.graphs))
    return refs


@pytest.mark.parametrize("row", ["wam_fast-2step-fp32-cache", "paper-baseline-compiled"])
def test_dropped_policy_frees_its_memory_without_gc(row):
    """A bench row's policy (compiled, its KV cache, its chunk graphs) is freed as soon as the row drops
    it: no reference cycle (cache <-> its passes, policy <-> graph runner, policy <-> its report method)
    keeps the cache's buffers alive until a gc."""
    import gc

    cfg = configs.get("tiny")
    teacher = bench.build_model(cfg, torch.device("cpu"), torch.float32)
    inputs = bench.make_inputs(cfg, 1, torch.device("cpu"), torch.float32, seed=0)
    variant = next(v for v in bench.variants_for("tiny", "fp32") if v.name == row)
    model = bench.shortcut_student(teacher, (2,)) if variant.student else teacher
    gc.collect()
    gc.disable()
    try:
        refs = _run_and_drop_policy(model, variant, inputs)
        alive = [name for name, ref in refs.items() if ref() is not None]
    finally:
        gc.enable()
    # the student outlives its row (the bench's next rows share it); the compiled teacher's twin does not
    assert alive == (["model"] if variant.student else []), alive


def test_release_memory_collects_cycles():
    import gc
    import weakref

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a
    ref = weakref.ref(a)
    gc.disable()
    try:
        del a, b
        assert ref() is not None  # a cycle outlives its last name until a gc
        bench.release_memory(torch.device("cpu"), drop_compiled=True)
        assert ref() is None
    finally:
        gc.enable()


# ---- benchmarks/gpu_check.sh -------------------------------------------------------------------------
GPU_CHECK = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def run_gpu_check(out, **env_vars):
    env = {k: v for k, v in os.environ.items() if k not in ("STAGES", "BENCH_ARGS", "DEADLINE_S")}
    env.update(OUT=str(out), **env_vars)
    return subprocess.run(["bash", GPU_CHECK], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)


def test_gpu_check_script_defaults_and_output_files():
    import re
    import shutil

    if shutil.which("bash") is None:
        pytest.skip("no bash here")
    assert subprocess.run(["bash", "-n", GPU_CHECK], capture_output=True).returncode == 0
    text = open(GPU_CHECK, encoding="utf-8").read()
    # default: build + the W1 bench only; the test subset is a stage list of its own
    assert re.search(r'^STAGES=\$\{STAGES:-build bench\}$', text, re.M)
    assert "gputests" in text and "timeout" in text and "pip install --no-index --no-deps --no-build-isolation" in text
    assert re.search(r"^BENCH_ARGS=\$\{BENCH_ARGS:---rows 'paper-baseline,paper-baseline-compiled,", text, re.M)
    declared = re.search(r"^OUTPUT_FILES=\(([^)]*)\)", text, re.M | re.S).group(1).split()
    assert len(declared) == len(set(declared)) <= 8 and "gpu-check.log" in declared
    written = set(re.findall(r'\$OUT/([\w.-]+)', text))  # every file the script names under $OUT
    assert written and written <= set(declared), written - set(declared)
    assert "MAX_FILES=8" in text


def test_gpu_check_script_runs_its_checks(tmp_path):
    """The script with no GPU stage: its log, its file check, its stage check, its deadline."""
    import shutil

    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("no bash / timeout here")
    out = tmp_path / "out"
    result = run_gpu_check(out, STAGES=" ")  # no stage: the log and nvidia-smi.txt only
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.log", "nvidia-smi.txt"]
    assert "2 files in" in (out / "gpu-check.log").read_text()  # printed and tee'd into the log
    # a file that would not come back (or a 9th) fails the call, naming it
    (out / "stray.txt").write_text("x")
    result = run_gpu_check(out, STAGES=" ")
    assert result.returncode == 1 and "not in OUTPUT_FILES: stray.txt" in result.stdout
    # an unknown stage is refused before anything runs
    result = run_gpu_check(tmp_path / "other", STAGES="build tests")
    assert result.returncode == 2 and "unknown stage 'tests'" in result.stderr
    assert not (tmp_path / "other").exists()
    # a stage with too little of the deadline left is skipped, and the call says it failed
    result = run_gpu_check(tmp_path / "late", STAGES="bench", DEADLINE_S="10")
    assert result.returncode == 1 and "bench: SKIPPED" in result.stdout
