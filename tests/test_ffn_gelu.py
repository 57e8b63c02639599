"""wam_fast.ops.ffn_gelu (gelu_tanh(x @ W^T + b), the FFN's first GEMM with a fused epilogue) against the
float32 reference wam_fast.ops.reference.ffn_gelu, on every backend that runs here (Triton in the
interpreter on CPU). The W1 shapes (M=1256/774, K=3072, Nout=12288) run on a GPU only."""
import importlib

import pytest
import torch

from wam_fast.ops import reference as WF
from wam_fast.ops.registry import triton_reason, use_backend

ops = importlib.import_module("wam_fast.ops.ffn_gelu")
ffn_gelu = ops.ffn_gelu

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
BACKENDS = ["torch", "triton"]

# |out - ref| <= atol + rtol * |ref|: fp32 is IEEE (no TF32) so it is tight enough to tell the tanh GELU
# from the erf one (they differ by up to 5e-4); 16-bit outputs are ~2x their half-ulp rounding.
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (5e-4, 1.5e-3), torch.bfloat16: (4e-3, 1e-2)}
HALF_ULP = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}  # relative, normal numbers
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}  # for "<= 2x torch's error"


def _skip_unavailable(backend):
    if backend == "triton" and triton_reason() is not None:
        pytest.skip(triton_reason())


