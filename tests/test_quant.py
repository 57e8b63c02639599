"""wam_fast.quant: quantize_fp8 on the tiny WAMTransformer and on a plain nn.Sequential; accuracy by SQNR
(every FP8 layer >= 25 dB on random inputs, end-to-end actions and video >= 20 dB); the fused
norm -> FP8 path against the unfused FP8 path; static calibration; exact save/load; bad input and the
sm_89 capability error; weight bytes from a meta build. The ops run on their torch backend
(torch._scaled_mm on CPU) unless a test says Triton (interpreted on CPU)."""
import copy
import math
import os

import pytest
import torch
import torch.nn as nn

import wam_fast
from wam_fast import configs, quant
from wam_fast.ops import reference as WF
from wam_fast.models import fused
from wam_fast.models.transformer import FeedForward, GatedResidualAdaLN
from wam_fast.ops import use_backend
from wam_fast.ops.registry import triton_reason
from model_inputs import random_inputs

needs_triton = pytest.mark.skipif(triton_reason() is not None, reason=str(triton_reason()))
GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")  # where the forced-Triton tests run
LAYER_DB, OUTPUT_DB = 25.0, 20.0  # the thresholds: per quantized layer, end to end


def _tiny(dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    return wam_fast.WAMTransformer(configs.get("tiny", **overrides)).to(dtype).eval()


def _sequential():
    torch.manual_seed(0)
    # 40 -> 20 and 20 -> 7: in/out features that are not multiples of 16
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 40), nn.ReLU(), nn.Linear(40, 20),
                         nn.Linear(20, 7, bias=False)).eval()


def _assert_accurate(rep, outputs):
    assert rep.layers, "no layer was measured"
    for row in rep.layers:
        assert row["sqnr_db"] >= LAYER_DB, row
    for name in outputs:
        assert rep.outputs[name]["sqnr_db"] >= OUTPUT_DB, (name, rep.outputs[name])
        assert rep.outputs[name]["rel_error"] <= 10 ** (-OUTPUT_DB / 20) * 1.0001


# ---- what gets quantized ------------------------------------------------------------------------------
def test_default_filter_on_wam_quantizes_the_backbone_only():
    model = _tiny()
    keep_hp = {name: m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear)
               and not name.endswith(quant.BACKBONE_LINEARS)}
    assert quant.quantize_fp8(model) is model  # in place
    layers = quant.fp8_layers(model)
    assert sorted(layers) == sorted(f"blocks.{i}.{s}" for i in range(2) for s in quant.BACKBONE_LINEARS)
    for layer in layers.values():
        assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
        assert layer.weight_scale.shape == (layer.out_features, 1)  # per output channel
        assert layer.out_dtype == torch.float32 and layer.bias.dtype == torch.float32  # the model dtype
    for name, weight in keep_hp.items():  # AdaLN projections, embeddings, final heads
        module = model.get_submodule(name)
        assert type(module) is nn.Linear and module.weight is weight, name
    assert {"blocks.0.adaln", "text_proj", "action_embed.proj", "time_embed.linear_1", "video_proj",
            "action_proj", "video_out_norm.linear"} <= set(keep_hp)
    assert type(model.blocks[0].ff) is quant.FP8FeedForward
    assert quant.quantize_fp8(model) is model and quant.fp8_layers(model).keys() == layers.keys()  # idempotent


def test_filter_fn_and_handler_registry():
    model = _tiny()
    quant.quantize_fp8(model, filter_fn=lambda m, name: name in ("blocks.0.adaln", "blocks.1.ff.proj_in"))
    assert sorted(quant.fp8_layers(model)) == ["blocks.0.adaln", "blocks.1.ff.proj_in"]  # opt-in AdaLN
    assert type(model.blocks[1].ff) is quant.FP8FeedForward and type(model.blocks[1].ff.proj_out) is nn.Linear
    assert type(model.blocks[0].ff) is FeedForward
    with torch.no_grad(), use_backend("torch"):
        assert all(torch.isfinite(t).all() for t in model(**random_inputs(model, batch=1)))
    assert quant.HANDLERS[nn.Linear] is quant.quantize_linear

    class Scaled(nn.Module):  # a user type, handled once it is registered
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(32, 32)

    seen = []
    quant.register_handler(Scaled)(lambda module, name, config: seen.append(name) or module)
    try:
        quant.quantize_fp8(nn.Sequential(Scaled()), filter_fn=lambda m, name: isinstance(m, Scaled))
    finally:
        del quant.HANDLERS[Scaled]
    assert seen == ["0"]


