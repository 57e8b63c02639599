"""Kernels per layer per pass, host copies and graph breaks: the launch budget of issue #23 (one-graph),
checked on the CPU (a TorchDispatchMode sees every kernel; wam_fast custom ops count as one).

Budget per layer: a cached denoising step and a frame pass <= 10 kernels in bf16, <= 12 in FP8. The exact
counts are pinned, so a change that adds a launch to a layer fails here and says which op it added.
"""
import pytest
import torch

import wam_fast
from wam_fast.bench import kernels as K
from wam_fast.cache import TemporalKVCache

CFG = wam_fast.configs.get("tiny", mask="temporal", history_frames=2)

# (variant, pass) -> kernels per layer. fused step: adaln_modulate, qkv GEMM, qk_norm_rope (+ the K/V
# cache writes), attention, out GEMM, gated_residual_adaln, ffn_gelu, FFN-out GEMM, gated_residual;
# the frame pass adds the copy of its keys into the encoded keys. FP8: 4 fp8_linear + 2 quantize_rowwise
# (attention output; GELU + quantization of the FFN hidden state) in place of 3 GEMMs + ffn_gelu.
PINNED = {
    ("eager", "uncached"): 65, ("eager", "text"): 44, ("eager", "frame"): 46, ("eager", "step"): 45,
    ("fused", "uncached"): 24, ("fused", "text"): 12, ("fused", "frame"): 10, ("fused", "step"): 9,
    ("fp8", "uncached"): 26, ("fp8", "text"): 14, ("fp8", "frame"): 12, ("fp8", "step"): 11,
}
BUDGET = {"fused": 10, "fp8": 12}


@pytest.fixture(scope="module")
def counts():
    return {(c.variant, c.pass_name): c for c in K.count_all(CFG)}


def test_kernels_per_layer_are_pinned(counts):
    got = {key: c.per_layer for key, c in counts.items()}
    assert got == PINNED, "\n" + K.format_counts(list(counts.values()))


@pytest.mark.parametrize("variant", sorted(BUDGET))
def test_cached_step_and_frame_pass_fit_the_budget(counts, variant):
    for pass_name in ("step", "frame"):
        c = counts[(variant, pass_name)]
        assert c.per_layer <= BUDGET[variant], f"{variant} {pass_name}: {c.layer_ops}"
    step = counts[(variant, "step")].layer_ops
    assert "aten.copy_" not in step and "aten.clone" not in step  # K/V land in the cache from the kernel
    assert "aten.silu" not in step  # AdaLN tables precomputed for the step grid


def test_fp8_activations_are_quantized_by_one_kernel_each(counts):
    ops = counts[("fp8", "step")].layer_ops
    assert ops["wam_fast.quantize_rowwise"] == 2 and ops["wam_fast.fp8_linear"] == 4
    assert not {"aten.amax", "aten.abs", "aten.div", "aten.gelu"} & set(ops)


def test_no_tensor_is_made_from_host_data_inside_a_pass(counts):
    """torch.tensor(python data) in a forward is a host-to-device copy on a GPU (and a graph break)."""
    assert {key: c.host_copies for key, c in counts.items() if c.host_copies} == {}


def test_the_counter_sees_a_copy():
    """Mutation guard: an extra launch inside a block is counted."""
    model = K.build_variant(CFG, "fused", torch.float32, "cpu")
    c = CFG
    video = torch.randn(1, c.noisy_frames, c.latent_channels, c.latent_height, c.latent_width)
    actions, text = torch.randn(1, c.action_len, c.action_dim), torch.randn(1, c.text_len, c.text_dim)
    image = torch.randn(1, 1, c.latent_channels, c.latent_height, c.latent_width)
    run = lambda: model(video, text, actions, torch.full((1,), 500.0), image=image)  # noqa: E731
    with torch.no_grad():
        base = K.count_pass(model, run, "fused", "uncached").per_layer
        handle = model.blocks[0].register_forward_hook(lambda m, i, out: out.clone())
        try:
            more = K.count_pass(model, run, "fused", "uncached").per_layer
        finally:
            handle.remove()
    assert more == base + 0.5  # one clone in one of the two layers


# ---- graph breaks ---------------------------------------------------------------------------------------
def _explain(fn, *args):
    torch._dynamo.reset()
    try:
        return torch._dynamo.explain(fn)(*args)
    finally:
        torch._dynamo.reset()


def _model(variant, dtype, **overrides):
    config = wam_fast.configs.get("tiny", mask="temporal", history_frames=2, **overrides)
    return K.build_variant(config, variant, dtype, "cpu")


@pytest.mark.parametrize("variant", ["fused", "fp8"])
def test_no_graph_breaks_in_the_uncached_forward(variant):
    model = _model(variant, torch.bfloat16)
    c = model.config
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(shape, generator=g).to(torch.bfloat16)

    args = (r(1, c.noisy_frames, c.latent_channels, c.latent_height, c.latent_width), r(1, c.text_len, c.text_dim),
            r(1, c.action_len, c.action_dim), torch.full((1,), 500.0))
    image, history = r(1, 1, c.latent_channels, c.latent_height, c.latent_width), \
        r(1, 2, c.latent_channels, c.latent_height, c.latent_width)
    with torch.no_grad():
        explained = _explain(lambda *a: model(*a, image=image, history=history), *args)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("variant", ["fused", "fp8"])
def test_no_graph_breaks_in_the_cached_frame_pass_and_step(variant):
    model = _model(variant, torch.bfloat16, distillation="shortcut", distilled_steps=(2,))
    c = model.config
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(shape, generator=g).to(torch.bfloat16)

    cache = TemporalKVCache(model).setup(1, 2)
    with torch.no_grad():
        cache.fill_text(r(1, c.text_len, c.text_dim))
        cache.set_grid([999.0, 500.0], 500.0)
        image = r(1, 1, c.latent_channels, c.latent_height, c.latent_width)
        frame = _explain(lambda x: cache.frame_pass(x, 1), image)
        video, actions = r(1, c.noisy_frames, c.latent_channels, c.latent_height, c.latent_width), \
            r(1, c.action_len, c.action_dim)
        step = _explain(lambda v, a: cache.denoise_at(1, v, a), video, actions)
    for name, explained in (("frame pass", frame), ("step", step)):
        assert explained.graph_break_count == 0, (name, [b.reason for b in explained.break_reasons])
