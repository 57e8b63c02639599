"""Noise schedules, samplers, classifier-free guidance and sample() (wam_fast.schedules / .sampling).

The main check trains a tiny WAMTransformer per objective on a toy conditional bimodal action
distribution (tests/toy.py) and asks every sampler to reproduce it. A Gaussian "oracle" model with
the exact prediction checks the solver math on its own (convergence and order).
"""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import wam_fast  # noqa: E402
from toy import (CENTRES, MODE_STD, VIDEO_LEVEL, condition_texts, mode_stats, toy_config,  # noqa: E402
                 train_toy_model)
from wam_fast.sampling import (SAMPLERS, ActionChunk, guidance_scale, sample,  # noqa: E402
                               samplers_for)
from wam_fast.schedules import (DDPMSchedule, FlowMatchingSchedule, diffusion_loss,  # noqa: E402
                                schedule_for)

# ---- tolerances of the toy distribution check ------------------------------------------------------
SAMPLES_PER_CONDITION = 512
# Each own mode must get 0.5 +- this share of the chunks. Binomial noise at 512 samples is 0.022;
# the 300-step toy model adds a bias of up to ~0.08; a collapsed sampler is off by 0.5.
FRACTION_TOL = 0.15
# |sample mean of a mode - true centre|, in action units (centres are 2.8 apart, MODE_STD 0.25).
# Measured <= 0.08; noise or a mode average lands >= 0.4 away.
MEAN_TOL = 0.15
# Per-coordinate std within a mode, relative to MODE_STD. Measured 0.21..0.27 (true 0.25); DDIM's
# final jump to alpha 1 from the trailing grid's last timestep shrinks it slightly.
SPREAD_RTOL = 0.3
# Share of chunks with a row more than 4 MODE_STD from its mode centre (noise: most of them).
OFF_MODE_TOL = 0.05
# Share of chunks nearest to the other condition's centres (ignoring the text: about 0.5).
WRONG_CONDITION_TOL = 0.02
# With guidance the modes sharpen and their balance may shift; still both must be present.
CFG_MIN_FRACTION = 0.2

# sampler -> (objective, steps) for the distribution check.
SAMPLER_RUNS = {
    "ddim": ("v_prediction", 50),
    "dpm++2m": ("v_prediction", 20),
    "dpm++2m-sde": ("v_prediction", 50),
    "euler": ("flow_matching", 50),
}


def distribution_failures(actions: torch.Tensor, cond: int, cfg: bool = False) -> list:
    """Every way the samples of one condition miss the toy distribution (empty list = pass)."""
    stats = mode_stats(actions, cond)
    failures = []
    for m in range(2):
        frac, err, spread = stats.fractions[m], stats.mean_errors[m], stats.spreads[m]
        if cfg:
            if frac < CFG_MIN_FRACTION:
                failures.append(f"mode {m}: fraction {frac:.3f} < {CFG_MIN_FRACTION}")
            continue
        if abs(frac - 0.5) > FRACTION_TOL:
            failures.append(f"mode {m}: fraction {frac:.3f} not within {FRACTION_TOL} of 0.5")
        if not err <= MEAN_TOL:
            failures.append(f"mode {m}: mean is {err:.3f} from the centre (tolerance {MEAN_TOL})")
        if abs(spread / MODE_STD - 1) > SPREAD_RTOL:
            failures.append(f"mode {m}: spread {spread:.3f} not within {SPREAD_RTOL:.0%} of {MODE_STD}")
    if stats.off_mode > OFF_MODE_TOL:
        failures.append(f"{stats.off_mode:.3f} of the chunks are off-mode (tolerance {OFF_MODE_TOL})")
    if stats.wrong_condition > WRONG_CONDITION_TOL:
        failures.append(f"{stats.wrong_condition:.3f} of the chunks land in the other condition's modes "
                        f"(tolerance {WRONG_CONDITION_TOL})")
    return failures


# ---- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vpred_model():
    return train_toy_model("v_prediction", steps=300, batch=128, seed=0)


@pytest.fixture(scope="module")
def flow_model():
    return train_toy_model("flow_matching", steps=300, batch=128, seed=0)


def _model(request, objective):
    return request.getfixturevalue("vpred_model" if objective == "v_prediction" else "flow_model")


@pytest.fixture(scope="module")
def untrained():
    torch.manual_seed(0)
    return wam_fast.WAMTransformer(toy_config("v_prediction"))


def _texts(model, per_condition: int) -> torch.Tensor:
    """Rows 0..n-1 condition 0, rows n..2n-1 condition 1."""
    return condition_texts(model.config).repeat_interleave(per_condition, dim=0)


