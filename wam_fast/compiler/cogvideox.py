"""wam_fast levers for diffusers' ``CogVideoXTransformer3DModel`` (VideoVLA's backbone).

Imported by ``wam_fast.compiler.dispatch`` the first time a diffusers model is compiled (it imports
diffusers; ``import wam_fast`` does not), which registers ``HANDLERS`` (``compile_cogvideox`` for
CogVideoXTransformer3DModel). Everything attaches without editing diffusers (docs/design.md, Conventions):

- ``CogVideoXAttnProcessor`` (through ``set_attn_processor``, per attention module whose processor is
  diffusers' default ``CogVideoXAttnProcessor2_0``): q/k/v projections -> ``ops.qk_norm_rope`` (the
  LayerNorm over head_dim on q and k, and RoPE from ``image_rotary_emb`` on the video tokens) ->
  ``ops.attention`` -> out projection. It names ``image_rotary_emb`` in its signature: diffusers'
  Attention drops keyword arguments a processor does not name, which would silently lose RoPE. Calls
  it cannot run exactly (an attention mask, cross-attention, norms other than LayerNorm, a RoPE table
  of the wrong length, head dims the op does not take) run the original processor (noted once).
- ``FusedCogVideoXBlock`` (module swap of ``CogVideoXBlock``): the block over the joint
  [text | video] sequence: norm1 is one ``ops.adaln_modulate`` (two modulation sets, one per
  segment), attention (our processor's joint path, no split / concat), the gated residual and norm2
  in one ``ops.gated_residual_adaln``, the FFN, the last gated residual. Same arithmetic as
  diffusers' block (CogVideoXLayerNormZero: ``norm(x) * (1 + scale) + shift``, gates multiply).
- ``FusedCogVideoXLayerNormZero``: the same for a LayerNormZero outside a standard block.
- ``FusedGELU``: diffusers' ``GELU(approximate="tanh")`` (the FFN's first half) -> ``ops.ffn_gelu``.
- FP8: the block linears (``attn1.to_q/to_k/to_v/to_out.0``, ``ff.net.0.proj``, ``ff.net.2``); the
  AdaLN projections (``norm1/norm2.linear``), embeddings and output head stay in high precision.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.activations import GELU
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
from diffusers.models.normalization import CogVideoXLayerNormZero
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

from wam_fast import ops
from wam_fast.compiler import session as session_module  # attention_fn looked up per call (tests swap it)
from wam_fast.compiler.session import Session, check_backend_available, compile_kwargs, module_device
from wam_fast.ops import reference as WF
from wam_fast.ops.registry import note_fallback
from wam_fast.quant import FP8Linear
from wam_fast.utils.modules import retype, set_submodule

FP8_LINEARS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")
TEXT, VIDEO = 1, 0  # modulation sets in a CogVideoXLayerNormZero table (video's (shift, scale, gate) come first)


def _note(reasons: List[str]) -> None:
    note_fallback("attention", "diffusers CogVideoXAttnProcessor2_0 (original)", reasons)


# ---- attention processor -------------------------------------------------------------------------------
class CogVideoXAttnProcessor:
    """CogVideoX joint attention through wam_fast.ops (module docstring); falls back per call to
    diffusers' ``CogVideoXAttnProcessor2_0`` for what it cannot run exactly."""

    def __init__(self, attention: str = "auto"):
        self.attention = attention
        self.original = CogVideoXAttnProcessor2_0()

    @staticmethod
    def module_reasons(attn) -> List[str]:
        """Why this attention module cannot use the processor at all (checked once, at compile)."""
        reasons = []
        if getattr(attn, "is_cross_attention", False):
            reasons.append("cross-attention")
        if getattr(attn, "to_q", None) is None or getattr(attn, "to_k", None) is None or \
                getattr(attn, "to_v", None) is None:
            reasons.append("no separate to_q/to_k/to_v (fused projections)")
        for name in ("norm_q", "norm_k"):
            norm = getattr(attn, name, None)
            if type(norm) is not nn.LayerNorm:
                reasons.append(f"{name} is {type(norm).__name__} (qk_norm_rope is a LayerNorm over head_dim)")
        if not reasons and attn.norm_q.eps != attn.norm_k.eps:
            reasons.append(f"norm_q eps {attn.norm_q.eps} != norm_k eps {attn.norm_k.eps}")
        head_dim = attn.inner_dim // attn.heads if hasattr(attn, "inner_dim") else None
        why = ops.op_module("attention").head_dim_reason(head_dim) if head_dim else "head_dim unknown"
        if why:
            reasons.append(f"wam_fast.ops.attention: {why}")
        return reasons

    def call_reasons(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb) -> List[str]:
        reasons = []
        if attention_mask is not None:
            reasons.append("attention_mask given")
        if encoder_hidden_states is None:
            reasons.append("no encoder_hidden_states (CogVideoX attends over [text | video])")
        elif image_rotary_emb is not None:
            cos = image_rotary_emb[0]
            want = (hidden_states.shape[1], attn.inner_dim // attn.heads)
            if tuple(cos.shape) != want:
                reasons.append(f"image_rotary_emb tables of shape {tuple(cos.shape)}, expected {want} "
                               f"(video tokens, head_dim)")
        return reasons

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: Optional[torch.Tensor] = None,
                 image_rotary_emb: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        reasons = self.module_reasons(attn) + self.call_reasons(attn, hidden_states, encoder_hidden_states,
                                                                attention_mask, image_rotary_emb)
        if reasons:
            _note(reasons)
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask=attention_mask,
                                 image_rotary_emb=image_rotary_emb)
        text_len = encoder_hidden_states.shape[1]
        out = self.joint(attn, torch.cat((encoder_hidden_states, hidden_states), dim=1), text_len, image_rotary_emb)
        return out[:, text_len:], out[:, :text_len]

    def joint(self, attn, x: torch.Tensor, text_len: int, image_rotary_emb) -> torch.Tensor:
        """Attention over the joint [text | video] sequence x (B, N, D) -> (B, N, D); RoPE on x[:, text_len:]."""
        b, n, _ = x.shape
        heads = attn.heads
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        hd = q.shape[-1] // heads
        q, k, v = (t.view(b, n, heads, hd).transpose(1, 2) for t in (q, k, v))
        if image_rotary_emb is None:
            cos = sin = torch.zeros((0, hd), dtype=torch.float32, device=x.device)
            start = end = n
        else:
            cos, sin = (t.to(device=x.device, dtype=torch.float32) for t in image_rotary_emb)
            start, end = text_len, n
        q, k = ops.qk_norm_rope(q, k, attn.norm_q.weight, attn.norm_q.bias, attn.norm_k.weight, attn.norm_k.bias,
                                cos, sin, start, end, attn.norm_q.eps)
        o = session_module.attention_fn(self.attention)(q, k, v)
        o = o.transpose(1, 2).reshape(b, n, heads * hd)
        return attn.to_out[1](attn.to_out[0](o))


