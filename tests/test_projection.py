"""The roofline projection (``python -m wam_fast.bench --project``): W1 traced on the meta device (a few
seconds, no memory), its FLOPs against the analytic count, its response to each lever, and the CLI."""
import json

import pytest
import torch

from wam_fast import bench, configs
from wam_fast.bench import kernels as K
from wam_fast.bench import projection as P
from wam_fast.bench.ceilings import DEVICE_CEILINGS, PUBLISHED_CEILINGS

DEVICES = ("h100", "h200", "rtx4090")


@pytest.fixture(scope="module")
def w1():
    result = P.project("videovla-5b", DEVICES)
    return {r["name"]: r for r in result["rows"]}


def test_flops_match_the_analytic_count_within_1_percent(w1):
    kinds = set()
    for name, row in w1.items():
        assert row["flops"] == pytest.approx(row["analytic_flops"], rel=0.01), name
        kinds.add((row["model"].split(",")[0], row["cache"]))
    assert kinds == {("teacher", False), ("shortcut student", True), ("shortcut student", False),
                     ("action-only shortcut student", True)}


def test_action_only_student_runs_six_tokens_a_step_and_is_projected_faster(w1):
    """#26: the action-only student's cached step runs the 6 action tokens (774 with the future frames);
    its chunk is a frame pass plus S such steps, about a quarter of the FLOPs, and faster on every device."""
    for s in (4, 2, 1):
        for p in ("bf16", "fp8"):
            only, cached = w1[f"wam_fast-action-only-{s}step-{p}-cache"], w1[f"wam_fast-{s}step-{p}-cache"]
            assert (only["tokens_per_step"], cached["tokens_per_step"]) == (6, 774)
            assert only["passes"] == [["frame", 1], ["step", s]]
            assert only["tflop"] < cached["tflop"] / 3.5
            for device in DEVICES:
                assert ms(only, device) < ms(cached, device), (s, p, device)
    assert w1["paper-baseline"]["tokens_per_step"] is None  # uncached: the whole sequence every step


def test_chunk_structure(w1):
    assert w1["paper-baseline"]["passes"] == [["uncached", 10]] and w1["paper-baseline"]["rows"] == 2
    assert w1["wam_fast-4step-fp8-cache"]["passes"] == [["frame", 1], ["step", 4]]
    assert w1["wam_fast-2step-bf16-nocache"]["passes"] == [["uncached", 2]]
    assert w1["wam_fast-1step-bf16-cache"]["rows"] == 1
    # the released baseline is the paper's forward 50 times instead of 10
    assert w1["released-baseline"]["flops"] == 5 * w1["paper-baseline"]["flops"]


def ms(row, device="h100"):
    return row["projected"][device]["ms"]


def test_the_compiled_teacher_is_the_fused_teacher_from_graphs(w1):
    """paper-baseline-compiled: the same FLOPs as the eager teacher, fused kernels, CUDA-graph launches."""
    eager, compiled = w1["paper-baseline"], w1["paper-baseline-compiled"]
    assert compiled["flops"] == eager["flops"] and compiled["model"] == "teacher, fused"
    assert compiled["launch"] == "one CUDA graph per chunk" and eager["launch"] == "eager launches"
    for device in DEVICES:
        assert ms(compiled, device) < ms(eager, device)


@pytest.mark.parametrize("device", DEVICES)
def test_cache_on_is_faster_than_off(w1, device):
    for steps in (1, 2, 4):
        for dtype in ("bf16", "fp8"):
            on, off = (w1[f"wam_fast-{steps}step-{dtype}-{c}"] for c in ("cache", "nocache"))
            assert ms(on, device) < ms(off, device), (steps, dtype)


def test_fp8_is_faster_than_bf16_for_a_compute_bound_row(w1):
    bf16, fp8 = w1["wam_fast-4step-bf16-cache"], w1["wam_fast-4step-fp8-cache"]
    p = bf16["projected"]["h100"]
    assert p["compute_ms"] > 0.5 * p["ms"]  # compute-bound: the lever that FP8 pulls
    assert ms(fp8) < 0.8 * ms(bf16)
    assert fp8["projected"]["h100"]["dominant_op"] == "wam_fast.fp8_linear"
    assert bf16["projected"]["h100"]["dominant_op"] == "aten.addmm"


def test_fewer_steps_are_faster(w1):
    for dtype in ("bf16", "fp8"):
        for cache in ("cache", "nocache"):
            times = [ms(w1[f"wam_fast-{s}step-{dtype}-{cache}"]) for s in (1, 2, 4)]
            assert times == sorted(times) and len(set(times)) == 3, (dtype, cache, times)
    assert ms(w1["paper-baseline"]) < ms(w1["released-baseline"])


