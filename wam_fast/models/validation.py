"""Input checks for WAMTransformer.forward: every refusal says what was expected and what came.

Metadata (shapes, dtypes, devices) is always checked. Values (timesteps in range, robot ids in range)
are read only where the tensor comes from the user: a direct forward call. ``sample`` and ``WAMPolicy``
check their inputs once at entry (``check_values``) and run their per-step forwards inside
``inputs_checked()``, so the captured / compiled per-step path reads nothing back to the host.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import threading

import torch

from wam_fast.models.layout import SegmentLayout
from wam_fast.utils.checks import require_tensor, shape_matches, shape_text


def _describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return f"a {type(t).__name__}"
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t, expected_shape, dtype, device) -> None:
    """expected_shape: a tuple of ints, None meaning any size on that axis; dtype None: any."""
    require_tensor(name, t)
    if not shape_matches(t, expected_shape):
        raise ValueError(f"{name} must have shape {shape_text(expected_shape)}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have the model's dtype {dtype}, got {t.dtype} "
                        f"(convert the input or the model with .to(dtype))")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the model is on {device}; move them to one device")


_checked = threading.local()  # per thread: how deep we are in inputs_checked() blocks


@contextlib.contextmanager
def inputs_checked():
    """Inside this block forwards read no tensor values: the caller checked its inputs at entry
    and builds the timesteps in range itself (the samplers' grids), so no step syncs the device."""
    depth = getattr(_checked, "depth", 0)
    _checked.depth = depth + 1
    try:
        yield
    finally:
        _checked.depth = depth


def reads_values(t: torch.Tensor) -> bool:
    """Whether a forward should check the values of the user's tensor ``t``: not inside
    ``inputs_checked()``, not while torch.compile traces (a data-dependent branch breaks the graph) nor
    while a CUDA graph captures (a read-back is illegal there). On an accelerator the check costs one sync."""
    if torch.compiler.is_compiling() or getattr(_checked, "depth", 0) or t.device.type == "meta":
        return False  # (a meta tensor, as the FLOP projection traces, has no values)
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _value_summary(t: torch.Tensor) -> str:
    """min, max and NaN count of a tensor, for error messages (a batch can be too long to print)."""
    finite = t[~t.isnan()] if t.is_floating_point() else t
    nan = t.numel() - finite.numel()
    span = f"min {finite.min().item()}, max {finite.max().item()}" if finite.numel() else "no numbers"
    return f"{span}{f', {nan} NaN' if nan else ''} (shape {tuple(t.shape)})"


def _robot_ids_in_range(robot_id: torch.Tensor, num_robots: int) -> torch.Tensor:
    return ((robot_id >= 0) & (robot_id < num_robots)).all()


def _robot_id_error(robot_id: torch.Tensor, num_robots: int) -> ValueError:
    return ValueError(f"robot_id values must be in [0, {num_robots}) (config.num_robots), got {_value_summary(robot_id)}")


def check_values(finite: dict, robot_id=None, num_robots: int = 0) -> None:
    """Refuse non-finite values in ``finite`` (name -> tensor or None) and robot ids outside
    [0, num_robots). Reads values: all checks are fused into ONE reduction and one host read-back
    (one device sync on an accelerator), so it runs at public entries, never in the per-step path."""
    present = {name: t for name, t in finite.items() if t is not None and t.device.type != "meta"}  # no values
    checks = [torch.isfinite(t).all() for t in present.values()]
    if robot_id is not None and num_robots and robot_id.device.type != "meta":
        checks.append(_robot_ids_in_range(robot_id, num_robots))
    if not checks or bool(torch.stack(checks).all()):
        return
    for name, t in present.items():  # error path only: say which input and what is wrong
        if not bool(torch.isfinite(t).all()):
            nan, inf = int(t.isnan().sum()), int(t.isinf().sum())
            raise ValueError(f"{name} has non-finite values ({nan} NaN, {inf} inf of {t.numel()}); refused, as "
                             f"they would make the whole output NaN")
    raise _robot_id_error(robot_id, num_robots)


def check_robot_id(config, robot_id, batch: int, device, read_values: bool = True) -> None:
    """robot_id: (batch,) integer tensor when config.num_robots > 0, else None; with ``read_values``
    (and ``reads_values``), its ids in [0, num_robots). ``read_values=False``: the caller checks them."""
    if config.num_robots:
        if robot_id is None:
            raise ValueError(f"this model has a robot-id embedding ({config.num_robots} robots): pass robot_id (B,)")
        check_tensor("robot_id", robot_id, (batch,), None, device)
        if robot_id.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"robot_id must be an integer tensor, got {robot_id.dtype}")
        if read_values and reads_values(robot_id) and not bool(_robot_ids_in_range(robot_id, config.num_robots)):
            raise _robot_id_error(robot_id, config.num_robots)
    elif robot_id is not None:
        raise ValueError("robot_id given but the model has no robot-id embedding (config.num_robots == 0)")


