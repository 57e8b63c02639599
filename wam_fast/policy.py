"""``WAMPolicy``: a world action model as a robot loop calls it, with or without the KV cache.

    policy = wam_fast.WAMPolicy(student, cache=True, history=2, seed=0)   # the model's own defaults
    policy.reset(text)                        # new episode / instruction: text K/V computed once
    while running:
        chunk = policy.act(image_latent)      # (B, 1, C, H, W) current observation -> ActionChunk
        robot.execute(chunk.actions)          # (B, action_len, action_dim)

``act(image_latent, prefix=committed)`` samples a chunk whose first d actions are ``committed``, the
actions the robot executes while this chunk is inferred (real-time chunking: ``wam_fast.realtime``).

``cache=True`` (mask="temporal" models only) sends only the noisy tokens through the model at each
denoising step (``wam_fast.cache``); ``cache=False`` runs the whole sequence (text, the last
``history`` frames, the current frame, the noisy tokens) at every step, as ``wam_fast.sample`` does.
Both give the same chunks for the same seed, to rounding.

``act`` = host checks and bookkeeping around ONE call that does all the device work of a chunk
(``run_chunk``: the frame pass, every denoising step, the sampler's updates and draws, the action
readout). By default that call runs eagerly; ``wam_fast.compile`` plugs in ``policy.graphs``, which
replays it from a CUDA graph (``wam_fast.compiler.graphs``). The noise comes from ``generator``, a
generator on the model's device, so the draws can live inside the graph too.

A policy keeps its own copies of what outlives a call (the text, the history frames), so a robot loop
may write each new frame into one reused buffer. ``act`` refuses non-finite observations (one fused
check per call: one device sync on a GPU). A policy is safe to share between threads: ``act`` and
``reset`` hold the policy's lock, so concurrent calls run one after another, never interleaved.
"""
from __future__ import annotations

import collections
import numbers
import threading
from typing import Optional

import torch

from wam_fast.cache import TemporalKVCache, not_cacheable_message
from wam_fast.configs import WAMConfig
from wam_fast.models.validation import check_robot_id, check_tensor, check_values
from wam_fast.prefix import BLEND_ACTIONS, ActionPrefix, check_blend, committed_kwargs, make_prefix
from wam_fast.sampling import (SAMPLERS, ActionChunk, check_options, check_seed, check_text, resolve_options,
                               run_sampler, step_size_for, uses_guidance)
from wam_fast.schedules import schedule_for


