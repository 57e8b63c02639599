"""wam_fast.ops.gated_residual: out = residual + gate[set] * x (the block's final residual) from every
backend that runs here vs the float32 reference (reference.gated_residual on .float() copies), strided
inputs, D wider than one column block, one kernel launch, the custom op, bad input.

Tolerance as in test_gated_residual_adaln: at most 2x the same-precision torch run's error + a floor.
"""
import importlib

import pytest
import torch

from wam_fast.ops import reference as WF
from wam_fast.ops import use_backend
from wam_fast.ops.registry import kernel_module, triton_reason
from test_adaln_modulate import DEVICE, DTYPES, FLOOR, W1, f32, max_err

mod = importlib.import_module("wam_fast.ops.gated_residual")
gated_residual = mod.gated_residual

BACKENDS = [
    pytest.param("torch"),
    pytest.param("triton", marks=pytest.mark.skipif(triton_reason() is not None, reason=str(triton_reason()))),
]
# (B, N, D, segments, mod_index): 49 / 1256 / 774 tokens, repeated sets, D not a power of two, D = 3072
# (three 1024-column blocks on a GPU)
CASES = [
    pytest.param(2, 49, 64, (8, 7, 28, 6), (2, 0, 1, 2), id="temporal-B2-N49-D64"),
    pytest.param(1, 1256, 40, (226, 1024, 6), (1, 0, 0), id="W1-segments-N1256-D40"),
    pytest.param(1, 774, 48, (768, 6), (0, 1), id="N774-D48"),
    pytest.param(1, 49, 3072, (8, 35, 6), (1, 0, 0), id="N49-D3072"),
    pytest.param(3, 33, 1100, (33,), (0,), id="B3-N33-D1100"),
]


def make_inputs(B, N, D, mod_index, dtype, device=DEVICE):
    S = max(mod_index) + 1
    residual = (torch.randn(B, N, D, device=device) * 3).to(dtype)
    x = torch.randn(B, N, D, device=device).to(dtype)
    gate = torch.randn(B, S, D, device=device).to(dtype)
    return residual, x, gate


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,N,D,segments,mod_index", CASES)
def test_matches_fp32_reference(backend, dtype, B, N, D, segments, mod_index):
    residual, x, gate = make_inputs(B, N, D, mod_index, dtype)
    ref = WF.gated_residual(*f32(residual, x, gate), segments, mod_index)
    eager = WF.gated_residual(residual, x, gate, segments, mod_index)
    with use_backend(backend):
        out = gated_residual(residual, x, gate, segments, mod_index)
    assert out.dtype == dtype and out.shape == (B, N, D) and out.is_contiguous()
    assert max_err(out, ref) <= 2 * max_err(eager, ref) + FLOOR[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    # gate as the model's (B, S, D) view of its modulation table; residual a token slice of a wider
    # tensor; an x whose last dim is not contiguous is copied by the public function.
    B, N, D, S = 2, 49, 64, 2
    gate = torch.randn(B, S, 2, 3, D, device=DEVICE)[:, :, 0, 2]
    residual = torch.randn(B, N + 5, 2 * D, device=DEVICE)[:, 5:, :D]
    segments, mod_index = (8, 35, 6), (1, 0, 0)
    for x in (torch.randn(B, N, 3 * D, device=DEVICE)[..., D:2 * D], torch.randn(B, D, N, device=DEVICE).mT):
        ref = WF.gated_residual(residual, x, gate, segments, mod_index)
        with use_backend(backend):
            out = gated_residual(residual, x, gate, segments, mod_index)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(triton_reason() is not None, reason=str(triton_reason()))
def test_one_triton_launch_per_call(monkeypatch):
    kernels = kernel_module("gated_residual")
    jit = kernels._gated_residual_kernel
    grids = []

    class Counting:
        def __getitem__(self, grid):
            grids.append(grid)
            return jit[grid]

    monkeypatch.setattr(kernels, "_gated_residual_kernel", Counting())
    residual, x, gate = make_inputs(2, 49, 3072, (1, 0, 0), torch.bfloat16)
    with use_backend("triton"):
        gated_residual(residual, x, gate, (8, 35, 6), (1, 0, 0))
    assert len(grids) == 1


def test_opcheck():
    residual, x, gate = make_inputs(2, 9, 32, (1, 0), torch.float32)
    op = torch.ops.wam_fast.gated_residual.default
    torch.library.opcheck(op, (residual, x, gate, [3, 6], [1, 0]))
    torch.library.opcheck(op, (residual, x, gate, [9], [1]))


def _bad(**overrides):
    residual, x, gate = make_inputs(1, 10, 16, (1, 0), torch.float32, device="cpu")
    args = dict(residual=residual, x=x, gate=gate, segments=(4, 6), mod_index=(1, 0))
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides,error,match", [
    (dict(residual=torch.randn(1, 10)), ValueError, r"residual must have 3 dims"),
    (dict(residual=torch.randn(1, 10, 16, dtype=torch.float64)), TypeError, r"residual must be one of .*float64"),
    (dict(x=torch.randn(1, 9, 16)), ValueError, r"x must have residual's shape \(1, 10, 16\), got \(1, 9, 16\)"),
    (dict(x=torch.randn(1, 10, 16, dtype=torch.bfloat16)), TypeError, "x is torch.bfloat16 but residual is"),
    (dict(gate=torch.randn(1, 2, 15)), ValueError, r"gate must have shape \(B=1, S, D=16\)"),
    (dict(gate=torch.randn(1, 2, 16, device="meta")), ValueError, "gate is on meta but residual is on cpu"),
    (dict(segments=(4, 7)), ValueError, "sum to 11, but x has 10 tokens"),
    (dict(mod_index=(0, 5)), ValueError, r"mod_index entries must be in \[0, 2\)"),
    (dict(mod_index=(0,)), ValueError, r"mod_index needs one modulation set per segment"),
    (dict(residual=torch.zeros(1, 10, 0), x=torch.zeros(1, 10, 0), gate=torch.zeros(1, 2, 0)),
     ValueError, r"residual must have a hidden dim D >= 1"),
])
def test_bad_input(overrides, error, match):
    with pytest.raises(error, match=match):
        gated_residual(**_bad(**overrides))


def test_backend_rejections_name_the_reason():
    residual, x, gate = make_inputs(1, 9, 16, (0,), torch.float32, device="cpu")
    assert any("unit stride" in r for r in mod._triton_rejects(residual, x.mT.contiguous().mT, gate, [9], [0]))
    if triton_reason() is None:
        d = torch.float64  # the public function refuses it; the custom op reaches the backends
        with use_backend("triton"), pytest.raises(RuntimeError, match="dtypes must be float32/float16/bfloat16"):
            torch.ops.wam_fast.gated_residual.default(residual.to(d), x.to(d), gate.to(d), [9], [0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (W1 shapes)")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_w1_shapes_gpu(backend, dtype):
    residual, x, gate = make_inputs(W1["B"], W1["N"], W1["D"], W1["mod_index"], dtype, device="cuda")
    args = (residual, x, gate, W1["segments"], W1["mod_index"])
    ref = WF.gated_residual(*f32(residual, x, gate), *args[3:])
    eager = WF.gated_residual(*args)
    with use_backend(backend):
        out = gated_residual(*args)
    assert max_err(out, ref) <= 2 * max_err(eager, ref) + FLOOR[dtype]
