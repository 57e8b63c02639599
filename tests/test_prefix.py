"""Committed action prefixes (wam_fast.prefix): a chunk that starts with the actions a robot commits while
it is inferred and continues them. Guided sampling for any model (inpainting and a blend), clean flagged
rows for a student distilled to read them (config.action_prefix, --prefix-fraction), through sample,
WAMPolicy (cached or not, CUDA-graph runner) and the distillation objective."""
import copy

import pytest
import torch

import wam_fast
from wam_fast.compiler import graphs
from wam_fast.distill import objectives as O
from wam_fast.prefix import BLEND_ACTIONS, make_prefix

A = 3  # action_dim of the configs here


def config(action_prefix=False, distillation="shortcut", **overrides):
    fields = dict(mask="temporal", history_frames=1, action_len=8, action_dim=A, latent_height=4, latent_width=4,
                  text_len=3, distillation=distillation, distilled_steps=(1, 2, 4) if distillation else (),
                  action_prefix=action_prefix)
    fields.update(overrides)
    return wam_fast.configs.get("tiny", **fields)


def model(cfg, seed=0):
    torch.manual_seed(seed)
    m = wam_fast.WAMTransformer(cfg).eval()
    with torch.no_grad():  # trained-looking: every weight non-trivial, the committed vector too
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def episode(cfg, batch=2, frames=3, seed=3):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g)
    shape = (batch, 1, cfg.latent_channels, cfg.latent_height, cfg.latent_width)
    return text, [torch.randn(shape, generator=g) for _ in range(frames)]


def run(m, steps, prefixes, cache=True, attach=False, seed=0):
    """Chunks of one episode, frame i with prefixes[i] (None: no prefix)."""
    text, frames = episode(m.config, frames=len(prefixes))
    policy = wam_fast.WAMPolicy(m, steps=steps, cache=cache, seed=seed)
    runner = graphs.attach(policy, graphs.EagerCapture) if attach else None
    policy.reset(text)
    chunks = [policy.act(f, prefix=p).actions for f, p in zip(frames, prefixes)]
    return chunks, runner


