"""wam_fast.compile: compiled vs eager for WAMTransformer, WAMPolicy (cache on/off, students) and small
models written here (a DiT block on nn.MultiheadAttention, an AdaLN of its own, a video-predictor +
inverse-dynamics pipeline); the report; the per-lever accuracy check and revert; scoped torch.compile
settings; optional packages. The WAMPolicy chunk graphs: tests/test_chunk_graphs.py. Tolerances: the table in wam_fast/compiler/__init__.py.

Only one test runs a real inductor compile (test_inductor_compile_keeps_user_config, ~30 s on CPU);
the rest use backend="eager" (the other levers, no torch.compile)."""
import copy
import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import wam_fast
from wam_fast import compiler
from wam_fast.compiler import CompileConfig, compile_report
from wam_fast.models import fused
from wam_fast.quant import FP8Linear, fp8_layers, sqnr_db
from wam_fast.utils import optional
from model_inputs import episode, random_inputs

EAGER = CompileConfig(backend="eager")
REL = compiler.REL_TOLERANCE[torch.float32]
GPU = torch.cuda.is_available()
attention_module = wam_fast.ops.op_module("attention")


# Tests that run the fused ops' Triton kernels (interpreted on CPU, slow); every other test runs them
# through their torch backend: what is under test here is the levers, not the kernels (tests/test_<op>.py).
TRITON_TESTS = {"test_wam_transformer_fused_fp8_matches_eager[full]"}


@pytest.fixture(autouse=True)
def _torch_ops(request):
    if request.node.name in TRITON_TESTS or GPU:
        yield
        return
    with wam_fast.ops.use_backend("torch"):
        yield


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def wam(seed=0, **overrides):
    torch.manual_seed(seed)
    return wam_fast.WAMTransformer(wam_fast.configs.get("tiny", **overrides)).eval()


def temporal(**overrides):
    return wam(mask="temporal", history_frames=2, **overrides)


# ---- small models of the user's own (generic path) -------------------------------------------------------
class AdaLN(nn.Module):
    """An AdaLN of its own: LayerNorm(x) * (1 + scale(c)) + shift(c)."""

    def __init__(self, dim, cond):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.proj = nn.Linear(cond, 2 * dim)

    def forward(self, x, c):
        shift, scale = self.proj(F.silu(c)).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, dim, heads, cond, batch_first=True, need_weights=False):
        super().__init__()
        self.batch_first, self.need_weights = batch_first, need_weights
        self.adaln1, self.adaln2 = AdaLN(dim, cond), AdaLN(dim, cond)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, x, c):
        h = self.adaln1(x, c)
        if not self.batch_first:
            h = h.transpose(0, 1)
        a = self.attn(h, h, h, need_weights=self.need_weights)[0]
        if not self.batch_first:
            a = a.transpose(0, 1)
        x = x + a
        return x + self.mlp(self.adaln2(x, c))


class VideoPredictor(nn.Module):
    def __init__(self, dim=64, cond=32, frame=48, batch_first=(True, False), need_weights=False):
        super().__init__()
        self.embed, self.cond, self.head = nn.Linear(frame, dim), nn.Linear(8, cond), nn.Linear(dim, frame)
        self.blocks = nn.ModuleList(DiTBlock(dim, 4, cond, bf, need_weights) for bf in batch_first)

    def forward(self, frames, task):
        c, h = self.cond(task), self.embed(frames)
        for block in self.blocks:
            h = block(h, c)
        return self.head(h)


class InverseDynamics(nn.Module):
    def __init__(self, frame=48, dim=64, actions=7):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * frame, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(),
                                 nn.Linear(dim, actions))

    def forward(self, now, future):
        return self.net(torch.cat((now, future), dim=-1))


class Pipeline(nn.Module):
    """Video predictor, then inverse dynamics on (now, predicted future): two submodules in sequence."""

    def __init__(self, **kwargs):
        super().__init__()
        self.video_predictor, self.inverse_dynamics = VideoPredictor(**kwargs), InverseDynamics()

    def forward(self, frames, task):
        future = self.video_predictor(frames, task)
        return future, self.inverse_dynamics(frames, future)

    def predict(self, frames, task):
        return self.forward(frames, task)[1].clamp(-1, 1)


