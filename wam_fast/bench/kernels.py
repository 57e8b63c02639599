"""Kernels per layer per pass (``python -m wam_fast.bench --kernels``): the launch count that CUDA
graphs and torch.compile cannot hide, counted on any device, without a GPU.

Counting: a ``TorchDispatchMode`` sees every op that reaches a kernel (below autograd). An op counts
as one kernel unless it only makes a view or an allocation (``VIEW_OPS``, ``func.is_view``); a
``wam_fast::`` custom op counts as one (its backend's inner torch calls are not seen: the mode is off
inside its own handler). Ops are attributed to the block that ran them (forward hooks on
``model.blocks``), so "per layer" is the blocks' total over the number of blocks, and "outside" is
the rest of the pass (embeddings, time embedding, heads). ``lift_fresh`` (a tensor made from Python
data: a host-to-device copy on a GPU) is counted apart, as ``host_copies``.

Variants: ``eager`` (reference model), ``fused`` (``fuse``), ``fp8`` (fused + ``quantize_fp8``).
Passes: ``uncached`` (one forward of the whole sequence: text, ``history`` frames, the current frame,
the noisy tokens), and with the temporal KV cache ``frame`` (one control step's frame pass, history
aging included), ``step`` (one cached denoising step of a fixed grid, ``denoise_at``: AdaLN tables
precomputed) and ``text`` (once per instruction).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
from typing import Callable, Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from wam_fast.cache import TemporalKVCache
from wam_fast.configs import WAMConfig
from wam_fast.models.fused import fuse
from wam_fast.models.transformer import WAMTransformer
from wam_fast.quant import quantize_fp8

# ops that launch nothing: views, allocations, metadata
VIEW_OPS = {"aten._unsafe_view", "aten.empty", "aten.empty_strided", "aten.empty_like", "aten.new_empty",
            "aten.new_empty_strided", "aten.detach", "aten.alias", "aten.lift_fresh", "aten.set_",
            "aten._local_scalar_dense", "prim.device", "aten.sym_size", "aten.sym_stride", "aten.sym_numel",
            "aten.is_same_size", "aten.resize_"}
HOST_DATA_OPS = {"aten.lift_fresh", "aten.lift_fresh_copy"}
VARIANTS = ("eager", "fused", "fp8")
PASSES = ("uncached", "frame", "step", "text")


def _op_name(func) -> str:
    return str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)


class KernelCounter(TorchDispatchMode):
    """Counts kernel launches (see module docstring) per layer index; ``layer`` is set by hooks."""

    def __init__(self):
        super().__init__()
        self.layer: Optional[int] = None
        self.ops: Dict[Optional[int], collections.Counter] = collections.defaultdict(collections.Counter)
        self.host_copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = _op_name(func)
        if name in HOST_DATA_OPS:
            self.host_copies += 1
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if name not in VIEW_OPS and not getattr(func, "is_view", False):
            self.ops[self.layer][name] += 1
            self.launched(func, name, args, kwargs, out)
        return out

    def launched(self, func, name: str, args, kwargs, out) -> None:
        """Called once per counted kernel, after it ran; a subclass records more (``projection``: FLOPs, bytes)."""

    def in_layers(self) -> collections.Counter:
        total = collections.Counter()
        for layer, ops in self.ops.items():
            if layer is not None:
                total.update(ops)
        return total


@contextlib.contextmanager
def counting(model: WAMTransformer, counter: Optional[KernelCounter] = None):
    """``counter`` (a new KernelCounter by default) over ``model``'s blocks for the duration of the block."""
    counter = KernelCounter() if counter is None else counter
    handles = []
    for index, block in enumerate(model.blocks):
        def enter(module, inputs, index=index):
            counter.layer = index

        def leave(module, inputs, output):
            counter.layer = None

        handles += [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]
    try:
        with counter:
            yield counter
    finally:
        for handle in handles:
            handle.remove()


@dataclasses.dataclass
class PassCount:
    variant: str
    pass_name: str
    per_layer: float
    outside: int
    host_copies: int
    layer_ops: Dict[str, float]

    def row(self) -> dict:
        return dataclasses.asdict(self)


