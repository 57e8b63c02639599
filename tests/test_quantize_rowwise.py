"""wam_fast.ops.quantize_rowwise: per-row FP8 e4m3 codes + scales of x or gelu_tanh(x), every backend
that runs here vs the float32 reference (reference.quantize_rowwise / quantize_rowwise_gelu on the
fp32 value): scales to ~1e-6 relative, codes compared after dequantization (within one e4m3 step of
the fp32 value) and equal almost everywhere; zero rows, inf/NaN rows, strided inputs, rows longer
than one block (the kernel loops), the custom op, bad input. And the kernel budget: one launch per
call, FP8Linear on a tensor = 2 ops, FP8FeedForward = 2 fp8_linear + 1 quantize_rowwise.
"""
import importlib

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from wam_fast import quant
from wam_fast.ops import reference as WF
from wam_fast.ops import use_backend
from wam_fast.ops.registry import kernel_module, triton_reason

mod = importlib.import_module("wam_fast.ops.quantize_rowwise")
quantize_rowwise = mod.quantize_rowwise

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = [
    pytest.param("torch"),
    pytest.param("triton", marks=pytest.mark.skipif(triton_reason() is not None, reason=str(triton_reason()))),
]
# (leading dims, K): 49 / 37 / 774 rows, K not a power of two, K = 5000 > one 4096-column block, 1-D x
SHAPES = [((49,), 70), ((2, 37), 96), ((774,), 48), ((1, 49), 3072), ((3,), 5000), ((), 33)]


def reference(x, gelu):
    y = torch.nn.functional.gelu(x.float(), approximate="tanh") if gelu else x.float()
    return y, WF.quantize_rowwise(y)


def check_codes(codes, scales, y):
    """codes/scales vs quantize_rowwise of the fp32 value y (..., K)."""
    ref_codes, ref_scales = WF.quantize_rowwise(y)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == y.shape and codes.is_contiguous()
    assert scales.dtype == torch.float32 and scales.shape == (*y.shape[:-1], 1) and scales.is_contiguous()
    torch.testing.assert_close(scales, ref_scales, rtol=1e-6, atol=0)
    deq = codes.float() * scales
    # one e4m3 step: 3 mantissa bits, 2**-9 steps (times the scale) among the subnormals
    step = 2.0 ** -3 * y.abs() + 2.0 ** -9 * ref_scales
    assert ((deq - y).abs() <= step).all(), (deq - y).abs().max()
    same = (codes.view(torch.uint8) == ref_codes.view(torch.uint8)).float().mean().item()
    assert same >= 0.99, f"only {same:.4f} of the codes match quantize_rowwise"