def pipeline(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = Pipeline(**kwargs).eval()
    return model, copy.deepcopy(model), (torch.randn(2, 10, 48), torch.randn(2, 8))


# ---- config ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(backend="xla"), ValueError, r"backend must be one of \('inductor', 'eager', 'tensorrt'\), got 'xla'"),
    (dict(compile_mode="fast"), ValueError, "compile_mode must be one of"),
    (dict(compile_mode="default", compile_options={"max_autotune": True}), ValueError, "not both"),
    (dict(attention="sdpa"), ValueError, r"attention must be one of \('auto', 'flash-attn', 'xformers'\)"),
    (dict(fp8_config=wam_fast.FP8Config()), ValueError, "fp8_config given but fp8=False"),
    (dict(fp8=True, fp8_config="dynamic"), TypeError, "fp8_config must be a wam_fast.FP8Config"),
    (dict(cuda_graphs="yes"), TypeError, "cuda_graphs must be None, True or False"),
    (dict(fused=1), TypeError, "fused must be True or False"),
    (dict(min_fp8_sqnr_db=math.nan), ValueError, "min_fp8_sqnr_db must be a finite number"),
])
def test_bad_config(kwargs, error, match):
    with pytest.raises(error, match=match):
        CompileConfig(**kwargs)


def test_bad_targets():
    with pytest.raises(TypeError, match="expects an nn.Module or a wam_fast.WAMPolicy, got str"):
        wam_fast.compile("model")
    with pytest.raises(TypeError, match="expects a CompileConfig, got dict"):
        wam_fast.compile(nn.Linear(16, 16), {"fp8": True})
    model = wam_fast.compile(nn.Sequential(nn.Linear(16, 16)), EAGER)
    with pytest.raises(ValueError, match="already compiled by wam_fast.compile"):
        wam_fast.compile(model, EAGER)
    with pytest.raises(ValueError, match="was not compiled by wam_fast.compile"):
        compile_report(nn.Linear(4, 4))


def test_cuda_graphs_true_without_cuda_is_an_error():
    if GPU:
        pytest.skip("needs a machine without CUDA")
    model = wam()
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device, but the model is on cpu"):
        wam_fast.compile(model, CompileConfig(backend="eager", cuda_graphs=True))
    assert type(model.blocks[0].attn) is wam_fast.models.transformer.Attention  # refused before any change
    policy = wam_fast.WAMPolicy(temporal(), steps=2, sampler="ddim", cfg_scale=1.0)
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        wam_fast.compile(policy, CompileConfig(backend="eager", cuda_graphs=True))
    assert type(policy) is wam_fast.WAMPolicy


# ---- WAMTransformer ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["full", "temporal"])
def test_wam_transformer_fused_fp8_matches_eager(case):
    model = wam() if case == "full" else temporal()
    reference = copy.deepcopy(model)
    inputs = random_inputs(model, batch=2, **({} if case == "full" else {"num_history": 2}))
    out = wam_fast.compile(model, CompileConfig(backend="eager", fp8=True), example_inputs=inputs)
    assert out is model and type(model) is wam_fast.WAMTransformer
    with torch.no_grad():
        got, want = model(**inputs), reference(**inputs)
    for g, w in zip(got, want):
        assert sqnr_db(w, g) >= 20.0  # the fp8 row of the tolerance table
    report = model.report()
    assert report is compile_report(model) and "applied:" in str(report)
    layers = model.config.num_layers
    assert len(report.applied_to("blocks.0.attn")) == 1 and "FusedAttention" in report.applied_to("blocks.0.attn")[0]
    assert sorted(fp8_layers(model)) == sorted(f"blocks.{i}.{n}" for i in range(layers)
                                              for n in ("attn.qkv", "attn.out", "ff.proj_in", "ff.proj_out"))
    assert "AdaLN projection" in report.skipped_at("blocks.0.adaln")[0]
    assert "embedding" in report.skipped_at("text_proj")[0]
    assert "output head" in report.skipped_at("action_proj")[0]
    assert "applies to WAMPolicy" in report.skipped_at("cache")[0]
    assert "backend='eager'" in report.skipped_at("torch.compile")[0]
    assert [c["lever"] for c in report.checks] == ["fused", "fp8"] and all(c["ok"] for c in report.checks)
    # its other methods still work: the KV cache drives the model's pieces (layout, run_blocks, predict)
    if case == "temporal":
        policy = wam_fast.WAMPolicy(model, steps=2, sampler="ddim", cfg_scale=1.0, seed=0)
        text, frames = episode(model)
        policy.reset(text)
        assert policy.act(frames[0]).actions.shape == model.action_shape(1)


