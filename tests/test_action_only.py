"""Action-only students (issue #26): ``future_frames=k`` makes a temporal model denoise the action chunk
plus only k future frames (0: no video at all). Config, layout, model, KV cache, sampling, WAMPolicy,
CUDA-graph runner (CPU stand-in), compile and FP8, the distillation objectives and CLI, the bench
arithmetic, and the control that an action-only student reads the frame."""
import dataclasses
import json

import pytest
import torch

import wam_fast
from wam_fast import configs
from wam_fast.cache import chunk_cost
from wam_fast.compiler import CompileConfig, graphs
from wam_fast.distill import objectives, trainer
from wam_fast.distill.cli import main as distill_main
from wam_fast.distill.demo import demo_config
from wam_fast.distill.evaluate import evaluate, format_table
from wam_fast.distill.synthetic import make_synthetic_dataset, synthetic_task
from model_inputs import episode, random_inputs


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is as fast, and steadier on a loaded machine
    yield
    torch.set_num_threads(threads)


def tiny(future_frames=None, seed=0, **overrides):
    torch.manual_seed(seed)
    config = configs.get("tiny", mask="temporal", latent_frames=3, history_frames=2, future_frames=future_frames,
                         **overrides)
    return wam_fast.WAMTransformer(config).eval()


def twin(model, **changes):
    """``model``'s weights under another config (future_frames changes no parameter; a shortcut
    student's step embedding starts at zero)."""
    other = wam_fast.WAMTransformer(dataclasses.replace(model.config, **changes)).eval()
    missing, unexpected = other.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("step_embed.") for k in missing)
    return other


# ---- config and layout ----------------------------------------------------------------------------------------
def test_config_counts_and_round_trip():
    base = configs.get("videovla-5b", mask="temporal")
    assert (base.future_frames, base.noisy_frames, base.noisy_tokens, base.action_only) == (None, 3, 774, False)
    action_only = dataclasses.replace(base, future_frames=0)
    assert (action_only.noisy_frames, action_only.noisy_tokens, action_only.action_only) == (0, 6, True)
    assert action_only.num_tokens == 226 + 256 + 6
    one = dataclasses.replace(base, future_frames=1)
    assert (one.noisy_frames, one.noisy_tokens, one.num_tokens) == (1, 262, 226 + 2 * 256 + 6)
    assert "future_frames" not in base.to_dict()  # the default is left out: earlier files still match
    assert configs.WAMConfig.from_dict(action_only.to_dict()) == action_only
    assert configs.WAMConfig.from_dict(json.loads(json.dumps(one.to_dict()))) == one


@pytest.mark.parametrize("overrides, message", [
    (dict(mask="full", future_frames=0), "needs mask='temporal'"),
    (dict(mask="temporal", future_frames=2), r"future_frames must be None \(all future frames\) or an int in \[0, 1\]"),
    (dict(mask="temporal", future_frames=-1), r"in \[0, 1\]"),
    (dict(mask="temporal", future_frames=True), "got True"),
    (dict(mask="temporal", future_frames=0.0), "got 0.0"),
])
def test_config_refuses_bad_future_frames(overrides, message):
    with pytest.raises(ValueError, match=message):
        configs.get("tiny", **overrides)


def test_layout_has_no_video_segment_and_the_temporal_rule():
    config = configs.get("tiny", mask="temporal", latent_frames=3, history_frames=2, future_frames=0)
    layout = wam_fast.WAMTransformer(config).layout(num_history=2)
    assert layout.names == ("text", "history", "current", "actions")
    assert layout.noisy == (False, False, False, True)
    assert layout.frame_positions == (0, 1, 2) and layout.num_tokens == config.text_len + 3 * 16 + config.action_len
    mask = layout.attention_mask()
    actions = slice(layout.start("actions"), layout.num_tokens)
    assert mask[actions].all()  # the actions see everything
    assert not mask[:layout.start("actions"), actions].any()  # nothing clean sees the actions
    one = wam_fast.WAMTransformer(dataclasses.replace(config, future_frames=1)).layout(num_history=2)
    assert one.names[-2:] == ("video", "actions") and one.frame_positions == (0, 1, 2, 3)


