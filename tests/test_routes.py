"""The multimodal Meta-World task (wam_fast.eval.routes): two routes round a wall, their average fails,
the route is not in the first frame, each row records its mode coverage; and its smoke run."""
import dataclasses
import importlib.util
import json
import warnings

import numpy as np
import pytest
import torch

import metaworld_smoke

from wam_fast.eval import fidelity, routes, stages
from wam_fast.eval import metaworld as mw
from wam_fast.eval.results import markdown_table, targets
from wam_fast.eval.settings import MODELS, Settings

TASK = "button-press-wall-v3"
needs_metaworld = pytest.mark.skipif(importlib.util.find_spec("metaworld") is None,
                                     reason='Meta-World is not installed: pip install "wam_fast[sim]"')


@pytest.fixture(scope="module", autouse=True)
def _cpu_run_as_users_run_it():
    with pytest.MonkeyPatch.context() as patch:  # as in test_metaworld: FP8 rows on torch, not interpreted Triton
        patch.delenv("TRITON_INTERPRET", raising=False)
        yield


@pytest.fixture(autouse=True)
def _quiet_experts():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _drive(env, act, layout: int, horizon: int = 250):
    """Run ``act(obs) -> action`` from a reset; (success step or None, the route tracked)."""
    env.reset(layout)
    tracker = routes.RouteTracker(TASK, 1)
    for t in range(horizon):
        _, success = env.step(np.clip(act(env.obs), -1, 1), render=False)
        tracker.observe(0, env.obs)
        if success:
            return t + 1, tracker.routes[0]
    return None, tracker.routes[0]


def test_settings_make_the_task_multimodal():
    settings = Settings.for_task(TASK)
    assert settings.expert == "two-routes" and settings.multimodal and settings.horizon == 250
    assert not Settings.for_task("push-v3").multimodal and Settings.for_task("push-v3").expert == "metaworld"
    assert "expert" not in stages.demos_key(Settings.for_task("push-v3"))  # old demos keep their key
    assert stages.demos_key(settings)["expert"] == "two-routes" and stages.demos_key(settings)["side"] == routes.SIDE


def test_bad_expert_names_and_tasks_are_refused():
    with pytest.raises(ValueError, match=r"expert must be one of \('metaworld', 'two-routes'\), got 'zigzag'"):
        routes.make_expert(TASK, "zigzag")
    with pytest.raises(ValueError, match=r"defined for \['button-press-wall-v3'\], not 'push-v3'"):
        routes.TwoRouteExpert("push-v3")
    with pytest.raises(ValueError, match="routes are defined for"):
        routes.RouteTracker("push-v3", 2)


@needs_metaworld
def test_both_routes_succeed_and_their_average_stalls_at_the_wall():
    env = mw.MetaWorldEnv(TASK, "train")
    try:
        rng = np.random.default_rng(0)
        for layout in (0, 3):
            for route in routes.ROUTES:
                expert = routes.TwoRouteExpert(TASK)
                assert expert.reset(rng, route) == route
                steps, taken = _drive(env, expert.get_action, layout)
                assert steps is not None and taken == route, (layout, route, steps, taken)
            left, right = routes.TwoRouteExpert(TASK), routes.TwoRouteExpert(TASK)
            left.reset(rng, "left"), right.reset(rng, "right")
            steps, taken = _drive(env, lambda obs: (left.get_action(obs) + right.get_action(obs)) / 2, layout)
            assert steps is None and taken is None  # the mean action never passes the wall
            assert abs(env.obs[0] - routes.TWO_ROUTE_TASKS[TASK]["wall_x"]) < 0.02  # stuck in front of it
            assert env.obs[1] < routes.TWO_ROUTE_TASKS[TASK]["wall_y"]
    finally:
        env.close()


@needs_metaworld
def test_routes_are_drawn_per_episode_and_not_in_the_first_frame():
    env = mw.MetaWorldEnv(TASK, "train")
    try:
        expert, rng = routes.TwoRouteExpert(TASK), np.random.default_rng(1)
        drawn = [expert.reset(rng) for _ in range(200)]
        assert all(set(drawn[i:i + 2]) == {"left", "right"} for i in range(0, 200, 2))  # each pair holds both
        assert 0 < sum(drawn[i] == "left" for i in range(0, 200, 2)) < 100  # in a random order
        seeds = {routes.TwoRouteExpert(TASK).reset(np.random.default_rng(s)): s for s in range(10)}  # one per route
        episodes = {route: mw.expert_episode(env, routes.TwoRouteExpert(TASK), 2, horizon=40,
                                             rng=np.random.default_rng(seeds[route])) for route in routes.ROUTES}
        assert {route: episodes[route].route for route in episodes} == {"left": "left", "right": "right"}
        first = [episodes[r].images[0] for r in ("left", "right")]
        assert np.array_equal(*first)  # nothing in the first frame tells the route
        assert not np.array_equal(episodes["left"].images[-1], episodes["right"].images[-1])
    finally:
        env.close()
    with pytest.raises(RuntimeError, match="reset"):
        routes.TwoRouteExpert(TASK).get_action(np.zeros(39))
    with pytest.raises(ValueError, match="route must be one of"):
        routes.TwoRouteExpert(TASK).reset(np.random.default_rng(0), "up")


