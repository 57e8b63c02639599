"""The reference WAMTransformer: anatomy, sizes, layouts, masks, RoPE, determinism."""
import dataclasses

import pytest
import torch

import wam_fast
from model_inputs import random_inputs
from wam_fast.ops import reference as WF
from wam_fast.models.layout import build_layout
from wam_fast.models.transformer import AdaLNModulate, Attention, FeedForward, GatedResidualAdaLN, WAMBlock


def tiny(**overrides):
    return wam_fast.WAMTransformer(wam_fast.configs.get("tiny", **overrides))


def count_params(model):
    return sum(p.numel() for p in model.parameters())


# ---- sizes ------------------------------------------------------------------------------------
def test_w1_on_meta_has_5_57b_parameters_1256_tokens_and_allocates_nothing():
    cfg = wam_fast.configs.get("videovla-5b")
    with torch.device("meta"):
        model = wam_fast.WAMTransformer(cfg)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert count_params(model) == pytest.approx(5.57e9, rel=0.01)
    # 18.9 M of each layer is its AdaLN projection (docs/design.md, Model anatomy)
    assert count_params(model.blocks[0].adaln) == pytest.approx(18.9e6, rel=0.01)
    assert len(model.blocks) == 42 and cfg.hidden_dim == 3072 and cfg.ffn_dim == 12288
    assert cfg.num_tokens == 1256 and model.layout().num_tokens == 1256
    assert model.layout().lengths == (226, 1024, 6)
    # the temporal variant runs 774 noisy tokens of 1256 per denoising step
    temporal = dataclasses.replace(cfg, mask="temporal")
    assert temporal.noisy_tokens == 774 and build_layout(temporal).num_tokens == 1256
    sim = wam_fast.configs.get("videovla-5b-sim")
    assert sim.num_tokens == 3560


def test_w1_meta_forward_returns_the_right_shapes():
    cfg = wam_fast.configs.get("videovla-5b")
    with torch.device("meta"):
        model = wam_fast.WAMTransformer(cfg).to(torch.bfloat16)
        inputs = random_inputs(model, batch=1)
        video_out, action_out = model(**inputs)
    assert video_out.shape == (1, 4, 16, 32, 32) and video_out.device.type == "meta"
    assert action_out.shape == (1, 6, 7) and action_out.dtype == torch.bfloat16


def test_tiny_preset_matches_design():
    cfg = wam_fast.configs.get("tiny")
    assert (cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.time_embed_dim) == (2, 4, 16, 32)
    assert (cfg.text_len, cfg.text_dim, cfg.latent_channels, cfg.in_channels) == (8, 32, 4, 8)
    assert (cfg.latent_frames, cfg.latent_height, cfg.patch_size, cfg.action_len, cfg.action_dim) == (2, 8, 2, 4, 7)
    assert cfg.num_tokens == 44
    assert wam_fast.configs.get("videovla-5b").rope_axes == (16, 24, 24)


# ---- forward -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_shapes_and_dtype(dtype):
    model = tiny().to(dtype)
    inputs = random_inputs(model, batch=3)
    video_out, action_out = model(**inputs)
    assert video_out.shape == inputs["video"].shape and video_out.dtype == dtype
    assert action_out.shape == inputs["actions"].shape and action_out.dtype == dtype
    assert torch.isfinite(video_out.float()).all() and torch.isfinite(action_out.float()).all()


def test_forward_is_deterministic_and_seeded_init_is_reproducible():
    torch.manual_seed(1)
    a = tiny()
    torch.manual_seed(1)
    b = tiny()
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    inputs = random_inputs(a)
    out1, out2 = a(**inputs), a(**inputs)
    assert torch.equal(out1[0], out2[0]) and torch.equal(out1[1], out2[1])


def test_every_input_matters():
    """A model that ignored text, image, timestep or the actions would pass shape tests; not this."""
    model = tiny()
    inputs = random_inputs(model)
    base_video, base_actions = model(**inputs)
    for name in ("video", "text", "actions", "image", "timestep"):
        changed = dict(inputs)
        changed[name] = inputs[name] + 0.5 if name != "timestep" else inputs[name] * 0.5
        video_out, action_out = model(**changed)
        assert not torch.allclose(video_out, base_video), name
        assert not torch.allclose(action_out, base_actions), name


