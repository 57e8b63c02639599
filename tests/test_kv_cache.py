"""The temporal-masked KV cache and WAMPolicy: cached == uncached, only noisy tokens per denoising
step, eviction, refusal of bidirectional models, bad input."""
import pytest
import torch

import wam_fast
from wam_fast.cache import TemporalKVCache, cache_bytes, chunk_cost
from wam_fast.models.fused import fuse
from wam_fast.models.transformer import Attention
from devices import kernel_device

CONTROL_STEPS = 6  # with history 2 (3 ring slots) the frames of steps 0, 1, 2 are evicted


def temporal_model(history=2, dtype=torch.float32, seed=0, device="cpu", **overrides):
    torch.manual_seed(seed)
    cfg = wam_fast.configs.get("tiny", mask="temporal", history_frames=history, **overrides)
    return wam_fast.WAMTransformer(cfg).to(device, dtype).eval()


def episode(model, batch=2, steps=CONTROL_STEPS, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    param = next(model.parameters())
    text = torch.randn(batch, c.text_len, c.text_dim, generator=g).to(param.device, param.dtype)
    frames = [torch.randn(batch, 1, c.latent_channels, c.latent_height, c.latent_width, generator=g)
              .to(param.device, param.dtype) for _ in range(steps)]
    return text, frames


def run_policy(model, text, frames, cache, history=None, **kwargs):
    options = dict(steps=3, sampler="ddim", seed=0, cfg_scale=1.0)
    options.update(kwargs)
    policy = wam_fast.WAMPolicy(model, cache=cache, history=history, **options)
    policy.reset(text)
    return [policy.act(f) for f in frames], policy


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


# ---- exactness ------------------------------------------------------------------------------------
@pytest.mark.parametrize("history,sampler,cfg_scale", [
    (2, "ddim", 1.0),
    (2, "dpm++2m-sde", 4.0),  # sampler noise and guidance rows must line up too
    (1, "ddim", 4.0),
    (0, "dpm++2m", 1.0),
])
def test_cached_policy_equals_uncached_policy_fp32(history, sampler, cfg_scale):
    model = temporal_model(history=2)
    text, frames = episode(model)
    uncached, _ = run_policy(model, text, frames, cache=False, history=history, sampler=sampler, cfg_scale=cfg_scale)
    cached, policy = run_policy(model, text, frames, cache=True, history=history, sampler=sampler, cfg_scale=cfg_scale)
    assert policy.cache.step == CONTROL_STEPS and policy.cache.frames == history + 1  # the ring is full
    for step, (u, c) in enumerate(zip(uncached, cached)):
        assert max_diff(c.actions, u.actions) <= 1e-5, step
        assert max_diff(c.video, u.video) <= 1e-5, step
        assert c.nfe == u.nfe == 3 * (2 if cfg_scale != 1.0 else 1)


def test_cached_policy_with_robot_ids_equals_uncached():
    model = temporal_model(history=1, num_robots=3)
    text, frames = episode(model, steps=3)
    robot_id = torch.tensor([2, 0])
    chunks = {}
    for cache in (False, True):
        policy = wam_fast.WAMPolicy(model, steps=2, cache=cache, seed=0, cfg_scale=3.0)
        policy.reset(text)
        chunks[cache] = [policy.act(f, robot_id=robot_id) for f in frames]
        with pytest.raises(ValueError, match=r"pass robot_id \(B,\)"):
            policy.act(frames[0])
    for u, c in zip(chunks[False], chunks[True]):
        assert max_diff(c.actions, u.actions) <= 1e-5
    other = wam_fast.WAMPolicy(model, steps=2, seed=0, cfg_scale=3.0)
    other.reset(text)
    assert max_diff(other.act(frames[0], robot_id=torch.tensor([1, 1])).actions, chunks[True][0].actions) > 1e-4


def test_cached_policy_bf16_is_within_bf16_rounding_of_the_uncached_run():
    """bf16 cached vs bf16 uncached: the cached run is no further from the fp32 run than 2x the
    uncached bf16 run is (flash-attention's rule), and the two bf16 runs are close."""
    model = temporal_model(history=2)
    text, frames = episode(model)
    reference, _ = run_policy(model, text, frames, cache=False)
    model16 = temporal_model(history=2).to(torch.bfloat16)
    text16, frames16 = text.bfloat16(), [f.bfloat16() for f in frames]
    uncached, _ = run_policy(model16, text16, frames16, cache=False)
    cached, _ = run_policy(model16, text16, frames16, cache=True)
    for r, u, c in zip(reference, uncached, cached):
        for field in ("actions", "video"):
            bf16_error = max_diff(getattr(u, field), getattr(r, field))
            assert bf16_error > 0  # the bf16 run really is bf16
            assert max_diff(getattr(c, field), getattr(r, field)) <= 2 * bf16_error + 1e-6
            assert max_diff(getattr(c, field), getattr(u, field)) <= 2 * bf16_error + 1e-6


def test_fused_model_with_cache_equals_reference_uncached():
    """The cache over the fused ops (Triton attention with segment ids over the buffers, qk_norm_rope
    with an empty RoPE range for the text pass) against the reference model without a cache."""
    reference = temporal_model(history=1, device=kernel_device())
    fused = temporal_model(history=1, device=kernel_device())
    fuse(fused)
    text, frames = episode(reference, steps=3)
    uncached, _ = run_policy(reference, text, frames, cache=False, steps=2)
    with wam_fast.ops.use_backend("triton"):
        cached, _ = run_policy(fused, text, frames, cache=True, steps=2)
    for u, c in zip(uncached, cached):
        assert max_diff(c.actions, u.actions) <= 1e-4
        assert max_diff(c.video, u.video) <= 1e-4


# ---- the cache is used ----------------------------------------------------------------------------
def count_tokens(model):
    seen = []
    handle = model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    return seen, handle


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_each_denoising_step_sends_only_the_noisy_tokens_through_the_model(cfg_scale):
    model = temporal_model(history=2)
    c = model.config
    text, frames = episode(model, steps=3)
    seen, handle = count_tokens(model)
    policy = wam_fast.WAMPolicy(model, steps=4, cache=True, seed=0, cfg_scale=cfg_scale)
    policy.reset(text)
    assert seen == [c.text_len]  # text: once per instruction
    for frame in frames:
        seen.clear()
        policy.act(frame)
        # the new frame once, then 4 denoising steps of the noisy tokens only (16 video + 4 actions)
        assert seen == [c.tokens_per_frame] + [c.noisy_tokens] * 4
    assert c.noisy_tokens == 20
    seen.clear()
    uncached = wam_fast.WAMPolicy(model, steps=4, cache=False, seed=0, cfg_scale=cfg_scale)
    uncached.reset(text)
    for frame in frames:
        uncached.act(frame)
    handle.remove()
    # without the cache every step runs text + history + current + noisy (8 + h*16 + 16 + 20)
    assert seen == [44] * 4 + [60] * 4 + [76] * 4


@pytest.mark.parametrize("cache", [False, True])
def test_chunk_cost_counts_the_tokens_the_model_runs(cache):
    """bench's accounting (chunk_cost) against the tokens a hook counts, with a full history window."""
    model = temporal_model(history=2)
    text, frames = episode(model, steps=4)
    seen, handle = count_tokens(model)
    policy = wam_fast.WAMPolicy(model, steps=3, cache=cache, seed=0, cfg_scale=1.0)
    policy.reset(text)
    text_tokens = sum(seen)
    for frame in frames[:3]:
        policy.act(frame)
    seen.clear()
    policy.act(frames[3])  # history window full: 2 past frames
    handle.remove()
    cost = chunk_cost(model.config, steps=3, rows=1, cache=cache, history=2)
    assert cost["tokens"] == sum(seen) and cost["text_tokens"] == (text_tokens if cache else 0)
    assert cost["flops"] > 0
    full = wam_fast.configs.get("tiny")
    with pytest.raises(ValueError, match="mask='temporal'"):
        chunk_cost(full, 3, cache=True)


def test_chunks_depend_on_the_cached_text_and_history():
    """Corrupting the cached text keys changes the chunk; so does the history window."""
    model = temporal_model(history=2)
    text, frames = episode(model, steps=3)
    cached, policy = run_policy(model, text, frames, cache=True)
    with_history = cached[-1].actions
    no_history, _ = run_policy(model, text, frames, cache=True, history=0)
    assert max_diff(no_history[-1].actions, with_history) > 1e-3
    assert max_diff(no_history[0].actions, cached[0].actions) <= 1e-6  # step 0: no history either way
    policy.cache.k[:, :, :, :model.config.text_len] = 0
    policy.generator.manual_seed(0)
    corrupted = policy.act(frames[-1]).actions
    assert max_diff(corrupted, with_history) > 1e-3


def test_evicted_frames_no_longer_matter():
    model = temporal_model(history=1)
    text, frames = episode(model, steps=4)
    other_first = [torch.randn_like(frames[0])] + frames[1:]
    a, _ = run_policy(model, text, frames, cache=True)
    b, _ = run_policy(model, text, other_first, cache=True)
    assert max_diff(a[1].actions, b[1].actions) > 1e-3  # step 1: frame 0 is history
    assert max_diff(a[2].actions, b[2].actions) == 0.0  # step 2: frame 0 has been evicted
    assert max_diff(a[3].video, b[3].video) == 0.0


def test_denoising_at_control_step_30_equals_a_fresh_window():
    """No drift: after 30 control steps (the ring wrapped ten times) a denoising step equals the
    same step of a fresh cache that saw only the last history + 1 frames."""
    model = temporal_model(history=2)
    text, frames = episode(model, steps=31)
    long = TemporalKVCache(model).setup(2)
    long.fill_text(text)
    for frame in frames:
        long.add_frame(frame)
    fresh = TemporalKVCache(model).setup(2)
    fresh.fill_text(text)
    for frame in frames[-3:]:
        fresh.add_frame(frame)
    video = torch.randn(model.noisy_video_shape(2))
    actions = torch.randn(model.action_shape(2))
    out_long, out_fresh = long.denoise(video, actions, 500), fresh.denoise(video, actions, 500)
    assert long.step == 31 and fresh.step == 3 and long.current_slot != fresh.current_slot
    assert max_diff(out_long[1], out_fresh[1]) <= 1e-6 and max_diff(out_long[0], out_fresh[0]) <= 1e-6


def test_reset_starts_a_new_episode():
    model = temporal_model(history=2)
    text, frames = episode(model, steps=4)
    first, policy = run_policy(model, text, frames, cache=True)
    policy.reset(text, seed=0)  # same instruction and seed: the old frames are forgotten
    again = [policy.act(f) for f in frames]
    for a, b in zip(first, again):
        assert max_diff(a.actions, b.actions) == 0.0
    other_text = torch.randn_like(text)
    policy.reset(other_text, seed=0)
    assert max_diff(policy.act(frames[0]).actions, first[0].actions) > 1e-3


# ---- memory -------------------------------------------------------------------------------------
def test_cache_bytes_are_the_buffers():
    model = temporal_model(history=2)
    c = model.config
    text, _ = episode(model)
    policy = wam_fast.WAMPolicy(model, steps=2, cache=True, cfg_scale=3.0, seed=0)
    assert policy.cache_bytes == 0  # nothing allocated before the first reset
    policy.reset(text)
    rows, slots = 4, 3  # cond + uncond rows of batch 2; history 2 + current
    keys = c.text_len + slots * c.tokens_per_frame + c.noisy_tokens
    kv = 2 * c.num_layers * rows * c.num_heads * keys * c.head_dim * 4
    encoded = c.num_layers * rows * c.num_heads * slots * c.tokens_per_frame * c.head_dim * 4
    segment_ids = 4 * (max(c.tokens_per_frame, c.noisy_tokens) + (keys - c.noisy_tokens) + keys)
    episode_state = 8 * (slots + 1)  # slot_step (int64 per slot) and step_count
    assert policy.cache_bytes == kv + encoded + segment_ids + episode_state
    assert cache_bytes(c, rows, max_history=2, bytes_per_element=4) == kv + encoded
    assert wam_fast.WAMPolicy(model, cache=False).cache_bytes == 0


# ---- refusal and bad input --------------------------------------------------------------------------
def test_a_bidirectional_model_is_refused_with_the_reason_and_the_way_out():
    full = wam_fast.WAMTransformer(wam_fast.configs.get("tiny"))
    for make in (lambda: TemporalKVCache(full), lambda: wam_fast.WAMPolicy(full, cache=True)):
        with pytest.raises(ValueError, match=r"mask='temporal'.*mask='full' \(bidirectional.*distill"):
            make()
    policy = wam_fast.WAMPolicy(full, cache=False, steps=2, seed=0)  # uncached works
    text, frames = episode(full, steps=2)
    policy.reset(text)
    assert policy.act(frames[0]).actions.shape == (2, 4, 7)


def test_bad_input_says_what_was_expected():
    model = temporal_model(history=2)
    text, frames = episode(model, steps=1)
    policy = wam_fast.WAMPolicy(model, steps=2, seed=0)
    with pytest.raises(RuntimeError, match=r"call reset\(text\) first"):
        policy.act(frames[0])
    policy.reset(text)
    with pytest.raises(ValueError, match=r"image_latent must have shape \(2, 1, 4, 8, 8\), got \(2, 4, 8, 8\)"):
        policy.act(frames[0][:, 0])
    with pytest.raises(TypeError, match="image_latent must have the model's dtype torch.float32"):
        policy.act(frames[0].double())
    with pytest.raises(ValueError, match=r"history must be an int in \[0, 2\].*got 3"):
        wam_fast.WAMPolicy(model, history=3)
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        wam_fast.WAMPolicy(model, sampler="heun")
    with pytest.raises(TypeError, match="WAMPolicy expects a WAMTransformer"):
        wam_fast.WAMPolicy(torch.nn.Linear(2, 2))
    cache = TemporalKVCache(model)
    with pytest.raises(RuntimeError, match=r"call setup\(batch, max_history\) first"):
        cache.fill_text(text)
    with pytest.raises(ValueError, match="max_history=3 exceeds the model's history_frames=2"):
        cache.setup(2, 3)
    cache.setup(2)
    with pytest.raises(RuntimeError, match=r"no text in the cache: call fill_text\(text\) first"):
        cache.add_frame(frames[0])
    cache.fill_text(text)
    video, actions = torch.randn(model.noisy_video_shape(2)), torch.randn(model.action_shape(2))
    with pytest.raises(RuntimeError, match=r"holds no frame: call add_frame\(image_latent\) first"):
        cache.denoise(video, actions, 500)
    with pytest.raises(ValueError, match=r"text must have shape \(2, 8, 32\), got \(3, 8, 32\)"):
        cache.fill_text(torch.randn(3, 8, 32))


def test_an_attention_module_that_bypasses_the_cache_is_an_error():
    model = temporal_model(history=0)

    class PlainAttention(Attention):  # ignores ctx.attend: would leave the cache empty
        def forward(self, x, ctx):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return self.out(o.transpose(1, 2).reshape(b, n, -1))

    swapped = PlainAttention(64, 4, 16, 1e-6)
    swapped.load_state_dict(model.blocks[1].attn.state_dict())
    model.blocks[1].attn = swapped
    text, _ = episode(model, steps=1)
    with pytest.raises(RuntimeError, match="1 of 2 layers ran attention through ctx.attend"):
        wam_fast.WAMPolicy(model, steps=2).reset(text)


def test_the_readme_example_runs():
    readme = open(__file__.replace("tests/test_kv_cache.py", "README.md"), encoding="utf-8").read()
    section = readme[readme.index("## KV cache and the robot loop"):]
    code = section[section.index("```python") + len("```python"):section.index("```\n", section.index("```python") + 9)]
    torch.manual_seed(0)
    namespace = {"wam_fast": wam_fast, "text": torch.randn(1, 8, 32), "image_latent": torch.randn(1, 1, 4, 8, 8)}
    exec(code, namespace)
    assert namespace["chunk"].actions.shape == (1, 4, 7) and namespace["policy"].cache_bytes > 0


def test_step_tables_made_under_inference_mode_refresh_outside_it():
    """The AdaLN tables of the step grid are made once (first act, here under inference_mode) and
    refreshed in place when a weight changes, also from a later act outside inference_mode."""
    model = temporal_model(history=1, distillation="shortcut", distilled_steps=(2,))
    policy = wam_fast.WAMPolicy(model, seed=0, history=1)
    eager = wam_fast.WAMPolicy(model, seed=0, history=1)
    text, frames = episode(model, batch=1, steps=2)
    policy.reset(text)
    eager.reset(text)
    with torch.inference_mode():
        policy.act(frames[0])
    eager.act(frames[0])
    assert not any(t.is_inference() for t in policy.cache.table_tensors)
    with torch.no_grad():
        model.blocks[0].adaln.weight.mul_(1.5)
    assert torch.equal(policy.act(frames[1]).actions, eager.act(frames[1]).actions)
