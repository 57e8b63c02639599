"""Checkpoints: a directory with ``model.safetensors`` and ``config.json``. No pickle anywhere.

Each file is written to a temporary name, flushed to disk and renamed into place, so an
interrupted save never leaves a torn file. The weights file also carries the config in its
metadata; loading refuses a directory whose two files disagree (a save cut between them).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_KEY = "wam_fast_format"
FORMAT_VERSION = "1"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plain_mode(base: int = 0o666) -> int:
    """``base`` minus the umask: what open() (0o666) or mkdir() (0o777) would leave."""
    umask = os.umask(0o022)
    os.umask(umask)
    return base & ~umask


def _new_file_mode(path: Path) -> int:
    """The mode a plain write would leave: the replaced file's, else 0o666 minus the umask
    (mkstemp's own 0o600 would hide checkpoints and results from the rest of a team)."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        return plain_mode(0o666)


def atomic_write(path: Union[str, Path], write) -> None:
    """Call ``write(tmp_path)`` and then rename tmp_path over ``path`` after an fsync."""
    path = Path(path)
    mode = _new_file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(path.parent)


def save_pretrained(model, directory: Union[str, Path]) -> Path:
    """Write ``model`` (a WAMTransformer) to ``directory``; returns the directory."""
    from safetensors.torch import save_file

    from wam_fast.models.transformer import WAMTransformer

    if not isinstance(model, WAMTransformer):
        raise TypeError(f"save_pretrained expects a WAMTransformer, got {type(model).__name__}")
    directory = Path(directory)
    if any(type(m).__name__ == "FP8Linear" for m in model.modules()):
        raise ValueError("save_pretrained writes high-precision models; this one has FP8 layers "
                         "(quantize_fp8): save it with wam_fast.quant.save_quantized")
    directory.mkdir(parents=True, exist_ok=True)
    config_json = json.dumps(model.config.to_dict(), indent=2, sort_keys=True)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if tensor.device.type == "meta":
            raise ValueError(f"cannot save {name}: it is on the meta device (no data); "
                             "materialise the model first (e.g. model.to_empty(device=...) and load weights)")
        tensors[name] = tensor.detach().contiguous().cpu()
    metadata = {FORMAT_KEY: FORMAT_VERSION, "config": config_json}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config_json + "\n"))
    return directory


def load_pretrained(directory: Union[str, Path], device: Optional[Union[str, torch.device]] = None,
                    dtype: Optional[torch.dtype] = None):
    """Load a WAMTransformer saved by ``save_pretrained`` (on ``device``, cast to ``dtype`` if given)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from wam_fast.configs import WAMConfig
    from wam_fast.models.transformer import WAMTransformer

    directory = Path(directory)
    weights_path, config_path = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    for path in (weights_path, config_path):
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file {path} not found; a checkpoint directory holds "
                                    f"{WEIGHTS_NAME} and {CONFIG_NAME} (written by save_pretrained)")
    config_dict = json.loads(config_path.read_text())
    with safe_open(str(weights_path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "wam_fast_quantization" in metadata:
        raise ValueError(f"{weights_path} is an FP8 checkpoint (written by wam_fast.quant.save_quantized): "
                         f"load it with wam_fast.quant.load_quantized")
    if metadata.get(FORMAT_KEY) != FORMAT_VERSION:
        raise ValueError(f"{weights_path} is not a wam_fast checkpoint of format {FORMAT_VERSION} "
                         f"(metadata {FORMAT_KEY}={metadata.get(FORMAT_KEY)!r})")
    if json.loads(metadata.get("config", "null")) != config_dict:
        raise ValueError(f"{config_path} does not match the config stored in {weights_path} "
                         "(an interrupted save or a hand-edited file); re-save the checkpoint")
    config = WAMConfig.from_dict(config_dict)
    device = torch.device(device) if device is not None else torch.device("cpu")
    state = load_file(str(weights_path), device=str(device))
    with torch.device("meta"):
        model = WAMTransformer(config)
    expected, found = set(model.state_dict()), set(state)
    if expected != found:
        raise ValueError(f"{weights_path} does not fit {config.name!r}: missing {sorted(expected - found)[:8]}, "
                         f"unexpected {sorted(found - expected)[:8]}")
    for name, tensor in model.state_dict().items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{weights_path}: {name} has shape {tuple(state[name].shape)}, "
                             f"the config expects {tuple(tensor.shape)}")
    model.load_state_dict(state, assign=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
