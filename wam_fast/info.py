"""``python -m wam_fast.info``: what is available on this machine, and why not.

The report is data: ``SECTIONS`` is a list of functions, each returning a title and rows of
``{"name", "status", "detail"}``. Later work adds a section (the op/backend table) by appending
to it. ``--json`` prints the same data for scripts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from wam_fast import __version__, ops
from wam_fast.compiler import capabilities
from wam_fast.ops import registry
from wam_fast.utils import environment, optional

def versions_section():
    import torch

    rows = [
        {"name": "wam_fast", "status": __version__, "detail": ""},
        {"name": "python", "status": sys.version.split()[0], "detail": sys.executable},
        {"name": "torch", "status": torch.__version__,
         "detail": f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"},
        {"name": "triton", "status": environment.package_version("triton") or "missing", "detail": ""},
        {"name": "commit", "status": environment.git_commit() or "unknown", "detail": ""},
    ]
    return "versions", rows


def device_section():
    import torch

    if not torch.cuda.is_available():
        why = "CPU build of torch" if not torch.version.cuda else "no CUDA device visible"
        rows = [{"name": "device", "status": "no GPU", "detail": f"{why}; cpu: {environment.cpu_name()}, "
                 f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads"}]
        return "device", rows
    rows = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        rows.append({"name": f"cuda:{i}", "status": torch.cuda.get_device_name(i),
                     "detail": f"compute capability {major}.{minor}"})
    return "device", rows


def extension_section():
    """Whether the CUDA extension wam_fast._C is built, and if not, why."""
    import torch

    row = {"name": "wam_fast._C", "status": "", "detail": ""}
    if not optional.installed("wam_fast._C"):
        row["status"] = "not built"
        if not torch.version.cuda:
            row["detail"] = f"torch {torch.__version__} is a CPU build (no CUDA torch to build against)"
        else:
            row["detail"] = ("build it on this machine: pip install --no-build-isolation -e . "
                             "(needs nvcc; see setup.py cuda_build_reason)")
        return "CUDA extension", [row]
    why = registry.cuda_extension_reason()
    row["status"], row["detail"] = ("built", "") if why is None else ("broken", why)
    return "CUDA extension", [row]


def triton_section():
    import torch

    version = environment.package_version("triton")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    row = {"name": "triton", "status": version or "missing", "detail": ""}
    if version is None:
        row["detail"] = "Triton kernels unavailable (pip install triton, Linux x86-64)"
    elif torch.cuda.is_available():
        row["detail"] = "GPU kernels" + (" (TRITON_INTERPRET=1 is set: interpreter)" if interpret else "")
    elif interpret:
        row["detail"] = "TRITON_INTERPRET=1 is set: kernels run on CPU tensors in the interpreter"
    else:
        row["detail"] = "no GPU and TRITON_INTERPRET is not set: Triton kernels cannot run"
    return "Triton", [row]


def optional_section():
    rows = []
    for name, pkg in optional.OPTIONAL_PACKAGES.items():
        ok = optional.installed(pkg["module"])
        rows.append({"name": name, "status": "available" if ok else "missing",
                     "detail": pkg["use"] if ok else f"{pkg['use']}: {pkg['install']}"})
    return "optional packages", rows


def ops_section():
    """Each fused op's backends in priority order: available here, or why not."""
    rows = [{"name": f"{r['op']} / {r['backend']}", "status": r["status"], "detail": r["detail"]}
            for r in ops.backend_table()]
    return "ops (backends in priority order: cuda, triton, torch)", rows


def fallbacks_section():
    """Fallbacks taken in this process (when report() is called from a program that ran ops)."""
    taken = ops.fallbacks()
    if not taken:
        return "fallbacks taken in this process", [{"name": "none", "status": "", "detail": ""}]
    return "fallbacks taken in this process", [
        {"name": f"{f['op']} -> {f['backend']}", "status": f"{f['count']} calls", "detail": " | ".join(f["skipped"])}
        for f in taken]


def compile_section():
    """wam_fast.compile's backends and optional attention kernels: usable here, or why not (install lines)."""
    return "compile (wam_fast.compile backends and attention kernels)", capabilities()


# Order of the report; append a function to add a section.
SECTIONS = [versions_section, device_section, extension_section, triton_section, ops_section,
            fallbacks_section, compile_section, optional_section]


def report() -> list:
    return [{"title": title, "rows": rows} for title, rows in (section() for section in SECTIONS)]


def format_report(sections: list) -> str:
    rows = [r for s in sections for r in s["rows"]]
    name_width = max(len(r["name"]) for r in rows) + 2
    status_width = max(len(r["status"]) for r in rows if r["detail"]) + 2
    lines = []
    for section in sections:
        lines.append(section["title"])
        for r in section["rows"]:
            status = f"{r['status']:<{status_width}}" if r["detail"] else r["status"]
            lines.append(f"  {r['name']:<{name_width}}{status}{r['detail']}".rstrip())
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m wam_fast.info",
                                     description="What wam_fast can use on this machine, and why not.")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    sections = report()
    print(json.dumps(sections, indent=2) if args.json else format_report(sections))


if __name__ == "__main__":
    main()
