"""The reference world action model: VideoVLA's CogVideoX-5B anatomy in plain PyTorch.

Built from named pieces (``AdaLNModulate``, ``Attention``, ``GatedResidualAdaLN``, ``FeedForward``,
``WAMBlock``) so that fused versions replace them by module swap without editing this file.
"""
from __future__ import annotations

import collections
import math
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from wam_fast.configs import WAMConfig
from wam_fast.models import checkpoint
from wam_fast.models.layout import SegmentLayout, build_layout
from wam_fast.models.validation import check_forward_inputs
from wam_fast.ops import reference as WF


class ForwardContext:
    """What every block of one forward shares: segments, RoPE tables, and how attention runs.

    ``plan(q, k, v, layer, attention_fn)`` computes the attention output of layer ``layer`` with
    ``attention_fn`` (``functional.attention`` or ``wam_fast.ops.attention``, same signature); by
    default the layout's rule (``FullAttention`` or ``TemporalAttention``). A KV cache passes its own
    plan, which also stores the layer's K/V (``wam_fast.cache``). ``layer`` is set by the model's
    block loop before each block. ``modulation``: None, or every block's AdaLN table precomputed,
    (layers, B, S, 2, 3, D) (``WAMTransformer.modulation_tables``), which the blocks then read
    instead of running their AdaLN projections (a KV cache does this for a fixed step grid).

    The device tensors (RoPE tables, segment ids) come from ``layout_tables``: built once per layout,
    on the device, never copied from the host during a forward.
    """

    def __init__(self, layout: SegmentLayout, config: WAMConfig, device: torch.device, plan=None):
        self.layout = layout
        self.segments = layout.lengths
        self.mod_index = tuple(range(layout.num_segments))  # one modulation set per segment
        # per segment: which half of each block's AdaLN table it reads (video = 0, text = 1)
        self.adaln_half = tuple(1 - m for m in layout.mod_set)
        tables = layout_tables(layout, config, device)
        self.rope_start, self.rope_end = layout.video_span
        self.rope_cos, self.rope_sin = tables["rope_cos"], tables["rope_sin"]
        if plan is None:
            plan = FullAttention() if layout.mask == "full" else TemporalAttention(layout, tables)
        self.plan = plan
        self.layer = 0
        self.modulation: Optional[torch.Tensor] = None

    def kv_out(self):
        """(k_out, v_out): where the plan keeps this layer's K/V (a KV cache's buffers), for a kernel
        that writes them in place of a copy; None when the plan keeps none."""
        kv_out = getattr(self.plan, "kv_out", None)
        return None if kv_out is None else kv_out(self.layer)

    def attend(self, q, k, v, attention_fn):
        """(B, H, N, hd) q, k, v of this forward's tokens -> attention output (B, H, N, hd)."""
        return self.plan(q, k, v, self.layer, attention_fn)


def positions_tensor(values, device) -> torch.Tensor:
    """float32 tensor of the ints ``values``, made on ``device`` from aranges (no host-to-device copy)."""
    values = tuple(int(v) for v in values)
    runs, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1:
            runs.append(torch.arange(values[start], values[i - 1] + 1, dtype=torch.float32, device=device))
            start = i
    if not runs:
        return torch.zeros(0, dtype=torch.float32, device=device)
    return runs[0] if len(runs) == 1 else torch.cat(runs)


