"""CUDA graphs over a WAMPolicy's few-step sampling loop (``wam_fast.compile`` attaches them on CUDA).

What one ``act(image_latent)`` does with a graph attached:

    cache.add_frame(image)                 eager, outside the graph: Python ring-slot bookkeeping and
                                           in-place writes into the cache's static buffers
    initial noise                          drawn on the policy's CPU generator exactly as the eager
                                           loop draws it (video, then actions), copied into static buffers
    graph.replay()                         "loop" mode: every denoising step (cache.denoise on the
                                           static buffers) and every sampler update in ONE graph; the
                                           samplers' coefficients are Python floats, constant for a
                                           step count, so they are baked in
    clone the chunk out of the graph's static outputs

So a compiled policy returns the chunks the eager policy returns for the same seed. Samplers that
draw fresh noise inside their steps ("dpm++2m-sde", "consistency": a CPU generator draw that a graph
cannot replay) run in "step" mode instead: one graph holds one denoising forward and is replayed at
every step, the sampler's updates (and draws) run eagerly between replays, so the noise stream is
still the eager one. ``sampler_draws_noise`` decides, by running the sampler on zeros and watching
its generator.

Capture: warm-up runs on a side stream (Triton compiles, op-level lookup tables are built), then
capture, then replay; nothing inside reads a tensor value on the host (no sync). A graph is bound
to the cache's buffers, the batch and the sampling options: ``reset`` with another batch (the
cache reallocates), or changed options, re-capture on the next act. Only the cached path is
captured: the uncached forward builds RoPE tables with host-to-device copies per call.

``attach(policy, capture=EagerCapture)`` runs the same machinery on the CPU with a stand-in that
re-runs the captured function on the static buffers (tests: every copy-in, mode choice and
re-capture is exercised without a GPU; it also refuses a captured function that draws from a CPU
generator, as a real capture would).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Tuple

import torch

from wam_fast.policy import WAMPolicy
from wam_fast.sampling import SAMPLERS, initial_noise, run_sampler, step_size_for
from wam_fast.schedules import schedule_for

GRAPHS_ATTR = "_wam_fast_graphs"


# ---- capture backends ---------------------------------------------------------------------------------
class CudaGraphCapture:
    """One torch.cuda.CUDAGraph: ``capture(fn)`` warms ``fn`` up on a side stream, captures one call
    and returns its outputs (static tensors); ``replay()`` re-runs the kernels into those tensors."""

    def __init__(self, device: torch.device, warmup: int = 2, generator: Optional[torch.Generator] = None):
        if torch.device(device).type != "cuda":
            raise ValueError(f"CudaGraphCapture needs a CUDA device, got {device}")
        self.device, self.warmup = torch.device(device), int(warmup)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.outputs: Tuple[torch.Tensor, ...] = ()

    def capture(self, fn: Callable[[], Tuple[torch.Tensor, ...]]) -> Tuple[torch.Tensor, ...]:
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn()
        current.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = tuple(fn())
        return self.outputs

    def replay(self) -> Tuple[torch.Tensor, ...]:
        self.graph.replay()
        return self.outputs


class EagerCapture:
    """CPU stand-in with a graph's contract: ``replay()`` re-runs the captured function (reading the
    same static input tensors) and writes its results into the tensors ``capture`` returned. Raises,
    as a real capture would fail, when the captured function draws from ``generator``."""

    def __init__(self, device: torch.device, warmup: int = 0, generator: Optional[torch.Generator] = None):
        self.device, self.generator = torch.device(device), generator
        self.fn: Optional[Callable] = None
        self.outputs: Tuple[torch.Tensor, ...] = ()

    def _run(self):
        state = None if self.generator is None else self.generator.get_state()
        out = tuple(self.fn())
        if state is not None and not torch.equal(state, self.generator.get_state()):
            raise RuntimeError("the captured function drew from a CPU generator: a CUDA graph cannot replay a host "
                               "draw (this sampler needs step mode)")
        return out

    def capture(self, fn):
        self.fn = fn
        self.outputs = self._run()
        return self.outputs

    def replay(self):
        for static, fresh in zip(self.outputs, self._run()):
            static.copy_(fresh)
        return self.outputs


# ---- which samplers can live inside one graph -----------------------------------------------------------
def sampler_draws_noise(config, sampler: str, steps: int) -> bool:
    """Whether ``sampler`` draws from its generator inside its steps (beyond the initial noise), found by
    running it for ``steps`` steps on zeros on the CPU and comparing the generator state."""
    generator = torch.Generator("cpu").manual_seed(0)
    before = generator.get_state()
    solver = SAMPLERS[sampler](schedule_for(config), steps, generator)
    x = torch.zeros(1, 2)
    for i in range(steps):
        x = solver.step(i, x, torch.zeros_like(x))
    return not torch.equal(before, generator.get_state())


# ---- the runner -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Entry:
    key: tuple
    capture: object
    robot: Optional[torch.Tensor]
    inputs: Tuple[torch.Tensor, ...]     # loop: (video noise, action noise); step: (video, actions, t[, step_size])
    template: object = None              # loop: the ActionChunk of the capture (its non-tensor fields)


class PolicyGraphs:
    """Runs ``act`` of a cached WAMPolicy with its sampling loop in a graph (module docstring)."""

    def __init__(self, policy: WAMPolicy, capture=CudaGraphCapture, warmup: int = 2):
        if policy.cache is None:
            raise ValueError("graphs capture the KV-cached sampling loop; this WAMPolicy has cache=False")
        self.policy, self.capture_cls, self.warmup = policy, capture, warmup
        self.entry: Optional[_Entry] = None
        self.captures = 0  # graphs captured so far (re-captures included)

    # -- description --
    def mode(self) -> str:
        p = self.policy
        return "step" if sampler_draws_noise(p.config, p.sampler, p.steps) else "loop"

    def describe(self) -> str:
        p = self.policy
        if self.mode() == "loop":
            return (f"one CUDA graph over the whole sampling loop ({p.sampler}, {p.steps} steps: denoising forwards "
                    f"+ sampler updates; add_frame outside, noise pre-drawn on the CPU generator); captured at the "
                    f"first act() and again when the batch or the options change")
        return (f"one CUDA graph per denoising step, replayed {p.steps}x per chunk: the {p.sampler!r} sampler draws "
                f"fresh noise inside its steps from the CPU generator, so its updates run eagerly between replays")

    # -- act --
    @torch.no_grad()
    def act(self, image_latent: torch.Tensor, robot_id: Optional[torch.Tensor] = None):
        p = self.policy
        rows, image, robot = p.observation_rows(image_latent, robot_id)
        if p.cache is None:
            raise RuntimeError("the policy's KV cache was removed after compile; its graphs need it")
        c = p.config
        p.cache.add_frame(image)  # outside the graph
        entry = self._entry(rows, robot)
        if entry.robot is not None:
            entry.robot.copy_(robot)
        if entry.template is not None:  # loop mode: the eager loop's initial draws, then one replay
            video_noise, action_noise = initial_noise(None, self._video_shape(), self._action_shape(), p.generator)
            entry.inputs[0].copy_(video_noise)
            entry.inputs[1].copy_(action_noise)
            video, actions = entry.capture.replay()
            chunk = dataclasses.replace(entry.template, actions=actions.clone(), video=video.clone())
        else:
            def forward(video, actions, timestep, step_size):
                for static, value in zip(entry.inputs, (video, actions, timestep, step_size)):
                    static.copy_(value)
                video_out, action_out = entry.capture.replay()
                return video_out.clone(), action_out.clone()

            chunk = run_sampler(forward, c, p.batch, p.device, p.dtype, sampler=p.sampler, steps=p.steps,
                                cfg_scale=p.cfg_scale, cfg_schedule=p.cfg_schedule, generator=p.generator)
        p.end_step(image_latent)
        return chunk

    # -- capture --
    def _video_shape(self):
        c = self.policy.config
        return (self.policy.batch, c.noisy_frames, c.latent_channels, c.latent_height, c.latent_width)

    def _action_shape(self):
        c = self.policy.config
        return (self.policy.batch, c.action_len, c.action_dim)

    def _key(self, rows: int, robot) -> tuple:
        p, cache = self.policy, self.policy.cache
        buffers = tuple(t.data_ptr() for t in (cache.k, cache.v, cache.encoded_k) if t is not None)
        return (p.sampler, p.steps, p.cfg_scale, p.cfg_schedule, p.batch, rows, cache.batch, cache.max_history,
                None if robot is None else (robot.dtype, tuple(robot.shape)), buffers, p.dtype, p.device)

    def _entry(self, rows: int, robot) -> _Entry:
        key = self._key(rows, robot)
        if self.entry is not None and self.entry.key == key:
            return self.entry
        self.entry = None  # drop the old graph (and its memory pool) before capturing the new one
        self.entry = self._capture(key, rows, robot)
        self.captures += 1
        return self.entry

    def _capture(self, key, rows: int, robot) -> _Entry:
        p, c, cache = self.policy, self.policy.config, self.policy.cache
        static_robot = None if robot is None else robot.clone()
        # the captured code must never draw: a dedicated generator it is handed, and watched
        guard = torch.Generator("cpu").manual_seed(0)
        capture = self.capture_cls(p.device, warmup=self.warmup, generator=guard)
        zeros = dict(device=p.device)
        if self.mode() == "loop":
            video_noise = torch.zeros(self._video_shape(), dtype=torch.float32, **zeros)
            action_noise = torch.zeros(self._action_shape(), dtype=torch.float32, **zeros)
            template = []

            def denoise(video, actions, timestep, step_size):
                return cache.denoise(video, actions, timestep, robot_id=static_robot, step_size=step_size)

            def loop():
                chunk = run_sampler(denoise, c, p.batch, p.device, p.dtype, sampler=p.sampler, steps=p.steps,
                                    cfg_scale=p.cfg_scale, cfg_schedule=p.cfg_schedule, generator=guard,
                                    noise=(video_noise, action_noise))
                template[:] = [chunk]
                return chunk.video, chunk.actions

            capture.capture(loop)
            return _Entry(key, capture, static_robot, (video_noise, action_noise),
                          dataclasses.replace(template[0], actions=None, video=None))
        n = rows * p.batch
        inputs: List[torch.Tensor] = [torch.zeros((n,) + self._video_shape()[1:], dtype=p.dtype, **zeros),
                                      torch.zeros((n,) + self._action_shape()[1:], dtype=p.dtype, **zeros),
                                      torch.zeros(n, dtype=torch.float32, **zeros)]
        if step_size_for(c, p.steps) is not None:
            inputs.append(torch.zeros(n, dtype=torch.float32, **zeros))

        def step():
            return cache.denoise(inputs[0], inputs[1], inputs[2], robot_id=static_robot,
                                 step_size=inputs[3] if len(inputs) > 3 else None)

        capture.capture(step)
        return _Entry(key, capture, static_robot, tuple(inputs))


# ---- attaching to a policy ---------------------------------------------------------------------------------
class CompiledWAMPolicy(WAMPolicy):
    """A WAMPolicy after ``wam_fast.compile``: the same object and methods (its class is swapped in
    place, as ``fuse`` swaps module classes); ``act`` replays the attached graphs when there are any."""

    @torch.no_grad()
    def act(self, image_latent: torch.Tensor, robot_id: Optional[torch.Tensor] = None):
        runner = self.__dict__.get(GRAPHS_ATTR)
        if runner is None:
            return super().act(image_latent, robot_id)
        return runner.act(image_latent, robot_id)


def make_compiled(policy: WAMPolicy) -> WAMPolicy:
    """Swap the policy's class to CompiledWAMPolicy (a user subclass keeps its class: its act is its own)."""
    if type(policy) is WAMPolicy:
        policy.__class__ = CompiledWAMPolicy
    return policy


def attach(policy: WAMPolicy, capture=CudaGraphCapture, warmup: int = 2) -> PolicyGraphs:
    """Run ``policy.act`` through a PolicyGraphs runner (``capture``: CudaGraphCapture, or EagerCapture
    on the CPU for tests). Returns the runner."""
    if not isinstance(policy, WAMPolicy):
        raise TypeError(f"attach expects a WAMPolicy, got {type(policy).__name__}")
    if type(policy) not in (WAMPolicy, CompiledWAMPolicy):
        raise TypeError(f"attach: {type(policy).__name__} is a WAMPolicy subclass with its own act(); graphs "
                        f"replace WAMPolicy.act and are attached to WAMPolicy itself only")
    runner = PolicyGraphs(policy, capture, warmup)
    make_compiled(policy)
    policy.__dict__[GRAPHS_ATTR] = runner
    return runner


def detach(policy: WAMPolicy) -> None:
    """Back to eager act (the graphs are dropped)."""
    policy.__dict__.pop(GRAPHS_ATTR, None)


__all__ = ["CudaGraphCapture", "EagerCapture", "PolicyGraphs", "CompiledWAMPolicy", "attach", "detach",
           "make_compiled", "sampler_draws_noise"]
