"""Arch-aware tile choice (wam_fast/kernels/gpu_arch.py and the launchers' tables) and benchmarks/aot_check.py:
W1 configs fit each arch's shared memory and fill its SMs; a real ahead-of-time compile is parsed into
registers / spills / shared memory; a config over the shared-memory limit fails the check."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from wam_fast.ops.registry import kernel_module

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
arch_mod = kernel_module("gpu_arch")
SM89, SM90 = arch_mod.SM89, arch_mod.SM90
TOKENS = (256, 512, 774, 1256, 1548, 2512)  # W1 GEMM rows, with and without CFG
GEMMS = {"qkv": (9216, 3072), "out": (3072, 3072), "ffn-in": (12288, 3072), "ffn-out": (3072, 12288)}


def _tiles(M, N, c):
    return -(-M // c.block_m) * -(-N // c.block_n)


@pytest.mark.parametrize("arch", [SM89, SM90], ids=lambda a: a.name)
def test_w1_gemm_configs_fit_and_fill(arch):
    fp8, ffn = kernel_module("fp8_linear"), kernel_module("ffn_gelu")
    for M in TOKENS:
        for name, (N, K) in GEMMS.items():
            picks = [(fp8.pick_config(M, N, K, interpreting=False, arch=arch), 1)]
            if name == "ffn-in":
                picks.append((ffn.pick_config(M, N, K, torch.bfloat16, interpreting=False, arch=arch), 2))
            for c, itemsize in picks:
                smem = arch_mod.gemm_smem_bytes(c.block_m, c.block_n, c.block_k, c.num_stages, itemsize, arch)
                assert smem <= arch.smem_per_block, (arch.name, M, name, c, smem)
                eff = arch_mod.wave_efficiency(_tiles(M, N, c), arch.num_sms)
                # the N=3072 GEMMs at M=256 top out at 96 tiles of 128x64 (0.73 of 132 SMs)
                assert eff >= (0.7 if M == 256 else 0.8), (arch.name, M, name, c, eff)
    # the FP8 out-projection at the cached step: at least 2 waves, not 84 tiles on 132 SMs
    c = fp8.pick_config(774, 3072, 3072, interpreting=False, arch=arch)
    assert _tiles(774, 3072, c) >= 2 * arch.num_sms


@pytest.mark.parametrize("arch", [SM89, SM90], ids=lambda a: a.name)
def test_w1_attention_configs_fit_and_fill(arch):
    attn = kernel_module("attention")
    for batch in (1, 2):
        for nq in (256, 774, 1256):
            c = attn.default_config(64, torch.bfloat16, nq, batch_heads=48 * batch, arch=arch,
                                    interpreting=False)
            smem = 2 * 64 * (c.block_m + 2 * c.num_stages * c.block_n)  # q tile + k, v per stage (bf16)
            assert smem <= arch.smem_per_block, (arch.name, nq, c)
            assert -(-nq // c.block_m) * 48 * batch >= arch.num_sms, (arch.name, nq, batch, c)


def test_arch_override_and_bad_input():
    fp8 = kernel_module("fp8_linear")
    with arch_mod.target_arch(SM89):
        assert arch_mod.current_arch() == SM89
        assert fp8.pick_config(1256, 12288, 3072, interpreting=False) == fp8.GPU_CONFIGS["sm89"]["medium"]
    with pytest.raises(TypeError, match="expected a GpuArch"):
        with arch_mod.target_arch("sm_89"):
            pass
    with pytest.raises(ValueError, match="need a cuda device, got cpu"):
        arch_mod.current_arch(torch.device("cpu"))
    assert SM90.family == "sm90" and SM89.family == "sm89"
    assert arch_mod.GpuArch("sm_120", 120, 170, 101_376).family == "sm89"  # no Hopper shared memory


# Runs in a fresh interpreter without TRITON_INTERPRET (the kernels must be real JITFunctions): a small
# real compile through aot_check.main, then a row forcing the sm_90 FP8 tile (147,456 B) onto sm_89.
_AOT_SCRIPT = r"""
import importlib.util, io, json, sys, contextlib
spec = importlib.util.spec_from_file_location("aot_check", sys.argv[1])
aot = importlib.util.module_from_spec(spec); spec.loader.exec_module(aot)
out = {}
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    out["small_rc"] = aot.main(["--only", "adaln_modulate", "--arch", "sm_89", "--jobs", "1"])
out["small"] = buf.getvalue()
from wam_fast.kernels.fp8_linear import GPU_CONFIGS
large = GPU_CONFIGS["sm90"]["large"]  # 4 stages: 3 x 48 KiB on sm_89
aot.LAUNCHES[:] = [("fp8_linear", "sm90 tile", (774,), lambda k, m: k.fp8_linear(
    aot.fp8(m, 3072), aot.f32(m, 1), aot.fp8(3072, 3072), aot.f32(3072), None, aot.torch.bfloat16, config=large))]
buf = io.StringIO()
with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
    out["big_rc"] = aot.main(["--arch", "sm_89", "--jobs", "1"])
out["big"] = buf.getvalue()
print(json.dumps(out))
"""


def test_aot_compile_report_and_failure():
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("Triton's NVIDIA backend is not installed: no ahead-of-time compile for sm_89/sm_90a")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, os.path.join(ROOT, "benchmarks", "aot_check.py")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["small_rc"] == 0, out["small"]
    lines = [line for line in out["small"].splitlines() if line.startswith("ok ")]
    assert len(lines) == 2, out["small"]  # bf16 and FP8 outputs: two constexpr variants
    for line in lines:
        fields = line.split()
        regs = int(fields[fields.index("regs") + 1])
        spill = int(fields[fields.index("spill") + 1])
        used, limit = (int(v) for v in fields[fields.index("smem") + 1].split("/"))
        assert 16 <= regs <= 255 and spill == 0 and 0 <= used <= limit == SM89.smem_per_block, line
    assert out["big_rc"] == 1, out["big"]
    assert "FAIL fp8_linear" in out["big"] and "shared memory 147456 B > sm_89 limit 101376 B" in out["big"], out["big"]
    assert "aot_check: FAILED" in out["big"]