# ---- AdaLN, gating, GELU -----------------------------------------------------------------------------------
def _norm_reasons(norm) -> List[str]:
    if type(norm) is not CogVideoXLayerNormZero:
        return [f"{type(norm).__name__} is not CogVideoXLayerNormZero"]
    reasons = []
    if type(norm.norm) is not nn.LayerNorm:
        reasons.append(f"its norm is {type(norm.norm).__name__}, not nn.LayerNorm")
    elif norm.linear.out_features != 6 * norm.norm.normalized_shape[-1]:
        reasons.append(f"its projection gives {norm.linear.out_features} values, not 6 x "
                       f"{norm.norm.normalized_shape[-1]}")
    if type(norm.silu) is not nn.SiLU:
        reasons.append(f"its activation is {type(norm.silu).__name__}, not SiLU")
    return reasons


def _tables(norm: CogVideoXLayerNormZero, temb: torch.Tensor):
    """(shift, scale, gate), each (B, 2, D) views: set 0 video, set 1 text (CogVideoX's chunk order)."""
    table = norm.linear(norm.silu(temb)).unflatten(1, (2, 3, -1))  # (B, set, 3, D)
    return table[:, :, 0], table[:, :, 1], table[:, :, 2]


class FusedCogVideoXLayerNormZero(CogVideoXLayerNormZero):
    """CogVideoXLayerNormZero with each segment's LayerNorm + modulation in one adaln_modulate."""

    def forward(self, hidden_states, encoder_hidden_states, temb):
        shift, scale, gate = _tables(self, temb)
        w, b, eps = self.norm.weight, self.norm.bias, self.norm.eps
        h = ops.adaln_modulate(hidden_states, shift[:, VIDEO:VIDEO + 1], scale[:, VIDEO:VIDEO + 1],
                               (hidden_states.shape[1],), (0,), w, b, eps)
        e = ops.adaln_modulate(encoder_hidden_states, shift[:, TEXT:TEXT + 1], scale[:, TEXT:TEXT + 1],
                               (encoder_hidden_states.shape[1],), (0,), w, b, eps)
        return h, e, gate[:, VIDEO:VIDEO + 1], gate[:, TEXT:TEXT + 1]


