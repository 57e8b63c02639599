"""WAMPolicy and sample() against hostile use (issue #29): reused input buffers, threads, out-of-range
timesteps / robot ids / seeds, non-finite inputs, empty batches."""
import threading

import pytest
import torch

import wam_fast

STEPS = 4


def temporal_model(num_robots=0):
    torch.manual_seed(0)
    cfg = wam_fast.configs.get("tiny", mask="temporal", history_frames=2, num_robots=num_robots)
    return wam_fast.WAMTransformer(cfg).eval()


def episode(config, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, config.text_len, config.text_dim, generator=g)
    frames = [torch.randn(batch, 1, config.latent_channels, config.latent_height, config.latent_width, generator=g)
              for _ in range(STEPS)]
    return text, frames


def policy_for(model, cache, **kwargs):
    options = dict(steps=3, sampler="ddim", seed=0, cfg_scale=1.0)
    options.update(kwargs)
    return wam_fast.WAMPolicy(model, cache=cache, **options)


def run(model, text, frames, cache, reuse, **kwargs):
    """The chunks of one episode; with ``reuse`` the loop writes each frame (and nothing else) into
    one observation buffer in place, and overwrites its text buffer after reset, as a robot loop may."""
    policy = policy_for(model, cache, **kwargs)
    text_buffer = text.clone()
    policy.reset(text_buffer)
    if reuse:
        text_buffer.normal_()  # the caller's buffer changes; the episode's instruction must not
    buffer = torch.empty_like(frames[0])
    chunks = []
    for frame in frames:
        if reuse:
            buffer.copy_(frame)
            chunks.append(policy.act(buffer).actions.clone())
        else:
            chunks.append(policy.act(frame.clone()).actions.clone())
    return chunks


# ---- buffers are copied ---------------------------------------------------------------------------
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])  # guidance off: the text itself would be kept
def test_reused_buffers_give_the_chunks_of_fresh_tensors(cfg_scale):
    model = temporal_model()
    text, frames = episode(model.config)
    fresh = run(model, text, frames, cache=False, reuse=False, cfg_scale=cfg_scale)
    reused = run(model, text, frames, cache=False, reuse=True, cfg_scale=cfg_scale)
    cached = run(model, text, frames, cache=True, reuse=True, cfg_scale=cfg_scale)
    for step, (f, r, c) in enumerate(zip(fresh, reused, cached)):
        assert torch.equal(r, f), step  # exactly: the policy saw the same inputs
        assert (c - r).abs().max().item() <= 1e-5, step  # cached == uncached, to rounding


# ---- threads --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cache", [True, False])
def test_two_threads_get_the_chunks_of_a_sequential_run(cache):
    model = temporal_model()
    text, frames = episode(model.config)
    calls = 3  # per thread, all with the same observation, so only the call order matters
    sequential = policy_for(model, cache)
    sequential.reset(text)
    expected = [sequential.act(frames[0]).actions for _ in range(2 * calls)]

    policy = policy_for(model, cache)
    policy.reset(text)
    start = threading.Barrier(2)
    results, errors = [], []

    def worker():
        start.wait()
        try:
            for _ in range(calls):
                results.append(policy.act(frames[0]).actions)
        except Exception as e:  # reported below: a thread's exception would otherwise be lost
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert policy.step == 2 * calls
    # the chunks are those of the sequential run, in the order the lock let the calls in
    remaining = list(expected)
    for got in results:
        match = [i for i, e in enumerate(remaining) if torch.equal(got, e)]
        assert match, "a threaded chunk matches no chunk of the sequential run (interleaved calls)"
        remaining.pop(match[0])


# ---- values ---------------------------------------------------------------------------------------
def forward_inputs(model, batch=2):
    c = model.config
    g = torch.Generator().manual_seed(3)
    video = torch.randn(model.noisy_video_shape(batch), generator=g)
    text = torch.randn(batch, c.text_len, c.text_dim, generator=g)
    actions = torch.randn(model.action_shape(batch), generator=g)
    image = torch.randn(batch, 1, c.latent_channels, c.latent_height, c.latent_width, generator=g)
    return video, text, actions, image