def check_step_size(config, step_size, batch: int, device):
    """The step size of a shortcut student's forward: a number or a (batch,) floating tensor of
    finite values >= 0 (model-timestep units); None for every other model. Returns it as a
    (batch,) float32 tensor on ``device``, or None.

    Values are read only where that costs no device sync (a number, a CPU tensor outside torch.compile);
    on an accelerator only the metadata is checked, as for timesteps."""
    if config.distillation != "shortcut":
        if step_size is not None:
            kind = f"a {config.distillation} student" if config.distillation else "a teacher (distillation='')"
            raise ValueError(f"step_size given but this model is {kind}: only a shortcut student "
                             f"(config.distillation='shortcut') has a step-size embedding")
        return None
    if step_size is None:
        raise ValueError("this shortcut student needs step_size (B,): the length of the sampling step in "
                         f"model timesteps, num_train_timesteps / steps (e.g. {config.num_train_timesteps} "
                         f"/ {config.distilled_steps[-1]}), or 0 for the instantaneous velocity")
    if isinstance(step_size, numbers.Real) and not isinstance(step_size, bool):
        if not (math.isfinite(step_size) and step_size >= 0):
            raise ValueError(f"step_size must be finite and >= 0, got {step_size!r}")
        return torch.full((batch,), float(step_size), device=device)
    if not isinstance(step_size, torch.Tensor):
        raise TypeError(f"step_size must be a number or a float tensor (B,), got {type(step_size).__name__}")
    if not step_size.is_floating_point():
        raise TypeError(f"step_size must be a floating-point tensor, got {step_size.dtype}")
    if tuple(step_size.shape) != (batch,):
        raise ValueError(f"step_size must have shape ({batch},), got {tuple(step_size.shape)}")
    if step_size.device != device:
        raise ValueError(f"step_size is on {step_size.device} but the model is on {device}")
    # values: on the CPU only, and not while torch.compile traces (a data-dependent branch breaks the graph)
    if step_size.device.type == "cpu" and not torch.compiler.is_compiling() and \
            not bool(((step_size >= 0) & step_size.isfinite()).all()):
        raise ValueError(f"step_size must be finite and >= 0, got {step_size.tolist()}")
    return step_size.float()


def check_committed(config, committed, batch: int, device) -> None:
    """``committed``: None, or (B, action_len, 1) bool on the model's device, for an ``action_prefix`` model."""
    if committed is None:
        return
    if not config.action_prefix:
        raise ValueError("committed action rows given, but this model does not read a committed prefix "
                         "(config.action_prefix is False; distil a student with --prefix-fraction)")
    require_tensor("committed", committed)
    if committed.dtype != torch.bool:
        raise TypeError(f"committed must be a bool tensor (True on committed action rows), got {committed.dtype}")
    check_tensor("committed", committed, (batch, config.action_len, 1), None, device)


def check_forward_inputs(model, video, text, actions, timestep, image, history, robot_id, step_size=None,
                         committed=None):
    """Validate one forward's inputs; returns (per-segment timesteps (B, S) float32, layout,
    step size (B,) float32 or None)."""
    c = model.config
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"video must be a torch.Tensor (B, F, C, H, W), got {type(video).__name__}")
    if video.dim() != 5:
        raise ValueError(f"video must be 5-D (B, F, C, H, W), got {_describe(video)}")
    b = video.shape[0]
    check_tensor("video", video, model.noisy_video_shape(b), dtype, device)
    check_tensor("text", text, (b, c.text_len, c.text_dim), dtype, device)
    check_tensor("actions", actions, model.action_shape(b), dtype, device)
    frame = (b, None, c.latent_channels, c.latent_height, c.latent_width)
    if image is not None:
        check_tensor("image", image, (b, 1) + frame[2:], dtype, device)
    num_history = 0
    if history is not None:
        if c.mask != "temporal":
            raise ValueError("history frames need a model with mask='temporal' (clean context segments); "
                             f"this model has mask={c.mask!r}")
        check_tensor("history", history, frame, dtype, device)
        num_history = history.shape[1]
        if not 1 <= num_history <= c.history_frames:
            raise ValueError(f"history must hold 1..{c.history_frames} frames (config.history_frames), "
                             f"got {num_history}")
    check_robot_id(c, robot_id, b, device)
    step_size = check_step_size(c, step_size, b, device)
    check_committed(c, committed, b, device)

    layout: SegmentLayout = model.layout(num_history, has_image=image is not None or c.mask == "full")
    return _segment_timesteps(timestep, layout, b, device, c.num_train_timesteps), layout, step_size


def _segment_timesteps(timestep, layout: SegmentLayout, batch: int, device, num_train_timesteps: int):
    # [0, T] closed: a flow-matching sampler starts at t = T (s = 1); NaN fails both comparisons.
    if isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
        if not 0 <= timestep <= num_train_timesteps:
            raise ValueError(f"timestep must lie in [0, {num_train_timesteps}], got {timestep}")
        timestep = torch.full((batch,), float(timestep), device=device)
    if not isinstance(timestep, torch.Tensor):
        raise TypeError(f"timestep must be a number or a tensor (B,) or (B, S), got {type(timestep).__name__}")
    if timestep.dtype == torch.bool or timestep.is_complex():
        raise TypeError(f"timestep must be a real number tensor, got {timestep.dtype}")
    if timestep.device != device:
        raise ValueError(f"timestep is on {timestep.device} but the model is on {device}")
    timestep = timestep.float()
    # values of a user's tensor (one sync on an accelerator); sample / WAMPolicy build theirs in range
    if reads_values(timestep) and not bool(((timestep >= 0) & (timestep <= num_train_timesteps)).all()):
        raise ValueError(f"timestep values must lie in [0, {num_train_timesteps}] (num_train_timesteps) and not be "
                         f"NaN, got {_value_summary(timestep)}")
    s = layout.num_segments
    if timestep.dim() == 0:
        timestep = timestep.expand(batch)
    if timestep.shape == (batch,):
        timestep = layout.segment_timesteps(timestep)
    elif timestep.shape != (batch, s):
        raise ValueError(f"timestep must have shape ({batch},) or ({batch}, {s}) for segments "
                         f"{layout.names}, got {tuple(timestep.shape)}")
    return timestep
