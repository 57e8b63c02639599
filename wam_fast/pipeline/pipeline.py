"""``WAMPipeline``: camera pixels and an instruction in, robot actions out.

    pipe = WAMPipeline.from_pretrained("my_pipeline")      # or WAMPipeline.tiny_random(seed=0)
    session = pipe.new_session(seed=0)                     # one per robot / connection
    actions = session(image_uint8_hwc, "open the drawer")  # (K, A) float32, robot units

Per call: the instruction's embedding (text encoder run once per instruction, LRU-cached by the
string), the frame's latent (the frame encoder), one chunk of the session's WAMPolicy (its KV cache,
the student's own sampler and steps), and the de-normalisation of the actions (mean / std of the
dataset). A session whose instruction changes starts a new episode. Single camera, no proprioceptive
state in this version: more cameras or a ``state`` are refused.

Real-time chunking: ``session(image, instruction, prefix=committed)`` with ``committed`` (d, A) the actions
the robot executes while this chunk is inferred returns a chunk that starts with them and continues them
(``wam_fast.prefix``); ``wam_fast.realtime.RealTimeChunker`` runs that loop on a robot.
"""
from __future__ import annotations

import collections
import numbers
import threading
import time
from typing import Dict, Optional

import numpy as np
import torch

from wam_fast.policy import WAMPolicy
from wam_fast.prefix import BLEND_ACTIONS, check_blend
from wam_fast.pipeline.encoders import FrameEncoder, pixels_from_images

TEXT_CACHE_SIZE = 64  # instructions whose embedding stays cached (LRU)


def check_instruction(instruction) -> str:
    if not isinstance(instruction, str):
        raise TypeError(f"instruction must be a str, got {type(instruction).__name__}")
    if not instruction.strip():
        raise ValueError(f"instruction must be a non-empty str, got {instruction!r}")
    return instruction