def test_config_and_argument_errors():
    with pytest.raises(ValueError, match=r"activation must be one of \('dynamic', 'static'\), got 'per_channel'"):
        quant.FP8Config(activation="per_channel")
    with pytest.raises(ValueError, match="out_dtype must be None or one of"):
        quant.FP8Config(out_dtype=torch.int8)
    with pytest.raises(ValueError, match="fuse_norm=True needs activation='dynamic'"):
        quant.FP8Config(activation="static", fuse_norm=True)
    with pytest.raises(TypeError, match="expects an FP8Config, got dict"):
        quant.quantize_fp8(_sequential(), {"activation": "dynamic"})
    with pytest.raises(TypeError, match="expects an nn.Module, got Tensor"):
        quant.quantize_fp8(torch.zeros(2))
    with pytest.raises(ValueError, match="got a bare Linear: wrap it in a model"):
        quant.quantize_fp8(nn.Linear(16, 16))
    with pytest.raises(ValueError, match="model_fp8 has no FP8Linear layers"):
        quant.report(_sequential(), _sequential(), torch.randn(2, 64))


# ---- accuracy -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wam_accuracy(dtype):
    """Every FP8 layer >= 25 dB on its own (reference input), actions and video >= 20 dB end to end;
    outputs in the model dtype."""
    reference = _tiny(dtype)
    model = quant.quantize_fp8(copy.deepcopy(reference))
    inputs = random_inputs(reference, batch=2)
    with use_backend("torch"):
        rep = quant.report(reference, model, inputs)
        video, actions = model(**inputs)
    assert video.dtype == actions.dtype == dtype
    assert len(rep.layers) == 8 and all(math.isfinite(r["sqnr_db_in_model"]) for r in rep.layers)
    _assert_accurate(rep, ["video", "actions"])
    assert "blocks.0.attn.qkv" in str(rep) and set(rep.to_dict()) == {"layers", "outputs"}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sequential_of_linears(backend):
    """Any module with nn.Linear layers: all four quantized (odd in/out features included)."""
    if backend == "triton" and triton_reason() is not None:
        pytest.skip(triton_reason())
    reference = _sequential().to(DEVICE)
    model = quant.quantize_fp8(copy.deepcopy(reference))
    assert sorted(quant.fp8_layers(model)) == ["0", "2", "4", "5"]
    with use_backend(backend):
        rep = quant.report(reference, model, torch.randn(16, 64, device=DEVICE))
    _assert_accurate(rep, ["output"])


def test_sqnr_db():
    x = torch.randn(1000, dtype=torch.float64)
    assert quant.sqnr_db(x, x) == math.inf
    assert abs(quant.sqnr_db(x, 1.1 * x) - 20.0) < 1e-9  # noise = 0.1 signal


# ---- fused norm -> FP8 ---------------------------------------------------------------------------------------
def _fused_and_unfused(dtype=torch.float32):
    reference = _tiny(dtype)
    unfused = quant.quantize_fp8(copy.deepcopy(reference))  # norms emit high precision; linears quantize
    fast = copy.deepcopy(reference)
    fused.fuse(fast)
    quant.quantize_fp8(fast)  # fused model: the norms emit FP8 + per-token scales
    return reference, unfused, fast