def test_robot_id_embedding():
    model = tiny(num_robots=3)
    inputs = random_inputs(model)
    out0 = model(**inputs, robot_id=torch.tensor([0, 0]))
    out2 = model(**inputs, robot_id=torch.tensor([2, 2]))
    assert not torch.allclose(out0[1], out2[1])
    with pytest.raises(ValueError, match="robot_id"):
        model(**inputs)


def test_action_tokens_use_the_video_modulation_set_and_text_its_own():
    model = tiny()
    block = model.blocks[0]
    layout = model.layout()
    ctx = wam_fast.models.transformer.ForwardContext(layout, model.config, torch.device("cpu"))
    temb = torch.randn(2, layout.num_segments, model.config.time_embed_dim)
    mod = block.modulation(temb, ctx)  # (B, S, norm, 3, D)
    table = block.adaln(torch.nn.functional.silu(temb)).view(2, layout.num_segments, 2, 2, 3, -1)
    text, video, actions = layout.index("text"), layout.index("video"), layout.index("actions")
    assert torch.equal(mod[:, text], table[:, text, :, 1])  # CogVideoX order: video set first, text second
    assert torch.equal(mod[:, video], table[:, video, :, 0])
    assert torch.equal(mod[:, actions], table[:, actions, :, 0])


# ---- layouts and the temporal mask --------------------------------------------------------------
def hand_built_mask(layout):
    """Boolean (N, N), built token by token from the rule of docs/design.md, KV cache as wam_fast states
    it: text sees text; a clean frame sees text and itself; noisy tokens see everything."""
    owner = []  # "text", ("frame", f) or "noisy"
    frame = 0
    for name, n in zip(layout.names, layout.lengths):
        for i in range(n):
            if name == "text":
                owner.append("text")
            elif name in ("history", "current"):
                owner.append(("frame", frame + i // layout.tokens_per_frame))
            else:
                owner.append("noisy")
        if name in ("history", "current"):
            frame += n // layout.tokens_per_frame
    n = len(owner)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            mask[i, j] = owner[i] == "noisy" or owner[j] == "text" or owner[i] == owner[j]
    return mask


def test_temporal_mask_equals_hand_built_mask():
    model = tiny(mask="temporal", history_frames=2)
    layout = model.layout(num_history=2)
    assert layout.names == ("text", "history", "current", "video", "actions")
    assert layout.lengths == (8, 32, 16, 16, 4)
    built = layout.attention_mask()
    assert torch.equal(built, hand_built_mask(layout))
    # video and actions attend to each other both ways; text never sees noisy tokens; the two history
    # frames (tokens 8..23 and 24..39) never see each other, nor the current frame (40..55)
    assert built[-1, 60].item() and built[60, -1].item() and not built[0, 60].item()
    assert built[10, 0].item() and built[10, 20].item() and not built[10, 30].item() and not built[45, 10].item()
    assert built[60, 10].item() and built[60, 45].item()
    assert torch.equal(tiny().layout().attention_mask(), torch.ones(44, 44, dtype=torch.bool))


def explicit_temporal_attention(q, k, k_seen, v, layout):
    """One SDPA with an explicit mask over N + history keys: clean frames see their keys as encoded
    (k); noisy queries see the history frames' keys at their age (k_seen, rotated directly at those
    positions: an independent route to what the model computes by shifting the encoded keys)."""
    text, context, n = layout.text_len, layout.context_len, layout.num_tokens
    history = context - text - (layout.tokens_per_frame if "current" in layout.names else 0)
    mask = layout.attention_mask()
    noisy_rows = torch.arange(n) >= context
    mask[noisy_rows, text:text + history] = False  # noisy rows see the aged copies instead
    extra = torch.zeros(n, history, dtype=torch.bool)
    extra[noisy_rows] = True
    keys = torch.cat((k, k_seen[:, :, text:text + history]), dim=2)
    values = torch.cat((v, v[:, :, text:text + history]), dim=2)
    return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=torch.cat((mask, extra), 1))


@pytest.mark.parametrize("num_history", [0, 1, 2])
def test_temporal_model_equals_sdpa_with_the_explicit_mask(num_history):
    """Swap every block's attention for one SDPA with the hand-built rule and key positions computed
    directly from layout.frame_positions: outputs must not change."""
    model = tiny(mask="temporal", history_frames=2)
    inputs = random_inputs(model, num_history=num_history)
    reference = model(**inputs)
    grid = model.config.latent_height // model.config.patch_size
    seen_cos, seen_sin = WF.rope_cos_sin(model.layout(num_history).frame_positions, grid, grid, model.config.rope_axes)

    class ExplicitMaskAttention(Attention):
        def forward(self, x, ctx):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            norms = (self.norm_q.weight, self.norm_q.bias, self.norm_k.weight, self.norm_k.bias)
            q2, k2 = WF.qk_norm_rope(q, k, *norms, ctx.rope_cos, ctx.rope_sin, ctx.rope_start, ctx.rope_end,
                                     self.norm_q.eps)
            _, k_seen = WF.qk_norm_rope(q, k, *norms, seen_cos, seen_sin, ctx.rope_start, ctx.rope_end,
                                        self.norm_q.eps)
            o = explicit_temporal_attention(q2, k2, k_seen, v, ctx.layout)
            return self.out(o.transpose(1, 2).reshape(b, n, -1))

    for block in model.blocks:
        swapped = ExplicitMaskAttention(model.config.hidden_dim, model.config.num_heads,
                                        model.config.head_dim, model.config.qk_norm_eps)
        swapped.load_state_dict(block.attn.state_dict())
        block.attn = swapped
    out = model(**inputs)
    torch.testing.assert_close(out[0], reference[0], rtol=0, atol=2e-6)
    torch.testing.assert_close(out[1], reference[1], rtol=0, atol=2e-6)


def capture_block_inputs(model, inputs):
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone())) for b in model.blocks]
    model(**inputs)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("mask", ["temporal", "full"])