class WAMPipeline:
    """A frame encoder, a text encoder, a WAMTransformer and the action statistics, shared by sessions.

    model          a WAMTransformer (its dtype / device are the pipeline's)
    frame_encoder  a ``wam_fast.pipeline.encoders.FrameEncoder`` whose latent_shape is the model's
    text_encoder   ``T5TextEncoder`` or ``FixedTextEncoder`` (its dim must be the model's text_dim)
    normalization  None (identity) or {"mean": [A], "std": [A]}: actions = model actions * std + mean
    steps, sampler, cache, cfg_scale   the WAMPolicy's options (None: the model's own defaults; cache None:
                   on for a temporal-mask model)
    decode_video   also decode the predicted video latents each call (``session.last_video``); off by default
    """

    def __init__(self, model, frame_encoder: FrameEncoder, text_encoder, normalization: Optional[dict] = None,
                 *, steps: Optional[int] = None, sampler: Optional[str] = None, cache: Optional[bool] = None,
                 cfg_scale: Optional[float] = None, decode_video: bool = False):
        config = model.config
        if not isinstance(frame_encoder, FrameEncoder):
            raise TypeError(f"frame_encoder must be a wam_fast.pipeline FrameEncoder, "
                            f"got {type(frame_encoder).__name__}")
        expected = (config.latent_channels, config.latent_height, config.latent_width)
        if tuple(frame_encoder.latent_shape()) != expected:
            raise ValueError(f"the frame encoder {frame_encoder.name!r} makes latents "
                             f"{tuple(frame_encoder.latent_shape())} from {frame_encoder.image_size} images, "
                             f"the model reads (C, h, w) = {expected}")
        if text_encoder.dim != config.text_dim:
            raise ValueError(f"the text encoder's output dim (d_model) {text_encoder.dim} is not the model's "
                             f"text_dim {config.text_dim}")
        if decode_video and config.action_only:
            raise ValueError(f"decode_video=True, but the model {config.name!r} is action-only (future_frames=0): it "
                             f"predicts no video to decode")
        if decode_video and not hasattr(frame_encoder, "decode"):
            raise ValueError(f"decode_video=True needs a frame encoder with decode; {frame_encoder.name!r} has none")
        self.model, self.config = model, config
        self.frame_encoder, self.text_encoder = frame_encoder, text_encoder
        self.normalization = self.check_normalization(normalization)
        self.steps, self.sampler, self.decode_video = steps, sampler, bool(decode_video)
        self.cache = config.mask == "temporal" if cache is None else bool(cache)
        self.cfg_scale = cfg_scale
        self.make_policy(seed=0)  # options checked now, not at the first session
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.text_cache: "collections.OrderedDict[str, torch.Tensor]" = collections.OrderedDict()
        self.text_lock = threading.Lock()
        self._default_session: Optional["PipelineSession"] = None

    def check_normalization(self, normalization) -> Optional[Dict[str, torch.Tensor]]:
        if normalization is None:
            return None
        if not isinstance(normalization, dict) or set(normalization) < {"mean", "std"}:
            raise ValueError(f"normalization must be None or a dict with 'mean' and 'std', got {normalization!r}")
        stats = {k: torch.as_tensor(np.asarray(normalization[k], dtype=np.float32)) for k in ("mean", "std")}
        for name, value in stats.items():
            if tuple(value.shape) != (self.config.action_dim,) or not torch.isfinite(value).all():
                raise ValueError(f"normalization[{name!r}] must be {self.config.action_dim} finite numbers "
                                 f"(one per action dim), got {normalization[name]!r}")
        return stats

    # ---- the parts, used by sessions and the Meta-World harness ------------------------------------------
    @property
    def image_shape(self):
        return (*self.frame_encoder.image_size, 3)

    def text_embedding(self, instruction: str) -> torch.Tensor:
        """(1, text_len, text_dim) in the model's dtype; the text encoder runs once per instruction."""
        check_instruction(instruction)
        with self.text_lock:
            if instruction in self.text_cache:
                self.text_cache.move_to_end(instruction)
                return self.text_cache[instruction]
        text = self.text_encoder.encode(instruction).to(device=self.device, dtype=self.dtype)
        expected = (1, self.config.text_len, self.config.text_dim)
        if tuple(text.shape) != expected:
            raise ValueError(f"the text encoder gave {tuple(text.shape)} for {instruction!r}, "
                             f"the model reads {expected}")
        with self.text_lock:
            self.text_cache[instruction] = text
            while len(self.text_cache) > TEXT_CACHE_SIZE:
                self.text_cache.popitem(last=False)
        return text

    def check_images(self, images, batch: bool = False) -> torch.Tensor:
        """uint8 (or float in [0, 255]) numpy / torch images -> a (B, H, W, 3) tensor. One observation
        (``batch`` False): (H, W, 3) or (N_cams, H, W, 3), N_cams <= 1; a batch: (B, H, W, 3), one per row."""
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
                raise TypeError(f"images must be uint8 (or float in [0, 255]), got dtype {images.dtype}")
            images = torch.from_numpy(np.ascontiguousarray(images))
        elif not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a numpy array or torch tensor of shape (H, W, 3) or (N_cams, H, W, 3), "
                            f"got {type(images).__name__}")
        if images.dtype != torch.uint8 and not images.dtype.is_floating_point:
            raise TypeError(f"images must be uint8 (or float in [0, 255]), got dtype {images.dtype}")
        given = tuple(images.shape)
        h, w, _ = self.image_shape
        if batch:
            if images.dim() != 4 or tuple(images.shape[1:]) != (h, w, 3) or not len(images):
                raise ValueError(f"a batch of images must have shape (B, {h}, {w}, 3), got {given}")
        else:
            if images.dim() == 3:
                images = images[None]
            if images.dim() != 4 or tuple(images.shape[1:]) != (h, w, 3):
                raise ValueError(f"images must have shape ({h}, {w}, 3) or (N_cams, {h}, {w}, 3), got {given}")
            if images.shape[0] != 1:
                raise ValueError(f"this pipeline takes at most 1 camera (max_cameras 1), got {images.shape[0]} cameras")
        if images.dtype.is_floating_point:
            if not torch.isfinite(images).all():
                raise ValueError("images hold non-finite values (NaN or inf)")
            if images.min() < 0 or images.max() > 255:
                raise ValueError(f"float images must be in [0, 255], got values in "
                                 f"[{float(images.min())}, {float(images.max())}]")
        return images

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Checked images (B, H, W, 3) -> image latents (B, 1, C, h, w) in the model's dtype."""
        encoder_dtype = getattr(self.frame_encoder, "dtype", None) or self.dtype
        pixels = pixels_from_images(images, encoder_dtype, self.device)
        with torch.no_grad():
            latents = self.frame_encoder.encode(pixels)
        return latents.to(self.dtype)[:, None]

    def denormalize(self, actions: torch.Tensor) -> torch.Tensor:
        """Model actions (..., A) float32 -> robot units (identity without statistics)."""
        if self.normalization is None:
            return actions
        return actions * self.normalization["std"].to(actions.device) + self.normalization["mean"].to(actions.device)

    def normalize(self, actions: torch.Tensor) -> torch.Tensor:
        """Robot units (..., A) float32 -> model actions (the inverse of ``denormalize``)."""
        if self.normalization is None:
            return actions
        return (actions - self.normalization["mean"].to(actions.device)) / self.normalization["std"].to(actions.device)

    def check_prefix(self, prefix, batch: int) -> torch.Tensor:
        """Committed actions in robot units, (B, d, A) (one row per observation), numpy or torch, any float
        dtype -> a float32 CPU tensor; 0 <= d < action_len, finite (``wam_fast.prefix``)."""
        c = self.config
        if isinstance(prefix, np.ndarray):
            prefix = torch.from_numpy(np.ascontiguousarray(prefix))
        if not isinstance(prefix, torch.Tensor):
            raise TypeError(f"prefix must be a numpy array or torch tensor of committed actions (d, {c.action_dim}), "
                            f"got {type(prefix).__name__}")
        if not prefix.dtype.is_floating_point:
            raise TypeError(f"prefix must hold float actions (robot units), got dtype {prefix.dtype}")
        if prefix.dim() != 3 or prefix.shape[0] != batch or prefix.shape[2] != c.action_dim \
                or not 0 <= prefix.shape[1] < c.action_len:
            raise ValueError(f"prefix must have shape ({batch}, d, {c.action_dim}) with 0 <= d < {c.action_len} "
                             f"(committed actions of each row), got {tuple(prefix.shape)}")
        if not torch.isfinite(prefix).all():
            raise ValueError("prefix holds non-finite values (NaN or inf)")
        return prefix.detach().to("cpu", torch.float32)

    def make_policy(self, seed: Optional[int] = None) -> WAMPolicy:
        return WAMPolicy(self.model, steps=self.steps, sampler=self.sampler, cache=self.cache, seed=seed,
                         cfg_scale=self.cfg_scale)

    # ---- the robot-facing API --------------------------------------------------------------------------
    def new_session(self, seed: Optional[int] = None) -> "PipelineSession":
        return PipelineSession(self, seed)

    def __call__(self, images, instruction: str, state=None) -> np.ndarray:
        if self._default_session is None:
            self._default_session = self.new_session()
        return self._default_session(images, instruction, state=state)

    def metadata(self) -> dict:
        c = self.config
        policy_options = self.make_policy(seed=0)
        return {"image_key": "image", "prompt_key": "prompt", "image_shape": list(self.image_shape),
                "image_dtype": "uint8", "max_cameras": 1, "action_shape": [c.action_len, c.action_dim],
                "state": False, "prefix_key": "prefix_actions", "max_prefix": c.action_len - 1,
                "prefix_blend_key": "prefix_blend", "prefix_blend": BLEND_ACTIONS,
                "model": {"name": c.name, "mask": c.mask, "distillation": c.distillation,
                          "sampler": policy_options.sampler, "steps": policy_options.steps,
                          "frame_encoder": self.frame_encoder.name, "text_encoder": self.text_encoder.kind,
                          "dtype": str(self.dtype).removeprefix("torch."),
                          "normalized_actions": self.normalization is not None}}

    # ---- storage (wam_fast.pipeline.storage) ------------------------------------------------------------
    def save_pretrained(self, directory) -> None:
        from wam_fast.pipeline import storage
        storage.save(self, directory)

    @classmethod
    def from_pretrained(cls, directory, device=None, dtype=None) -> "WAMPipeline":
        from wam_fast.pipeline import storage
        return storage.load(cls, directory, device=device, dtype=dtype)

    @classmethod
    def tiny_random(cls, seed: int = 0, **options) -> "WAMPipeline":
        from wam_fast.pipeline import tiny
        return tiny.tiny_random(cls, seed, **options)


