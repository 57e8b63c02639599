"""wam_fast.realtime.RealTimeChunker: which action runs at each control tick in sync, naive and rtc modes, with
the delay simulated (the Meta-World evaluation) and with inference on a background thread (a robot)."""
import threading

import numpy as np
import pytest

from wam_fast.realtime import MODES, RealTimeChunker

K, A = 8, 2


class Planner:
    """A fake policy: chunk n is n * 100 + (0, 1, ..., K-1) on every action dim; a given prefix becomes the
    chunk's first actions (what a prefix-reading WAM returns). Records what each call got."""

    def __init__(self):
        self.calls = []

    def __call__(self, observation, prefix):
        self.calls.append((observation, None if prefix is None else prefix.copy()))
        n = len(self.calls)
        chunk = np.repeat((n * 100 + np.arange(K, dtype=np.float32))[:, None], A, axis=1)
        if prefix is not None:
            chunk[:len(prefix)] = prefix
        return chunk


def ticks(mode, delay, count, execute=4):
    planner = Planner()
    chunker = RealTimeChunker(planner, action_len=K, execute=execute, delay=delay, mode=mode, simulated=True)
    actions, seams = [], []
    for t in range(count):
        action = chunker.act(t)  # the observation is the tick
        actions.append(None if action is None else float(action[0]))
        if chunker.switched and chunker.seam_jump is not None:
            seams.append(float(chunker.seam_jump))
    return actions, planner.calls, seams


def test_sync_waits_for_every_chunk_and_starts_it_at_its_first_action():
    actions, calls, _ = ticks("sync", 2, 14)
    assert actions == [None, None, 100, 101, 102, 103, None, None, 200, 201, 202, 203, None, None]
    assert [c[0] for c in calls] == [0, 6, 12] and all(c[1] is None for c in calls)


def test_naive_runs_on_and_enters_the_new_chunk_at_the_current_tick():
    actions, calls, _ = ticks("naive", 2, 14)
    # chunk 1 from tick 2; at tick 6 (4 actions in) the next inference starts from observation 6 while
    # actions 4, 5 of chunk 1 run; chunk 2 arrives at tick 8 and is entered at its action 2
    assert actions == [None, None, 100, 101, 102, 103, 104, 105, 202, 203, 204, 205, 302, 303]
    assert [c[0] for c in calls] == [0, 6, 10, 14][:len(calls)] and all(c[1] is None for c in calls)


def test_rtc_commits_the_actions_that_run_during_inference():
    actions, calls, seams = ticks("rtc", 2, 14)
    assert [c[0] for c in calls] == [0, 6, 10]
    assert calls[0][1] is None
    np.testing.assert_array_equal(calls[1][1][:, 0], [104, 105])  # chunk 1's actions at ticks 6, 7
    np.testing.assert_array_equal(calls[2][1][:, 0], [204, 205])
    assert actions == [None, None, 100, 101, 102, 103, 104, 105, 202, 203, 204, 205, 302, 303]
    # the planner returns the prefix in place: the action before the seam is the prefix's last
    assert seams == [pytest.approx(np.sqrt(2) * (202 - 105)), pytest.approx(np.sqrt(2) * (302 - 205))]


def test_without_delay_every_mode_runs_the_same_actions():
    runs = [ticks(mode, 0, 20) for mode in MODES]
    assert runs[0][0] == runs[1][0] == runs[2][0]
    assert runs[0][0][:9] == [100, 101, 102, 103, 200, 201, 202, 203, 300]


def test_a_delay_longer_than_the_replan_period_infers_back_to_back():
    actions, calls, _ = ticks("rtc", 4, 16, execute=3)
    assert [c[0] for c in calls] == [0, 7, 11, 15]
    assert actions[:4] == [None] * 4 and actions[4:7] == [100, 101, 102]


def test_seam_jump_is_the_distance_to_the_action_before():
    planner = Planner()
    chunker = RealTimeChunker(planner, action_len=K, execute=4, delay=0, mode="sync", simulated=True)
    for t in range(5):
        chunker.act(t)
    assert chunker.switched and chunker.seam_jump == pytest.approx(np.sqrt(2) * (200 - 103))


