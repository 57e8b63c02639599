"""Distilled students as models and in sampling (issue #6, docs/design.md, Distillation): the config fields,
the zero-initialised step-size embedding of shortcut students (on the noisy segments only, so the
KV cache stays exact), the step size and shared noise in the sampling loop, the consistency
sampler's math, the model-specific defaults and the refusals of options a student cannot honour."""
import dataclasses
import json
import math

import pytest
import torch

import wam_fast
from wam_fast.cache import TemporalKVCache
from wam_fast.sampling import SAMPLERS, default_options, run_sampler, sample
from wam_fast.schedules import schedule_for

T = 1000  # num_train_timesteps of every config here


def config(distillation="shortcut", mask="temporal", steps=(1, 2, 4), objective="v_prediction", **overrides):
    fields = dict(mask=mask, objective=objective, distillation=distillation,
                  distilled_steps=steps if distillation else ())
    if mask == "temporal":
        fields["history_frames"] = 1
    if distillation:
        fields["distilled_cfg_scale"] = 3.0
    fields.update(overrides)
    return wam_fast.configs.get("tiny", **fields)


def model(cfg, seed=0, trained_step_embed=True):
    """A model of cfg; a shortcut student's step embedding randomised ("trained-looking") unless
    ``trained_step_embed`` is False (then it is zero-initialised, as built)."""
    torch.manual_seed(seed)
    m = wam_fast.WAMTransformer(cfg).eval()
    if cfg.distillation == "shortcut" and trained_step_embed:
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for p in m.step_embed.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def inputs(m, batch=2, seed=1, history=0):
    g = torch.Generator().manual_seed(seed)
    c = m.config
    frame = (c.latent_channels, c.latent_height, c.latent_width)
    out = dict(video=torch.randn(m.noisy_video_shape(batch), generator=g),
               text=torch.randn(batch, c.text_len, c.text_dim, generator=g),
               actions=torch.randn(m.action_shape(batch), generator=g),
               timestep=torch.tensor([999.0, 400.0])[:batch],
               image=torch.randn(batch, 1, *frame, generator=g))
    if history:
        out["history"] = torch.randn(batch, history, *frame, generator=g)
    return out


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


# ---- config ---------------------------------------------------------------------------------------
def test_a_config_is_a_teacher_by_default():
    c = wam_fast.configs.get("tiny")
    assert (c.distillation, c.distilled_steps, c.distilled_cfg_scale) == ("", (), 1.0)
    assert not hasattr(wam_fast.WAMTransformer(c), "step_embed")
    assert not hasattr(wam_fast.WAMTransformer(config("consistency")), "step_embed")


@pytest.mark.parametrize("distillation", ["", "shortcut", "consistency"])
def test_config_round_trips_through_json_with_tuples(distillation):
    c = config(distillation, distilled_cfg_scale=4.5) if distillation else config("")
    back = wam_fast.WAMConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c and isinstance(back.distilled_steps, tuple)
    listed = dataclasses.replace(c, distilled_steps=list(c.distilled_steps))  # a list is stored as a tuple
    assert listed == c and hash(listed) == hash(c)


