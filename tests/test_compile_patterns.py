"""Pattern fusion (#30 point 1): wam_fast.compile finds the AdaLN modulation, gated residual, GELU-linear and
attention expressions in models it has never seen (benchmarks/families.py: DiT/PixArt, GR00T with head_dim
48 and cross-attention, a causal GPT, ...) and runs wam_fast ops there; outputs stay those of eager."""
import copy
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import wam_fast
from wam_fast.bench.kernels import KernelCounter
from wam_fast.compiler import CompileConfig, compile_report, sites

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import families  # noqa: E402

EAGER = CompileConfig(backend="eager")

# family -> {op: sites replaced}; the PixArt cross-attention has fewer keys than queries (left alone)
EXPECTED = {
    "gr2": {"adaln_modulate": 4, "gated_residual": 4, "ffn_gelu": 2, "attention": 2},
    "gr00t": {"adaln_modulate": 4, "ffn_gelu": 4, "attention": 4},
    "gr1": {"ffn_gelu": 3, "attention": 3},
    "uva": {"adaln_modulate": 4, "gated_residual": 4},
    "unipi": {"adaln_modulate": 4, "ffn_gelu": 2},
}
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out if isinstance(out, tuple) else (out,)


def build(name, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model, inputs = getattr(families, name)()
    model = model.eval().to(dtype)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    return model, copy.deepcopy(model), inputs


def site_counts(report):
    counts = {}
    for _, what in report.applied:
        if what.endswith("(pattern site)"):
            op = what.split("wam_fast.ops.")[1].split(" ")[0]
            counts[op] = counts.get(op, 0) + 1
    return counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sites_are_found_and_match_eager(name, dtype):
    model, reference, inputs = build(name, dtype)
    keys = list(reference.state_dict())
    wam_fast.compile(model, EAGER, example_inputs=inputs)
    report = compile_report(model)
    assert site_counts(report) == EXPECTED[name], str(report)
    assert list(model.state_dict()) == keys
    fresh = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in inputs.items()}  # not the example
    with KernelCounter() as counter:
        got = outputs(model, fresh)
    for a, b in zip(got, outputs(reference, fresh)):
        assert rel(a, b) <= TOL[dtype]
    ran = {op.split(".")[1]: n for op, n in counter.ops[None].items() if op.startswith("wam_fast.")}
    for op, n in EXPECTED[name].items():  # each site runs its op once per call (MHA swaps add attention calls)
        assert ran.get(op, 0) >= n, (op, ran)


def test_blocks_keep_their_class_and_left_sites_say_why():
    model, _, inputs = build("gr2")
    wam_fast.compile(model, EAGER, example_inputs=inputs)
    assert isinstance(model.blocks[0], families.PixArtBlock)
    why = " ".join(compile_report(model).skipped_at("blocks.0.scaled_dot_product_attention_1"))
    assert "fewer keys (12) than queries (49)" in why


def test_no_graph_breaks_under_torch_compile():
    model, reference, inputs = build("gr00t")
    wam_fast.compile(model, EAGER, example_inputs=inputs)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**inputs)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert rel(compiled(**inputs), reference(**inputs)) <= TOL[torch.float32]


def test_training_mode_runs_the_original_forward():
    model, reference, inputs = build("gr1")
    wam_fast.compile(model, EAGER, example_inputs=inputs)
    model.train(), reference.train()
    before = sum(f["count"] for f in wam_fast.ops.fallbacks() if f["op"] == "pattern_fusion")
    with torch.no_grad():
        assert torch.equal(model(**inputs), reference(**inputs))
    assert sum(f["count"] for f in wam_fast.ops.fallbacks() if f["op"] == "pattern_fusion") == before + 3


def test_without_example_inputs_nothing_is_traced():
    model, _, _ = build("gr2")
    wam_fast.compile(model, EAGER)
    report = compile_report(model)
    assert not site_counts(report) and "needs example_inputs" in " ".join(report.skipped_at("patterns"))
    assert type(model.blocks[0]) is families.PixArtBlock


def test_untraceable_module_is_reported_and_its_children_are_tried():
    model, _, inputs = build("uva")
    wam_fast.compile(model, EAGER, example_inputs=inputs)
    report = compile_report(model)
    assert "torch.fx cannot trace it" in " ".join(report.skipped_at("video_head"))
    assert report.applied_to("video_head.res.0.in_ln")


