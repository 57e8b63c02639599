"""Loopback load check of ``python -m wam_fast.serve``: N clients x M requests through the real openpi client.

    python benchmarks/serve_load.py [--clients 4 --requests 200 --json benchmarks/results/serve-load-cpu.json]

Starts ``python -m wam_fast.serve --demo --port 0 --seed 0`` as its own process, runs the clients on threads
(each its own connection, prompt and random uint8 frames), and reports: errors (must be 0), end-to-end latency
per request as the client sees it (p50 / p90 / p99 / max), the server's own ``infer_ms``, throughput, and the
server's resident memory sampled every 0.1 s (flat: the last quarter's peak within ``FLAT_MIB`` + 2% of the
second quarter's; the first quarter is warm-up: allocator pools and caches fill there). Bounded in time (--timeout). Exit 0 only when there were no errors and memory stayed flat.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

FLAT_MIB = 8.0


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def start_server(extra=()):
    """The server process and its port (read from its log, which a thread keeps draining)."""
    proc = subprocess.Popen([sys.executable, "-m", "wam_fast.serve", "--demo", "--port", "0", "--seed", "0", *extra],
                            stderr=subprocess.PIPE, text=True)
    found, log = threading.Event(), []

    def drain():
        for line in proc.stderr:
            log.append(line)
            if not found.is_set() and re.search(r"on ws://127\.0\.0\.1:(\d+)", line):
                found.set()
    threading.Thread(target=drain, daemon=True).start()
    if not found.wait(180):
        proc.kill()
        raise RuntimeError("the server did not start:\n" + "".join(log))
    port = int(next(re.search(r"on ws://127\.0\.0\.1:(\d+)", line).group(1) for line in log if "on ws://" in line))
    return proc, port, log


def percentiles(values):
    a = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max()), "n": int(a.size)} if a.size else {}


def run(clients: int, requests: int, timeout: float) -> dict:
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    proc, port, log = start_server()
    samples, done = [], threading.Event()

    def sample_memory():
        while not done.is_set():
            samples.append((time.perf_counter(), rss_mib(proc.pid)))
            time.sleep(0.1)

    def client(index):
        policy = WebsocketClientPolicy("127.0.0.1", port)
        shape = policy.get_server_metadata()["image_shape"]
        rng = np.random.default_rng(index)
        e2e, server, errors = [], [], []
        for i in range(requests):
            obs = {"image": rng.integers(0, 256, shape, dtype=np.uint8), "prompt": f"task {index}"}
            t0 = time.perf_counter()
            try:
                reply = policy.infer(obs)
                if not np.isfinite(reply["actions"]).all():
                    raise ValueError("non-finite actions")
            except Exception as exc:  # counted, the run goes on
                errors.append(f"client {index} request {i}: {type(exc).__name__}: {exc}")
                continue
            e2e.append((time.perf_counter() - t0) * 1e3)
            server.append(reply["server_timing"]["infer_ms"])
        return e2e, server, errors

    sampler = threading.Thread(target=sample_memory, daemon=True)
    try:
        sampler.start()
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(client, i) for i in range(clients)]
            results = [f.result(timeout=max(1.0, timeout - (time.perf_counter() - start))) for f in futures]
        wall = time.perf_counter() - start
    finally:
        done.set()
        sampler.join()
        proc.terminate()
        code = proc.wait(60)
    e2e = [x for r in results for x in r[0]]
    server = [x for r in results for x in r[1]]
    errors = [x for r in results for x in r[2]]
    quarter = max(1, len(samples) // 4)
    second, last = max(m for _, m in samples[quarter:2 * quarter] or samples), max(m for _, m in samples[-quarter:])
    flat = last <= second * 1.02 + FLAT_MIB
    return {"clients": clients, "requests_per_client": requests, "requests": clients * requests,
            "errors": len(errors), "error_examples": errors[:5], "wall_s": wall,
            "throughput_rps": len(e2e) / wall, "end_to_end_ms": percentiles(e2e), "server_infer_ms": percentiles(server),
            "raw": {"end_to_end_ms": [round(x, 3) for x in e2e], "server_infer_ms": [round(x, 3) for x in server],
                    "server_rss_mib": [[round(t - samples[0][0], 2), round(m, 2)] for t, m in samples]},
            "server_rss_mib": {"first_quarter_peak": max(m for _, m in samples[:quarter]),
                               "second_quarter_peak": second, "last_quarter_peak": last, "peak": max(m for _, m in samples),
                               "samples": len(samples), "flat": flat,
                               "flat_rule": f"last quarter's peak <= second quarter's * 1.02 + {FLAT_MIB} MiB"},
            "server_exit_code_on_sigterm": code, "server_log_tail": log[-3:]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole run")
    parser.add_argument("--json", help="write the result (with the environment) here")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.timeout <= 0:
        parser.error("--clients and --requests must be >= 1 and --timeout > 0")
    result = run(args.clients, args.requests, args.timeout)
    from wam_fast.utils.environment import environment

    result["environment"] = environment("cpu")
    result["command"] = "python benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.json)
    return 0 if result["errors"] == 0 and result["server_rss_mib"]["flat"] else 1


if __name__ == "__main__":
    sys.exit(main())