@pytest.mark.parametrize("bad", [-1.0, 1000.5, 5000.0, float("nan")])
def test_forward_refuses_timestep_tensors_out_of_range(bad):
    model = temporal_model()
    video, text, actions, image = forward_inputs(model)
    timestep = torch.tensor([10.0, bad])
    with pytest.raises(ValueError, match=r"timestep values must lie in \[0, 1000\].*got"):
        model(video, text, actions, timestep, image=image)
    per_segment = torch.full((2, model.layout(0).num_segments), 10.0)  # (B, S): one timestep per segment
    per_segment[1, -1] = bad
    with pytest.raises(ValueError, match=r"timestep values must lie in \[0, 1000\]"):
        model(video, text, actions, per_segment, image=image)
    model(video, text, actions, torch.tensor([0.0, 1000.0]), image=image)  # both ends are valid


def test_per_step_forwards_read_no_values():
    from wam_fast.models.validation import inputs_checked
    model = temporal_model()
    video, text, actions, image = forward_inputs(model)
    with inputs_checked():  # what sample() / WAMPolicy run their steps in: no check, no sync
        out = model(video, text, actions, torch.tensor([10.0, 2000.0]), image=image)
    assert out[0].shape == video.shape


def test_out_of_range_robot_id_is_a_value_error():
    model = temporal_model(num_robots=3)
    video, text, actions, image = forward_inputs(model)
    with pytest.raises(ValueError, match=r"robot_id values must be in \[0, 3\).*max 3"):
        model(video, text, actions, 10.0, image=image, robot_id=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"robot_id values must be in \[0, 3\)"):
        wam_fast.sample(model, text, image, steps=2, cfg_scale=1.0, robot_id=torch.tensor([-1, 0]))
    policy = policy_for(model, cache=True)
    policy.reset(text)
    with pytest.raises(ValueError, match=r"robot_id values must be in \[0, 3\)"):
        policy.act(image, robot_id=torch.tensor([1, 7]))
    assert policy.act(image, robot_id=torch.tensor([2, 0])).actions.isfinite().all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_refused(bad):
    model = temporal_model()
    text, frames = episode(model.config)
    frame = frames[0].clone()
    frame[1, 0, 0, 0, 0] = bad
    policy = policy_for(model, cache=False)
    policy.reset(text)
    with pytest.raises(ValueError, match="image_latent has non-finite values"):
        policy.act(frame)
    assert policy.step == 0  # refused before any state changed
    bad_text = text.clone()
    bad_text[0, 0, 0] = bad
    with pytest.raises(ValueError, match="text has non-finite values"):
        policy.reset(bad_text)
    with pytest.raises(ValueError, match="image has non-finite values"):
        wam_fast.sample(model, text, frame, steps=2, cfg_scale=1.0)
    with pytest.raises(ValueError, match="text has non-finite values"):
        wam_fast.sample(model, bad_text, frames[0], steps=2, cfg_scale=1.0)


def test_empty_batch_is_refused_clearly():
    model = temporal_model()
    c = model.config
    text = torch.zeros(0, c.text_len, c.text_dim)
    with pytest.raises(ValueError, match="batch of at least 1"):
        wam_fast.sample(model, text, steps=2, cfg_scale=1.0)
    with pytest.raises(ValueError, match="batch of at least 1"):
        policy_for(model, cache=True).reset(text)


@pytest.mark.parametrize("seed", [-1, 2 ** 64, 2 ** 70])
def test_seeds_outside_the_generator_range_are_value_errors(seed):
    model = temporal_model()
    text, frames = episode(model.config)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64 - 1\]"):
        wam_fast.sample(model, text, frames[0], steps=2, cfg_scale=1.0, seed=seed)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64 - 1\]"):
        policy_for(model, cache=True, seed=seed)
    policy = policy_for(model, cache=True)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64 - 1\]"):
        policy.reset(text, seed=seed)
    policy_for(model, cache=True, seed=2 ** 64 - 1)  # the largest is fine
