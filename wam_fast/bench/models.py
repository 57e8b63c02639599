"""What a bench row runs: the random-weight teacher built on the target device and dtype, its
shortcut student sharing the teacher's tensors, the inputs, and the compiled ``WAMPolicy`` of a compiled
row (a student, or a twin of the teacher)."""
from __future__ import annotations

import contextlib
import dataclasses

import torch

import wam_fast
from wam_fast.compiler import CompileConfig, compile, compile_report
from wam_fast.quant import fp8_layers, quantize_fp8
from wam_fast.bench.rows import DEFAULT_STEPS, Variant


def weight_twin(model: torch.nn.Module, **changes) -> torch.nn.Module:
    """A WAMTransformer with ``model``'s config (``changes`` applied) and the same parameter tensors (no copy)."""
    config = dataclasses.replace(model.config, **changes)
    with torch.device("meta"):
        twin = wam_fast.WAMTransformer(config)
    twin.load_state_dict(model.state_dict(), assign=True)
    return twin.eval().requires_grad_(False)


def temporal_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The mask="temporal" model with the same parameter tensors (no copy)."""
    return weight_twin(model, mask="temporal")


def shortcut_student(model: torch.nn.Module, steps=DEFAULT_STEPS, seed: int = 0,
                     future_frames=None) -> torch.nn.Module:
    """A shortcut student of ``model``'s backbone for latency: mask="temporal", distillation="shortcut",
    distilled_steps = sorted(steps), ``future_frames`` (0: action-only). It holds the teacher's parameter
    tensors (no copy: W1 would need 11 GB more) plus its own step-size embedding, drawn at random (its
    last linear is zero in a fresh student; values do not change latency, so it is drawn like any weight
    here)."""
    config = dataclasses.replace(model.config, mask="temporal", distillation="shortcut",
                                 distilled_steps=tuple(sorted(set(int(s) for s in steps))),
                                 future_frames=future_frames)
    with torch.device("meta"):
        student = wam_fast.WAMTransformer(config)
    result = student.load_state_dict(model.state_dict(), strict=False, assign=True)
    if result.unexpected_keys or any(not k.startswith("step_embed.") for k in result.missing_keys):
        raise RuntimeError(f"shortcut_student: the student's parameters should be the teacher's plus step_embed.*; "
                           f"missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    param = next(model.parameters())
    generator = torch.Generator("cpu").manual_seed(seed)
    for name in result.missing_keys:
        parent_name, _, attr = name.rpartition(".")
        parent = student.get_submodule(parent_name)
        meta = getattr(parent, attr)
        value = torch.randn(meta.shape, generator=generator) * 0.02 if meta.dim() > 1 else torch.zeros(meta.shape)
        setattr(parent, attr, torch.nn.Parameter(value.to(param.device, param.dtype), requires_grad=False))
    return student.eval().requires_grad_(False)


def quantize_fp8_in_place(model: torch.nn.Module) -> torch.nn.Module:
    """FP8 e4m3 backbone linears (default FP8Config: dynamic per-token activations)."""
    return quantize_fp8(model)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    # Scoped: parameters are created directly in `dtype`, and the global default is restored.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def count_parameters(cfg) -> int:
    """Parameter count from a meta-device build: no memory, no initialisation."""
    with torch.device("meta"):
        return sum(p.numel() for p in wam_fast.WAMTransformer(cfg).parameters())


def build_model(cfg, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    # Built on the target device in the target dtype: W1 in fp32 would be 22 GB before any cast.
    with torch.device(device), default_dtype(dtype):
        model = wam_fast.WAMTransformer(cfg)
    return model.eval().requires_grad_(False)


def make_inputs(cfg, batch: int, device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    generator = torch.Generator("cpu").manual_seed(seed)
    text = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=generator)
    image = torch.randn(batch, 1, cfg.latent_channels, cfg.latent_height, cfg.latent_width,
                        generator=generator)
    return {"text": text.to(device, dtype), "image": image.to(device, dtype)}


def compiled_policy(model: torch.nn.Module, variant: Variant, seed: int, backend: str):
    """The ``WAMPolicy`` a compiled row (``variant.compiled``) times, compiled by ``wam_fast.compile``
    (fused ops, FP8 or not, the KV cache or not, CUDA graphs where CUDA is: the policy's chunk graph
    with the cache, torch.compile's graphs of the forward without), and what was applied ({"levers", ...}).

    A student row: the first policy compiles ``model`` (the student) itself (torch.compile is per model,
    so rows of one precision share its compiled graphs); a later policy with another FP8 setting needs
    another student. A teacher row (paper-baseline-compiled) compiles a twin holding the teacher's
    tensors, so the teacher itself stays eager for the baseline rows and the students built from it."""
    if not variant.compiled:
        raise ValueError(f"{variant.name} is an eager row (wam_fast.sample); only compiled rows get a policy")
    if not variant.student:
        model = weight_twin(model)
    try:
        previous = compile_report(model)
    except ValueError:  # not compiled yet
        previous = None
    if previous is not None and previous.config.fp8 != variant.fp8:
        raise RuntimeError(f"{variant.name}: this student was compiled with fp8={previous.config.fp8}; "
                           f"build another shortcut_student for fp8={variant.fp8}")
    policy = wam_fast.WAMPolicy(model, steps=variant.steps, sampler=variant.sampler, cache=variant.cache,
                                history=0, seed=seed, cfg_scale=variant.cfg_scale, cfg_schedule=variant.cfg_schedule)
    compile(policy, CompileConfig(fused=True, fp8=variant.fp8, cache=variant.cache, backend=backend))
    model, report = policy.model, compile_report(policy)
    fused_modules = sum(type(m).__name__.startswith("Fused") for m in model.modules())
    # cached: the policy's own chunk graph; uncached: torch.compile's graphs of the model's forward (the
    # model's own report: a model compiled by an earlier row's policy is not in this policy's report)
    graph_report = report if policy.cache is not None else compile_report(model)
    cuda_graphs = any(where == "cuda_graphs" for where, _ in graph_report.applied)
    compiled = any(where == "torch.compile" for where, _ in compile_report(model).applied)
    levers = [name for name, on in (("fused", fused_modules > 0), ("fp8", bool(fp8_layers(model))),
                                    ("kv-cache", policy.cache is not None), ("torch.compile", compiled),
                                    ("cuda-graphs", cuda_graphs)) if on]
    return policy, {"compiled_with": "wam_fast.compile", "backend": backend, "levers": levers,
                    "cuda_graphs": cuda_graphs, "fused_modules": fused_modules, "fp8_layers": len(fp8_layers(model))}