# ---- schedules -----------------------------------------------------------------------------------------
def test_ddpm_schedule_zero_terminal_snr():
    sched = DDPMSchedule()
    alpha, sigma = sched.alpha_sigma(torch.arange(1000))
    assert alpha.dtype == torch.float32
    assert alpha[-1].item() == 0.0 and sigma[-1].item() == 1.0
    assert (alpha[1:] < alpha[:-1]).all()
    # The rescale keeps the first alpha_bar: 1 - beta_start.
    assert sched.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, rel=1e-12)
    torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones(1000))
    # Without the rescale the last alpha_bar is CogVideoX's ~0.0047, not 0.
    assert DDPMSchedule(rescale_zero_snr=False).alphas_cumprod[-1].item() == pytest.approx(4.7e-3, rel=0.05)


def test_ddpm_trailing_timesteps():
    sched = DDPMSchedule()
    assert sched.sampling_timesteps(10) == [999.0 - 100 * i for i in range(10)]
    assert sched.sampling_timesteps(1) == [999.0]
    assert sched.sampling_timesteps(1000) == [float(t) for t in range(999, -1, -1)]
    assert sched.sampling_timesteps(3)[0] == 999.0


def test_fractional_timesteps_interpolate():
    sched = DDPMSchedule()
    a_lo, _ = sched.alpha_sigma(torch.tensor([500.0]))
    a_mid, s_mid = sched.alpha_sigma(torch.tensor([500.5]))
    a_hi, _ = sched.alpha_sigma(torch.tensor([501.0]))
    assert a_hi < a_mid < a_lo
    assert (a_mid ** 2 + s_mid ** 2).item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 999\].*1000"):
        sched.alpha_sigma(torch.tensor([1000.0]))


@pytest.mark.parametrize("schedule", [DDPMSchedule(), FlowMatchingSchedule()], ids=["ddpm", "flow"])
def test_noise_target_round_trip(schedule):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 3, 5, generator=g), torch.randn(6, 3, 5, generator=g)
    top = 999.0 if isinstance(schedule, DDPMSchedule) else 1000.0
    t = torch.tensor([0.0, 1.0, 250.0, 600.5, 998.0, top])  # both ends included (alpha 0 at the top)
    x_t = schedule.add_noise(x0, noise, t)
    target = schedule.velocity_target(x0, noise, t)
    x0_back, noise_back = schedule.to_x0_eps(x_t, target, t)
    torch.testing.assert_close(x0_back, x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(noise_back, noise, atol=1e-5, rtol=1e-5)


def test_flow_schedule_facts():
    sched = FlowMatchingSchedule()
    assert sched.sampling_timesteps(4) == [1000.0, 750.0, 500.0, 250.0]
    x0, noise = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(sched.add_noise(x0, noise, torch.tensor([0.0, 1000.0])), torch.stack((x0[0], noise[1])))
    torch.testing.assert_close(sched.velocity_target(x0, noise, None), noise - x0)


def test_schedule_for_picks_by_objective():
    assert isinstance(schedule_for(toy_config("v_prediction")), DDPMSchedule)
    assert isinstance(schedule_for(toy_config("flow_matching")), FlowMatchingSchedule)


def test_diffusion_loss_seeded_and_cond_dropout(untrained):
    config = untrained.config
    g = torch.Generator().manual_seed(0)
    video = torch.randn(4, config.noisy_frames, 4, config.latent_height, config.latent_width, generator=g)
    text, actions = torch.randn(4, config.text_len, config.text_dim, generator=g), torch.randn(4, 2, 2, generator=g)

    def loss(seed, text, **kw):
        return diffusion_loss(untrained, video, text, actions, generator=torch.Generator().manual_seed(seed), **kw)

    first = loss(1, text)
    assert first.dim() == 0 and torch.isfinite(first)
    assert loss(1, text).item() == first.item()
    assert loss(2, text).item() != first.item()
    # cond_dropout=1 drops every text: the same as zero text (the dropout draw comes after the noise).
    dropped = loss(1, text, cond_dropout=1.0)
    assert dropped.item() != first.item()
    assert loss(1, torch.zeros_like(text)).item() == dropped.item()
    only_video = loss(1, text, action_weight=0.0)
    only_actions = loss(1, text, video_weight=0.0)
    assert (only_video + only_actions).item() == pytest.approx(first.item(), rel=1e-5)
    first.backward()
    assert untrained.action_proj.weight.grad is not None
    untrained.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match=r"cond_dropout must be a fraction in \[0, 1\], got 1.5"):
        loss(1, text, cond_dropout=1.5)


