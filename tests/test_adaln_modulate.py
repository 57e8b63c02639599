"""wam_fast.ops.adaln_modulate: every backend that runs here vs the float32 reference
(functional.adaln_modulate on .float() copies), FP8 output, strided inputs, the custom op, bad input.

Tolerance: a backend's max error vs the fp32 reference is at most 2x the error of the
same-precision torch (eager) run plus a small per-dtype floor (flash-attention's rule). FP8 output is
judged against quantize_rowwise of the fp32 reference: same scales, codes equal almost everywhere
(round-to-nearest-even), and every dequantized value within one e4m3 step.
"""
import importlib

import pytest
import torch

from wam_fast.ops import reference as WF
from wam_fast.ops import use_backend
from wam_fast.ops.registry import cuda_extension_reason, triton_reason

mod = importlib.import_module("wam_fast.ops.adaln_modulate")
adaln_modulate = mod.adaln_modulate

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # absolute, on values of size ~1-10
_CUDA_WHY = cuda_extension_reason() if torch.cuda.is_available() else "no GPU"
BACKENDS = [
    pytest.param("torch"),
    pytest.param("triton", marks=pytest.mark.skipif(triton_reason() is not None, reason=str(triton_reason()))),
    pytest.param("cuda", marks=pytest.mark.skipif(_CUDA_WHY is not None, reason=str(_CUDA_WHY))),
]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (B, N, D, segments, mod_index, affine): non-power-of-two lengths, repeated sets, temporal-like layouts,
# weight/bias absent, given, or only one of them. Small D when N is large, N=49 when D=3072 (interpreter).
CASES = [
    pytest.param(2, 49, 64, (8, 7, 28, 6), (2, 0, 1, 2), "both", id="temporal-B2-N49-D64"),
    pytest.param(1, 1256, 64, (226, 1024, 6), (1, 0, 0), "none", id="W1-segments-N1256-D64"),
    pytest.param(1, 774, 48, (768, 6), (0, 1), "weight", id="N774-D48"),
    pytest.param(1, 49, 3072, (8, 35, 6), (1, 0, 0), "bias", id="N49-D3072"),
]


def make_inputs(B, N, D, mod_index, affine, dtype, device=DEVICE, num_sets=None):
    S = num_sets or max(mod_index) + 1
    x = torch.randn(B, N, D, device=device) * 2 + 0.5
    shift = torch.randn(B, S, D, device=device)
    scale = torch.randn(B, S, D, device=device) * 0.5
    weight = 1 + 0.3 * torch.randn(D, device=device) if affine in ("both", "weight") else None
    bias = 0.3 * torch.randn(D, device=device) if affine in ("both", "bias") else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(shift), cast(scale), cast(weight), cast(bias)


def f32(*tensors):
    return [None if t is None else t.float() for t in tensors]


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def check_fp8(y_fp8, y_scale, reference):
    """FP8 output vs quantize_rowwise of the fp32 reference value (B, N, D)."""
    B, N, D = reference.shape
    assert y_fp8.dtype == torch.float8_e4m3fn and y_fp8.shape == (B, N, D)
    assert y_scale.dtype == torch.float32 and y_scale.shape == (B, N, 1)
    ref_fp8, ref_scale = WF.quantize_rowwise(reference)
    deq = y_fp8.float() * y_scale
    assert not torch.isnan(deq).any() and not torch.isnan(y_scale).any()
    torch.testing.assert_close(y_scale, ref_scale, rtol=2e-5, atol=0)
    # within one e4m3 step (3 mantissa bits; 2**-9 steps below 2**-6) of the reference value
    step = 2.0 ** -3 * reference.abs() + 2.0 ** -9 * ref_scale
    assert ((deq - reference).abs() <= step + 1e-6).all(), (deq - reference).abs().max()
    # round-to-nearest-even on (nearly) the same fp32 value: codes agree except at rare ties
    same = (y_fp8.view(torch.uint8) == ref_fp8.view(torch.uint8)).float().mean().item()
    assert same >= 0.99, f"only {same:.4f} of the FP8 codes match quantize_rowwise"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,N,D,segments,mod_index,affine", CASES)