@pytest.mark.parametrize("gelu", [False, True], ids=["plain", "gelu"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,K", SHAPES, ids=str)
def test_matches_fp32_reference(lead, K, dtype, backend, gelu):
    x = (torch.randn(*lead, K, device=DEVICE) * 3 + 0.5).to(dtype)
    y, _ = reference(x, gelu)
    with use_backend(backend):
        codes, scales = quantize_rowwise(x, gelu=gelu)
    check_codes(codes, scales, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows_and_wide_range(backend):
    """An all-zero row has the floor scale 1e-12 and zero codes (no NaN); tiny and huge rows keep their scale."""
    x = torch.randn(7, 300, device=DEVICE)
    x[2] = 0.0
    x[4] *= 1e-30  # subnormal-range fp32 values
    x[5] *= 1e30
    with use_backend(backend):
        codes, scales = quantize_rowwise(x)
    assert scales[2].item() == torch.tensor(WF.FP8_MIN_SCALE).item()
    assert (codes[2].float() == 0).all()
    check_codes(codes, scales, x)


@pytest.mark.parametrize("gelu", [False, True], ids=["plain", "gelu"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_rows(backend, gelu):
    """As the reference: a row with a NaN gets a NaN scale and NaN codes; a row with +-inf gets scale
    inf, NaN codes at the infs and zero codes elsewhere; the other rows are untouched."""
    x = torch.randn(5, 70, device=DEVICE)
    x[1, 3] = float("nan")
    x[3, 10] = float("inf")
    with use_backend(backend):
        codes, scales = quantize_rowwise(x, gelu=gelu)
    ref_codes, ref_scales = reference(x, gelu)[1]
    assert torch.isnan(scales[1]).all() and torch.isnan(codes[1].float()).all()
    assert scales[3].item() == float("inf")
    assert torch.isnan(codes[3, 10].float()) and (codes[3].float().nan_to_num(0.0) == 0).all()
    if not gelu:  # -inf: gelu(-inf) is NaN (-inf * 0), as in torch
        x2 = x.clone()
        x2[3, 10] = -float("inf")
        with use_backend(backend):
            assert torch.isnan(quantize_rowwise(x2)[0][3, 10].float())
    torch.testing.assert_close(scales, ref_scales, rtol=1e-6, atol=0, equal_nan=True)
    torch.testing.assert_close(codes.float(), ref_codes.float(), rtol=0, atol=0, equal_nan=True)
    finite = [0, 2, 4]
    check_codes(codes[finite], scales[finite], reference(x[finite], gelu)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    """Token slices of wider tensors (row strides), unmergeable leading dims (copied by reshape in the
    Triton backend) and a non-contiguous last dim (copied by the public function)."""
    K = 70
    views = [torch.randn(2, 54, 2 * K, device=DEVICE)[:, 5:, :K],
             torch.randn(3, 4, 5, K, device=DEVICE).transpose(0, 1),
             torch.randn(2, K, 49, device=DEVICE).mT,
             torch.randn(49, 3 * K, device=DEVICE)[:, K:2 * K]]
    for x in views:
        for gelu in (False, True):
            with use_backend(backend):
                codes, scales = quantize_rowwise(x, gelu=gelu)
            check_codes(codes, scales, reference(x, gelu)[0])


def test_empty_rows():
    with use_backend("triton" if triton_reason() is None else "torch"):
        codes, scales = quantize_rowwise(torch.randn(0, 3, 16, device=DEVICE))
    assert codes.shape == (0, 3, 16) and scales.shape == (0, 3, 1)


@pytest.mark.parametrize("gelu", [False, True])
def test_opcheck(gelu):
    x = torch.randn(2, 9, 40, device=DEVICE)
    torch.library.opcheck(torch.ops.wam_fast.quantize_rowwise.default, (x, gelu))
    torch.library.opcheck(torch.ops.wam_fast.quantize_rowwise.default, (x[0, :, :33], gelu))


@pytest.mark.parametrize("args,error,match", [
    ((torch.randn(4, 8, dtype=torch.float64),), TypeError, r"x must be one of .*float32.*, got .*float64"),
    ((torch.randint(0, 3, (4, 8)),), TypeError, r"x must be one of .*got .*int64"),
    (([1.0, 2.0],), TypeError, "x must be a torch.Tensor"),
    ((torch.tensor(1.0),), ValueError, r"x must be \(\.\.\., K\) with K >= 1 .*got shape \(\)"),
    ((torch.randn(4, 0),), ValueError, r"K >= 1 .*got shape \(4, 0\)"),
    ((torch.randn(4, 8), 1), TypeError, "gelu must be a bool, got int"),
])
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        quantize_rowwise(*args)


def test_backend_rejections_name_the_reason():
    x = torch.randn(4, 8, dtype=torch.float64)
    if triton_reason() is None:  # the public function refuses float64; the custom op reaches the backends
        with use_backend("triton"), pytest.raises(RuntimeError, match="dtype must be float32/float16/bfloat16"):
            torch.ops.wam_fast.quantize_rowwise.default(x, False)
    assert any("unit stride" in r for r in mod._triton_rejects(torch.randn(8, 4).t(), False))


# ---- the kernel budget -----------------------------------------------------------------------------------
class OpLog(TorchDispatchMode):
    """The ops dispatched in its scope; a custom op (its kernels included) counts once."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket).removeprefix("wam_fast."))
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(triton_reason() is not None, reason=str(triton_reason()))
def test_one_triton_launch_per_call(monkeypatch):
    kernels = kernel_module("quantize_rowwise")
    jit = kernels._quantize_rowwise_kernel
    grids = []

    class Counting:
        def __getitem__(self, grid):
            grids.append(grid)
            return jit[grid]

    monkeypatch.setattr(kernels, "_quantize_rowwise_kernel", Counting())
    x = torch.randn(2, 49, 5000, device=DEVICE, dtype=torch.bfloat16)  # rows longer than a block
    with use_backend("triton"):
        for gelu in (False, True):
            quantize_rowwise(x, gelu=gelu)
            quantize_rowwise(x[:, 3:, :1000], gelu=gelu)
    assert len(grids) == 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_modules_dispatch_one_op_per_kernel(backend):
    """FP8Linear on a tensor: quantize_rowwise + fp8_linear. FP8FeedForward fed an FP8Activation (the
    fused norm2's output): fp8_linear, quantize_rowwise (GELU fused), fp8_linear; nothing else."""
    torch.manual_seed(0)
    model = quant.quantize_fp8(nn.Sequential(nn.Linear(48, 70)))
    block_ff = quant.FP8FeedForward(48, 200)  # as quantize_fp8 makes it in a WAMBlock
    block_ff.proj_in = quant.FP8Linear.from_linear(block_ff.proj_in, out_dtype=torch.bfloat16)
    block_ff.proj_out = quant.FP8Linear.from_linear(block_ff.proj_out, out_dtype=torch.bfloat16)
    model, block_ff = model.to(DEVICE), block_ff.to(DEVICE)
    x = torch.randn(1, 49, 48, device=DEVICE, dtype=torch.bfloat16)
    x8 = quant.FP8Activation(*WF.quantize_rowwise(x))
    with torch.no_grad(), use_backend(backend):
        with OpLog() as linear_log:
            model(x)
        with OpLog() as ff_log:
            y = block_ff(x8)
        with OpLog() as ff_plain_log:
            block_ff(x)
    assert linear_log.ops == ["quantize_rowwise", "fp8_linear"]
    assert ff_log.ops == ["fp8_linear", "quantize_rowwise", "fp8_linear"]
    assert ff_plain_log.ops == ["quantize_rowwise", "fp8_linear", "quantize_rowwise", "fp8_linear"]
    # the fused GELU + quantization gives what the unfused FFN gives (GELU in fp32, not rounded to bf16)
    h = block_ff.proj_in(x8)
    want = WF.fp8_linear(*WF.quantize_rowwise_gelu(h), block_ff.proj_out.weight, block_ff.proj_out.weight_scale,
                         block_ff.proj_out.bias, torch.float32)
    assert (y.float() - want).abs().max().item() <= 2.0 ** -8 * want.abs().max().item() + 1e-3