def test_wam_transformer_fused_matches_eager_fp32_tolerance():
    model = temporal()
    reference = copy.deepcopy(model)
    inputs = random_inputs(model, batch=2, num_history=1)
    wam_fast.compile(model, EAGER)
    with torch.no_grad():
        for g, w in zip(model(**inputs), reference(**inputs)):
            assert rel_err(g, w) <= REL
    assert not fp8_layers(model) and model.report().skipped_at("fp8") == ["fp8=False"]
    if not GPU:
        assert "no CUDA device" in model.report().skipped_at("cuda_graphs")[0]
    assert "no example_inputs given" in model.report().skipped_at("accuracy check")[0]


def test_filter_fn_restricts_levers():
    model = wam()
    wam_fast.compile(model, CompileConfig(backend="eager", fp8=True),
                     filter_fn=lambda module, name: name.startswith("blocks.0"))
    assert type(model.blocks[0].attn) is not wam_fast.models.transformer.Attention
    assert type(model.blocks[1].attn) is wam_fast.models.transformer.Attention
    assert set(fp8_layers(model)) == {"blocks.0.attn.qkv", "blocks.0.attn.out", "blocks.0.ff.proj_in",
                                      "blocks.0.ff.proj_out"}
    report = model.report()
    assert report.skipped_at("blocks.1.attn.qkv") == ["kept in high precision: excluded by filter_fn"]
    assert "excluded by filter_fn" in report.skipped_at("blocks.1.attn")[0]


def test_external_attention_falls_back_per_call(monkeypatch):
    """attention="flash-attn" on a machine where the package 'is' there: calls it cannot take (CPU,
    fp32; segment masks always) run wam_fast's kernel, and the fallback is noted."""
    monkeypatch.setattr(attention_module, "external_reason", lambda name: None)
    model = temporal()
    reference = copy.deepcopy(model)
    inputs = random_inputs(model, batch=1, num_history=1)
    wam_fast.compile(model, CompileConfig(backend="eager", attention="flash-attn"))
    assert type(model.blocks[0].attn).__name__ == "ExternalAttention"
    with torch.no_grad():
        for g, w in zip(model(**inputs), reference(**inputs)):
            assert rel_err(g, w) <= REL
    assert any(f["op"] == "attention" and "flash-attn: needs CUDA tensors" in " ".join(f["skipped"])
               for f in wam_fast.ops.fallbacks())