# ---- the model, the cache, sampling, the policy -----------------------------------------------------------------
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_forward_reads_frame_text_and_history_and_returns_empty_video(dtype, tol):
    reference = tiny(future_frames=0)
    inputs = random_inputs(reference, batch=2, num_history=2, generator=torch.Generator().manual_seed(1))
    assert inputs["video"].shape == (2, 0, 4, 8, 8)
    _, expected = reference(**inputs)  # float32
    model = twin(reference).to(dtype)
    cast = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and k != "timestep" else v)
            for k, v in inputs.items()}
    video, actions = model(**cast)
    assert video.shape == (2, 0, 4, 8, 8) and actions.shape == (2, 4, 7) and actions.dtype == dtype
    assert (actions.float() - expected).abs().max() < tol
    for name in ("image", "text", "history"):  # every condition reaches the actions (float32: no rounding)
        changed = dict(inputs, **{name: inputs[name] + 1})
        assert (reference(**changed)[1] - expected).abs().max() > 1e-3, name
    # the shortcut student's step size reaches the actions (its embedding is added to them alone)
    student = twin(reference, distillation="shortcut", distilled_steps=(1, 2))
    torch.nn.init.normal_(student.step_embed.linear_2.weight)
    assert (student(**inputs, step_size=500.0)[1] - student(**inputs, step_size=0.0)[1]).abs().max() > 1e-3


@pytest.mark.parametrize("future_frames", [0, 1])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 6e-2)])
def test_cached_policy_equals_uncached_through_the_history_window(future_frames, dtype, tol):
    model = twin(tiny(), future_frames=future_frames, distillation="shortcut", distilled_steps=(1, 2)).to(dtype)
    torch.nn.init.normal_(model.step_embed.linear_2.weight, std=0.02)
    cached = wam_fast.WAMPolicy(model, steps=2, cache=True, seed=0)
    uncached = wam_fast.WAMPolicy(model, steps=2, cache=False, seed=0)
    text, frames = episode(model, batch=2, steps=5, seed=3)
    text, frames = text.to(dtype), [f.to(dtype) for f in frames]
    cached.reset(text)
    uncached.reset(text)
    for frame in frames:  # past the 2-frame window: history frames evicted and aged
        a, b = cached.act(frame), uncached.act(frame)
        assert (a.actions - b.actions).abs().max() < tol
        if future_frames == 0:
            assert a.video is None and b.video is None
        else:
            assert a.video.shape == (2, 1, 4, 8, 8) and (a.video - b.video).abs().max() < tol


def test_sample_never_returns_video_for_an_action_only_model():
    model = tiny(future_frames=0)
    text, (image,) = episode(model, batch=3, steps=1)
    chunk = wam_fast.sample(model, text, image, steps=3, cfg_scale=2.0, return_video=True, seed=5)
    assert chunk.video is None and chunk.actions.shape == (3, 4, 7) and chunk.nfe == 6
    action_noise = torch.randn(3, 4, 7, generator=torch.Generator().manual_seed(5))
    again = wam_fast.sample(model, text, image, steps=3, cfg_scale=2.0,
                            noise=(torch.zeros(3, 0, 4, 8, 8), action_noise))
    assert again.actions.shape == (3, 4, 7)


def test_kv_cache_step_runs_only_the_action_tokens():
    model = tiny(future_frames=0)
    cache = wam_fast.TemporalKVCache(model).setup(1, 2)
    assert cache.num_keys - cache.noisy_start == model.config.action_len
    text, (image,) = episode(model, steps=1)
    cache.fill_text(text)
    cache.add_frame(image)
    video, actions = cache.denoise(torch.zeros(1, 0, 4, 8, 8), torch.randn(1, 4, 7), 500.0)
    assert video.shape == (1, 0, 4, 8, 8) and torch.isfinite(actions).all()
    full = chunk_cost(model.config, steps=4, cache=True)
    assert full["tokens"] == 16 + 4 * 4  # one frame pass, then 4 steps over the 4 action tokens
    w1 = configs.get("videovla-5b", mask="temporal")
    w1_only = chunk_cost(dataclasses.replace(w1, future_frames=0), steps=1, cache=True)
    assert w1_only["tokens"] == 256 + 6
    assert w1_only["flops"] < chunk_cost(w1, steps=1, cache=True)["flops"] / 3.5  # "a third of the cheapest chunk"