@pytest.mark.parametrize("kwargs,message", [
    (dict(mode="later"), "mode must be one of"),
    (dict(delay=-1), "delay must be an int >= 0"),
    (dict(execute=0), "execute must be an int >= 1"),
    (dict(execute=9), "only action_len=8"),
    (dict(execute=6, delay=3), "execute \\+ delay <= action_len"),
])
def test_bad_settings_are_refused(kwargs, message):
    options = dict(action_len=K, execute=4, delay=2, mode="rtc", simulated=True) | kwargs
    with pytest.raises(ValueError, match=message):
        RealTimeChunker(Planner(), **options)


def test_a_batch_of_robots_runs_in_lockstep():
    def infer(observation, prefix):
        chunk = np.stack([Planner()(observation, None) + 1000 * row for row in range(3)])
        if prefix is not None:
            chunk[:, :prefix.shape[1]] = prefix
        return chunk

    chunker = RealTimeChunker(infer, action_len=K, execute=4, delay=1, mode="rtc", simulated=True)
    out = [chunker.act(t) for t in range(7)]
    assert out[0] is None and out[1].shape == (3, A)
    np.testing.assert_array_equal(out[5][:, 0], [104, 1104, 2104])  # committed while the next chunk is inferred
    np.testing.assert_array_equal(out[6][:, 0], [101, 1101, 2101])  # the new chunk, entered at its action 1


def test_threaded_inference_enters_the_chunk_at_the_tick_it_arrives():
    """On a robot the chunk arrives when the background inference is done; the robot runs on meanwhile."""
    release = threading.Event()
    planner = Planner()

    def infer(observation, prefix):
        if planner.calls:  # the first chunk comes at once; the next waits for the test's release
            release.wait(10)
        return planner(observation, prefix)

    chunker = RealTimeChunker(infer, action_len=K, execute=4, delay=2, mode="rtc")
    try:
        assert [float(chunker.act(t)[0]) for t in range(7)] == [100, 101, 102, 103, 104, 105, 106]
        release.set()
        chunker.pending[0].result(10)
        action = chunker.act(7)  # launched at tick 4, arrives at tick 7: entered at its action 3
        assert chunker.switched and float(action[0]) == 203
        np.testing.assert_array_equal(planner.calls[1][1][:, 0], [104, 105])
    finally:
        release.set()
        chunker.close()


def test_threaded_robot_waits_when_the_chunk_runs_out(caplog):
    release = threading.Event()
    planner = Planner()

    def infer(observation, prefix):
        if planner.calls:
            release.wait(10)
        return planner(observation, prefix)

    chunker = RealTimeChunker(infer, action_len=K, execute=4, delay=2, mode="naive")
    try:
        for t in range(8):
            chunker.act(t)
        threading.Timer(0.2, release.set).start()
        action = chunker.act(8)  # chunk 1 is used up: this tick blocks until chunk 2 is there
        assert float(action[0]) == 204 and "ran out of actions" in caplog.text
    finally:
        release.set()
        chunker.close()


def test_a_failed_inference_raises_once_and_the_next_tick_tries_again():
    planner, calls = Planner(), []

    def infer(observation, prefix):
        calls.append(observation)
        if len(calls) == 2:
            raise RuntimeError("the GPU fell over")
        return planner(observation, prefix)

    chunker = RealTimeChunker(infer, action_len=K, execute=4, delay=0, mode="naive")
    try:
        assert [float(chunker.act(t)[0]) for t in range(5)] == [100, 101, 102, 103, 104]  # tick 4 launches
        chunker.pending[0].exception(10)
        with pytest.raises(RuntimeError, match="fell over"):
            chunker.act(5)
        assert float(chunker.act(6)[0]) == 105  # the old chunk runs on; tick 6 launches again
        chunker.pending[0].result(10)
        assert float(chunker.act(7)[0]) == 201 and calls == [0, 4, 6]  # entered one tick after its launch
    finally:
        chunker.close()