# ---- solver math with an exact (oracle) model ----------------------------------------------------------
class GaussianOracle(torch.nn.Module):
    """The exact prediction for data whose every element is N(mean, std^2) (no training needed)."""

    def __init__(self, config, mean: float, std: float):
        super().__init__()
        self.config, self.mean, self.std = config, mean, std
        self.schedule = schedule_for(config)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives sample() a dtype and device

    def forward(self, video, text, actions, timestep, image=None, history=None, robot_id=None):
        alpha, sigma = self.schedule.alpha_sigma(timestep)
        outs = []
        for x in (video, actions):
            a = alpha.view(-1, *[1] * (x.dim() - 1))
            s = sigma.view(-1, *[1] * (x.dim() - 1))
            x0 = self.mean + a * self.std ** 2 / (a ** 2 * self.std ** 2 + s ** 2) * (x - a * self.mean)
            eps = (x - a * x0) / s
            outs.append(a * eps - s * x0 if self.config.objective == "v_prediction" else eps - x0)
        return tuple(outs)


def _oracle_run(sampler: str, steps: int, std: float = 1.0, batch: int = 64) -> tuple:
    """(samples, exact): the oracle's video samples and where the exact probability-flow ODE maps
    the same initial noise (mean + std * z; sample() draws z first from Generator().manual_seed(seed))."""
    objective = SAMPLERS[sampler].objectives[0]
    oracle = GaussianOracle(toy_config(objective), mean=0.7, std=std)
    text = torch.zeros(batch, oracle.config.text_len, oracle.config.text_dim)
    chunk = sample(oracle, text, sampler=sampler, steps=steps, cfg_scale=1.0, seed=0, return_video=True)
    z = torch.randn(chunk.video.shape, generator=torch.Generator().manual_seed(0))
    return chunk.video, 0.7 + std * z


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m", "euler"])
def test_ode_samplers_converge_to_the_exact_flow(sampler):
    samples, exact = _oracle_run(sampler, steps=1000)
    assert _rms(samples, exact) < 5e-3  # measured 2e-3 (ddim), 3e-4 (dpm++2m), 1.3e-3 (euler)


def test_sde_sampler_matches_the_distribution():
    # Stochastic: it forgets the initial noise, so only the distribution is checked (8192 values;
    # the sample std of the std is about 0.008).
    samples, _ = _oracle_run("dpm++2m-sde", steps=200)
    assert abs(samples.mean().item() - 0.7) < 0.03 and abs(samples.std().item() - 1.0) < 0.03


def test_dpm_solver_is_higher_order_than_ddim():
    # With the exact model only the discretisation error is left. DDIM is first order (the error
    # halves per doubling of steps); DPM-Solver++(2M) is well below it and falls faster. Measured
    # rms: ddim 0.142 -> 0.076, dpm++2m 0.062 -> 0.023 (10 -> 20 steps).
    ddim = [_rms(*_oracle_run("ddim", n)) for n in (10, 20)]
    dpm = [_rms(*_oracle_run("dpm++2m", n)) for n in (10, 20)]
    assert ddim[1] == pytest.approx(ddim[0] / 2, rel=0.2)
    assert dpm[0] < 0.5 * ddim[0] and dpm[1] < 0.4 * ddim[1]
    assert dpm[1] < 0.45 * dpm[0]


# ---- the toy distribution --------------------------------------------------------------------------------
def test_checker_rejects_noise_collapse_and_ignored_condition(vpred_model):
    n = SAMPLES_PER_CONDITION
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(n, 2, 2, generator=g)
    assert distribution_failures(noise, 0)
    collapsed = CENTRES[0, 0] + MODE_STD * torch.randn(n, 2, 2, generator=g)
    assert any("fraction" in f for f in distribution_failures(collapsed, 0))
    averaged = MODE_STD * torch.randn(n, 2, 2, generator=g)  # between the modes: a regression to the mean
    assert distribution_failures(averaged, 0)
    # Real samples of condition 1 judged as condition 0 (a sampler that ignores the text).
    chunk = sample(vpred_model, _texts(vpred_model, n)[n:], sampler="dpm++2m", steps=10, cfg_scale=1.0)
    assert any("other condition" in f for f in distribution_failures(chunk.actions, 0))
    assert any("other condition" in f for f in distribution_failures(noise, 0))


