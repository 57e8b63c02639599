"""python -m wam_fast.serve against the real openpi client (wam_fast.serve; README, Serving)."""
import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from serve_session import SEED, WebsocketClientPolicy, frames, lone_actions, make_pipeline, serve

websockets_sync = pytest.importorskip("websockets.sync.client")
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402

from wam_fast.serve import wire  # noqa: E402


@pytest.fixture(scope="module")
def pipeline():
    return make_pipeline()


@pytest.fixture(scope="module")
def server(pipeline):
    thread, port = serve(pipeline, max_request_bytes=4 << 20)
    yield port
    thread.stop()


def connect(port):
    return WebsocketClientPolicy("127.0.0.1", port)


def test_round_trip_metadata_actions_and_timing(server, pipeline):
    client = connect(server)
    meta = client.get_server_metadata()
    assert meta["image_shape"] == list(pipeline.image_shape) + [3] or meta["image_shape"][-1] == 3
    assert meta["image_key"] == "image" and meta["prompt_key"] == "prompt" and meta["state"] is False
    images = frames(meta, 3)
    replies = [client.infer({"image": image, "prompt": "open the drawer"}) for image in images]
    for reply, want in zip(replies, lone_actions(pipeline, images, "open the drawer")):
        assert reply["actions"].dtype == np.float32 and list(reply["actions"].shape) == meta["action_shape"]
        np.testing.assert_array_equal(reply["actions"], want)  # the served episode is the lone session's
        assert {"infer_ms", "encode_ms", "policy_ms"} <= set(reply["server_timing"])


def test_concurrent_clients_have_their_own_episodes(server, pipeline):
    meta = connect(server).get_server_metadata()
    jobs = {"open the drawer": frames(meta, 4, seed=2), "push the puck": frames(meta, 4, seed=3)}

    def episode(prompt):
        client = connect(server)
        return [client.infer({"image": image, "prompt": prompt})["actions"] for image in jobs[prompt]]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        got = dict(zip(jobs, pool.map(episode, jobs)))
    for prompt, images in jobs.items():
        for g, w in zip(got[prompt], lone_actions(pipeline, images, prompt)):
            np.testing.assert_array_equal(g, w)


def test_new_prompt_starts_a_new_episode(server, pipeline):
    client = connect(server)
    images = frames(client.get_server_metadata(), 2, seed=4)
    client.infer({"image": images[0], "prompt": "open the drawer"})
    got = client.infer({"image": images[1], "prompt": "close the drawer"})["actions"]
    # a new prompt resets the episode: the same as a fresh session's first chunk after one earlier chunk
    session = pipeline.new_session(seed=SEED)
    session(images[0], "open the drawer")
    np.testing.assert_array_equal(got, session(images[1], "close the drawer"))


def observation(meta, **change):
    obs = {"image": np.zeros(meta["image_shape"], np.uint8), "prompt": "open the drawer", **change}
    return {k: v for k, v in obs.items() if v is not None}