def test_graph_runner_and_compile_serve_an_action_only_student():
    model = twin(tiny(), future_frames=0, distillation="consistency", distilled_steps=(1, 2))
    eager = wam_fast.WAMPolicy(model, steps=2, seed=0)
    fast = wam_fast.WAMPolicy(model, steps=2, seed=0)
    runner = graphs.attach(fast, graphs.EagerCapture)
    text, frames = episode(model, batch=2, steps=5, seed=2)
    eager.reset(text)
    fast.reset(text)
    for frame in frames:
        a, b = eager.act(frame), fast.act(frame)
        assert torch.equal(a.actions, b.actions) and a.video is None and b.video is None
    assert runner.captures == 3 and runner.replays == 2
    compiled = wam_fast.WAMPolicy(twin(model), steps=2, seed=0)
    wam_fast.compile(compiled, CompileConfig(backend="eager"))
    compiled.reset(text)
    eager.reset(text, seed=0)
    for frame in frames[:2]:
        a, b = eager.act(frame), compiled.act(frame)
        assert (a.actions - b.actions).abs().max() < 1e-4 and b.video is None


def test_fp8_action_only_policy_stays_close_to_fp32():
    model = twin(tiny(), future_frames=0, distillation="shortcut", distilled_steps=(1,))
    torch.nn.init.normal_(model.step_embed.linear_2.weight, std=0.02)
    reference = wam_fast.WAMPolicy(model, steps=1, seed=0)
    quantized = wam_fast.WAMPolicy(twin(model), steps=1, seed=0)
    wam_fast.compile(quantized, CompileConfig(fp8=True, backend="eager", fused=False))
    assert any("FP8" in type(m).__name__ for m in quantized.model.modules())
    text, frames = episode(model, batch=2, steps=3, seed=4)
    reference.reset(text)
    quantized.reset(text)
    for frame in frames:
        a, b = reference.act(frame).actions, quantized.act(frame).actions
        assert (a - b).norm() / a.norm() < 0.1  # FP8 e4m3: a few % on a random model


def test_pipeline_refuses_to_decode_video_of_an_action_only_model():
    from wam_fast.pipeline import FixedTextEncoder, PixelsEncoder, WAMPipeline

    config = configs.get("tiny", mask="temporal", latent_channels=3, image_concat=True, future_frames=0)
    model = wam_fast.WAMTransformer(config).eval()
    encoder = PixelsEncoder((config.latent_height, config.latent_width))
    text = FixedTextEncoder({"go": torch.zeros(config.text_len, config.text_dim)})
    with pytest.raises(ValueError, match="is action-only .* predicts no video to decode"):
        WAMPipeline(model, encoder, text, steps=2, cfg_scale=1.0, decode_video=True)
    pipe = WAMPipeline(model, encoder, text, steps=2, cfg_scale=1.0)
    actions = pipe.new_session(seed=0)(torch.zeros(8, 8, 3, dtype=torch.uint8).numpy(), "go")
    assert actions.shape == (config.action_len, config.action_dim)


# ---- distillation -------------------------------------------------------------------------------------------------
def test_make_student_freezes_the_unused_video_head_and_checks_frames():
    teacher = wam_fast.WAMTransformer(demo_config()).eval()  # a full-mask teacher, 1 future frame
    student = objectives.make_student(teacher, "shortcut", (1, 2), mask="temporal", future_frames=0)
    assert student.config.action_only and student.config.name.endswith("-future0")
    frozen = {n for n, p in student.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("video_out_norm.", "video_proj.")) for n in frozen)
    with pytest.raises(ValueError, match=r"future_frames must be .* in \[0, 1\]"):
        objectives.make_student(teacher, "shortcut", mask="temporal", future_frames=2)
    with pytest.raises(ValueError, match="needs mask='temporal'"):
        objectives.make_student(teacher, "shortcut", mask="full", future_frames=0)
    with pytest.raises(ValueError, match="the student predicts 1 future frames, its teacher only 0"):
        objectives.check_teacher_student(student.config, dataclasses.replace(student.config, future_frames=1))