@pytest.mark.parametrize("sampler", list(SAMPLER_RUNS))
def test_sampler_reproduces_toy_distribution(request, sampler):
    objective, steps = SAMPLER_RUNS[sampler]
    model = _model(request, objective)
    n = SAMPLES_PER_CONDITION
    chunk = sample(model, _texts(model, n), sampler=sampler, steps=steps, cfg_scale=1.0, seed=0,
                   return_video=True)
    assert isinstance(chunk, ActionChunk)
    assert chunk.actions.shape == (2 * n, model.config.action_len, 2)
    assert (chunk.sampler, chunk.steps, chunk.nfe) == (sampler, steps, steps)
    for cond in (0, 1):
        rows = slice(cond * n, (cond + 1) * n)
        failures = distribution_failures(chunk.actions[rows], cond)
        assert not failures, f"{sampler} condition {cond}: {failures}; {mode_stats(chunk.actions[rows], cond)}"
        video_err = (chunk.video[rows] - VIDEO_LEVEL[cond]).abs().mean().item()
        assert video_err < 0.1, f"video latents are {video_err:.3f} off the condition's level"


@pytest.mark.parametrize("objective,sampler,steps,cfg_scale,cfg_schedule", [
    ("v_prediction", "ddim", 20, 3.0, "constant"),
    ("v_prediction", "dpm++2m-sde", 25, 6.0, "dynamic"),  # VideoVLA's release setting, fewer steps
    ("flow_matching", "euler", 20, 3.0, "dynamic"),
])
def test_guided_sampling_lands_in_the_right_modes(request, objective, sampler, steps, cfg_scale, cfg_schedule):
    model = _model(request, objective)
    n = 256
    chunk = sample(model, _texts(model, n), sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                   cfg_schedule=cfg_schedule, seed=1)
    assert chunk.nfe == 2 * steps
    for cond in (0, 1):
        rows = chunk.actions[cond * n:(cond + 1) * n]
        failures = distribution_failures(rows, cond, cfg=True)
        assert not failures, f"{sampler} cfg {cfg_scale} {cfg_schedule}, condition {cond}: {failures}"


@pytest.mark.parametrize("sampler", list(SAMPLER_RUNS))
def test_seeded_determinism(request, sampler):
    model = _model(request, SAMPLER_RUNS[sampler][0])
    text = _texts(model, 4)
    run = lambda seed: sample(model, text, sampler=sampler, steps=6, cfg_scale=2.0, seed=seed,  # noqa: E731
                              return_video=True)
    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a.actions, b.actions) and torch.equal(a.video, b.video)
    assert not torch.allclose(a.actions, c.actions)


# ---- guidance mechanics ----------------------------------------------------------------------------------
class _ForwardLog:
    """Records the batch of every forward call of a module (a pre-hook, the model stays untouched)."""

    def __init__(self, module):
        self.calls = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        video, text = args[0], args[1]
        self.calls.append({"batch": video.shape[0], "text": text.clone(), "image": kwargs.get("image")})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_cond_and_uncond_share_one_forward(untrained):
    config = untrained.config
    text = condition_texts(config)  # B = 2
    image = torch.randn(2, 1, config.latent_channels, config.latent_height, config.latent_width)
    with _ForwardLog(untrained) as log:
        chunk = sample(untrained, text, image, sampler="ddim", steps=5, cfg_scale=6.0)
    assert chunk.nfe == 10
    assert [c["batch"] for c in log.calls] == [4] * 5
    first = log.calls[0]
    torch.testing.assert_close(first["text"], torch.cat((text, torch.zeros_like(text))))
    torch.testing.assert_close(first["image"], torch.cat((image, image)))

    with _ForwardLog(untrained) as log:
        chunk = sample(untrained, text, image, sampler="dpm++2m", steps=4, cfg_scale=1.0)
    assert chunk.nfe == 4 and [c["batch"] for c in log.calls] == [2] * 4

    uncond = torch.randn(1, config.text_len, config.text_dim)
    with _ForwardLog(untrained) as log:
        sample(untrained, text, sampler="ddim", steps=2, cfg_scale=2.0, cfg_schedule="dynamic", uncond_text=uncond)
    torch.testing.assert_close(log.calls[0]["text"][2:], uncond.expand(2, -1, -1))


def test_guidance_formula(untrained):
    text = condition_texts(untrained.config)
    # scale 0 is the unconditional model, scale 1 the conditional one.
    uncond_only = sample(untrained, text, sampler="ddim", steps=3, cfg_scale=0.0)
    zeros_text = sample(untrained, torch.zeros_like(text), sampler="ddim", steps=3, cfg_scale=1.0)
    torch.testing.assert_close(uncond_only.actions, zeros_text.actions, atol=1e-5, rtol=1e-5)
    assert guidance_scale(6.0, "constant", 999.0, 1000) == 6.0
    assert guidance_scale(6.0, "dynamic", 1000.0, 1000) == 1.0  # p = 0: no guidance at pure noise
    assert guidance_scale(6.0, "dynamic", 0.0, 1000) == pytest.approx(7.0)  # p = 1: 1 + cfg_scale
    p = 0.8
    assert guidance_scale(6.0, "dynamic", 200.0, 1000) == pytest.approx(1 + 3 * (1 - math.cos(math.pi * p ** 5)))


