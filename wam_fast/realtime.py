"""Real-time chunking: the robot keeps executing chunk n while chunk n+1 is inferred, without a seam jump.

    session = pipeline.new_session(seed=0)
    chunker = RealTimeChunker(lambda image, prefix: session(image, "open the drawer", prefix=prefix),
                              action_len=8, execute=4, delay=2)          # mode="rtc"
    while running:                                # once per control tick
        robot.apply(chunker.act(camera.read))     # the action of this tick; inference runs in the background

Every ``execute`` actions of a chunk the chunker starts the next inference from the current observation.
The inference takes about ``delay`` control ticks; meanwhile the robot executes the next ``delay`` actions
of the current chunk. The modes differ in what the new chunk knows and where it is entered:

=======  ===============================================================================================
sync     the robot waits for each chunk (no action while it is inferred) and starts it at its first action
naive    the robot runs on; the new chunk, inferred from an observation ``delay`` ticks old, is entered at
         the action for the current tick (index ``delay``): its start need not continue what ran meanwhile
rtc      as naive, but the ``delay`` actions executed meanwhile are committed: they go to the inference as
         the chunk's ``prefix`` (``WAMPolicy.act(prefix=)``, ``wam_fast.prefix``), so the new chunk starts
         with them and continues them at the seam
=======  ===============================================================================================

``infer(observation, prefix)`` returns a chunk (..., K, A) (a leading batch axis is fine); ``prefix`` is
None or the committed actions (..., d, A). ``observation`` passed to ``act`` may be a zero-argument
callable: it is called only when an inference starts (a simulator renders only then).

``simulated=True`` runs each inference at once but hands its chunk over exactly ``delay`` ticks later, and
``act`` returns None on a tick where the robot has no action (waiting for a chunk: hold still). That is
the Meta-World evaluation's injected delay (``wam_fast.eval.realtime_eval``). Otherwise the inference runs
on a background thread and the chunk is entered when it is done, at the index of the tick it arrives
(more ticks than ``delay`` means actions after the committed ones ran from the old chunk); a robot that
runs out of actions waits for it (logged once).
"""
from __future__ import annotations

import concurrent.futures
import logging
import numbers
from typing import Callable, Optional

import numpy as np

logger = logging.getLogger("wam_fast.realtime")
MODES = ("sync", "naive", "rtc")


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


class RealTimeChunker:
    """Executes chunks tick by tick while the next one is inferred (module docstring).

    After each ``act``: ``switched`` is True when this tick entered a new chunk, and ``seam_jump`` holds
    the L2 distance between the new chunk's first executed action and the action executed just before
    it (one value per batch row; None when nothing ran before, or no switch)."""

    def __init__(self, infer: Callable, *, action_len: int, execute: int, delay: int, mode: str = "rtc",
                 simulated: bool = False):
        if not callable(infer):
            raise TypeError(f"infer must be callable as infer(observation, prefix) -> chunk, got {type(infer).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.action_len = _check_int("action_len", action_len, 1)
        self.execute = _check_int("execute", execute, 1)
        self.delay = _check_int("delay", delay, 0)
        if self.execute > self.action_len:
            raise ValueError(f"execute={execute} actions per chunk, but a chunk has only action_len={action_len}")
        if mode != "sync" and self.execute + self.delay > self.action_len:
            raise ValueError(f"mode {mode!r}: after {execute} actions the next inference starts and the robot runs "
                             f"{delay} more of the same chunk while it runs, but a chunk has only {action_len} "
                             f"actions; need execute + delay <= action_len")
        self.infer, self.mode, self.simulated = infer, mode, bool(simulated)
        self._executor = None if self.simulated else concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="wam_fast-realtime")
        self._warned_wait = False
        self.reset()

    def reset(self) -> None:
        """A new episode: no chunk, nothing pending (an inference still running is left to finish)."""
        self.tick = 0
        self.chunk: Optional[np.ndarray] = None
        self.index = 0
        self.pending = None  # (future or ready chunk, launch tick)
        self.last_action: Optional[np.ndarray] = None
        self.switched = False
        self.seam_jump: Optional[np.ndarray] = None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    # ---- one control tick -------------------------------------------------------------------------------
    def act(self, observation) -> Optional[np.ndarray]:
        """The action (..., A) of this tick; None (simulated only) when the robot waits for a chunk."""
        t = self.tick
        self.tick += 1
        self.switched, self.seam_jump = False, None
        while True:
            if self.pending is not None and self._arrived(t):
                self._switch(t)
                continue
            if self.pending is not None and (self.chunk is None or self.mode == "sync"
                                             or self.index >= self.action_len):
                if self.simulated:
                    return None  # the robot holds still this tick
                if self.chunk is not None and self.mode != "sync" and not self._warned_wait:
                    logger.warning("the robot ran out of actions before the next chunk arrived: inference takes "
                                   "longer than the rest of a chunk; the robot waits (logged once)")
                    self._warned_wait = True
                self.pending[0].result()  # block until it is done
                continue
            if self.pending is None and (self.chunk is None or self.index >= self.execute):
                self._launch(observation, t)
                continue
            break
        action = self.chunk[..., self.index, :]
        self.index += 1
        self.last_action = action
        return action

    def _launch(self, observation, t: int) -> None:
        if callable(observation):
            observation = observation()
        prefix = None
        if self.mode == "rtc" and self.chunk is not None:
            prefix = np.array(self.chunk[..., self.index:self.index + self.delay, :])  # our copy: it is executed
        if self.simulated:
            self.pending = (self.infer(observation, prefix), t)
        else:
            self.pending = (self._executor.submit(self.infer, observation, prefix), t)

    def _arrived(self, t: int) -> bool:
        result, launched = self.pending
        if self.simulated:
            return t >= launched + self.delay
        return result.done()

    def _switch(self, t: int) -> None:
        (result, launched), self.pending = self.pending, None  # a failed inference raises once; the next tick retries
        chunk = np.asarray(result if self.simulated else result.result())
        if chunk.ndim < 2 or chunk.shape[-2] != self.action_len:
            raise ValueError(f"infer returned a chunk of shape {chunk.shape}; expected (..., {self.action_len}, A)")
        first = self.chunk is None
        start = 0 if first or self.mode == "sync" else min(t - launched, self.action_len - 1)
        if self.last_action is not None:
            self.seam_jump = np.linalg.norm(chunk[..., start, :] - self.last_action, axis=-1)
        self.chunk, self.index, self.switched = chunk, start, True
