"""The CUDA kernels of csrc/ and their torch binding (wam_fast._C).

Four layers, so most of it runs on a machine without a GPU:
- nvcc: every csrc/*.cu compiles for sm_89 and sm_90a, as in .ci/run's first phase (about 20 s here,
  two files at a time). Skipped without nvcc.
- host emulation: g++ builds the kernels of csrc/*.cu unchanged (WAM_HOST_EMULATION: one std::thread
  per CUDA thread, barriers for __syncthreads and shuffles; csrc/host_emulation.h) into a shared
  library that ctypes calls on CPU tensors. That runs the real indexing, vectorised / scalar / long-row
  paths, reductions, segment lookup, RoPE and FP8 rounding against wam_fast.ops.reference in
  float32, with NaN guards around every input and sentinel guards around every output (an
  out-of-bounds read poisons the result, an out-of-bounds write changes a guard), checks the alignment
  of every wide access, and the C entry points' argument validation. Skipped (with the reason)
  without g++ or the CUDA headers.
- the binding's calling convention: binding.cpp's exported names and argument lists, parsed, must be
  the convention of the Python glue (and the glue's calls in wam_fast/ops/*.py must match it), so the
  two cannot drift; setup.py builds binding.cpp with every kernel. binding.cpp itself is syntax-checked
  against torch's headers by .ci/run (about 45 s of g++: too slow for here).
- on a GPU with the extension built: wam_fast._C on W1 shapes (N=1256, D=3072; H=48, hd=64) against
  the float32 references, FP8 outputs, a CUDA graph capture, and bad arguments raising RuntimeError.
"""
from __future__ import annotations

import ast
import ctypes
import importlib.util
import math
import os
import pathlib
import re
import shutil
import subprocess

import pytest
import torch

from wam_fast.ops import reference as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"

# The calling convention of wam_fast._C (the Python glue in wam_fast/ops/<op>.py calls these).
CONVENTION = {
    "adaln_modulate": ["x", "shift", "scale", "weight", "bias", "segment_lens", "mod_index", "eps", "y",
                       "y_scale", "stream"],
    "gated_residual_adaln": ["residual", "x", "gate", "shift", "scale", "weight", "bias", "segment_lens",
                             "mod_index", "eps", "r", "y", "y_scale", "stream"],
    "qk_norm_rope": ["q", "k", "q_weight", "q_bias", "k_weight", "k_bias", "cos", "sin", "rope_start",
                     "rope_end", "eps", "q_out", "k_out", "stream"],
}

WAM_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
CUDA_ERROR_INVALID_VALUE = 1  # cudaErrorInvalidValue
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# |kernel - fp32 reference| <= atol + rtol * |reference|: the kernels round once, from fp32.
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}


# ---- the binding's calling convention (CPU) ------------------------------------------------------
def _binding_defs():
    """{name: [py::arg names]} from the m.def(...) calls of csrc/binding.cpp."""
    text = (CSRC / "binding.cpp").read_text()
    module = re.search(r"PYBIND11_MODULE\(\s*(\w+)\s*,\s*m\s*\)\s*\{(.*)\}", text, re.S)
    assert module, "binding.cpp has no PYBIND11_MODULE(..., m) { ... }"
    defs = {}
    for name, body in re.findall(r'm\.def\(\s*"(\w+)"(.*?)\);', module.group(2), re.S):
        defs[name] = re.findall(r'py::arg\("(\w+)"\)', body)
    return text, module.group(1), defs


def _cpp_params(text, name):
    """Parameter names of the C++ function `void name(...)` in binding.cpp."""
    match = re.search(r"\bvoid\s+" + name + r"\s*\((.*?)\)\s*\{", text, re.S)
    assert match, f"binding.cpp defines no `void {name}(...)`"
    return [re.findall(r"(\w+)\s*$", p.strip())[0] for p in match.group(1).split(",")]


def test_binding_exports_the_calling_convention():
    text, module_name, defs = _binding_defs()
    assert module_name in ("_C", "TORCH_EXTENSION_NAME"), module_name
    assert defs == CONVENTION, f"binding.cpp exports {defs}, the convention is {CONVENTION}"
    for name, args in CONVENTION.items():
        # py::arg names label the C++ parameters in order: a swapped pair would pass silently.
        assert _cpp_params(text, name) == args, name


def test_binding_includes_no_cuda_torch_headers():
    # CI syntax-checks binding.cpp against the CPU torch wheel, which lacks c10/cuda and ATen/cuda.
    includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', (CSRC / "binding.cpp").read_text())
    assert not [i for i in includes if i.startswith(("c10/cuda", "ATen/cuda", "cuda.h"))], includes


def _glue_calls():
    """(file, op, call) for every `_C.<op>(...)` in wam_fast/ops/*.py."""
    for path in sorted((ROOT / "wam_fast" / "ops").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in CONVENTION and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "_C"):
                yield path.name, node.func.attr, node