def count_pass(model: WAMTransformer, run: Callable[[], object], variant: str, pass_name: str) -> PassCount:
    """Run ``run()`` once (warm) then count one more run."""
    run()
    with counting(model) as counter:
        run()
    layers = model.config.num_layers
    in_layers = counter.in_layers()
    return PassCount(variant, pass_name, sum(in_layers.values()) / layers, sum(counter.ops[None].values()),
                     counter.host_copies, {op: n / layers for op, n in sorted(in_layers.items())})


def build_variant(config: WAMConfig, variant: str, dtype: torch.dtype, device, seed: int = 0) -> WAMTransformer:
    """The model of one variant (random weights)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    torch.manual_seed(seed)
    model = WAMTransformer(config).to(device=device, dtype=dtype).eval()
    if variant != "eager":
        fuse(model)
    if variant == "fp8":
        quantize_fp8(model)
    return model


def pass_runs(model: WAMTransformer, rows: int = 1, seed: int = 0):
    """Yields (pass name, run) for every pass of ``model`` in order (``PASSES``; the cached ones only for a
    mask="temporal" model); the setup a pass needs (the cache, its text, the step grid) is done before
    its run is yielded, and each run can be called again. Random inputs on the model's device; a
    mask="temporal" model with history frames in its config sees a full window."""
    c = model.config
    param = next(model.parameters())
    device, dtype = param.device, (param.dtype if param.is_floating_point() else torch.float32)
    dtype = next((p.dtype for p in model.parameters() if p.dtype in (torch.float32, torch.float16,
                                                                          torch.bfloat16)), dtype)
    g = torch.Generator("cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=g).to(device=device, dtype=dtype)

    video = randn(rows, c.noisy_frames, c.latent_channels, c.latent_height, c.latent_width)
    actions = randn(rows, c.action_len, c.action_dim)
    text = randn(rows, c.text_len, c.text_dim)
    image = randn(rows, 1, c.latent_channels, c.latent_height, c.latent_width)
    history = randn(rows, c.history_frames, c.latent_channels, c.latent_height, c.latent_width) \
        if c.mask == "temporal" and c.history_frames else None
    timestep = torch.full((rows,), 500.0, device=device)
    step_size = torch.full((rows,), 250.0, device=device) if c.distillation == "shortcut" else None
    extra = {} if step_size is None else {"step_size": step_size}
    yield "uncached", lambda: model(video, text, actions, timestep, image=image, history=history, **extra)
    if c.mask != "temporal":
        return
    cache = TemporalKVCache(model).setup(rows, c.history_frames)
    yield "text", lambda: cache.fill_text(text)
    cache.reset()
    cache.fill_text(text)
    yield "frame", lambda: cache.add_frame(image)
    # as WAMPolicy runs a step: on a fixed grid, with the AdaLN tables computed once (set_grid)
    cache.set_grid([500.0], None if step_size is None else 250.0)
    yield "step", lambda: cache.denoise_at(0, video, actions)


@torch.no_grad()
def count_model(model: WAMTransformer, variant: str, rows: int = 1, seed: int = 0) -> List[PassCount]:
    """``count_pass`` of every pass of ``model`` (``pass_runs``)."""
    return [count_pass(model, run, variant, name) for name, run in pass_runs(model, rows, seed)]


def count_all(config: WAMConfig, dtype: torch.dtype = torch.float32, device="cpu",
              variants=VARIANTS) -> List[PassCount]:
    """``count_model`` for each variant of ``config``."""
    rows = []
    for variant in variants:
        rows += count_model(build_variant(config, variant, dtype, device), variant)
    return rows


def format_counts(counts: List[PassCount]) -> str:
    """One line per (variant, pass): kernels per layer, outside the layers, host copies, and the ops."""
    width = max([9] + [len(c.pass_name) for c in counts])
    lines = [f"{'variant':8s} {'pass':{width}s} {'per layer':>9s} {'outside':>8s} {'host->dev':>9s}  ops per layer"]
    for c in counts:
        ops = ", ".join(f"{op.split('.', 1)[-1]} {n:g}" for op, n in sorted(c.layer_ops.items(), key=lambda x: -x[1]))
        lines.append(f"{c.variant:8s} {c.pass_name:{width}s} {c.per_layer:9g} {c.outside:8d} {c.host_copies:9d}  {ops}")
    return "\n".join(lines)


__all__ = ["HOST_DATA_OPS", "KernelCounter", "PASSES", "PassCount", "VARIANTS", "VIEW_OPS", "build_variant",
           "count_all", "count_model", "count_pass", "counting", "format_counts", "pass_runs"]
