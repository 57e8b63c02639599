"""Weight memory of a model before and after ``quantize_fp8``."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from wam_fast.models.transformer import WAMTransformer
from wam_fast.quant.linear import FP8Config
from wam_fast.quant.quantize import FilterFn, fp8_layers, quantize_fp8


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and persistent buffers (its state_dict)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def weight_bytes(config, fp8_config: Optional[FP8Config] = None, filter_fn: Optional[FilterFn] = None) -> dict:
    """Weight bytes of a WAMTransformer(config) in bf16 ("bf16") and after ``quantize_fp8`` ("fp8"),
    from a meta-device build: no memory, no initialisation. Also the parameter count ("params") and
    how many of them are FP8 ("fp8_params")."""
    with torch.device("meta"):
        model = WAMTransformer(config).to(torch.bfloat16)
    high = tensor_bytes(model)
    params = sum(p.numel() for p in model.parameters())
    quantize_fp8(model, fp8_config, filter_fn)
    fp8 = sum(m.weight.numel() for m in fp8_layers(model).values())
    return {"bf16": high, "fp8": tensor_bytes(model), "params": params, "fp8_params": fp8}
