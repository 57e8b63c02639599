"""Weights from diffusers' ``CogVideoXTransformer3DModel`` (VideoVLA's backbone) into a WAMTransformer.

The video backbone maps one to one; the action modules (embedding, output AdaLN and head) have no
counterpart and keep their fresh initialisation. Works on state_dicts: diffusers is not imported.
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch

from wam_fast.configs import WAMConfig

# modules of a WAMTransformer that a CogVideoX checkpoint does not have
ACTION_PREFIXES = ("action_embed.", "action_out_norm.", "action_proj.")


def config_from_cogvideox(diffusers_config: Mapping, *, action_len: int, action_dim: int, text_len: int = 226,
                          latent_frames: int = 4, latent_height: int = 32, latent_width: int = 32,
                          name: str = "cogvideox") -> WAMConfig:
    """A WAMConfig for a CogVideoX transformer config (a dict or diffusers' FrozenDict)."""
    c = dict(diffusers_config)
    unsupported = {k: c.get(k) for k, ok in (("use_rotary_positional_embeddings", True),
                                               ("use_learned_positional_embeddings", False),
                                               ("patch_size_t", None), ("ofs_embed_dim", None),
                                               ("flip_sin_to_cos", True), ("freq_shift", 0),
                                               ("activation_fn", "gelu-approximate"),
                                               ("attention_bias", True), ("norm_elementwise_affine", True))
                   if c.get(k, ok) != ok}
    if unsupported:
        raise ValueError(f"this CogVideoX variant differs from the VideoVLA (CogVideoX-5B I2V) anatomy in "
                         f"{unsupported}; WAMTransformer reproduces only that anatomy")
    out_channels = c.get("out_channels") or c["in_channels"]
    if c["in_channels"] not in (out_channels, 2 * out_channels):
        raise ValueError(f"in_channels {c['in_channels']} must equal out_channels {out_channels} (T2V) "
                         f"or twice it (I2V, image latent concatenated)")
    return WAMConfig(name=name, num_layers=c["num_layers"], num_heads=c["num_attention_heads"],
                     head_dim=c["attention_head_dim"], time_embed_dim=c["time_embed_dim"], text_len=text_len,
                     text_dim=c["text_embed_dim"], latent_channels=out_channels,
                     image_concat=c["in_channels"] == 2 * out_channels, latent_frames=latent_frames,
                     latent_height=latent_height, latent_width=latent_width, patch_size=c["patch_size"],
                     action_len=action_len, action_dim=action_dim, norm_eps=c.get("norm_eps", 1e-5))


def cogvideox_state_dict_to_wam(state_dict: Mapping[str, torch.Tensor], num_layers: int) -> Dict[str, torch.Tensor]:
    """Rename (and fuse Q/K/V and the two AdaLN projections of each block) a CogVideoX state_dict."""
    sd = dict(state_dict)
    out: Dict[str, torch.Tensor] = {}

    def take(src: str, dst: str) -> None:
        for suffix in (".weight", ".bias"):
            if src + suffix in sd:
                out[dst + suffix] = sd.pop(src + suffix)

    take("patch_embed.proj", "patch_embed.proj")
    take("patch_embed.text_proj", "text_proj")
    take("time_embedding.linear_1", "time_embed.linear_1")
    take("time_embedding.linear_2", "time_embed.linear_2")
    for i in range(num_layers):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for suffix in (".weight", ".bias"):
            # our adaln = [norm1 projection; norm2 projection], each (video set, text set) x (shift, scale, gate)
            out[dst + "adaln" + suffix] = torch.cat([sd.pop(src + "norm1.linear" + suffix),
                                                     sd.pop(src + "norm2.linear" + suffix)])
            out[dst + "attn.qkv" + suffix] = torch.cat([sd.pop(src + f"attn1.to_{p}" + suffix) for p in "qkv"])
        take(src + "norm1.norm", dst + "norm1.norm")
        take(src + "norm2.norm", dst + "norm2.norm")
        take(src + "attn1.norm_q", dst + "attn.norm_q")
        take(src + "attn1.norm_k", dst + "attn.norm_k")
        take(src + "attn1.to_out.0", dst + "attn.out")
        take(src + "ff.net.0.proj", dst + "ff.proj_in")
        take(src + "ff.net.2", dst + "ff.proj_out")
    take("norm_final", "norm_final")
    take("norm_out.linear", "video_out_norm.linear")
    take("norm_out.norm", "video_out_norm.norm")
    take("proj_out", "video_proj")
    if sd:
        raise ValueError(f"CogVideoX state_dict has entries with no place in a WAMTransformer: {sorted(sd)[:8]}")
    return out


def wam_from_cogvideox(diffusers_model: torch.nn.Module, *, action_len: int, action_dim: int, **layout) -> torch.nn.Module:
    """A WAMTransformer holding a CogVideoX transformer's weights, with fresh action modules.

    ``layout``: text_len, latent_frames, latent_height, latent_width (see ``config_from_cogvideox``).
    """
    from wam_fast.models.transformer import WAMTransformer

    config = config_from_cogvideox(diffusers_model.config, action_len=action_len, action_dim=action_dim, **layout)
    param = next(diffusers_model.parameters())
    with torch.device(param.device):
        model = WAMTransformer(config).to(param.dtype)
    weights = cogvideox_state_dict_to_wam(diffusers_model.state_dict(), config.num_layers)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    still_missing = [k for k in missing if not k.startswith(ACTION_PREFIXES)]
    if still_missing or unexpected:
        raise ValueError(f"CogVideoX weights do not fit: missing {still_missing[:8]}, unexpected {unexpected[:8]}")
    return model

