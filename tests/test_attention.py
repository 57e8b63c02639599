"""wam_fast.ops.attention: every backend that runs here vs the float32 SDPA reference.

Reference: wam_fast.ops.reference.attention (SDPA; for "temporal" with the explicit boolean mask of
functional.temporal_mask) on float32 copies. Triton runs in the interpreter without a GPU (conftest).
"""
import importlib

import pytest
import torch

from wam_fast.ops import reference as WF
from wam_fast.ops import use_backend

attention_module = importlib.import_module("wam_fast.ops.attention")  # wam_fast.ops.attention is the function
attention = attention_module.attention

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
BACKENDS = ["torch", "triton"]
# max |out - ref| <= atol + rtol * |ref|, by input dtype (outputs are averages of O(1) values)
TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 1e-2)}
# W1 temporal layout: text | current frame | noisy video | actions, attention groups 0 | 1 | 2 | 2
W1_LENGTHS, W1_GROUPS = (226, 256, 768, 6), (0, 1, 2, 2)
# with a history frame: text 0, history 1, current frame 2, noisy 3 (1256 keys, the noisy 774 query)
HIST_LENGTHS, HIST_GROUPS = (226, 128, 128, 768, 6), (0, 1, 2, 3, 3)


def kernel_module():
    return attention_module._kernel_module()


def ids(lengths, groups, dtype=torch.int64):
    return torch.repeat_interleave(torch.tensor(groups, dtype=dtype), torch.tensor(lengths)).to(DEVICE)


def qkv(b, h, nq, nk, hd, dtype):
    make = lambda n: torch.randn(b, h, n, hd, device=DEVICE).to(dtype)  # noqa: E731
    return make(nq), make(nk), make(nk)


def reference(q, k, v, qs=None, ks=None, mask="full"):
    return WF.attention(q.float(), k.float(), v.float(), qs, ks, mask)


def run(backend, *args, **kwargs):
    with use_backend(backend):
        return attention(*args, **kwargs)


def assert_close(out, ref, dtype, rows=None):
    atol, rtol = TOL[dtype]
    out = out.float()
    if rows is not None:
        out, ref = out[..., rows, :], ref[..., rows, :]
    assert torch.isfinite(out).all()
    err = (out - ref).abs()
    bound = atol + rtol * ref.abs()
    assert (err <= bound).all(), f"max error {err.max().item():.3g} (atol {atol}, rtol {rtol}, {dtype})"


def out_layout_ok(out):
    """The op's output layout: (B, H, Nq, hd) stored as (B, Nq, H, hd), so the model's
    o.transpose(1, 2).reshape(b, n, -1) is a view; exactly the strides of the fake kernel."""
    b, h, nq, hd = out.shape
    return out.transpose(1, 2).is_contiguous() and out.stride() == (nq * h * hd, hd, h * hd, 1)