def test_python_glue_calls_match_the_binding():
    calls = list(_glue_calls())
    # every op of the binding is called from its Python glue (a renamed call must not go unchecked)
    assert sorted({op for _, op, _ in calls}) == sorted(CONVENTION)
    for path, op, call in calls:
        names = CONVENTION[op]
        assert not any(isinstance(a, ast.Starred) for a in call.args), f"{path}: _C.{op}(*args)"
        keywords = [k.arg for k in call.keywords]
        assert None not in keywords, f"{path}: _C.{op}(**kwargs)"
        assert len(call.args) + len(keywords) == len(names), (
            f"{path}:{call.lineno}: _C.{op} takes {len(names)} arguments {names}, "
            f"the call passes {len(call.args) + len(keywords)}")
        assert sorted(keywords) == sorted(names[len(call.args):]), (
            f"{path}:{call.lineno}: keywords {keywords} do not match {names[len(call.args):]}")


def test_setup_builds_binding_and_every_kernel(monkeypatch):
    # What setup.py would hand to CUDAExtension on a GPU machine (stand-ins for torch's builders).
    spec = importlib.util.spec_from_file_location("wam_fast_setup_csrc", ROOT / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    captured = {}

    class FakeExtension:
        def __init__(self, **kwargs):
            captured.update(kwargs)

    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setattr(setup, "cuda_build_reason", lambda *a, **k: None)
    monkeypatch.setattr(cpp_extension, "CUDAExtension", FakeExtension)
    monkeypatch.setattr(cpp_extension, "BuildExtension", object)
    ext_modules, cmdclass = setup.cuda_extension()
    assert len(ext_modules) == 1 and captured["name"] == "wam_fast._C"
    expected = ["csrc/binding.cpp"] + sorted(f"csrc/{p.name}" for p in CSRC.glob("*.cu"))
    assert [s.replace(os.sep, "/") for s in captured["sources"]] == expected
    assert os.path.realpath(CSRC) in [os.path.realpath(d) for d in captured["include_dirs"]]


# ---- nvcc: every kernel compiles for the GPUs we target (as .ci/run does) --------------------------
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found (the CUDA toolkit is not installed)")
def test_kernels_compile_with_nvcc(tmp_path):
    cmds = [["nvcc", "-c", "-std=c++17", "-O3", f"-I{CSRC}", "-gencode", "arch=compute_89,code=sm_89",
             "-gencode", "arch=compute_90a,code=sm_90a", str(cu), "-o", str(tmp_path / f"{cu.stem}.o")]
            for cu in sorted(CSRC.glob("*.cu"))]
    assert cmds, "no csrc/*.cu"
    failures, running = [], []
    for cmd in cmds + [None]:  # two at a time (2 cores)
        while running and (cmd is None or len(running) >= 2):
            proc, args = running.pop(0)
            _, err = proc.communicate(timeout=600)
            if proc.returncode != 0:
                failures.append(f"{' '.join(args)}\n{err[-3000:]}")
        if cmd is not None:
            running.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), cmd))
    assert not failures, "\n\n".join(failures)


# ---- host emulation of the kernels (CPU) -----------------------------------------------------------
def _cuda_include_dir():
    """The CUDA toolkit's include dir (cuda_fp8.h), or None."""
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True,
                                 text=True, timeout=60).stderr
            candidates += re.findall(r'^#\$ INCLUDES="-I([^"]+)"', out, re.M)
        except (OSError, subprocess.SubprocessError):
            pass
        candidates.append(str(pathlib.Path(nvcc).resolve().parents[1] / "include"))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "include"))
    candidates.append("/usr/local/cuda/include")
    return next((c for c in candidates if os.path.exists(os.path.join(c, "cuda_fp8.h"))), None)