@pytest.mark.parametrize("fields,message", [
    (dict(distillation="lcm"), r"distillation must be one of \('', 'shortcut', 'consistency'\).*got 'lcm'"),
    (dict(distillation="shortcut"), r"distillation='shortcut' needs distilled_steps.*got \(\)"),
    (dict(distilled_steps=(1, 2)), r"distilled_steps=\(1, 2\) given for a teacher"),
    (dict(distillation="shortcut", distilled_steps=(2, 1)), r"strictly increasing ints in \[1, 1000\].*\(2, 1\)"),
    (dict(distillation="shortcut", distilled_steps=(1, 1)), r"strictly increasing.*got \(1, 1\)"),
    (dict(distillation="shortcut", distilled_steps=(0, 1)), r"strictly increasing ints in \[1, 1000\].*\(0, 1\)"),
    (dict(distillation="shortcut", distilled_steps=(1, 2000)), r"\[1, 1000\].*got \(1, 2000\)"),
    (dict(distillation="shortcut", distilled_steps=(1, 2.0)),
     r"distilled_steps must be a tuple of ints, got \(1, 2.0\)"),
    (dict(distillation="shortcut", distilled_steps=(True,)), r"distilled_steps must be a tuple of ints"),
    (dict(distillation="shortcut", distilled_steps=4), r"distilled_steps must be a tuple of ints, got 4"),
    (dict(distillation="shortcut", distilled_steps=(1,), distilled_cfg_scale=-1.0),
     r"distilled_cfg_scale must be a finite number >= 0, got -1.0"),
    (dict(distillation="shortcut", distilled_steps=(1,), distilled_cfg_scale=float("nan")),
     r"distilled_cfg_scale must be a finite number >= 0, got nan"),
    (dict(distillation="shortcut", distilled_steps=(1,), distilled_cfg_scale="6"),
     r"distilled_cfg_scale must be a finite number >= 0, got '6'"),
    (dict(distilled_cfg_scale=6.0), r"distilled_cfg_scale=6.0 given for a teacher"),
])
def test_bad_distillation_fields_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        wam_fast.configs.get("tiny", **fields)


@pytest.mark.parametrize("distillation", ["shortcut", "consistency"])
def test_checkpoint_keeps_the_fields_and_the_step_embedding(tmp_path, distillation):
    student = model(config(distillation, distilled_cfg_scale=4.5))
    wam_fast.save_pretrained(student, tmp_path / "ckpt")
    loaded = wam_fast.load_pretrained(tmp_path / "ckpt")
    assert loaded.config == student.config and loaded.config.distilled_steps == (1, 2, 4)
    assert loaded.config.distilled_cfg_scale == 4.5
    state, back = student.state_dict(), loaded.state_dict()
    assert state.keys() == back.keys()
    assert any(k.startswith("step_embed.") for k in state) == (distillation == "shortcut")
    for name in state:
        assert torch.equal(state[name], back[name]), name
    x = inputs(student)
    kw = {"step_size": torch.full((2,), 250.0)} if distillation == "shortcut" else {}
    assert torch.equal(student(**x, **kw)[1], loaded(**x, **kw)[1])


# ---- the step-size embedding ---------------------------------------------------------------------------
@pytest.mark.parametrize("mask", ["full", "temporal"])
def test_a_fresh_shortcut_student_is_bit_identical_to_its_teacher(mask):
    teacher = model(config("", mask=mask))
    student = model(config("shortcut", mask=mask), trained_step_embed=False)
    assert not student.step_embed.linear_2.weight.any() and not student.step_embed.linear_2.bias.any()
    assert student.step_embed.linear_1.weight.any()  # only the last linear is zero
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("step_embed.linear_") for k in missing)
    x = inputs(teacher)
    video, actions = teacher(**x)
    for size in (0.0, 1.0, 250.0, 1000.0, 1e5):
        sv, sa = student(**x, step_size=torch.full((2,), size))
        assert torch.equal(sv, video) and torch.equal(sa, actions), size


@pytest.mark.parametrize("mask", ["full", "temporal"])
def test_a_trained_step_embedding_changes_the_prediction(mask):
    student = model(config("shortcut", mask=mask))
    x = inputs(student)
    a = student(**x, step_size=torch.full((2,), 250.0))
    b = student(**x, step_size=torch.tensor([250.0, 1000.0]))
    assert max_diff(a[1][:1], b[1][:1]) == 0.0  # per row
    assert max_diff(a[1][1:], b[1][1:]) > 1e-3 and max_diff(a[0][1:], b[0][1:]) > 1e-3
    assert torch.equal(student(**x, step_size=250)[1], a[1])  # a number means every row