class SpyTeacher(torch.nn.Module):
    """A WAMTransformer that records the noisy video it is given."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.seen = model, model.config, []

    def forward(self, video, *args, **kwargs):
        self.seen.append(video.detach().clone())
        return self.model(video, *args, **kwargs)


@pytest.mark.parametrize("method", ["shortcut", "consistency"])
def test_the_teacher_sees_the_data_frames_the_student_leaves_out(method):
    config = dataclasses.replace(demo_config(), latent_frames=3)
    torch.manual_seed(0)
    spy = SpyTeacher(wam_fast.WAMTransformer(config).eval())
    student = objectives.make_student(spy.model, method, (1, 2), mask="temporal", future_frames=1)
    objective = objectives.objective_for(method, spy, student.config, cfg_scale=1.0)
    task = synthetic_task(config, 0)
    batch, _ = task.samples(8)
    draws = objective.draw(8, torch.Generator().manual_seed(0))
    assert draws["noise"].shape == (8, 1 * 4 * 4 * 4 + 4 * 2) and draws["noise_later"].shape == (8, 1, 4, 4, 4)
    loss, metrics = objective.loss(student, student, batch, draws)
    assert torch.isfinite(loss) and metrics["loss_video"] > 0
    seen = spy.seen[0]  # the teacher's first call: frame 0, the student's frame 1, the data's frame 2
    alpha, sigma = objectives.alpha_sigma(objective.schedule, draws["t"])
    expected0 = alpha.view(-1, 1, 1, 1) * batch["image"][:, 0] + sigma.view(-1, 1, 1, 1) * draws["noise0"][:, 0]
    expected2 = alpha.view(-1, 1, 1, 1) * batch["future"][:, 1] + sigma.view(-1, 1, 1, 1) * draws["noise_later"][:, 0]
    assert seen.shape == (8, 3, 4, 4, 4)
    assert torch.allclose(seen[:, 0], expected0, atol=1e-6) and torch.allclose(seen[:, 2], expected2, atol=1e-6)


def test_action_only_loss_has_no_video_term_and_trains_the_backbone():
    teacher = wam_fast.WAMTransformer(demo_config()).eval()
    student = objectives.make_student(teacher, "consistency", (1, 2), mask="temporal", future_frames=0)
    objective = objectives.objective_for("consistency", teacher, student.config, cfg_scale=1.0, solver_steps=5)
    batch, _ = synthetic_task(teacher.config, 0).samples(8)
    loss, metrics = objective.loss(student, student, batch, objective.draw(8, torch.Generator().manual_seed(1)))
    assert metrics["loss_video"] == 0 and loss.item() == pytest.approx(metrics["loss_actions"].item())
    loss.backward()
    assert student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0 and student.video_proj.weight.grad is None


def test_distill_cli_future_frames_and_its_errors(tmp_path, capsys):
    teacher = wam_fast.WAMTransformer(demo_config()).eval()
    teacher.save_pretrained(tmp_path / "teacher")
    make_synthetic_dataset(tmp_path / "data", teacher.config, 48, seed=0)
    argv = ["--teacher", str(tmp_path / "teacher"), "--data", str(tmp_path / "data"), "--steps", "1,2",
            "--train-steps", "2", "--batch-size", "4", "--eval-conditions", "4", "--eval-seeds", "2",
            "--teacher-steps", "2", "--cfg-scale", "1", "--no-progress"]
    assert distill_main(argv + ["--out", str(tmp_path / "run"), "--future-frames", "0"]) == 0
    out = capsys.readouterr().out
    assert "action-only: no video" in out and "teacher reference" in out
    student = wam_fast.load_pretrained(tmp_path / "run" / "final")
    assert student.config.future_frames == 0 and student.config.action_only
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["run"]["future_frames"] == 0
    for row in report["report"]["results"]:
        assert row["student_video_error"] is None and row["student_action_error"] > 0
        assert row["teacher_video_error"] is not None  # the teacher-k rows still predict video
    for extra, message in ((["--future-frames", "2"], r"future_frames must be .* in \[0, 1\]"),
                           (["--mask", "full", "--future-frames", "0"], "--future-frames 0 needs --mask temporal")):
        assert distill_main(argv + ["--out", str(tmp_path / "bad")] + extra) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_evaluate_table_shows_no_video_numbers_for_an_action_only_student():
    teacher = wam_fast.WAMTransformer(demo_config()).eval()
    student = objectives.make_student(teacher, "shortcut", (1,), mask="temporal", future_frames=0)
    tensors, _ = synthetic_task(teacher.config, 0).samples(6)
    report = evaluate(teacher, student, tensors, seeds=2, teacher_steps=2, cfg_scale=1.0)
    row = report.result(1)
    assert row.student_video_error != row.student_video_error  # nan: no video to compare
    assert row.teacher_video_error > 0 and row.student_action_data_error > 0
    assert row.student_video_data_error != row.student_video_data_error
    assert "    -" in format_table(report)


# ---- the frame control (issue #26, point 4) -------------------------------------------------------------------
def scene_share(model, task, tensors, shuffle: bool, steps: int) -> float:
    """The share of sampled chunks in a mode the TRUE frame's scene allows; ``shuffle``: the model is given
    another row's frame (a control that tells a model reading the frame from one that ignores it)."""
    image = tensors["image"]
    if shuffle:
        image = image[torch.randperm(len(image), generator=torch.Generator().manual_seed(1))]
    chunk = wam_fast.sample(model, tensors["text"], image, steps=steps, cfg_scale=1.0, seed=0)
    distance = task.classify(tensors["text"], tensors["image"], chunk.actions)[3]
    return (distance < task.IN_MODE).float().mean().item()


