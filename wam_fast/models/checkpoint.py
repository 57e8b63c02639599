"""Checkpoints: a directory with ``model.safetensors`` and ``config.json``. No pickle anywhere.

Each file is written to a temporary name, flushed to disk and renamed into place, so an
interrupted save never leaves a torn file. The weights file also carries the config in its
metadata; loading refuses a directory whose two files disagree (a save cut between them).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch

from wam_fast.configs import WAMConfig
from wam_fast.utils.files import atomic_write

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_KEY = "wam_fast_format"
FORMAT_VERSION = "1"


def write_checkpoint(model, directory: Union[str, Path]) -> Path:
    """Write ``model`` (a WAMTransformer: ``config`` and ``state_dict``) to ``directory``; returns the directory.
    ``wam_fast.save_pretrained`` checks the type and calls this."""
    import safetensors.torch  # on first use: importing the models stays light

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
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config_json + "\n"))
    return directory


def read_checkpoint(directory: Union[str, Path], model_class: type,
                    device: Optional[Union[str, torch.device]] = None, dtype: Optional[torch.dtype] = None):
    """A ``model_class(config)`` (WAMTransformer) with the weights saved in ``directory`` (on ``device``,
    cast to ``dtype`` if given); ``wam_fast.load_pretrained`` calls this."""
    import safetensors.torch  # on first use: importing the models stays light
    from safetensors import safe_open

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
    state = safetensors.torch.load_file(str(weights_path), device=str(device))
    with torch.device("meta"):
        model = model_class(config)
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
