"""wam_fast.distill.objectives: schedule algebra, make_student, and each objective's targets checked
against an independent route (the samplers of wam_fast.sampling, hand-written guidance)."""
import copy
import dataclasses

import pytest
import torch

import wam_fast
from wam_fast.distill import objectives as O
from wam_fast.sampling import SAMPLERS, run_sampler
from wam_fast.schedules import schedule_for

OBJECTIVES = ("v_prediction", "flow_matching")


def small_config(objective="v_prediction", **overrides):
    return wam_fast.configs.get("tiny", latent_height=4, latent_width=4, text_len=3, action_len=3,
                                objective=objective, **overrides)


def make_teacher(config, seed=0):
    torch.manual_seed(seed)
    model = wam_fast.WAMTransformer(config).eval()
    # random non-trivial weights everywhere (fresh output heads would be tiny)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def make_batch(config, rows, seed=1, history=0):
    g = torch.Generator().manual_seed(seed)
    c = config
    frame = (c.latent_channels, c.latent_height, c.latent_width)
    batch = {"text": torch.randn((rows, c.text_len, c.text_dim), generator=g),
             "image": torch.randn((rows, 1) + frame, generator=g),
             "future": torch.randn((rows, c.latent_frames - 1) + frame, generator=g),
             "actions": torch.randn((rows, c.action_len, c.action_dim), generator=g)}
    if history:
        batch["history"] = torch.randn((rows, history) + frame, generator=g)
    return batch


