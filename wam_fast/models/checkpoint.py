"""Checkpoints: a directory with ``model.safetensors`` and ``config.json``. No pickle anywhere.

Each file is written to a temporary name, flushed to disk and renamed into place, so an
interrupted save never leaves a torn file. The weights file also carries the config in its
metadata; loading refuses a directory whose two files disagree (a save cut between them).
``checksums.json`` (``wam_fast.utils.checksums``), written last, holds the sha256 of both files; loading
verifies them by default (``verify=False`` skips it). The config is checked against the tensor names in
the weights' header before any model is built, so a crafted config cannot cost minutes and gigabytes.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Union

import torch

from wam_fast.configs import WAMConfig
from wam_fast.utils.checksums import verify_checksums, write_checksums
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
    write_checksums(directory, (WEIGHTS_NAME, CONFIG_NAME))
    return directory


def read_header(weights_path: Path):
    """(tensor names, metadata) of a safetensors file, read from its header only; ValueError naming the
    file when it is not one (truncated, not safetensors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights_path), framework="pt") as f:
            return list(f.keys()), (f.metadata() or {})
    except Exception as exc:  # safetensors' SafetensorError and OSError: a torn or foreign file
        raise ValueError(f"{weights_path} is not a readable safetensors file ({type(exc).__name__}: {exc}); "
                         f"restore it or save the checkpoint again") from exc


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); restore it or save the checkpoint again") from exc


def check_layers(weights_path: Path, names, config_dict: dict) -> None:
    """The config's layer count against the blocks in the file's header: before any model is built."""
    blocks = {int(m.group(1)) for n in names if (m := re.match(r"blocks\.(\d+)\.", n))}
    layers = config_dict.get("num_layers")
    if not isinstance(layers, int) or layers != len(blocks) or (blocks and max(blocks) != layers - 1):
        raise ValueError(f"{weights_path} holds {len(blocks)} transformer blocks but its config says "
                         f"num_layers={layers!r}; the checkpoint is damaged or was edited")


def read_checkpoint(directory: Union[str, Path], model_class: type,
                    device: Optional[Union[str, torch.device]] = None, dtype: Optional[torch.dtype] = None,
                    verify: bool = True):
    """A ``model_class(config)`` (WAMTransformer) with the weights saved in ``directory`` (on ``device``,
    cast to ``dtype`` if given); ``wam_fast.load_pretrained`` calls this. ``verify``: check the files'
    sha256 against checksums.json first."""
    import safetensors.torch  # on first use: importing the models stays light

    directory = Path(directory)
    weights_path, config_path = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    for path in (weights_path, config_path):
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file {path} not found; a checkpoint directory holds "
                                    f"{WEIGHTS_NAME} and {CONFIG_NAME} (written by save_pretrained)")
    if verify:
        verify_checksums(directory, (WEIGHTS_NAME, CONFIG_NAME))
    config_dict = read_json(config_path)
    names, metadata = read_header(weights_path)
    if "wam_fast_quantization" in metadata:
        raise ValueError(f"{weights_path} is an FP8 checkpoint (written by wam_fast.quant.save_quantized): "
                         f"load it with wam_fast.quant.load_quantized")
    if metadata.get(FORMAT_KEY) != FORMAT_VERSION:
        raise ValueError(f"{weights_path} is not a wam_fast checkpoint of format {FORMAT_VERSION} "
                         f"(metadata {FORMAT_KEY}={metadata.get(FORMAT_KEY)!r})")
    if json.loads(metadata.get("config", "null")) != config_dict:
        raise ValueError(f"{config_path} does not match the config stored in {weights_path} "
                         "(an interrupted save or a hand-edited file); re-save the checkpoint")
    check_layers(weights_path, names, config_dict)
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
