"""The chunk graphs of a cached WAMPolicy (wam_fast.compiler.graphs, docs/design.md, Launch budget): one
graph per KV-cache ring slot holding the whole chunk. On the CPU through EagerCapture (the same runner,
replay = re-run on the static buffers); on a GPU through real CUDA graphs."""
import copy

import pytest
import torch

import wam_fast
from wam_fast.compiler import CompileConfig, graphs
from model_inputs import episode

EAGER = CompileConfig(backend="eager")
GPU = torch.cuda.is_available()


def temporal(**overrides):
    torch.manual_seed(0)
    config = wam_fast.configs.get("tiny", mask="temporal", history_frames=2, **overrides)
    return wam_fast.WAMTransformer(config).eval()


# ---- the chunk graph runner on the CPU (EagerCapture) ----------------------------------------------------------
RUNNER_CASES = {
    "ddim-cfg": (dict(), dict(sampler="ddim", steps=2, cfg_scale=3.0)),
    "shortcut": (dict(distillation="shortcut", distilled_steps=(1, 2)), dict(steps=2)),
    "consistency": (dict(distillation="consistency", distilled_steps=(1, 2)), dict(steps=2)),
    "sde-cfg-robots": (dict(num_robots=3), dict(sampler="dpm++2m-sde", steps=3, cfg_scale=3.0)),
}


@pytest.mark.parametrize("name", sorted(RUNNER_CASES))
def test_graph_runner_equals_eager(name):
    """One graph per ring slot holds the whole chunk (frame pass, steps, sampler draws); chunk for chunk
    equal to the eager policy (same kernels, so bit for bit), through the warm-up of the ring and past it;
    re-captured on a batch change. The policy object keeps its class."""
    overrides, options = RUNNER_CASES[name]
    model = temporal(**overrides)
    eager = wam_fast.WAMPolicy(model, seed=0, **options)
    fast = wam_fast.WAMPolicy(model, seed=0, **options)
    runner = graphs.attach(fast, graphs.EagerCapture)
    assert type(fast) is wam_fast.WAMPolicy and fast.graphs is runner
    slots = fast.history + 1
    for batch in (1, 2, 2):
        text, frames = episode(model, batch=batch, steps=slots + 2, seed=batch)
        robot = torch.arange(batch) % 3 if overrides.get("num_robots") else None
        eager.reset(text)
        fast.reset(text)
        for frame in frames:
            a, b = eager.act(frame, robot), fast.act(frame, robot)
            assert torch.equal(a.actions, b.actions) and torch.equal(a.video, b.video)
            assert (a.nfe, a.steps, a.sampler) == (b.nfe, b.steps, b.sampler)
        assert fast.step == eager.step == len(frames)
    # batch 1: one graph per slot; batch 2: all again (new buffers); the second batch-2 episode replays only
    assert runner.captures == 2 * slots
    assert runner.replays == 3 * len(frames) - 2 * slots
    graphs.detach(fast)
    fast.reset(text)
    eager.reset(text)
    assert torch.equal(fast.act(frames[0], robot).actions, eager.act(frames[0], robot).actions)


def test_graph_runner_recaptures_when_options_change():
    model = temporal()
    policy = wam_fast.WAMPolicy(model, steps=2, sampler="ddim", cfg_scale=1.0, seed=0, history=0)
    runner = graphs.attach(policy, graphs.EagerCapture)
    text, frames = episode(model)
    policy.reset(text)
    policy.act(frames[0])
    policy.act(frames[1])
    assert (runner.captures, runner.replays) == (1, 1)
    policy.steps = 3
    chunk = policy.act(frames[1])
    assert runner.captures == 2 and chunk.steps == 3
    eager = wam_fast.WAMPolicy(model, steps=3, sampler="ddim", cfg_scale=1.0, seed=5, history=0)
    policy.cache.setup(policy.cache.batch, policy.history)  # new buffers, same shapes: the graph is stale
    for p in (policy, eager):
        p.reset(text, seed=5)
    assert torch.equal(policy.act(frames[2]).actions, eager.act(frames[2]).actions)
    assert runner.captures == 3