def test_matches_fp32_reference(backend, dtype, B, N, D, segments, mod_index, affine):
    x, shift, scale, weight, bias = make_inputs(B, N, D, mod_index, affine, dtype)
    reference = WF.adaln_modulate(*f32(x, shift, scale), segments, mod_index, *f32(weight, bias))
    eager = WF.adaln_modulate(x, shift, scale, segments, mod_index, weight, bias)  # same-precision torch
    with use_backend(backend):
        y = adaln_modulate(x, shift, scale, segments, mod_index, weight, bias)
    assert y.dtype == dtype and y.shape == (B, N, D) and y.is_contiguous()
    assert max_err(y, reference) <= 2 * max_err(eager, reference) + FLOOR[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,N,D,segments,mod_index,affine", CASES)
def test_fp8_output(backend, dtype, B, N, D, segments, mod_index, affine):
    x, shift, scale, weight, bias = make_inputs(B, N, D, mod_index, affine, dtype)
    reference = WF.adaln_modulate(*f32(x, shift, scale), segments, mod_index, *f32(weight, bias))
    with use_backend(backend):
        y_fp8, y_scale = adaln_modulate(x, shift, scale, segments, mod_index, weight, bias, fp8=True)
    check_fp8(y_fp8, y_scale, reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_zero_rows_and_rounding_edges(backend):
    # A zero (or constant) x row normalizes to exactly 0, so without bias the modulated row is its
    # set's shift: zero rows must give zero codes and the 1e-12 scale floor (no NaN), and a shift row
    # with amax 448 (scale exactly 1) checks e4m3 round-to-nearest-even bit for bit: ties, mantissa
    # carries into the exponent, subnormals.
    D = 16
    edges = torch.tensor([448.0, 232.0, -232.0, 1.97, 1.99, 0.001, 2.0 ** -10, 3 * 2.0 ** -10, 17.0,
                          2.5 * 2.0 ** -9, 0.0, 240.0, -1.0625, 0.0146, 100.3, -448.0])
    x = torch.randn(1, 12, D)
    x[0, 4:8] = 0.0
    x[0, 8:12] = 3.0
    shift = torch.randn(1, 3, D)
    shift[0, 1] = 0.0
    shift[0, 2] = edges
    scale = torch.randn(1, 3, D)
    segments, mod_index = (4, 4, 2, 2), (0, 1, 1, 2)
    x, shift, scale = x.to(DEVICE), shift.to(DEVICE), scale.to(DEVICE)
    weight = torch.randn(D, device=DEVICE)
    with use_backend(backend):
        y_fp8, y_scale = adaln_modulate(x, shift, scale, segments, mod_index, weight, None, fp8=True)
    assert not torch.isnan(y_fp8.float()).any() and not torch.isnan(y_scale).any()
    assert (y_fp8[0, 4:10].float() == 0).all()
    assert (y_scale[0, 4:10] == 1e-12).all()
    assert (y_scale[0, 10:] == 1.0).all()
    expected, _ = WF.quantize_rowwise(edges.to(DEVICE))
    for row in (10, 11):
        assert torch.equal(y_fp8[0, row].view(torch.uint8), expected.view(torch.uint8)), (
            y_fp8[0, row].float(), expected.float())
    reference = WF.adaln_modulate(x, shift, scale, segments, mod_index, weight, None)
    check_fp8(y_fp8, y_scale, reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    # The model passes (B, S, D) views of its modulation table (row stride 6 D) and may pass token
    # slices; a last dim that is not contiguous is copied by the public function.
    B, N, D, S = 2, 49, 64, 2
    table = torch.randn(B, S, 2, 3, D, device=DEVICE)
    shift, scale = table[:, :, 0, 0], table[:, :, 1, 1] * 0.5
    wide = torch.randn(B, N + 3, 2 * D, device=DEVICE)
    x_slice = wide[:, 3:, D:]                                          # unit last-dim stride, other strides free
    x_t = torch.randn(B, D, N, device=DEVICE).transpose(1, 2)           # last dim not contiguous
    segments, mod_index = (8, 35, 6), (1, 0, 0)
    for x in (x_slice, x_t):
        reference = WF.adaln_modulate(x, shift, scale, segments, mod_index)
        with use_backend(backend):
            y = adaln_modulate(x, shift, scale, segments, mod_index)
            y_fp8, y_scale = adaln_modulate(x, shift, scale, segments, mod_index, fp8=True)
        assert y.is_contiguous()
        torch.testing.assert_close(y, reference, rtol=1e-5, atol=2e-5)
        check_fp8(y_fp8, y_scale, reference)


def test_wrong_modulation_set_is_caught():
    # Mutation guard: the same inputs with another mod_index give a different result, so a kernel that
    # ignored the token -> set map (or read set 0 everywhere) fails test_matches_fp32_reference.
    x, shift, scale, weight, bias = make_inputs(1, 49, 64, (1, 0, 0), "both", torch.float32)
    a = adaln_modulate(x, shift, scale, (8, 35, 6), (1, 0, 0), weight, bias)
    b = adaln_modulate(x, shift, scale, (8, 35, 6), (0, 0, 0), weight, bias)
    assert max_err(a[:, :8], b[:, :8]) > 0.1 and max_err(a[:, 8:], b[:, 8:]) == 0


def test_token_sets_built_once_per_layout():
    first = mod.token_sets_int32((2, 3), (1, 0), DEVICE)
    assert first is mod.token_sets_int32((2, 3), (1, 0), DEVICE)
    assert first.dtype == torch.int32 and first.tolist() == [1, 1, 0, 0, 0]


@pytest.mark.parametrize("fp8", [False, True])
def test_opcheck(fp8):
    x, shift, scale, weight, bias = make_inputs(2, 9, 32, (1, 0), "both", torch.float32)
    args = (x, shift, scale, [3, 6], [1, 0], weight, bias, 1e-5, fp8)
    torch.library.opcheck(torch.ops.wam_fast.adaln_modulate.default, args)
    torch.library.opcheck(torch.ops.wam_fast.adaln_modulate.default, (x, shift, scale, [3, 6], [1, 0], None,
                                                                       None, 1e-6, fp8))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, shift, scale = torch.empty(2, 5, 8, dtype=torch.bfloat16), torch.empty(2, 2, 8, dtype=torch.bfloat16), \
            torch.empty(2, 2, 8, dtype=torch.bfloat16)
        y = adaln_modulate(x, shift, scale, (2, 3), (0, 1))
        y_fp8, y_scale = adaln_modulate(x, shift, scale, (2, 3), (0, 1), fp8=True)
    assert y.shape == (2, 5, 8) and y.dtype == torch.bfloat16
    assert y_fp8.dtype == torch.float8_e4m3fn and y_scale.shape == (2, 5, 1) and y_scale.dtype == torch.float32


def _bad(**overrides):
    x, shift, scale, weight, bias = make_inputs(1, 10, 16, (1, 0), "both", torch.float32, device="cpu")
    args = dict(x=x, shift=shift, scale=scale, segments=(4, 6), mod_index=(1, 0), weight=weight, bias=bias)
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides,error,match", [
    (dict(x=torch.randn(10, 16)), ValueError, r"x must have 3 dims.*got \(10, 16\)"),
    (dict(shift=torch.randn(1, 2, 8)), ValueError, r"shift must have shape \(B=1, S, D=16\)"),
    (dict(scale=torch.randn(1, 3, 16)), ValueError, "same number of sets"),
    (dict(shift=torch.randn(1, 2, 16, dtype=torch.float16)), TypeError,
     "shift is torch.float16 but x is torch.float32"),
    (dict(x=torch.randint(0, 3, (1, 10, 16))), TypeError, "x must be one of"),
    (dict(shift=torch.randn(1, 2, 16, device="meta")), ValueError, "shift is on meta but x is on cpu"),
    (dict(segments=(4, 5)), ValueError, r"sum to 9, but x has 10 tokens"),
    (dict(mod_index=(1,)), ValueError, "one modulation set per segment"),
    (dict(mod_index=(2, 0)), ValueError, r"in \[0, 2\)"),
    (dict(weight=torch.randn(8)), ValueError, r"weight must have shape \(16\)"),
    (dict(bias=torch.randn(16, dtype=torch.bfloat16)), TypeError, "bias is torch.bfloat16"),
    (dict(eps=-1.0), ValueError, "eps must be a non-negative float"),
    (dict(fp8="yes"), TypeError, "fp8 must be a bool"),
    (dict(shift=None), TypeError, "shift must be a torch.Tensor"),
    # D = 0: a norm over no features (the Triton path divided by D: ZeroDivisionError)
    (dict(x=torch.zeros(1, 10, 0), shift=torch.zeros(1, 2, 0), scale=torch.zeros(1, 2, 0), weight=None, bias=None),
     ValueError, r"x must have a hidden dim D >= 1, got shape \(1, 10, 0\)"),
])
def test_bad_input(overrides, error, match):
    with pytest.raises(error, match=match):
        adaln_modulate(**_bad(**overrides))


def test_backend_rejections_name_the_reason():
    x, shift, scale, weight, bias = make_inputs(1, 9, 16, (0,), "none", torch.float32, device="cpu")
    many = (1,) * 9
    assert any("at most 8 segments" in r for r in mod._cuda_rejects(x, shift, scale, list(many), [0] * 9,
                                                                      None, None, 1e-5, False))
    assert any("contiguous" in r for r in mod._cuda_rejects(x[:, :, :8], shift[..., :8], scale[..., :8], [9], [0],
                                                            None, None, 1e-5, False))
    wide = torch.zeros(1, 1, mod.MAX_TRITON_D + 1)
    if triton_reason() is None:
        with use_backend("triton"), pytest.raises(RuntimeError, match="hidden dim 16385 > 16384"):
            adaln_modulate(wide, wide, wide, (1,), (0,))
    with use_backend("torch"):  # the reference takes it
        assert adaln_modulate(wide, wide, wide, (1,), (0,)).shape == wide.shape


# ---- GPU only: W1 shapes, every backend against each other and the reference -----------------------
W1 = dict(B=1, N=1256, D=3072, segments=(226, 1024, 6), mod_index=(1, 0, 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (W1 shapes)")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_w1_shapes_gpu(backend, dtype):
    x, shift, scale, weight, bias = make_inputs(W1["B"], W1["N"], W1["D"], W1["mod_index"], "both", dtype,
                                                device="cuda")
    args = (x, shift, scale, W1["segments"], W1["mod_index"], weight, bias)
    reference = WF.adaln_modulate(*f32(x, shift, scale), W1["segments"], W1["mod_index"], *f32(weight, bias))
    eager = WF.adaln_modulate(*args)
    with use_backend(backend):
        y = adaln_modulate(*args)
        y_fp8, y_scale = adaln_modulate(*args, fp8=True)
    assert max_err(y, reference) <= 2 * max_err(eager, reference) + FLOOR[dtype]
    check_fp8(y_fp8, y_scale, reference)
