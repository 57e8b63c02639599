"""Temporal-masked KV cache (docs/design.md, KV cache): text once per instruction, a frame once per
control step, and only the noisy tokens at each denoising step.

With ``mask="temporal"`` (rule and RoPE positions in ``wam_fast.models.layout``) the K/V of the text
and of every clean frame depend neither on the noisy tokens nor on the denoising step, nor on which
other frames are in the window. So they are computed once and reused:

    cache = TemporalKVCache(model)            # refuses a mask="full" model, saying why
    cache.setup(batch, max_history)           # static buffers: text | frame slots | noisy tokens
    cache.fill_text(text)                     # once per instruction (every layer's text K/V)
    cache.add_frame(image_latent)             # once per control step; evicts the oldest frame
    video_out, action_out = cache.denoise(video, actions, timestep)   # noisy tokens only

Buffers per layer (static shapes, gpt-fast style, so a sampling loop can be captured in a CUDA
graph): keys/values of ``text_len`` text tokens, ``max_history + 1`` frame slots of
``tokens_per_frame`` tokens and the noisy tokens. Frame slots are a ring: control step s writes slot
``s % (max_history + 1)``, which evicts the frame of step ``s - max_history - 1``; nothing else
moves (attention does not care about key order). A slot without a frame gets a key segment id that
no query sees. Each frame is encoded at the current frame's RoPE position; the keys the noisy tokens
see are those rotated back in time by the frame's age, recomputed from the encoded keys (kept in
``encoded_k``) at each control step, exactly as the uncached model does.

Everything a frame pass decides from the episode's state lives on the device (``slot_steps``: the
control step of each slot's frame, -1 when empty; ``step_count``): which slots the noisy tokens see
and each history frame's age are computed there, so a frame pass launches the same kernels at every
control step and a CUDA graph can hold it (``wam_fast.compiler.graphs``). Its only Python input is
the slot it writes (``step % slots``), which a graph runner captures once per slot. A fixed step grid
(``set_grid``) gets its time embeddings and every block's AdaLN tables computed once (``denoise_at``);
they are recomputed, in place, when the grid or the weights change.
"""
from __future__ import annotations

import numbers
import weakref
from typing import List, Optional, Sequence, Tuple

import torch

from wam_fast.configs import WAMConfig
from wam_fast.models.layout import TEXT_SET, VIDEO_SET, SegmentLayout, noisy_segments
from wam_fast.models.transformer import ForwardContext, rope_tables, shift_keys
from wam_fast.models.validation import check_committed, check_tensor, check_robot_id, check_step_size

# Key segment ids for ``attention(mask="temporal")``: a query (id QUERY) sees keys with id <= QUERY.
VISIBLE, QUERY, HIDDEN = 0, 1, 2


def not_cacheable_message(config: WAMConfig) -> str:
    return (f"a KV cache needs a model with mask='temporal'; this one has mask={config.mask!r} "
            f"(bidirectional, as the released VideoVLA): its text and frame tokens attend to the noisy "
            f"tokens, so their K/V change at every denoising step and cannot be reused exactly. Distill "
            f"it into a temporal-masked student (python -m wam_fast.distill with a mask='temporal' "
            f"student, docs/design.md, Distillation), which is exactly cacheable, or run it uncached (cache=False).")


def pass_layouts(config: WAMConfig) -> Tuple[SegmentLayout, SegmentLayout, SegmentLayout]:
    """The layouts of the cache's three passes: text alone, one clean frame alone, the noisy tokens
    alone; with the same modulation sets and RoPE positions as those tokens have in a full forward."""
    tpf, current = config.tokens_per_frame, config.history_frames
    common = dict(mask="temporal", tokens_per_frame=tpf, current_position=current)
    text = SegmentLayout(names=("text",), lengths=(config.text_len,), mod_set=(TEXT_SET,), noisy=(False,),
                         frame_positions=(), **common)
    frame = SegmentLayout(names=("current",), lengths=(tpf,), mod_set=(VIDEO_SET,), noisy=(False,),
                          frame_positions=(current,), **common)
    names, lengths, positions = noisy_segments(config)  # actions alone for an action-only model
    noisy = SegmentLayout(names=tuple(names), lengths=tuple(lengths), mod_set=(VIDEO_SET,) * len(names),
                          noisy=(True,) * len(names), frame_positions=tuple(positions), **common)
    return text, frame, noisy