def test_graph_replays_see_weight_updates_through_the_precomputed_tables():
    """AdaLN tables are computed once per step grid and refreshed in place when a weight changes, so a
    captured graph (which reads the same tensors) follows the new weights."""
    model = temporal(distillation="shortcut", distilled_steps=(2,))
    policy = wam_fast.WAMPolicy(model, seed=0, history=0)
    runner = graphs.attach(policy, graphs.EagerCapture)
    eager = wam_fast.WAMPolicy(model, seed=0, history=0)
    text, frames = episode(model, steps=3)
    for p in (policy, eager):
        p.reset(text)
    for frame in frames[:2]:
        assert torch.equal(policy.act(frame).actions, eager.act(frame).actions)
    tables = [t.data_ptr() for t in policy.cache.table_tensors]
    with torch.no_grad():
        model.blocks[0].adaln.weight.mul_(1.5)
        model.step_embed.linear_1.bias.add_(0.1)
    a, b = policy.act(frames[2]), eager.act(frames[2])
    assert torch.equal(a.actions, b.actions)
    assert [t.data_ptr() for t in policy.cache.table_tensors] == tables
    assert runner.captures == 1 and runner.replays == 2


def test_graph_runner_needs_the_cache():
    policy = wam_fast.WAMPolicy(temporal(), steps=2, sampler="ddim", cfg_scale=1.0, cache=False)
    with pytest.raises(ValueError, match="this WAMPolicy has cache=False"):
        graphs.attach(policy, graphs.EagerCapture)


# ---- GPU: real CUDA graphs ----------------------------------------------------------------------------------
@pytest.mark.skipif(not GPU, reason="CUDA graphs need a CUDA GPU (the CPU runs the same runner through EagerCapture)")
@pytest.mark.parametrize("name", ["ddim-cfg", "shortcut", "consistency", "sde-cfg-robots"])
def test_cuda_graph_replay_equals_eager(name):
    overrides, options = RUNNER_CASES[name]
    model = temporal(**overrides).cuda()
    compiled = wam_fast.compile(wam_fast.WAMPolicy(copy.deepcopy(model), seed=0, **options), EAGER)
    assert "CUDA graph" in compiled.report().applied_to("cuda_graphs")[0]
    eager = wam_fast.WAMPolicy(compiled.model, seed=0, **options)  # same fused model, eager chunk
    runner = compiled.graphs
    slots = compiled.history + 1
    for batch in (1, 2):
        text, frames = episode(model, batch=batch, steps=slots + 3, seed=batch)
        robot = (torch.arange(batch) % 3).cuda() if overrides.get("num_robots") else None
        text, frames = text.cuda(), [f.cuda() for f in frames]
        eager.reset(text)
        compiled.reset(text)
        for frame in frames:
            a, b = eager.act(frame, robot), compiled.act(frame, robot)
            torch.testing.assert_close(b.actions, a.actions, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(b.video, a.video, rtol=1e-5, atol=1e-5)
    assert runner.captures == 2 * slots and runner.replays == 2 * 3


def test_graph_vs_eager_benchmark_runs_on_the_cpu_stand_in():
    """benchmarks/graph_vs_eager.py (the GPU check of the chunk graphs) on the CPU: EagerCapture replays
    give the eager chunks bit for bit, and every act after the first in a slot is a replay."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "graph_vs_eager.py")
    spec = importlib.util.spec_from_file_location("graph_vs_eager", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    result = script.main(["--workload", "tiny", "--steps", "2", "--variants", "bf16", "--repeats", "3", "--warmup", "2",
                          "--history", "1"])
    (row,) = result["rows"]
    assert row["actions_rel_err_max"] <= (1e-3 if GPU else 0.0)  # CPU stand-in: the same kernels, bit for bit
    assert (row["captures"], row["replays"]) == (2, 3)  # 2 ring slots; 5 acts
    assert len(row["graph_times_ms"]) == 3 and row["speedup"] > 0
    # the real-time chunking pass: the same frames with 2 committed actions, their own graphs
    assert row["prefix"] == 2 and row["prefix_committed_exact"] and row["prefix_cost"] > 0
    assert len(row["graph_prefix_times_ms"]) == 3