# ---- schedule algebra ----------------------------------------------------------------------------
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_alpha_sigma_matches_schedule_and_ends_clean(objective):
    schedule = schedule_for(small_config(objective))
    T = schedule.num_train_timesteps
    t = torch.tensor([0.0, 1.0, 17.5, 500.0, T - 1.0])
    a, s = O.alpha_sigma(schedule, t)
    ref_a, ref_s = schedule.alpha_sigma(t)
    torch.testing.assert_close(a, ref_a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s, ref_s, rtol=1e-6, atol=1e-6)
    end = torch.tensor([-1.0 if objective == "v_prediction" else 0.0])
    a, s = O.alpha_sigma(schedule, end)
    assert a.item() == 1.0 and s.item() == 0.0


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7])
def test_grid_and_step_match_the_samplers(objective, steps):
    config = small_config(objective)
    schedule = schedule_for(config)
    grid = O.sampling_grid_timestep(config, torch.full((steps,), steps), torch.arange(steps))
    assert grid.tolist() == pytest.approx(schedule.sampling_timesteps(steps), abs=1e-4)
    # one sampler_step from grid point i to the next equals the library sampler's step
    name = "ddim" if objective == "v_prediction" else "euler"
    solver = SAMPLERS[name](schedule, steps)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn((2, 10), generator=g), torch.randn((2, 10), generator=g)
    for i, t in enumerate(solver.timesteps):
        t_rows = torch.full((2,), t)
        t_next = O.sampling_grid_timestep(config, torch.full((2,), steps), torch.full((2,), i + 1))
        mine = O.sampler_step(schedule, x, out, t_rows, t_next)
        torch.testing.assert_close(mine, solver.step(i, x, out), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_implied_output_inverts_the_step(objective):
    schedule = schedule_for(small_config(objective))
    g = torch.Generator().manual_seed(0)
    x, x_end = torch.randn((3, 12), generator=g), torch.randn((3, 12), generator=g)
    t = torch.tensor([999.0, 499.0, 250.0]) if objective == "v_prediction" else torch.tensor([1000.0, 500.0, 250.0])
    t_end = t - torch.tensor([1000.0, 250.0, 125.0])
    out = O.implied_output(schedule, x, t, t_end, x_end)
    torch.testing.assert_close(O.sampler_step(schedule, x, out, t, t_end), x_end, rtol=1e-4, atol=1e-4)


# ---- make_student --------------------------------------------------------------------------------
def model_inputs(config, batch, t):
    video = O.clean_targets(config, batch)
    return (video, batch["text"], batch["actions"], t), O.context(config, batch)


@pytest.mark.parametrize("method", O.METHODS)
def test_fresh_student_predicts_what_the_teacher_does(method):
    config = small_config()
    teacher = make_teacher(config)
    student = O.make_student(teacher, method, steps=(1, 2, 4), cfg_scale=3.0)
    assert student.config.distillation == method and student.config.distilled_steps == (1, 2, 4)
    assert student.config.distilled_cfg_scale == 3.0
    batch = make_batch(config, 2)
    args, ctx = model_inputs(config, batch, torch.tensor([999.0, 300.0]))
    extra = {"step_size": torch.tensor([1000.0, 250.0])} if method == "shortcut" else {}
    with torch.no_grad():
        ref = teacher(*args, **ctx)
        out = student(*args, **ctx, **extra)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_temporal_student_of_a_full_teacher_shares_its_weights():
    teacher = make_teacher(small_config())
    student = O.make_student(teacher, "shortcut", mask="temporal", history_frames=1)
    assert student.config.mask == "temporal" and student.config.history_frames == 1
    for name, tensor in teacher.state_dict().items():
        torch.testing.assert_close(student.state_dict()[name], tensor, rtol=0, atol=0)


def test_make_student_bad_inputs():
    teacher = make_teacher(small_config())
    with pytest.raises(ValueError, match="unknown distillation method 'progressive'"):
        O.make_student(teacher, "progressive")
    with pytest.raises(ValueError, match=r"increasing order.*\(3, 1\)"):
        O.make_student(teacher, "shortcut", steps=(3, 1))
    with pytest.raises(TypeError, match="WAMTransformer teacher"):
        O.make_student(torch.nn.Linear(2, 2), "shortcut")
    student = O.make_student(teacher, "shortcut")
    with pytest.raises(ValueError, match="itself a shortcut student"):
        O.make_student(student, "shortcut")
    temporal_teacher = make_teacher(small_config(mask="temporal"))
    with pytest.raises(ValueError, match="mask='full' student cannot learn from a mask='temporal' teacher"):
        O.make_student(temporal_teacher, "shortcut", mask="full")


def test_objectives_refuse_mismatched_configs():
    teacher = make_teacher(small_config())
    other = small_config(num_heads=2)
    with pytest.raises(ValueError, match="num_heads: teacher 4, student 2"):
        O.ShortcutObjective(teacher, dataclasses.replace(other, distillation="shortcut", distilled_steps=(1,)))
    consistency = O.make_student(teacher, "consistency").config
    with pytest.raises(ValueError, match="needs a shortcut student config"):
        O.ShortcutObjective(teacher, consistency)
    with pytest.raises(ValueError, match="needs a consistency student config"):
        O.ConsistencyObjective(teacher, O.make_student(teacher, "shortcut").config)
    with pytest.raises(ValueError, match="both 0"):
        O.DiffusionObjective(small_config(), video_weight=0, action_weight=0)
    objective = O.DiffusionObjective(small_config())
    batch = make_batch(small_config(), 2)
    del batch["future"]
    with pytest.raises(ValueError, match=r"missing \['future'\].*teacher_rollout"):
        objective.loss(teacher, None, batch, objective.draw(2, torch.Generator().manual_seed(0)))


# ---- draws ---------------------------------------------------------------------------------------
def test_draws_are_deterministic_and_row_kinds_positional():
    teacher = make_teacher(small_config())
    student = O.make_student(teacher, "shortcut", steps=(1, 2, 4))
    objective = O.ShortcutObjective(teacher, student.config, period=4)
    a = objective.draw(16, torch.Generator().manual_seed(5))
    b = objective.draw(16, torch.Generator().manual_seed(5))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert a["coarse"].tolist() == [i % 4 == 3 for i in range(16)]
    coarse = a["coarse"]
    assert set(a["step_size"][coarse].tolist()) <= {1000.0, 500.0, 250.0}
    assert (a["step_size"][~coarse] == 0).all()
    # coarse timesteps sit on the sampling grid of their step count
    for t, t_mid, t_end, d in zip(*(a[k][coarse].tolist() for k in ("t", "t_mid", "t_end", "step_size"))):
        steps = round(1000 / d)
        grid = schedule_for(student.config).sampling_timesteps(steps) + [-1.0]
        assert t in grid and t_end == grid[grid.index(t) + 1]
        assert t_mid in schedule_for(student.config).sampling_timesteps(2 * steps)
        assert t > t_mid > t_end


# ---- targets, each against an independent route ---------------------------------------------------
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_teacher_output_guidance_and_frame0_for_a_temporal_student(cfg_scale):
    config = small_config()
    teacher = make_teacher(config)
    student = O.make_student(teacher, "shortcut", mask="temporal", cfg_scale=cfg_scale)
    objective = O.ShortcutObjective(teacher, student.config)
    rows = 3
    batch = make_batch(config, rows)
    draws = objective.draw(rows, torch.Generator().manual_seed(0))
    t = torch.tensor([999.0, 400.0, 20.0])
    x = draws["noise"]
    got = objective.teacher_output(x, t, batch, draws["noise0"])
    # by hand: frame 0 noised along noise0, guidance as uncond + s (cond - uncond) with zero text
    video, actions = O._split(student.config, x)
    alpha, sigma = schedule_for(config).alpha_sigma(t)
    frame0 = alpha.view(-1, 1, 1, 1, 1) * batch["image"] + sigma.view(-1, 1, 1, 1, 1) * draws["noise0"]
    full_video = torch.cat((frame0, video), dim=1)
    with torch.no_grad():
        cond = teacher(full_video, batch["text"], actions, t, image=batch["image"])
        uncond = teacher(full_video, torch.zeros_like(batch["text"]), actions, t, image=batch["image"])
    expect = [u + cfg_scale * (c - u) for c, u in zip(cond, uncond)]
    want = torch.cat((expect[0][:, 1:].flatten(1), expect[1].flatten(1)), dim=1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("objective_name", OBJECTIVES)
def test_shortcut_coarse_target_is_two_half_steps_of_the_ema_student(objective_name):
    """A 1-step coarse row from pure noise: ONE DDIM/Euler step with the target must land where the
    library's 2-step sampler, run with the EMA student, lands from the same noise."""
    config = small_config(objective_name)
    teacher = make_teacher(config)
    student = O.make_student(teacher, "shortcut", steps=(1, 2))
    ema = O.make_student(teacher, "shortcut", steps=(1, 2))
    with torch.no_grad():  # a non-zero step embedding, so the half-step size matters
        for p in ema.step_embed.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    objective = O.ShortcutObjective(teacher, student.config)
    rows = 2
    batch = make_batch(config, rows)
    T = config.num_train_timesteps
    t0 = T - 1.0 if objective_name == "v_prediction" else float(T)
    t = torch.full((rows,), t0)
    d = torch.full((rows,), float(T))
    x_t = torch.randn((rows, objective._state_size()), generator=torch.Generator().manual_seed(3))
    t_mid = O.sampling_grid_timestep(config, torch.full((rows,), 2), torch.ones(rows))
    t_end = O.sampling_grid_timestep(config, torch.full((rows,), 1), torch.ones(rows))
    target = objective._two_half_steps(ema, x_t, t, t_mid, t_end, d, batch)
    one_step = O.sampler_step(objective.schedule, x_t, target, t, t_end)

    video, actions = O._split(student.config, x_t)
    ctx = O.context(student.config, batch)

    def forward(v, a, timestep, step_size):
        return ema(v, batch["text"], a, timestep, step_size=step_size, **ctx)

    sampler = "ddim" if objective_name == "v_prediction" else "euler"
    with torch.no_grad():
        chunk = run_sampler(forward, student.config, rows, torch.device("cpu"), torch.float32, sampler=sampler,
                            steps=2, cfg_scale=1.0, cfg_schedule="constant", generator=torch.Generator(),
                            noise=(video, actions))
    want = torch.cat((chunk.video.flatten(1), chunk.actions.flatten(1)), dim=1)
    torch.testing.assert_close(one_step, want, rtol=1e-4, atol=1e-4)


def test_shortcut_half_step_sizes():
    teacher = make_teacher(small_config())
    objective = O.ShortcutObjective(teacher, O.make_student(teacher, "shortcut", steps=(1, 2, 4)).config)
    half = objective.half_step_size(torch.tensor([1000.0, 500.0, 250.0]))
    assert half.tolist() == [500.0, 250.0, 0.0]  # T/8 is not a trained size: the d = 0 velocity


def test_shortcut_fine_rows_of_a_fresh_student_have_zero_loss_without_guidance():
    config = small_config()
    teacher = make_teacher(config)
    student = O.make_student(teacher, "shortcut", cfg_scale=1.0)
    objective = O.ShortcutObjective(teacher, student.config)
    batch = make_batch(config, 8)
    draws = objective.draw(8, torch.Generator().manual_seed(0))
    loss, metrics = objective.loss(student, student, batch, draws)
    assert metrics["loss_fine"].item() == pytest.approx(0.0, abs=1e-10)
    assert metrics["loss_coarse"].item() > 1e-6  # one step of size d is not two of d/2
    loss.backward()
    assert student.step_embed.linear_2.weight.grad.abs().sum() > 0  # coarse rows train the step embedding


def test_consistency_target():
    config = small_config()
    teacher = make_teacher(config)
    student = O.make_student(teacher, "consistency", mask="temporal", cfg_scale=2.0)
    ema = make_teacher(student.config, seed=7)
    objective = O.ConsistencyObjective(teacher, student.config, solver_steps=4)
    rows = 4
    batch = make_batch(config, rows)
    draws = objective.draw(rows, torch.Generator().manual_seed(0))
    draws["t"] = torch.tensor([999.0, 749.0, 499.0, 249.0])  # the last step reaches clean data
    draws["t_next"] = draws["t"] - 250.0
    loss, _ = objective.loss(student, ema, batch, draws)
    # by hand
    sched = objective.schedule
    x0 = torch.cat((batch["future"].flatten(1), batch["actions"].flatten(1)), dim=1)
    a, s = sched.alpha_sigma(draws["t"])
    x_t = a[:, None] * x0 + s[:, None] * draws["noise"]
    v = objective.teacher_output(x_t, draws["t"], batch, draws["noise0"])
    x_next = O.sampler_step(sched, x_t, v, draws["t"], draws["t_next"])
    video, actions = O._split(student.config, x_next)
    with torch.no_grad():
        ema_out = ema(video, batch["text"], actions, draws["t_next"].clamp_min(0), image=batch["image"])
    ema_out = torch.cat((ema_out[0].flatten(1), ema_out[1].flatten(1)), dim=1)
    an, sn = sched.alpha_sigma(draws["t_next"][:3])
    target = torch.cat((an[:, None] * x_next[:3] - sn[:, None] * ema_out[:3], x_next[3:]))
    video, actions = O._split(student.config, x_t)
    with torch.no_grad():
        out = student(video, batch["text"], actions, draws["t"], image=batch["image"])
    out = torch.cat((out[0].flatten(1), out[1].flatten(1)), dim=1)
    pred = a[:, None] * x_t - s[:, None] * out
    pv, tv = O._split(student.config, pred), O._split(student.config, target)
    want = torch.nn.functional.mse_loss(pv[0], tv[0]) + torch.nn.functional.mse_loss(pv[1], tv[1])
    torch.testing.assert_close(loss.detach(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("objective_name", OBJECTIVES)
def test_diffusion_objective_matches_its_definition(objective_name):
    config = small_config(objective_name)
    model = make_teacher(config)
    objective = O.DiffusionObjective(config, cond_dropout=0.5, action_weight=2.0)
    batch = make_batch(config, 6)
    draws = objective.draw(6, torch.Generator().manual_seed(0))
    loss, metrics = objective.loss(model, None, batch, draws)
    sched = schedule_for(config)
    x0v = torch.cat((batch["image"], batch["future"]), dim=1)
    nv, na = O._split(config, draws["noise"])
    t = draws["t"]
    text = torch.where(draws["drop"][:, None, None], 0.0, batch["text"])
    with torch.no_grad():
        out_v, out_a = model(sched.add_noise(x0v, nv, t), text, sched.add_noise(batch["actions"], na, t), t,
                             image=batch["image"])
    want = (torch.nn.functional.mse_loss(out_v, sched.target(x0v, nv, t))
            + 2.0 * torch.nn.functional.mse_loss(out_a, sched.target(batch["actions"], na, t)))
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)
    assert 0 < draws["drop"].sum() < 6


@pytest.mark.parametrize("objective_name", OBJECTIVES)
def test_diffusion_objective_at_one_timestep_is_a_regressor(objective_name):
    # timestep = the last one: the input is (almost) pure noise and the loss is the action MSE against
    # the target there (v = -x0 with zero terminal SNR): a regression of the chunk.
    config = small_config(objective_name)
    model = make_teacher(config)
    last = config.num_train_timesteps - 1
    objective = O.DiffusionObjective(config, cond_dropout=0.0, video_weight=0.0, timestep=last)
    batch = make_batch(config, 5)
    draws = objective.draw(5, torch.Generator().manual_seed(0))
    uniform = O.DiffusionObjective(config).draw(5, torch.Generator().manual_seed(0))
    assert draws["t"].tolist() == [float(last)] * 5 and len(set(uniform["t"].tolist())) > 1
    torch.testing.assert_close(draws["noise"], uniform["noise"], rtol=0, atol=0)
    loss, metrics = objective.loss(model, None, batch, draws)
    sched = schedule_for(config)
    nv, na = O._split(config, draws["noise"])
    t = draws["t"]
    alpha, _ = sched.alpha_sigma(t)
    assert (alpha == 0).all() if objective_name == "v_prediction" else (alpha < 2e-3).all()  # (almost) pure noise
    x0v = torch.cat((batch["image"], batch["future"]), dim=1)
    with torch.no_grad():
        _, out_a = model(sched.add_noise(x0v, nv, t), batch["text"], sched.add_noise(batch["actions"], na, t), t,
                         image=batch["image"])
    want = torch.nn.functional.mse_loss(out_a, sched.target(batch["actions"], na, t))
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)
    assert metrics["loss_video"] > 0  # measured, not trained
    for bad in (-1, config.num_train_timesteps, 2.5, True):
        with pytest.raises(ValueError, match=f"timestep must be None .* got {bad!r}"):
            O.DiffusionObjective(config, timestep=bad)


@pytest.mark.parametrize("shape", [(3, 2, 3, 7, 5), (2, 1, 4, 6), (4, 1, 2, 9, 9)])
def test_shift_frames_matches_a_clamped_index_reference(shape):
    g = torch.Generator().manual_seed(sum(shape))
    frames = torch.randn(shape, generator=g)
    height, width = shape[-2:]
    pad = 3
    shifts = torch.randint(-pad, pad + 1, (shape[0], 2), generator=g)
    shifts[0] = torch.tensor([pad, -pad])  # the extremes, where most of the frame is repeated edge
    out = O.shift_frames(frames, shifts, pad)
    want = torch.empty_like(frames)
    for b, (dy, dx) in enumerate(shifts.tolist()):
        for y in range(height):
            for x in range(width):
                want[b, ..., y, x] = frames[b, ..., min(max(y + dy, 0), height - 1), min(max(x + dx, 0), width - 1)]
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    for dtype in (torch.float16, torch.bfloat16):  # the demos' latents are float16: moved, not rounded
        torch.testing.assert_close(O.shift_frames(frames.to(dtype), shifts, pad), want.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(O.shift_frames(frames, torch.zeros_like(shifts), pad), frames, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"shifts must be \(rows, 2\)"):
        O.shift_frames(frames, shifts[:1], pad)
    with pytest.raises(ValueError, match=r"shifts must lie in \[-1, 1\], got up to 3"):
        O.shift_frames(frames, shifts, 1)


@pytest.mark.parametrize("objective_name", OBJECTIVES)
def test_diffusion_objective_random_shift_moves_every_frame_of_a_sample_alike(objective_name):
    config = small_config(objective_name)
    model = make_teacher(config)
    batch = make_batch(config, 6, history=2)
    plain = O.DiffusionObjective(config, cond_dropout=0.0)
    shifted = O.DiffusionObjective(config, cond_dropout=0.0, random_shift=2)
    draws = shifted.draw(6, torch.Generator().manual_seed(0))
    before = plain.draw(6, torch.Generator().manual_seed(0))
    assert "shift" not in before and set(draws) == set(before) | {"shift"}
    for key in before:  # without a shift, the draws are unchanged (recorded runs reproduce)
        torch.testing.assert_close(draws[key], before[key], rtol=0, atol=0)
    assert draws["shift"].shape == (6, 2) and draws["shift"].abs().max() <= 2 and draws["shift"].abs().sum() > 0
    loss, _ = shifted.loss(model, None, batch, draws)
    moved = {k: O.shift_frames(v, draws["shift"], 2) if k in ("image", "future", "history") else v
             for k, v in batch.items()}
    want, _ = plain.loss(model, None, moved, before)
    unmoved, _ = plain.loss(model, None, batch, before)
    torch.testing.assert_close(loss, want, rtol=0, atol=0)
    assert abs(loss.item() - unmoved.item()) > 1e-4  # the shift reached the model
    for bad in (-1, 4, 1.5, True):  # latent frames are 4x4 here
        with pytest.raises(ValueError, match=f"random_shift must be an int in \\[0, 3\\].*got {bad!r}"):
            O.DiffusionObjective(config, random_shift=bad)


def test_shortcut_training_lowers_its_loss():
    """A few AdamW steps on one batch lower the shortcut loss (the gradients point somewhere useful)."""
    config = small_config()
    teacher = make_teacher(config)
    student = O.make_student(teacher, "shortcut", mask="temporal", cfg_scale=2.0)
    objective = O.ShortcutObjective(teacher, student.config)
    batch = make_batch(config, 4)
    draws = objective.draw(4, torch.Generator().manual_seed(0))
    ema = copy.deepcopy(student)  # frozen targets: the loss must then fall steadily
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss, _ = objective.loss(student, ema, batch, draws)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