class WAMPolicy:
    """Closed-loop sampling of action chunks from a WAMTransformer.

    model      a WAMTransformer (reference or fused); its dtype and device are used throughout
    steps, sampler   the sampler (``wam_fast.SAMPLERS``) and its number of model evaluations;
               None: the model's defaults (``wam_fast.sampling.default_options``: a teacher
               ddim / euler with 10 steps, a student its own sampler at max(distilled_steps)).
               A shortcut student's forwards get step_size = num_train_timesteps / steps.
    cache      reuse text and frame K/V (needs mask="temporal"; a mask="full" model is refused)
    history    past frames the model sees (default config.history_frames; temporal models only)
    seed       seeds ``generator``, the generator on the model's device all noise comes from (None: a
               random seed); the stream runs on across act() calls, and ``reset(text, seed=...)``
               restarts it. (``wam_fast.sample`` draws on the CPU instead: on a GPU the two streams differ.)
    cfg_scale, cfg_schedule, uncond_text   classifier-free guidance as in ``wam_fast.sample``.
               cfg_scale None: the model's default (6 for a teacher; 1, off, for a distilled
               student, whose guidance is baked in and which refuses any other scale).

    Inputs are copied where they are kept (text, history frames): the caller may reuse its buffers.
    Non-finite text or observations are refused with ValueError (one fused check per call).
    Thread safety: ``act`` and ``reset`` serialise on ``self.lock``; two threads sharing a policy get
    the chunks of some sequential order of their calls (the noise stream and history advance per call).
    """

    def __init__(self, model, steps: Optional[int] = None, sampler: Optional[str] = None, cache: bool = True,
                 history: Optional[int] = None, seed: Optional[int] = None, *, cfg_scale: Optional[float] = None,
                 cfg_schedule: str = "constant"):
        config = getattr(model, "config", None)
        if not isinstance(config, WAMConfig) or not callable(model):
            raise TypeError(f"WAMPolicy expects a WAMTransformer, got {type(model).__name__}")
        sampler, steps, cfg_scale = resolve_options(config, sampler, steps, cfg_scale)
        check_options(config, sampler, steps, cfg_scale, cfg_schedule, 0 if seed is None else seed)
        if history is None:
            history = config.history_frames
        if isinstance(history, bool) or not isinstance(history, numbers.Integral) or \
                not 0 <= history <= config.history_frames:
            raise ValueError(f"history must be an int in [0, {config.history_frames}] (the model's "
                             f"config.history_frames), got {history!r}")
        if cache and config.mask != "temporal":
            raise ValueError(not_cacheable_message(config))
        param = next(model.parameters())
        self.model, self.config = model, config
        self.dtype, self.device = param.dtype, param.device
        self.steps, self.sampler, self.history = int(steps), sampler, int(history)
        self.cfg_scale, self.cfg_schedule = float(cfg_scale), cfg_schedule
        self.guided = uses_guidance(self.cfg_scale, cfg_schedule)  # cfg_scale / cfg_schedule: set at init only
        self.lock = threading.RLock()  # act / reset: one caller at a time (a robot stack may use callback threads)
        self.generator = torch.Generator(self.device)
        self._seed(seed)
        self.cache = TemporalKVCache(model) if cache else None
        self.graphs = None  # a captured run_chunk (wam_fast.compile on CUDA), called as run_chunk is
        self._grid_key: Optional[tuple] = None
        self.text: Optional[torch.Tensor] = None  # text rows of the episode (cond, then uncond rows)
        self.step = 0

    def _seed(self, seed: Optional[int]) -> None:
        if seed is None:
            self.generator.seed()
            return
        check_seed(seed)
        self.generator.manual_seed(int(seed))

    @property
    def cache_bytes(self) -> int:
        """Memory held by the KV cache (0 without one, or before the first reset)."""
        return 0 if self.cache is None else self.cache.cache_bytes

    def reset(self, text: torch.Tensor, uncond_text: Optional[torch.Tensor] = None,
              seed: Optional[int] = None) -> None:
        """Start an episode with instruction ``text`` (B, text_len, text_dim): forget past frames;
        with the cache, compute the text's K/V (once). ``seed`` restarts the noise stream."""
        with self.lock:
            self._reset(text, uncond_text, seed)

    def _reset(self, text, uncond_text, seed) -> None:
        check_text("text", text, (), self.config, self.dtype, self.device)
        if uncond_text is not None:
            check_text("uncond_text", uncond_text, (text.shape[0], 1), self.config, self.dtype, self.device)
        if seed is not None:
            check_seed(seed)
        check_values({"text": text, "uncond_text": uncond_text})
        if seed is not None:
            self._seed(seed)
        self.batch = text.shape[0]
        if self.guided:
            if uncond_text is None:
                uncond_text = torch.zeros_like(text)
            text = torch.cat((text, uncond_text.expand_as(text)))  # a new tensor: the caller's is not kept
        elif uncond_text is not None:
            raise ValueError("uncond_text given but guidance is off (cfg_scale 1 with a constant schedule)")
        else:
            text = text.clone()  # our own copy: the caller may overwrite its buffer during the episode
        self.text = text
        self.step = 0
        self.frames = collections.deque(maxlen=self.history)  # uncached: the last `history` observations
        if self.cache is not None:
            if self.cache.batch != text.shape[0] or self.cache.max_history != self.history:
                self.cache.setup(text.shape[0], self.history)
            self.cache.reset()
            self.cache.fill_text(text)

    @torch.no_grad()
    def act(self, image_latent: torch.Tensor, robot_id: Optional[torch.Tensor] = None,
            prefix: Optional[torch.Tensor] = None, blend: int = BLEND_ACTIONS) -> ActionChunk:
        """The action chunk (and predicted future video latents; None for an action-only model,
        ``config.future_frames == 0``) for the current observation ``image_latent`` (B, 1, C, H, W), a
        clean latent in the model's dtype and device.

        ``prefix`` (B, d, action_dim), model units, 0 <= d < action_len: actions already committed (the robot
        executes them while this chunk is inferred; ``wam_fast.realtime``). The chunk's first d actions are
        these and the rest continues them (``wam_fast.prefix``: the sampler is guided toward them; a model
        distilled to read them, ``config.action_prefix``, also sees them clean); ``blend`` positions after
        them are eased out of the last one (0: none)."""
        with self.lock:
            return self._act(image_latent, robot_id, prefix, blend)

    def _act(self, image_latent: torch.Tensor, robot_id: Optional[torch.Tensor],
             prefix: Optional[torch.Tensor] = None, blend: int = BLEND_ACTIONS) -> ActionChunk:
        check_blend(blend)
        prefix = self.check_observation(image_latent, robot_id, prefix, blend)
        slot = None
        if self.cache is not None:
            timesteps, step_size = self.grid()
            self.cache.set_grid(timesteps, step_size)  # host-side; recomputes nothing when unchanged
            slot = self.cache.next_slot
        run = self.run_chunk if self.graphs is None else self.graphs
        video, actions = run(image_latent, robot_id, slot, prefix)
        if self.cache is not None:
            self.cache.note_frame()
        self.end_step(image_latent)
        video = None if self.config.action_only else video  # an action-only model predicts no video
        return ActionChunk(actions=actions, video=video, sampler=self.sampler, steps=self.steps,
                           nfe=self.steps * self.rows)

    @property
    def rows(self) -> int:
        """Rows per observation in each forward: 2 with guidance (cond, uncond), else 1."""
        return 2 if self.guided else 1

    def grid(self):
        """(timesteps, step_size) of the sampling options: the model timesteps the sampler evaluates."""
        key = (self.sampler, self.steps)
        if self._grid_key is None or self._grid_key[0] != key:
            timesteps = SAMPLERS[self.sampler](schedule_for(self.config), self.steps).timesteps
            self._grid_key = (key, (tuple(timesteps), step_size_for(self.config, self.steps)))
        return self._grid_key[1]

    def run_chunk(self, image_latent: torch.Tensor, robot_id: Optional[torch.Tensor], slot: Optional[int],
                  prefix: Optional[ActionPrefix] = None):
        """All the device work of one chunk for a checked observation: (video, actions) float32.
        With the cache, ``slot`` is the ring slot of this frame (``cache.next_slot``) and the cache's
        grid is set. ``prefix``: checked committed actions (``wam_fast.prefix``). Reads nothing back to the host
        and draws only from ``generator``, so a CUDA graph can hold it."""
        c, rows = self.config, self.rows
        committed = committed_kwargs(c, prefix, rows)
        image = image_latent.repeat(rows, 1, 1, 1, 1)
        robot = None if robot_id is None else robot_id.repeat(rows)
        if self.cache is not None:
            self.cache.frame_pass(image, slot)
            steps = iter(range(self.steps))

            def forward(video, actions, timestep, step_size):
                # run_sampler calls this once per step, in grid order: step i of the cache's grid
                return self.cache.denoise_at(next(steps), video, actions, robot_id=robot, **committed)
        else:
            history = torch.cat(tuple(self.frames), dim=1).repeat(rows, 1, 1, 1, 1) if self.frames else None

            def forward(video, actions, timestep, step_size):
                extra = {} if step_size is None else {"step_size": step_size}  # teachers keep their signature
                return self.model(video, self.text, actions, timestep, image=image, history=history, robot_id=robot,
                                  **extra, **committed)

        chunk = run_sampler(forward, c, self.batch, self.device, self.dtype, sampler=self.sampler, steps=self.steps,
                            cfg_scale=self.cfg_scale, cfg_schedule=self.cfg_schedule, generator=self.generator,
                            prefix=prefix)
        return chunk.video, chunk.actions

    def check_observation(self, image_latent: torch.Tensor, robot_id: Optional[torch.Tensor],
                          prefix: Optional[torch.Tensor] = None, blend: int = BLEND_ACTIONS) -> Optional[ActionPrefix]:
        """Check one observation (and committed ``prefix``): shapes, dtype, device, then their values (finite,
        robot ids in range) in one fused reduction: one device sync on a GPU, the only one ``act`` adds.
        Returns the prefix as an ``ActionPrefix`` (None without one, or an empty one: the plain chunk)."""
        if self.text is None:
            raise RuntimeError("WAMPolicy.act: call reset(text) first (once per episode / instruction)")
        c = self.config
        check_tensor("image_latent", image_latent,
                      (self.batch, 1, c.latent_channels, c.latent_height, c.latent_width), self.dtype, self.device)
        check_robot_id(c, robot_id, self.batch, self.device, read_values=False)  # values: in check_values
        made = None if prefix is None else make_prefix(prefix, self.batch, c.action_len, c.action_dim, self.device,
                                                       blend)
        check_values({"image_latent": image_latent, "prefix": prefix}, robot_id, c.num_robots)
        return made if made is not None and made.length else None

    def end_step(self, image_latent: torch.Tensor) -> None:
        """After a chunk: the observation becomes history (uncached path), the control step advances."""
        if self.history and self.cache is None:  # the cache holds its own K/V of past frames
            self.frames.append(image_latent.clone())  # our own copy: the caller may reuse its buffer
        self.step += 1
