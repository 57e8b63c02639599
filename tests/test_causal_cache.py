"""wam_fast.compiler.CausalKVCache: a GR-1-style causal policy stepped with per-layer K/V caches equals the
uncached causal encoder on the whole sequence."""
import pytest
import torch
import torch.nn as nn

from wam_fast.compiler import CausalKVCache


def encoder(norm_first, activation, final_norm):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, activation=activation, batch_first=True,
                                       norm_first=norm_first)
    return nn.TransformerEncoder(layer, 3, norm=nn.LayerNorm(64) if final_norm else None,
                                 enable_nested_tensor=False).eval()


@pytest.mark.parametrize("norm_first,activation,final_norm", [(False, "relu", False), (True, "gelu", True)])
def test_stepped_equals_uncached(norm_first, activation, final_norm):
    model = encoder(norm_first, activation, final_norm)
    cache = CausalKVCache(model)
    g = torch.Generator().manual_seed(1)
    chunks = [torch.randn(2, n, 64, generator=g) for n in (5, 2, 5, 2, 7)]  # [OBS] then [ACT] tokens, 3 steps
    stepped = [cache.step(c) for c in chunks]
    seq = torch.cat(chunks, dim=1)
    mask = nn.Transformer.generate_square_subsequent_mask(seq.shape[1])
    with torch.no_grad():
        full = model(seq, mask=mask, is_causal=True)
    start = 0
    for c, got in zip(chunks, stepped):
        torch.testing.assert_close(got, full[:, start:start + c.shape[1]], atol=1e-5, rtol=1e-5)
        start += c.shape[1]
    assert cache.length == seq.shape[1]
    cache.reset()
    torch.testing.assert_close(cache.step(chunks[0]), stepped[0], atol=0, rtol=0)  # a new episode


def test_bad_input_and_limits():
    model = encoder(False, "relu", False)
    with pytest.raises(TypeError, match="expects an nn.TransformerEncoder"):
        CausalKVCache(model.layers[0])
    cache = CausalKVCache(model, max_tokens=6)
    cache.step(torch.randn(1, 4, 64))
    with pytest.raises(ValueError, match="exceed max_tokens=6"):
        cache.step(torch.randn(1, 3, 64))
    with pytest.raises(ValueError, match="differs from the cached episode"):
        cache.step(torch.randn(2, 1, 64))
    with pytest.raises(ValueError, match=r"\(B, n, D\)"):
        cache.step(torch.randn(4, 64))
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        CausalKVCache(model).step(torch.randn(1, 2, 64))
