"""Weights from diffusers' ``CogVideoXTransformer3DModel`` (VideoVLA's backbone) into a WAMTransformer.

The video backbone maps one to one; the action modules (embedding, output AdaLN and head) have no
counterpart and keep their fresh initialisation. Works on state_dicts: diffusers is not imported.

    wam_from_cogvideox(diffusers_model, action_len=6, action_dim=7, latent_frames=4, ...)
    wam_from_cogvideox_state_dict(state_dict, diffusers_config, action_len=6, action_dim=7, ...)
    cogvideox_state_dict_to_wam(state_dict, num_layers)   # renames only (the two above build the model)
    wam_state_dict_to_cogvideox(state_dict, num_layers)   # the inverse, for the backbone

``wam_fast.compiler.from_cogvideox`` takes either a model or a state_dict plus its config.
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch

from wam_fast.configs import WAMConfig
from wam_fast.models.transformer import WAMTransformer

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


# (CogVideoX name, WAMTransformer name) of the modules that map one to one; each has .weight / .bias.
RENAMES = (("patch_embed.proj", "patch_embed.proj"), ("patch_embed.text_proj", "text_proj"),
           ("time_embedding.linear_1", "time_embed.linear_1"), ("time_embedding.linear_2", "time_embed.linear_2"),
           ("norm_final", "norm_final"), ("norm_out.linear", "video_out_norm.linear"),
           ("norm_out.norm", "video_out_norm.norm"), ("proj_out", "video_proj"))
BLOCK_RENAMES = (("norm1.norm", "norm1.norm"), ("norm2.norm", "norm2.norm"), ("attn1.norm_q", "attn.norm_q"),
                 ("attn1.norm_k", "attn.norm_k"), ("attn1.to_out.0", "attn.out"), ("ff.net.0.proj", "ff.proj_in"),
                 ("ff.net.2", "ff.proj_out"))
COGVIDEOX_BLOCK, WAM_BLOCK = "transformer_blocks.{}.", "blocks.{}."
SUFFIXES = (".weight", ".bias")


def _rename(sd: Dict[str, torch.Tensor], out: Dict[str, torch.Tensor], num_layers: int, to_wam: bool) -> None:
    """Move the one-to-one entries of sd into out under their names on the other side."""
    pairs = list(RENAMES) + [(COGVIDEOX_BLOCK.format(i) + c, WAM_BLOCK.format(i) + w)
                             for i in range(num_layers) for c, w in BLOCK_RENAMES]
    for cog, wam in pairs:
        src, dst = (cog, wam) if to_wam else (wam, cog)
        for suffix in SUFFIXES:
            if src + suffix in sd:
                out[dst + suffix] = sd.pop(src + suffix)


def cogvideox_state_dict_to_wam(state_dict: Mapping[str, torch.Tensor], num_layers: int) -> Dict[str, torch.Tensor]:
    """Rename (and fuse Q/K/V and the two AdaLN projections of each block) a CogVideoX state_dict."""
    sd = dict(state_dict)
    out: Dict[str, torch.Tensor] = {}
    for i in range(num_layers):
        src, dst = COGVIDEOX_BLOCK.format(i), WAM_BLOCK.format(i)
        for suffix in SUFFIXES:
            # our adaln = [norm1 projection; norm2 projection], each (video set, text set) x (shift, scale, gate)
            out[dst + "adaln" + suffix] = torch.cat([sd.pop(src + "norm1.linear" + suffix),
                                                     sd.pop(src + "norm2.linear" + suffix)])
            out[dst + "attn.qkv" + suffix] = torch.cat([sd.pop(src + f"attn1.to_{p}" + suffix) for p in "qkv"])
    _rename(sd, out, num_layers, to_wam=True)
    if sd:
        raise ValueError(f"CogVideoX state_dict has entries with no place in a WAMTransformer: {sorted(sd)[:8]}")
    return out


# modules of a WAMTransformer with no place in a CogVideoX checkpoint (the inverse drops them)
WAM_ONLY_PREFIXES = ACTION_PREFIXES + ("step_embed.",)


def wam_state_dict_to_cogvideox(state_dict: Mapping[str, torch.Tensor], num_layers: int) -> Dict[str, torch.Tensor]:
    """The inverse of ``cogvideox_state_dict_to_wam`` for the video backbone: split the fused QKV and
    the two AdaLN projections of each block and rename. The action modules (and a shortcut student's
    ``step_embed``) have no CogVideoX counterpart and are left out; any other unknown key is an error."""
    sd = {k: v for k, v in state_dict.items() if not k.startswith(WAM_ONLY_PREFIXES)}
    out: Dict[str, torch.Tensor] = {}
    for i in range(num_layers):
        src, dst = WAM_BLOCK.format(i), COGVIDEOX_BLOCK.format(i)
        for suffix in SUFFIXES:
            norm1, norm2 = sd.pop(src + "adaln" + suffix).chunk(2)  # [norm1 projection; norm2 projection]
            out[dst + "norm1.linear" + suffix], out[dst + "norm2.linear" + suffix] = norm1, norm2
            for part, tensor in zip("qkv", sd.pop(src + "attn.qkv" + suffix).chunk(3)):
                out[dst + f"attn1.to_{part}" + suffix] = tensor
    _rename(sd, out, num_layers, to_wam=False)
    if sd:
        raise ValueError(f"WAMTransformer state_dict has entries with no place in a CogVideoX transformer: "
                         f"{sorted(sd)[:8]}")
    return out


def wam_from_cogvideox_state_dict(state_dict: Mapping[str, torch.Tensor], diffusers_config: Mapping, *,
                                  action_len: int, action_dim: int, **layout) -> torch.nn.Module:
    """A WAMTransformer from a CogVideoX transformer's state_dict and its config (a dict, e.g. the
    checkpoint's config.json), with fresh action modules, on the state_dict's device and dtype.
    diffusers is not needed. ``layout``: text_len, latent_frames, latent_height, latent_width, name
    (see ``config_from_cogvideox``)."""
    config = config_from_cogvideox(diffusers_config, action_len=action_len, action_dim=action_dim, **layout)
    weights = cogvideox_state_dict_to_wam(state_dict, config.num_layers)
    first = next(iter(weights.values()))
    with torch.device(first.device):
        model = WAMTransformer(config).to(first.dtype)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    still_missing = [k for k in missing if not k.startswith(ACTION_PREFIXES)]
    if still_missing or unexpected:
        raise ValueError(f"CogVideoX weights do not fit: missing {still_missing[:8]}, unexpected {unexpected[:8]}")
    return model


def wam_from_cogvideox(diffusers_model: torch.nn.Module, *, action_len: int, action_dim: int, **layout) -> torch.nn.Module:
    """A WAMTransformer holding a CogVideoX transformer's weights, with fresh action modules.

    ``layout``: text_len, latent_frames, latent_height, latent_width (see ``config_from_cogvideox``).
    """
    return wam_from_cogvideox_state_dict(diffusers_model.state_dict(), diffusers_model.config, action_len=action_len,
                                         action_dim=action_dim, **layout)