def test_fp8_takes_the_gelu_linears_and_fused_linears_stay_high_precision():
    model, _, inputs = build("gr00t")
    wam_fast.compile(model, CompileConfig(backend="eager", fp8=True, min_fp8_sqnr_db=0.0), example_inputs=inputs)
    report = compile_report(model)
    assert "ffn_gelu" not in site_counts(report)
    assert "fp8=True" in " ".join(report.skipped_at("blocks.0.ff.0"))
    assert "FP8Linear" in " ".join(report.applied_to("blocks.0.ff.0"))


class PerTokenGate(nn.Module):
    """x + g * y with g (B, N, D): an ordinary product, not a gated residual."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        return x + self.a(x) * self.b(x)


def test_per_token_products_are_not_sites():
    torch.manual_seed(0)
    model = nn.Sequential(PerTokenGate()).eval()
    wam_fast.compile(model, EAGER, example_inputs=(torch.randn(2, 49, 32),))
    assert not site_counts(compile_report(model))
    assert type(model[0]) is PerTokenGate


# ---- the site functions against their expressions, fresh inputs, awkward shapes, each dtype ----------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,table", [((2, 49, 48), (2, 1, 48)), ((1, 774, 40), (1, 40)), ((3, 56), (3, 56)),
                                         ((2, 1256, 24), (24,))])
def test_adaln_and_gated_residual_sites(shape, table, dtype):
    torch.manual_seed(1)
    x, y = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    shift, scale, gate = (torch.randn(table, dtype=dtype) for _ in range(3))
    w, b = torch.randn(shape[-1], dtype=dtype), torch.randn(shape[-1], dtype=dtype)
    x32 = [t.float() for t in (x, y, shift, scale, gate, w, b)]
    want = F.layer_norm(x32[0], shape[-1:], x32[5], x32[6], 1e-6) * (1 + x32[3]) + x32[2]
    assert rel(sites.adaln_modulate_site(x, shift, scale, w, b, 1e-6), want) <= TOL[dtype]
    assert rel(sites.gated_residual_site(x, gate, y), x32[0] + x32[4] * x32[1]) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("nq,nk,hd,causal", [(49, 49, 48, True), (17, 61, 48, False), (49, 49, 80, False),
                                              (20, 20, 120, True)])
def test_attention_site(nq, nk, hd, causal, dtype):
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 2, nq, hd, dtype=dtype), torch.randn(2, 2, nk, hd, dtype=dtype), torch.randn(2, 2, nk, hd, dtype=dtype)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
    assert rel(sites.attention_site(q, k, v, causal), want) <= TOL[dtype]


def test_sites_fall_back_to_the_expression_and_say_so():
    torch.manual_seed(3)
    x, y, gate = torch.randn(2, 9, 16), torch.randn(2, 9, 16), torch.randn(2, 9, 16)  # per-token gate
    before = {(f["op"], tuple(f["skipped"])): f["count"] for f in wam_fast.ops.fallbacks()}
    assert torch.equal(sites.gated_residual_site(x, gate, y), x + gate * y)
    q = torch.randn(1, 2, 8, 20)  # head_dim 20: not a multiple of 8
    assert torch.allclose(sites.attention_site(q, q, q, False), F.scaled_dot_product_attention(q, q, q))
    after = {(f["op"], tuple(f["skipped"])): f["count"] for f in wam_fast.ops.fallbacks()}
    grown = {key for key, n in after.items() if n > before.get(key, 0)}
    assert {op for op, _ in grown} == {"gated_residual", "attention"}


def test_no_pattern_sites_where_no_kernel_runs(monkeypatch):
    """On a CPU without the Triton interpreter the ops would run their torch backend, opaque to torch.compile
    (measured slower than torch.compile alone): the lever stays off and says why."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model, _, inputs = build("unipi")
    wam_fast.compile(model, EAGER, example_inputs=inputs)
    report = compile_report(model)
    assert not site_counts(report) and "no wam_fast kernel runs on cpu" in " ".join(report.skipped_at("patterns"))
    assert "no wam_fast kernel runs on cpu" in " ".join(report.skipped_at("blocks.0.attn"))  # the MHA swap too
    assert type(model.blocks[0].attn) is nn.MultiheadAttention
