"""wam_fast.ops.gated_residual_adaln: r = residual + gate[set] * x and adaln_modulate(r) from every
backend that runs here vs the float32 reference (functional.gated_residual_adaln on .float() copies),
r rounded before the LayerNorm, FP8 output, strided inputs, the custom op, bad input.

Tolerances as in test_adaln_modulate: at most 2x the same-precision torch run's error + a floor.
"""
import importlib

import pytest
import torch

from wam_fast.ops import reference as WF
from wam_fast.ops import use_backend
from wam_fast.ops.registry import triton_reason
from test_adaln_modulate import BACKENDS, CASES, DEVICE, DTYPES, FLOOR, W1, check_fp8, f32, make_inputs, max_err

mod = importlib.import_module("wam_fast.ops.gated_residual_adaln")
gated_residual_adaln = mod.gated_residual_adaln


def make_gated_inputs(B, N, D, mod_index, affine, dtype, device=DEVICE):
    x, shift, scale, weight, bias = make_inputs(B, N, D, mod_index, affine, dtype, device)
    residual = (torch.randn(B, N, D, device=device) * 3).to(dtype)
    gate = torch.randn(B, shift.shape[1], D, device=device).to(dtype)
    return residual, x, gate, shift, scale, weight, bias


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,N,D,segments,mod_index,affine", CASES)
def test_matches_fp32_reference(backend, dtype, B, N, D, segments, mod_index, affine):
    residual, x, gate, shift, scale, weight, bias = make_gated_inputs(B, N, D, mod_index, affine, dtype)
    ref_r, ref_y = WF.gated_residual_adaln(*f32(residual, x, gate, shift, scale), segments, mod_index,
                                           *f32(weight, bias))
    eager_r, eager_y = WF.gated_residual_adaln(residual, x, gate, shift, scale, segments, mod_index, weight, bias)
    with use_backend(backend):
        r, y = gated_residual_adaln(residual, x, gate, shift, scale, segments, mod_index, weight, bias)
    for out in (r, y):
        assert out.dtype == dtype and out.shape == (B, N, D) and out.is_contiguous()
    assert max_err(r, ref_r) <= 2 * max_err(eager_r, ref_r) + FLOOR[dtype]
    assert max_err(y, ref_y) <= 2 * max_err(eager_y, ref_y) + FLOOR[dtype]
    # y is the modulation of the r that was returned (rounded to the dtype before the LayerNorm)
    from_r = WF.adaln_modulate(r.float(), *f32(shift, scale), segments, mod_index, *f32(weight, bias))
    assert max_err(y, from_r) <= 2 * max_err(WF.adaln_modulate(r, shift, scale, segments, mod_index, weight, bias),
                                             from_r) + FLOOR[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,N,D,segments,mod_index,affine", CASES)
def test_fp8_output(backend, dtype, B, N, D, segments, mod_index, affine):
    residual, x, gate, shift, scale, weight, bias = make_gated_inputs(B, N, D, mod_index, affine, dtype)
    with use_backend(backend):
        r, y_fp8, y_scale = gated_residual_adaln(residual, x, gate, shift, scale, segments, mod_index, weight, bias,
                                                 fp8=True)
        r_plain, _ = gated_residual_adaln(residual, x, gate, shift, scale, segments, mod_index, weight, bias)
    assert torch.equal(r, r_plain)
    # quantize_rowwise of the fp32 modulation of the (rounded) r the op returned
    check_fp8(y_fp8, y_scale, WF.adaln_modulate(r.float(), *f32(shift, scale), segments, mod_index,
                                                *f32(weight, bias)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_rounded_before_layernorm(backend):
    # bf16 r near 256 has a step of 2 while gate * x varies by ~0.1: normalizing the unrounded fp32 r
    # gives a very different row than normalizing the bf16 r the unfused model holds.
    B, N, D, segments, mod_index = 1, 49, 64, (8, 35, 6), (1, 0, 0)
    residual = (256 + 4 * torch.randn(B, N, D, device=DEVICE)).to(torch.bfloat16)
    x = torch.randn(B, N, D, device=DEVICE).to(torch.bfloat16)
    gate = (0.1 * torch.randn(B, 2, D, device=DEVICE)).to(torch.bfloat16)
    shift = torch.zeros(B, 2, D, device=DEVICE, dtype=torch.bfloat16)
    scale = torch.zeros(B, 2, D, device=DEVICE, dtype=torch.bfloat16)
    with use_backend(backend):
        r, y = gated_residual_adaln(residual, x, gate, shift, scale, segments, mod_index)
    unrounded = WF.gated_residual(*f32(residual, x, gate), segments, mod_index)
    of_rounded = WF.adaln_modulate(r.float(), *f32(shift, scale), segments, mod_index)
    of_unrounded = WF.adaln_modulate(unrounded, *f32(shift, scale), segments, mod_index)
    assert max_err(of_rounded, of_unrounded) > 0.1  # the case distinguishes the two
    assert max_err(y, of_rounded) <= 0.04  # a bf16 step of values up to ~4
    assert max_err(r, unrounded) <= 2.0  # one bf16 step near 256


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    # gate/shift/scale as the model's (B, S, D) views of one modulation table; residual and x token
    # slices of wider tensors; an x whose last dim is not contiguous is copied by the public function.
    B, N, D, S = 2, 49, 64, 2
    table = torch.randn(B, S, 2, 3, D, device=DEVICE)
    shift, scale, gate = table[:, :, 1, 0], table[:, :, 1, 1] * 0.5, table[:, :, 0, 2]
    residual = torch.randn(B, N + 5, 2 * D, device=DEVICE)[:, 5:, :D]
    segments, mod_index = (8, 35, 6), (1, 0, 0)
    for x in (torch.randn(B, N, 3 * D, device=DEVICE)[..., D:2 * D], torch.randn(B, D, N, device=DEVICE).mT):
        ref_r, ref_y = WF.gated_residual_adaln(residual, x, gate, shift, scale, segments, mod_index)
        with use_backend(backend):
            r, y = gated_residual_adaln(residual, x, gate, shift, scale, segments, mod_index)
            r8, y_fp8, y_scale = gated_residual_adaln(residual, x, gate, shift, scale, segments, mod_index, fp8=True)
        torch.testing.assert_close(r, ref_r, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(r8, ref_r, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=2e-5)
        check_fp8(y_fp8, y_scale, ref_y)


@pytest.mark.parametrize("fp8", [False, True])
def test_opcheck(fp8):
    residual, x, gate, shift, scale, weight, bias = make_gated_inputs(2, 9, 32, (1, 0), "both", torch.float32)
    op = torch.ops.wam_fast.gated_residual_adaln.default
    torch.library.opcheck(op, (residual, x, gate, shift, scale, [3, 6], [1, 0], weight, bias, 1e-5, fp8))
    torch.library.opcheck(op, (residual, x, gate, shift, scale, [9], [1], None, None, 1e-6, fp8))


def _bad(**overrides):
    residual, x, gate, shift, scale, weight, bias = make_gated_inputs(1, 10, 16, (1, 0), "both", torch.float32,
                                                                      device="cpu")
    args = dict(residual=residual, x=x, gate=gate, shift=shift, scale=scale, segments=(4, 6), mod_index=(1, 0),
                weight=weight, bias=bias)
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides,error,match", [
    (dict(residual=torch.randn(1, 10)), ValueError, r"residual must have 3 dims"),
    (dict(x=torch.randn(1, 9, 16)), ValueError, r"x must have residual's shape \(1, 10, 16\), got \(1, 9, 16\)"),
    (dict(x=torch.randn(1, 10, 16, dtype=torch.bfloat16)), TypeError, "x is torch.bfloat16 but residual is"),
    (dict(gate=torch.randn(1, 2, 15)), ValueError, r"gate must have shape \(B=1, S, D=16\)"),
    (dict(gate=torch.randn(1, 3, 16)), ValueError, "same number of sets"),
    (dict(shift=torch.randn(1, 2, 16, device="meta")), ValueError, "shift is on meta but residual is on cpu"),
    (dict(segments=(4, 7)), ValueError, "sum to 11, but x has 10 tokens"),
    (dict(mod_index=(0, 5)), ValueError, r"mod_index entries must be in \[0, 2\)"),
    (dict(weight=torch.randn(16, 1)), ValueError, r"weight must have 1 dims \(16\)"),
    (dict(fp8=1), TypeError, "fp8 must be a bool"),
    (dict(residual=torch.zeros(1, 10, 0), x=torch.zeros(1, 10, 0), gate=torch.zeros(1, 2, 0),
          shift=torch.zeros(1, 2, 0), scale=torch.zeros(1, 2, 0), weight=None, bias=None),
     ValueError, r"residual must have a hidden dim D >= 1"),
])
def test_bad_input(overrides, error, match):
    with pytest.raises(error, match=match):
        gated_residual_adaln(**_bad(**overrides))


def test_backend_rejections_name_the_reason():
    residual, x, gate, shift, scale, _, _ = make_gated_inputs(1, 9, 16, (0,), "none", torch.float32, device="cpu")
    reasons = mod._cuda_rejects(residual, x.mT.contiguous().mT, gate, shift, scale, [1] * 9, [0] * 9,
                                None, None, 1e-5, False)
    assert any("at most 8 segments" in r for r in reasons) and any("contiguous" in r for r in reasons)
    if triton_reason() is None:
        d = torch.float64  # the public function refuses it; the custom op reaches the backends
        with use_backend("triton"), pytest.raises(RuntimeError, match="dtypes must be float32/float16/bfloat16"):
            torch.ops.wam_fast.gated_residual_adaln.default(residual.to(d), x.to(d), gate.to(d), shift.to(d),
                                                            scale.to(d), [9], [0], None, None, 1e-5, False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (W1 shapes)")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_w1_shapes_gpu(backend, dtype):
    residual, x, gate, shift, scale, weight, bias = make_gated_inputs(W1["B"], W1["N"], W1["D"], W1["mod_index"],
                                                                      "both", dtype, device="cuda")
    args = (residual, x, gate, shift, scale, W1["segments"], W1["mod_index"], weight, bias)
    ref_r, ref_y = WF.gated_residual_adaln(*f32(*args[:5]), *args[5:7], *f32(weight, bias))
    eager_r, eager_y = WF.gated_residual_adaln(*args)
    with use_backend(backend):
        r, y = gated_residual_adaln(*args)
        r8, y_fp8, y_scale = gated_residual_adaln(*args, fp8=True)
    assert max_err(r, ref_r) <= 2 * max_err(eager_r, ref_r) + FLOOR[dtype]
    assert max_err(y, ref_y) <= 2 * max_err(eager_y, ref_y) + FLOOR[dtype]
    check_fp8(y_fp8, y_scale, WF.adaln_modulate(r8.float(), *f32(shift, scale), *args[5:7], *f32(weight, bias)))