def test_fused_path_feeds_fp8_from_the_norms():
    """Fused: norm1 / norm2 emit FP8 codes + per-token scales from the norm op and attn.qkv / ff.proj_in
    take them as they are (no quantize pass of their own); attn.out quantizes its input; ff.proj_out
    takes the FP8 activation of the FFN's fused GELU + quantize kernel, fused or not."""
    _, unfused, fast = _fused_and_unfused()
    block = fast.blocks[0]
    assert type(block.norm1) is quant.FP8AdaLNModulate and type(block.norm2) is quant.FP8GatedResidualAdaLN
    assert type(block.ff) is quant.FP8FeedForward and type(block.attn) is fused.FusedAttention
    assert type(unfused.blocks[0].norm2) is GatedResidualAdaLN

    def input_kinds(model):
        kinds = {}
        handles = [m.register_forward_pre_hook(lambda m, args, n=name: kinds.__setitem__(n, type(args[0]).__name__))
                   for name, m in quant.fp8_layers(model).items()]
        with torch.no_grad(), use_backend("torch"):
            model(**random_inputs(model, batch=1))
        for h in handles:
            h.remove()
        return kinds

    fused_kinds = input_kinds(fast)
    for i in range(2):
        assert fused_kinds[f"blocks.{i}.attn.qkv"] == fused_kinds[f"blocks.{i}.ff.proj_in"] == "FP8Activation"
        assert fused_kinds[f"blocks.{i}.attn.out"] == "Tensor"
        assert fused_kinds[f"blocks.{i}.ff.proj_out"] == "FP8Activation"
    unfused_kinds = input_kinds(unfused)
    assert {k for k, v in unfused_kinds.items() if v != "Tensor"} == {f"blocks.{i}.ff.proj_out" for i in range(2)}


