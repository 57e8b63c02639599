"""Handler registries keyed by type (``quantize_fp8``'s per-module handlers, ``compile``'s per-model
handlers), torchao style: ``@registry.register(SomeType)`` adds a handler."""
from __future__ import annotations

from typing import Callable, Dict, Optional


class TypeRegistry:
    """type -> handler. ``exact`` looks up an object's own class; ``nearest`` walks its MRO, so a
    subclass without a handler of its own gets its closest base class's."""

    def __init__(self):
        self.handlers: Dict[type, Callable] = {}

    def register(self, cls: type):
        """Decorator registering a handler for ``cls`` (replacing any earlier one)."""
        def register(handler: Callable) -> Callable:
            self.handlers[cls] = handler
            return handler
        return register

    def exact(self, obj) -> Optional[Callable]:
        return self.handlers.get(type(obj))

    def nearest(self, obj) -> Optional[Callable]:
        for cls in type(obj).__mro__:
            if cls in self.handlers:
                return self.handlers[cls]
        return None
