"""Module swaps by name, the one way wam_fast attaches to a model (fuse, quantize_fp8, compile):
a swapped-in module keeps the same parameters (the same tensors, not copies) and submodule names,
so state_dicts and checkpoints do not change, and every swap can be undone."""
from __future__ import annotations

from typing import Callable, List, Mapping, Optional, Tuple

import torch.nn as nn


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def retype(module: nn.Module, cls: type) -> nn.Module:
    """A new module of class ``cls`` holding the same parameters, buffers, submodules and settings."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    for key in ("_parameters", "_buffers", "_modules"):
        new.__dict__[key] = dict(module.__dict__[key])  # same tensors, own containers
    return new


def retype_by_table(model: nn.Module, table: Mapping[type, type], filter_fn: Optional[Callable[[nn.Module, str], bool]],
                    what: str) -> List[dict]:
    """Retype every submodule whose exact class is a key of ``table`` (and that filter_fn accepts) to
    its value; returns [{"name", "from", "to"}]. ``what`` names the caller in the error for a bare module."""
    swapped = []
    for name, module in list(model.named_modules()):
        cls = table.get(type(module))
        if cls is None or (filter_fn is not None and not filter_fn(module, name)):
            continue
        if not name:
            raise ValueError(f"{what} swaps submodules; got a bare {type(module).__name__}: wrap it in a model")
        set_submodule(model, name, retype(module, cls))
        swapped.append({"name": name, "from": type(module).__name__, "to": cls.__name__})
    return swapped


class ModuleSwaps:
    """Undo for changes that replace submodules: remembers the modules by name before the change and
    restores every top-most one that changed."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.before = dict(model.named_modules())

    def changed(self) -> List[Tuple[str, nn.Module, nn.Module]]:
        now = dict(self.model.named_modules())
        return [(name, self.before[name], new) for name, new in now.items()
                if name and name in self.before and self.before[name] is not new]

    def undo(self) -> None:
        # parents first: a retyped parent's old object may hold a child a later swap replaced
        # (quantize_fp8 swaps ff.proj_in, then ff is retyped), which its own row then restores
        for name, old, _ in sorted(self.changed(), key=lambda row: row[0].count(".")):
            set_submodule(self.model, name, old)


def call_module(model, inputs):
    """Call ``model`` on example inputs: a dict of keyword arguments, a tuple/list of positional ones,
    or one value."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)
