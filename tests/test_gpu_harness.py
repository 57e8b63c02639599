"""The device choices that decide whether the suite passes on a GPU machine, checked on the CPU on a faked
CUDA machine (torch.cuda.is_available / device_count patched, torch.cuda.set_device recorded; no GPU is
touched, and on a CPU-only torch any real CUDA use fails):

- tests that force the Triton backend put their tensors on ``devices.kernel_device()``: the GPU there
  (TRITON_INTERPRET is unset on a GPU machine, so Triton takes CUDA tensors only);
- the distill trainer's default device is cuda:LOCAL_RANK, and a LOCAL_RANK without a GPU of its own is a
  clear error, not a request for cuda:1 on a 1-GPU machine;
- the trainer tests (bit-exact resumes, 2-rank DDP / FSDP2 runs) train on the CPU whatever the machine;
- the benchmark suite's chunk benchmark, run by the unit tests, is "tiny" (W1 belongs to benchmark runs).
"""
import importlib.util
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed as dist

import test_distill_trainer as trainer_tests
from devices import cpu_only_env, kernel_device
from wam_fast.distill import commands
from wam_fast.distill.distributed import default_device, setup_distributed
from wam_fast.ops.registry import device_reasons

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def one_gpu(monkeypatch):
    """A machine with one CUDA device and no torchrun variables; the list of torch.cuda.set_device calls."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    return calls


def _on(device):
    return types.SimpleNamespace(device=torch.device(device))  # all device_reasons reads of a tensor


def test_kernel_device_is_where_the_forced_triton_backend_runs(monkeypatch):
    # a GPU machine: conftest.py does not set TRITON_INTERPRET there, so Triton refuses CPU tensors
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kernel_device() == torch.device("cuda")
    assert device_reasons("triton", _on(kernel_device())) == []
    assert device_reasons("triton", _on("cpu")) == ["needs CUDA tensors (or cpu under TRITON_INTERPRET=1), got ['cpu']"]
    # no GPU: the interpreter runs the kernels on CPU tensors
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernel_device() == torch.device("cpu")
    assert device_reasons("triton", _on(kernel_device())) == []


def test_default_device_is_the_local_rank_gpu_or_a_clear_error(one_gpu, monkeypatch):
    assert default_device() == torch.device("cuda", 0)  # outside torchrun
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert default_device() == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")  # the second of 2 ranks on a 1-GPU machine
    with pytest.raises(ValueError, match=r"cuda:1 does not exist: this machine has 1 visible CUDA device\(s\) "
                                         r"\(LOCAL_RANK=1\); start at most 1 process\(es\) per node"):
        default_device()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")
    assert one_gpu == []  # choosing a device sets none


def test_setup_distributed_on_a_one_gpu_machine(one_gpu, monkeypatch):
    d = setup_distributed("auto", None)
    assert (d.mode, d.rank, d.world, d.device) == ("none", 0, 1, torch.device("cuda", 0))
    assert one_gpu == [torch.device("cuda", 0)]
    one_gpu.clear()
    assert setup_distributed("auto", "cpu").device == torch.device("cpu") and one_gpu == []  # explicit: kept
    with pytest.raises(ValueError, match="cuda:1 does not exist"):
        setup_distributed("none", "cuda:1")
    # rank 1 of a 2-rank torchrun: refused before any device is set or process group made
    for key, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match="cuda:1 does not exist.*torchrun --nproc_per_node 1"):
        setup_distributed("ddp", None)
    assert one_gpu == [] and not dist.is_initialized()


def test_cli_device_on_a_one_gpu_machine(one_gpu, monkeypatch):
    assert commands._device() == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(commands.CLIError, match="cuda:1 does not exist") as error:
        commands._device()
    assert "\n" not in str(error.value)  # printed as one line


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()  # tiny models, as in the trainer tests
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_trainer_tests_train_on_the_cpu_on_a_gpu_machine(one_gpu, one_thread, monkeypatch, tmp_path):
    """The trainer tests' runs (one process, and the worker's DDP and FSDP2 modes of the torchrun test, here
    on a 1-rank gloo group) stay on the CPU: bit-exact comparisons meet no CUDA atomics, and 2 ranks need
    no second GPU. FSDP2's default mesh follows the accelerator, faked here as CUDA too."""
    monkeypatch.setattr(torch._C, "_get_accelerator", lambda *args: torch.device("cuda"))
    assert trainer_tests._mlp_run(tmp_path / "mlp", steps=1).step == 1
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for mode in ("ddp", "fsdp"):
            result = trainer_tests._worker_run(tmp_path / mode, "--steps", "1", "--samples", "8", "--batch", "4",
                                               parallel=mode)
            assert result.step == 1 and result.world_size == 1
    finally:
        dist.destroy_process_group()
    assert one_gpu == []


def test_cpu_only_env_hides_every_gpu():
    """The environment of the CLI's torchrun test: its ranks see no GPU (on a GPU machine too)."""
    assert cpu_only_env({"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0"}) == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": ""}
    seen = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                          env=cpu_only_env(), capture_output=True, text=True, timeout=120)
    assert seen.returncode == 0 and seen.stdout.strip() == "0", seen.stderr[-2000:]


def test_the_unit_tests_run_the_chunk_benchmark_on_tiny(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_chunk", os.path.join(ROOT, "benchmarks", "bench_chunk.py"))
    bench_chunk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_chunk)
    monkeypatch.delenv("WAM_BENCH_WORKLOAD", raising=False)
    assert bench_chunk._setting(torch.device("cuda")) == ("videovla-5b", "bf16", "inductor")
    assert bench_chunk._setting(torch.device("cpu")) == ("tiny", "fp32", "eager")
    monkeypatch.setenv("WAM_BENCH_WORKLOAD", "tiny")  # what tests/test_bench.py sets
    assert bench_chunk._setting(torch.device("cuda")) == ("tiny", "bf16", "inductor")
