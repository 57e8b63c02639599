"""CUDA graphs over a cached WAMPolicy's whole chunk (``wam_fast.compile`` plugs them in on CUDA).

``WAMPolicy.act`` does host checks and bookkeeping around one call, ``run_chunk(image_latent,
robot_id, slot)``, which holds all the device work of a chunk: the frame pass into the KV cache's
ring slot ``slot`` (history aging and the visibility of each slot are computed on the device), the
initial noise and any sampler noise (drawn from the policy's generator, on the device), every
denoising step with its precomputed AdaLN tables, every sampler update, the action readout.
``ChunkGraphs`` is a drop-in for that call (``policy.graphs``; the policy's class is not changed).
A chunk with a committed prefix (``wam_fast.prefix``) has its own graph per slot, whose prefix tensors
are copied in like the observation:

    first act() in ring slot s      run_chunk eagerly (the real chunk, and the warm-up: Triton
                                    compiles, torch.compile traces), then capture it into graph s
    every later act() in slot s     copy the observation (and robot ids) in, replay graph s, copy
                                    the video and actions out: ONE replay, no other launch

One graph per slot because the slot is the frame pass's only Python input (the offsets it writes);
for ``history`` past frames there are ``history + 1``. The graphs share one memory pool (they never
run at the same time). A graph is bound to the cache's buffers, the batch, the sampling options and
the dtype: when any of these change, every graph is dropped and re-captured on the next act. The
generator's draws inside a graph continue its stream at each replay (torch's graph-safe RNG), so a
compiled policy returns the eager policy's chunks for the same seed.

``ChunkGraphs(policy, capture=EagerCapture)`` runs the same machinery on the CPU with a stand-in whose
replay re-runs the captured call on the static inputs (tests: every copy-in, capture and re-capture
is exercised without a GPU).
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Callable, Dict, Optional, Tuple

import torch

from wam_fast.policy import WAMPolicy
from wam_fast.prefix import ActionPrefix


# ---- capture backends ---------------------------------------------------------------------------------
class CudaGraphCapture:
    """One torch.cuda.CUDAGraph: ``capture(fn)`` records one call of ``fn`` (nothing runs) and keeps
    its outputs, static tensors that ``replay()`` refills. ``pool``: a memory pool shared with other
    graphs that never run concurrently. ``generator``: a CUDA generator ``fn`` draws from (registered
    with the graph, so each replay continues its stream)."""

    def __init__(self, device: torch.device, pool=None, generator: Optional[torch.Generator] = None):
        if torch.device(device).type != "cuda":
            raise ValueError(f"CudaGraphCapture needs a CUDA device, got {device}")
        self.device, self.pool, self.generator = torch.device(device), pool, generator
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.outputs: Tuple[torch.Tensor, ...] = ()

    def capture(self, fn: Callable[[], Tuple[torch.Tensor, ...]]) -> None:
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None and self.generator.device.type == "cuda":
            register = getattr(graph, "register_generator_state", None)
            if register is None:
                raise RuntimeError(f"torch {torch.__version__} cannot capture draws from a policy's own CUDA "
                                   f"generator (CUDAGraph.register_generator_state needs torch >= 2.5); compile "
                                   f"with CompileConfig(cuda_graphs=False)")
            register(self.generator)
        with torch.cuda.graph(graph, pool=self.pool):
            self.outputs = tuple(fn())
        self.graph = graph

    def replay(self) -> Tuple[torch.Tensor, ...]:
        self.graph.replay()
        return self.outputs

    def memory_pool(self):
        return self.graph.pool()


class EagerCapture:
    """CPU stand-in with a graph's contract: ``capture`` runs nothing; ``replay()`` re-runs the
    captured call (reading the same static input tensors) into the same output tensors."""

    def __init__(self, device: torch.device, pool=None, generator: Optional[torch.Generator] = None):
        self.device = torch.device(device)
        self.fn: Optional[Callable] = None
        self.outputs: Tuple[torch.Tensor, ...] = ()

    def capture(self, fn) -> None:
        self.fn = fn

    def replay(self):
        fresh = tuple(self.fn())
        if not self.outputs:
            self.outputs = tuple(t.clone() for t in fresh)
        else:
            for static, value in zip(self.outputs, fresh):
                static.copy_(value)
        return self.outputs

    def memory_pool(self):
        return None


# ---- the runner -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Graph:
    capture: object
    image: torch.Tensor             # static observation (B, 1, C, H, W)
    robot: Optional[torch.Tensor]   # static robot ids (B,) or None
    prefix: Optional[ActionPrefix]  # static prefix tensors, or None (a graph without a prefix)


class ChunkGraphs:
    """``policy.graphs``: ``(image_latent, robot_id, slot) -> (video, actions)`` as
    ``policy.run_chunk``, from one captured graph per ring slot (module docstring)."""

    def __init__(self, policy: WAMPolicy, capture=CudaGraphCapture):
        if not isinstance(policy, WAMPolicy):
            raise TypeError(f"ChunkGraphs expects a WAMPolicy, got {type(policy).__name__}")
        if policy.cache is None:
            raise ValueError("graphs capture the KV-cached chunk; this WAMPolicy has cache=False")
        # a weak reference: the policy owns its runner (policy.graphs); a strong one back would make a
        # cycle that keeps the policy, its cache and the graphs' memory pool alive until the next gc
        self._policy, self.capture_cls = weakref.ref(policy), capture
        self.graphs: Dict[int, _Graph] = {}
        self.bound: Optional[tuple] = None  # what every graph is bound to (``_binding``)
        self.captures = 0   # graphs captured so far (re-captures included)
        self.replays = 0

    @property
    def policy(self) -> WAMPolicy:
        policy = self._policy()
        if policy is None:
            raise RuntimeError("the WAMPolicy of these graphs was dropped; a ChunkGraphs runs only as its policy.graphs")
        return policy

    def describe(self) -> str:
        p = self.policy
        slots = p.history + 1
        return (f"one CUDA graph per action chunk ({p.sampler}, {p.steps} steps: the frame pass, every denoising "
                f"step, the sampler's updates and draws, the action readout), one per KV-cache ring slot "
                f"({slots}); captured at the first act() in each slot and again when the batch, the options or "
                f"the cache's buffers change")

    def _binding(self, robot_id) -> tuple:
        p, cache = self.policy, self.policy.cache
        tensors = [cache.k, cache.v, cache.encoded_k] + cache.table_tensors
        buffers = tuple(t.data_ptr() for t in tensors if t is not None)
        robot = None if robot_id is None else (robot_id.dtype, tuple(robot_id.shape))
        return (p.sampler, p.steps, p.cfg_scale, p.cfg_schedule, p.batch, p.rows, cache.batch, cache.max_history,
                cache.grid, robot, buffers, p.dtype, p.device, id(p.generator))

    @torch.no_grad()
    def __call__(self, image_latent: torch.Tensor, robot_id: Optional[torch.Tensor], slot: int,
                 prefix: Optional[ActionPrefix] = None):
        p = self.policy
        if p.cache is None:
            raise RuntimeError("the policy's KV cache was removed after compile; its graphs need it")
        binding = self._binding(robot_id)
        if binding != self.bound:
            self.graphs.clear()  # drop stale graphs (and their memory) before capturing new ones
            self.bound = binding
        key = (slot, prefix is not None)  # a prefix's length is data (its mask): one graph serves every length
        graph = self.graphs.get(key)
        if graph is None:
            video, actions = p.run_chunk(image_latent, robot_id, slot, prefix)  # the real chunk, and the warm-up
            self.graphs[key] = self._capture(image_latent, robot_id, slot, prefix)
            return video, actions
        graph.image.copy_(image_latent)
        if graph.robot is not None:
            graph.robot.copy_(robot_id)
        if graph.prefix is not None:
            for static, value in zip(self._prefix_tensors(graph.prefix), self._prefix_tensors(prefix)):
                static.copy_(value)
        video, actions = graph.capture.replay()
        self.replays += 1
        return video.clone(), actions.clone()

    @staticmethod
    def _prefix_tensors(prefix: ActionPrefix):
        return prefix.actions, prefix.weight, prefix.known

    def _capture(self, image_latent, robot_id, slot: int, prefix: Optional[ActionPrefix]) -> _Graph:
        p = self.policy
        image = image_latent.clone()
        robot = None if robot_id is None else robot_id.clone()
        if prefix is not None:
            prefix = ActionPrefix(*(t.clone() for t in self._prefix_tensors(prefix)), prefix.length)
        pool = next((g.capture.memory_pool() for g in self.graphs.values()), None)
        capture = self.capture_cls(p.device, pool=pool, generator=p.generator)
        policy = self._policy  # EagerCapture keeps the call: a weak reference, no cycle through the policy
        capture.capture(lambda: policy().run_chunk(image, robot, slot, prefix))
        self.captures += 1
        return _Graph(capture, image, robot, prefix)


# ---- plugging into a policy ------------------------------------------------------------------------------
def attach(policy: WAMPolicy, capture=CudaGraphCapture) -> ChunkGraphs:
    """Run ``policy``'s chunks through a ChunkGraphs runner (``capture``: CudaGraphCapture, or
    EagerCapture on the CPU for tests). Returns the runner."""
    runner = ChunkGraphs(policy, capture)
    policy.graphs = runner
    return runner


def detach(policy: WAMPolicy) -> None:
    """Back to the eager chunk (the graphs are dropped)."""
    policy.graphs = None


__all__ = ["ChunkGraphs", "CudaGraphCapture", "EagerCapture", "attach", "detach"]
