"""wam_fast.ops.fp8_linear ((x_fp8 @ W_fp8^T) * x_scale * w_scale + bias from e4m3 operands) against the
float32 reference wam_fast.ops.reference.fp8_linear, on every backend that runs here: Triton in the
interpreter and torch._scaled_mm on CPU (plus its padded and unit-scale GPU branches, run on CPU).
The W1 shapes (M=1256/774, K=3072, Nout up to 12288) run on a GPU only."""
import importlib

import pytest
import torch

from wam_fast.ops import reference as WF
from wam_fast.ops.registry import fallbacks, triton_reason, use_backend

ops = importlib.import_module("wam_fast.ops.fp8_linear")
fp8_linear = ops.fp8_linear

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Products of e4m3 codes are exact in fp32, so on CPU (torch._scaled_mm, the interpreter) the only
# differences from the fp32 reference are the order of the fp32 sums (~1e-6 relative) and the final
# rounding to out_dtype (half an ulp). On a GPU, FP8 tensor cores accumulate with reduced precision
# (fast accumulation, ops.FAST_ACCUM): judged by the relative Frobenius error instead.
HALF_ULP = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
GPU_REL_ERR = 2e-3


def _skip_unavailable(backend):
    if backend == "triton" and triton_reason() is not None:
        pytest.skip(triton_reason())


def _inputs(lead, K, N, bias=True, per_tensor=False, device=DEVICE, bias_dtype=torch.float32):
    x = torch.randn(*lead, K, device=device)
    w = torch.randn(N, K, device=device) / K ** 0.5
    if per_tensor:
        x_scale = (x.abs().amax() / WF.FP8_E4M3_MAX).reshape(())
        x_fp8 = WF.quantize_per_tensor(x, x_scale)
    else:
        x_fp8, x_scale = WF.quantize_rowwise(x)
    w_fp8, w_scale = WF.quantize_rowwise(w)
    b = torch.randn(N, device=device).to(bias_dtype) if bias else None
    return x_fp8, x_scale, w_fp8, w_scale.reshape(N), b


def _check(out, ref, dtype, rel=1e-5):
    if out.is_cuda:
        err = ((out.float() - ref).norm() / ref.norm()).item()
        assert err <= GPU_REL_ERR + HALF_ULP[dtype], f"{dtype}: relative error {err:.3g}"
        return
    bound = (HALF_ULP[dtype] * 1.05 + rel) * ref.abs() + 1e-5
    err = (out.float() - ref).abs()
    assert (err <= bound).all(), f"{dtype}: max |err| {err.max().item():.3g} beyond the rounding bound"


