"""Meta-World fidelity harness (wam_fast.eval): rendering, demonstrations, closed-loop episodes, results.

The full experiment (python -m wam_fast.eval) takes about an hour of CPU; here it runs in its smoke
version (2 episodes, a few training steps), which exercises every stage and the result files.
"""
import dataclasses
import importlib.util
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import metaworld_smoke

import wam_fast
from wam_fast.eval import fidelity, realtime_eval, stages
from wam_fast.eval import metaworld as mw
from wam_fast.eval.results import RESULTS_DIR, markdown_table, plot, targets
from wam_fast.eval.rollout import make_policy, run_episodes, wilson_interval
from wam_fast.eval.settings import MODELS, STUDENTS, TASK_SETTINGS, Settings, model_config
from wam_fast.realtime import MODES

needs_metaworld = pytest.mark.skipif(importlib.util.find_spec("metaworld") is None,
                                     reason='Meta-World is not installed: pip install "wam_fast[sim]"')


@pytest.fixture(scope="module", autouse=True)
def _cpu_run_as_users_run_it():
    # CI sets TRITON_INTERPRET=1 for the kernel tests; under it the FP8 rows would run interpreted Triton
    # (seconds a chunk, minutes of CI). The harness runs as `python -m wam_fast.eval` does on a CPU:
    # FP8 on its torch backend. The kernels themselves are tested in test_fp8_linear.py.
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TRITON_INTERPRET", raising=False)
        yield


@pytest.fixture(autouse=True)
def _quiet_experts():
    with warnings.catch_warnings():  # the scripted experts warn about their own gains
        warnings.simplefilter("ignore", UserWarning)
        yield


# ---- pure parts (no simulator) -------------------------------------------------------------------
def test_missing_metaworld_names_the_install_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(mw.importlib.util, "find_spec", lambda name: None if name == "metaworld" else real(name))
    with pytest.raises(ImportError, match=r'metaworld.*pip install "wam_fast\[sim\]"'):
        mw.MetaWorldEnv("push-v3")
    assert fidelity.main(["--task", "push-v3", "--smoke"]) == 2


@pytest.mark.parametrize("wins, trials, expected", [
    (0, 50, (0.0, 0.0713)), (50, 50, (0.9287, 1.0)), (25, 50, (0.3664, 0.6336)), (45, 50, (0.7864, 0.9565)),
    (1, 2, (0.0945, 0.9055))])
def test_wilson_interval_known_values(wins, trials, expected):
    lo, hi = wilson_interval(wins, trials)
    assert (lo, hi) == pytest.approx(expected, abs=1e-4)
    assert lo <= wins / trials <= hi


def test_wilson_interval_rejects_bad_counts():
    for wins, trials in ((3, 2), (-1, 5), (0, 0)):
        with pytest.raises(ValueError, match="successes <= trials"):
            wilson_interval(wins, trials)


def test_instruction_embedding_is_fixed_per_task():
    a = mw.instruction_embedding("push-v3", 4, 32)
    assert a.shape == (4, 32) and torch.equal(a, mw.instruction_embedding("push-v3", 4, 32))
    assert not torch.allclose(a, mw.instruction_embedding("drawer-open-v3", 4, 32))


def test_pixel_latent_round_trip_and_range():
    image = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    latent = mw.image_to_latent(image)
    assert latent.shape == (2, 3, 64, 64) and latent.min() >= -1 and latent.max() <= 1
    assert np.array_equal(mw.latent_to_image(latent), image)
    assert np.array_equal(mw.latent_to_image(latent.half()), image)  # the dataset stores float16
    with pytest.raises(ValueError, match="uint8 RGB"):
        mw.image_to_latent(image.astype(np.float32))


