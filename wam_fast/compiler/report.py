"""``CompileReport``: what ``wam_fast.compile`` applied to an object, what it left alone and why, and
the accuracy checks; ``compile_report(obj)`` reads it back."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from wam_fast.compiler.config import CompileConfig


def _pattern(name: str) -> str:
    """The name with its first index replaced: blocks.3.attn.qkv -> blocks.*.attn.qkv (ff.net.2 stays)."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name, count=1)


@dataclass
class CompileReport:
    """What ``compile`` did to one object.

    applied  [(where, what)]: module name (or lever name) and what it became
    skipped  [(where, why)]: levers or modules left alone, and why
    checks   [{"lever", "metric", "value", "limit", "ok"}]: the accuracy checks (with example_inputs)
    ``str(report)`` is a readable table (repeated layers grouped as ``blocks.*.attn (x42)``).
    """

    target: str
    config: CompileConfig
    applied: List[Tuple[str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    checks: List[dict] = field(default_factory=list)

    def apply(self, where: str, what: str) -> None:
        self.applied.append((where, what))

    def skip(self, where: str, why: str) -> None:
        self.skipped.append((where, why))

    def applied_to(self, where: str) -> List[str]:
        """What was applied at ``where`` (exact name)."""
        return [what for w, what in self.applied if w == where]

    def skipped_at(self, where: str) -> List[str]:
        """Why ``where`` (exact name) was left alone."""
        return [why for w, why in self.skipped if w == where]

    def to_dict(self) -> dict:
        return {"target": self.target, "applied": [list(r) for r in self.applied],
                "skipped": [list(r) for r in self.skipped], "checks": list(self.checks)}

    @staticmethod
    def _grouped(rows: List[Tuple[str, str]]) -> List[Tuple[str, str]]:
        groups: Dict[Tuple[str, str], List[str]] = {}
        for where, text in rows:
            groups.setdefault((_pattern(where), text), []).append(where)
        out = []
        for (pattern, text), names in groups.items():
            where = names[0] if len(names) == 1 else f"{pattern} (x{len(names)})"
            out.append((where, text))
        return out

    def __str__(self) -> str:
        applied, skipped = self._grouped(self.applied), self._grouped(self.skipped)
        width = max([len(w) for w, _ in applied + skipped] + [10]) + 2
        lines = [f"wam_fast.compile report: {self.target} (backend={self.config.backend}, fused={self.config.fused}, "
                 f"fp8={self.config.fp8}, cache={self.config.cache}, cuda_graphs={self.config.cuda_graphs})",
                 "applied:"]
        lines += [f"  {w:<{width}}{t}" for w, t in applied] or ["  (nothing)"]
        lines.append("left alone:")
        lines += [f"  {w:<{width}}{t}" for w, t in skipped] or ["  (nothing)"]
        if self.checks:
            lines.append("accuracy checks (example_inputs, each lever vs the output before it):")
            for c in self.checks:
                lines.append(f"  {c['lever']:<{width}}{c['metric']} {c['value']:.3g} (limit {c['limit']:.3g}): "
                             f"{'ok' if c['ok'] else 'REVERTED'}")
        return "\n".join(lines)


REPORT_ATTR = "_wam_fast_report"


def compile_report(model) -> CompileReport:
    """The ``CompileReport`` of an object ``compile`` transformed (ValueError if it did not)."""
    report = getattr(model, REPORT_ATTR, None)
    if report is None:
        raise ValueError(f"this {type(model).__name__} was not compiled by wam_fast.compile (no report)")
    return report


def attach_report(obj, report: CompileReport, bound: bool) -> None:
    """Keep ``report`` on ``obj`` (and, for wam_fast's own classes, a ``.report()`` method)."""
    obj.__dict__[REPORT_ATTR] = report  # not through nn.Module.__setattr__: a plain attribute
    if bound:  # our own classes (no user attribute to shadow): a .report() method on the instance
        # a function of the report alone: a bound method of obj, kept on obj, would be a reference
        # cycle keeping a dropped policy (its cache, its graphs) or model alive until the next gc
        def report_method() -> CompileReport:
            return report

        report_method.__doc__ = compile_report.__doc__
        obj.__dict__["report"] = report_method