def test_context_tokens_never_see_noisy_tokens_under_the_temporal_mask(mask):
    """With mask="temporal", text and clean frames' hidden states ignore the noisy tokens and the
    denoising timestep (what makes their K/V cacheable); with mask="full" they do not."""
    overrides = dict(mask=mask, history_frames=1) if mask == "temporal" else dict(mask=mask)
    model = tiny(**overrides)
    inputs = random_inputs(model, num_history=1 if mask == "temporal" else 0)
    other = dict(inputs, video=torch.randn_like(inputs["video"]), actions=torch.randn_like(inputs["actions"]),
                 timestep=inputs["timestep"] * 0.3)
    layout = model.layout(num_history=1) if mask == "temporal" else model.layout()
    context = layout.start("video") if mask == "temporal" else layout.lengths[0]
    for h1, h2 in zip(capture_block_inputs(model, inputs)[1:], capture_block_inputs(model, other)[1:]):
        same = torch.equal(h1[:, :context], h2[:, :context])
        assert same == (mask == "temporal")


def test_a_clean_frame_is_encoded_the_same_whatever_its_age_and_window():
    """The property a rolling KV cache needs: a frame's hidden states at every layer are the same
    when it is the current frame, or a history frame 1 or 2 steps old next to other frames."""
    model = tiny(mask="temporal", history_frames=2)
    inputs = random_inputs(model)
    frame, other, older = inputs["image"], torch.randn_like(inputs["image"]), torch.randn_like(inputs["image"])
    tpf, text = model.config.tokens_per_frame, model.config.text_len
    as_current = capture_block_inputs(model, inputs)
    as_history1 = capture_block_inputs(model, dict(inputs, history=frame, image=other))
    as_history2 = capture_block_inputs(model, dict(inputs, history=torch.cat((older, frame), 1), image=other))
    frame_2 = slice(text + tpf, text + 2 * tpf)  # second of two history frames
    for h0, h1, h2 in zip(as_current, as_history1, as_history2):
        torch.testing.assert_close(h1[:, text:text + tpf], h0[:, text:text + tpf], rtol=0, atol=1e-6)
        torch.testing.assert_close(h2[:, frame_2], h0[:, text:text + tpf], rtol=0, atol=1e-6)
    # ...while the noisy tokens do see the history and each frame's age
    out1 = model(**dict(inputs, history=frame, image=other))
    out2 = model(**dict(inputs, history=torch.cat((frame, older), 1), image=other))
    assert not torch.allclose(out1[1], out2[1], atol=1e-4)