class _CachePass:
    """Attention plan of one pass: store this layer's K/V in the cache, attend over the buffers.

    It reaches its cache through a weak reference: the cache owns its passes, and a strong reference
    back would make a cycle that keeps the cache's buffers (GBs for W1) alive until the next gc."""

    def __init__(self, cache: "TemporalKVCache", part: str):
        self._cache, self.part, self.calls = weakref.ref(cache), part, 0
        self.written: Optional[int] = None  # the layer whose K/V the attention module wrote into kv_out

    @property
    def cache(self) -> "TemporalKVCache":
        cache = self._cache()
        if cache is None:
            raise RuntimeError(f"the TemporalKVCache of this {self.part} pass was dropped; its passes run only "
                               f"through the cache (cache.fill_text / add_frame / denoise)")
        return cache

    def kv_out(self, layer: int):
        """The views of the cache's buffers this pass stores layer ``layer``'s K/V in. The caller (a fused
        attention) writes them there itself, so this layer's ``__call__`` copies nothing."""
        self.written = layer
        return self._views(layer)

    def _views(self, layer: int):
        cache = self.cache
        keys, values = cache.k[layer], cache.v[layer]
        if self.part == "text":
            start, end = 0, cache.text_len
        elif self.part == "frame":
            start, end = cache.slot_span(cache.current_slot)
        else:
            start, end = cache.noisy_start, cache.num_keys
        return keys[:, :, start:end], values[:, :, start:end]

    def __call__(self, q, k, v, layer, attention_fn):
        cache = self.cache
        self.calls += 1
        keys, values = cache.k[layer], cache.v[layer]
        k_out, v_out = self._views(layer)
        if self.written != layer:  # else a fused attention wrote them there already (kv_out)
            k_out.copy_(k)
            v_out.copy_(v)
        self.written = None
        if self.part == "text":
            end = cache.text_len
            return attention_fn(q, keys[:, :, :end], values[:, :, :end], None, None, "full")
        if self.part == "frame":
            if cache.encoded_k is not None:  # age 0: the encoded keys are the keys the noisy tokens see
                start, end = cache.slot_span(cache.current_slot)
                cache.encoded_k[layer][:, :, start - cache.text_len:end - cache.text_len].copy_(k_out)
            context = cache.noisy_start
            return attention_fn(q, keys[:, :, :context], values[:, :, :context], cache.query_segments[:q.shape[2]],
                                cache.frame_key_segments, "temporal")
        return attention_fn(q, keys, values, cache.query_segments[:q.shape[2]], cache.noisy_key_segments, "temporal")


