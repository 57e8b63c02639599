"""wam_fast.compile on diffusers' CogVideoXTransformer3DModel (VideoVLA's backbone), tiny and random:
our attention processor (RoPE from image_rotary_emb really used), fused AdaLN blocks / LayerNormZero /
GELU by module swap, FP8 block linears, per-call fallback, the report; and the state_dict converter
(wam_fast.compiler.from_cogvideox) with its round trip. Tolerances: the table in wam_fast/compiler/__init__.py."""
import copy
import subprocess
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="pip install 'wam_fast[test]' installs diffusers")

import wam_fast  # noqa: E402
from wam_fast import compiler  # noqa: E402
from wam_fast.compiler import CompileConfig, compile_report  # noqa: E402
from wam_fast.models import convert  # noqa: E402
from wam_fast.quant import FP8Linear, fp8_layers, sqnr_db  # noqa: E402

FRAMES, CHANNELS, SIZE, TEXT_LEN = 3, 4, 8, 8
REL = compiler.REL_TOLERANCE[torch.float32]
EAGER = CompileConfig(backend="eager")


@pytest.fixture(autouse=True)
def _torch_ops():
    # the levers are under test here, not the kernels (tests/test_<op>.py): the ops' torch backends
    with wam_fast.ops.use_backend(None if torch.cuda.is_available() else "torch"):
        yield


def cogvideox(seed=0):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=2 * CHANNELS, out_channels=CHANNELS,
        time_embed_dim=32, text_embed_dim=32, num_layers=2, sample_width=SIZE, sample_height=SIZE,
        sample_frames=(FRAMES - 1) * 4 + 1, patch_size=2, max_text_seq_length=TEXT_LEN,
        use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False).eval()
    with torch.no_grad():  # diffusers zero-initialises some projections; random values make comparisons bite
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def rope():
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    grid = SIZE // 2
    return get_3d_rotary_pos_embed(embed_dim=16, crops_coords=((0, 0), (grid, grid)), grid_size=(grid, grid),
                                   temporal_size=FRAMES, use_real=True)


def inputs(seed=1, with_rope=True):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, FRAMES, 2 * CHANNELS, SIZE, SIZE, generator=g),
                encoder_hidden_states=torch.randn(2, TEXT_LEN, 32, generator=g), timestep=torch.tensor([37, 901]),
                image_rotary_emb=rope() if with_rope else None, return_dict=False)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run(model, x):
    with torch.no_grad():
        return model(**x)[0]


def test_cogvideox_compiled_matches_eager_and_uses_rope():
    from wam_fast.compiler import cogvideox as dc

    reference = cogvideox()
    model = copy.deepcopy(reference)
    x = inputs()
    assert wam_fast.compile(model, EAGER, example_inputs=x) is model
    want, got = run(reference, x), run(model, x)
    assert rel_err(got, want) <= REL
    # RoPE matters at this size far beyond the tolerance: a processor that lost image_rotary_emb fails above
    assert rel_err(run(reference, inputs(with_rope=False)), want) > 100 * REL
    assert rel_err(run(model, inputs(with_rope=False)), run(reference, inputs(with_rope=False))) <= REL
    for i in range(2):
        block = model.transformer_blocks[i]
        assert type(block) is dc.FusedCogVideoXBlock and type(block.attn1.processor) is dc.CogVideoXAttnProcessor
        assert type(block.ff.net[0]) is dc.FusedGELU
    report = compile_report(model)
    assert "image_rotary_emb" in report.applied_to("transformer_blocks.0.attn1.processor")[0]
    assert "adaln_modulate" in report.applied_to("transformer_blocks.0")[0]
    assert "ffn_gelu" in report.applied_to("transformer_blocks.0.ff.net.0")[0]
    assert "bidirectional" in report.skipped_at("cache")[0]
    assert [c["lever"] for c in report.checks] == ["attention", "fused"] and all(c["ok"] for c in report.checks)
    assert not hasattr(model, "report")  # a diffusers model keeps its attributes: compile_report(model)


def test_processor_that_drops_rope_is_caught(monkeypatch):
    """The check the test above relies on: diffusers' Attention drops keyword arguments a processor does
    not name, so a processor taking **kwargs silently loses image_rotary_emb, and the output moves."""
    from wam_fast.compiler.cogvideox import CogVideoXAttnProcessor

    class Careless(CogVideoXAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, **kwargs):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask,
                                    kwargs.get("image_rotary_emb"))

    reference = cogvideox()
    model = copy.deepcopy(reference)
    model.set_attn_processor(Careless())
    assert rel_err(run(model, inputs()), run(reference, inputs())) > 100 * REL
    # and with it, compile reverts the lever instead of breaking the model
    model = copy.deepcopy(reference)
    from wam_fast.compiler import cogvideox as cogvideox_handler

    monkeypatch.setattr(cogvideox_handler, "CogVideoXAttnProcessor", Careless)
    wam_fast.compile(model, CompileConfig(backend="eager"), example_inputs=inputs())
    assert "reverted" in compile_report(model).skipped_at("attention")[0]
    assert rel_err(run(model, inputs()), run(reference, inputs())) <= REL