# case -> (the observation's change, what the error must say)
BAD = {
    "missing key": (lambda meta: dict(prompt=None), "missing ['prompt']"),
    "unknown key": (lambda meta: dict(state=np.zeros(3, np.float32)), "unknown keys ['state']"),
    "wrong dtype": (lambda meta: dict(image=np.zeros(meta["image_shape"], np.int32)), "int32"),
    "wrong shape": (lambda meta: dict(image=np.zeros((5, 7, 3), np.uint8)), "(5, 7, 3)"),
    "nan": (lambda meta: dict(image=np.full(meta["image_shape"], np.nan, np.float32)), "NaN"),
    "prompt not a str": (lambda meta: dict(prompt=3), "'prompt' must be a str"),
    "prefix too long": (lambda meta: dict(prefix_actions=np.zeros((4, 7), np.float32)), "max_prefix=3"),
    "prefix not 2-D": (lambda meta: dict(prefix_actions=np.zeros(7, np.float32)), "(d, action_dim)"),
    "prefix of ints": (lambda meta: dict(prefix_actions=np.zeros((2, 7), np.int64)), "float"),
    "prefix wrong width": (lambda meta: dict(prefix_actions=np.zeros((2, 5), np.float32)), "(1, d, 7)"),
    "negative blend": (lambda meta: dict(prefix_actions=np.zeros((2, 7), np.float32), prefix_blend=-1), "blend must be"),
    "image not an array": (lambda meta: dict(image=[[1, 2, 3]]), "must be a numpy array"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_observation_gets_an_error_and_the_connection_keeps_serving(server, case):
    client = connect(server)
    meta = client.get_server_metadata()
    with pytest.raises(RuntimeError, match="error: bad observation") as info:
        client.infer(observation(meta, **BAD[case][0](meta)))
    assert re.search(re.escape(BAD[case][1]), str(info.value), re.I), str(info.value)
    reply = client.infer({"image": np.zeros(meta["image_shape"], np.uint8), "prompt": "open the drawer"})
    assert np.isfinite(reply["actions"]).all()


def test_a_connection_in_real_time_mode_gets_chunks_that_start_with_its_committed_actions(server, pipeline):
    client = connect(server)
    meta = client.get_server_metadata()
    assert (meta["prefix_key"], meta["max_prefix"]) == ("prefix_actions", 3)
    image = frames(meta, 1)[0]
    committed = np.linspace(-1, 1, 14, dtype=np.float32).reshape(2, 7)
    reply = client.infer(observation(meta, image=image, prefix_actions=committed))
    np.testing.assert_array_equal(reply["actions"][:2], committed)
    session = pipeline.new_session(seed=SEED)
    np.testing.assert_array_equal(reply["actions"], session(image, "open the drawer", prefix=committed))
    unblended = connect(server).infer(observation(meta, image=image, prefix_actions=committed,
                                                  prefix_blend=0))["actions"]  # a new connection: a new episode
    np.testing.assert_array_equal(unblended, pipeline.new_session(seed=SEED)(image, "open the drawer", prefix=committed,
                                                                             blend=0))
    other = connect(server)  # another connection without a prefix: the plain chunk of its own episode
    np.testing.assert_array_equal(other.infer(observation(meta, image=image))["actions"],
                                  pipeline.new_session(seed=SEED)(image, "open the drawer"))


def test_a_robot_loop_runs_real_time_chunking_over_the_network(server):
    """wam_fast.realtime.RealTimeChunker on its background thread, inferring through the openpi client: the
    robot never waits after the first chunk, and each new chunk starts with the actions committed for it."""
    from wam_fast.realtime import RealTimeChunker

    client = connect(server)
    meta = client.get_server_metadata()
    replies = []

    def infer(image, prefix):
        obs = observation(meta, image=image) | ({} if prefix is None else {"prefix_actions": prefix})
        replies.append((prefix, client.infer(obs)["actions"]))
        return replies[-1][1]

    chunker = RealTimeChunker(infer, action_len=4, execute=2, delay=1)
    images = frames(meta, 1)
    try:
        for tick in range(12):
            assert chunker.act(images[0]).shape == (7,)
            time.sleep(0.05)  # a 20 Hz robot
    finally:
        chunker.close()
    assert len(replies) >= 3
    for prefix, actions in replies[1:]:
        np.testing.assert_array_equal(actions[:1], prefix)


@pytest.mark.parametrize("message", [b"\xc1 not msgpack", "a text frame", wire.packb([1, 2, 3])])
def test_garbage_gets_an_error_and_the_connection_keeps_serving(server, message):
    with websockets_sync.connect(f"ws://127.0.0.1:{server}", max_size=None) as ws:
        meta = wire.unpackb(ws.recv())
        ws.send(message)
        answer = ws.recv()
        assert isinstance(answer, str) and answer.startswith("error:"), answer
        ws.send(wire.packb({"image": np.zeros(meta["image_shape"], np.uint8), "prompt": "x"}))
        assert "actions" in wire.unpackb(ws.recv())


def test_oversized_frame_closes_only_that_connection(server):
    other = connect(server)
    meta = other.get_server_metadata()
    huge = np.zeros(100 << 20, np.uint8)  # 100 MB: over the 4 MiB limit of this server
    with websockets_sync.connect(f"ws://127.0.0.1:{server}", max_size=None) as ws:
        ws.recv()
        with pytest.raises(ConnectionClosed) as info:
            ws.send(wire.packb({"image": huge, "prompt": "x"}))
            ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009  # "message too big"
    obs = {"image": np.zeros(meta["image_shape"], np.uint8), "prompt": "x"}
    assert "actions" in other.infer(obs) and "actions" in connect(server).infer(obs)


def test_client_leaving_mid_request_loses_nothing_for_others(server, pipeline):
    meta = connect(server).get_server_metadata()
    images = frames(meta, 3, seed=5)
    for _ in range(3):  # send a request and hang up without reading the reply
        ws = websockets_sync.connect(f"ws://127.0.0.1:{server}", max_size=None)
        ws.recv()
        ws.send(wire.packb({"image": images[0], "prompt": "leave"}))
        ws.close()
    client = connect(server)
    got = [client.infer({"image": image, "prompt": "stay"})["actions"] for image in images]
    for g, w in zip(got, lone_actions(pipeline, images, "stay")):
        np.testing.assert_array_equal(g, w)


def test_healthz(server):
    with urllib.request.urlopen(f"http://127.0.0.1:{server}/healthz", timeout=10) as response:
        assert response.status == 200 and response.read() == b"ok\n"


def test_api_key(pipeline):
    thread, port = serve(pipeline, api_key="s3cret")
    try:
        client = WebsocketClientPolicy("127.0.0.1", port, api_key="s3cret")
        obs = {"image": np.zeros(client.get_server_metadata()["image_shape"], np.uint8), "prompt": "x"}
        assert "actions" in client.infer(obs)
        for key in ("wrong", None):
            with pytest.raises(InvalidStatus, match="401"):
                WebsocketClientPolicy("127.0.0.1", port, api_key=key)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            assert response.status == 200  # the health check needs no key
    finally:
        thread.stop()


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "wam_fast.serve", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args,message", [
    ((), "one of the arguments --pipeline --demo is required"),
    (("--demo", "--port", "70000"), "port must be in 0..65535"),
    (("--pipeline", "/nonexistent/dir"), "is not a directory"),
    (("--demo", "--max-request-mb", "0"), "must be > 0"),
    (("--demo", "--device", "tpu9"), "--device"),
])
def test_cli_bad_flags_exit_2_with_one_line(args, message):
    result = run_cli(*args)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_cli_demo_serves_and_stops_on_sigterm():
    proc = subprocess.Popen([sys.executable, "-m", "wam_fast.serve", "--demo", "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        port, deadline, log = None, time.time() + 120, []
        while port is None and time.time() < deadline:
            line = proc.stderr.readline()
            log.append(line)
            match = re.search(r"on ws://127\.0\.0\.1:(\d+)", line)
            port = int(match.group(1)) if match else None
            assert line or proc.poll() is None, "".join(log)
        client = connect(port)
        obs = {"image": np.zeros(client.get_server_metadata()["image_shape"], np.uint8), "prompt": "x"}
        assert np.isfinite(client.infer(obs)["actions"]).all()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_load_check_small():
    """benchmarks/serve_load.py at 2 clients x 20 requests: no errors, the server exits 0 on SIGTERM."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    try:
        import serve_load
    finally:
        sys.path.pop(0)
    result = serve_load.run(clients=2, requests=20, timeout=300)
    assert result["errors"] == 0, result["error_examples"]
    assert result["end_to_end_ms"]["n"] == 40 and result["server_exit_code_on_sigterm"] == 0
    assert result["end_to_end_ms"]["p50"] >= result["server_infer_ms"]["p50"] > 0
