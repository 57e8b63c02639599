"""How far an FP8 model is from its high-precision source: SQNR per layer and per output (``report``)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.nn as nn

from wam_fast.models.transformer import WAMTransformer
from wam_fast.quant.quantize import fp8_layers
from wam_fast.utils.modules import call_module


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 20 log10(||ref|| / ||ref - test||) in dB (inf when equal)."""
    ref, err = reference.detach().double(), (reference.detach().double() - test.detach().double())
    noise = err.norm().item()
    signal = ref.norm().item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 20.0 * math.log10(signal / noise)


@dataclass
class FP8Report:
    """layers: [{"name", "sqnr_db" (the FP8 layer vs the reference layer on the reference's input to
    it: its own error), "sqnr_db_in_model" (its output in the FP8 model vs in the reference model:
    errors accumulated up to it)}]; outputs: {name: {"rel_error", "sqnr_db"}}, end to end."""

    layers: List[dict]
    outputs: Dict[str, dict]

    def min_layer_sqnr_db(self) -> float:
        return min(layer["sqnr_db"] for layer in self.layers)

    def to_dict(self) -> dict:
        return {"layers": self.layers, "outputs": self.outputs}

    def __str__(self) -> str:
        lines = [f"{'layer':<32}{'SQNR dB':>10}{'in model':>10}"]
        lines += [f"{r['name']:<32}{r['sqnr_db']:>10.2f}{r['sqnr_db_in_model']:>10.2f}" for r in self.layers]
        lines.append(f"{'output':<32}{'SQNR dB':>10}{'rel err':>10}")
        lines += [f"{k:<32}{v['sqnr_db']:>10.2f}{v['rel_error']:>10.2e}" for k, v in self.outputs.items()]
        return "\n".join(lines)


def _output_tensors(model: nn.Module, out) -> Dict[str, torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return {"output": out}
    if isinstance(model, WAMTransformer):
        return {"video": out[0], "actions": out[1]}
    return {f"output{i}": t for i, t in enumerate(out) if isinstance(t, torch.Tensor)}


def report(model_ref: nn.Module, model_fp8: nn.Module, inputs) -> FP8Report:
    """Per-layer SQNR (dB) of every FP8Linear in ``model_fp8`` and the end-to-end relative error and
    SQNR of each output (WAMTransformer: "video", "actions"), from one forward of both models on
    ``inputs`` (a dict of keyword arguments, a tuple of positional ones, or a tensor)."""
    layers = fp8_layers(model_fp8)
    if not layers:
        raise ValueError("report: model_fp8 has no FP8Linear layers (run quantize_fp8 on it first)")
    ref_modules = dict(model_ref.named_modules())
    missing = [name for name in layers if name not in ref_modules]
    if missing:
        raise ValueError(f"report: model_ref has no modules named {missing[:4]}: pass the high-precision model "
                         f"that model_fp8 was quantized from")
    in_model: Dict[str, List[torch.Tensor]] = {name: [] for name in layers}
    rows: Dict[str, dict] = {}

    def keep_output(name):
        def hook(module, args, output):
            in_model[name].append(output.detach())
        return hook

    def compare(name):
        def hook(module, args, output):
            own = sqnr_db(output, layers[name](args[0]))  # the FP8 layer on the reference's input
            accumulated = sqnr_db(output, in_model[name].pop(0)) if in_model[name] else math.nan
            row = rows.setdefault(name, {"name": name, "sqnr_db": math.inf, "sqnr_db_in_model": math.inf})
            row["sqnr_db"] = min(row["sqnr_db"], own)  # a layer called several times: its worst call
            row["sqnr_db_in_model"] = min(row["sqnr_db_in_model"], accumulated)
        return hook

    handles = [layers[name].register_forward_hook(keep_output(name)) for name in layers]
    try:
        with torch.no_grad():
            out_fp8 = call_module(model_fp8, inputs)
    finally:
        for h in handles:
            h.remove()
    handles = [ref_modules[name].register_forward_hook(compare(name)) for name in layers]
    try:
        with torch.no_grad():
            out_ref = call_module(model_ref, inputs)
    finally:
        for h in handles:
            h.remove()
    outputs = {}
    fp8_outputs = _output_tensors(model_fp8, out_fp8)
    for key, ref in _output_tensors(model_ref, out_ref).items():
        test = fp8_outputs[key]
        rel = (ref.double() - test.double()).norm().item() / max(ref.double().norm().item(), 1e-30)
        outputs[key] = {"rel_error": rel, "sqnr_db": sqnr_db(ref, test)}
    return FP8Report([rows[name] for name in layers if name in rows], outputs)