def test_fused_equals_unfused_fp32_torch():
    """fp32, torch backends: the norm op's FP8 codes and scales are quantize_rowwise of the same fp32 y,
    so the fused and unfused FP8 models agree exactly."""
    _, unfused, fast = _fused_and_unfused()
    inputs = random_inputs(unfused, batch=2)
    with torch.no_grad(), use_backend("torch"):
        for a, b in zip(unfused(**inputs), fast(**inputs)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@needs_triton
def test_fused_equals_unfused_fp32_triton():
    """fp32, every op on its Triton kernel (fp8_linear included): within 1e-5 of the unfused FP8 model
    on the torch backend (fp32 summation order; the codes are the same up to rare rounding ties). On a
    GPU both GEMMs use FP8 fast accumulation, differently: >= 40 dB apart instead."""
    _, unfused, fast = _fused_and_unfused()
    unfused, fast = unfused.to(DEVICE), fast.to(DEVICE)
    inputs = random_inputs(unfused, batch=1)
    with torch.no_grad():
        with use_backend("torch"):
            want = unfused(**inputs)
        with use_backend("triton"):
            got = fast(**inputs)
    for a, b in zip(want, got):
        if GPU:
            assert quant.sqnr_db(a, b) >= 40.0
        else:
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_fused_close_to_unfused_bf16():
    """bf16: the unfused path quantizes the bf16-rounded norm output, the fused one the fp32 value, so
    they differ by bf16 rounding: >= 35 dB apart (measured ~45), and both >= 20 dB from the bf16 model."""
    reference, unfused, fast = _fused_and_unfused(torch.bfloat16)
    inputs = random_inputs(reference, batch=2)
    with torch.no_grad(), use_backend("torch"):
        want, a_out, b_out = reference(**inputs), unfused(**inputs), fast(**inputs)
    for w, a, b in zip(want, a_out, b_out):
        assert b.dtype == torch.bfloat16
        assert quant.sqnr_db(a.float(), b.float()) >= 35.0
        assert quant.sqnr_db(w.float(), b.float()) >= OUTPUT_DB


def test_fuse_norm_options():
    model = quant.quantize_fp8(_tiny(), quant.FP8Config(fuse_norm=True))  # unfused model, fused norms forced
    assert type(model.blocks[0].norm2) is quant.FP8GatedResidualAdaLN
    fused.fuse(model)  # later fusion leaves the FP8 pieces alone (ffn_gelu cannot take an FP8 weight)
    assert type(model.blocks[0].ff) is quant.FP8FeedForward and type(model.blocks[0].norm2) is quant.FP8GatedResidualAdaLN
    inputs = random_inputs(model, batch=1)
    with torch.no_grad(), use_backend("torch"):
        assert all(torch.isfinite(t).all() for t in model(**inputs))
    off = _tiny()
    fused.fuse(off)
    quant.quantize_fp8(off, quant.FP8Config(fuse_norm=False))
    assert type(off.blocks[0].norm2) is fused.FusedGatedResidualAdaLN and isinstance(off.blocks[0].ff, FeedForward)


def test_fused_fp8_block_compiles_fullgraph():
    """torch.compile(fullgraph=True) of an FP8 block: the FP8Activation passes between two custom ops."""
    from wam_fast.models.transformer import ForwardContext

    _, _, fast = _fused_and_unfused()
    block, ctx = fast.blocks[0], ForwardContext(fast.layout(), fast.config, torch.device("cpu"))
    h = torch.randn(1, sum(ctx.segments), fast.config.hidden_dim)
    temb = torch.randn(1, len(ctx.segments), fast.config.time_embed_dim)
    with torch.no_grad(), use_backend("torch"):
        want = block(h, temb, ctx)
        got = torch.compile(block, fullgraph=True, dynamic=False)(h, temb, ctx)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---- static calibration ------------------------------------------------------------------------------------------
def test_static_calibration():
    reference = _tiny()
    model = quant.quantize_fp8(copy.deepcopy(reference), quant.FP8Config(activation="static"))
    assert type(model.blocks[0].norm2) is GatedResidualAdaLN  # static: no fused per-token norms
    batches = [random_inputs(reference, batch=2) for _ in range(3)]
    with pytest.raises(RuntimeError, match="not calibrated: run wam_fast.quant.calibrate"):
        with torch.no_grad():
            model(**batches[0])
    # the first layer's input does not depend on quantization: its scale is the reference amax / 448
    seen = []
    handle = reference.blocks[0].attn.qkv.register_forward_hook(lambda m, a, o: seen.append(a[0].abs().amax()))
    with torch.no_grad():
        for b in batches:
            reference(**b)
    handle.remove()
    with use_backend("torch"):
        quant.calibrate(model, batches)
    layer = model.blocks[0].attn.qkv
    assert layer.calibrated and layer.input_scale.shape == () and layer.input_scale.dtype == torch.float32
    assert layer.input_scale.item() == pytest.approx(max(seen).item() / 448.0, rel=1e-6)
    with use_backend("torch"):
        rep = quant.report(reference, model, random_inputs(reference, batch=2))
    _assert_accurate(rep, ["video", "actions"])
    with pytest.raises(ValueError, match="calibrate: no calibration batches"):
        quant.calibrate(model, [])
    with pytest.raises(ValueError, match="calibration needs static FP8 layers"):
        quant.calibrate(quant.quantize_fp8(_tiny()), batches)


def test_calibration_ignores_non_finite_and_zero_amax_gives_no_nan():
    """An inf/NaN in a calibration batch would make amax inf (then x / inf = 0, 0 * inf = NaN for every
    finite input): only finite values count. A layer that only saw zeros gets the scale floor with a
    warning: finite inputs saturate but never give NaN."""
    model = quant.quantize_fp8(_sequential(), quant.FP8Config(activation="static"))
    x = torch.randn(8, 64)
    bad = x.clone()
    bad[0, 0], bad[1, 1] = float("inf"), float("nan")
    with use_backend("torch"):
        quant.calibrate(model, [bad, x])
        first = model[0]
        assert first.input_scale.item() == pytest.approx(x.abs().amax().item() / 448.0, rel=1e-6)
        assert all(torch.isfinite(m.input_scale) for m in quant.fp8_layers(model).values())
        assert torch.isfinite(model(torch.randn(8, 64))).all()
        zero = quant.quantize_fp8(_sequential(), quant.FP8Config(activation="static"))
        with pytest.warns(UserWarning, match="only saw zeros"):
            quant.calibrate(zero, [torch.zeros(4, 64)])
        assert zero[0].input_scale.item() == torch.tensor(WF.FP8_MIN_SCALE).item()
        assert torch.isfinite(zero(torch.randn(4, 64) * 100)).all()


def test_dynamic_zero_and_non_finite_rows():
    """Dynamic scales are per token: a zero row gives the bias, an inf row only spoils its own output."""
    model = quant.quantize_fp8(nn.Sequential(nn.Linear(32, 16)))
    x = torch.randn(5, 32)
    x[1] = 0.0
    x[3, 4] = float("inf")
    with torch.no_grad(), use_backend("torch"):
        y = model(x)
    assert torch.equal(y[1], model[0].bias)
    assert torch.isfinite(y[[0, 1, 2, 4]]).all()


def test_non_finite_weight_is_refused():
    model = nn.Sequential(nn.Linear(32, 16))
    with torch.no_grad():
        model[0].weight[3, 3] = float("nan")
    with pytest.raises(ValueError, match="cannot quantize 0: its weight has non-finite values"):
        quant.quantize_fp8(model)
    assert type(model[0]) is nn.Linear


# ---- checkpoints --------------------------------------------------------------------------------------------------------
def _state_bytes(model):
    return {k: v.contiguous().view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v
            for k, v in model.state_dict().items()}


def _assert_same_state(a, b):
    sa, sb = _state_bytes(a), _state_bytes(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("mode", ["dynamic-fused", "static"])
def test_save_load_wam_exact(tmp_path, mode):
    reference = _tiny()
    model = copy.deepcopy(reference)
    if mode == "static":
        quant.quantize_fp8(model, quant.FP8Config(activation="static"))
        with use_backend("torch"):
            quant.calibrate(model, [random_inputs(reference, batch=2)])
    else:
        fused.fuse(model)
        quant.quantize_fp8(model)
    quant.save_quantized(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["checksums.json", "config.json", "model.safetensors"]  # no temporary files left
    loaded = quant.load_quantized(tmp_path)  # rebuilt from the stored config; no calibration data
    _assert_same_state(model, loaded)
    assert {n: type(m) for n, m in loaded.named_modules() if type(m).__module__ == "wam_fast.quant"} == \
        {n: type(m) for n, m in model.named_modules() if type(m).__module__ == "wam_fast.quant"}
    assert all(m.calibrated for m in quant.fp8_layers(loaded).values())
    inputs = random_inputs(reference, batch=2)
    with torch.no_grad(), use_backend("torch"):
        for a, b in zip(model(**inputs), loaded(**inputs)):
            assert torch.equal(a, b)


def test_save_load_sequential_exact(tmp_path):
    model = quant.quantize_fp8(_sequential(), quant.FP8Config(activation="static"))
    with use_backend("torch"):
        quant.calibrate(model, [torch.randn(8, 64)])
    quant.save_quantized(model, tmp_path)
    with pytest.raises(ValueError, match="not a WAMTransformer: pass the high-precision model"):
        quant.load_quantized(tmp_path)
    with torch.device("meta"):
        skeleton = _sequential()
    loaded = quant.load_quantized(tmp_path, model=skeleton)
    _assert_same_state(model, loaded)
    x = torch.randn(4, 64)
    with torch.no_grad(), use_backend("torch"):
        assert torch.equal(model(x), loaded(x))


def test_checkpoint_errors(tmp_path):
    wam_fast.save_pretrained(_tiny(), tmp_path / "hp")
    with pytest.raises(ValueError, match="not a quantized wam_fast checkpoint"):
        quant.load_quantized(tmp_path / "hp")
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        quant.load_quantized(tmp_path / "nothing")
    with pytest.raises(ValueError, match="has no FP8Linear layers"):
        quant.save_quantized(_sequential(), tmp_path / "x")
    with pytest.raises(ValueError, match=r"static layers \['0', '2', '4', '5'\] are not calibrated"):
        quant.save_quantized(quant.quantize_fp8(_sequential(), quant.FP8Config(activation="static")), tmp_path / "y")
    # the high-precision checkpoint functions point to the FP8 ones instead of failing obscurely
    fp8_model = quant.quantize_fp8(_tiny())
    with pytest.raises(ValueError, match="has FP8 layers.*wam_fast.quant.save_quantized"):
        wam_fast.save_pretrained(fp8_model, tmp_path / "z")
    quant.save_quantized(fp8_model, tmp_path / "fp8")
    with pytest.raises(ValueError, match="is an FP8 checkpoint.*wam_fast.quant.load_quantized"):
        wam_fast.load_pretrained(tmp_path / "fp8")


# ---- capability, dtype moves, memory -----------------------------------------------------------------------------------
def test_quantize_below_sm89_is_refused(monkeypatch):
    """On a GPU below sm_89 quantize_fp8 refuses before swapping anything (fake CUDA tensors here)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 6))
    model = nn.Sequential(nn.Linear(32, 32, device="meta"), nn.Linear(32, 32, device="meta"))
    with FakeTensorMode():
        for layer in model:
            layer.weight = nn.Parameter(torch.empty(32, 32, device="cuda"))
            layer.bias = nn.Parameter(torch.empty(32, device="cuda"))
        with pytest.raises(RuntimeError, match=r"compute capability 8\.6 \(sm_86\).*keep the model in bf16"):
            quant.quantize_fp8(model)
    assert all(type(layer) is nn.Linear for layer in model)


def test_dtype_and_device_moves_keep_fp8():
    model = quant.quantize_fp8(_sequential())
    model.to(torch.bfloat16)
    layer = model[0]
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    assert layer.out_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    with torch.no_grad(), use_backend("torch"):
        assert model(torch.randn(3, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    model.float()
    assert layer.out_dtype == torch.float32 and layer.weight.dtype == torch.float8_e4m3fn
    bf16_in = quant.quantize_fp8(_sequential().to(torch.bfloat16), quant.FP8Config(out_dtype=torch.float32))
    assert bf16_in[0].out_dtype == torch.float32 and bf16_in[0].bias.dtype == torch.bfloat16


def test_weight_bytes():
    cfg = configs.get("tiny")
    sizes = quant.weight_bytes(cfg)
    with torch.device("meta"):
        model = wam_fast.WAMTransformer(cfg)
    layers = [model.get_submodule(f"blocks.{i}.{s}") for i in range(cfg.num_layers) for s in quant.BACKBONE_LINEARS]
    fp8_params = sum(m.weight.numel() for m in layers)
    assert sizes["params"] == sum(p.numel() for p in model.parameters()) and sizes["fp8_params"] == fp8_params
    assert sizes["bf16"] == 2 * sizes["params"]
    # FP8 weights take 1 byte instead of 2, plus one float32 scale per output channel
    assert sizes["fp8"] == sizes["bf16"] - fp8_params + 4 * sum(m.out_features for m in layers)
    w1 = quant.weight_bytes(configs.get("videovla-5b"))
    # 5.57 B parameters: 11.1 GB in bf16; the 4.76 B backbone linears in FP8 -> ~6.4 GB
    assert 11.0e9 < w1["bf16"] < 11.3e9 and 6.2e9 < w1["fp8"] < 6.6e9, w1


def test_import_stays_lean():
    import subprocess
    import sys

    code = ("import sys, wam_fast.quant; bad = [m for m in ('triton', 'safetensors') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))



# ---- GPU only ----------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (sm_89+)")
@pytest.mark.parametrize("backend", [None, "torch"])
def test_wam_bf16_on_gpu(tmp_path, backend):
    """The tiny model in bf16 on the GPU, fused and quantized: the automatic choice (Triton kernels) and
    the torch backends (torch._scaled_mm, cuBLASLt) meet the thresholds, and a checkpoint reloads onto
    the GPU bit for bit."""
    reference = _tiny(torch.bfloat16).cuda()
    fast = copy.deepcopy(reference)
    fused.fuse(fast)
    quant.quantize_fp8(fast)
    inputs = random_inputs(reference, batch=2)
    with use_backend(backend):
        rep = quant.report(reference, fast, inputs)
    _assert_accurate(rep, ["video", "actions"])
    quant.save_quantized(fast, tmp_path)
    loaded = quant.load_quantized(tmp_path, device="cuda")
    _assert_same_state(fast, loaded)
    with torch.no_grad(), use_backend(backend):
        for a, b in zip(fast(**inputs), loaded(**inputs)):
            assert torch.equal(a, b)
