"""wam_fast.ops.qk_norm_rope (LayerNorm over head_dim on q, k + interleaved RoPE on a token slice):
every backend that runs here vs the float32 reference (wam_fast.ops.reference.qk_norm_rope on
.float() copies), on the model's strided qkv views; the RoPE slice is exact (tokens outside it are
only normalised); opcheck; bad inputs. Triton runs interpreted on CPU (tests/conftest.py)."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from wam_fast.ops import reference as functional
from wam_fast.ops.registry import cuda_extension_reason, triton_reason, use_backend

op_module = importlib.import_module("wam_fast.ops.qk_norm_rope")
qk_norm_rope = op_module.qk_norm_rope

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# kernel error <= 2 x (same-precision torch run's error) + this floor, both vs the fp32 reference
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _cuda_reason():
    if not GPU:
        return "no GPU"
    return cuda_extension_reason()


BACKENDS = [
    pytest.param("torch"),
    pytest.param("triton", marks=pytest.mark.skipif(triton_reason() is not None, reason=str(triton_reason()))),
    pytest.param("cuda", marks=pytest.mark.skipif(_cuda_reason() is not None, reason=str(_cuda_reason()))),
]


def make_inputs(B, H, N, hd, rope_start, rope_end, dtype=torch.float32, device=DEVICE, layout="qkv",
                affine=(True, True, True, True)):
    """q, k as the model makes them (layout "qkv": views of one (B, N, 3 H hd) projection), or
    "contiguous", or "transposed" (last-dim stride != 1); tables of random angles (cos[2i] != cos[2i+1])."""
    if layout == "qkv":
        qkv = torch.randn(B, N, 3 * H * hd, device=device) * 2 + 0.5
        q, k, _ = qkv.to(dtype).view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
    elif layout == "contiguous":
        q, k = (torch.randn(B, H, N, hd, device=device).to(dtype) * 2 + 0.5 for _ in range(2))
    elif layout == "transposed":
        q, k = (torch.randn(B, H, hd, N, device=device).to(dtype).transpose(-1, -2) for _ in range(2))
    else:
        raise ValueError(layout)
    params = [torch.randn(hd, device=device).to(dtype) if use else None for use in affine]
    angles = torch.rand(rope_end - rope_start, hd, device=device) * 6.3
    return (q, k, *params, angles.cos(), angles.sin(), rope_start, rope_end)


def reference32(q, k, qw, qb, kw, kb, cos, sin, rope_start, rope_end, eps=1e-6):
    f = lambda t: None if t is None else t.float()  # noqa: E731
    return functional.qk_norm_rope(f(q), f(k), f(qw), f(qb), f(kw), f(kb), cos, sin, rope_start, rope_end, eps)


def run(backend, args, eps=1e-6):
    with use_backend(backend):
        return qk_norm_rope(*args, eps=eps)


def check_close(backend, args, eps=1e-6):
    q = args[0]
    out = run(backend, args, eps)
    ref = reference32(*args, eps=eps)
    same_precision = functional.qk_norm_rope(*args, eps)
    for name, o, r, t in zip(("q", "k"), out, ref, same_precision):
        assert o.shape == q.shape and o.dtype == q.dtype and o.is_contiguous(), (name, o.shape, o.dtype)
        err = (o.float() - r).abs().max().item()
        torch_err = (t.float() - r).abs().max().item()
        assert err <= 2 * torch_err + FLOOR[q.dtype], (
            f"{backend} {name}: max error {err:.3g} vs fp32 reference; same-precision torch: {torch_err:.3g}")
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_w1_layout(backend, dtype):
    # W1: 226 text | 1024 video | 6 actions tokens, RoPE on the video slice [226, 1250)
    check_close(backend, make_inputs(1, 2, 1256, 64, 226, 1250, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,H,N,hd,rope,dtype,layout", [
    (1, 2, 774, 128, (0, 768), torch.bfloat16, "qkv"),      # temporal variant's noisy tokens, hd 128
    (2, 3, 49, 64, (8, 43), torch.float16, "qkv"),          # tiny layout, H not a power of two
    (2, 2, 49, 128, (0, 49), torch.float32, "contiguous"),  # every token rotated
    (1, 2, 49, 96, (5, 40), torch.bfloat16, "qkv"),         # head_dim not a power of two (padded tile)
    (1, 2, 49, 256, (5, 40), torch.float32, "qkv"),         # largest head_dim
    (1, 48, 49, 64, (10, 45), torch.bfloat16, "qkv"),       # D = H hd = 3072 (W1 width)
    (1, 2, 49, 64, (3, 30), torch.float32, "transposed"),   # last-dim stride != 1
    (1, 2, 49, 64, (49, 49), torch.bfloat16, "qkv"),        # empty slice at the end: no rotation
])
def test_shapes(backend, B, H, N, hd, rope, dtype, layout):
    if backend == "cuda" and layout == "transposed":
        pytest.skip("the CUDA kernel needs last-dim stride 1 (rejects it: see test_cuda_rejects)")
    check_close(backend, make_inputs(B, H, N, hd, *rope, dtype, layout=layout))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", [(False, False, False, False), (True, False, False, True)], ids=["none", "mixed"])
def test_weights_none_and_eps(backend, affine):
    check_close(backend, make_inputs(2, 2, 49, 64, 4, 44, torch.float32, affine=affine), eps=1e-2)


@pytest.mark.skipif(triton_reason() is not None, reason=str(triton_reason()))
@pytest.mark.parametrize("block_n,head_group", [(8, 1), (16, 2), (64, 4)])
def test_triton_block_tails(block_n, head_group):
    # many token blocks with a ragged tail, and the head-group loop, straight through the launcher
    q, k, qw, qb, kw, kb, cos, sin, rs, re = make_inputs(1, 4, 49, 64, 7, 45, torch.float32)
    out = op_module.triton_kernels().qk_norm_rope(q, k, qw, qb, kw, kb, cos, sin, rs, re, 1e-6,
                                                  block_n=block_n, head_group=head_group)
    for o, r in zip(out, reference32(q, k, qw, qb, kw, kb, cos, sin, rs, re)):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotates_only_the_slice(backend):
    # Outside [rope_start, rope_end) the output is LayerNorm alone; inside it is LayerNorm then the
    # rotation, which moves it far from LayerNorm alone. "Rotate every token" or "rotate nothing" fails.
    rs, re, hd = 11, 37, 64
    q, k, qw, qb, kw, kb, cos, sin, _, _ = make_inputs(1, 2, 49, hd, rs, re, torch.float32)
    q_out, k_out = run(backend, (q, k, qw, qb, kw, kb, cos, sin, rs, re))
    for out, x, w, b in ((q_out, q, qw, qb), (k_out, k, kw, kb)):
        normed = F.layer_norm(x, (hd,), w, b, 1e-6)
        outside = torch.cat((out[..., :rs, :], out[..., re:, :]), dim=-2)
        torch.testing.assert_close(outside, torch.cat((normed[..., :rs, :], normed[..., re:, :]), dim=-2),
                                   atol=1e-5, rtol=1e-5)
        inside = out[..., rs:re, :]
        torch.testing.assert_close(inside, functional.apply_rope(normed[..., rs:re, :], cos, sin),
                                   atol=1e-5, rtol=1e-5)
        per_token = (inside - normed[..., rs:re, :]).abs().amax(dim=-1)
        assert per_token.min() > 0.1, f"some token in the slice is not rotated: {per_token.min():.3g}"
        # the pair convention: out[2i] = x[2i] cos - x[2i+1] sin; out[2i+1] = x[2i+1] cos + x[2i] sin
        n0 = normed[0, 0, rs]
        assert torch.allclose(inside[0, 0, 0, 0], n0[0] * cos[0, 0] - n0[1] * sin[0, 0], atol=1e-5)
        assert torch.allclose(inside[0, 0, 0, 1], n0[1] * cos[0, 1] + n0[0] * sin[0, 1], atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_are_fresh(backend):
    args = make_inputs(1, 2, 9, 8, 2, 7, torch.float32)
    q_out, k_out = run(backend, args)
    q, k = args[0], args[1]
    qkv_base = q._base if q._base is not None else q
    for out in (q_out, k_out):
        assert out.is_contiguous() and out.untyped_storage().data_ptr() != qkv_base.untyped_storage().data_ptr()
    assert q_out.untyped_storage().data_ptr() != k_out.untyped_storage().data_ptr()


def test_opcheck():
    args = make_inputs(1, 2, 9, 8, 2, 7, torch.float32)
    torch.library.opcheck(torch.ops.wam_fast.qk_norm_rope.default, args + (1e-6,))
    args = make_inputs(1, 2, 9, 8, 0, 0, torch.float32, affine=(False, False, True, False))
    torch.library.opcheck(torch.ops.wam_fast.qk_norm_rope.default, args + (1e-5,))


def test_fake_shapes():
    q, k, *rest = make_inputs(1, 2, 9, 8, 2, 7, torch.bfloat16, device=torch.device("meta"))
    q_out, k_out = qk_norm_rope(q, k, *rest)
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.dtype == torch.bfloat16
    assert q_out.device.type == "meta" and q_out.is_contiguous()


# ---- cache writes: k_out, v, v_out ---------------------------------------------------------------
def cache_views(args, total, start, with_v=True):
    """Zeroed (B, H, total, hd) key/value buffers filled with a sentinel, and their [start, start + N)
    slices (strided views, as the KV cache passes them); v is the third view of the qkv projection."""
    q = args[0]
    B, H, N, hd = q.shape
    qkv_base = q._base if q._base is not None else torch.randn(B, N, 3 * H * hd, device=q.device).to(q.dtype)
    v = qkv_base.view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)[2] if with_v else None
    keys, values = (torch.full((B, H, total, hd), 7.0, dtype=q.dtype, device=q.device) for _ in range(2))
    return keys, values, keys[:, :, start:start + N], values[:, :, start:start + N], v


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,H,N,hd,rope,start", [
    (2, 3, 49, 64, (8, 43), 5),     # awkward N, H, a slice in the middle of the buffer
    (1, 2, 33, 96, (0, 33), 0),     # head_dim not a power of two, slice at the start
    (1, 4, 17, 32, (17, 17), 23),   # no rotation, slice at the end of the buffer
])
def test_cache_writes(backend, dtype, B, H, N, hd, rope, start):
    args = make_inputs(B, H, N, hd, *rope, dtype)
    total = start + N + (0 if start == 23 else 9)
    keys, values, k_view, v_view, v = cache_views(args, total, start)
    with use_backend(backend):
        q_out, k_out = qk_norm_rope(*args, k_out=k_view, v=v, v_out=v_view)
        q_plain, k_plain = qk_norm_rope(*args)
    assert k_out is k_view and q_out.is_contiguous()
    # the plain op plus copies, exactly (same backend, same arithmetic)
    torch.testing.assert_close(q_out, q_plain, atol=0, rtol=0)
    torch.testing.assert_close(k_view, k_plain, atol=0, rtol=0)
    torch.testing.assert_close(v_view, v, atol=0, rtol=0)
    check_close(backend, args)  # and the plain op is right
    for buf in (keys, values):  # the rest of the buffers is untouched
        assert (buf[:, :, :start] == 7).all() and (buf[:, :, start + N:] == 7).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_write_k_only(backend):
    args = make_inputs(2, 2, 49, 64, 4, 44, torch.bfloat16)
    keys, values, k_view, _, _ = cache_views(args, 60, 3, with_v=False)
    with use_backend(backend):
        q_out, k_out = qk_norm_rope(*args, k_out=k_view)
        q_plain, k_plain = qk_norm_rope(*args)
    assert k_out is k_view
    torch.testing.assert_close(q_out, q_plain, atol=0, rtol=0)
    torch.testing.assert_close(k_view, k_plain, atol=0, rtol=0)
    assert (keys[:, :, :3] == 7).all() and (keys[:, :, 52:] == 7).all() and (values == 7).all()


@pytest.mark.skipif(triton_reason() is not None, reason=str(triton_reason()))
@pytest.mark.parametrize("block_n,head_group", [(8, 1), (16, 2)])
def test_triton_cache_writes_tails(block_n, head_group):
    # ragged token blocks and head groups with the cache writes, straight through the launcher
    args = make_inputs(1, 4, 49, 64, 7, 45, torch.float16)
    keys, values, k_view, v_view, v = cache_views(args, 64, 11)
    q_out, k_out = op_module.triton_kernels().qk_norm_rope(*args, 1e-6, block_n=block_n, head_group=head_group,
                                                           k_out=k_view, v=v, v_out=v_view)
    q_plain, k_plain = op_module.triton_kernels().qk_norm_rope(*args, 1e-6)
    assert k_out is k_view
    torch.testing.assert_close(q_out, q_plain, atol=0, rtol=0)
    torch.testing.assert_close(k_view, k_plain, atol=0, rtol=0)
    torch.testing.assert_close(v_view, v, atol=0, rtol=0)
    assert (keys[:, :, :11] == 7).all() and (keys[:, :, 60:] == 7).all()
    assert (values[:, :, :11] == 7).all() and (values[:, :, 60:] == 7).all()


def test_cache_writes_opcheck():
    args = make_inputs(1, 2, 9, 8, 2, 7, torch.float32)
    _, _, k_view, v_view, v = cache_views(args, 14, 3)
    op = torch.ops.wam_fast.qk_norm_rope_into.default
    torch.library.opcheck(op, args + (1e-6, k_view, v, v_view))
    torch.library.opcheck(op, args + (1e-6, k_view, None, None))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_writes_compile_fullgraph(backend):
    """The mutating op traces under torch.compile (fullgraph: no graph break) and the compiled run
    writes the cache buffers as eager does (aot_eager functionalizes the mutation and writes back)."""
    B, H, N, hd = 1, 2, 9, 8
    _, _, qw, qb, kw, kb, cos, sin, rs, re = make_inputs(B, H, N, hd, 2, 7, torch.float32)

    def layer(qkv, keys, values):
        q, k, v = qkv.view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
        q, k = qk_norm_rope(q, k, qw, qb, kw, kb, cos, sin, rs, re, k_out=keys[:, :, 3:3 + N], v=v,
                            v_out=values[:, :, 3:3 + N])
        return q * 2, k + 1

    qkv = torch.randn(B, N, 3 * H * hd, device=DEVICE)
    buffers = lambda: [torch.zeros(B, H, 15, hd, device=DEVICE) for _ in range(2)]  # noqa: E731
    explained = torch._dynamo.explain(layer)(qkv, *buffers())
    assert explained.graph_break_count == 0, explained.break_reasons
    with use_backend(backend):
        eager_buffers, compiled_buffers = buffers(), buffers()
        eager = layer(qkv, *eager_buffers)
        torch._dynamo.reset()
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(qkv, *compiled_buffers)
    for a, b in zip(eager + tuple(eager_buffers), compiled + tuple(compiled_buffers)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_cache_writes_fake():
    q, k, *rest = make_inputs(1, 2, 9, 8, 2, 7, torch.bfloat16, device=torch.device("meta"))
    keys = torch.empty(1, 2, 20, 8, dtype=torch.bfloat16, device="meta")
    q_out, k_out = qk_norm_rope(q, k, *rest, k_out=keys[:, :, 4:13], v=k, v_out=keys[:, :, 11:20])
    assert q_out.shape == q.shape and q_out.is_contiguous() and k_out.stride() == keys.stride()


@pytest.mark.parametrize("over,error,match", [
    (dict(v=torch.randn(1, 2, 12, 8), v_out=torch.randn(1, 2, 12, 8)), ValueError, r"go with k_out .* got k_out=None"),
    (dict(k_out=torch.empty(1, 2, 12, 8), v=torch.randn(1, 2, 12, 8)), ValueError,
     r"v and v_out go together .* v_out=None"),
    (dict(k_out=torch.empty(1, 2, 12, 8), v_out=torch.randn(1, 2, 12, 8)), ValueError,
     r"v and v_out go together .* got v=None"),
    (dict(k_out=torch.empty(1, 2, 11, 8)), ValueError,
     r"k_out must have q's shape \(1, 2, 12, 8\) .* got \(1, 2, 11, 8\)"),
    (dict(k_out=torch.empty(1, 2, 12, 8), v=torch.randn(1, 2, 12, 8), v_out=torch.empty(1, 12, 2, 8)), ValueError,
     r"v_out must have q's shape .* got \(1, 12, 2, 8\)"),
    (dict(k_out=torch.empty(1, 2, 12, 8), v=torch.randn(2, 12, 8), v_out=torch.empty(1, 2, 12, 8)), ValueError,
     r"v must have 4 dims"),
    (dict(k_out=torch.empty(1, 2, 12, 8, dtype=torch.bfloat16)), TypeError,
     r"k_out is torch.bfloat16 but q is torch.float32"),
    (dict(k_out=torch.empty(1, 2, 12, 8), v=torch.randn(1, 2, 12, 8, dtype=torch.float16),
          v_out=torch.empty(1, 2, 12, 8)), TypeError, r"v is torch.float16 but q is torch.float32"),
    (dict(k_out=torch.empty(1, 2, 12, 8, device="meta")), ValueError, r"k_out is on meta but q is on cpu"),
    (dict(k_out=torch.empty(1, 2, 8, 12).transpose(-1, -2)), ValueError,
     r"k_out needs last-dim stride 1 .* got strides"),
    (dict(k_out=torch.empty(1, 2, 12, 8), v=torch.randn(1, 2, 12, 8), v_out=torch.empty(1, 2, 8, 12).transpose(-1, -2)),
     ValueError, r"v_out needs last-dim stride 1"),
    (dict(k_out="k"), TypeError, r"k_out must be a torch.Tensor, got str"),
])
def test_bad_cache_writes(over, error, match):
    with pytest.raises(error, match=match):
        qk_norm_rope(**_good(**over))


# ---- bad inputs --------------------------------------------------------------------------------
def _good(**over):
    q, k, qw, qb, kw, kb, cos, sin, rs, re = make_inputs(1, 2, 12, 8, 2, 10, torch.float32, device=torch.device("cpu"))
    args = dict(q=q, k=k, q_weight=qw, q_bias=qb, k_weight=kw, k_bias=kb, cos=cos, sin=sin, rope_start=rs,
                rope_end=re)
    args.update(over)
    return args


@pytest.mark.parametrize("over,error,match", [
    (dict(q=torch.randn(1, 2, 12, 7), k=torch.randn(1, 2, 12, 7)), ValueError, r"head_dim .* must be even .* got 7"),
    (dict(q=torch.randn(1, 2, 12, 258), k=torch.randn(1, 2, 12, 258)), ValueError, r"even and <= 256 .* got 258"),
    (dict(cos=torch.randn(7, 8)), ValueError, r"cos must have shape \(8, 8\)"),
    (dict(sin=torch.randn(8, 6)), ValueError, r"sin must have shape \(8, 8\)"),
    (dict(rope_end=13), ValueError, r"rope_end <= N = 12 .* rope_end=13"),
    (dict(rope_start=-1), ValueError, r"0 <= rope_start .* rope_start=-1"),
    (dict(rope_start=11, rope_end=10), ValueError, r"rope_start <= rope_end .* rope_start=11"),
    (dict(rope_start=2.0), TypeError, r"rope_start must be an int"),
    (dict(k=torch.randn(1, 2, 11, 8)), ValueError, r"k must have q's shape \(1, 2, 12, 8\) .* got \(1, 2, 11, 8\)"),
    (dict(q=torch.randn(2, 12, 8)), ValueError, r"q must have 4 dims"),
    (dict(k=torch.randn(1, 2, 12, 8, dtype=torch.bfloat16)), TypeError, r"k is torch.bfloat16 but q is torch.float32"),
    (dict(q_weight=torch.randn(8, dtype=torch.float16)), TypeError, r"q_weight is torch.float16 but q is"),
    (dict(k_bias=torch.randn(9)), ValueError, r"k_bias must have shape \(8\)"),
    (dict(cos=torch.randn(8, 8, dtype=torch.bfloat16)), TypeError, r"cos must be one of \['torch.float32'\]"),
    (dict(q=torch.randint(0, 3, (1, 2, 12, 8))), TypeError, r"q must be one of"),
    (dict(k=torch.randn(1, 2, 12, 8, device="meta")), ValueError, r"k is on meta but q is on cpu"),
    (dict(sin=torch.randn(8, 8, device="meta")), ValueError, r"sin is on meta but q is on cpu"),
    (dict(q="q"), TypeError, r"q must be a torch.Tensor, got str"),
])
def test_bad_inputs(over, error, match):
    with pytest.raises(error, match=match):
        qk_norm_rope(**_good(**over))


def test_bad_eps():
    with pytest.raises(ValueError, match="eps must be >= 0"):
        qk_norm_rope(**_good(), eps=-1.0)
    with pytest.raises(TypeError, match="eps must be a float"):
        qk_norm_rope(**_good(), eps="1e-6")


def test_forced_cuda_without_it_says_why():
    if _cuda_reason() is None:
        pytest.skip("the CUDA backend is available here")
    with use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' was forced but cannot run"):
        qk_norm_rope(**_good())


def test_cuda_rejects():
    # what the CUDA kernel does not take, as reasons (the registry falls through to Triton / torch)
    q, k, qw, qb, kw, kb, cos, sin, rs, re = make_inputs(1, 2, 12, 8, 2, 10, torch.float32, layout="transposed")
    reasons = op_module._cuda_rejects(q, k, qw, qb, kw, kb, cos, sin, rs, re, 1e-6)
    assert any("q needs last-dim stride 1" in r for r in reasons), reasons
    assert any("k needs last-dim stride 1" in r for r in reasons), reasons
    if DEVICE.type == "cpu":
        assert any("needs CUDA tensors" in r for r in reasons), reasons
    # the automatic choice still serves it
    check_close(None, (q, k, qw, qb, kw, kb, cos, sin, rs, re))


@pytest.mark.skipif(_cuda_reason() is not None, reason=str(_cuda_reason()))
def test_cuda_forced_on_strided_last_dim_says_why():
    args = make_inputs(1, 2, 49, 64, 3, 30, torch.bfloat16, layout="transposed")
    with use_backend("cuda"), pytest.raises(RuntimeError, match="q needs last-dim stride 1"):
        qk_norm_rope(*args)


# ---- GPU only: W1 shapes, backends against each other ----------------------------------------
@pytest.mark.skipif(not GPU, reason="needs a GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,N,hd,rope", [(1, 48, 1256, 64, (226, 1250)), (2, 48, 774, 64, (0, 768)),
                                           (2, 24, 1256, 128, (226, 1250)), (1, 16, 49, 128, (8, 43))])
def test_gpu_w1_backends_agree(dtype, B, H, N, hd, rope):
    args = make_inputs(B, H, N, hd, *rope, dtype)
    names = ["triton", "torch"] + (["cuda"] if _cuda_reason() is None else [])
    outs = {name: check_close(name, args) for name in names}
    for name in names:
        if name != "torch":
            for o, t in zip(outs[name], outs["triton"]):
                torch.testing.assert_close(o.float(), t.float(), atol=2 * FLOOR[dtype], rtol=0)
    auto = run(None, args)
    chosen = "cuda" if "cuda" in names else "triton"
    for o, t in zip(auto, outs[chosen]):
        torch.testing.assert_close(o, t, atol=0, rtol=0)