def committed(d, batch=2, seed=5):
    return torch.randn(batch, d, A, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("action_prefix", [False, True])
@pytest.mark.parametrize("cache", [False, True])
def test_an_empty_prefix_is_the_plain_chunk(action_prefix, cache):
    m = model(config(action_prefix))
    plain, _ = run(m, 2, [None, None], cache)
    empty, _ = run(m, 2, [committed(0), committed(0)], cache)
    assert all(torch.equal(a, b) for a, b in zip(plain, empty))


@pytest.mark.parametrize("action_prefix,steps", [(False, 2), (False, 4), (True, 1), (True, 2)])
@pytest.mark.parametrize("d", [1, 3])
def test_the_chunk_starts_with_the_committed_actions_and_the_model_sees_them(action_prefix, steps, d):
    m = model(config(action_prefix))
    given = committed(d)
    chunk, _ = run(m, steps, [given])
    assert torch.equal(chunk[0][:, :d], given)
    other, _ = run(m, steps, [-given])
    after_blend = d + BLEND_ACTIONS  # positions no guidance touches: only the model can move them
    assert (chunk[0][:, after_blend:] - other[0][:, after_blend:]).abs().max() > 1e-4


def test_one_step_eases_the_chunk_out_of_the_committed_motion():
    """With one evaluation the model never sees the prefix: the guidance is the output's alone, the blend
    positions moved toward the last committed action by 0.8, 0.6, 0.4, 0.2, the rest the plain chunk."""
    m = model(config(False))
    plain, _ = run(m, 1, [None])
    given = committed(2)
    chunk, _ = run(m, 1, [given])
    weights = torch.tensor([0.8, 0.6, 0.4, 0.2])[None, :, None]
    eased = plain[0][:, 2:6] + weights * (given[:, -1:] - plain[0][:, 2:6])
    torch.testing.assert_close(chunk[0][:, 2:6], eased, rtol=0, atol=1e-6)
    assert torch.equal(chunk[0][:, :2], given) and torch.equal(chunk[0][:, 6:], plain[0][:, 6:])


@pytest.mark.parametrize("blend,weights", [(0, []), (2, [2 / 3, 1 / 3])])
def test_the_blend_length_is_a_choice(blend, weights):
    m = model(config(False))
    plain, _ = run(m, 1, [None])
    given = committed(2)
    text, frames = episode(m.config, frames=1)
    policy = wam_fast.WAMPolicy(m, steps=1, seed=0)
    policy.reset(text)
    chunk = policy.act(frames[0], prefix=given, blend=blend).actions
    end = 2 + len(weights)
    eased = plain[0][:, 2:end] + torch.tensor(weights)[None, :, None] * (given[:, -1:] - plain[0][:, 2:end])
    torch.testing.assert_close(chunk[:, 2:end], eased, rtol=0, atol=1e-6)
    assert torch.equal(chunk[:, :2], given) and torch.equal(chunk[:, end:], plain[0][:, end:])
    with pytest.raises(ValueError, match="blend must be an int >= 0"):
        policy.act(frames[0], prefix=given, blend=-1)


def test_the_blend_is_cut_at_the_end_of_the_chunk():
    prefix = make_prefix(committed(6), 2, 8, A, "cpu")
    assert prefix.weight[0, :, 0].tolist() == pytest.approx([1] * 6 + [0.8, 0.6])
    assert prefix.known[0, :, 0].tolist() == [True] * 6 + [False] * 2


@pytest.mark.parametrize("action_prefix", [False, True])
def test_cached_and_uncached_chunks_agree_with_a_prefix_fp32(action_prefix):
    m = model(config(action_prefix))
    prefixes = [None, committed(2), committed(3, seed=6)]
    cached, _ = run(m, 2, prefixes, cache=True)
    uncached, _ = run(m, 2, prefixes, cache=False)
    for a, b in zip(cached, uncached):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_sample_takes_a_prefix_as_the_policy_does():
    m = model(config(True, mask="full", history_frames=0))
    text, frames = episode(m.config, frames=1)
    given = committed(2)
    chunk = wam_fast.sample(m, text, frames[0], steps=1, seed=0, prefix=given)
    assert torch.equal(chunk.actions[:, :2], given)
    assert not torch.equal(chunk.actions, wam_fast.sample(m, text, frames[0], steps=1, seed=0).actions)


def test_graph_runner_serves_every_prefix_length_from_one_graph_per_slot():
    m = model(config(True))
    prefixes = [committed(1), committed(3, seed=6), None, committed(2, seed=7), committed(4, seed=8)]
    eager, _ = run(m, 1, prefixes)
    replayed, runner = run(m, 1, prefixes, attach=True)
    for a, b in zip(eager, replayed):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # slots 0, 1 with a prefix, slot 0 without: three captures, the other two chunks replays
    assert (runner.captures, runner.replays) == (3, 2)


@pytest.mark.parametrize("prefix,error,message", [
    (torch.zeros(2, 8, A), ValueError, "d in \\[0, 7\\]"),
    (torch.zeros(2, 2, A + 1), ValueError, "shape \\(B=2, d, action_dim=3\\)"),
    (torch.zeros(1, 2, A), ValueError, "shape \\(B=2"),
    (torch.zeros(2, 2, A, dtype=torch.int64), TypeError, "floating"),
    (torch.full((2, 2, A), float("nan")), ValueError, "non-finite|NaN"),
    ([[0.0]], TypeError, "torch.Tensor"),
])
def test_a_bad_prefix_is_refused_naming_what_came(prefix, error, message):
    m = model(config(True))
    text, frames = episode(m.config, frames=1)
    policy = wam_fast.WAMPolicy(m, steps=1, seed=0)
    policy.reset(text)
    with pytest.raises(error, match=message):
        policy.act(frames[0], prefix=prefix)


def test_committed_rows_are_refused_by_a_model_that_does_not_read_them():
    m = model(config(False))
    c = m.config
    text, frames = episode(c, frames=1)
    video = torch.randn(m.noisy_video_shape(2))
    actions = torch.randn(m.action_shape(2))
    known = torch.zeros(2, c.action_len, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="--prefix-fraction"):
        m(video, text, actions, torch.full((2,), 999.0), image=frames[0], step_size=torch.full((2,), 1000.0),
          committed=known)
    reader = model(config(True))
    with pytest.raises(TypeError, match="bool"):
        reader(video, text, actions, torch.full((2,), 999.0), image=frames[0], step_size=torch.full((2,), 1000.0),
               committed=known.float())


def test_a_fresh_prefix_student_is_its_teacher_and_the_field_round_trips(tmp_path):
    teacher = model(config(False, distillation="", mask="full", history_frames=0))
    student = O.make_student(teacher, "shortcut", action_prefix=True)
    assert student.config.action_prefix and torch.equal(student.action_embed.committed, torch.zeros_like(
        student.action_embed.committed))
    assert "action_prefix" not in teacher.config.to_dict()  # the default is left out: old files still match
    student.save_pretrained(tmp_path)
    assert wam_fast.load_pretrained(tmp_path).config.action_prefix


# ---- distillation: the student learns to continue the committed actions ------------------------------------
def _two_mode_batch(cfg, rows, g):
    """Every chunk is one of two constant motions, +1 or -1 on every action, with the same (blank) frame and
    text: only a committed first action tells which motion runs."""
    sign = torch.where(torch.rand(rows, generator=g) < 0.5, -1.0, 1.0)
    frame = (cfg.latent_channels, cfg.latent_height, cfg.latent_width)
    return {"text": torch.zeros(rows, cfg.text_len, cfg.text_dim), "image": torch.zeros((rows, 1) + frame),
            "future": torch.zeros((rows, cfg.latent_frames - 1) + frame),
            "actions": sign[:, None, None].expand(rows, cfg.action_len, cfg.action_dim).contiguous()}


def test_a_prefix_student_continues_the_committed_motion():
    teacher = model(config(False, distillation="", mask="full", history_frames=0, action_len=4))
    student = O.make_student(teacher, "shortcut", mask="temporal", action_prefix=True).train()
    objective = O.ShortcutObjective(teacher, student.config, prefix_fraction=0.75)
    ema = copy.deepcopy(student).eval()
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        batch = _two_mode_batch(student.config, 64, g)
        loss, _ = objective.loss(student, ema, batch, objective.draw(64, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.load_state_dict(student.state_dict())
    student.eval()
    c = student.config
    policy = wam_fast.WAMPolicy(student, steps=1, seed=0)
    policy.reset(torch.zeros(2, c.text_len, c.text_dim))
    frame = torch.zeros(2, 1, c.latent_channels, c.latent_height, c.latent_width)
    sign = torch.tensor([1.0, -1.0])
    chunk = policy.act(frame, prefix=sign[:, None, None].expand(2, 1, A).contiguous()).actions
    rest = chunk[:, 1:].mean(dim=(1, 2))
    assert (rest * sign > 0.7).all(), rest  # same frame and text: each row continues its own committed motion


def test_prefix_fraction_needs_a_student_that_reads_prefixes():
    teacher = model(config(False, distillation="", mask="full", history_frames=0))
    student = O.make_student(teacher, "shortcut")
    with pytest.raises(ValueError, match="action_prefix=True"):
        O.ShortcutObjective(teacher, student.config, prefix_fraction=0.5)
    reader = O.make_student(teacher, "shortcut", action_prefix=True)
    with pytest.raises(ValueError, match="fraction in \\[0, 1\\)"):
        O.ShortcutObjective(teacher, reader.config, prefix_fraction=1.0)
    draws = O.ShortcutObjective(teacher, reader.config).draw(8, torch.Generator().manual_seed(0))
    assert "prefix" not in draws  # no prefix rows: the draws of earlier versions


def test_a_prefix_adds_no_value_read_back(monkeypatch):
    """The prefix's values are checked in the observation's one fused check_values (one device sync a chunk)."""
    import wam_fast.policy as policy_module

    calls = []
    real = policy_module.check_values
    monkeypatch.setattr(policy_module, "check_values", lambda finite, *a, **k: (calls.append(sorted(finite)),
                                                                                 real(finite, *a, **k))[1])
    m = model(config(False))
    run(m, 2, [committed(2)])
    assert calls == [["text", "uncond_text"], ["image_latent", "prefix"]]  # reset, then one check per act