class FusedCogVideoXBlock(CogVideoXBlock):
    """CogVideoXBlock over the joint [text | video] sequence with wam_fast's AdaLN ops (module docstring).
    Same signature and outputs (hidden_states, encoder_hidden_states)."""

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, attention_kwargs=None):
        text_len = encoder_hidden_states.shape[1]
        segments, sets = (text_len, hidden_states.shape[1]), (TEXT, VIDEO)
        x = torch.cat((encoder_hidden_states, hidden_states), dim=1)
        shift1, scale1, gate1 = _tables(self.norm1, temb)
        n1 = self.norm1.norm
        y = ops.adaln_modulate(x, shift1, scale1, segments, sets, n1.weight, n1.bias, n1.eps)
        processor = getattr(self.attn1, "processor", None)
        if isinstance(processor, CogVideoXAttnProcessor) and not attention_kwargs and \
                not processor.module_reasons(self.attn1) and \
                not processor.call_reasons(self.attn1, hidden_states, encoder_hidden_states, None, image_rotary_emb):
            attn = processor.joint(self.attn1, y, text_len, image_rotary_emb)  # no split and re-concat
        else:
            attn_h, attn_e = self.attn1(hidden_states=y[:, text_len:], encoder_hidden_states=y[:, :text_len],
                                        image_rotary_emb=image_rotary_emb, **(attention_kwargs or {}))
            attn = torch.cat((attn_e, attn_h), dim=1)
        shift2, scale2, gate2 = _tables(self.norm2, temb)
        n2 = self.norm2.norm
        r, y = ops.gated_residual_adaln(x, attn, gate1, shift2, scale2, segments, sets, n2.weight, n2.bias, n2.eps)
        out = WF.gated_residual(r, self.ff(y), gate2, segments, sets)
        return out[:, text_len:], out[:, :text_len]


class FusedGELU(GELU):
    """diffusers GELU(approximate="tanh"): Linear + GELU-tanh as one ffn_gelu op."""

    def forward(self, hidden_states):
        return ops.ffn_gelu(hidden_states, self.proj.weight, self.proj.bias)


_DESCRIBE = {
    "FusedCogVideoXBlock": "norm1 = one adaln_modulate over [text | video]; gate + norm2 = gated_residual_adaln",
    "FusedCogVideoXLayerNormZero": "adaln_modulate per segment",
    "FusedGELU": "ffn_gelu op (GEMM + bias + GELU-tanh)",
}


def _describe(where, old, new) -> str:
    if isinstance(new, FP8Linear):
        return f"nn.Linear({old.in_features} -> {old.out_features}) -> FP8Linear (float8 e4m3, {new.activation})"
    what = _DESCRIBE.get(type(new).__name__)
    return f"{type(old).__name__} -> {type(new).__name__}" + (f" ({what})" if what else "")


# ---- the handler -------------------------------------------------------------------------------------------
def _fp8_reason(name: str, module: nn.Module) -> Optional[str]:
    if type(module) is not nn.Linear:
        return f"{type(module).__name__} is an nn.Linear subclass"
    parts = name.split(".")
    in_block = len(parts) > 2 and parts[0] == "transformer_blocks" and ".".join(parts[2:]) in FP8_LINEARS
    if not in_block:
        if name.endswith(("norm1.linear", "norm2.linear")):
            return "AdaLN projection (B rows: no GEMM to speed up; its error would bias a whole segment)"
        if name.startswith(("patch_embed", "time_embedding", "ofs_embedding")):
            return "embedding (negligible FLOPs; raw inputs with outlier channels)"
        if name.startswith(("proj_out", "norm_out")):
            return "output head / its AdaLN (writes the prediction itself)"
        return "not a block linear of the backbone"
    if module.in_features % 16 or module.out_features % 16:
        return f"in/out features ({module.in_features}, {module.out_features}) are not multiples of 16"
    return None