# ---- WAMPolicy -------------------------------------------------------------------------------------------
POLICIES = {
    "teacher-cached": (dict(), dict(sampler="ddim", steps=2, cfg_scale=3.0), True),
    "teacher-uncached": (dict(), dict(sampler="ddim", steps=2, cfg_scale=3.0), False),
    "shortcut-cached": (dict(distillation="shortcut", distilled_steps=(1, 2)), dict(steps=2), True),
    "consistency-uncached": (dict(distillation="consistency", distilled_steps=(2,)), dict(), False),
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_compiled_matches_eager(name):
    overrides, options, cache = POLICIES[name]
    model = temporal(**overrides)
    if overrides.get("distillation") == "shortcut":
        with torch.no_grad():  # a trained-looking step embedding (zero-initialised when fresh)
            model.step_embed.linear_2.weight.normal_(0, 0.1)
    eager = wam_fast.WAMPolicy(model, cache=cache, seed=0, **options)
    policy = wam_fast.WAMPolicy(copy.deepcopy(model), cache=cache, seed=0, **options)
    assert wam_fast.compile(policy, CompileConfig(backend="eager", cache=cache)) is policy
    assert isinstance(policy, wam_fast.WAMPolicy)
    text, frames = episode(model, batch=2)
    eager.reset(text)
    policy.reset(text)
    for frame in frames:
        a, b = eager.act(frame), policy.act(frame)
        assert rel_err(b.actions, a.actions) <= REL and rel_err(b.video, a.video) <= REL
        assert (a.nfe, a.steps, a.sampler) == (b.nfe, b.steps, b.sampler)
    report = policy.report()
    assert report is compile_report(policy)
    assert "FusedAttention" in report.applied_to("model.blocks.0.attn")[0]
    assert bool(report.applied_to("cache")) == cache
    if not GPU:
        assert "no CUDA device" in report.skipped_at("cuda_graphs")[0]
    assert compile_report(policy.model).target == "WAMTransformer"


def test_policy_fp8_chunks_close_to_eager():
    model = temporal()
    eager = wam_fast.WAMPolicy(model, steps=2, sampler="ddim", cfg_scale=1.0, seed=0)
    policy = wam_fast.compile(wam_fast.WAMPolicy(copy.deepcopy(model), steps=2, sampler="ddim", cfg_scale=1.0, seed=0),
                              CompileConfig(backend="eager", fp8=True))
    text, frames = episode(model, batch=2)
    eager.reset(text)
    policy.reset(text)
    for frame in frames:
        assert sqnr_db(eager.act(frame).actions, policy.act(frame).actions) >= 20.0
    assert "FP8Linear" in policy.report().applied_to("model.blocks.0.attn.qkv")[0]


EAGER_POLICY_SKIPS = {"cached steps: torch.compile"}  # backend="eager" compiles nothing


def test_policy_cache_lever():
    model = temporal()
    policy = wam_fast.compile(wam_fast.WAMPolicy(model, steps=2, sampler="ddim", cfg_scale=1.0),
                              CompileConfig(backend="eager", cache=False))
    assert policy.cache is None and "turned off" in policy.report().applied_to("cache")[0]
    policy = wam_fast.compile(wam_fast.WAMPolicy(temporal(), steps=2, sampler="ddim", cfg_scale=1.0, cache=False),
                              EAGER)
    assert policy.cache is not None and "turned on" in policy.report().applied_to("cache")[0]
    full = wam_fast.compile(wam_fast.WAMPolicy(wam(), steps=2, sampler="ddim", cfg_scale=1.0, cache=False), EAGER)
    assert full.cache is None and "needs a model with mask='temporal'" in full.report().skipped_at("cache")[0]
    # inductor compiles model.forward; the report must not claim it for the cached steps (no call: no compile)
    inductor = wam_fast.compile(wam_fast.WAMPolicy(temporal(), steps=2, sampler="ddim", cfg_scale=1.0),
                                CompileConfig(backend="inductor"))
    assert "does not reach the cached frame pass and denoising steps" in \
        inductor.report().skipped_at("cached steps: torch.compile")[0]
    assert not EAGER_POLICY_SKIPS.intersection(w for w, _ in policy.report().skipped)
    started = wam_fast.WAMPolicy(temporal(), steps=2, sampler="ddim", cfg_scale=1.0)
    started.reset(episode(started.model)[0])
    with pytest.raises(ValueError, match=r"compile the WAMPolicy before reset\(text\)"):
        wam_fast.compile(started, CompileConfig(backend="eager", cache=False))


# ---- any nn.Module ----------------------------------------------------------------------------------------
def test_generic_pipeline_fp8_report_and_predict():
    model, reference, inputs = pipeline()
    assert wam_fast.compile(model, CompileConfig(backend="eager", fp8=True), example_inputs=inputs) is model
    with torch.no_grad():
        for g, w in zip(model(*inputs), reference(*inputs)):
            assert sqnr_db(w, g) >= 20.0
        assert sqnr_db(reference.predict(*inputs), model.predict(*inputs)) >= 20.0  # other methods still work
    report = compile_report(model)
    assert not hasattr(model, "report")  # a user's module keeps its own attributes: compile_report(model)
    for i in (0, 1):  # batch_first True and False
        block = f"video_predictor.blocks.{i}"
        assert type(model.get_submodule(f"{block}.attn")) is compiler.MultiheadAttention
        assert "wam_fast.ops.attention" in report.applied_to(f"{block}.attn")[0]
        assert "wam_fast.ops.adaln_modulate" in report.applied_to(f"{block}.adaln1.norm")[0]  # pattern site
        assert "per-sample projection" in report.skipped_at(f"{block}.adaln1.proj")[0]
        assert "nn.Linear subclass" in report.skipped_at(f"{block}.attn.out_proj")[0]
        assert isinstance(model.get_submodule(f"{block}.mlp.0"), FP8Linear)
    assert "not multiples of 16" in report.skipped_at("inverse_dynamics.net.4")[0]
    assert isinstance(model.inverse_dynamics.net[0], FP8Linear)
    assert "applies to wam_fast.WAMPolicy" in report.skipped_at("cache")[0]
    assert [c["lever"] for c in report.checks] == ["patterns", "attention", "fp8"]
    text = str(report)
    assert "video_predictor.blocks.*.attn (x2)" in text and "left alone:" in text and "accuracy checks" in text


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_swap_is_exact_and_falls_back(batch_first):
    torch.manual_seed(0)
    original = nn.MultiheadAttention(64, 4, batch_first=batch_first).eval()
    swapped = compiler.retype(copy.deepcopy(original), compiler.MultiheadAttention)
    x = torch.randn(2, 10, 64) if batch_first else torch.randn(10, 2, 64)
    memory = torch.randn(2, 12, 64) if batch_first else torch.randn(12, 2, 64)
    with torch.no_grad():
        for q, kv in ((x, x), (x, memory)):  # self-attention (one GEMM) and cross-attention
            want = original(q, kv, kv, need_weights=False)[0]
            got, weights = swapped(q, kv, kv, need_weights=False)
            assert weights is None and rel_err(got, want) <= REL
        before = sum(f["count"] for f in wam_fast.ops.fallbacks() if "original" in f["backend"])
        got, weights = swapped(x, x, x)  # need_weights=True (the default): the original runs
        want, want_weights = original(x, x, x)
        assert torch.equal(got, want) and torch.equal(weights, want_weights)
        mask = torch.ones(10, 10, dtype=torch.bool).triu(1)
        assert torch.equal(swapped(x, x, x, attn_mask=mask, need_weights=False)[0],
                           original(x, x, x, attn_mask=mask, need_weights=False)[0])
    notes = [f for f in wam_fast.ops.fallbacks() if "original" in f["backend"]]
    assert sum(f["count"] for f in notes) == before + 2
    assert any("need_weights=True" in " ".join(f["skipped"]) for f in notes)


class Heads48(nn.Module):
    """A GR00T-style attention: 2 heads of 48 (not a power of two)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(96, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_head_dim_48_attention_is_swapped():
    torch.manual_seed(0)
    model = Heads48().eval()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 49, 96)
    wam_fast.compile(model, EAGER, example_inputs=(x,))
    assert type(model.attn) is compiler.MultiheadAttention
    assert compile_report(model).applied_to("attn") and not compile_report(model).skipped_at("attn")
    with torch.no_grad():
        assert rel_err(model(x), reference(x)) <= REL


def test_fallback_bookkeeping_never_recompiles():
    """The fallback counter (ops.registry) must not become a dynamo guard: 20 compiled calls that fall back
    (need_weights=True, then an attn_mask) compile each variant once and are all counted."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    swapped = compiler.retype(nn.MultiheadAttention(64, 4, batch_first=True).eval(), compiler.MultiheadAttention)
    mask = torch.ones(10, 10, dtype=torch.bool).triu(1)
    weights = torch.compile(lambda x: swapped(x, x, x)[0], backend="eager")
    masked = torch.compile(lambda x: swapped(x, x, x, attn_mask=mask, need_weights=False)[0], backend="eager")
    before = sum(f["count"] for f in wam_fast.ops.fallbacks() if "original" in f["backend"])
    graphs = []
    with torch.no_grad():
        for i in range(20):
            (weights if i % 2 else masked)(torch.randn(2, 10, 64))
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[-1] == graphs[1], graphs  # compiled on the first call of each, never again
    assert sum(f["count"] for f in wam_fast.ops.fallbacks() if "original" in f["backend"]) == before + 20


@pytest.mark.parametrize("with_examples", [True, False])
def test_attention_bypassed_by_a_fast_path_is_not_reported_as_applied(with_examples):
    """nn.TransformerEncoderLayer in eval mode runs its fused fast path and never calls its self_attn: the
    swap is put back (probed on example inputs) or not made (without them), and the report says why."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True), Heads48()).eval()
    model[1] = Heads48()
    model[1].attn = nn.MultiheadAttention(64, 2, batch_first=True)  # head_dim 32; called by its own forward
    x = torch.randn(2, 12, 64)
    wam_fast.compile(model, EAGER, example_inputs=(x,) if with_examples else None)
    report = compile_report(model)
    assert type(model[0].self_attn) is nn.MultiheadAttention and not report.applied_to("0.self_attn")
    why = " ".join(report.skipped_at("0.self_attn"))
    assert ("bypassed, put back" in why and "TransformerEncoderLayer" in why) if with_examples else "fast path" in why
    assert type(model[1].attn) is compiler.MultiheadAttention and report.applied_to("1.attn")


class ReadsWeight(nn.Module):
    """Code that reads linear.weight directly (an FP8 weight would break it at run time)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 64)

    def forward(self, x):
        return F.linear(x, self.proj.weight * 0.5, self.proj.bias)