def test_cogvideox_fp8():
    reference = cogvideox()
    model = copy.deepcopy(reference)
    x = inputs()
    wam_fast.compile(model, CompileConfig(backend="eager", fp8=True), example_inputs=x)
    assert sqnr_db(run(reference, x), run(model, x)) >= 20.0
    block_linears = {f"transformer_blocks.{i}.{n}" for i in range(2) for n in
                     ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")}
    assert set(fp8_layers(model)) == block_linears
    report = compile_report(model)
    assert "AdaLN projection" in report.skipped_at("transformer_blocks.0.norm1.linear")[0]
    assert "embedding" in report.skipped_at("patch_embed.text_proj")[0]
    assert "output head" in report.skipped_at("proj_out")[0]
    assert "quantized to FP8" in report.skipped_at("transformer_blocks.0.ff.net.0")[0]  # GELU stays unfused
    assert isinstance(model.transformer_blocks[0].ff.net[0].proj, FP8Linear)


def test_processor_falls_back_per_call_to_the_original():
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

    from wam_fast.compiler.cogvideox import CogVideoXAttnProcessor

    attn = cogvideox().transformer_blocks[0].attn1
    h, e = torch.randn(2, 12, 64), torch.randn(2, TEXT_LEN, 64)
    mask = torch.ones(2, TEXT_LEN + 12, dtype=torch.bool)
    before = sum(f["count"] for f in wam_fast.ops.fallbacks() if "CogVideoXAttnProcessor2_0" in f["backend"])
    with torch.no_grad():
        attn.set_processor(CogVideoXAttnProcessor2_0())
        want = attn(h, e, attention_mask=mask)
        attn.set_processor(CogVideoXAttnProcessor())
        got = attn(h, e, attention_mask=mask)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    notes = [f for f in wam_fast.ops.fallbacks() if "CogVideoXAttnProcessor2_0" in f["backend"]]
    assert sum(f["count"] for f in notes) == before + 1
    assert any("attention_mask given" in " ".join(f["skipped"]) for f in notes)


def test_block_subclass_keeps_its_forward_and_gets_fused_norms():
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

    from wam_fast.compiler import cogvideox as dc

    class MyBlock(CogVideoXBlock):
        pass  # a user's block: its forward is its own, so only its LayerNormZeros are swapped

    reference = cogvideox()
    model = copy.deepcopy(reference)
    model.transformer_blocks[1] = compiler.retype(model.transformer_blocks[1], MyBlock)
    x = inputs()
    wam_fast.compile(model, EAGER, example_inputs=x)
    assert type(model.transformer_blocks[0]) is dc.FusedCogVideoXBlock
    assert type(model.transformer_blocks[1]) is MyBlock
    assert type(model.transformer_blocks[1].norm1) is dc.FusedCogVideoXLayerNormZero
    assert "keeps its own forward" in compile_report(model).skipped_at("transformer_blocks.1")[0]
    assert rel_err(run(model, x), run(reference, x)) <= REL


def test_from_cogvideox_round_trip():
    source = cogvideox()
    layout = dict(text_len=TEXT_LEN, latent_frames=FRAMES, latent_height=SIZE, latent_width=SIZE)
    ours = compiler.from_cogvideox(source, action_len=4, action_dim=7, **layout)
    assert isinstance(ours, wam_fast.WAMTransformer) and ours.config.image_concat
    from_sd = compiler.from_cogvideox(source.state_dict(), action_len=4, action_dim=7, config=dict(source.config),
                                      **layout)
    backbone = {k for k in ours.state_dict() if not k.startswith(convert.ACTION_PREFIXES)}
    for key in backbone:
        assert torch.equal(ours.state_dict()[key], from_sd.state_dict()[key]), key
    back = convert.wam_state_dict_to_cogvideox(ours.state_dict(), ours.config.num_layers)
    original = source.state_dict()
    assert set(back) == set(original)
    assert all(torch.equal(back[k], original[k]) for k in original)
    with pytest.raises(ValueError, match="needs config="):
        compiler.from_cogvideox(source.state_dict(), action_len=4, action_dim=7)
    with pytest.raises(ValueError, match="pass config only with a state_dict"):
        compiler.from_cogvideox(source, action_len=4, action_dim=7, config={})
    with pytest.raises(TypeError, match="or its state_dict, got str"):
        compiler.from_cogvideox("cogvideox", action_len=4, action_dim=7)
    with pytest.raises(ValueError, match="no place in a CogVideoX transformer"):
        convert.wam_state_dict_to_cogvideox(dict(ours.state_dict(), extra=torch.zeros(1)), 2)
    # the converted model compiles like any WAMTransformer
    model = wam_fast.compile(ours, EAGER)
    assert "FusedAttention" in model.report().applied_to("blocks.0.attn")[0]


def test_diffusers_is_imported_only_for_diffusers_models():
    code = ("import sys, torch, wam_fast\n"
            "wam_fast.compile(torch.nn.Sequential(torch.nn.Linear(16, 16)), wam_fast.CompileConfig(backend='eager'))\n"
            "assert 'diffusers' not in sys.modules\n"
            "assert 'wam_fast.compiler.cogvideox' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