def test_samplers_for_objectives():
    assert samplers_for("v_prediction") == ["ddim", "dpm++2m", "dpm++2m-sde", "consistency"]
    assert samplers_for("flow_matching") == ["euler", "consistency"]


# ---- bad input --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(sampler="heun"), ValueError, r"unknown sampler 'heun'; known samplers: \['consistency', 'ddim', 'dpm\+\+2m'"),
    (dict(sampler="euler"), ValueError, r"'euler' does not fit this model's objective 'v_prediction'; "
                                        r"it accepts \['ddim', 'dpm\+\+2m', 'dpm\+\+2m-sde', 'consistency'\]"),
    (dict(steps=0), ValueError, r"steps must be in \[1, 1000\].*got 0"),
    (dict(steps=1001), ValueError, r"steps must be in \[1, 1000\].*got 1001"),
    (dict(steps=2.5), TypeError, r"steps must be an int, got float 2.5"),
    (dict(cfg_scale=-1.0), ValueError, r"cfg_scale must be a finite number >= 0, got -1.0"),
    (dict(cfg_scale=float("nan")), ValueError, r"cfg_scale must be a finite number >= 0, got nan"),
    (dict(cfg_scale="6"), TypeError, r"cfg_scale must be a number, got str"),
    (dict(cfg_schedule="cosine"), ValueError, r"cfg_schedule must be one of \('constant', 'dynamic'\), got 'cosine'"),
    (dict(seed=1.5), TypeError, r"seed must be an int, got float"),
])
def test_bad_sampler_options(untrained, kwargs, error, match):
    text = condition_texts(untrained.config)
    with pytest.raises(error, match=match):
        sample(untrained, text, **kwargs)


def test_flow_model_rejects_v_prediction_samplers():
    model = wam_fast.WAMTransformer(toy_config("flow_matching"))
    text = condition_texts(model.config)
    with pytest.raises(ValueError, match=r"'ddim' does not fit this model's objective 'flow_matching'; "
                                         r"it accepts \['euler', 'consistency'\]"):
        sample(model, text, sampler="ddim")


def test_bad_text(untrained):
    config = untrained.config
    good = condition_texts(config)
    with pytest.raises(ValueError, match=r"text must have shape \(B, text_len=2, text_dim=32\), got \(2, 3, 32\)"):
        sample(untrained, torch.zeros(2, 3, 32))
    with pytest.raises(ValueError, match=r"text must have shape .* got \(2, 32\)"):
        sample(untrained, torch.zeros(2, 32))
    with pytest.raises(TypeError, match=r"text must have the model's dtype torch.float32, got torch.float64"):
        sample(untrained, good.double())
    with pytest.raises(TypeError, match=r"text must be a torch.Tensor .* got list"):
        sample(untrained, [[0.0]])
    with pytest.raises(ValueError, match=r"uncond_text must have shape \(2 or 1, text_len=2, text_dim=32\), "
                                         r"got \(3, 2, 32\)"):
        sample(untrained, good, uncond_text=torch.zeros(3, 2, 32))
    with pytest.raises(ValueError, match=r"image must have batch size 2 \(text's\), got shape \(3, 1, 4, 4, 4\)"):
        sample(untrained, good, torch.zeros(3, 1, 4, 4, 4))


def test_temporal_model_with_history_and_robot_id():
    config = toy_config("v_prediction")
    config = type(config).from_dict({**config.to_dict(), "mask": "temporal", "history_frames": 2, "num_robots": 3})
    torch.manual_seed(0)
    model = wam_fast.WAMTransformer(config)
    text = condition_texts(config)
    frame = (config.latent_channels, config.latent_height, config.latent_width)
    image, history = torch.randn(2, 1, *frame), torch.randn(2, 2, *frame)
    robot_id = torch.tensor([0, 2])
    with _ForwardLog(model) as log:
        chunk = sample(model, text, image, sampler="dpm++2m-sde", steps=3, history=history, robot_id=robot_id,
                       return_video=True)
    assert chunk.video.shape == (2, config.latent_frames - 1, *frame)
    assert [c["batch"] for c in log.calls] == [4] * 3
    with pytest.raises(ValueError, match=r"history must have batch size 2 \(text's\), got shape \(1, 2, 4, 4, 4\)"):
        sample(model, text, image, history=history[:1], robot_id=robot_id)