def test_one_cache_fill_serves_every_step_size_and_equals_the_uncached_model():
    """The text and frame K/V are computed once (no step size there); denoising with any step size
    against them equals the uncached forward with that step size, and leaves them untouched."""
    student = model(config("shortcut"))
    x = inputs(student, history=1)
    cache = TemporalKVCache(student).setup(2, 1)
    cache.fill_text(x["text"])
    cache.add_frame(x["history"])
    cache.add_frame(x["image"])
    context = cache.k[:, :, :, :cache.noisy_start].clone(), cache.v[:, :, :, :cache.noisy_start].clone()
    outputs = []
    for size in (0.0, 125.0, 250.0, 500.0, 1000.0):
        step = torch.full((2,), size)
        cached = cache.denoise(x["video"], x["actions"], x["timestep"], step_size=step)
        uncached = student(**x, step_size=step)
        assert max_diff(cached[0], uncached[0]) <= 1e-5 and max_diff(cached[1], uncached[1]) <= 1e-5, size
        assert torch.equal(cache.k[:, :, :, :cache.noisy_start], context[0])
        assert torch.equal(cache.v[:, :, :, :cache.noisy_start], context[1])
        outputs.append(cached[1])
    assert min(max_diff(a, b) for a, b in zip(outputs, outputs[1:])) > 1e-4  # the step size is used


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_shortcut_policy_with_cache_equals_without_fp32(steps):
    student = model(config("shortcut"))
    c = student.config
    g = torch.Generator().manual_seed(3)
    text = torch.randn(2, c.text_len, c.text_dim, generator=g)
    frames = [torch.randn(2, 1, c.latent_channels, c.latent_height, c.latent_width, generator=g) for _ in range(3)]
    chunks = {}
    for cache in (False, True):
        policy = wam_fast.WAMPolicy(student, steps=steps, cache=cache, seed=0)
        assert (policy.sampler, policy.steps, policy.cfg_scale) == ("ddim", steps, 1.0)
        policy.reset(text)
        chunks[cache] = [policy.act(f) for f in frames]
    for u, k in zip(chunks[False], chunks[True]):
        assert max_diff(k.actions, u.actions) <= 1e-5 and max_diff(k.video, u.video) <= 1e-5
        assert k.nfe == u.nfe == steps


def test_policy_defaults_are_the_models():
    student = model(config("shortcut"))
    policy = wam_fast.WAMPolicy(student, cache=False)
    assert (policy.sampler, policy.steps, policy.cfg_scale, policy.guided) == ("ddim", 4, 1.0, False)
    teacher = model(config("", objective="flow_matching"))
    policy = wam_fast.WAMPolicy(teacher, cache=False)
    assert (policy.sampler, policy.steps, policy.cfg_scale, policy.guided) == ("euler", 10, 6.0, True)
    policy = wam_fast.WAMPolicy(model(config("consistency", steps=(2, 8))), cache=True)
    assert (policy.sampler, policy.steps, policy.cfg_scale) == ("consistency", 8, 1.0)


# ---- forward(step_size) refusals --------------------------------------------------------------------
@pytest.mark.parametrize("distillation,step_size,error,message", [
    ("shortcut", None, ValueError, r"this shortcut student needs step_size \(B,\).*1000 / 4"),
    ("", 250.0, ValueError, r"step_size given but this model is a teacher \(distillation=''\)"),
    ("consistency", torch.full((2,), 250.0), ValueError, r"step_size given but this model is a consistency student"),
    ("shortcut", torch.full((3,), 250.0), ValueError, r"step_size must have shape \(2,\), got \(3,\)"),
    ("shortcut", torch.full((2, 1), 250.0), ValueError, r"step_size must have shape \(2,\), got \(2, 1\)"),
    ("shortcut", torch.full((2,), 250), TypeError, r"step_size must be a floating-point tensor, got torch.int64"),
    ("shortcut", torch.full((2,), 250.0, device="meta"), ValueError,
     r"step_size is on meta but the model is on cpu"),
    ("shortcut", torch.tensor([250.0, float("nan")]), ValueError,
     r"step_size must be finite and >= 0, got \[250.0, nan\]"),
    ("shortcut", torch.tensor([-1.0, 2.0]), ValueError, r"step_size must be finite and >= 0, got \[-1.0, 2.0\]"),
    ("shortcut", torch.tensor([math.inf, 2.0]), ValueError, r"step_size must be finite and >= 0"),
    ("shortcut", -0.5, ValueError, r"step_size must be finite and >= 0, got -0.5"),
    ("shortcut", "250", TypeError, r"step_size must be a number or a float tensor \(B,\), got str"),
])
def test_bad_step_size_is_refused_by_forward_and_by_the_cache(distillation, step_size, error, message):
    m = model(config(distillation))
    x = inputs(m)
    with pytest.raises(error, match=message):
        m(**x, step_size=step_size)
    cache = TemporalKVCache(m).setup(2, 0)
    cache.fill_text(x["text"])
    cache.add_frame(x["image"])
    with pytest.raises(error, match=message):
        cache.denoise(x["video"], x["actions"], x["timestep"], step_size=step_size)