# M (tokens) 49 / 130; K and Nout that are not multiples of 16 or of the block; a deep K
SHAPES = [((1, 49), 64, 96), ((2, 37), 70, 50), ((130,), 256, 40), ((3,), 40, 20)]


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,K,N", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_fp32_reference(backend, lead, K, N, out_dtype):
    _skip_unavailable(backend)
    args = _inputs(lead, K, N)
    ref = WF.fp8_linear(*args, out_dtype=torch.float32)
    with use_backend(backend):
        out = fp8_linear(*args, out_dtype=out_dtype)
    assert out.shape == (*lead, N) and out.dtype == out_dtype and out.device == args[0].device
    _check(out, ref, out_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_tensor_scale_no_bias_and_leading_dims(backend):
    """Static activations: one x scale for the tensor (shape () or (1,)); no bias; 1-D and 3-D x."""
    _skip_unavailable(backend)
    for lead in [(), (5,), (2, 3, 7)]:
        x_fp8, x_scale, w_fp8, w_scale, _ = _inputs(lead, 48, 32, bias=False, per_tensor=True)
        ref = WF.fp8_linear(x_fp8, x_scale, w_fp8, w_scale, None, torch.float32)
        with use_backend(backend):
            for scale in (x_scale, x_scale.reshape(1)):
                out = fp8_linear(x_fp8, scale, w_fp8, w_scale.reshape(-1, 1), out_dtype=torch.float32)
                assert out.shape == (*lead, 32)
                _check(out, ref, torch.float32)


def test_reference_is_dequantized_linear():
    """The reference itself: F.linear of the dequantized operands (guards the semantics of the op)."""
    x_fp8, x_scale, w_fp8, w_scale, b = _inputs((9,), 32, 24)
    want = torch.nn.functional.linear(x_fp8.float() * x_scale, w_fp8.float() * w_scale[:, None], b)
    torch.testing.assert_close(WF.fp8_linear(x_fp8, x_scale, w_fp8, w_scale, b, torch.float32), want,
                               atol=1e-5, rtol=1e-5)


def test_scaled_mm_padding_and_unit_scale_branches(monkeypatch):
    """The CUDA branches of the torch backend, run on CPU: K and Nout padded to 16 (cuBLASLt alignment),
    and sm_89's unit-scale FP8 GEMM with the scales applied afterwards, both equal the reference."""
    args = _inputs((2, 11), 40, 20)  # K = 40 and Nout = 20: not multiples of 16 (on a GPU: the real branches)
    ref = WF.fp8_linear(*args, out_dtype=torch.float32)
    _check(ops.scaled_mm(*args, torch.float32, align=16), ref, torch.float32)
    monkeypatch.setattr(ops, "_rowwise_supported", lambda device, out_dtype: False)
    for dtype in DTYPES:
        _check(ops.scaled_mm(*args, dtype, align=16), ref, dtype)


def test_torch_backend_without_scaled_mm_runs_reference(monkeypatch):
    """Where torch._scaled_mm cannot run, the torch backend computes the reference and logs it once."""
    monkeypatch.setattr(ops, "scaled_mm_reasons", lambda device: ["not on this device"])
    args = _inputs((4,), 32, 16, device=torch.device("cpu"))  # exact: fp32 sums on CPU
    with use_backend("torch"):
        out = fp8_linear(*args, out_dtype=torch.float32)
    assert torch.equal(out, WF.fp8_linear(*args, out_dtype=torch.float32))
    assert any(f["op"] == "fp8_linear" and "not on this device" in f["skipped"][0] for f in fallbacks())


def test_zero_rows_and_zero_weights_give_bias_not_nan():
    """A zero row has amax 0: its scale is the floor 1e-12 and its codes are 0, so the output is the bias."""
    x = torch.randn(6, 32, device=DEVICE)
    x[2] = 0.0
    w = torch.randn(8, 32, device=DEVICE)
    w[5] = 0.0
    x_fp8, x_scale = WF.quantize_rowwise(x)
    w_fp8, w_scale = WF.quantize_rowwise(w)
    floor = torch.tensor(WF.FP8_MIN_SCALE, dtype=torch.float32)
    assert x_scale[2].item() == floor and w_scale[5].item() == floor
    b = torch.randn(8, device=DEVICE)
    for backend in BACKENDS:
        if backend == "triton" and triton_reason() is not None:
            continue
        with use_backend(backend):
            out = fp8_linear(x_fp8, x_scale, w_fp8, w_scale, b, torch.float32)
        assert torch.isfinite(out).all(), backend
        assert torch.equal(out[2], b) and torch.equal(out[:, 5], b[5].expand(6)), backend


def test_consumes_gated_residual_adaln_fp8_output():
    """The fused norm -> FP8 GEMM path on the Triton kernels: the norm kernel's codes and per-token
    scales go straight into fp8_linear; the result equals quantizing the unfused norm output."""
    _skip_unavailable("triton")
    from wam_fast import ops as all_ops

    B, N, D, Nout = 2, 9, 32, 48
    residual, x = torch.randn(B, N, D, device=DEVICE), torch.randn(B, N, D, device=DEVICE)
    gate, shift, scale = (torch.randn(B, 2, D, device=DEVICE) for _ in range(3))
    weight, bias = torch.randn(D, device=DEVICE), torch.randn(D, device=DEVICE)
    w_fp8, w_scale = WF.quantize_rowwise(torch.randn(Nout, D, device=DEVICE) / D ** 0.5)
    b = torch.randn(Nout, device=DEVICE)
    with use_backend("triton"):
        _, y_fp8, y_scale = all_ops.gated_residual_adaln(residual, x, gate, shift, scale, [4, 5], [0, 1], weight,
                                                         bias, 1e-5, fp8=True)
        out = fp8_linear(y_fp8, y_scale, w_fp8, w_scale, b, torch.float32)
    _, y = WF.gated_residual_adaln(residual, x, gate, shift, scale, [4, 5], [0, 1], weight, bias, 1e-5)
    ref = WF.fp8_linear(*WF.quantize_rowwise(y), w_fp8, w_scale, b, torch.float32)
    _check(out, ref, torch.float32)


def test_gpu_configs_compute_correctly():
    """Each distinct GPU table entry (sm_90 and sm_89: 128x256x128, ...) on a small problem with tails in
    M, N and K, and an even K, so the big tiles are checked even where they run interpreted."""
    _skip_unavailable("triton")
    kern = ops.kernel_module("fp8_linear")
    configs = {c: f"{family}/{name}" for family, table in kern.GPU_CONFIGS.items() for name, c in table.items()}
    for config, name in configs.items():
        for K in (136, 128):
            args = _inputs((130,), K, 260)
            out = kern.fp8_linear(*args, torch.float32, config=config)
            assert out.shape == (130, 260), name
            _check(out, WF.fp8_linear(*args, out_dtype=torch.float32), torch.float32)


def test_config_table():
    pytest.importorskip("triton")
    kern = ops.kernel_module("fp8_linear")
    from wam_fast.kernels.gpu_arch import SM89, SM90

    h100, rtx = kern.GPU_CONFIGS["sm90"], kern.GPU_CONFIGS["sm89"]
    big = kern.pick_config(1256, 12288, 3072, interpreting=False, arch=SM90)
    assert big == h100["large"] and big.block_k >= 64
    # N = 3072 at M = 774: the large tile gives 84 tiles on 132 SMs; a narrower one fills them
    assert kern.pick_config(774, 3072, 12288, interpreting=False, arch=SM90) == h100["narrow"]
    assert kern.pick_config(1256, 12288, 3072, interpreting=False, arch=SM89) == rtx["medium"]
    assert kern.pick_config(49, 12288, 3072, interpreting=False, arch=SM89) == rtx["small_m"]
    assert kern.pick_config(1256, 12288, 3072, interpreting=True) == kern.INTERPRETER_CONFIG


def test_strided_x():
    _skip_unavailable("triton")
    x_fp8, x_scale, w_fp8, w_scale, b = _inputs((2, 12), 48, 40)
    wide = torch.zeros(2, 12, 64, dtype=torch.float8_e4m3fn, device=DEVICE)
    wide[..., :48] = x_fp8
    ref = WF.fp8_linear(x_fp8, x_scale, w_fp8, w_scale, b, torch.float32)
    with use_backend("triton"):
        _check(fp8_linear(wide[..., :48], x_scale, w_fp8, w_scale, b, torch.float32), ref, torch.float32)


def test_empty_input():
    x_fp8, x_scale, w_fp8, w_scale, b = _inputs((0,), 32, 16)
    for backend in BACKENDS:
        if backend == "triton" and triton_reason() is not None:
            continue
        with use_backend(backend):
            assert fp8_linear(x_fp8, x_scale, w_fp8, w_scale, b).shape == (0, 16)


def test_auto_dispatch_prefers_triton():
    _skip_unavailable("triton")
    args = _inputs((5,), 32, 16)
    assert ops.BACKENDS.select(*args, torch.bfloat16).name == "triton"


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    # test_schema is left out: it compares inputs with torch.allclose, which has no float8 kernel on CPU
    args = _inputs((2, 7), 32, 48, bias=bias)
    torch.library.opcheck(torch.ops.wam_fast.fp8_linear.default, (*args, torch.bfloat16),
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_below_sm89_is_refused(monkeypatch):
    """A CUDA GPU below compute capability 8.9 (no FP8 tensor cores): a RuntimeError naming the
    capability and the alternative. No GPU here: fake CUDA tensors and a patched capability query."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    with FakeTensorMode():
        x = torch.empty(4, 32, device="cuda", dtype=torch.float8_e4m3fn)
        w = torch.empty(16, 32, device="cuda", dtype=torch.float8_e4m3fn)
        with pytest.raises(RuntimeError, match=r"compute capability >= 8\.9.*has compute capability 8\.0 \(sm_80\)"
                                               r".*Alternative: keep the model in bf16"):
            fp8_linear(x, torch.ones(4, 1, device="cuda"), w, torch.ones(16, device="cuda"))
    for capability in [(8, 9), (9, 0), (10, 0)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        assert ops.fp8_device_error(torch.device("cuda", 0)) is None
    assert ops.fp8_device_error(torch.device("cpu")) is None


def test_bad_inputs():
    x_fp8, x_scale, w_fp8, w_scale, b = _inputs((2, 5), 32, 16)
    with pytest.raises(TypeError, match=r"x must be one of \['torch.float8_e4m3fn'\], got \(2, 5, 32\) torch.float32"):
        fp8_linear(x_fp8.float(), x_scale, w_fp8, w_scale, b)
    with pytest.raises(TypeError, match="weight must be one of"):
        fp8_linear(x_fp8, x_scale, w_fp8.to(torch.bfloat16), w_scale, b)
    with pytest.raises(ValueError, match=r"weight must be \(Nout, K\) with K = x.shape\[-1\] = 32"):
        fp8_linear(x_fp8, x_scale, w_fp8[:, :16], w_scale, b)
    with pytest.raises(ValueError, match="weight must have 2 dims"):
        fp8_linear(x_fp8, x_scale, w_fp8[0], w_scale, b)
    with pytest.raises(ValueError, match=r"x_scale must be \(\.\.\., 1\) = \(2, 5, 1\)"):
        fp8_linear(x_fp8, x_scale[0], w_fp8, w_scale, b)
    with pytest.raises(TypeError, match="x_scale must be one of"):
        fp8_linear(x_fp8, x_scale.to(torch.bfloat16), w_fp8, w_scale, b)
    with pytest.raises(ValueError, match=r"weight_scale must be \(16,\) or \(16, 1\)"):
        fp8_linear(x_fp8, x_scale, w_fp8, w_scale[:8], b)
    with pytest.raises(ValueError, match=r"bias must have shape \(16\)"):
        fp8_linear(x_fp8, x_scale, w_fp8, w_scale, b[:8])
    with pytest.raises(TypeError, match="out_dtype must be one of"):
        fp8_linear(x_fp8, x_scale, w_fp8, w_scale, b, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="at least 1 dim"):
        fp8_linear(x_fp8[0, 0, 0], x_scale, w_fp8, w_scale, b)
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        fp8_linear(x_fp8.cpu(), x_scale.cpu(), w_fp8.to("meta"), w_scale.cpu())
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fp8_linear(x_fp8.tolist(), x_scale, w_fp8, w_scale, b)


# ---- GPU only: W1 shapes ------------------------------------------------------------------------------
@pytest.mark.skipif(not GPU, reason="W1 shapes need a GPU (the interpreter would take minutes)")
@pytest.mark.parametrize("M", [1256, 774])
@pytest.mark.parametrize("K,N", [(3072, 9216), (3072, 3072), (3072, 12288), (12288, 3072)])
def test_w1_shapes_on_gpu(M, K, N):
    args = _inputs((1, M), K, N, bias_dtype=torch.bfloat16)
    ref = WF.fp8_linear(*args, out_dtype=torch.float32)
    for backend in ("triton", "torch"):
        with use_backend(backend):
            out = fp8_linear(*args, out_dtype=torch.bfloat16)
        _check(out, ref, torch.bfloat16)  # fast accumulation over K = 3072..12288 + bf16 rounding