def test_tracker_counts_the_side_at_the_wall_and_episodes_that_never_pass():
    tracker = routes.RouteTracker(TASK, 3)
    for i, x in enumerate((-0.05, 0.3)):
        tracker.observe(i, np.array([x, 0.5, 0.1]))  # before the wall's plane: nothing yet
        tracker.observe(i, np.array([x, 0.62, 0.1]))
        tracker.observe(i, np.array([0.1, 0.8, 0.3]))  # later positions do not change it
    assert tracker.routes == ["left", "right", None]
    assert tracker.counts() == {"left": 1, "right": 1, "none": 1}
    assert tracker.counts([True, False, False]) == {"left": 1, "right": 0, "none": 0}


def _results(teacher: float, one_step: float) -> dict:
    models = [{"name": "teacher", "steps": 10, "success": teacher, "successes": 0, "episodes": 50, "ci95": [0, 1],
               "latency_ms": 1.0, "routes": {"left": 0.5, "right": 0.4, "none": 0.1}},
              {"name": "teacher-1step", "steps": 1, "success": one_step, "successes": 0, "episodes": 50,
               "ci95": [0, 1], "latency_ms": 1.0, "routes": {"left": 0.0, "right": 0.0, "none": 1.0},
               "video_psnr": 21.25, "video_psnr_hold": 20.0, "video_ssim": 0.8, "video_ssim_hold": 0.75}]
    return {"task": TASK, "multimodal": True, "models": models}


def test_multimodal_target_is_that_one_step_of_the_teacher_fails():
    assert targets(_results(0.9, 0.6))["teacher-1step"]["met"]  # 0.67 of the teacher <= 0.7
    assert not targets(_results(0.9, 0.7))["teacher-1step"]["met"]
    assert "teacher-1step" not in targets(dict(_results(0.9, 0.6), multimodal=False))
    table = markdown_table(_results(0.9, 0.6))
    assert "routes left / right / none" in table and "| 0% / 0% / 100% |" in table
    assert "| 21.2 (20.0) | 0.800 (0.750) |" in table and "| - (-) | - (-) |" in table


def test_a_setting_added_later_counts_at_its_default():
    new = fidelity.jsonable(dataclasses.asdict(Settings.for_task("push-v3")))
    old = {k: v for k, v in new.items() if k not in ("expert", "video_rounds")}
    assert fidelity.same_run(old, new)
    assert fidelity.same_run(dict(new, video_rounds=1), new)  # only the video pass runs again
    assert not fidelity.same_run(dict(old, horizon=100), new)
    assert not fidelity.same_run(dict(new, expert="two-routes"), new)
    assert not fidelity.same_run(None, new)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    return metaworld_smoke.smoke_run(tmp_path_factory, TASK)


@needs_metaworld
def test_smoke_run_records_mode_coverage_and_video_of_every_row(smoke_run):
    results = json.loads(smoke_run.json.read_text())
    assert results["multimodal"] is True and [m["name"] for m in results["models"]] == [r.name for r in MODELS]
    assert results["demos"]["routes"] and sum(results["demos"]["routes"].values()) == results["demos"]["episodes"]
    assert "teacher-1step" in results["targets"]
    for m in results["models"]:
        assert set(m["routes"]) == {"left", "right", "none"} and sum(m["routes"].values()) == pytest.approx(1.0)
        assert sum(m["routes_of_successes"].values()) == pytest.approx(m["success"])
        assert m["video_rounds"] == Settings.smoke(TASK).video_rounds
        if m["future_frames"] == 0:  # action-only: nothing imagined
            assert m["video_psnr"] is None and m["video_frames"] == 0
        else:
            assert 0 < m["video_psnr"] <= 100 and -1 <= m["video_ssim"] <= 1, m["name"]
            assert m["video_frames"] == 2 * m["video_rounds"] and 10 < m["video_psnr_hold"] <= 100


@needs_metaworld
def test_rows_recorded_before_the_video_pass_get_only_their_video(smoke_run, monkeypatch):
    results = json.loads(smoke_run.json.read_text())
    video_keys = {k for k in results["models"][0] if k.startswith("video_")}
    for m in results["models"]:  # as recorded before the video pass existed (push-v3, drawer-open-v3)
        for key in video_keys:
            m.pop(key)
    results["settings"].pop("video_rounds")
    smoke_run.json.write_text(json.dumps(results))
    monkeypatch.setattr(fidelity, "evaluate_row", lambda *a, **k: pytest.fail("success measured again"))
    threads = torch.get_num_threads()
    try:
        assert fidelity.main(smoke_run.argv) == 0
    finally:
        torch.set_num_threads(threads)
    after = json.loads(smoke_run.json.read_text())
    assert after["settings"]["video_rounds"] == Settings.smoke(TASK).video_rounds
    for old, new in zip(results["models"], after["models"]):
        assert {k: v for k, v in new.items() if k not in video_keys} == old
        assert video_keys <= set(new) and new["video_commit"]