class FrameBlind(torch.nn.Module):
    """A model that never sees the observation (zeros in its place): what an action-only student that
    ignores the frame would be."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, video, text, actions, timestep, image=None, **kwargs):
        return self.model(video, text, actions, timestep, image=torch.zeros_like(image), **kwargs)


def test_action_only_student_reads_the_frame_shuffled_frame_control(tmp_path):
    """A teacher trained on the synthetic task (the scene, visible only in the frame, decides which modes
    the actions may take), then an action-only shortcut student distilled from it: with the true frames
    its one-step chunks land in the scene's modes far more often than with shuffled frames. A student that
    ignored the frame would score the same on both (checked with a frame-blind wrapper of the same student)."""
    config = dataclasses.replace(demo_config(), mask="full")
    make_synthetic_dataset(tmp_path / "data", config, 1024, seed=0)
    dataset = wam_fast.distill.data.LatentDataset(tmp_path / "data")
    settings = trainer.TrainConfig(steps=300, batch_size=64, lr=2e-3, ema_decay=0.9, precision="fp32", seed=0,
                                   checkpoint_every=10_000, progress=False, tensorboard=False, log_every=100)
    torch.manual_seed(0)
    result = trainer.train(wam_fast.WAMTransformer(config), objectives.DiffusionObjective(config, cond_dropout=0.0),
                           dataset, settings, tmp_path / "teacher")
    teacher = wam_fast.load_pretrained(result.final).eval()
    student = objectives.make_student(teacher, "shortcut", (1, 2), mask="temporal", future_frames=0)
    objective = objectives.objective_for("shortcut", teacher, student.config, cfg_scale=1.0)
    distill_settings = dataclasses.replace(settings, steps=150, lr=1e-3, ema_decay=0.5)
    result = trainer.train(student, objective, dataset, distill_settings, tmp_path / "student")
    student = wam_fast.load_pretrained(result.final).eval()
    task = synthetic_task(config, 0)
    tensors, _ = task.samples(512, start=4096)  # rows the training never saw
    true, shuffled = scene_share(student, task, tensors, False, 1), scene_share(student, task, tensors, True, 1)
    print(f"action-only 1-step: in the scene's modes {true:.2f} with the true frames, {shuffled:.2f} shuffled")
    assert true >= 0.55 and true - shuffled >= 0.2
    blind = FrameBlind(student)
    assert abs(scene_share(blind, task, tensors, False, 1) - scene_share(blind, task, tensors, True, 1)) < 0.05