def test_temporal_layout_segment_timesteps_and_positions():
    model = tiny(mask="temporal", history_frames=3)
    layout = model.layout(num_history=2)
    # current frame always at position history_frames; history right before it; future after
    assert layout.frame_positions == (1, 2, 3, 4)
    # each clean frame is encoded at the current frame's position; the noisy tokens see its age
    assert layout.rope_positions == (3, 3, 3, 4) and layout.history_key_shifts == (-2, -1, 0)
    assert layout.clean_frames == 3 and layout.context_len == 8 + 3 * 16
    t = layout.segment_timesteps(torch.tensor([500.0]))
    assert t.tolist() == [[0.0, 0.0, 0.0, 500.0, 500.0]]
    full = tiny().layout()
    assert full.segment_timesteps(torch.tensor([7.0])).tolist() == [[7.0, 7.0, 7.0]]


def test_per_segment_timesteps_override_the_default():
    model = tiny(mask="temporal")
    inputs = random_inputs(model)
    b = inputs["video"].shape[0]
    explicit = torch.stack([torch.zeros(b), torch.zeros(b), inputs["timestep"], inputs["timestep"]], dim=1)
    default = model(**inputs)
    same = model(**dict(inputs, timestep=explicit))
    torch.testing.assert_close(same[0], default[0], rtol=0, atol=0)
    noisy_context = explicit.clone()
    noisy_context[:, 1] = 300.0  # the current frame at t=300 instead of clean
    assert not torch.allclose(model(**dict(inputs, timestep=noisy_context))[1], default[1])


def test_temporal_variant_loads_the_full_models_weights():
    full = tiny()
    temporal = tiny(mask="temporal")
    temporal.load_state_dict(full.state_dict())
    inputs = random_inputs(temporal)
    video_out, action_out = temporal(**inputs)
    assert video_out.shape == (2, 1, 4, 8, 8) and action_out.shape == (2, 4, 7)


def test_image_is_zero_padded_and_concatenated_in_the_full_layout():
    model = tiny()
    inputs = random_inputs(model)
    zeros_image = dict(inputs, image=torch.zeros_like(inputs["image"]))
    no_image = dict(inputs, image=None)
    torch.testing.assert_close(model(**zeros_image)[1], model(**no_image)[1], rtol=0, atol=0)


# ---- RoPE ---------------------------------------------------------------------------------------
def test_rope_touches_only_the_video_slice_and_is_a_rotation():
    torch.manual_seed(3)
    q, k = torch.randn(2, 2, 20, 16), torch.randn(2, 2, 20, 16)
    ones, zeros = torch.ones(16), torch.zeros(16)
    cos, sin = WF.rope_cos_sin((0, 1), 2, 2, (4, 6, 6))  # 8 video tokens
    q2, k2 = WF.qk_norm_rope(q, k, ones, zeros, ones, zeros, cos, sin, 5, 13)
    qn = torch.nn.functional.layer_norm(q, (16,), eps=1e-6)
    torch.testing.assert_close(q2[..., :5, :], qn[..., :5, :])
    torch.testing.assert_close(q2[..., 13:, :], qn[..., 13:, :])
    assert not torch.allclose(q2[..., 6:13, :], qn[..., 6:13, :])
    torch.testing.assert_close(q2.norm(dim=-1), qn.norm(dim=-1))  # rotations keep the norm
    # interleaved pairs: the first pair of token 1 (frame 0, row 0, col 1) is unrotated on the
    # t axis (position 0) while the w-axis pairs rotate by angle 1 * theta**0 = 1 rad
    x = torch.zeros(1, 1, 8, 16)
    x[..., 10] = 1.0  # first pair of the w axis (t: 0-3, h: 4-9, w: 10-15)
    rotated = WF.apply_rope(x, cos, sin)
    assert rotated[0, 0, 1, 10].item() == pytest.approx(torch.cos(torch.tensor(1.0)).item(), abs=1e-6)
    assert rotated[0, 0, 1, 11].item() == pytest.approx(torch.sin(torch.tensor(1.0)).item(), abs=1e-6)