def rope_tables(config: WAMConfig, frame_positions, device, tokens_per_frame=None):
    """float32 (frames * tokens_per_frame, head_dim) cos, sin for frames at ``frame_positions`` (ints,
    or a float tensor on ``device``: the KV cache's frame ages live on the device).

    With ``tokens_per_frame`` given, only the time axis rotates (rows and columns at 0): the table
    that moves a frame's keys in time by ``frame_positions`` (history key shifts)."""
    if not isinstance(frame_positions, torch.Tensor):
        frame_positions = positions_tensor(frame_positions, device)
    if tokens_per_frame is None:
        grid = (config.latent_height // config.patch_size, config.latent_width // config.patch_size)
        return WF.rope_cos_sin(frame_positions, *grid, config.rope_axes, config.rope_theta, device)
    cos, sin = WF.rope_cos_sin(frame_positions, 1, 1, config.rope_axes, config.rope_theta, device)
    return cos.repeat_interleave(tokens_per_frame, 0), sin.repeat_interleave(tokens_per_frame, 0)


_LAYOUT_TABLES: "collections.OrderedDict[tuple, dict]" = collections.OrderedDict()
_LAYOUT_TABLES_MAX = 64


def layout_tables(layout: SegmentLayout, config: WAMConfig, device) -> dict:
    """The device tensors of one layout: RoPE tables and, for mask="temporal", the segment ids and
    history key shifts of ``TemporalAttention``. Built once per (layout, config, device) and kept;
    while torch.compile traces they are built inline (factory ops only: constants of the graph)."""
    if torch.compiler.is_compiling():
        return _build_layout_tables(layout, config, device)
    key = (layout, config, torch.device(device))
    tables = _LAYOUT_TABLES.get(key)
    if tables is None:
        # plain constants whatever the caller's mode: an inference tensor kept here would break a later
        # forward under autograd (training), and a graph-tracked one would hold a graph
        with torch.inference_mode(False), torch.no_grad():
            tables = _LAYOUT_TABLES[key] = _build_layout_tables(layout, config, device)
        while len(_LAYOUT_TABLES) > _LAYOUT_TABLES_MAX:
            _LAYOUT_TABLES.popitem(last=False)
    return tables


def _build_layout_tables(layout: SegmentLayout, config: WAMConfig, device) -> dict:
    tables = {}
    tables["rope_cos"], tables["rope_sin"] = rope_tables(config, layout.rope_positions, device)
    if layout.mask == "temporal":
        text, context, tpf = layout.text_len, layout.context_len, layout.tokens_per_frame
        tables["frame_query_segments"] = torch.ones(tpf, dtype=torch.int32, device=device)
        key_segments = []
        for f in range(layout.clean_frames):  # 0 text, 1 this frame, 2 another frame (hidden)
            ids = torch.full((context,), 2, dtype=torch.int32, device=device)
            ids[:text] = 0
            ids[text + f * tpf:text + (f + 1) * tpf] = 1
            key_segments.append(ids)
        tables["frame_key_segments"] = key_segments
        tables["shift_cos"], tables["shift_sin"] = rope_tables(config, layout.history_key_shifts, device, tpf)
    return tables


class FullAttention:
    """mask="full": every query sees every key."""

    def __call__(self, q, k, v, layer, attention_fn):
        return attention_fn(q, k, v, None, None, "full")


class TemporalAttention:
    """mask="temporal" (rule in ``wam_fast.models.layout``) as 2 + clean_frames calls that need no
    (N, N) mask: text -> text; each clean frame -> text + itself (segment ids hide the other frames);
    noisy -> everything, with history keys moved back in time by their age. A KV cache runs the same
    calls over its buffers, which is why cached and uncached runs agree to rounding."""

    def __init__(self, layout: SegmentLayout, tables: dict):
        self.text, self.context = layout.text_len, layout.context_len
        tpf = layout.tokens_per_frame
        self.frames = [(self.text + f * tpf, self.text + (f + 1) * tpf) for f in range(layout.clean_frames)]
        self.frame_query_segments = tables["frame_query_segments"]
        self.frame_key_segments = tables["frame_key_segments"]
        self.shift_cos, self.shift_sin = tables["shift_cos"], tables["shift_sin"]

    def __call__(self, q, k, v, layer, attention_fn):
        text, context = self.text, self.context
        out = [attention_fn(q[:, :, :text], k[:, :, :text], v[:, :, :text], None, None, "full")]
        for (start, end), key_segments in zip(self.frames, self.frame_key_segments):
            out.append(attention_fn(q[:, :, start:end], k[:, :, :context], v[:, :, :context],
                                    self.frame_query_segments, key_segments, "temporal"))
        if context < q.shape[2]:
            if self.frames:
                k = torch.cat((k[:, :, :text], shift_keys(k[:, :, text:context], self.shift_cos, self.shift_sin),
                               k[:, :, context:]), dim=2)
            out.append(attention_fn(q[:, :, context:], k, v, None, None, "full"))
        return torch.cat(out, dim=2)


def shift_keys(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate encoded keys in time (a history frame seen at its age), in float32, back to k's dtype."""
    return WF.apply_rope(k, cos, sin)


def timestep_sinusoid(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(...,) -> (..., dim) float32, [cos | sin] halves (CogVideoX: flip_sin_to_cos, shift 0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=timesteps.device) / half)
    angles = timesteps.float()[..., None] * freqs
    emb = torch.cat((angles.cos(), angles.sin()), dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedding(nn.Module):
    """Sinusoid of width hidden_dim -> Linear -> SiLU -> Linear to time_embed_dim."""

    def __init__(self, hidden_dim: int, time_embed_dim: int):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.linear_1 = nn.Linear(hidden_dim, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        emb = timestep_sinusoid(timesteps, self.hidden_dim).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))


class PatchEmbed(nn.Module):
    """Per-frame p x p patches -> tokens ordered (frame, row, column)."""

    def __init__(self, in_channels: int, hidden_dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:  # (B, F, C, H, W) -> (B, F*h*w, D)
        b, f = frames.shape[:2]
        tokens = self.proj(frames.flatten(0, 1)).flatten(2).transpose(1, 2)
        return tokens.reshape(b, -1, tokens.shape[-1])


class ActionEmbed(nn.Module):
    """Linear(action_dim -> D) + learned position per chunk row (+ optional robot-id embedding; + with
    ``action_prefix``, the learned ``committed`` vector on rows that hold clean committed actions)."""

    def __init__(self, action_dim: int, action_len: int, hidden_dim: int, num_robots: int = 0,
                 action_prefix: bool = False):
        super().__init__()
        self.proj = nn.Linear(action_dim, hidden_dim)
        self.position = nn.Parameter(torch.randn(action_len, hidden_dim) * 0.02)
        self.robot = nn.Embedding(num_robots, hidden_dim) if num_robots else None
        # zero at first: a student made from a teacher starts as the teacher
        self.committed = nn.Parameter(torch.zeros(hidden_dim)) if action_prefix else None

    def forward(self, actions: torch.Tensor, robot_id: Optional[torch.Tensor] = None,
                committed: Optional[torch.Tensor] = None) -> torch.Tensor:
        tokens = self.proj(actions) + self.position
        if self.robot is not None:
            tokens = tokens + self.robot(robot_id)[:, None, :]
        if committed is not None:
            tokens = tokens + committed.to(tokens.dtype) * self.committed
        return tokens


class AdaLNModulate(nn.Module):
    """Affine LayerNorm, then per-segment (1 + scale) and shift."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x, shift, scale, ctx: ForwardContext):
        return WF.adaln_modulate(x, shift, scale, ctx.segments, ctx.mod_index,
                                 self.norm.weight, self.norm.bias, self.norm.eps)


class GatedResidualAdaLN(nn.Module):
    """r = residual + gate * x, then the next AdaLN on r; returns (r, modulated r)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, residual, x, gate, shift, scale, ctx: ForwardContext):
        return WF.gated_residual_adaln(residual, x, gate, shift, scale, ctx.segments, ctx.mod_index,
                                       self.norm.weight, self.norm.bias, self.norm.eps)


class Attention(nn.Module):
    """Fused QKV (bias) -> LayerNorm on q, k over head_dim -> RoPE on the video slice -> SDPA -> out proj."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, qk_norm_eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.norm_q = nn.LayerNorm(head_dim, eps=qk_norm_eps)
        self.norm_k = nn.LayerNorm(head_dim, eps=qk_norm_eps)
        self.out = nn.Linear(num_heads * head_dim, dim)

    def forward(self, x, ctx: ForwardContext):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = WF.qk_norm_rope(q, k, self.norm_q.weight, self.norm_q.bias, self.norm_k.weight,
                               self.norm_k.bias, ctx.rope_cos, ctx.rope_sin,
                               ctx.rope_start, ctx.rope_end, self.norm_q.eps)
        o = ctx.attend(q, k, v, WF.attention)
        return self.out(o.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    """Linear -> GELU(tanh) -> Linear."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj_in = nn.Linear(dim, inner_dim)
        self.proj_out = nn.Linear(inner_dim, dim)

    def forward(self, x):
        return self.proj_out(F.gelu(self.proj_in(x), approximate="tanh"))


class WAMBlock(nn.Module):
    """One CogVideoX-style expert-AdaLN block over text | video | action tokens.

    ``adaln``: SiLU -> Linear(time_embed_dim -> 12 D), chunked as CogVideoX's two LayerNormZero
    projections: for norm1 then norm2, (shift, scale, gate) of the video set then of the text set.
    """

    def __init__(self, config: WAMConfig):
        super().__init__()
        dim = config.hidden_dim
        self.adaln = nn.Linear(config.time_embed_dim, 12 * dim)
        self.norm1 = AdaLNModulate(dim, config.norm_eps)
        self.attn = Attention(dim, config.num_heads, config.head_dim, config.qk_norm_eps)
        self.norm2 = GatedResidualAdaLN(dim, config.norm_eps)
        self.ff = FeedForward(dim, config.ffn_dim)

    def modulation(self, temb: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """(B, S, E) per-segment time embeddings -> (B, S, 2 norms, 3 (shift, scale, gate), D)."""
        b, s, _ = temb.shape
        table = self.adaln(F.silu(temb)).view(b, s, 2, 2, 3, -1)  # (B, S, norm, set, 3, D)
        # each segment's set picked by Python indices: no index tensor (no host copy, no graph break)
        return torch.stack([table[:, i, :, half] for i, half in enumerate(ctx.adaln_half)], dim=1)

    def forward(self, h, temb, ctx: ForwardContext):
        mod = self.modulation(temb, ctx) if ctx.modulation is None else ctx.modulation[ctx.layer]
        shift1, scale1, gate1 = mod[:, :, 0].unbind(2)
        shift2, scale2, gate2 = mod[:, :, 1].unbind(2)
        attn_out = self.attn(self.norm1(h, shift1, scale1, ctx), ctx)
        h, y = self.norm2(h, attn_out, gate1, shift2, scale2, ctx)
        return self.gated_residual(h, self.ff(y), gate2, ctx)

    def gated_residual(self, residual, x, gate, ctx: ForwardContext):
        """The block's last residual: residual + gate[set] * x."""
        return WF.gated_residual(residual, x, gate, ctx.segments, ctx.mod_index)


class OutputAdaLN(nn.Module):
    """Final AdaLN of one modality: SiLU -> Linear(E -> 2D) gives (shift, scale) on an affine LayerNorm."""

    def __init__(self, time_embed_dim: int, dim: int, eps: float):
        super().__init__()
        self.linear = nn.Linear(time_embed_dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x, temb):  # x (B, n, D), temb (B, E)
        shift, scale = self.linear(F.silu(temb)).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class WAMTransformer(nn.Module):
    """Reference world action model (VideoVLA / CogVideoX-5B anatomy, docs/design.md, Workloads).

    forward(video, text, actions, timestep, image=None, history=None, robot_id=None, step_size=None)
      video    (B, F, C, H, W) noisy latents; F = config.noisy_frames (all latent frames for
               mask="full", the future ones, latent_frames - 1, for mask="temporal", or
               config.future_frames of them: an action-only model takes an empty (B, 0, C, H, W))
      text     (B, text_len, text_dim) text-encoder embeddings (T5-XXL for VideoVLA)
      actions  (B, action_len, action_dim) noisy action chunk
      timestep (B,) denoising timestep in [0, num_train_timesteps), or (B, S) one per segment of
               ``model.layout(...)`` (by default clean context segments get 0)
      image    (B, 1, C, H, W) clean latent of the current observation. full: padded with zeros
               to F frames and concatenated channel-wise (VideoVLA); temporal: its own clean segment.
      history  (B, h, C, H, W) clean past frames, oldest first (the last is one control step
               before the image), h <= history_frames (temporal only)
      robot_id (B,) long, when config.num_robots > 0
      step_size (B,) float (or a number), shortcut students only (config.distillation ==
               "shortcut"; required there, refused elsewhere): the length, in model timesteps, of the
               sampling step the output is used for (num_train_timesteps / steps; 0 = the
               instantaneous velocity a teacher predicts). Its embedding ``step_embed`` is added to
               the time embedding of the noisy segments (video, actions) only, so clean context
               (text, frames) and its K/V do not depend on it (the KV cache stays exact).
    returns (video_out, action_out) shaped like video and actions (video_out empty for an action-only
    model): the v-prediction (or the flow velocity when config.objective == "flow_matching"); for a
    shortcut student, the average velocity over a step of ``step_size``.

    A shortcut student has ``step_embed`` (a TimestepEmbedding) whose last linear is zero at
    initialisation, so a fresh student computes exactly what the same weights without it do.
    """

    def __init__(self, config: WAMConfig):
        super().__init__()
        if not isinstance(config, WAMConfig):
            raise TypeError(f"WAMTransformer expects a WAMConfig, got {type(config).__name__}")
        self.config = config
        dim = config.hidden_dim
        self.patch_embed = PatchEmbed(config.in_channels, dim, config.patch_size)
        self.text_proj = nn.Linear(config.text_dim, dim)
        self.action_embed = ActionEmbed(config.action_dim, config.action_len, dim, config.num_robots,
                                        config.action_prefix)
        self.time_embed = TimestepEmbedding(dim, config.time_embed_dim)
        if config.distillation == "shortcut":
            self.step_embed = TimestepEmbedding(dim, config.time_embed_dim)
            # zero output: a fresh student is exactly its teacher, whatever the step size
            nn.init.zeros_(self.step_embed.linear_2.weight)
            nn.init.zeros_(self.step_embed.linear_2.bias)
        self.blocks = nn.ModuleList(WAMBlock(config) for _ in range(config.num_layers))
        self.norm_final = nn.LayerNorm(dim, eps=config.norm_eps)
        self.video_out_norm = OutputAdaLN(config.time_embed_dim, dim, config.norm_eps)
        self.video_proj = nn.Linear(dim, config.patch_size ** 2 * config.latent_channels)
        self.action_out_norm = OutputAdaLN(config.time_embed_dim, dim, config.norm_eps)
        self.action_proj = nn.Linear(dim, config.action_dim)

    # ---- layout ---------------------------------------------------------------------------------
    def layout(self, num_history: int = 0, has_image: bool = True) -> SegmentLayout:
        """The segment layout of a forward with ``num_history`` history frames and an image or not."""
        return build_layout(self.config, num_history, has_image)

    def noisy_video_shape(self, batch: int) -> Tuple[int, ...]:
        c = self.config
        return (batch, c.noisy_frames, c.latent_channels, c.latent_height, c.latent_width)

    def action_shape(self, batch: int) -> Tuple[int, ...]:
        return (batch, self.config.action_len, self.config.action_dim)

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, video, text, actions, timestep, image=None, history=None, robot_id=None, step_size=None,
                committed=None):
        c = self.config
        timestep, layout, step_size = check_forward_inputs(self, video, text, actions, timestep, image, history,
                                                           robot_id, step_size, committed)
        ctx = ForwardContext(layout, c, video.device)

        tokens = [self.text_proj(text)]
        if c.mask == "temporal":
            clean = [frames for frames in (history, image) if frames is not None]
            if clean:
                tokens.append(self.embed_clean_frames(torch.cat(clean, dim=1)))
        if c.noisy_frames:
            tokens.append(self.embed_noisy_video(video, image))
        tokens.append(self.action_embed(actions, robot_id, committed))
        temb = self.embed_time(timestep, layout, step_size)  # (B, S, E)
        h = self.run_blocks(torch.cat(tokens, dim=1), temb, ctx)
        return self.predict(h, temb, layout, video.shape)

    # The pieces of forward, shared with the KV cache (wam_fast.cache), which runs them on parts of
    # the token sequence: text once per instruction, a clean frame once per control step, and only
    # the noisy tokens at each denoising step.
    def embed_time(self, timestep: torch.Tensor, layout: SegmentLayout, step_size=None) -> torch.Tensor:
        """(B, S) float32 per-segment timesteps -> (B, S, E) time embeddings; with ``step_size``
        (B,) float32 (shortcut students), ``step_embed(step_size)`` is added to the noisy segments
        (video and actions, the last of every layout; actions alone for an action-only model) and to no
        clean context segment."""
        temb = self.time_embed(timestep)
        if step_size is None:
            return temb
        start = layout.index("video" if "video" in layout.names else "actions")
        if layout.names[start:] not in (("video", "actions"), ("actions",)):
            raise RuntimeError(f"embed_time expects the noisy segments (video, actions) last, got {layout.names}")
        step = self.step_embed(step_size)[:, None]  # (B, 1, E)
        return torch.cat((temb[:, :start], temb[:, start:] + step), dim=1)

    def embed_clean_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, n, C, H, W) clean frames (temporal) -> tokens. A clean frame sees itself as the image
        channels: what a full-mask teacher sees for frame 0 at t=0."""
        return self.patch_embed(torch.cat((frames, frames), dim=2) if self.config.image_concat else frames)

    def embed_noisy_video(self, video: torch.Tensor, image=None) -> torch.Tensor:
        """Noisy latents -> tokens. full: the image zero-padded to F frames and concatenated on
        channels (zeros without one, VideoVLA); temporal: future frames get zero image channels."""
        if not self.config.image_concat:
            return self.patch_embed(video)
        if self.config.mask == "full" and image is not None:
            padded = F.pad(image, (0, 0, 0, 0, 0, 0, 0, video.shape[1] - 1))
        else:
            padded = torch.zeros_like(video)
        return self.patch_embed(torch.cat((video, padded), dim=2))

    def modulation_tables(self, temb: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Every block's AdaLN table for the time embeddings ``temb`` (B, S, E):
        (layers, B, S, 2 norms, 3, D). Set as ``ctx.modulation``, the blocks skip their projections."""
        return torch.stack([block.modulation(temb, ctx) for block in self.blocks])

    def run_blocks(self, h: torch.Tensor, temb: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """All blocks over the tokens h (B, n, D); temb (B, S, E) one time embedding per segment of ctx."""
        for index, block in enumerate(self.blocks):
            ctx.layer = index
            h = block(h, temb, ctx)
        return h

    def predict(self, h: torch.Tensor, temb: torch.Tensor, layout: SegmentLayout, video_shape):
        """Final norm and heads on the noisy video and action tokens of h (laid out as ``layout``)."""
        h = self.norm_final(h)
        a = self.action_proj(self.action_out_norm(h[:, -self.config.action_len:], temb[:, layout.index("actions")]))
        if "video" not in layout.names:  # action-only: an empty (B, 0, C, H, W) video, no video head
            return h.new_zeros(video_shape), a
        video_start, video_end = layout.span("video")
        v = self.video_out_norm(h[:, video_start:video_end], temb[:, layout.index("video")])
        return self.unpatchify(self.video_proj(v), video_shape), a

    def unpatchify(self, patches: torch.Tensor, video_shape) -> torch.Tensor:
        """(B, F*h*w, C*p*p) -> (B, F, C, H, W); patch features ordered (C, p, p)."""
        b, f, ch, height, width = video_shape
        p = self.config.patch_size
        x = patches.reshape(b, f, height // p, width // p, ch, p, p)
        return x.permute(0, 1, 4, 2, 5, 3, 6).reshape(b, f, ch, height, width)

    # ---- checkpoints ----------------------------------------------------------------------------
    def save_pretrained(self, directory) -> None:
        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, device=None, dtype=None) -> "WAMTransformer":
        return load_pretrained(directory, device=device, dtype=dtype)


def save_pretrained(model: WAMTransformer, directory) -> Path:
    """Write ``model`` to ``directory`` (model.safetensors + config.json, atomically); returns the directory."""
    if not isinstance(model, WAMTransformer):
        raise TypeError(f"save_pretrained expects a WAMTransformer, got {type(model).__name__}")
    return checkpoint.write_checkpoint(model, directory)


def load_pretrained(directory, device=None, dtype=None, verify: bool = True) -> WAMTransformer:
    """Load a WAMTransformer saved by ``save_pretrained`` (on ``device``, cast to ``dtype`` if given).
    ``verify`` (default): check the files against their sha256 in checksums.json first."""
    return checkpoint.read_checkpoint(directory, WAMTransformer, device=device, dtype=dtype, verify=verify)