# ---- the sampling loop ------------------------------------------------------------------------------
class Recorder:
    """A fake forward for run_sampler that records what it is called with and returns zeros."""

    def __init__(self):
        self.calls = []

    def __call__(self, video, actions, timestep, step_size):
        self.calls.append(dict(video=video.clone(), actions=actions.clone(), timestep=timestep.clone(),
                               step_size=None if step_size is None else step_size.clone()))
        return torch.zeros_like(video), torch.zeros_like(actions)


def _run(cfg, recorder, batch=3, **kw):
    options = dict(sampler=default_options(cfg)[0], steps=2, cfg_scale=1.0, cfg_schedule="constant",
                   generator=torch.Generator().manual_seed(0))
    options.update(kw)
    return run_sampler(recorder, cfg, batch, torch.device("cpu"), torch.float32, **options)


@pytest.mark.parametrize("objective", ["v_prediction", "flow_matching"])
@pytest.mark.parametrize("steps,cfg_scale", [(1, 1.0), (2, 1.0), (4, 1.0), (4, 3.0)])
def test_run_sampler_gives_a_shortcut_student_the_step_size_T_over_steps(objective, steps, cfg_scale):
    cfg = config("shortcut", objective=objective)
    recorder = Recorder()
    _run(cfg, recorder, steps=steps, cfg_scale=cfg_scale)
    rows = 2 if cfg_scale != 1.0 else 1
    assert len(recorder.calls) == steps
    for call in recorder.calls:
        assert call["step_size"].dtype == torch.float32 and call["step_size"].shape == (rows * 3,)
        assert torch.equal(call["step_size"], torch.full((rows * 3,), T / steps))


@pytest.mark.parametrize("distillation", ["", "consistency"])
def test_run_sampler_gives_other_models_no_step_size(distillation):
    recorder = Recorder()
    _run(config(distillation), recorder, steps=2)
    assert [call["step_size"] for call in recorder.calls] == [None, None]


def test_sample_passes_the_step_size_to_a_shortcut_student():
    student = model(config("shortcut"))
    seen = []
    handle = student.step_embed.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    x = inputs(student)
    sample(student, x["text"], x["image"], steps=2)
    handle.remove()
    assert len(seen) == 2 and all(torch.equal(s, torch.full((2,), 500.0)) for s in seen)


def _model_forward(m, x):
    def forward(video, actions, timestep, step_size):
        extra = {} if step_size is None else {"step_size": step_size}
        return m(video, x["text"], actions, timestep, image=x["image"], **extra)
    return forward


def _noise(cfg, batch, seed):
    return _noise_from(cfg, batch, torch.Generator().manual_seed(seed))


def _noise_from(cfg, batch, g):
    video = torch.randn((batch, cfg.noisy_frames, cfg.latent_channels, cfg.latent_height, cfg.latent_width),
                        generator=g)
    return video, torch.randn((batch, cfg.action_len, cfg.action_dim), generator=g)


