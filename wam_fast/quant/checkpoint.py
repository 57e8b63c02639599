"""Checkpoints of FP8 models: ``save_quantized`` / ``load_quantized`` (safetensors: FP8 codes, float32
scales and which modules are FP8 in the metadata; atomic writes; exact round trip)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from wam_fast.configs import WAMConfig
from wam_fast.models.checkpoint import (CONFIG_NAME, FORMAT_KEY, FORMAT_VERSION, WEIGHTS_NAME, check_layers,
                                       read_header, read_json)
from wam_fast.models.transformer import WAMTransformer
from wam_fast.quant.linear import FP8_MODULE_TYPES, FP8Linear
from wam_fast.quant.quantize import fp8_layers
from wam_fast.utils.checksums import verify_checksums, write_checksums
from wam_fast.utils.files import atomic_write
from wam_fast.utils.modules import retype, set_submodule

QUANT_KEY = "wam_fast_quantization"  # safetensors metadata entry of a quantized checkpoint
QUANT_FORMAT = 1


def _quant_metadata(model: nn.Module) -> dict:
    modules = {name: type(m).__name__ for name, m in model.named_modules() if type(m) in FP8_MODULE_TYPES.values()}
    return {"format": QUANT_FORMAT, "modules": modules,
            "linears": {name: m.spec() for name, m in fp8_layers(model).items()}}


def save_quantized(model: nn.Module, directory: Union[str, Path]) -> Path:
    """Write a quantized model to ``directory``: ``model.safetensors`` (FP8 weights, float32 scales,
    the high-precision rest, and which modules are FP8 in its metadata) and, for a WAMTransformer,
    ``config.json``. Each file is written atomically. Returns the directory."""
    if not fp8_layers(model):
        raise ValueError("save_quantized: the model has no FP8Linear layers; use wam_fast.save_pretrained for "
                         "a high-precision model")
    uncalibrated = [n for n, m in fp8_layers(model).items() if not m.calibrated]
    if uncalibrated:
        raise ValueError(f"save_quantized: static layers {uncalibrated[:4]} are not calibrated; run calibrate first")
    import safetensors.torch  # on first use: importing the models stays light

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if tensor.device.type == "meta":
            raise ValueError(f"cannot save {name}: it is on the meta device (no data)")
        tensors[name] = tensor.detach().contiguous().cpu()
    metadata = {FORMAT_KEY: FORMAT_VERSION, QUANT_KEY: json.dumps(_quant_metadata(model), sort_keys=True)}
    config_json = None
    if isinstance(model, WAMTransformer):
        config_json = json.dumps(model.config.to_dict(), indent=2, sort_keys=True)
        metadata["config"] = config_json
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))
    if config_json is not None:
        atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config_json + "\n"))
    write_checksums(directory, [WEIGHTS_NAME] + ([CONFIG_NAME] if config_json is not None else []))
    return directory


def load_quantized(directory: Union[str, Path], model: Optional[nn.Module] = None,
                   device: Optional[Union[str, torch.device]] = None, verify: bool = True) -> nn.Module:
    """Load a model written by ``save_quantized``: the same FP8 codes, scales and calibrated input
    scales, bit for bit (no calibration data). A WAMTransformer is rebuilt from the stored config;
    any other model needs ``model``: the high-precision module it was quantized from (weights are
    replaced, so a meta-device build is enough). ``verify``: check the files against checksums.json first."""
    import safetensors.torch  # on first use: importing the models stays light

    directory = Path(directory)
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} not found (a quantized checkpoint directory written by "
                                f"wam_fast.quant.save_quantized)")
    if verify:
        verify_checksums(directory, [WEIGHTS_NAME] + ([CONFIG_NAME] if (directory / CONFIG_NAME).is_file() else []))
    names, metadata = read_header(weights_path)
    if metadata.get(FORMAT_KEY) != FORMAT_VERSION or QUANT_KEY not in metadata:
        raise ValueError(f"{weights_path} is not a quantized wam_fast checkpoint (no {QUANT_KEY!r} metadata); "
                         f"load a high-precision checkpoint with wam_fast.load_pretrained")
    quant = json.loads(metadata[QUANT_KEY])
    if quant.get("format") != QUANT_FORMAT:
        raise ValueError(f"{weights_path}: quantization format {quant.get('format')!r}, expected {QUANT_FORMAT}")
    if model is None:
        if "config" not in metadata:
            raise ValueError(f"{weights_path} holds a quantized model that is not a WAMTransformer: pass the "
                             f"high-precision model it came from as model=")
        config_path = directory / CONFIG_NAME
        if config_path.is_file() and read_json(config_path) != json.loads(metadata["config"]):
            raise ValueError(f"{config_path} does not match the config stored in {weights_path} "
                             "(an interrupted save or a hand-edited file); re-save the checkpoint")
        check_layers(weights_path, names, json.loads(metadata["config"]))
        with torch.device("meta"):
            model = WAMTransformer(WAMConfig.from_dict(json.loads(metadata["config"])))
    device = torch.device(device) if device is not None else torch.device("cpu")
    modules = dict(model.named_modules())
    for name, class_name in quant["modules"].items():
        if name not in modules:
            raise ValueError(f"{weights_path}: the model has no module {name!r} (quantized in the checkpoint); "
                             f"pass the model it was quantized from")
        cls = FP8_MODULE_TYPES[class_name]
        new = FP8Linear.from_spec(quant["linears"][name], device="meta") if cls is FP8Linear \
            else retype(modules[name], cls)
        set_submodule(model, name, new)
    state = safetensors.torch.load_file(str(weights_path), device=str(device))
    expected, found = set(model.state_dict()), set(state)
    if expected != found:
        raise ValueError(f"{weights_path} does not fit the model: missing {sorted(expected - found)[:8]}, "
                         f"unexpected {sorted(found - expected)[:8]}")
    model.load_state_dict(state, assign=True)
    return model.eval()
