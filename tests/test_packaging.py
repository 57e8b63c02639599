"""Packaging and CLIs: a lean import, `python -m wam_fast.info`, and setup.py's decision on the CUDA
extension (`python -m wam_fast.bench` is tested in tests/test_bench.py)."""
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


def test_no_top_level_kernels_package():
    """The Triton kernels live in wam_fast/kernels/: a top-level wam_fast/kernels/ directory would shadow PyPI's
    ``kernels`` (which transformers imports) whenever Python runs from a clone of this repository."""
    import wam_fast.kernels

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert not os.path.exists(os.path.join(root, "kernels"))
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


def test_readme_quickstart_matches_ci():
    # The README's Quickstart is two commands; CI runs the same install and test command.
    import re

    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quickstart, re.S)
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    bench, tests = commands
    assert bench.endswith("python -m wam_fast.bench")
    install, client, test_cmd = tests.split(" && ")
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    lines = ci.splitlines()
    assert install in lines, f"CI does not run the README install {install!r}"
    assert client == "pip install --no-deps openpi-client" and client in lines
    assert any(line == test_cmd or line.startswith(test_cmd + " ||") for line in lines), \
        f"CI does not run the README test command {test_cmd!r}"