def test_episode_samples_align_images_futures_and_chunks():
    steps, chunk = 11, 4
    images = np.zeros((steps + 1, 64, 64, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(steps + 1)  # frame index written into a pixel
    actions = np.arange(steps * 4, dtype=np.float32).reshape(steps, 4) / 100
    rows = mw.episode_samples(mw.Episode(images, actions, success_step=steps - chunk), chunk)
    assert rows["actions"].shape == (steps - chunk + 1, chunk, 4)
    for t in range(steps - chunk + 1):
        assert mw.latent_to_image(rows["image"][t, 0])[0, 0, 0] == t
        assert mw.latent_to_image(rows["future"][t, 0])[0, 0, 0] == t + chunk
        assert torch.equal(rows["actions"][t], torch.from_numpy(actions[t:t + chunk]))


def _results(teacher: float, **students: float) -> dict:
    models = [{"name": "teacher", "steps": 10, "success": teacher, "ci95": [0, 1], "episodes": 50, "latency_ms": 9.0}]
    for name, success in students.items():
        models.append({"name": name.replace("_", "-"), "steps": int(name.split("_")[1][0]), "success": success,
                       "ci95": [0, 1], "episodes": 50, "latency_ms": 1.0})
    return {"task": "push-v3", "episodes": 50, "models": models, "environment": {}}


def test_targets_compare_each_student_with_the_teacher():
    out = targets(_results(0.8, shortcut_1step=0.74, shortcut_2step=0.74, consistency_4step=0.8))
    assert out["teacher_learned"] is True
    assert out["shortcut-1step"] == {"kept_of_teacher": pytest.approx(0.925), "target": 0.9, "met": True}
    assert out["shortcut-2step"]["met"] is False  # 92.5% < 95%
    assert out["consistency-4step"]["met"] is True
    assert targets(_results(0.5))["teacher_learned"] is False


def test_markdown_table_lists_every_row_against_the_teacher():
    table = markdown_table(_results(0.8, shortcut_1step=0.6)).splitlines()
    assert len(table) == 4 and table[0].startswith("| push-v3 |")
    assert "| shortcut-1step | 1 | 60% " in table[3] and "| 75% |" in table[3]


def test_task_settings_apply_to_the_full_and_the_smoke_run(monkeypatch):
    push = Settings.for_task("push-v3")  # see TASK_SETTINGS
    assert push.noise_levels == (0.0, 0.03, 0.06, 0.1) and push.patch_size == 2
    assert Settings.for_task("drawer-open-v3") == Settings(task="drawer-open-v3")
    monkeypatch.setitem(TASK_SETTINGS, "reach-v3", {"camera": "corner4", "patch_size": 8, "teacher_steps": 9})
    smoke = Settings.smoke("reach-v3")  # the task's camera and model, at the CI's sizes
    assert (smoke.camera, smoke.patch_size) == ("corner4", 8)
    assert (smoke.episodes, smoke.teacher_steps, smoke.noise_levels) == (2, 3, (0.0,))
    assert (smoke.shortcut_distill_steps, smoke.consistency_distill_steps) == (2, 2)
    assert smoke.teacher_pretrain_steps == 0  # a stage the task does not have stays off in its smoke run
    assert push.teacher_pretrain_steps > 0 and Settings.smoke("push-v3").teacher_pretrain_steps == 2
    assert push.latent_space == "autoencoder" and Settings.smoke("push-v3").autoencoder_steps == 2


def test_each_method_distils_for_its_own_number_of_steps():
    settings = dataclasses.replace(Settings(task="push-v3"), shortcut_distill_steps=300,
                                   consistency_distill_steps=150)
    for method, steps, ema, every in (("shortcut", "300", "0.99", "200"), ("consistency", "150", "0.5", "150")):
        command = stages.distill_command(settings, Path("t"), Path("d"), Path("o"), method)
        value = {name: command[command.index(name) + 1] for name in ("--method", "--train-steps", "--ema-decay",
                                                                        "--checkpoint-every")}
        assert value == {"--method": method, "--train-steps": steps, "--ema-decay": ema, "--checkpoint-every": every}
    with pytest.raises(ValueError, match=r"unknown distillation method 'progressive'; expected one of"):
        settings.distill_steps("progressive")


def test_model_config_follows_the_latent_space():
    pixels = model_config(Settings(task="drawer-open-v3"))
    assert (pixels.latent_channels, pixels.latent_height, pixels.patch_size) == (3, 64, 16)
    latents = model_config(Settings(task="push-v3", latent_space="autoencoder", patch_size=2))
    assert (latents.latent_channels, latents.latent_height, latents.latent_width) == (16, 8, 8)
    assert latents.tokens_per_frame == pixels.tokens_per_frame == 16
    with pytest.raises(ValueError, match=r"latent_space must be one of \('pixels', 'autoencoder'\), got 'vae'"):
        model_config(Settings(task="push-v3", latent_space="vae"))


@pytest.mark.parametrize("task", fidelity.RECORDED_TASKS)
def test_recorded_results_match_what_the_command_runs(task):
    # `python -m wam_fast.eval --task T` reproduces (and resumes) benchmarks/results/metaworld-T.json only
    # while its settings are the recorded ones.
    results_dir = Path(__file__).resolve().parents[1] / RESULTS_DIR
    recorded = json.loads((results_dir / f"metaworld-{task}.json").read_text())
    assert recorded["settings"] == fidelity.jsonable(dataclasses.asdict(Settings.for_task(task)))
    assert [m["name"] for m in recorded["models"]] == [row.name for row in MODELS]
    assert recorded["multimodal"] == Settings.for_task(task).multimodal
    for m in recorded["models"]:  # every row has its video pass (#27), None only where no frame is predicted
        assert m["video_rounds"] == recorded["settings"]["video_rounds"]
        assert (m["video_psnr"] is None) == (m.get("future_frames") == 0), m["name"]  # rows before #26 lack it
        assert ("routes" in m) == recorded["multimodal"], m["name"]


def test_chart_is_a_png(tmp_path):
    path = plot(_results(0.8, shortcut_1step=0.7), tmp_path / "chart.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- with the simulator --------------------------------------------------------------------------
@needs_metaworld
@pytest.mark.parametrize("camera, background", [
    # Upright, these corners are the black background above the table (skybox off); MuJoCo's raw
    # corner-camera image has the table or the arm there, and so has a flip of one axis only.
    ("corner", (slice(0, 12), slice(0, 20))),  # the default: the arm is on the right
    ("corner4", (slice(0, 8), slice(-20, None))),  # the closer view: the arm is on the left
])
def test_images_are_upright_64x64(camera, background):
    env = mw.MetaWorldEnv("push-v3", "heldout", camera=camera)
    try:
        image = env.reset(0)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        corner = lambda im: im[background].astype(float)  # noqa: E731
        assert corner(image).max() == 0
        for wrong in (image[::-1, ::-1], image[::-1], image[:, ::-1]):
            assert corner(wrong).std() > 10
        layout3 = env.reset(3)
        assert not np.array_equal(layout3, image)  # held-out layouts differ (object and goal positions)
    finally:
        env.close()


@needs_metaworld
def test_any_mt1_task_and_clear_errors():
    env = mw.MetaWorldEnv("reach-v3", "train")
    try:
        assert env.num_layouts == 50 and env.reset(49).shape == (64, 64, 3)
        with pytest.raises(ValueError, match=r"layout must be in \[0, 50\)"):
            env.reset(50)
    finally:
        env.close()
    assert type(mw.expert_policy("drawer-open-v3")).__name__ == "SawyerDrawerOpenV3Policy"
    with pytest.raises(ValueError, match="unknown Meta-World task 'push-v9'.*push-v3"):
        mw.check_task("push-v9")
    with pytest.raises(ValueError, match="split must be one of"):
        mw.MetaWorldEnv("push-v3", "test")


@needs_metaworld
def test_train_and_heldout_layouts_differ():
    train, heldout = mw.MetaWorldEnv("push-v3", "train"), mw.MetaWorldEnv("push-v3", "heldout")
    try:
        assert not np.array_equal(train.reset(0), heldout.reset(0))
    finally:
        train.close()
        heldout.close()


@needs_metaworld
def test_an_episode_starts_the_same_whatever_ran_before():
    fresh, used, raw = (mw.MetaWorldEnv("push-v3", "heldout") for _ in range(3))
    expert = mw.expert_policy("push-v3")

    def episode(env, layout, steps):
        images, observations = [env.reset(layout)], []
        for t in range(steps):
            images.append(env.step(env.expert_action(expert) + 0.3 * np.sin(t), render=t % 10 == 0)[0])
            observations.append(env.obs)
        return [image for image in images if image is not None], np.stack(observations)

    try:
        episode(used, 7, 150)  # an episode that pushes the puck about, then the layout of the fresh env
        (used_images, used_obs), (fresh_images, fresh_obs) = episode(used, 3, 60), episode(fresh, 3, 60)
        assert np.array_equal(used_images[0], fresh_images[0])  # before: 2 pixels off by up to 12 levels
        assert all(np.array_equal(a, b) for a, b in zip(used_images, fresh_images))
        assert np.array_equal(used_obs, fresh_obs)
        def meta_world_reset(layout):
            raw.env.set_task(raw.layouts[layout])
            raw.obs, _ = raw.env.reset()
            raw.steps = 0
            return raw.render()

        raw.reset = meta_world_reset
        assert np.array_equal(episode(raw, 3, 60)[1], fresh_obs)  # Meta-World's own physics, to the last bit
    finally:
        for env in (fresh, used, raw):
            env.close()


class ExpertChunks:
    """A policy that answers each chunk with the scripted expert's action for every env (repeated)."""

    def __init__(self, envs, task, zero=False):
        self.envs, self.expert, self.zero = envs, mw.expert_policy(task), zero

    def reset(self, text):
        assert text.shape[0] == len(self.envs)

    def act(self, images):
        assert images.shape == (len(self.envs), 64, 64, 3) and images.dtype == np.uint8
        actions = np.stack([np.zeros(4, np.float32) if self.zero else env.expert_action(self.expert)
                            for env in self.envs])
        return SimpleNamespace(actions=torch.from_numpy(actions)[:, None].repeat(1, 8, 1))


@needs_metaworld
def test_closed_loop_episodes_detect_success():
    envs = [mw.MetaWorldEnv("push-v3", "heldout") for _ in range(2)]
    text = mw.instruction_embedding("push-v3", 4, 32)
    try:
        expert = run_episodes(ExpertChunks(envs, "push-v3"), "push-v3", 2, horizon=150, execute=1,
                              text=text, envs=envs)
        assert expert.success == [True, True] and all(20 < s < 150 for s in expert.success_step)
        idle = run_episodes(ExpertChunks(envs, "push-v3", zero=True), "push-v3", 2, horizon=30,
                            execute=4, text=text, envs=envs)
        assert idle.success == [False, False] and idle.chunks == 30 // 4 + 1  # replans every 4 steps
    finally:
        for env in envs:
            env.close()


@needs_metaworld
def test_demos_dataset_holds_the_expert_episode(tmp_path):
    from wam_fast.distill.data import LatentDataset

    meta = mw.collect_demos("push-v3", tmp_path / "demos", chunk=4, text_len=4, text_dim=32, noise_levels=(0.0,),
                            layouts=1, progress=lambda line: None)
    data = LatentDataset(tmp_path / "demos")
    steps = meta["metaworld"]["mean_success_step"]
    assert len(data) == steps + 1  # the episode runs one chunk past success; one sample per full chunk
    rows = data.get(torch.arange(len(data)))
    assert rows["image"].shape == (len(data), 1, 3, 64, 64) and rows["future"].shape == rows["image"].shape
    assert torch.equal(rows["text"][0], mw.instruction_embedding("push-v3", 4, 32))
    env = mw.MetaWorldEnv("push-v3", "train")
    try:
        first = env.reset(0)
    finally:
        env.close()
    assert np.array_equal(mw.latent_to_image(rows["image"][0, 0]), first)
    assert torch.equal(rows["future"][0], rows["image"][4])  # the frame after the chunk
    assert torch.equal(rows["actions"][1, :3], rows["actions"][0, 1:])  # chunks overlap along the episode
    assert rows["actions"].abs().max() <= 1


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    return metaworld_smoke.smoke_run(tmp_path_factory, "push-v3")


@needs_metaworld
def test_smoke_run_writes_the_results_schema(smoke_run):
    results = json.loads(smoke_run.json.read_text())
    assert results["task"] == "push-v3" and results["episodes"] == 2
    names = [m["name"] for m in results["models"]]
    assert names == [row.name for row in MODELS] and names[0] == "teacher"
    for m in results["models"]:
        assert {"name", "steps", "success", "ci95", "episodes", "latency_ms"} <= set(m)
        assert m["episodes"] == 2 and m["success"] in (0.0, 0.5, 1.0)
        assert m["ci95"][0] <= m["success"] <= m["ci95"][1] and m["latency_ms"] > 0
        assert len(m["latency_ms_raw"]) == 5 and m["latency_ms"] == pytest.approx(np.median(m["latency_ms_raw"]))
    rows = {m["name"]: m for m in results["models"]}
    assert rows["teacher"]["steps"] == 10 and rows["teacher"]["mask"] == "full" and not rows["teacher"]["cache"]
    assert rows["shortcut-1step"]["mask"] == "temporal" and rows["shortcut-1step"]["cache"]
    assert rows["consistency-2step"]["sampler"] == "consistency"
    assert rows["shortcut-4step-fp8"]["precision"] == "fp8"
    # the action-only students (#26): no future frame denoised, cached, one FP8 row
    assert rows["shortcut-1step"]["future_frames"] == 1 and rows["teacher"]["future_frames"] is None
    for name in ("action-only-shortcut-1step", "action-only-consistency-4step", "action-only-shortcut-1step-fp8"):
        assert rows[name]["future_frames"] == 0 and rows[name]["mask"] == "temporal" and rows[name]["cache"], name
    assert rows["action-only-shortcut-1step-fp8"]["precision"] == "fp8"
    assert results["environment"]["metaworld"] and "targets" in results
    assert results["demos"]["episodes"] == 2 and results["demos"]["samples"] > 0
    assert results["training"]["teacher_pretrain"]["step"] == 2  # push-v3's regression stage (TASK_SETTINGS)
    assert results["training"]["autoencoder"]["step"] == 2  # and its latent space (TASK_SETTINGS)
    assert Path(results["autoencoder"]) == smoke_run.root / "work" / "push-v3" / "autoencoder" / "frozen"
    for source in STUDENTS:
        command = results["training"][source]["command"]
        assert command.startswith("python -m wam_fast.distill --teacher")
        assert command.endswith("--future-frames 0") == source.startswith("action-only-"), command
    assert smoke_run.json.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


@needs_metaworld
def test_teacher_starts_from_its_regression_pretraining(smoke_run, tmp_path, monkeypatch):
    import wam_fast
    from wam_fast.distill import objectives

    demos = smoke_run.root / "work" / "push-v3" / "latents"
    # 1 teacher step at a negligible lr: the teacher must then hold the pretrained weights, not a fresh init
    settings = dataclasses.replace(Settings.smoke("push-v3"), teacher_pretrain_steps=2, teacher_steps=1,
                                   teacher_lr=1e-12, teacher_random_shift=2)
    made = []
    real_objective = objectives.DiffusionObjective
    monkeypatch.setattr(objectives, "DiffusionObjective", lambda *a, **k: made.append(real_objective(*a, **k)) or made[-1])
    final = stages.train_teacher(settings, demos, tmp_path / "teacher", progress=False)
    assert [(o.timestep, o.video_weight, o.random_shift) for o in made] == [(999, 0.0, 2), (None, 1.0, 2)]
    teacher = wam_fast.load_pretrained(final).state_dict()
    pretrained = wam_fast.load_pretrained(tmp_path / "teacher" / "pretrain" / "final").state_dict()
    torch.manual_seed(settings.seed)
    fresh = wam_fast.WAMTransformer(model_config(settings)).state_dict()
    assert max((teacher[k].float() - pretrained[k].float()).abs().max().item() for k in teacher) < 1e-6
    assert max((teacher[k].float() - fresh[k].float()).abs().max().item() for k in teacher) > 1e-4
    metrics = [json.loads(line) for line in (tmp_path / "teacher" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["loss"] == pytest.approx(m["loss_actions"]) for m in metrics)  # the action loss only
    assert stages.train_teacher(settings, demos, tmp_path / "teacher", progress=False) == final  # resumes


@needs_metaworld
def test_smoke_students_come_from_the_distill_cli(smoke_run):
    import wam_fast

    for source, (method, future_frames) in STUDENTS.items():
        directory = smoke_run.root / "work" / "push-v3" / f"student-{source}"
        run = json.loads((directory / "run.json").read_text())
        assert run["method"] == method and run["mask"] == "temporal" and list(run["steps"]) == [1, 2, 4]
        assert run.get("future_frames") == future_frames
        assert wam_fast.load_pretrained(directory / "final").config.action_only == (future_frames == 0)
        assert (directory / "eval.json").is_file()


@needs_metaworld
def test_a_student_is_distilled_again_when_its_command_or_teacher_changes(smoke_run, tmp_path, monkeypatch):
    import shutil

    work = smoke_run.root / "work" / "push-v3"
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    shutil.copytree(work / "teacher" / "final", teacher)
    settings = Settings.smoke("push-v3")
    calls = []
    monkeypatch.setattr(stages.subprocess, "run", lambda command, **kw: calls.append(command) or SimpleNamespace(returncode=0))
    stages.distill_student(settings, teacher, work / "latents", student, "shortcut")
    stages.distill_student(settings, teacher, work / "latents", student, "shortcut")
    assert len(calls) == 1  # the same command and teacher: reused
    longer = dataclasses.replace(settings, shortcut_distill_steps=5)
    stages.distill_student(longer, teacher, work / "latents", student, "shortcut")
    assert len(calls) == 2 and calls[1][calls[1].index("--train-steps") + 1] == "5"  # the CLI resumes or refuses
    shutil.copy(work / "student-shortcut" / "final" / "model.safetensors", teacher / "model.safetensors")
    with pytest.raises(ValueError, match=r"student of another teacher \(the weights in .* changed"):
        stages.distill_student(settings, teacher, work / "latents", student, "shortcut")
    assert len(calls) == 2


@needs_metaworld
def test_rows_build_the_policies_they_name(smoke_run):
    from wam_fast.quant import fp8_layers

    work = smoke_run.root / "work" / "push-v3"
    checkpoints = {"teacher": work / "teacher" / "final", "shortcut": work / "student-shortcut" / "final",
                   "consistency": work / "student-consistency" / "final", "autoencoder": work / "autoencoder" / "frozen"}
    rows = {row.name: row for row in MODELS}
    teacher = make_policy(rows["teacher"], checkpoints, 0, "push-v3")
    assert teacher.cache is None and teacher.steps == 10 and teacher.cfg_scale == 1.0
    # one path from pixels to actions: a WAMPipeline whose frame encoder is push-v3's autoencoder
    assert teacher.pipeline.frame_encoder.name == "metaworld-autoencoder"
    teacher.reset(mw.instruction_embedding("push-v3", 4, 32)[None])
    assert teacher.act(np.zeros((1, 64, 64, 3), np.uint8)).actions.shape == (1, 8, 4)
    with pytest.raises(ValueError, match="instruction embedding"):
        teacher.reset(torch.zeros(1, 4, 32))
    fp32 = make_policy(rows["shortcut-2step"], checkpoints, 0, "push-v3")
    fp8 = make_policy(rows["shortcut-2step-fp8"], checkpoints, 0, "push-v3")
    assert fp32.cache is not None and fp32.steps == 2 and not fp8_layers(fp32.model)
    assert fp8.cache is not None and len(fp8_layers(fp8.model)) > 0
    assert fp8.model is not fp32.model  # FP8 quantizes a model of its own


@needs_metaworld
def test_smoke_rerun_resumes_without_recomputing(smoke_run, monkeypatch):
    before = json.loads(smoke_run.json.read_text())
    calls = []
    monkeypatch.setattr(fidelity, "evaluate_row", lambda *a, **k: calls.append(a) or pytest.fail("re-evaluated"))
    real_run = stages.subprocess.run

    def run(command, *args, **kwargs):
        if "wam_fast.distill" in command:
            pytest.fail("re-distilled")
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(stages.subprocess, "run", run)
    threads = torch.get_num_threads()
    try:
        assert fidelity.main(smoke_run.argv) == 0
    finally:
        torch.set_num_threads(threads)
    assert json.loads(smoke_run.json.read_text())["models"] == before["models"] and not calls


@needs_metaworld
def test_retime_replaces_only_the_timings(smoke_run):
    before = json.loads(smoke_run.json.read_text())
    threads = torch.get_num_threads()
    try:
        assert fidelity.main(smoke_run.argv + ["--retime"]) == 0
    finally:
        torch.set_num_threads(threads)
    after = json.loads(smoke_run.json.read_text())
    assert after["retimed"] and after["environment"]["commit"]
    for old, new in zip(before["models"], after["models"]):
        assert {k: v for k, v in old.items() if not k.startswith("latency")} == \
            {k: v for k, v in new.items() if not k.startswith("latency")}
        assert len(new["latency_ms_raw"]) == 5 and new["latency_ms"] == pytest.approx(np.median(new["latency_ms_raw"]))
    try:  # a resumed run keeps the re-timed rows and the environment they were timed in
        assert fidelity.main(smoke_run.argv) == 0
    finally:
        torch.set_num_threads(threads)
    resumed = json.loads(smoke_run.json.read_text())
    assert resumed["retimed"] and resumed["environment"] == after["environment"]
    assert resumed["models"] == after["models"]


@needs_metaworld
def test_unknown_model_row_is_refused(tmp_path, capsys):
    assert fidelity.main(["--task", "push-v3", "--smoke", "--models", "teacher,student-9step",
                          "--out", str(tmp_path), "--results", str(tmp_path)]) == 2
    assert "unknown model rows ['student-9step']" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was written


# ---- diagnosis (python -m wam_fast.eval.diagnose) ------------------------------------------------
def test_conv_baseline_learns_where_a_small_object_is(tmp_path):
    """The property the baseline diagnoses: a 3x3-pixel object's position read from a 64x64 frame."""
    from wam_fast.distill.data import write_dataset
    from wam_fast.eval import diagnose

    generator = torch.Generator().manual_seed(0)
    n, chunk = 256, 2
    where = torch.randint(4, 60, (n, 2), generator=generator)
    images = torch.full((n, 1, 3, 64, 64), -0.5)
    for i, (y, x) in enumerate(where.tolist()):
        images[i, 0, 0, y - 1:y + 2, x - 1:x + 2] = 1.0  # a red dot, as small as push-v3's puck
    target = (where.float() - 32) / 28  # actions in [-1, 1]: the dot's position
    actions = torch.cat([target, -target], 1)[:, None].repeat(1, chunk, 1)
    write_dataset(tmp_path / "dots", {"text": torch.zeros(n, 1, 4), "image": images, "future": images,
                                      "actions": actions})
    net, loss = diagnose.train_conv_bc(tmp_path / "dots", steps=300, batch=32, log=lambda line: None)
    with torch.no_grad():
        predicted = net(images[:64, 0])
    assert predicted.shape == (64, chunk, 4)
    assert ((predicted - actions[:64]) ** 2).mean() < 0.1 * actions.var()  # far below the mean action's error
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\).*got \(2, 3, 32, 32\)"):
        net(torch.zeros(2, 3, 32, 32))


@needs_metaworld
def test_first_action_spread_tells_a_reading_policy_from_a_constant_one():
    from wam_fast.eval import diagnose

    constant = diagnose.first_action_spread(lambda images: np.zeros(4), "push-v3", layouts=6)
    assert constant["layouts"] == 6 and constant["spread_xy"] == [0.0, 0.0]
    assert constant["correlation_xy"] == [None, None] and min(constant["expert_spread_xy"]) > 0.05

    first = []

    def reads_the_image(images):  # how far this layout's first frame (uint8) is from the first layout's
        first.append(images) if not first else None
        change = float(np.abs(images.astype(np.float32) - first[0].astype(np.float32)).mean()) / 127.5 * 100
        return np.array([change, -change, 0.0, 0.0])

    reading = diagnose.first_action_spread(reads_the_image, "push-v3", layouts=6)
    assert min(reading["spread_xy"]) > 1e-3 and reading["correlation_xy"][0] is not None


@needs_metaworld
def test_diagnose_command_reports_teacher_and_both_baselines(smoke_run, tmp_path, capsys):
    from wam_fast.eval import diagnose

    work = smoke_run.root / "work" / "push-v3"
    out = tmp_path / "diagnosis.json"
    threads = torch.get_num_threads()
    try:
        assert diagnose.main(["--task", "push-v3", "--demos", str(work / "demos"), "--checkpoint",
                              str(work / "teacher" / "final"), "--autoencoder", str(work / "autoencoder" / "frozen"),
                              "--conv-bc-steps", "2", "--wam-regression-steps", "2",
                              "--episodes", "1", "--layouts", "3", "--out", str(out)]) == 0
        assert diagnose.main(["--task", "push-v3", "--checkpoint", str(work / "teacher" / "final")]) == 2
    finally:
        torch.set_num_threads(threads)
    assert "autoencoder latents, not pixels: pass its autoencoder (--autoencoder" in capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["camera"] == Settings.for_task("push-v3").camera and report["environment"]["torch"]
    assert report["command"].startswith("python -m wam_fast.eval.diagnose --task push-v3 --demos ")
    teacher = report["teachers"][str(work / "teacher" / "final")]
    assert set(teacher) == {"1step", "10step"} and teacher["1step"]["layouts"] == 3
    bc = report["conv_bc"]
    assert bc["steps"] == 2 and bc["episodes"] == 1 and bc["successes"] in (0, 1)
    assert bc["ci95"][0] <= bc["success"] <= bc["ci95"][1] and bc["first_action"]["layouts"] == 3
    regression = report["wam_regression"]
    assert regression["steps"] == 2 and regression["first_action"]["layouts"] == 3
    assert regression["mean_action_loss"] > 0 and np.isfinite(regression["final_loss"])
    with pytest.raises(SystemExit):
        diagnose.main(["--task", "push-v3"])  # nothing to measure
    assert "nothing to measure" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        diagnose.main(["--task", "push-v3", "--demos", str(work / "demos"), "--layouts", "1"])
    assert "--layouts must be >= 2, got 1" in capsys.readouterr().err


@needs_metaworld
def test_longer_distillation_tool_resumes_a_recorded_student(smoke_run, tmp_path):
    """benchmarks/metaworld_longer_distill.py on the smoke run: the recorded student copied and resumed to more
    steps (the recorded one untouched), its rows evaluated, the run's teacher row beside them."""
    import importlib.util as iu
    import wam_fast

    spec = iu.spec_from_file_location("longer", Path(__file__).resolve().parents[1] / "benchmarks" /
                                      "metaworld_longer_distill.py")
    tool = iu.module_from_spec(spec)
    spec.loader.exec_module(tool)
    work = smoke_run.root / "work"
    recorded = work / "push-v3" / "student-action-only-shortcut" / "final"
    before = (recorded / "model.safetensors").read_bytes()
    threads = torch.get_num_threads()
    try:
        result = tool.main(["--task", "push-v3", "--out", str(work), "--student", "action-only-shortcut",
                            "--train-steps", "4", "--json", str(tmp_path / "longer.json"), "--smoke",
                            "--results", str(smoke_run.root / "results")])
    finally:
        torch.set_num_threads(threads)
    assert [m["name"] for m in result["models"]] == ["teacher"] + [f"action-only-shortcut-{k}step" for k in (1, 2, 4)]
    assert result["distill_metrics"]["step"] == 4 and result["distill_steps"] == {"recorded": 2, "here": 4}
    assert (recorded / "model.safetensors").read_bytes() == before
    longer = wam_fast.load_pretrained(work / "push-v3" / "student-action-only-shortcut-4" / "final")
    assert longer.config.action_only
    assert json.loads((tmp_path / "longer.json").read_text())["targets"]["teacher_success_min"] == 0.6


# ---- real-time chunking under an injected delay (python -m wam_fast.eval --rtc) -------------------------------
RTC_SMOKE_DELAYS = (0, 2)


def run_rtc_smoke(smoke_run, *flags) -> dict:
    """``python -m wam_fast.eval --rtc --smoke`` (and ``flags``) on the smoke run's trained stages; its JSON."""
    argv = ["--rtc", *flags, "--task", "push-v3", "--smoke", "--out", str(smoke_run.root / "work"),
            "--results", str(smoke_run.root / "rtc"), "--delays", ",".join(map(str, RTC_SMOKE_DELAYS)), "--no-progress"]
    threads = torch.get_num_threads()
    try:
        assert fidelity.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads((smoke_run.root / "rtc" / "metaworld-push-v3-rtc.json").read_text())


@pytest.fixture(scope="module")
def rtc_smoke(smoke_run):
    """The --rtc smoke run (the prefix student distils here, 2 steps)."""
    return run_rtc_smoke(smoke_run)


@needs_metaworld
def test_rtc_smoke_run_writes_every_row_and_its_chart(rtc_smoke, smoke_run):
    keys = {"model", "mode", "delay", "success", "successes", "episodes", "ci95", "seam_jump", "step_jump",
            "after_seam_jump", "seams", "commit"}
    assert [(r["model"], r["mode"], r["delay"]) for r in rtc_smoke["rows"]] == [
        (model, mode, delay) for model in realtime_eval.RTC_MODELS for delay in RTC_SMOKE_DELAYS
        for mode in MODES]
    assert all(keys <= set(r) and r["episodes"] == 2 for r in rtc_smoke["rows"])
    assert set(rtc_smoke["latency"]) == set(realtime_eval.RTC_MODELS)
    assert {"success_kept", "seam_share"} <= set(rtc_smoke["targets"])
    png = smoke_run.root / "rtc" / "metaworld-push-v3-rtc.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_metaworld
def test_rtc_modes_agree_without_delay_and_rtc_eases_the_seam(rtc_smoke):
    rows = {(r["model"], r["mode"], r["delay"]): r for r in rtc_smoke["rows"]}
    for model in realtime_eval.RTC_MODELS:
        same = [(rows[model, mode, 0]["successes"], rows[model, mode, 0]["seam_jump"]) for mode in MODES]
        assert same[0] == same[1] == same[2], model  # delay 0: the three modes run the same actions
        assert rows[model, "rtc", 2]["seam_jump"] < rows[model, "naive", 2]["seam_jump"], model


@needs_metaworld
def test_rtc_student_reads_committed_actions(rtc_smoke):
    student = wam_fast.load_pretrained(rtc_smoke["checkpoints"][realtime_eval.RTC_ROWS[0].name])
    assert student.config.action_prefix and student.config.distillation == "shortcut"


@pytest.mark.parametrize("task", realtime_eval.RECORDED_RTC_TASKS)
def test_recorded_rtc_results_match_what_the_command_runs(task):
    results_dir = Path(__file__).resolve().parents[1] / RESULTS_DIR
    recorded = json.loads((results_dir / f"metaworld-{task}-rtc.json").read_text())
    settings = dataclasses.replace(Settings.for_task(task), episodes=realtime_eval.RTC_EPISODES)
    assert recorded["settings"] == fidelity.jsonable(dataclasses.asdict(settings))
    assert recorded["models"] == list(realtime_eval.RTC_MODELS)
    assert [(r["model"], r["mode"], r["delay"]) for r in recorded["rows"]] == [
        (model, mode, delay) for model in realtime_eval.RTC_MODELS for delay in realtime_eval.RTC_DELAYS
        for mode in MODES]
    assert recorded["targets"] == realtime_eval.rtc_targets(recorded)
    assert all(r["commit"] and r["episodes"] == realtime_eval.RTC_EPISODES for r in recorded["rows"])


@needs_metaworld
def test_rtc_retime_replaces_only_the_chunk_times(rtc_smoke, smoke_run):
    again = run_rtc_smoke(smoke_run, "--retime")
    assert again["rows"] == rtc_smoke["rows"] and again["retimed"]
    assert again["latency"] != rtc_smoke["latency"] and set(again["latency"]) == set(rtc_smoke["latency"])