def compile_cogvideox(model, config, filter_fn, report, example_inputs):
    """CogVideoXTransformer3DModel: attention processor, fused AdaLN blocks and GELU, FP8, torch.compile."""
    device = module_device(model)
    check_backend_available(config, device)
    compile_kwargs(config, device)
    session = Session(model, config, filter_fn, report, example_inputs)

    if config.fused:
        old = dict(model.attn_processors)  # "transformer_blocks.0.attn1.processor" -> processor
        new = {}
        for key, processor in old.items():
            name = key[:-len(".processor")]
            attn = model.get_submodule(name)
            why = []
            if type(processor) is not CogVideoXAttnProcessor2_0:
                why.append(f"its processor is {type(processor).__name__}, not diffusers' default "
                           f"CogVideoXAttnProcessor2_0")
            why += CogVideoXAttnProcessor.module_reasons(attn)
            if not session.accepts(attn, name):
                why.append("excluded by filter_fn")
            new[key] = processor if why else CogVideoXAttnProcessor(config.attention)
            if why:
                report.skip(name, f"attention processor left as is: {'; '.join(why)}")

        def set_processors():
            changed = [key for key in old if new[key] is not old[key]]
            if not changed:
                return None
            model.set_attn_processor(dict(new))
            for key in changed:
                report.apply(key, "CogVideoXAttnProcessor2_0 -> wam_fast CogVideoXAttnProcessor (qk_norm_rope with "
                                  "image_rotary_emb, ops.attention; masks and the like fall back per call)")
            return lambda: model.set_attn_processor(dict(old))

        session.lever("attention", "rel", set_processors)

        def swap_norms():
            for name, module in list(model.named_modules()):
                if not session.accepts(module, name):
                    continue
                if type(module) is CogVideoXBlock:
                    why = _norm_reasons(module.norm1) + _norm_reasons(module.norm2)
                    if why:
                        report.skip(name, f"block left as is: {'; '.join(why)}")
                    else:
                        set_submodule(model, name, retype(module, FusedCogVideoXBlock))
                elif type(module) is CogVideoXLayerNormZero and type(
                        model.get_submodule(name.rpartition(".")[0]) if "." in name else model) not in (
                        CogVideoXBlock, FusedCogVideoXBlock):  # a standard block's norms go with the block
                    why = _norm_reasons(module)
                    if why:
                        report.skip(name, f"left as is: {'; '.join(why)}")
                    else:
                        set_submodule(model, name, retype(module, FusedCogVideoXLayerNormZero))
                elif type(module) is GELU:
                    proj = name + ".proj"
                    if module.approximate != "tanh":
                        report.skip(name, f"GELU(approximate={module.approximate!r}) left as is: ffn_gelu is the "
                                          f"tanh form")
                    elif type(module.proj) is not nn.Linear:
                        report.skip(name, f"GELU left as is: its proj is {type(module.proj).__name__}")
                    elif config.fp8 and session.accepts(module.proj, proj) and _fp8_reason(proj, module.proj) is None:
                        report.skip(name, "GELU left as is: its proj is quantized to FP8 (fp8=True), and ffn_gelu "
                                          "takes a high-precision weight")
                    else:
                        set_submodule(model, name, retype(module, FusedGELU))

        session.swap_lever("fused", "rel", swap_norms, _describe)
        # a CogVideoXBlock subclass keeps its forward: its LayerNormZeros are fused on their own
        for name, module in list(model.named_modules()):
            if isinstance(module, CogVideoXBlock) and type(module) not in (CogVideoXBlock, FusedCogVideoXBlock):
                report.skip(name, f"{type(module).__name__} (a CogVideoXBlock subclass) keeps its own forward")
    else:
        report.skip("fused", "fused=False: diffusers' processors and modules run")

    session.fp8(lambda module, name: _fp8_reason(name, module))
    if config.cache:
        report.skip("cache", "CogVideoX is bidirectional (every token attends to the noisy ones), so no K/V can be "
                             "reused exactly: convert it (wam_fast.compiler.from_cogvideox), distill a mask='temporal' "
                             "student and compile its WAMPolicy")
    session.torch_compile("module")


HANDLERS = {CogVideoXTransformer3DModel: compile_cogvideox}  # model type -> handler, for the dispatch

__all__ = ["CogVideoXAttnProcessor", "FusedCogVideoXBlock", "FusedCogVideoXLayerNormZero", "FusedGELU",
           "compile_cogvideox", "FP8_LINEARS"]
