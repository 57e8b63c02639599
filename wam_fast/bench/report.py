"""What the bench writes: the latency table, the accounting table, the environment lines, the JSON
(atomically) and the PNG chart (matplotlib, optional: a missing matplotlib is a message, not an error)."""
from __future__ import annotations

import json
import os
from typing import List, Optional

from wam_fast.bench.ceilings import FLOOR_NOTE
from wam_fast.bench.rows import BASELINES

RATIO_HEADS = {"released-baseline": "vs released", "paper-baseline": "vs paper",
               "paper-baseline-compiled": "vs paper compiled"}

CHART_HINT = "pip install matplotlib (or pip install 'wam_fast[bench]')"


def format_bytes(n: int) -> str:
    if n >= 2 ** 30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2 ** 20 else f"{n / 2**10:.1f} KiB"


def format_ms(ms: float) -> str:
    return f"{ms:.3g} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def _clock(row: dict) -> Optional[str]:
    """"SM MHz / C" of a row's GPU telemetry, or None (CPU, no NVML, an older JSON)."""
    t = row.get("gpu_telemetry") or {}
    if t.get("sm_clock_mhz") is None:
        return None
    return f"{t['sm_clock_mhz']} / {t['temperature_c'] if t.get('temperature_c') is not None else '-'}"


def format_table(workload: str, rows: List[dict]) -> str:
    floor = any(r.get("pct_of_floor") is not None for r in rows)
    clocks = any(_clock(r) is not None for r in rows)
    head = (["name", "sampler", "steps", "nfe", "tokens", "levers", "KV cache", "median ms", "p90 ms", "peak mem"]
            + [RATIO_HEADS[b] for b in BASELINES] + (["% of floor"] if floor else [])
            + (["SM MHz / C"] if clocks else []))
    lines = [f"workload {workload}", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        speedups = r.get("speedups", {})
        ratio = [f"{speedups[b]:.2f}x" if b in speedups else "-" for b in BASELINES]
        cache = format_bytes(r["cache_bytes"]) if r.get("cache") else "-"
        levers = "+".join(r.get("levers") or ["eager"])
        cells = [r["name"], r["sampler"], r["steps"], r["nfe"], r["tokens"], levers, cache,
                 f"{r['latency_ms']:.2f}", f"{r['p90_ms']:.2f}", format_bytes(r["peak_mem_bytes"])] + ratio
        if floor:
            cells.append("-" if r.get("pct_of_floor") is None else f"{r['pct_of_floor']:.1f}%")
        if clocks:
            cells.append(_clock(r) or "-")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if floor:
        lines.append(f"({FLOOR_NOTE})")
    return "\n".join(lines)



def format_accounting(entries: List[dict]) -> str:
    head = ("workload", "steps x rows", "model", "noisy tokens / step", "tokens / chunk", "TFLOP / chunk",
            "vs uncached", "text once per instruction", "KV cache (bf16)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    uncached = {}
    for e in entries:
        if e["model"] == "temporal":
            uncached[e["workload"]] = e["tflop"]
        ratio = f"{uncached[e['workload']] / e['tflop']:.2f}x fewer FLOPs" if e["cache"] else "-"
        text = f"{e['text_tokens']} tokens, {e['text_tflop']:.2f} TFLOP" if e["cache"] else "-"
        memory = format_bytes(e["cache_bytes_bf16"]) if e["cache"] else "-"
        cells = (e["workload"], f"{e['steps']} x {e['rows']}", e["model"], e.get("noisy_tokens", "-"), e["tokens"],
                 f"{e['tflop']:.2f}", ratio, text, memory)
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def format_environment(env: dict, options: dict) -> str:
    device = env["device"] + (f" (sm {env['capability']}, driver {env['driver']})" if env.get("capability") else "")
    clocks = (f", SM clock {env['sm_clock_mhz']}/{env['sm_clock_max_mhz']} MHz"
              if env.get("sm_clock_mhz") is not None else "")
    return "\n".join([
        f"device    {device}{clocks}",
        f"versions  python {env['python']}, torch {env['torch']}, triton {env['triton'] or '-'}, "
        f"cuda {env['cuda'] or '-'}, wam_fast {env['wam_fast']}, commit {env['commit'] or 'unknown'}",
        f"run       workload {options['workload']}, {options['dtype']}, batch {options['batch']}, "
        f"{env['torch_threads']} torch threads / {env['cpu_count']} cpus, warmup {options['warmup']}, "
        f"repeats {options['repeats']}, seed {options['seed']}, compile backend {options['backend']}, "
        f"random weights and inputs",
    ])


# ---- chart --------------------------------------------------------------------------------------------
def write_chart(result: dict, path: str) -> Optional[str]:
    """Draw the rows of ``result`` (median latency bars, p90 whiskers, log scale, speedup vs the paper
    baseline written on each bar) into the PNG ``path``. Returns None, or why no chart was drawn
    (matplotlib missing) - a message, never an exception, so a measurement is never lost to a chart."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        return f"chart not drawn: matplotlib is not installed ({CHART_HINT})"
    rows = result["rows"]
    # the pyplot-free API: no global backend or rcParams change in the caller's process
    fig = Figure(figsize=(9.5, 0.42 * len(rows) + 1.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = {"baseline": "#7f7f7f", "compiled baseline": "#3f3f3f", "fp8": "#e3741b", "other": "#1f6fb4"}
    y = list(range(len(rows)))[::-1]
    for yi, r in zip(y, rows):
        kind = ("fp8" if r["fp8"] else "other") if r["name"] not in BASELINES else \
            ("compiled baseline" if r.get("compiled_with") == "wam_fast.compile" else "baseline")
        ax.barh(yi, r["latency_ms"], color=colours[kind], hatch=None if r["cache"] or "baseline" in kind else "//",
                edgecolor="white", height=0.7)
        ax.plot([r["latency_ms"], r["p90_ms"]], [yi, yi], color="black", linewidth=1)
        speedup = r.get("speedups", {}).get("paper-baseline")
        label = f" {format_ms(r['latency_ms'])}" + (f"  {speedup:.2f}x" if speedup is not None else "")
        if r.get("pct_of_floor") is not None:
            label += f"  {r['pct_of_floor']:.0f}% of GEMM floor"
        ax.text(r["p90_ms"], yi, label, va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels([r["name"] for r in rows], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("latency per action chunk, ms (median; line to p90; log scale)")
    longest = max(r["p90_ms"] for r in rows)
    ax.set_xlim(min(r["latency_ms"] for r in rows) / 2, longest * 6)
    versions_ = result.get("versions", {})
    ax.set_title(f"wam_fast bench: {result['workload']} on {result['device']}\n"
                 f"torch {versions_.get('torch')}, commit {versions_.get('commit')}; ratios vs paper-baseline",
                 fontsize=9)
    ax.legend(handles=[Patch(color=colours["baseline"], label="eager baselines (CFG, 2 rows)"),
                       Patch(color=colours["compiled baseline"], label="paper baseline, wam_fast.compile"),
                       Patch(color=colours["other"], label="wam_fast, " + rows[-1].get("dtype", "bf16")),
                       Patch(color=colours["fp8"], label="wam_fast, FP8"),
                       Patch(facecolor="white", edgecolor="black", hatch="//", label="no KV cache")],
              fontsize=7, loc="lower right")
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, format="png")
    return None



def write_json(path: str, result: dict) -> None:
    """Write ``result`` to ``path`` atomically (a reader never sees half a file)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
