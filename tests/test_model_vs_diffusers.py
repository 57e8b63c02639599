"""The reference model's backbone equals diffusers' CogVideoXTransformer3DModel (VideoVLA's backbone).

A tiny random CogVideoX I2V transformer is converted into a WAMTransformer; with the same inputs
(and no action tokens, which CogVideoX has not) the video prediction must match to fp32 rounding.
This pins the anatomy: time embedding, patch/text embedding, expert AdaLN order, fused QKV, q/k
LayerNorm, 3D RoPE layout on the video slice, FFN, final norms, unpatchify.
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="pip install 'wam_fast[test]' installs diffusers")

from wam_fast.models.convert import config_from_cogvideox, wam_from_cogvideox  # noqa: E402
from wam_fast.models.layout import SegmentLayout  # noqa: E402
from wam_fast.models.transformer import ForwardContext  # noqa: E402

FRAMES, CHANNELS, SIZE, TEXT_LEN = 3, 4, 8, 8


@pytest.fixture(scope="module")
def models():
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    reference = CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=2 * CHANNELS, out_channels=CHANNELS,
        time_embed_dim=32, text_embed_dim=32, num_layers=2, sample_width=SIZE, sample_height=SIZE,
        sample_frames=(FRAMES - 1) * 4 + 1, patch_size=2, max_text_seq_length=TEXT_LEN,
        use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False).eval()
    # diffusers initialises some projections to zero; random values make the comparison bite
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = wam_from_cogvideox(reference, action_len=4, action_dim=7, text_len=TEXT_LEN, latent_frames=FRAMES,
                              latent_height=SIZE, latent_width=SIZE).eval()
    return reference, ours


def video_only_forward(model, video, text, image, timestep):
    """WAMTransformer's forward over text | video tokens only (CogVideoX has no action tokens)."""
    c = model.config
    tpf = c.tokens_per_frame
    layout = SegmentLayout(names=("text", "video"), lengths=(c.text_len, FRAMES * tpf), mod_set=(0, 1),
                           noisy=(True, True), mask="full",
                           frame_positions=tuple(range(FRAMES)), tokens_per_frame=tpf)
    ctx = ForwardContext(layout, c, video.device)
    padded = torch.nn.functional.pad(image, (0, 0, 0, 0, 0, 0, 0, FRAMES - 1))
    h = torch.cat((model.text_proj(text), model.patch_embed(torch.cat((video, padded), dim=2))), dim=1)
    temb = model.time_embed(layout.segment_timesteps(timestep))
    for block in model.blocks:
        h = block(h, temb, ctx)
    h = model.norm_final(h)
    v = model.video_out_norm(h[:, c.text_len:], temb[:, 1])
    return model.unpatchify(model.video_proj(v), video.shape)


def cogvideox_rope(frames, grid):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    return get_3d_rotary_pos_embed(embed_dim=16, crops_coords=((0, 0), (grid, grid)), grid_size=(grid, grid),
                                   temporal_size=frames, use_real=True)


@torch.no_grad()
def test_backbone_matches_diffusers_cogvideox(models):
    reference, ours = models
    b = 2
    video = torch.randn(b, FRAMES, CHANNELS, SIZE, SIZE)
    image = torch.randn(b, 1, CHANNELS, SIZE, SIZE)
    text = torch.randn(b, TEXT_LEN, 32)
    timestep = torch.tensor([37, 901])
    padded = torch.nn.functional.pad(image, (0, 0, 0, 0, 0, 0, 0, FRAMES - 1))
    expected = reference(hidden_states=torch.cat((video, padded), dim=2), encoder_hidden_states=text,
                         timestep=timestep, image_rotary_emb=cogvideox_rope(FRAMES, SIZE // 2),
                         return_dict=False)[0]
    got = video_only_forward(ours, video, text, image, timestep.float())
    assert expected.shape == got.shape == video.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert expected.abs().mean() > 0.1  # not a trivially small output


def test_rope_tables_match_diffusers():
    from wam_fast.ops import reference as WF

    cos, sin = WF.rope_cos_sin(range(FRAMES), SIZE // 2, SIZE // 2, (4, 6, 6))
    ref_cos, ref_sin = cogvideox_rope(FRAMES, SIZE // 2)
    torch.testing.assert_close(cos, ref_cos.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sin, ref_sin.float(), rtol=1e-5, atol=1e-5)


def test_converted_model_runs_with_fresh_action_modules(models):
    _, ours = models
    c = ours.config
    assert c.image_concat and c.latent_channels == CHANNELS and c.num_layers == 2
    video_out, action_out = ours(torch.randn(1, FRAMES, CHANNELS, SIZE, SIZE), torch.randn(1, TEXT_LEN, 32),
                                 torch.randn(1, 4, 7), torch.tensor([500.0]),
                                 image=torch.randn(1, 1, CHANNELS, SIZE, SIZE))
    assert video_out.shape == (1, FRAMES, CHANNELS, SIZE, SIZE) and action_out.shape == (1, 4, 7)


def test_unsupported_cogvideox_variants_are_refused():
    base = dict(num_layers=2, num_attention_heads=4, attention_head_dim=16, time_embed_dim=32,
                text_embed_dim=32, in_channels=8, out_channels=4, patch_size=2,
                use_rotary_positional_embeddings=True)
    with pytest.raises(ValueError, match="use_learned_positional_embeddings"):
        config_from_cogvideox(dict(base, use_learned_positional_embeddings=True), action_len=4, action_dim=7)
    with pytest.raises(ValueError, match="in_channels 12 must equal out_channels 4"):
        config_from_cogvideox(dict(base, in_channels=12), action_len=4, action_dim=7)
