"""Observation dict -> one pipeline session call -> reply dict (openpi's policy protocol).

An observation is ``{"image": uint8 (H, W, 3) or (N_cams, H, W, 3), "prompt": str}``; the metadata the server
sends on connect names the keys and shapes. Keys other than those are refused (a second camera or a state
under another name would otherwise be dropped without a word). The session checks the values (dtype, shape,
NaN, cameras) and raises ValueError / TypeError naming what was expected and what came.

Real-time chunking is the client's choice, per connection and per request: an observation may also carry
``"prefix_actions"`` (metadata ``prefix_key``): float (d, A), robot units, 0 <= d <= metadata ``max_prefix``,
the actions the robot executes while this chunk is inferred. The reply's first d actions are exactly those,
and the rest continues them (``wam_fast.prefix``); the robot enters the chunk at action d
(``wam_fast.realtime.RealTimeChunker`` does this on the client side). ``"prefix_blend"`` (int >= 0, metadata
``prefix_blend_key``; default ``prefix_blend``) sets how many actions after them are eased out of them.
"""
from __future__ import annotations

import time
from typing import Any, Dict

import numpy as np


class ObservationError(ValueError):
    """An observation that does not have the keys and types the metadata names."""


class PipelineSessionAdapter:
    """One connection's episode: its own pipeline session (KV cache rows, noise stream)."""

    def __init__(self, pipeline, metadata: Dict[str, Any], seed=None):
        self.session = pipeline.new_session(seed=seed)
        self.image_key = metadata["image_key"]
        self.prompt_key = metadata["prompt_key"]
        self.state = bool(metadata.get("state"))
        self.prefix_key, self.blend_key = metadata.get("prefix_key"), metadata.get("prefix_blend_key")
        self.max_prefix = int(metadata.get("max_prefix", 0))
        self.keys = {self.image_key, self.prompt_key} | ({"state"} if self.state else set())
        self.optional = {key for key in (self.prefix_key, self.blend_key) if key}

    def check(self, obs) -> None:
        if not isinstance(obs, dict):
            raise ObservationError(f"an observation must be a map with keys {sorted(self.keys)}, got "
                                   f"{type(obs).__name__}")
        missing = [k for k in (self.image_key, self.prompt_key) if k not in obs]
        if missing:
            raise ObservationError(f"observation is missing {missing} (expected keys {sorted(self.keys)}, "
                                   f"got {sorted(map(str, obs))})")
        extra = sorted(str(k) for k in obs if k not in self.keys | self.optional)
        if extra:
            why = " (this pipeline takes no proprioceptive state)" if "state" in extra and not self.state else ""
            optional = f" (optional: {sorted(self.optional)})" if self.optional else ""
            raise ObservationError(f"observation has unknown keys {extra}{why}; expected {sorted(self.keys)}{optional}")
        image, prompt = obs[self.image_key], obs[self.prompt_key]
        if not isinstance(image, np.ndarray):
            raise ObservationError(f"{self.image_key!r} must be a numpy array (uint8, (H, W, 3) or (N_cams, H, W, 3)), "
                                   f"got {type(image).__name__}")
        if not isinstance(prompt, str):
            raise ObservationError(f"{self.prompt_key!r} must be a str, got {type(prompt).__name__}")
        prefix = obs.get(self.prefix_key) if self.prefix_key else None
        if prefix is not None:
            if not isinstance(prefix, np.ndarray) or prefix.ndim != 2:
                raise ObservationError(f"{self.prefix_key!r} must be a float numpy array (d, action_dim) of committed "
                                       f"actions, got {getattr(prefix, 'shape', type(prefix).__name__)}")
            if prefix.shape[0] > self.max_prefix:
                raise ObservationError(f"{self.prefix_key!r} holds {prefix.shape[0]} committed actions; this server "
                                       f"takes at most max_prefix={self.max_prefix}")

    def infer(self, obs) -> Dict[str, Any]:
        """Run one chunk; the reply has "actions" (float32 (K, A), robot units) and "server_timing" (ms)."""
        start = time.perf_counter()
        self.check(obs)
        kwargs = {"state": obs["state"]} if self.state else {}
        if self.prefix_key and obs.get(self.prefix_key) is not None:
            kwargs["prefix"] = obs[self.prefix_key]
        if self.blend_key and obs.get(self.blend_key) is not None:
            kwargs["blend"] = obs[self.blend_key]
        actions = self.session(obs[self.image_key], obs[self.prompt_key], **kwargs)
        timing = {k: float(v) for k, v in (self.session.last_timing or {}).items()}
        timing["infer_ms"] = (time.perf_counter() - start) * 1e3
        return {"actions": np.asarray(actions, dtype=np.float32), "server_timing": timing}