class TemporalKVCache:
    """Static K/V buffers of a mask="temporal" WAMTransformer (module docstring).

    ``model`` may be fused (``wam_fast.models.fused.fuse``): the passes call the same block modules.
    Attributes after ``setup``: ``k``, ``v`` (layers, batch, heads, keys, head_dim) in the model's
    dtype; ``encoded_k`` (layers, batch, heads, slots * tokens_per_frame, head_dim) when
    max_history > 0; ``step`` (frames added this episode); ``frames`` (frames held, <= slots).
    """

    def __init__(self, model):
        config = getattr(model, "config", None)
        if not isinstance(config, WAMConfig) or not hasattr(model, "run_blocks"):
            raise TypeError(f"TemporalKVCache expects a WAMTransformer (with .config and .run_blocks), "
                            f"got {type(model).__name__}")
        if config.mask != "temporal":
            raise ValueError(not_cacheable_message(config))
        self.model, self.config = model, config
        self.batch: Optional[int] = None

    # ---- buffers --------------------------------------------------------------------------------
    def setup(self, batch: int, max_history: Optional[int] = None, device=None, dtype=None) -> "TemporalKVCache":
        """Allocate the buffers for ``batch`` rows (cond + uncond rows count separately) and a window
        of ``max_history`` past frames (default config.history_frames); then ``reset()``."""
        c = self.config
        if max_history is None:
            max_history = c.history_frames
        for name, value, low in (("batch", batch, 1), ("max_history", max_history, 0)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"TemporalKVCache.setup: {name} must be an int >= {low}, got {value!r}")
        if max_history > c.history_frames:
            raise ValueError(f"TemporalKVCache.setup: max_history={max_history} exceeds the model's "
                             f"history_frames={c.history_frames} (its RoPE positions end there)")
        param = next(self.model.parameters())
        device = torch.device(device) if device is not None else param.device
        dtype = dtype or param.dtype
        tpf = c.tokens_per_frame
        self.batch, self.max_history, self.slots = int(batch), int(max_history), int(max_history) + 1
        self.text_len, self.tokens_per_frame = c.text_len, tpf
        self.noisy_start = c.text_len + self.slots * tpf
        self.num_keys = self.noisy_start + c.noisy_tokens
        shape = (c.num_layers, self.batch, c.num_heads, self.num_keys, c.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.encoded_k = (torch.zeros(shape[:3] + (self.slots * tpf, c.head_dim), device=device, dtype=dtype)
                          if self.max_history else None)
        self.query_segments = torch.full((max(tpf, c.noisy_tokens),), QUERY, dtype=torch.int32, device=device)
        self.frame_key_segments = torch.full((self.noisy_start,), HIDDEN, dtype=torch.int32, device=device)
        self.noisy_key_segments = torch.full((self.num_keys,), HIDDEN, dtype=torch.int32, device=device)
        # device-side episode state (module docstring): control step of each slot's frame, frames added
        self.slot_step = torch.full((self.slots,), -1, dtype=torch.int64, device=device)
        self.step_count = torch.zeros((), dtype=torch.int64, device=device)
        self.device, self.dtype = device, dtype
        self._grid: Optional[tuple] = None  # (timesteps, step_size) of set_grid
        self._grid_tables: List[Tuple[torch.Tensor, torch.Tensor]] = []  # per step: (temb, modulation)
        self._frame_tables: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._tables_stamp: Optional[tuple] = None
        self._passes = {part: _CachePass(self, part) for part in ("text", "frame", "noisy")}
        self._contexts = {part: ForwardContext(layout, c, device, plan=self._passes[part])
                          for part, layout in zip(("text", "frame", "noisy"), pass_layouts(c))}
        self.reset()
        return self

    def reset(self) -> None:
        """A new episode: no text, no frames (the buffers are kept, their contents ignored)."""
        self._require_setup("reset")
        self.text_ready = False
        self.frame_ready = False  # a frame pass ran this episode (set before note_frame: graphs)
        self.step = 0
        self.current_slot = 0
        self.slot_steps: List[Optional[int]] = [None] * self.slots  # host mirror of the device's slot_step
        self.slot_step.fill_(-1)
        self.step_count.zero_()
        self.frame_key_segments.fill_(HIDDEN)
        self.frame_key_segments[:self.text_len] = VISIBLE
        self.noisy_key_segments.fill_(HIDDEN)
        self.noisy_key_segments[:self.text_len] = VISIBLE
        self.noisy_key_segments[self.noisy_start:] = VISIBLE

    @property
    def frames(self) -> int:
        return sum(s is not None for s in self.slot_steps) if self.batch is not None else 0

    @property
    def cache_bytes(self) -> int:
        """Bytes held by the cache's buffers (K, V, encoded keys, segment ids)."""
        if self.batch is None:
            return 0
        tensors = [self.k, self.v, self.encoded_k, self.query_segments, self.frame_key_segments,
                   self.noisy_key_segments, self.slot_step, self.step_count]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def slot_span(self, slot: int) -> Tuple[int, int]:
        """[start, end) of frame slot ``slot`` among the keys."""
        start = self.text_len + slot * self.tokens_per_frame
        return start, start + self.tokens_per_frame

    # ---- passes ---------------------------------------------------------------------------------
    @torch.no_grad()
    def fill_text(self, text: torch.Tensor) -> None:
        """Every layer's K/V of the instruction's text tokens (B, text_len, text_dim): once per instruction."""
        c = self.config
        self._require_setup("fill_text")
        check_tensor("text", text, (self.batch, c.text_len, c.text_dim), self.dtype, self.device)
        temb = self.model.time_embed(text.new_zeros((self.batch, 1), dtype=torch.float32))
        self._run("text", self.model.text_proj(text), temb)
        self.text_ready = True

    @torch.no_grad()
    def add_frame(self, image_latent: torch.Tensor) -> None:
        """Encode the current observation (B, 1, C, H, W) into the next ring slot: once per control
        step. The frame that was ``max_history + 1`` steps old is evicted."""
        image_latent = self.check_frame(image_latent)
        self.ensure_tables()
        self.frame_pass(image_latent, self.next_slot)
        self.note_frame()

    def check_frame(self, image_latent: torch.Tensor) -> torch.Tensor:
        c = self.config
        self._require_setup("add_frame")
        if not self.text_ready:
            raise RuntimeError("TemporalKVCache.add_frame: no text in the cache: call fill_text(text) first "
                               "(once per instruction; reset() clears it)")
        check_tensor("image_latent", image_latent,
                      (self.batch, 1, c.latent_channels, c.latent_height, c.latent_width), self.dtype, self.device)
        return image_latent

    @property
    def next_slot(self) -> int:
        """The ring slot the next frame goes to."""
        return self.step % self.slots

    def frame_pass(self, image_latent: torch.Tensor, slot: int) -> None:
        """The device work of ``add_frame`` into ring slot ``slot`` (checked inputs): launches the same
        kernels whatever the episode's state, reads nothing back; ``note_frame()`` then advances the
        host mirror."""
        start, end = self.slot_span(slot)
        self.current_slot = slot
        self.frame_ready = True
        self.slot_step[slot].copy_(self.step_count)
        self.frame_key_segments[self.text_len:].fill_(HIDDEN)  # the frame sees the text and itself only
        self.frame_key_segments[start:end].fill_(VISIBLE)
        if self._frame_tables is None:
            self.ensure_tables()
        temb, modulation = self._frame_tables
        # contiguous once here: the patch embedding's tokens are a transposed view, which every op of the
        # first block would otherwise copy
        self._run("frame", self.model.embed_clean_frames(image_latent).contiguous(), temb, modulation)
        self.noisy_key_segments[start:end].fill_(VISIBLE)
        self.step_count.add_(1)
        if self.encoded_k is not None:
            self._age_history_keys()

    def note_frame(self) -> None:
        """Host bookkeeping after a frame pass into ``next_slot``."""
        self.slot_steps[self.next_slot] = self.step
        self.step += 1

    def _age_history_keys(self) -> None:
        # keys the noisy tokens see = encoded keys moved back in time by each frame's age (0 for the
        # current frame, whose rotation is the identity); recomputed from encoded_k, never accumulated.
        # Ages from the device state: empty slots get 0 (their keys are hidden).
        shifts = torch.where(self.slot_step >= 0, self.slot_step - (self.step_count - 1), 0).float()
        cos, sin = rope_tables(self.config, shifts, self.device, self.tokens_per_frame)
        start, end = self.text_len, self.noisy_start
        self.k[:, :, :, start:end] = shift_keys(self.encoded_k, cos, sin)

    # ---- precomputed time embeddings and AdaLN tables -----------------------------------------------
    def _stamp(self) -> tuple:
        """Identity and version of every weight the tables depend on (in-place updates bump _version)."""
        model = self.model
        params = [p for name in ("time_embed", "step_embed") if hasattr(model, name)
                  for p in getattr(model, name).parameters()]
        params += [t for block in model.blocks for t in list(block.adaln.parameters()) + list(block.adaln.buffers())]
        return tuple((t.data_ptr(), t._version) for t in params)

    def ensure_tables(self) -> None:
        """Host side, before a frame pass or a grid's steps: the frame pass's tables exist, and every
        table is recomputed in place when a weight changed since (captured graphs keep their tensors)."""
        self._require_setup("ensure_tables")
        stamp = self._stamp()
        if self._frame_tables is None:
            self._frame_tables = self._compute_frame_tables()
        elif stamp != self._tables_stamp:
            for old, new in zip(self._frame_tables, self._compute_frame_tables()):
                old.copy_(new)
            if self._grid is not None:
                for old, new in zip(self._grid_tables, self._compute_grid_tables(*self._grid)):
                    old[0].copy_(new[0])
                    old[1].copy_(new[1])
        self._tables_stamp = stamp

    # The tables are plain tensors whatever the caller's mode: made under inference_mode they could not
    # be refreshed in place outside it.
    @torch.inference_mode(False)
    @torch.no_grad()
    def _compute_frame_tables(self):
        temb = self.model.time_embed(torch.zeros((self.batch, 1), dtype=torch.float32, device=self.device))
        return temb, self.model.modulation_tables(temb, self._contexts["frame"])

    @torch.inference_mode(False)
    @torch.no_grad()
    def _compute_grid_tables(self, timesteps, step_size):
        model, ctx = self.model, self._contexts["noisy"]
        size = None if step_size is None else torch.full((self.batch,), step_size, device=self.device)
        tables = []
        for t in timesteps:
            timestep = torch.full((self.batch, ctx.layout.num_segments), t, device=self.device)
            temb = model.embed_time(timestep, ctx.layout, size)
            tables.append((temb, model.modulation_tables(temb, ctx)))
        return tables

    @torch.no_grad()
    def set_grid(self, timesteps: Sequence[float], step_size: Optional[float] = None) -> None:
        """The denoising steps ``denoise_at`` will run: their model timesteps (a sampler's fixed grid)
        and a shortcut student's step size. The time embeddings and every block's AdaLN tables of
        each step (and of the frame pass) are computed here once, and again, in place, when the
        weights change; a new grid replaces them. Cheap when nothing changed (call it every chunk)."""
        self._require_setup("set_grid")
        grid = (tuple(float(t) for t in timesteps), None if step_size is None else float(step_size))
        if not grid[0]:
            raise ValueError("TemporalKVCache.set_grid: timesteps is empty")
        if grid != self._grid:
            self._grid = grid
            self._grid_tables = self._compute_grid_tables(*grid)
        self.ensure_tables()

    @property
    def table_tensors(self) -> List[torch.Tensor]:
        """The precomputed time embeddings and AdaLN tables (grid steps, then the frame pass): the
        tensors a captured graph reads, refreshed in place."""
        return [t for pair in self._grid_tables for t in pair] + list(self._frame_tables or ())

    @property
    def grid(self) -> Optional[tuple]:
        """(timesteps, step_size) of ``set_grid``, or None."""
        return self._grid

    @torch.no_grad()
    def denoise(self, video: torch.Tensor, actions: torch.Tensor, timestep, robot_id=None, step_size=None,
                committed=None):
        """One sample-forward of the noisy tokens only, against the cached text and frames:
        video (B, config.noisy_frames, C, H, W) (empty for an action-only model), actions (B, K, A),
        timestep (B,) or a number, step_size (B,) float or a number for a shortcut student (required
        there, refused elsewhere; see WAMTransformer.forward: it reaches the noisy tokens only, so the cached text and frame K/V
        serve every step size). ``committed``: the clean committed action rows of an ``action_prefix``
        model. Returns (video_out, action_out) as the uncached model would for the same inputs."""
        c, model = self.config, self.model
        self._check_denoise(video, actions, robot_id, committed)
        step_size = check_step_size(c, step_size, self.batch, self.device)
        layout = self._contexts["noisy"].layout
        if isinstance(timestep, numbers.Real):
            timestep = torch.full((self.batch,), float(timestep), device=self.device)
        check_tensor("timestep", timestep, (self.batch,), None, self.device)
        # every segment (video, actions) is noisy; no host-to-device copy, so a CUDA graph can hold this
        temb = model.embed_time(timestep.float()[:, None].expand(-1, layout.num_segments), layout, step_size)
        return self._denoise(video, actions, robot_id, temb, None, committed)

    @torch.no_grad()
    def denoise_at(self, step: int, video: torch.Tensor, actions: torch.Tensor, robot_id=None, committed=None):
        """``denoise`` at step ``step`` of the grid of ``set_grid`` (its timestep and step size), with
        the time embedding and AdaLN tables computed there: no AdaLN projection runs here."""
        if self._grid is None:
            raise RuntimeError("TemporalKVCache.denoise_at: call set_grid(timesteps, step_size) first")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or not 0 <= step < len(self._grid[0]):
            raise ValueError(f"TemporalKVCache.denoise_at: step must be an int in [0, {len(self._grid[0])}) "
                             f"(the grid's steps), got {step!r}")
        self._check_denoise(video, actions, robot_id, committed)
        temb, modulation = self._grid_tables[step]
        return self._denoise(video, actions, robot_id, temb, modulation, committed)

    def _check_denoise(self, video, actions, robot_id, committed=None) -> None:
        model = self.model
        self._require_setup("denoise")
        if not self.text_ready or not self.frame_ready:
            raise RuntimeError("TemporalKVCache.denoise: the cache holds no "
                               + ("text: call fill_text(text)" if not self.text_ready else
                                  "frame: call add_frame(image_latent)") + " first")
        check_tensor("video", video, model.noisy_video_shape(self.batch), self.dtype, self.device)
        check_tensor("actions", actions, model.action_shape(self.batch), self.dtype, self.device)
        check_robot_id(self.config, robot_id, self.batch, self.device)
        check_committed(self.config, committed, self.batch, self.device)

    def _denoise(self, video, actions, robot_id, temb, modulation, committed=None):
        model, layout = self.model, self._contexts["noisy"].layout
        h = model.action_embed(actions, robot_id, committed)
        if self.config.noisy_frames:
            h = torch.cat((model.embed_noisy_video(video), h), dim=1)
        return model.predict(self._run("noisy", h, temb, modulation), temb, layout, video.shape)

    def _run(self, part: str, h: torch.Tensor, temb: torch.Tensor, modulation=None) -> torch.Tensor:
        plan, ctx = self._passes[part], self._contexts[part]
        plan.calls = 0
        ctx.modulation = modulation
        try:
            h = self.model.run_blocks(h, temb, ctx)
        finally:
            ctx.modulation = None
        if plan.calls != self.config.num_layers:
            raise RuntimeError(f"TemporalKVCache: {plan.calls} of {self.config.num_layers} layers ran attention "
                               f"through ctx.attend; a swapped attention module that bypasses it cannot be cached")
        return h

    def _require_setup(self, what: str) -> None:
        if self.batch is None:
            raise RuntimeError(f"TemporalKVCache.{what}: call setup(batch, max_history) first")


# ---- accounting (arithmetic from the config; nothing is allocated) -----------------------------------
def cache_bytes(config: WAMConfig, rows: int, max_history: int = 0, bytes_per_element: int = 2) -> int:
    """Bytes of a TemporalKVCache's K/V buffers (+ encoded history keys) for ``rows`` rows; the
    small segment-id vectors are left out."""
    slots = max_history + 1
    keys = config.text_len + slots * config.tokens_per_frame + config.noisy_tokens
    per_key = config.num_layers * rows * config.hidden_dim * bytes_per_element
    encoded = slots * config.tokens_per_frame if max_history else 0
    return per_key * (2 * keys + encoded)


def chunk_cost(config: WAMConfig, steps: int, rows: int = 1, cache: bool = False, history: int = 0) -> dict:
    """Tokens through the blocks and block FLOPs (linears + attention, as docs/design.md, Workloads counts
    them; embeddings, heads and AdaLN tables are < 1%) for one action chunk of ``steps`` denoising
    steps on ``rows`` rows (2 with guidance), with a full window of ``history`` past frames.

    Returns {"tokens", "flops"} per chunk and {"text_tokens", "text_flops"} once per instruction
    (0 without the cache: uncached runs recompute the text at every step)."""
    d, layers = config.hidden_dim, config.num_layers
    text, tpf, noisy = config.text_len, config.tokens_per_frame, config.noisy_tokens

    def flops(queries, pairs):  # per layer: 2 * 12 d^2 per token (qkv, out, ffn); 4 d per query-key pair
        return layers * (24 * d * d * queries + 4 * d * pairs)

    if config.mask == "full":
        if cache or history:
            raise ValueError(not_cacheable_message(config))
        n = config.num_tokens
        per_step = (n, flops(n, n * n))
        return {"tokens": steps * rows * n, "flops": steps * rows * per_step[1], "text_tokens": 0, "text_flops": 0}
    frames = history + 1
    context = text + frames * tpf
    frame_pairs = tpf * (text + tpf)  # a clean frame sees the text and itself
    if not cache:
        n = context + noisy
        pairs = text * text + frames * frame_pairs + noisy * n
        return {"tokens": steps * rows * n, "flops": steps * rows * flops(n, pairs), "text_tokens": 0, "text_flops": 0}
    return {"tokens": rows * (tpf + steps * noisy),
            "flops": rows * (flops(tpf, frame_pairs) + steps * flops(noisy, noisy * (context + noisy))),
            "text_tokens": rows * text, "text_flops": rows * flops(text, text * text)}