def test_generic_fp8_without_example_inputs_is_refused(caplog):
    model = ReadsWeight().eval()
    reference = copy.deepcopy(model)
    x = torch.randn(3, 64)
    want = model(x)
    with caplog.at_level("WARNING"):
        wam_fast.compile(model, CompileConfig(backend="eager", fp8=True))
    assert not fp8_layers(model) and "example_inputs" in " ".join(compile_report(model).skipped_at("fp8"))
    assert any("FP8 not applied" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(model(x), want)  # runs, unchanged
    model = copy.deepcopy(reference)
    wam_fast.compile(model, CompileConfig(backend="eager", fp8=True), example_inputs=(x,))  # checked: reverted
    assert not fp8_layers(model) and "reverted" in " ".join(compile_report(model).skipped_at("fp8"))
    torch.testing.assert_close(model(x), want)


def test_runtime_fallbacks_are_reported():
    model, reference, inputs = pipeline(need_weights=True)
    wam_fast.compile(model, EAGER, example_inputs=inputs)
    assert any("need_weights=True" in why for why in compile_report(model).skipped_at("attention"))
    with torch.no_grad():
        for g, w in zip(model(*inputs), reference(*inputs)):
            assert torch.equal(g, w)  # every call fell back: the original forward ran


def test_lever_that_changes_outputs_is_reverted(monkeypatch):
    """Never breaks a model: a lever whose output leaves the tolerance is undone and reported."""
    model, reference, inputs = pipeline()
    monkeypatch.setattr(compiler.session, "attention_fn", lambda backend: lambda q, k, v: v)  # a wrong kernel
    wam_fast.compile(model, CompileConfig(backend="eager", fp8=True, min_fp8_sqnr_db=80.0), example_inputs=inputs)
    report = compile_report(model)
    assert type(model.video_predictor.blocks[0].attn) is nn.MultiheadAttention
    assert not fp8_layers(model)
    assert "reverted: output 0: relative error" in report.skipped_at("attention")[0]
    assert "reverted: output 0: SQNR" in report.skipped_at("fp8")[0] and "< 80 dB" in report.skipped_at("fp8")[0]
    assert not report.applied_to("video_predictor.blocks.0.attn") and not report.skipped_at("inverse_dynamics.net.4")
    assert [(c["lever"], c["ok"]) for c in report.checks] == [("patterns", True), ("attention", False), ("fp8", False)]
    with torch.no_grad():
        for g, w in zip(model(*inputs), reference(*inputs)):
            assert rel_err(g, w) <= REL  # only the pattern sites (checked) remain


def test_fp8_revert_restores_retyped_parents():
    """quantize_fp8 swaps ff.proj_in and then retypes ff: undo restores both (parents first)."""
    model = wam()
    reference = copy.deepcopy(model)
    inputs = random_inputs(model, batch=1)
    wam_fast.compile(model, CompileConfig(backend="eager", fp8=True, min_fp8_sqnr_db=200.0), example_inputs=inputs)
    assert not fp8_layers(model) and type(model.blocks[0].ff) is fused.FusedFeedForward
    assert type(model.blocks[0].ff.proj_in) is nn.Linear
    with torch.no_grad():
        for g, w in zip(model(**inputs), reference(**inputs)):
            assert rel_err(g, w) <= REL


def test_inductor_compile_keeps_user_config():
    """The one real inductor compile of the suite: a DiT-like model, settings scoped to it (the user's
    torch._inductor / torch._dynamo config is the same after compile and after calls)."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    before = (inductor_config.get_config_copy(), dynamo_config.get_config_copy())
    model, reference, inputs = pipeline(batch_first=(True,))
    wam_fast.compile(model, CompileConfig(compile_options={"epilogue_fusion": False}), example_inputs=inputs)
    report = compile_report(model)
    assert "backend='inductor'" in report.applied_to("torch.compile")[0]
    assert "options={'epilogue_fusion': False}" in report.applied_to("torch.compile")[0]
    assert report.checks[-1]["lever"] == "torch.compile" and report.checks[-1]["ok"]
    with torch.no_grad():
        for g, w in zip(model(*inputs), reference(*inputs)):
            assert rel_err(g, w) <= REL
        assert torch.equal(model.predict(*inputs), model.predict(*inputs))
    assert (inductor_config.get_config_copy(), dynamo_config.get_config_copy()) == before
    assert model._compiled_call_impl is not None


def test_compile_mode_conflicts():
    device = torch.device("cuda")
    with pytest.raises(ValueError, match="excludes CUDA graphs"):
        compiler.compile_kwargs(CompileConfig(cuda_graphs=True, compile_mode="default"), device)
    with pytest.raises(ValueError, match="captures CUDA graphs"):
        compiler.compile_kwargs(CompileConfig(cuda_graphs=False, compile_mode="reduce-overhead"), device)
    with pytest.raises(ValueError, match="inside the WAMPolicy's own loop graph"):
        compiler.compile_kwargs(CompileConfig(compile_mode="reduce-overhead"), device, "policy")
    with pytest.raises(ValueError, match="backend='eager' runs without torch.compile"):
        compiler.compile_kwargs(CompileConfig(backend="eager", cuda_graphs=True), device)
    kwargs, note = compiler.compile_kwargs(CompileConfig(), device)
    assert kwargs["mode"] == "reduce-overhead" and note[0]
    kwargs, note = compiler.compile_kwargs(CompileConfig(compile_options={"max_autotune": True}), device)
    assert kwargs["options"] == {"max_autotune": True, "triton.cudagraphs": True} and "mode" not in kwargs
    kwargs, note = compiler.compile_kwargs(CompileConfig(), torch.device("cpu"))
    assert "mode" not in kwargs and not note[0] and "no CUDA device" in note[1]


# ---- optional packages ------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention,package,install", [
    ("flash-attn", "flash-attn", "pip install flash-attn"),
    ("xformers", "xformers", "pip install xformers"),
])
def test_missing_attention_package_is_named(monkeypatch, attention, package, install):
    real = optional.installed
    monkeypatch.setattr(optional, "installed", lambda module: module not in ("flash_attn", "xformers") and real(module))
    model = wam()
    with pytest.raises(RuntimeError, match=f"{package} is not installed .*{install}"):
        wam_fast.compile(model, CompileConfig(backend="eager", attention=attention))
    assert type(model.blocks[0].attn) is wam_fast.models.transformer.Attention
    # the op-level router says the same and runs wam_fast's kernel
    q = torch.randn(1, 2, 8, 16)
    assert torch.equal(attention_module.attention_with(attention, q, q, q), wam_fast.ops.attention(q, q, q))


def test_missing_tensorrt_is_named(monkeypatch):
    real = optional.installed
    monkeypatch.setattr(optional, "installed", lambda module: module != "torch_tensorrt" and real(module))
    with pytest.raises(RuntimeError, match=r"needs torch-tensorrt, which is not installed: pip install torch-tensorrt"):
        wam_fast.compile(nn.Sequential(nn.Linear(16, 16)), CompileConfig(backend="tensorrt"))
    rows = {r["name"]: r for r in compiler.capabilities()}
    assert rows["backend tensorrt"]["status"] == "missing"


def test_info_lists_compile_backends():
    from wam_fast import info

    sections = {s["title"]: s["rows"] for s in info.report()}
    rows = {r["name"]: r for r in next(v for k, v in sections.items() if k.startswith("compile"))}
    assert {"backend inductor", "backend eager", "backend tensorrt", "attention flash-attn", "attention xformers",
            "cuda graphs"} <= set(rows)
    for name in ("attention flash-attn", "attention xformers"):
        assert rows[name]["status"] == "available" or "pip install" in rows[name]["detail"] \
            or "CUDA" in rows[name]["detail"]


def test_import_stays_lean():
    """import wam_fast (and the compiler, and compiling a plain module) imports no optional package."""
    code = ("import sys, torch, wam_fast, wam_fast.compiler\n"
            "wam_fast.compile(torch.nn.Sequential(torch.nn.Linear(16, 16)), wam_fast.CompileConfig(backend='eager'))\n"
            "bad = [m for m in ('diffusers', 'flash_attn', 'xformers', 'torch_tensorrt') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

