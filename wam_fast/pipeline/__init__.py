"""Pixels to actions: ``WAMPipeline`` (frame encoder + text encoder + WAMPolicy + action statistics).

Importing this package needs neither transformers nor diffusers; the parts that use them import
them when built or loaded (an ImportError names the install line).
"""
from wam_fast.pipeline.encoders import (FRAME_ENCODERS, CogVideoXEncoder, FrameEncoder, PixelsEncoder,
                                        register_frame_encoder)
from wam_fast.pipeline.pipeline import PipelineSession, WAMPipeline
from wam_fast.pipeline.text import FixedTextEncoder, T5TextEncoder

__all__ = ["WAMPipeline", "PipelineSession", "FrameEncoder", "PixelsEncoder", "CogVideoXEncoder",
           "FRAME_ENCODERS", "register_frame_encoder", "T5TextEncoder", "FixedTextEncoder"]