class PipelineSession:
    """One robot's episode state: its own WAMPolicy (KV cache, noise stream) and a lock; weights shared."""

    def __init__(self, pipeline: WAMPipeline, seed: Optional[int] = None):
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        self.pipeline = pipeline
        self.policy = pipeline.make_policy(seed)
        self.lock = threading.Lock()
        self.instruction: Optional[str] = None
        self.last_timing: Dict[str, float] = {}
        self.last_video: Optional[np.ndarray] = None

    def reset(self) -> None:
        """Forget the episode: the next call starts a new one whatever its instruction."""
        with self.lock:
            self.instruction = None

    def __call__(self, images, instruction: str, state=None, prefix=None, blend: int = BLEND_ACTIONS) -> np.ndarray:
        """One action chunk (K, A) float32 in robot units for the current frame and instruction.

        ``prefix`` (d, A) robot units: the actions the robot executes while this chunk is inferred (real-time
        chunking, ``wam_fast.realtime``); the chunk's first d actions are these and the rest continues them;
        ``blend``: positions after them eased out of the last one (``wam_fast.prefix``; 0: none)."""
        if state is not None:
            raise ValueError("this pipeline takes no proprioceptive state (metadata 'state': False); got a state")
        check_instruction(instruction)
        images = self.pipeline.check_images(images)
        check_blend(blend)
        if prefix is not None:
            if isinstance(prefix, (np.ndarray, torch.Tensor)) and prefix.ndim == 2:
                prefix = prefix[None]
            prefix = self.pipeline.check_prefix(prefix, 1)
        return self.run(images, instruction, prefix, blend)[0]

    def act_batch(self, images, instruction: str, prefix=None, blend: int = BLEND_ACTIONS) -> np.ndarray:
        """B observations of B episodes run as one batch (the Meta-World harness): images (B, H, W, 3)
        -> actions (B, K, A). Every row follows ``instruction``; B is fixed within an episode.
        ``prefix``, ``blend``: (B, d, A) committed actions of each row, robot units (see ``__call__``)."""
        check_instruction(instruction)
        images = self.pipeline.check_images(images, batch=True)
        if instruction == self.instruction and len(images) != self.policy.batch:
            raise ValueError(f"the episode runs {self.policy.batch} rows, got a batch of {len(images)} images "
                             f"(reset() first to change it)")
        check_blend(blend)
        if prefix is not None:
            prefix = self.pipeline.check_prefix(prefix, len(images))
        return self.run(images, instruction, prefix, blend)

    def run(self, images: torch.Tensor, instruction: str, prefix: Optional[torch.Tensor] = None,
            blend: int = BLEND_ACTIONS) -> np.ndarray:
        """Checked images (B, H, W, 3) -> actions (B, K, A): text, frame encode, one policy chunk, readout.
        ``prefix``: checked committed actions (B, d, A), robot units; returned unchanged as the first d."""
        pipe = self.pipeline
        with self.lock:
            start = time.perf_counter()
            text = pipe.text_embedding(instruction)
            text_done = time.perf_counter()
            latents = pipe.encode_images(images)
            encode_done = time.perf_counter()
            if instruction != self.instruction:  # a new instruction: a new episode
                self.policy.reset(text.expand(len(images), -1, -1).contiguous())
                self.instruction = instruction
            committed = None if prefix is None else pipe.normalize(prefix).to(pipe.device)
            chunk = self.policy.act(latents, prefix=committed, blend=blend)
            actions = pipe.denormalize(chunk.actions.float()).cpu().numpy().astype(np.float32)
            if prefix is not None:  # exactly what the robot executes, not its round trip through the statistics
                actions[:, :prefix.shape[1]] = prefix.numpy()
            done = time.perf_counter()
            if pipe.decode_video:
                self.last_video = pipe.frame_encoder.decode(chunk.video)
            self.last_timing = {"text_ms": (text_done - start) * 1e3, "encode_ms": (encode_done - text_done) * 1e3,
                                "policy_ms": (done - encode_done) * 1e3, "total_ms": (done - start) * 1e3}
        return actions