EMU_MAIN = """
#include "common.cuh"
extern "C" int wam_emu_errors() { return wam_emu::error_count.exchange(0); }
"""


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    include = _cuda_include_dir()
    if cxx is None or include is None:
        pytest.skip(f"host emulation needs g++ and the CUDA headers (g++: {cxx}, CUDA include: {include})")
    out = tmp_path_factory.mktemp("wam_emu")
    (out / "emu_main.cpp").write_text(EMU_MAIN)
    lib_path = out / "libwam_emu.so"
    cmd = [cxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-w",
           "-DWAM_HOST_EMULATION", f"-I{CSRC}", "-isystem", include, "-x", "c++",
           *sorted(str(p) for p in CSRC.glob("*.cu")), str(out / "emu_main.cpp"), "-o", str(lib_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"host emulation build failed:\n{' '.join(cmd)}\n{result.stderr[-4000:]}"
    lib = ctypes.CDLL(str(lib_path))
    P, I64, I32, FL, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_int
    lib.wam_adaln_modulate_fwd.argtypes = [INT, P, P, P, P, P, P, P, I64, I64, I64, I64, P, P, I32, FL, P]
    lib.wam_gated_residual_adaln_fwd.argtypes = [INT, P, P, P, P, P, P, P, P, P, P, I64, I64, I64, I64, P,
                                                 P, I32, FL, P]
    lib.wam_qk_norm_rope_fwd.argtypes = [INT, P, P, P, P, P, P, P, P, P, P, P, P, I64, I64, I64, I64, I64,
                                         I64, FL, P]
    for fn in (lib.wam_adaln_modulate_fwd, lib.wam_gated_residual_adaln_fwd, lib.wam_qk_norm_rope_fwd,
               lib.wam_emu_errors):
        fn.restype = INT
    return lib


GUARD = 64  # elements each side; 64 x (1 to 4 bytes) keeps the interior 16-byte aligned


class Guarded:
    """A tensor inside a larger buffer: NaN guards around an input (an out-of-bounds read poisons the
    result), sentinel guards around an output (an out-of-bounds write changes them). `offset`
    elements shift the tensor off 16-byte alignment (the kernels then take their scalar path)."""

    def __init__(self, shape, dtype, value=None, offset=0):
        numel = math.prod(shape)
        self.buf = torch.empty(numel + 2 * GUARD + offset, dtype=dtype)
        self.buf.view(torch.uint8).fill_(0x7F if dtype == torch.float8_e4m3fn else 0)
        if dtype != torch.float8_e4m3fn:
            self.buf.fill_(float("nan"))  # inputs: NaN guards; outputs: NaN until written
        self.start = GUARD + offset
        self.t = self.buf[self.start:self.start + numel].view(shape)
        if value is not None:
            self.t.copy_(value)
        self.before = self.buf.view(torch.uint8).clone()

    def guards_intact(self):
        now = self.buf.view(torch.uint8)
        size = self.buf.element_size()
        lo, hi = self.start * size, (self.start + self.t.numel()) * size
        return torch.equal(now[:lo], self.before[:lo]) and torch.equal(now[hi:], self.before[hi:])

    def fully_written(self):
        t = self.t.view(torch.uint8) == 0x7F if self.t.dtype == torch.float8_e4m3fn else self.t.isnan()
        return not bool(t.any())


def _ptr(g):
    if g is None:
        return None
    return ctypes.c_void_p((g.t if isinstance(g, Guarded) else g).data_ptr())


def _int32_array(values):
    return (ctypes.c_int32 * max(len(values), 1))(*values)


def _inputs(B, N, D, S, dtype, affine=(True, True), offset=0, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(dtype)

    return {
        "residual": Guarded((B, N, D), dtype, rnd(B, N, D, scale=2.0, shift=0.5), offset),
        "x": Guarded((B, N, D), dtype, rnd(B, N, D, scale=1.5, shift=1.0), offset),
        "gate": Guarded((B, S, D), dtype, rnd(B, S, D, scale=0.5), offset),
        "shift": Guarded((B, S, D), dtype, rnd(B, S, D), offset),
        "scale": Guarded((B, S, D), dtype, rnd(B, S, D, scale=0.2), offset),
        "weight": Guarded((D,), dtype, rnd(D, scale=0.3, shift=1.0), offset) if affine[0] else None,
        "bias": Guarded((D,), dtype, rnd(D, scale=0.3), offset) if affine[1] else None,
    }


def _float(g):
    return None if g is None else g.t.float()


def _assert_close(actual, expected, dtype, what):
    atol, rtol = TOL[dtype]
    err = (actual.float() - expected).abs()
    bound = atol + rtol * expected.abs()
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (
        f"{what} ({dtype}): |diff| {err.flatten()[worst].item():.3g} > {bound.flatten()[worst].item():.3g} "
        f"at flat index {worst.item()} (max |diff| {err.max().item():.3g})")


def _assert_fp8(y_fp8, y_scale, expected, what):
    """FP8 output vs functional.quantize_rowwise of the fp32 reference: scales to float32 precision, codes
    equal or (rarely, a value on a rounding boundary) one step apart."""
    ref_q, ref_scale = F.quantize_rowwise(expected)
    torch.testing.assert_close(y_scale, ref_scale, rtol=1e-5, atol=0, msg=lambda m: f"{what} scale: {m}")
    codes, ref_codes = y_fp8.view(torch.uint8).int(), ref_q.view(torch.uint8).int()
    differ = codes != ref_codes
    assert differ.float().mean().item() <= 1e-3, f"{what}: {differ.sum().item()} FP8 codes differ"
    both_zero = (y_fp8.float() == 0) & (ref_q.float() == 0)
    assert bool(((codes - ref_codes).abs() <= 1)[differ & ~both_zero].all()), f"{what}: codes more than one step apart"


def _run_rows(emu, inputs, B, N, D, S, segments, mod_index, dtype, residual, fp8, eps=1e-5, out_offset=0,
              r_offset=None):
    y = Guarded((B, N, D), torch.float8_e4m3fn if fp8 else dtype, offset=out_offset)
    y_scale = Guarded((B, N, 1), torch.float32) if fp8 else None
    r = Guarded((B, N, D), dtype, offset=out_offset if r_offset is None else r_offset) if residual else None
    common = (_ptr(inputs["shift"]), _ptr(inputs["scale"]), _ptr(inputs["weight"]), _ptr(inputs["bias"]))
    tail = (B, N, D, S, _int32_array(segments), _int32_array(mod_index), len(segments), eps, None)
    if residual:
        rc = emu.wam_gated_residual_adaln_fwd(WAM_DTYPE[dtype], _ptr(inputs["residual"]), _ptr(inputs["x"]),
                                              _ptr(inputs["gate"]), *common, _ptr(r), _ptr(y), _ptr(y_scale),
                                              *tail)
    else:
        rc = emu.wam_adaln_modulate_fwd(WAM_DTYPE[dtype], _ptr(inputs["x"]), *common, _ptr(y), _ptr(y_scale),
                                        *tail)
    assert rc == 0, f"kernel returned cudaError {rc}"
    assert emu.wam_emu_errors() == 0, "emulation recorded a barrier/shuffle/launch error"
    for name, g in [("y", y), ("y_scale", y_scale), ("r", r)] + list(inputs.items()):
        if g is not None:
            assert g.guards_intact(), f"{name}: a write outside the tensor"
    for name, g in (("y", y), ("y_scale", y_scale), ("r", r)):
        if g is not None:
            assert g.fully_written(), f"{name}: not every element written (or a NaN from an out-of-bounds read)"
    return r, y, y_scale


# (B, N, D, segments, mod_index, S, pointer offset): each exercises one launch configuration.
ROW_CASES = {
    "vec-1item": (1, 5, 3072, (2, 3), (1, 0), 2, 0),  # 16-bit: 384 vectors, one per thread; fp32: two
    "vec-4items": (1, 2, 12288, (1, 1), (0, 1), 2, 0),  # 16-bit: 4 items; fp32: 3072 vectors, 8 items
    "scalar-odd-D": (2, 3, 1001, (1, 0, 2), (2, 0, 1), 3, 0),  # D % 8 != 0: one element per unit
    "misaligned": (1, 3, 3072, (3,), (0,), 1, 1),  # pointers off 16 bytes: scalar, 8 items
    "long-row-loop": (1, 2, 5003, (1, 1), (1, 1), 2, 0),  # > 512 x 8 scalar units: the re-reading kernel
    "w1-layout": (1, 1256, 24, (226, 1024, 6), (0, 1, 1), 2, 0),  # W1's token layout, small D
    "eight-segments": (1, 49, 64, (5, 0, 7, 9, 1, 11, 6, 10), (3, 0, 2, 1, 3, 0, 2, 1), 4, 0),
}


@pytest.mark.parametrize("fp8", [False, True], ids=["out-dtype", "out-fp8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(ROW_CASES))
def test_emulated_adaln_modulate(emu, case, dtype, fp8):
    B, N, D, segments, mod_index, S, offset = ROW_CASES[case]
    if case == "w1-layout" and (dtype, fp8) != (torch.bfloat16, True):
        pytest.skip("1256 emulated blocks are slow: the bfloat16 FP8 run covers the layout")
    if case == "eight-segments" and dtype == torch.float16:
        pytest.skip("layout case: float32 and bfloat16 suffice")
    inputs = _inputs(B, N, D, S, dtype, offset=offset)
    _, y, y_scale = _run_rows(emu, inputs, B, N, D, S, segments, mod_index, dtype, False, fp8, out_offset=offset)
    expected = F.adaln_modulate(_float(inputs["x"]), _float(inputs["shift"]), _float(inputs["scale"]), segments,
                                mod_index, _float(inputs["weight"]), _float(inputs["bias"]), 1e-5)
    if fp8:
        _assert_fp8(y.t, y_scale.t, expected, f"adaln_modulate[{case}]")
    else:
        _assert_close(y.t, expected, dtype, f"adaln_modulate[{case}]")


@pytest.mark.parametrize("fp8", [False, True], ids=["out-dtype", "out-fp8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["vec-1item", "scalar-odd-D", "misaligned", "long-row-loop", "eight-segments"])
def test_emulated_gated_residual_adaln(emu, case, dtype, fp8):
    B, N, D, segments, mod_index, S, offset = ROW_CASES[case]
    inputs = _inputs(B, N, D, S, dtype, offset=offset)
    r, y, y_scale = _run_rows(emu, inputs, B, N, D, S, segments, mod_index, dtype, True, fp8, out_offset=offset)
    # r: one rounding of the fp32 residual + gate * x (mul, then add), i.e. exactly the fp32 reference rounded.
    r_expected = F.gated_residual(_float(inputs["residual"]), _float(inputs["x"]), _float(inputs["gate"]),
                                  segments, mod_index)
    assert torch.equal(r.t, r_expected.to(dtype)), f"gated_residual_adaln[{case}]: r is not the rounded reference"
    # y: of the rounded r, as the unfused model.
    expected = F.adaln_modulate(r.t.float(), _float(inputs["shift"]), _float(inputs["scale"]), segments,
                                mod_index, _float(inputs["weight"]), _float(inputs["bias"]), 1e-5)
    if fp8:
        _assert_fp8(y.t, y_scale.t, expected, f"gated_residual_adaln[{case}]")
    else:
        _assert_close(y.t, expected, dtype, f"gated_residual_adaln[{case}]")


@pytest.mark.parametrize("fp8", [False, True], ids=["out-dtype", "out-fp8"])
@pytest.mark.parametrize("misaligned", ["residual", "x", "gate", "shift", "scale", "weight", "bias", "r", "y"])
def test_emulated_one_misaligned_pointer_takes_the_scalar_path(emu, misaligned, fp8):
    # Any one pointer off 16 bytes must switch the whole launch to scalar accesses (the emulation
    # records a misaligned wide access as an error).
    B, N, D, S, dtype = 1, 2, 128, 2, torch.bfloat16
    inputs = _inputs(B, N, D, S, dtype)
    if misaligned in inputs:
        inputs[misaligned] = Guarded(tuple(inputs[misaligned].t.shape), dtype, inputs[misaligned].t, offset=1)
    r, y, y_scale = _run_rows(emu, inputs, B, N, D, S, (1, 1), (1, 0), dtype, True, fp8,
                              out_offset=1 if misaligned == "y" else 0, r_offset=1 if misaligned == "r" else 0)
    expected = F.adaln_modulate(r.t.float(), _float(inputs["shift"]), _float(inputs["scale"]), (1, 1), (1, 0),
                                _float(inputs["weight"]), _float(inputs["bias"]), 1e-5)
    if fp8:
        _assert_fp8(y.t, y_scale.t, expected, f"misaligned {misaligned}")
    else:
        _assert_close(y.t, expected, dtype, f"misaligned {misaligned}")


@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)], ids=str)
def test_emulated_adaln_without_affine(emu, affine):
    B, N, D, S = 1, 3, 256, 2
    inputs = _inputs(B, N, D, S, torch.bfloat16, affine=affine)
    _, y, _ = _run_rows(emu, inputs, B, N, D, S, (1, 2), (1, 0), torch.bfloat16, False, False, eps=1e-6)
    expected = F.adaln_modulate(_float(inputs["x"]), _float(inputs["shift"]), _float(inputs["scale"]), (1, 2),
                                (1, 0), _float(inputs["weight"]), _float(inputs["bias"]), 1e-6)
    _assert_close(y.t, expected, torch.bfloat16, f"adaln_modulate affine={affine}")


def test_emulated_fp8_edge_rows(emu):
    # A constant row (LayerNorm -> 0, y = shift) with shift = 0 gives an all-zero row: scale 1e-12, no NaN.
    # A row with large values saturates nothing (the scale maps amax to 448 exactly).
    B, N, D, S = 1, 2, 64, 1
    inputs = _inputs(B, N, D, S, torch.float32, affine=(False, False))
    inputs["x"].t[0, 0] = 3.0
    inputs["shift"].t.zero_()
    inputs["scale"].t.zero_()
    inputs["x"].t[0, 1] *= 1e4
    _, y, y_scale = _run_rows(emu, inputs, B, N, D, S, (2,), (0,), torch.float32, False, True)
    assert y_scale.t[0, 0, 0].item() == pytest.approx(1e-12) and bool((y.t[0, 0].float() == 0).all())
    assert y.t[0, 1].float().abs().max().item() == 448.0


# ---- qk_norm_rope under emulation ------------------------------------------------------------------
def _rope_tables(n, hd, seed=1):
    gen = torch.Generator().manual_seed(seed)
    angles = torch.rand(n, hd // 2, generator=gen) * 6.0
    angles = angles.repeat_interleave(2, dim=-1)
    return angles.cos().contiguous(), angles.sin().contiguous()


def _qk_views(B, H, N, hd, dtype, layout, gen):
    """q and k as the kernel may see them: contiguous, views of a fused (B, N, 3, H, hd) projection, or
    off 16-byte alignment. Returns the owning Guarded buffers (for guard checks) and the views."""
    if layout == "contiguous":
        gq = Guarded((B, H, N, hd), dtype, torch.randn(B, H, N, hd, generator=gen).to(dtype))
        gk = Guarded((B, H, N, hd), dtype, torch.randn(B, H, N, hd, generator=gen).to(dtype))
        return [gq, gk], gq.t, gk.t
    if layout == "misaligned":
        gq = Guarded((B, H, N, hd), dtype, torch.randn(B, H, N, hd, generator=gen).to(dtype), offset=1)
        gk = Guarded((B, H, N, hd), dtype, torch.randn(B, H, N, hd, generator=gen).to(dtype), offset=3)
        return [gq, gk], gq.t, gk.t
    if layout == "padded-rows":  # aligned q and k bases, rows 2 hd + 20 elements apart: misaligned rows
        width = 2 * hd + 20
        g = Guarded((B, H, N, width), dtype, torch.randn(B, H, N, width, generator=gen).to(dtype))
        return [g], g.t[..., :hd], g.t[..., hd + 8:2 * hd + 8]
    assert layout == "fused-qkv"
    g = Guarded((B, N, 3, H, hd), dtype, (torch.randn(B, N, 3, H, hd, generator=gen) * 2 + 0.5).to(dtype))
    return [g], g.t[:, :, 0].permute(0, 2, 1, 3), g.t[:, :, 1].permute(0, 2, 1, 3)


def _run_qk(emu, q, k, weights, cos, sin, rope_start, rope_end, eps, dtype):
    B, H, N, hd = q.shape
    q_out = Guarded((B, H, N, hd), dtype)
    k_out = Guarded((B, H, N, hd), dtype)
    strides = [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in (q, k)]
    rc = emu.wam_qk_norm_rope_fwd(WAM_DTYPE[dtype], _ptr(q), strides[0], _ptr(k), strides[1],
                                  *[_ptr(w) for w in weights], _ptr(cos), _ptr(sin), _ptr(q_out), _ptr(k_out),
                                  B, H, N, hd, rope_start, rope_end, eps, None)
    assert rc == 0, f"kernel returned cudaError {rc}"
    assert emu.wam_emu_errors() == 0, "emulation recorded a barrier/shuffle/launch error"
    for name, g in (("q_out", q_out), ("k_out", k_out)):
        assert g.guards_intact(), f"{name}: a write outside the tensor"
        assert g.fully_written(), f"{name}: not every element written (or a NaN from an out-of-bounds read)"
    return q_out.t, k_out.t


# (B, H, N, hd, layout, rope range as (start, end), affine)
QK_CASES = {
    "hd64-fused": (2, 3, 7, 64, "fused-qkv", (2, 6), True),  # 16-bit: 8 lanes x one 16-byte vector per row
    "hd128-contig": (1, 2, 5, 128, "contiguous", (0, 5), True),
    "hd256-fused": (1, 2, 4, 256, "fused-qkv", (1, 3), True),  # fp32: 32 lanes x 2 vectors
    "hd256-misaligned": (1, 1, 3, 256, "misaligned", (0, 2), True),  # pairs: 32 lanes x 4 items
    "hd48-contig": (1, 2, 9, 48, "contiguous", (3, 9), False),  # 16-bit: 6 vectors on 8 lanes
    "hd64-padded": (1, 2, 5, 64, "padded-rows", (1, 4), True),  # row strides not a multiple of 16 bytes
    "hd6-norope": (2, 2, 5, 6, "contiguous", (2, 2), True),  # tiny rows, empty rope range
    "hd64-w1-layout": (1, 1, 1256, 64, "fused-qkv", (226, 1250), True),  # W1's video slice
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(QK_CASES))
def test_emulated_qk_norm_rope(emu, case, dtype):
    B, H, N, hd, layout, (rope_start, rope_end), affine = QK_CASES[case]
    if case == "hd64-w1-layout" and dtype != torch.bfloat16:
        pytest.skip("layout case: bfloat16 suffices")
    gen = torch.Generator().manual_seed(2)
    owners, q, k = _qk_views(B, H, N, hd, dtype, layout, gen)
    weights = [Guarded((hd,), dtype, (torch.randn(hd, generator=gen) * s + m).to(dtype)) if affine else None
               for s, m in ((0.2, 1.0), (0.2, 0.0), (0.2, 1.0), (0.2, 0.0))]
    cos, sin = _rope_tables(rope_end - rope_start, hd)
    gcos, gsin = Guarded(tuple(cos.shape), torch.float32, cos), Guarded(tuple(sin.shape), torch.float32, sin)
    q_out, k_out = _run_qk(emu, q, k, weights, gcos.t, gsin.t, rope_start, rope_end, 1e-6, dtype)
    for g in owners + [w for w in weights if w is not None] + [gcos, gsin]:
        assert g.guards_intact()
    wf = [None if w is None else w.t.float() for w in weights]
    q_ref, k_ref = F.qk_norm_rope(q.float(), k.float(), *wf, cos, sin, rope_start, rope_end, 1e-6)
    _assert_close(q_out, q_ref, dtype, f"qk_norm_rope[{case}] q")
    _assert_close(k_out, k_ref, dtype, f"qk_norm_rope[{case}] k")


# ---- argument validation of the C entry points (emulation build) ------------------------------------
def test_emulated_entry_points_refuse_inconsistent_arguments(emu):
    B, N, D, S = 1, 4, 64, 2
    inputs = _inputs(B, N, D, S, torch.float32)
    y = torch.empty(B, N, D)

    def adaln(segments, mod_index, n_seg=None, D_=D, S_=S, eps=1e-5, x=inputs["x"], dtype=0):
        return emu.wam_adaln_modulate_fwd(dtype, _ptr(x), _ptr(inputs["shift"]), _ptr(inputs["scale"]),
                                          None, None, _ptr(y), None, B, N, D_, S_, _int32_array(segments),
                                          _int32_array(mod_index), len(segments) if n_seg is None else n_seg,
                                          eps, None)

    assert adaln((1, 3), (0, 1)) == 0
    assert adaln((1, 2), (0, 1)) == CUDA_ERROR_INVALID_VALUE  # sums to 3, not N = 4
    assert adaln((1, 3), (0, 2)) == CUDA_ERROR_INVALID_VALUE  # set 2 of S = 2
    assert adaln((1, 3), (0, -1)) == CUDA_ERROR_INVALID_VALUE
    assert adaln((5, -1), (0, 1)) == CUDA_ERROR_INVALID_VALUE  # negative length
    assert adaln((1,) * 4 + (0,) * 5, (0,) * 9) == CUDA_ERROR_INVALID_VALUE  # 9 > WAM_MAX_SEGMENTS
    assert adaln((), (), n_seg=0) == CUDA_ERROR_INVALID_VALUE
    assert adaln((1, 3), (0, 1), D_=0) == CUDA_ERROR_INVALID_VALUE
    assert adaln((1, 3), (0, 1), S_=0) == CUDA_ERROR_INVALID_VALUE
    assert adaln((1, 3), (0, 1), eps=float("nan")) == CUDA_ERROR_INVALID_VALUE
    assert adaln((1, 3), (0, 1), x=None) == CUDA_ERROR_INVALID_VALUE
    assert adaln((1, 3), (0, 1), dtype=7) == CUDA_ERROR_INVALID_VALUE
    assert emu.wam_gated_residual_adaln_fwd(
        0, None, _ptr(inputs["x"]), _ptr(inputs["gate"]), _ptr(inputs["shift"]), _ptr(inputs["scale"]), None,
        None, _ptr(y), _ptr(y), None, B, N, D, S, _int32_array((4,)), _int32_array((0,)), 1, 1e-5,
        None) == CUDA_ERROR_INVALID_VALUE  # no residual

    q = torch.randn(1, 2, 3, 8)
    out = torch.empty_like(q)
    cos = torch.ones(3, 8)
    strides = (ctypes.c_int64 * 3)(*q.stride()[:3])

    def qk(hd=8, rope=(0, 3), N_=3, cos_=cos):
        return emu.wam_qk_norm_rope_fwd(0, _ptr(q), strides, _ptr(q), strides, None, None, None, None,
                                        _ptr(cos_), _ptr(cos_), _ptr(out), _ptr(out), 1, 2, N_, hd, rope[0],
                                        rope[1], 1e-6, None)

    assert qk() == 0
    assert qk(hd=7) == CUDA_ERROR_INVALID_VALUE  # odd head_dim
    assert qk(hd=258) == CUDA_ERROR_INVALID_VALUE  # > 256
    assert qk(rope=(0, 4)) == CUDA_ERROR_INVALID_VALUE  # rope_end > N
    assert qk(rope=(2, 1)) == CUDA_ERROR_INVALID_VALUE
    assert qk(cos_=None) == CUDA_ERROR_INVALID_VALUE  # tables needed for a non-empty range
    assert qk(rope=(1, 1), cos_=None) == 0  # ... and not for an empty one
    assert emu.wam_emu_errors() == 0


# ---- wam_fast._C on a GPU ----------------------------------------------------------------------------
def _extension_reason():
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if importlib.util.find_spec("wam_fast._C") is None:
        return "wam_fast._C is not built (pip install --no-build-isolation -e . on a GPU machine)"
    return None


needs_extension = pytest.mark.skipif(_extension_reason() is not None, reason=str(_extension_reason()))

W1_SEGMENTS, W1_MOD_INDEX = (226, 1024, 6), (0, 1, 1)


def _stream():
    return torch.cuda.current_stream().cuda_stream


def _w1_rows(dtype, B=2, N=1256, D=3072, S=2):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale + shift).to(dtype)

    return dict(residual=rnd(B, N, D, scale=2.0), x=rnd(B, N, D, shift=0.5), gate=rnd(B, S, D, scale=0.5),
                shift=rnd(B, S, D), scale=rnd(B, S, D, scale=0.2), weight=rnd(D, scale=0.2, shift=1.0),
                bias=rnd(D, scale=0.2))


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


@needs_extension
@pytest.mark.parametrize("fp8", [False, True], ids=["out-dtype", "out-fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_adaln_modulate_w1(dtype, fp8):
    from wam_fast import _C

    t = _w1_rows(dtype)
    B, N, D = t["x"].shape
    y = torch.empty(B, N, D, device="cuda", dtype=torch.float8_e4m3fn if fp8 else dtype)
    y_scale = torch.empty(B, N, 1, device="cuda") if fp8 else None
    _C.adaln_modulate(t["x"], t["shift"], t["scale"], t["weight"], t["bias"], list(W1_SEGMENTS),
                      list(W1_MOD_INDEX), 1e-5, y, y_scale, _stream())
    torch.cuda.synchronize()
    f = {k: v.float() for k, v in t.items()}
    expected = F.adaln_modulate(f["x"], f["shift"], f["scale"], W1_SEGMENTS, W1_MOD_INDEX, f["weight"], f["bias"])
    if fp8:
        _assert_fp8(y, y_scale, expected, "adaln_modulate W1")
    else:
        _assert_close(y, expected, dtype, "adaln_modulate W1")
        eager = F.adaln_modulate(t["x"], t["shift"], t["scale"], W1_SEGMENTS, W1_MOD_INDEX, t["weight"], t["bias"])
        assert _max_err(y, expected) <= 2 * _max_err(eager, expected) + 1e-5  # no worse than eager torch


@needs_extension
@pytest.mark.parametrize("fp8", [False, True], ids=["out-dtype", "out-fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_gated_residual_adaln_w1(dtype, fp8):
    from wam_fast import _C

    t = _w1_rows(dtype)
    B, N, D = t["x"].shape
    r = torch.empty_like(t["residual"])
    y = torch.empty(B, N, D, device="cuda", dtype=torch.float8_e4m3fn if fp8 else dtype)
    y_scale = torch.empty(B, N, 1, device="cuda") if fp8 else None
    _C.gated_residual_adaln(t["residual"], t["x"], t["gate"], t["shift"], t["scale"], t["weight"], t["bias"],
                            list(W1_SEGMENTS), list(W1_MOD_INDEX), 1e-5, r, y, y_scale, _stream())
    torch.cuda.synchronize()
    f = {k: v.float() for k, v in t.items()}
    r_expected = F.gated_residual(f["residual"], f["x"], f["gate"], W1_SEGMENTS, W1_MOD_INDEX)
    assert torch.equal(r, r_expected.to(dtype))
    expected = F.adaln_modulate(r.float(), f["shift"], f["scale"], W1_SEGMENTS, W1_MOD_INDEX, f["weight"],
                                f["bias"])
    if fp8:
        _assert_fp8(y, y_scale, expected, "gated_residual_adaln W1")
    else:
        _assert_close(y, expected, dtype, "gated_residual_adaln W1")


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_qk_norm_rope_w1(dtype):
    from wam_fast import _C

    B, H, N, hd = 2, 48, 1256, 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(B, N, 3, H, hd, generator=gen, device="cuda").to(dtype)
    q, k = qkv[:, :, 0].permute(0, 2, 1, 3), qkv[:, :, 1].permute(0, 2, 1, 3)  # views of the fused projection
    weights = [(torch.randn(hd, generator=gen, device="cuda") * 0.2 + m).to(dtype) for m in (1.0, 0.0, 1.0, 0.0)]
    cos, sin = F.rope_cos_sin(range(4), 16, 16, (16, 24, 24), device="cuda")
    rope_start, rope_end = 226, 1250
    q_out, k_out = torch.empty(B, H, N, hd, device="cuda", dtype=dtype), torch.empty(B, H, N, hd, device="cuda",
                                                                                     dtype=dtype)
    _C.qk_norm_rope(q, k, *weights, cos, sin, rope_start, rope_end, 1e-6, q_out, k_out, _stream())
    torch.cuda.synchronize()
    q_ref, k_ref = F.qk_norm_rope(q.float(), k.float(), *[w.float() for w in weights], cos, sin, rope_start,
                                  rope_end, 1e-6)
    _assert_close(q_out, q_ref, dtype, "qk_norm_rope W1 q")
    _assert_close(k_out, k_ref, dtype, "qk_norm_rope W1 k")
    q_eager, k_eager = F.qk_norm_rope(q, k, *weights, cos, sin, rope_start, rope_end, 1e-6)
    assert _max_err(q_out, q_ref) <= 2 * _max_err(q_eager, q_ref) + 1e-5  # no worse than eager torch
    assert _max_err(k_out, k_ref) <= 2 * _max_err(k_eager, k_ref) + 1e-5


@needs_extension
def test_gpu_adaln_modulate_in_cuda_graph():
    from wam_fast import _C

    t = _w1_rows(torch.bfloat16, B=1)
    y = torch.empty_like(t["x"])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        _C.adaln_modulate(t["x"], t["shift"], t["scale"], None, None, list(W1_SEGMENTS), list(W1_MOD_INDEX),
                          1e-5, y, None, stream.cuda_stream)
    t["x"].normal_()
    graph.replay()
    torch.cuda.synchronize()
    expected = F.adaln_modulate(t["x"].float(), t["shift"].float(), t["scale"].float(), W1_SEGMENTS, W1_MOD_INDEX)
    _assert_close(y, expected, torch.bfloat16, "adaln_modulate replayed from a CUDA graph")


@needs_extension
def test_gpu_bad_arguments_raise():
    from wam_fast import _C

    x = torch.randn(1, 4, 64, device="cuda")
    shift = torch.randn(1, 2, 64, device="cuda")
    y = torch.empty_like(x)
    args = dict(x=x, shift=shift, scale=shift, weight=None, bias=None, segment_lens=[1, 3], mod_index=[0, 1],
                eps=1e-5, y=y, y_scale=None, stream=_stream())
    _C.adaln_modulate(**args)  # the baseline call is fine

    def bad(match, **change):
        with pytest.raises(RuntimeError, match=match):
            _C.adaln_modulate(**{**args, **change})

    bad("segment_lens must sum to N=4", segment_lens=[1, 2])
    bad("segment_lens must have 1 to 8 entries", segment_lens=[1] * 4 + [0] * 5, mod_index=[0] * 9)
    bad(r"mod_index\[1\] must be a modulation set in \[0, S=2\)", mod_index=[0, 2])
    bad("shift must be .*Float.*got Half", shift=shift.half())
    bad(r"scale must have shape \[1, 2, 64\]", scale=torch.randn(1, 2, 32, device="cuda"))
    bad("x must be contiguous", x=torch.randn(1, 64, 4, device="cuda").transpose(1, 2))
    bad("x must be float32, float16 or bfloat16", x=x.double(), y=y.double())
    bad("shift must be a CUDA tensor", shift=shift.cpu())
    bad("y must be .*Float8_e4m3fn", y_scale=torch.empty(1, 4, 1, device="cuda"))
    bad(r"weight must have shape \[64\]", weight=torch.ones(63, device="cuda"))

    q = torch.randn(1, 2, 3, 8, device="cuda")
    qk = dict(q=q, k=q, q_weight=None, q_bias=None, k_weight=None, k_bias=None, cos=torch.ones(3, 8, device="cuda"),
              sin=torch.ones(3, 8, device="cuda"), rope_start=0, rope_end=3, eps=1e-6, q_out=torch.empty_like(q),
              k_out=torch.empty_like(q), stream=_stream())
    _C.qk_norm_rope(**qk)
    with pytest.raises(RuntimeError, match="head_dim must be even"):
        q7 = torch.randn(1, 2, 3, 7, device="cuda")
        _C.qk_norm_rope(**{**qk, "q": q7, "k": q7, "q_out": torch.empty_like(q7), "k_out": torch.empty_like(q7)})
    with pytest.raises(RuntimeError, match="cos must be .*Float"):
        _C.qk_norm_rope(**{**qk, "cos": torch.ones(3, 8, device="cuda", dtype=torch.float16)})
    with pytest.raises(RuntimeError, match=r"rope_end <= N=3"):
        _C.qk_norm_rope(**{**qk, "rope_end": 4})
    with pytest.raises(RuntimeError, match="last-dim stride 1"):
        _C.qk_norm_rope(**{**qk, "q": torch.randn(1, 2, 8, 3, device="cuda").transpose(2, 3)})