def test_rope_relative_positions_make_scores_shift_invariant():
    """q.k after RoPE depends only on the offset of frame positions: shifting all frames by one
    (what a rolling history does) keeps every score."""
    torch.manual_seed(4)
    q, k = torch.randn(1, 1, 8, 16), torch.randn(1, 1, 8, 16)
    cos0, sin0 = WF.rope_cos_sin((0, 1), 2, 2, (4, 6, 6))
    cos1, sin1 = WF.rope_cos_sin((5, 6), 2, 2, (4, 6, 6))
    s0 = WF.apply_rope(q, cos0, sin0) @ WF.apply_rope(k, cos0, sin0).transpose(-1, -2)
    s1 = WF.apply_rope(q, cos1, sin1) @ WF.apply_rope(k, cos1, sin1).transpose(-1, -2)
    torch.testing.assert_close(s0, s1, rtol=1e-5, atol=1e-5)


# ---- named, swappable pieces ----------------------------------------------------------------------
def test_model_is_built_from_named_swappable_pieces():
    model = tiny()
    block = model.blocks[0]
    assert isinstance(block, WAMBlock)
    assert isinstance(block.norm1, AdaLNModulate) and isinstance(block.norm2, GatedResidualAdaLN)
    assert isinstance(block.attn, Attention) and isinstance(block.ff, FeedForward)
    inputs = random_inputs(model)
    reference = model(**inputs)

    calls = []

    class CountingFeedForward(FeedForward):
        def forward(self, x):
            calls.append(x.shape)
            return super().forward(x)

    for b in model.blocks:
        swapped = CountingFeedForward(model.config.hidden_dim, model.config.ffn_dim)
        swapped.load_state_dict(b.ff.state_dict())
        b.ff = swapped
    out = model(**inputs)
    assert len(calls) == model.config.num_layers
    torch.testing.assert_close(out[0], reference[0], rtol=0, atol=0)


def test_temporal_attention_plan_equals_the_explicit_mask_and_context_ignores_noisy_keys():
    """TemporalAttention (what the model runs, and the cache over its buffers) against one
    explicitly masked SDPA; its context rows never read a noisy key (NaN there changes nothing)."""
    from wam_fast.models.transformer import TemporalAttention, layout_tables

    cfg = wam_fast.configs.get("tiny", mask="temporal", history_frames=2)
    layout = build_layout(cfg, num_history=2)
    n, context = layout.num_tokens, layout.context_len
    grid = cfg.latent_height // cfg.patch_size
    torch.manual_seed(0)
    q, k_raw, v = (torch.randn(2, 4, n, 16) for _ in range(3))

    def rotate(positions):
        cos, sin = WF.rope_cos_sin(positions, grid, grid, cfg.rope_axes)
        start, end = layout.video_span
        return torch.cat((k_raw[:, :, :start], WF.apply_rope(k_raw[:, :, start:end], cos, sin), k_raw[:, :, end:]), 2)

    k, k_seen = rotate(layout.rope_positions), rotate(layout.frame_positions)
    plan = TemporalAttention(layout, layout_tables(layout, cfg, torch.device("cpu")))
    out = plan(q, k, v, 0, WF.attention)
    torch.testing.assert_close(out, explicit_temporal_attention(q, k, k_seen, v, layout), rtol=0, atol=1e-5)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, context:], v2[:, :, context:] = float("nan"), float("nan")
    torch.testing.assert_close(plan(q, k2, v2, 0, WF.attention)[:, :, :context], out[:, :, :context], rtol=0, atol=0)


def test_layout_tables_made_under_inference_mode_serve_a_training_forward():
    """The per-layout RoPE / segment tables are kept across forwards: made first under inference_mode
    (an eval rollout), they must still serve a forward that autograd records (training)."""
    from wam_fast.models import transformer

    cfg = wam_fast.configs.get("tiny", mask="temporal", history_frames=1, latent_height=6)  # a layout no other test made
    model = wam_fast.WAMTransformer(cfg)
    c = cfg
    args = (torch.randn(1, c.noisy_frames, c.latent_channels, c.latent_height, c.latent_width),
            torch.randn(1, c.text_len, c.text_dim), torch.randn(1, c.action_len, c.action_dim), torch.full((1,), 500.0))
    image = torch.randn(1, 1, c.latent_channels, c.latent_height, c.latent_width)
    transformer._LAYOUT_TABLES.clear()
    with torch.inference_mode():
        model(*args, image=image)
    assert all(not t.is_inference() for tables in transformer._LAYOUT_TABLES.values()
               for t in tables.values() if isinstance(t, torch.Tensor))
    video_out, action_out = model(*args, image=image)
    (video_out.square().mean() + action_out.square().mean()).backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