@pytest.mark.parametrize("distillation,sampler", [("", "ddim"), ("", "dpm++2m-sde"), ("shortcut", None),
                                                  ("consistency", None)])
def test_shared_noise_starts_every_model_at_the_same_point(distillation, sampler):
    m = model(config(distillation))
    x = inputs(m)
    options = dict(sampler=sampler, steps=2, cfg_scale=None if distillation else 1.0, return_video=True)
    sampler_name = sampler or default_options(m.config)[0]
    if sampler_name in ("ddim", "euler"):  # deterministic: the seed's first draws are the whole story
        drawn = sample(m, x["text"], x["image"], seed=5, **options)
        same = sample(m, x["text"], x["image"], seed=5, noise=_noise(m.config, 2, 5), **options)
        assert torch.equal(same.actions, drawn.actions) and torch.equal(same.video, drawn.video)
    # any sampler: noise drawn from the generator == the generator drawing it (then its sampler noise)
    forward = _model_forward(m, x)
    run = dict(sampler=sampler_name, steps=2, cfg_scale=1.0, cfg_schedule="constant")
    drawn = run_sampler(forward, m.config, 2, torch.device("cpu"), torch.float32,
                        generator=torch.Generator().manual_seed(5), **run)
    generator = torch.Generator().manual_seed(5)
    noise = _noise_from(m.config, 2, generator)
    same = run_sampler(forward, m.config, 2, torch.device("cpu"), torch.float32, generator=generator, noise=noise,
                       **run)
    assert torch.equal(same.actions, drawn.actions) and torch.equal(same.video, drawn.video)
    a = sample(m, x["text"], x["image"], seed=0, noise=_noise(m.config, 2, 9), **options)
    b = sample(m, x["text"], x["image"], seed=0, noise=_noise(m.config, 2, 9), **options)
    assert torch.equal(a.actions, b.actions) and torch.equal(a.video, b.video)
    c = sample(m, x["text"], x["image"], seed=0, noise=_noise(m.config, 2, 10), **options)
    assert max_diff(a.actions, c.actions) > 1e-3
    recorder = Recorder()
    noise = _noise(m.config, 3, 11)
    _run(m.config, recorder, noise=noise)
    assert torch.equal(recorder.calls[0]["video"], noise[0]) and torch.equal(recorder.calls[0]["actions"], noise[1])


def test_deterministic_samplers_do_not_touch_the_generator_when_noise_is_given():
    cfg = config("")
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    _run(cfg, Recorder(), sampler="ddim", noise=_noise(cfg, 3, 1), generator=generator)
    assert torch.equal(generator.get_state(), state)


@pytest.mark.parametrize("noise,error,message", [
    (torch.zeros(3), TypeError, r"noise must be a pair \(video_noise, action_noise\) of tensors, got Tensor"),
    ((torch.zeros(3),), TypeError, r"got tuple of length 1"),
    (("video", torch.zeros(3, 4, 7)), TypeError, r"the video noise must be a torch.Tensor, got str"),
    ((torch.zeros(2, 1, 4, 8, 8), torch.zeros(3, 4, 7)), ValueError,
     r"the video noise must have shape \(3, 1, 4, 8, 8\), got \(2, 1, 4, 8, 8\)"),
    ((torch.zeros(3, 1, 4, 8, 8), torch.zeros(3, 4, 6)), ValueError,
     r"the action noise must have shape \(3, 4, 7\), got \(3, 4, 6\)"),
    ((torch.zeros(3, 1, 4, 8, 8), torch.zeros(3, 4, 7, dtype=torch.bfloat16)), TypeError,
     r"the action noise must be float32 \(the sampler state's dtype\), got torch.bfloat16"),
])
def test_bad_noise_is_refused(noise, error, message):
    cfg = config("")  # temporal: one noisy frame
    with pytest.raises(error, match=message):
        _run(cfg, Recorder(), noise=noise)