def test_fewer_kernels_per_layer_cost_less_launch_time_in_an_eager_row():
    """The same full-mask forward, eager reference vs fused ops, both launched eagerly."""
    cfg = configs.get("videovla-5b")
    traced = {v: P.trace_passes(P.meta_model(cfg, v), 2, ["uncached"])["uncached"] for v in ("eager", "fused")}
    projected = {v: P.project_ops(ops, DEVICE_CEILINGS["h100"], "eager") for v, ops in traced.items()}
    eager, fused = projected["eager"], projected["fused"]
    assert fused["kernels"] < eager["kernels"]
    assert fused["launch_ms"] < eager["launch_ms"] and fused["ms"] < eager["ms"]
    assert eager["launch_ms"] == pytest.approx(eager["kernels"] * P.EAGER_LAUNCH_US / 1e3, rel=1e-3)
    graph = P.project_ops(traced["fused"], DEVICE_CEILINGS["h100"], "graph")
    assert graph["launch_ms"] < fused["launch_ms"]


def test_eager_sdpa_is_one_flash_kernel_per_layer():
    cfg = configs.get("tiny")
    ops = P.trace_passes(P.meta_model(cfg, "eager"), 2, ["uncached"])["uncached"]
    by_op = P.aggregate(ops)
    assert by_op[P.SDPA_OP]["calls"] == cfg.num_layers
    assert not {"aten.bmm", "aten._safe_softmax", "aten._softmax"} & set(by_op)


def test_op_cost_of_a_gemm_and_of_a_broadcast():
    recorder = P.CostRecorder()
    with torch.device("meta"):
        a, b = torch.empty(300, 64, dtype=torch.bfloat16), torch.empty(64, 200, dtype=torch.bfloat16)
        row = torch.empty(1, 200, dtype=torch.bfloat16)
        with recorder:
            c = a @ b
            c + row.expand(300, 200)
    costs = {op.name: op for op in recorder.costs}
    assert costs["aten.mm"].flops == 2 * 300 * 200 * 64 and costs["aten.mm"].unit == "bf16"
    assert costs["aten.mm"].bytes == 2 * (300 * 64 + 64 * 200 + 300 * 200)
    assert costs["aten.add"].flops == 0 and costs["aten.add"].bytes == 2 * (300 * 200 + 200 + 300 * 200)


def test_roofline_picks_the_slower_bound():
    h100 = DEVICE_CEILINGS["h100"]
    big = P.OpCost("gemm", "bf16", 10**15, 10**6, (1, 12 * 128, 11 * 128, 8192))  # 132 tiles: one full wave
    stream = P.OpCost("add", None, 0, 10**9, (0, 0, 0, 0))
    assert P.op_seconds(big, h100) == (pytest.approx(10**15 / h100.rate("bf16")), "compute")
    assert P.op_seconds(stream, h100) == (pytest.approx(10**9 / (3350e9 * 0.8)), "memory")
    one_tile = P.OpCost("attention", "attention", 10**9, 0, (1, 100, 0, 0))
    assert P.wave_efficiency(one_tile, h100.sms) == pytest.approx(1 / 132)


def test_ceiling_table_is_sourced_and_matches_the_design_figures():
    for name, c in DEVICE_CEILINGS.items():
        assert ("datasheet" in c.source or "whitepaper" in c.source), name
        for fraction in (c.gemm_fraction, c.fp8_fraction, c.attention_fraction, c.bandwidth_fraction):
            assert 0 < fraction <= 1, name
        assert c.fp8_tflops > c.bf16_tflops
    for key, device in (("H100", "h100"), ("H200", "h200")):  # docs/design.md, Workloads plans with these
        assert DEVICE_CEILINGS[device].rate("bf16") / 1e12 == pytest.approx(PUBLISHED_CEILINGS[key]["bf16"], rel=0.05)
        assert DEVICE_CEILINGS[device].rate("fp8") / 1e12 == pytest.approx(PUBLISHED_CEILINGS[key]["fp8"], rel=0.05)


def test_kernel_counts_agree_with_the_counter():
    """The recorder is the kernel counter: the same launches per layer as ``bench --kernels``."""
    cfg = configs.get("tiny", mask="temporal")
    model = P.meta_model(cfg, "fused")
    ops = P.trace_passes(model, 1, ["step"])["step"]
    per_layer = {c.pass_name: c for c in K.count_model(model, "fused")}["step"]
    assert sum(ops.values()) == per_layer.per_layer * cfg.num_layers + per_layer.outside


def test_cli_project_prints_and_writes_json(tmp_path, capsys):
    path = tmp_path / "projection.json"
    result = bench.main(["--project", "h200,rtx4090", "--workload", "tiny", "--rows", "paper-baseline,*-1step-*",
                         "--json", str(path)])
    out = capsys.readouterr().out
    assert "PROJECTION ms/chunk" in out and "PROJECTION on h200" in out and "PROJECTION on rtx4090" in out
    written = json.loads(path.read_text())
    assert written["projection"] is True and written["label"].startswith("PROJECTION")
    assert [r["name"] for r in written["rows"]] == [r["name"] for r in result["rows"]]
    assert len(written["rows"]) == 7  # + the action-only 1-step students, bf16 and FP8
    for row in written["rows"]:
        assert set(row["projected"]) == {"h200", "rtx4090"}
    assert "wam_fast.attention" in written["passes"]["fp8 step rows=1"]


def test_cli_project_rejects_unknown_devices(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--project", "h100,a100"])
    assert "expected devices from h100,h200,rtx4090,l40s" in capsys.readouterr().err
