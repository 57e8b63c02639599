"""Packaging and CLIs: a lean import, `python -m wam_fast.info`, `python -m wam_fast.bench`, and
setup.py's decision on the CUDA extension."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(*args, code=None, timeout=300):
    cmd = [sys.executable] + (["-c", code] if code is not None else list(args))
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def load_setup_module():
    # setup.py only calls setup() under __main__, so importing it under another name is safe.
    spec = importlib.util.spec_from_file_location("wam_fast_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_import_is_lean():
    # Modules are listed right after `import wam_fast` (torch itself may load some, e.g. pynvml).
    code = (
        "import sys, json, wam_fast\n"
        "heavy = ['triton', 'diffusers', 'flash_attn', 'xformers', 'torch_tensorrt', 'metaworld', 'pynvml']\n"
        "loaded = [m for m in heavy if m in sys.modules]\n"
        "import torch\n"
        "print(json.dumps({'loaded': loaded, 'cuda_init': torch.cuda.is_initialized()}))\n"
    )
    result = run_python(code=code)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"loaded": [], "cuda_init": False}


def test_import_does_not_import_torch_submodules_eagerly():
    # `import wam_fast` alone should not even pull in the model or sampler modules.
    code = ("import sys, wam_fast\n"
            "print([m for m in ('wam_fast.models', 'wam_fast.sampling', 'wam_fast.bench') if m in sys.modules])")
    result = run_python(code=code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_kernels_package_maps_to_wam_fast_kernels():
    # kernels/ becomes wam_fast.kernels only through setup.py (`pip install -e .`, as CI does).
    import importlib.metadata

    try:
        importlib.metadata.version("wam_fast")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("wam_fast is not installed (pip install -e .): kernels/ is not mapped")
    import wam_fast.kernels

    assert "Triton" in wam_fast.kernels.__doc__


def test_info_runs_and_reports():
    result = run_python("-m", "wam_fast.info")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for key in ("wam_fast", "torch", "triton", "device", "wam_fast._C", "optional packages",
                "diffusers", "flash-attn", "xformers", "torch-tensorrt", "metaworld", "nvidia-ml-py"):
        assert key in out, f"{key!r} missing from info output:\n{out}"
    import torch

    if not torch.cuda.is_available():
        assert "no GPU" in out
    if not torch.version.cuda:
        assert "CPU build" in out  # why the extension is not built


def test_info_json_is_data():
    result = run_python("-m", "wam_fast.info", "--json")
    assert result.returncode == 0, result.stderr
    sections = json.loads(result.stdout)
    titles = [s["title"] for s in sections]
    assert {"versions", "device", "CUDA extension", "Triton", "optional packages"} <= set(titles)
    for section in sections:
        for row in section["rows"]:
            assert set(row) == {"name", "status", "detail"}


def test_bench_tiny_writes_schema(tmp_path):
    path = tmp_path / "bench.json"
    result = run_python("-m", "wam_fast.bench", "--workload", "tiny", "--device", "cpu", "--steps", "2",
                        "--repeats", "1", "--warmup", "0", "--json", str(path))
    assert result.returncode == 0, result.stderr
    data = json.loads(path.read_text())
    assert {"device", "workload", "versions", "rows"} <= set(data)
    assert data["workload"] == "tiny"
    assert {"torch", "python", "triton", "commit"} <= set(data["versions"])
    row, uncached, cached, fp8 = data["rows"]
    assert {"name", "steps", "fp8", "cache", "latency_ms", "p90_ms", "peak_mem_bytes"} <= set(row)
    assert row["name"] == "paper-baseline"
    assert row["steps"] == 2 and row["nfe"] == 4  # CFG batches cond + uncond: 2 per step
    assert row["fp8"] is False and row["cache"] is False
    assert 0 < row["latency_ms"] <= row["p90_ms"] and row["peak_mem_bytes"] > 0
    # the temporal twin through WAMPolicy, without and with the KV cache, and the measured ratio
    assert (uncached["name"], uncached["cache"], uncached["tokens"]) == ("temporal-uncached", False, 44)
    assert (cached["name"], cached["cache"], cached["tokens"]) == ("temporal-kv-cache", True, 20)
    assert cached["speedup"] == round(uncached["latency_ms"] / cached["latency_ms"], 3)
    # arithmetic per chunk for W1: 2 steps x 2 rows of 1256 tokens, or the frame (256) once and
    # 774 noisy tokens per step; text (226) once per instruction
    w1 = {e["model"]: e for e in data["accounting"] if e["workload"] == "videovla-5b"}
    assert w1["temporal"]["tokens"] == 2 * 2 * 1256 and w1["full (VideoVLA)"]["tokens"] == 2 * 2 * 1256
    assert w1["temporal + KV cache"]["tokens"] == 2 * (256 + 2 * 774)
    assert w1["temporal + KV cache"]["text_tokens"] == 2 * 226
    assert w1["full (VideoVLA)"]["tflop"] == pytest.approx(4 * 12.76, rel=1e-3)  # DESIGN.md: 12.8 per forward
    assert {e["workload"] for e in data["accounting"]} == {"videovla-5b", "videovla-5b-sim"}
    # FP8: the quantized model's measured weights are smaller; W1's weight arithmetic (meta device)
    assert (fp8["name"], fp8["fp8"]) == ("fp8", True) and fp8["speedup_vs"] == "paper-baseline"
    assert 0 < fp8["weight_bytes"] < row["weight_bytes"]
    weights = data["weights_w1"]
    assert weights["bf16"] == pytest.approx(11.15e9, rel=0.01)  # DESIGN.md: 11.1 GB bf16
    assert weights["fp8_with_adaln"] == pytest.approx(5.61e9, rel=0.01)  # DESIGN.md: 5.6 GB FP8
    assert weights["fp8_with_adaln"] < weights["fp8"] < 6.5e9  # default: AdaLN projections stay bf16
    # the tables and the environment are printed beside the numbers
    assert "paper-baseline" in result.stdout and "torch" in result.stdout
    assert "x vs temporal-uncached" in result.stdout and "fewer FLOPs" in result.stdout
    assert "W1 weights (meta-device arithmetic): bf16 11.15 GB" in result.stdout


def test_bench_refuses_w1_on_cpu():
    result = run_python("-m", "wam_fast.bench", "--workload", "videovla-5b", "--device", "cpu")
    assert result.returncode == 2
    assert "refusing to run videovla-5b on CPU" in result.stderr
    assert "--allow-cpu-large" in result.stderr


def test_bench_rejects_bad_steps():
    result = run_python("-m", "wam_fast.bench", "--steps", "0")
    assert result.returncode == 2
    assert "--steps must be >= 1" in result.stderr


def test_cuda_build_reason_env_skip():
    setup = load_setup_module()
    assert setup.cuda_build_reason({"WAM_FAST_SKIP_CUDA_BUILD": "1"}) == "WAM_FAST_SKIP_CUDA_BUILD=1"


def test_cuda_build_reason_needs_binding(tmp_path):
    setup = load_setup_module()
    (tmp_path / "csrc").mkdir()
    assert "binding" in setup.cuda_build_reason({}, root=str(tmp_path))


def test_cuda_build_reason_needs_cuda_torch(tmp_path):
    import torch

    if torch.version.cuda:
        pytest.skip("CUDA build of torch: the CPU-build reason does not apply")
    setup = load_setup_module()
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "binding.cpp").write_text("// stand-in\n")
    assert setup.cuda_build_reason({}, root=str(tmp_path)) == f"torch {torch.__version__} is not a CUDA build"


def test_setup_py_does_not_run_setup_on_import():
    setup = load_setup_module()
    assert setup.read_version() == __import__("wam_fast").__version__
    assert setup.kernel_packages()[0] == "wam_fast.kernels"


def test_readme_quickstart_matches_ci():
    # The README's Quickstart is two commands; CI runs the same install and test command.
    import re

    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quickstart, re.S)
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    bench, tests = commands
    assert bench.endswith("python -m wam_fast.bench")
    install, test_cmd = tests.split(" && ")
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    lines = ci.splitlines()
    assert install in lines, f"CI does not run the README install {install!r}"
    assert any(line == test_cmd or line.startswith(test_cmd + " ||") for line in lines), \
        f"CI does not run the README test command {test_cmd!r}"