# ---- the consistency sampler -------------------------------------------------------------------------
class CleanOracle:
    """Predicts exactly the known clean data x0 at every step, in the objective's parametrisation."""

    def __init__(self, cfg, x0_video, x0_actions):
        self.schedule = schedule_for(cfg)
        self.x0 = (x0_video.double(), x0_actions.double())
        self.inputs = []

    def __call__(self, video, actions, timestep, step_size):
        self.inputs.append((video.clone(), actions.clone()))
        alpha, sigma = (v.double()[0].item() for v in self.schedule.alpha_sigma(timestep[:1], dtype=torch.float64))
        out = []
        for x_t, x0 in zip((video.double(), actions.double()), self.x0):
            eps = (x_t - alpha * x0) / sigma
            out.append((alpha * eps - sigma * x0) if self.schedule.objective == "v_prediction" else eps - x0)
        return out[0].float(), out[1].float()


@pytest.mark.parametrize("objective", ["v_prediction", "flow_matching"])
@pytest.mark.parametrize("steps", [1, 2, 3, 7])
def test_consistency_sampling_with_an_exact_clean_prediction_returns_the_clean_data(objective, steps):
    cfg = config("consistency", objective=objective)
    x0 = _noise(cfg, 3, 42)
    oracle = CleanOracle(cfg, *x0)
    chunk = _run(cfg, oracle, sampler="consistency", steps=steps)
    assert len(oracle.inputs) == steps
    assert max_diff(chunk.video, x0[0]) <= 1e-5 and max_diff(chunk.actions, x0[1]) <= 1e-5


@pytest.mark.parametrize("objective", ["v_prediction", "flow_matching"])
def test_consistency_steps_are_an_x0_prediction_renoised_with_fresh_generator_noise(objective):
    """1 step: x0 predicted once from pure noise. 2 steps: the second input is
    alpha_1 x0_0 + sigma_1 z with z the generator's next draw after the initial noise."""
    cfg = config("consistency", objective=objective)
    schedule = schedule_for(cfg)
    noise = _noise(cfg, 3, 1)
    flat = torch.cat((noise[0].flatten(1), noise[1].flatten(1)), dim=1)

    def model_out(video, actions, timestep, step_size):
        return torch.tanh(video) * 0.5 + 0.1, torch.sin(actions)

    def x0_of(x, i, solver):
        out = torch.cat([o.flatten(1) for o in model_out(*_split(cfg, x), None, None)], dim=1)
        return schedule.x0_eps_at(x, out, solver.alphas[i], solver.sigmas[i])[0]

    one = _run(cfg, model_out, sampler="consistency", steps=1, noise=noise)
    solver = SAMPLERS["consistency"](schedule, 1)
    expected = x0_of(flat, 0, solver)
    assert max_diff(torch.cat((one.video.flatten(1), one.actions.flatten(1)), 1), expected) <= 1e-6
    if objective == "v_prediction":  # zero terminal SNR: the first step sees pure noise, x0 = -v
        assert solver.alphas[0] == 0.0 and max_diff(expected, -torch.cat(
            [o.flatten(1) for o in model_out(*_split(cfg, flat), None, None)], 1)) <= 1e-6

    recorder_inputs = []

    def recording(video, actions, timestep, step_size):
        recorder_inputs.append(torch.cat((video.flatten(1), actions.flatten(1)), 1))
        return model_out(video, actions, timestep, step_size)

    generator = torch.Generator().manual_seed(7)
    two = run_sampler(recording, cfg, 3, torch.device("cpu"), torch.float32, sampler="consistency", steps=2,
                      cfg_scale=1.0, cfg_schedule="constant", generator=generator, noise=noise)
    solver = SAMPLERS["consistency"](schedule, 2)
    z = torch.randn(flat.shape, generator=torch.Generator().manual_seed(7))  # noise given: z is the first draw
    x1 = solver.alphas[1] * x0_of(flat, 0, solver) + solver.sigmas[1] * z
    assert max_diff(recorder_inputs[1], x1) <= 1e-5
    final = torch.cat((two.video.flatten(1), two.actions.flatten(1)), 1)
    assert max_diff(final, x0_of(recorder_inputs[1], 1, solver)) <= 1e-5


