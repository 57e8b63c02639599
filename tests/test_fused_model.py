"""The fused model path (wam_fast.models.fused): the reference WAMTransformer with its block pieces
swapped for wam_fast.ops must give the unfused outputs (fp32 and bf16), keep its parameters and
checkpoints, run every op's Triton kernel (on the GPU, or interpreted on CPU), and compile as one graph."""
import copy

import pytest
import torch

import wam_fast
from wam_fast import configs
from wam_fast.models import fused
from wam_fast.ops import use_backend
from wam_fast.ops.registry import triton_reason
from devices import kernel_device
from model_inputs import random_inputs

needs_triton = pytest.mark.skipif(triton_reason() is not None, reason=str(triton_reason()))


def _pair(config, dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    reference = wam_fast.WAMTransformer(config).to(device, dtype).eval()
    fast = copy.deepcopy(reference)
    fused.fuse(fast)
    return reference, fast


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def test_fuse_swaps_pieces_and_keeps_parameters():
    model = wam_fast.WAMTransformer(configs.get("tiny"))
    keys = list(model.state_dict())
    params = {n: p.data_ptr() for n, p in model.named_parameters()}
    swapped = fused.fuse(model)
    layers = model.config.num_layers
    assert sorted({s["to"] for s in swapped}) == ["FusedAdaLNModulate", "FusedAttention", "FusedFeedForward",
                                                 "FusedGatedResidualAdaLN", "FusedWAMBlock"]
    assert len(swapped) == 5 * layers
    assert type(model.blocks[0]) is fused.FusedWAMBlock
    assert type(model.blocks[0].attn) is fused.FusedAttention
    assert list(model.state_dict()) == keys  # checkpoints load either way
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == params  # shared, not copied
    assert fused.fuse(model) == []  # idempotent
    assert len(fused.unfuse(model)) == 5 * layers
    assert type(model.blocks[0].attn) is wam_fast.models.transformer.Attention


def test_fuse_filter_fn():
    model = wam_fast.WAMTransformer(configs.get("tiny"))
    swapped = fused.fuse(model, filter_fn=lambda module, name: name.startswith("blocks.0."))
    assert swapped and all(s["name"].startswith("blocks.0.") for s in swapped)
    assert type(model.blocks[1].ff) is wam_fast.models.transformer.FeedForward


CASES = {
    "full": (configs.get("tiny"), {}),
    "temporal": (configs.get("tiny", mask="temporal", history_frames=2), {"num_history": 2}),
}


@needs_triton
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_matches_reference_fp32(case):
    config, extra = CASES[case]
    reference, fast = _pair(config, device=kernel_device())
    inputs = random_inputs(reference, batch=2, **extra)
    with torch.no_grad():
        want = reference(**inputs)
        with use_backend("triton"):  # every op through its kernel: an error if one cannot take the call
            got = fast(**inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-4, rtol=2e-4)


@needs_triton
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_matches_reference_bf16(case):
    """bf16 fused is as close to the fp32 model as bf16 unfused is (at most 2x its error + a floor)."""
    config, extra = CASES[case]
    reference32, _ = _pair(config, device=kernel_device())
    reference16, fast16 = _pair(config, torch.bfloat16, kernel_device())
    inputs = random_inputs(reference32, batch=2, **extra)
    inputs16 = {k: v.to(torch.bfloat16) if v is not None and v.is_floating_point() and k != "timestep" else v
                for k, v in inputs.items()}
    with torch.no_grad():
        want = reference32(**inputs)
        eager = reference16(**inputs16)
        with use_backend("triton"):
            got = fast16(**inputs16)
    for g, e, w in zip(got, eager, want):
        assert g.dtype == torch.bfloat16
        assert _max_err(g, w) <= 2 * _max_err(e, w) + 1e-2, (_max_err(g, w), _max_err(e, w))


def test_fused_torch_backend_equals_reference():
    """The torch backend of every op is the reference's own math: same numbers."""
    reference, fast = _pair(configs.get("tiny", mask="temporal", history_frames=2))
    inputs = random_inputs(reference, batch=2, num_history=1)
    with torch.no_grad(), use_backend("torch"):
        for g, w in zip(fast(**inputs), reference(**inputs)):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@needs_triton
def test_fused_sample_same_actions():
    """A whole action chunk (2 DDIM steps + CFG) from the fused model equals the reference's."""
    reference, fast = _pair(configs.get("tiny"))
    inputs = random_inputs(reference, batch=1)
    kw = dict(text=inputs["text"], image=inputs["image"], sampler="ddim", steps=2, cfg_scale=3.0, seed=0)
    with torch.no_grad():
        want = wam_fast.sample(reference, **kw).actions
        got = wam_fast.sample(fast, **kw).actions
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


@needs_triton
def test_fused_block_compiles_fullgraph():
    """torch.compile(fullgraph=True) over a block built from the ops: each op is one custom op in the graph."""
    from wam_fast.models.transformer import ForwardContext

    reference, fast = _pair(configs.get("tiny"))
    inputs = random_inputs(reference, batch=1)
    layout = reference.layout()
    ctx = ForwardContext(layout, reference.config, torch.device("cpu"))
    h = torch.randn(1, reference.config.num_tokens, reference.config.hidden_dim)
    temb = torch.randn(1, layout.num_segments, reference.config.time_embed_dim)
    block = fast.blocks[0]
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        got = compiled(h, temb, ctx)
        want = reference.blocks[0](h, temb, ctx)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    del inputs