def _inputs(lead, K, N, dtype, bias=True, device=DEVICE, x_scale=1.0):
    x = (torch.randn(*lead, K, device=device) * x_scale).to(dtype)
    w = (torch.randn(N, K, device=device) / K ** 0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    return x, w, b


def _reference(x, w, b):
    return WF.ffn_gelu(x.float(), w.float(), None if b is None else b.float())


def _check(out, ref, dtype):
    atol, rtol = TOL[dtype]
    err = (out.float() - ref).abs()
    excess = (err - (atol + rtol * ref.abs())).max().item()
    assert excess <= 0, f"{dtype}: max |err| {err.max().item():.3g} exceeds atol {atol} + rtol {rtol} * |ref| by {excess:.3g}"
    return err.max().item()


# M (tokens) 1256 / 774 / 49; a large K (3072) with few tokens; K and Nout that are not block multiples
SHAPES = [((1, 1256), 64, 160), ((1, 774), 96, 100), ((1, 49), 3072, 96), ((2, 49), 70, 100)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead,K,N", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_fp32_reference(backend, lead, K, N, dtype):
    _skip_unavailable(backend)
    x, w, b = _inputs(lead, K, N, dtype)
    ref = _reference(x, w, b)
    with use_backend(backend):
        out = ffn_gelu(x, w, b)
    assert out.shape == (*lead, N) and out.dtype == dtype and out.device == x.device
    err = _check(out, ref, dtype)
    # and at most 2x the error of the same-precision eager run (+ a floor: fp32 eager is the reference)
    torch_err = (WF.ffn_gelu(x, w, b).float() - ref).abs().max().item()
    assert err <= 2 * torch_err + FLOOR[dtype], f"{backend} error {err:.3g} > 2 x torch's {torch_err:.3g}"
    if backend == "triton" and dtype in HALF_ULP:
        # one fp32 epilogue and one round-to-nearest to 16 bits: within half an ulp of the fp32 result
        bound = 1.05 * HALF_ULP[dtype] * ref.abs() + 2e-5
        assert ((out.float() - ref).abs() <= bound).all(), "16-bit output is not the fp32 result rounded to nearest"


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_and_any_leading_dims(backend):
    _skip_unavailable(backend)
    for lead in [(), (37,), (2, 3, 29)]:
        x, w, _ = _inputs(lead, 72, 80, torch.float32, bias=False)
        with use_backend(backend):
            out = ffn_gelu(x, w)  # bias defaults to None
        assert out.shape == (*lead, 80)
        _check(out, _reference(x, w, None), torch.float32)


def test_strided_inputs():
    """x as a slice of a wider tensor (row stride != K), x that cannot be viewed as (M, K) (a copy), a
    weight stored transposed (strides (1, N)) and a strided bias."""
    _skip_unavailable("triton")
    K, N = 70, 100
    wide = torch.randn(2, 33, K + 10, device=DEVICE)
    x_sliced = wide[..., :K]                                          # viewable, row stride K + 10
    x_permuted = torch.randn(33, 2, K, device=DEVICE).transpose(0, 1)  # not viewable as (66, K)
    w_t = (torch.randn(K, N, device=DEVICE) / K ** 0.5).t()           # (N, K) with strides (1, N)
    b = torch.randn(2 * N, device=DEVICE)[::2]                         # strided bias
    with use_backend("triton"):
        for x in (x_sliced, x_permuted):
            out = ffn_gelu(x, w_t, b)
            assert out.is_contiguous() and out.shape == (2, 33, N)
            _check(out, _reference(x, w_t, b), torch.float32)


def test_large_preactivations_do_not_overflow():
    """Pre-activations of |z| up to ~200: tanh via exp(2u) would be inf/inf = NaN (u = 0.8 (z + 0.045 z^3))."""
    _skip_unavailable("triton")
    x, w, b = _inputs((1, 49), 64, 96, torch.float32, x_scale=60.0)
    z = torch.nn.functional.linear(x, w, b)
    u = 0.7978845608028654 * (z + 0.044715 * z ** 3)
    naive = (torch.exp(2 * u) - 1) / (torch.exp(2 * u) + 1)
    assert z.abs().max() > 100 and naive.isnan().any()  # the case really breaks a naive tanh
    ref = _reference(x, w, b)
    for dtype in (torch.float32, torch.bfloat16):
        with use_backend("triton"):
            out = ffn_gelu(x.to(dtype), w.to(dtype), b.to(dtype))
        assert torch.isfinite(out).all()
        assert (out.float()[z < -10] == 0).all()  # gelu(z) -> 0 for very negative z (|value| < 1e-20)
        if dtype == torch.float32:
            _check(out, ref, dtype)


def test_gpu_configs_compute_correctly():
    """Each distinct GPU table entry (sm_90 and sm_89: 128x256x64, ...), run on a small problem with tails
    in M, N and K (and an even K), so the big tiles are checked even where they run interpreted."""
    _skip_unavailable("triton")
    kern = ops._kernel_module()
    configs = {c: f"{family}/{name}" for family, table in kern.GPU_CONFIGS.items() for name, c in table.items()}
    for config, name in configs.items():
        for K in (136, 128):
            x, w, b = _inputs((130,), K, 260, torch.float32)
            out = kern.ffn_gelu(x, w, b, config=config)
            assert out.shape == (130, 260), name
            _check(out, _reference(x, w, b), torch.float32)


def test_config_table():
    pytest.importorskip("triton")
    kern = ops._kernel_module()
    from wam_fast.kernels.gpu_arch import SM89, SM90

    h100, rtx = kern.GPU_CONFIGS["sm90"], kern.GPU_CONFIGS["sm89"]
    big = kern.pick_config(1256, 12288, 3072, torch.bfloat16, interpreting=False, arch=SM90)
    assert big == h100["16bit_large"] and big.block_m * big.block_n >= 128 * 128
    assert kern.pick_config(774, 12288, 3072, torch.bfloat16, interpreting=False, arch=SM90) == big
    assert kern.pick_config(1256, 12288, 3072, torch.bfloat16, interpreting=False, arch=SM89) == rtx["16bit_medium"]
    assert kern.pick_config(49, 12288, 3072, torch.float16, interpreting=False, arch=SM90) == h100["16bit_small_m"]
    assert kern.pick_config(1256, 12288, 3072, torch.float32, interpreting=False, arch=SM89) == rtx["fp32"]
    assert kern.pick_config(1256, 12288, 3072, torch.bfloat16, interpreting=True) == kern.INTERPRETER_CONFIG


def test_empty_input():
    x, w, b = _inputs((0,), 16, 8, torch.float32)
    for backend in BACKENDS:
        if backend == "triton" and triton_reason() is not None:
            continue
        with use_backend(backend):
            assert ffn_gelu(x, w, b).shape == (0, 8)


def test_auto_dispatch_prefers_triton():
    _skip_unavailable("triton")
    x, w, b = _inputs((5,), 8, 8, torch.float32)
    assert ops.BACKENDS.select(x, w, b).name == "triton"


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    x, w, b = _inputs((2, 7), 24, 40, torch.float32, bias=bias)
    torch.library.opcheck(torch.ops.wam_fast.ffn_gelu.default, (x, w, b))


def test_bad_inputs():
    x, w, b = _inputs((2, 5), 16, 8, torch.float32)
    with pytest.raises(ValueError, match=r"weight must be \(Nout, K\) with K = x.shape\[-1\] = 16"):
        ffn_gelu(x, torch.randn(8, 12), b)
    with pytest.raises(ValueError, match="weight must have 2 dims"):
        ffn_gelu(x, torch.randn(16), b)
    with pytest.raises(ValueError, match="weight must have 2 dims"):
        ffn_gelu(x, torch.randn(1, 8, 16), b)
    with pytest.raises(ValueError, match=r"bias must have shape \(8\)"):
        ffn_gelu(x, w, torch.randn(9))
    with pytest.raises(ValueError, match="bias must have 1 dims"):
        ffn_gelu(x, w, torch.randn(1, 8))
    with pytest.raises(TypeError, match="weight is torch.float16 but x is torch.float32"):
        ffn_gelu(x, w.half(), b)
    with pytest.raises(TypeError, match="bias is torch.bfloat16 but x is torch.float32"):
        ffn_gelu(x, w, b.bfloat16())
    with pytest.raises(TypeError, match="x must be one of"):
        ffn_gelu(x.to(torch.int32), w, b)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ffn_gelu(x.tolist(), w, b)
    with pytest.raises(ValueError, match="at least 1 dim"):
        ffn_gelu(torch.tensor(1.0), w, b)
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        ffn_gelu(x.cpu(), w.to("meta"), None)
    with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
        ffn_gelu(x.cpu(), w.cpu(), b.to("meta"))


# ---- GPU only: W1 shapes ------------------------------------------------------------------------------
@pytest.mark.skipif(not GPU, reason="W1 shapes need a GPU (the interpreter would take minutes)")
@pytest.mark.parametrize("M", [1256, 774, 49])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_w1_shapes_on_gpu(M, dtype):
    x, w, b = _inputs((1, M), 3072, 12288, dtype)
    ref = _reference(x, w, b)
    torch_err = (WF.ffn_gelu(x, w, b).float() - ref).abs().max().item()
    for backend in ("triton", "torch"):
        with use_backend(backend):
            out = ffn_gelu(x, w, b)
        err = _check(out, ref, dtype)
        assert err <= 2 * torch_err + FLOOR[dtype], f"{backend}: {err:.3g} vs torch {torch_err:.3g}"