def _split(cfg, flat):
    video_shape = (flat.shape[0], cfg.noisy_frames, cfg.latent_channels, cfg.latent_height, cfg.latent_width)
    size = math.prod(video_shape[1:])
    return flat[:, :size].reshape(video_shape), flat[:, size:].reshape(flat.shape[0], cfg.action_len, cfg.action_dim)


def test_the_consistency_sampler_is_listed_for_both_objectives():
    assert "consistency" in wam_fast.sampling.samplers_for("v_prediction")
    assert "consistency" in wam_fast.sampling.samplers_for("flow_matching")
    assert "consistency" in wam_fast.sampling.__doc__


# ---- defaults and refusals -----------------------------------------------------------------------------
@pytest.mark.parametrize("cfg,expected", [
    (config(""), ("ddim", 10, 6.0)),
    (config("", objective="flow_matching"), ("euler", 10, 6.0)),
    (config("shortcut", steps=(1, 2, 4)), ("ddim", 4, 1.0)),
    (config("shortcut", steps=(1, 8), objective="flow_matching"), ("euler", 8, 1.0)),
    (config("consistency", steps=(1, 2)), ("consistency", 2, 1.0)),
])
def test_default_options(cfg, expected):
    assert default_options(cfg) == expected


@pytest.mark.parametrize("distillation", ["", "shortcut", "consistency"])
def test_sample_with_no_options_uses_the_models_defaults(distillation):
    m = model(config(distillation, mask="full"))
    x = inputs(m)
    sampler, steps, cfg_scale = default_options(m.config)
    implicit = sample(m, x["text"], x["image"], seed=3)
    explicit = sample(m, x["text"], x["image"], sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=3)
    assert torch.equal(implicit.actions, explicit.actions)
    assert (implicit.sampler, implicit.steps) == (sampler, steps)
    assert implicit.nfe == steps * (2 if cfg_scale != 1.0 else 1)


@pytest.mark.parametrize("distillation,options,message", [
    ("shortcut", dict(cfg_scale=6.0), r"guidance scale 3 is baked in.*cfg_scale=1.*got cfg_scale=6.0"),
    ("shortcut", dict(cfg_scale=1.0, cfg_schedule="dynamic"), r"guidance scale 3 is baked in.*'dynamic'"),
    ("consistency", dict(cfg_scale=2.0), r"guidance scale 3 is baked in: this consistency student"),
    ("shortcut", dict(sampler="dpm++2m"), r"a shortcut student samples with 'ddim'.*got sampler 'dpm\+\+2m'"),
    ("shortcut", dict(sampler="consistency"), r"a shortcut student samples with 'ddim'.*got sampler 'consistency'"),
    ("shortcut", dict(steps=3), r"distilled for steps \(1, 2, 4\) \(config.distilled_steps\), got steps=3"),
    ("shortcut", dict(sampler="euler"), r"sampler 'euler' does not fit this model's objective 'v_prediction'"),
])
def test_a_student_refuses_options_it_was_not_distilled_for(distillation, options, message):
    m = model(config(distillation))
    x = inputs(m)
    with pytest.raises(ValueError, match=message):
        sample(m, x["text"], x["image"], **options)
    with pytest.raises(ValueError, match=message):
        wam_fast.WAMPolicy(m, **options)


def test_a_consistency_student_samples_at_any_step_count_and_with_ddim():
    m = model(config("consistency", steps=(1, 2)))
    x = inputs(m)
    assert sample(m, x["text"], x["image"], steps=3).nfe == 3
    assert sample(m, x["text"], x["image"], sampler="ddim", steps=5).sampler == "ddim"
    # guidance off with the dynamic schedule (scale 0 there) is no guidance
    assert sample(m, x["text"], x["image"], cfg_scale=0.0, cfg_schedule="dynamic").nfe == 2