# ---- vs the float32 reference ---------------------------------------------------------------------
# (b, h, nq, nk, hd, dtype, mask, layout): N = 1256 / 774 / 49, head_dim 64 and 128, cached prefixes
CASES = [
    (1, 1, 1256, 1256, 64, torch.float32, "full", None),
    (1, 1, 774, 774, 128, torch.float32, "full", None),
    (1, 1, 774, 1256, 64, torch.bfloat16, "full", None),                       # full with a cached prefix
    (1, 1, 1256, 1256, 64, torch.bfloat16, "temporal", (W1_LENGTHS, W1_GROUPS)),  # uncached, Nq == Nk
    (1, 1, 774, 1256, 64, torch.float16, "temporal", (HIST_LENGTHS, HIST_GROUPS)),  # cached prefix
    (1, 1, 774, 1256, 128, torch.float32, "temporal", (W1_LENGTHS, W1_GROUPS)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,h,nq,nk,hd,dtype,mask,layout", CASES)
def test_matches_reference(backend, b, h, nq, nk, hd, dtype, mask, layout):
    q, k, v = qkv(b, h, nq, nk, hd, dtype)
    qs = ks = None
    if layout is not None:
        ks = ids(*layout)
        qs = ks[nk - nq:]
    out = run(backend, q, k, v, qs, ks, mask)
    assert out.shape == (b, h, nq, hd) and out.dtype == dtype and out_layout_ok(out)
    assert_close(out, reference(q, k, v, qs, ks, mask), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hd", [64, 128])
@pytest.mark.parametrize("mask,nq", [("full", 49), ("temporal", 49), ("temporal", 33)])
def test_small_dtypes(backend, dtype, hd, mask, nq):
    """N = 49 (tiny layout), B = 2, H = 2, every dtype; temporal with and without a cached prefix."""
    q, k, v = qkv(2, 2, nq, 49, hd, dtype)
    ks = ids((8, 7, 28, 6), (0, 1, 2, 2), torch.int32)
    qs = ks[49 - nq:]
    out = run(backend, q, k, v, qs, ks, mask)
    assert out.dtype == dtype and out_layout_ok(out)
    assert_close(out, reference(q, k, v, qs, ks, mask), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hd", [8, 16, 32, 48, 80, 96, 120, 200, 256])
def test_other_head_dims(backend, hd):
    """Any multiple of 8 up to 256: powers of two fill the tile, the rest run a padded one (48 -> 64)."""
    q, k, v = qkv(1, 2, 40, 70, hd, torch.float32)
    ks = torch.randint(0, 3, (70,), device=DEVICE)
    qs = ks[30:]
    out = run(backend, q, k, v, qs, ks, "temporal")
    assert out.shape == (1, 2, 40, hd) and out_layout_ok(out)
    assert_close(out, reference(q, k, v, qs, ks, "temporal"), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hd", [48, 120])
def test_padded_head_dims_small_dtypes(backend, dtype, hd):
    """GR00T-style heads (48) and 120 in half precision, N = 49, full mask and a cached temporal prefix;
    the output's padding columns are never written past head_dim (the next head's values stay intact)."""
    q, k, v = qkv(2, 3, 49, 49, hd, dtype)
    assert_close(run(backend, q, k, v, None, None, "full"), reference(q, k, v, None, None, "full"), dtype)
    ks = ids((8, 7, 28, 6), (0, 1, 2, 2), torch.int32)
    qs = ks[16:]
    out = run(backend, q[:, :, 16:], k, v, qs, ks, "temporal")
    assert_close(out, reference(q[:, :, 16:], k, v, qs, ks, "temporal"), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsorted_segments(backend):
    """Ids in any order (the mask compares ids, not positions), mixed int32 / int64, several tiles."""
    q, k, v = qkv(1, 2, 150, 300, 64, torch.float32)
    ks = torch.randint(0, 5, (300,), device=DEVICE)
    qs = torch.randint(1, 5, (150,), device=DEVICE, dtype=torch.int32)  # >= 1: every query sees some key
    qs[:20] = 4  # a tile where every key is visible... and tiles that mix
    out = run(backend, q, k, v, qs, ks, "temporal")
    assert_close(out, reference(q, k, v, qs, ks, "temporal"), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_query_that_sees_nothing_gives_zeros(backend, dtype):
    """A query whose segment id is below every key's sees no key: zeros (SDPA may give NaN), never NaN."""
    q, k, v = qkv(1, 2, 60, 200, 64, dtype)
    ks = torch.randint(1, 4, (200,), device=DEVICE)
    qs = torch.randint(1, 4, (60,), device=DEVICE)
    blind = torch.tensor([0, 7, 31, 59], device=DEVICE)
    qs[blind] = 0
    out = run(backend, q, k, v, qs, ks, "temporal")
    assert torch.isfinite(out).all()
    assert (out[:, :, blind] == 0).all()
    seen = torch.ones(60, dtype=torch.bool, device=DEVICE)
    seen[blind] = False
    assert_close(out, reference(q, k, v, qs, ks, "temporal"), dtype, rows=seen)
    # all queries blind
    out = run(backend, q, k, v, torch.zeros_like(qs), ks, "temporal")
    assert (out == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views(backend):
    """q, k, v as the model passes them: views of the fused qkv projection permuted to (B, H, N, hd)
    (unit last-dim stride, read in place), plus a view with a non-unit last-dim stride (copied)."""
    b, n, h, hd = 2, 100, 3, 64
    fused = torch.randn(b, n, 3 * h * hd, device=DEVICE)
    q, k, v = fused.view(b, n, 3, h, hd).permute(2, 0, 3, 1, 4)
    assert not q.is_contiguous() and q.stride(-1) == 1
    ks = ids((20, 30, 50), (0, 1, 2))
    for mask in ("full", "temporal"):
        out = run(backend, q, k, v, ks, ks, mask)
        assert out_layout_ok(out)  # what the fake kernel promises torch.compile
        assert_close(out, reference(q, k, v, ks, ks, mask), torch.float32)
    v_t = torch.randn(b, h, hd, n, device=DEVICE).transpose(-1, -2)  # last-dim stride n
    assert_close(run(backend, q, k, v_t), reference(q, k, v_t), torch.float32)


# ---- key-block skipping -------------------------------------------------------------------------------
def test_key_block_skipping():
    """The kernel's pre-pass bounds (n_full, n_end) per query tile equal the torch reference, skip key
    blocks for the uncached temporal W1 layout, and the output still matches."""
    kernel = kernel_module()
    cfg = kernel.Config(64, 32, 4, 2)
    lengths = (24, 40, 64, 8)  # text | frame | video | actions: the W1 pattern at 136 tokens
    ks = ids(lengths, (0, 1, 2, 2))
    q, k, v = qkv(1, 2, 136, 136, 64, torch.float32)
    with use_backend("triton"):  # same dispatch checks as the op
        attention_module.BACKENDS.select(q, k, v, ks, ks, "temporal")
    out, stats = kernel.attention(q, k, v, ks, ks, temporal=True, config=cfg, return_stats=True)
    expected = kernel.key_block_bounds(ks.cpu(), ks.cpu(), cfg.block_m, cfg.block_n)
    assert torch.equal(stats.cpu(), expected)
    total = -(-136 // cfg.block_n)
    assert stats[0, 1].item() < total  # the text/frame tile stops early: 2 of 5 key blocks
    assert stats[:, 1].sum().item() < total * stats.shape[0]
    assert (stats[:, 0] > 0).any() and (stats[:, 0] < stats[:, 1]).any()  # unmasked and masked loops both run
    assert_close(out, reference(q, k, v, ks, ks, "temporal"), torch.float32)
    # full mask: no skipping, only the Nk tail block is masked
    _, stats = kernel.attention(q, k, v, config=cfg, return_stats=True)
    assert (stats[:, 0] == 136 // cfg.block_n).all() and (stats[:, 1] == total).all()


def test_skipped_blocks_are_never_read():
    """NaN in values that no query of a tile can see: a kernel that read those key blocks would turn the
    tile's output into NaN (0 * NaN); with skipping the context queries stay finite and correct."""
    k_lengths = W1_LENGTHS
    ks = ids(k_lengths, W1_GROUPS)
    q, k, v = qkv(1, 1, 1256, 1256, 64, torch.float32)
    cfg = kernel_module().default_config(64, torch.float32, 1256)
    first_noisy = 226 + 256
    poison_from = -(-first_noisy // cfg.block_n) * cfg.block_n  # first key block holding only noisy keys
    v_bad = v.clone()
    v_bad[:, :, poison_from:] = float("nan")
    out = run("triton", q, k, v_bad, ks, ks, "temporal")
    # query tiles made only of context queries (a tile that holds a noisy query reads every block)
    context = torch.arange(1256, device=DEVICE) < first_noisy // cfg.block_m * cfg.block_m
    assert context.any()
    assert_close(out, reference(q, k, v, ks, ks, "temporal"), torch.float32, rows=context)
    assert torch.isnan(out[:, :, first_noisy:]).all()  # noisy queries see the NaN values


# ---- custom op --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    q, k, v = qkv(1, 2, 20, 36, 32, torch.float32)
    ks = ids((10, 6, 20), (0, 1, 2))
    with use_backend(backend):
        torch.library.opcheck(torch.ops.wam_fast.attention.default, (q, k, v, None, None, "full"))
        torch.library.opcheck(torch.ops.wam_fast.attention.default, (q, k, v, ks[16:], ks, "temporal"))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 3, 7, 64, dtype=torch.bfloat16)
        k = torch.empty(2, 3, 11, 64, dtype=torch.bfloat16)
        out = attention(q, k, k, torch.zeros(7, dtype=torch.int64), torch.zeros(11, dtype=torch.int64), "temporal")
    assert out.shape == (2, 3, 7, 64) and out.dtype == torch.bfloat16
    assert out.stride() == (7 * 3 * 64, 64, 3 * 64, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", ["full", "temporal"])
def test_fake_strides_match_real(backend, mask):
    """The fake kernel's strides are the real output's (torch.compile plans views on them), and the
    model's transpose(1, 2).reshape(b, n, -1) of the output is a view (no copy kernel)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    b, h, nq, nk, hd = 2, 3, 49, 60, 32
    q, k, v = qkv(b, h, nq, nk, hd, torch.bfloat16)
    ks = ids((11, 20, 29), (0, 1, 2))
    qs = ks[nk - nq:]
    out = run(backend, q, k, v, qs, ks, mask)
    with FakeTensorMode() as mode:
        fq, fk, fv, fqs, fks = (mode.from_tensor(t) for t in (q, k, v, qs, ks))
        fake = attention(fq, fk, fv, fqs, fks, mask)
    assert fake.stride() == out.stride() and fake.shape == out.shape
    flat = out.transpose(1, 2).reshape(b, nq, h * hd)
    assert flat.data_ptr() == out.data_ptr() and flat._base is not None  # a view
    torch.testing.assert_close(flat, out.transpose(1, 2).contiguous().view(b, nq, h * hd), atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_output_view(backend):
    """torch.compile (fullgraph) of attention + the model's reshape: no graph break, same values."""
    q, k, v = qkv(1, 2, 33, 49, 32, torch.float16)

    def block(q, k, v):
        o = attention(q, k, v)
        return o.transpose(1, 2).reshape(1, 33, -1) * 2

    with use_backend(backend):
        eager = block(q, k, v)
        torch._dynamo.reset()
        compiled = torch.compile(block, backend="aot_eager", fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)


# ---- bad input ---------------------------------------------------------------------------------------
def test_bad_inputs():
    q, k, v = qkv(1, 2, 8, 12, 64, torch.float32)
    qs = torch.zeros(8, dtype=torch.int64, device=DEVICE)
    ks = torch.zeros(12, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim 44 is not supported .takes multiples of 8 up to 256"):
        attention(*qkv(1, 2, 8, 8, 44, torch.float32))
    with pytest.raises(ValueError, match="head_dim 264 is not supported"):
        attention(*qkv(1, 2, 8, 8, 264, torch.float32))
    with pytest.raises(ValueError, match="4 keys but q has 8 queries"):
        attention(q, k[:, :, :4], v[:, :, :4])
    with pytest.raises(ValueError, match="mask must be one of"):
        attention(q, k, v, mask="causal")
    with pytest.raises(ValueError, match="needs q_segments and k_segments"):
        attention(q, k, v, mask="temporal")
    with pytest.raises(ValueError, match="needs q_segments and k_segments"):
        attention(q, k, v, qs, None, mask="temporal")
    with pytest.raises(ValueError, match=r"k_segments must have shape \(12,\)"):
        attention(q, k, v, qs, qs, mask="temporal")
    with pytest.raises(ValueError, match=r"q_segments must have shape \(8,\)"):
        attention(q, k, v, qs[None], ks, mask="temporal")
    with pytest.raises(TypeError, match="int32 or int64"):
        attention(q, k, v, qs.float(), ks, mask="temporal")
    with pytest.raises(TypeError, match="must be a torch.Tensor of segment ids"):
        attention(q, k, v, [0] * 8, ks, mask="temporal")
    with pytest.raises(TypeError, match="k is torch.float16 but q is torch.float32"):
        attention(q, k.half(), v)
    with pytest.raises(ValueError, match="must have 4 dims"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        attention(q, k, v[:, :, :10])
    with pytest.raises(ValueError, match=r"\(B, H, Nk, hd\) = \(1, 2, \*, 64\)"):
        attention(q, k[:, :1], v[:, :1])
    with pytest.raises(TypeError, match="must be one of"):
        attention(q.long(), k.long(), v.long())
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        attention(q.numpy(), k, v)
    meta = torch.empty(12, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="k_segments is on meta but q is on"):
        attention(q, k, v, qs, meta, mask="temporal")
    with pytest.raises(ValueError, match="v is on meta but q is on"):
        attention(q, k, v.to("meta"))


def test_triton_rejects_with_reasons():
    q, k, v = qkv(1, 1, 8, 8, 64, torch.float64)
    reasons = attention_module._rejects_triton(q, k, v, None, None, "full")
    assert any("float64" in r for r in reasons)
    q44 = torch.randn(1, 1, 8, 44, device=DEVICE)
    assert any("head_dim 44" in r for r in attention_module._rejects_triton(q44, q44, q44, None, None, "full"))
    with use_backend("triton"), pytest.raises(RuntimeError, match="float64"):
        torch.ops.wam_fast.attention.default(q, k, v, None, None, "full")


# ---- GPU: W1 shapes -----------------------------------------------------------------------------------
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (W1 shapes: B=1, H=48, N=1256, hd=64)")
@pytest.mark.parametrize("mask,nq", [("full", 1256), ("temporal", 1256), ("temporal", 774)])
def test_w1_triton_vs_torch_gpu(mask, nq):
    q, k, v = qkv(1, 48, nq, 1256, 64, torch.bfloat16)
    ks = ids(W1_LENGTHS, W1_GROUPS)
    qs = ks[1256 - nq:]
    ref = reference(q, k, v, qs, ks, mask)
    out_triton = run("triton", q, k, v, qs, ks, mask)
    out_torch = run("torch", q, k, v, qs, ks, mask)
    err_triton = (out_triton.float() - ref).abs().max().item()
    err_torch = (out_torch.float() - ref).abs().max().item()
    assert err_triton <= 2 * err_torch + 1e-3, (err_triton, err_torch)
    assert_close(out_triton, ref, torch.bfloat16)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_capture_gpu():
    """The temporal path does no host sync: it captures in a CUDA graph and replays correctly."""
    q, k, v = qkv(1, 8, 774, 1256, 64, torch.bfloat16)
    ks = ids(W1_LENGTHS, W1_GROUPS)
    qs = ks[1256 - 774:]
    with use_backend("triton"):
        attention(q, k, v, qs, ks, "temporal")  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = attention(q, k, v, qs, ks, "temporal")
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, reference(q, k, v, qs, ks, "temporal"), torch.bfloat16)
