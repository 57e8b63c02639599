"""A tiny pipeline served on 127.0.0.1 for the serving tests, and the real openpi client to talk to it."""
import os

import numpy as np
import pytest

try:
    from openpi_client.websocket_client_policy import WebsocketClientPolicy
except ImportError:  # CI installs it (README: pip install --no-deps openpi-client): missing there is a failure
    if os.environ.get("CI"):
        raise
    pytest.skip("openpi-client is not installed: pip install --no-deps openpi-client", allow_module_level=True)

from wam_fast import WAMPipeline
from wam_fast.serve.server import PolicyServer, ServerThread

SEED = 0


def make_pipeline():
    return WAMPipeline.tiny_random(seed=0)


def frames(metadata, count, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, metadata["image_shape"], dtype=np.uint8) for _ in range(count)]


def lone_actions(pipeline, images, prompt):
    """What one session alone gives for these frames: the reference for every served episode."""
    session = pipeline.new_session(seed=SEED)
    return [session(image, prompt) for image in images]


def serve(pipeline, **options):
    """A started ServerThread (call .stop()) and its port."""
    thread = ServerThread(PolicyServer(pipeline, "127.0.0.1", 0, seed=SEED, **options))
    return thread, thread.start()


__all__ = ["SEED", "WebsocketClientPolicy", "frames", "lone_actions", "make_pipeline", "serve"]
