"""``python -m wam_fast.serve``: serve a saved WAMPipeline (or a tiny random one) to robots over a websocket.

    python -m wam_fast.serve --pipeline DIR [--host 127.0.0.1 --port 8000 --api-key KEY --device cuda]
    python -m wam_fast.serve --demo          # a tiny random pipeline: try the protocol, no weights needed

Bad flags exit 2 with one line; the pipeline directory is checked and loaded before the port is bound.
SIGINT / SIGTERM stop the server cleanly (open connections are closed, the inference thread finishes).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

from wam_fast.serve.server import DEFAULT_MAX_REQUEST_MB, PolicyServer
from wam_fast.utils.cli import OneLineParser

DTYPES = ("float32", "bfloat16", "float16")


def port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m wam_fast.serve", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--pipeline", type=Path, help="a directory saved by WAMPipeline.save_pretrained")
    what.add_argument("--demo", action="store_true", help="serve WAMPipeline.tiny_random() (random weights)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=port, default=8000, help="port (default 8000; 0: any free port)")
    parser.add_argument("--api-key", help="require 'Authorization: Api-Key KEY' (openpi client: api_key=KEY)")
    parser.add_argument("--device", default=None, help="torch device for the pipeline (default: cuda if present)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="pipeline dtype (default: as saved)")
    parser.add_argument("--seed", type=int, default=None, help="noise seed of every session (default: random)")
    parser.add_argument("--max-request-mb", type=positive_float, default=DEFAULT_MAX_REQUEST_MB,
                        help=f"largest observation message accepted (default {DEFAULT_MAX_REQUEST_MB} MiB)")
    return parser


def load_pipeline(args, parser):
    """The pipeline the flags name; a bad directory or device ends in parser.error (exit 2)."""
    import torch

    from wam_fast.pipeline import WAMPipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        parser.error(f"--device {args.device!r} is not a torch device ({exc})")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device} but no CUDA device is visible")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.demo:
        pipeline = WAMPipeline.tiny_random(seed=0)
        if dtype is None and device.type == "cpu":
            return pipeline
        with tempfile.TemporaryDirectory() as tmp:  # the one way a pipeline moves: save, load
            pipeline.save_pretrained(Path(tmp) / "demo")
            return WAMPipeline.from_pretrained(Path(tmp) / "demo", device=device, dtype=dtype)
    if not args.pipeline.is_dir():
        parser.error(f"--pipeline {args.pipeline} is not a directory")
    if not (args.pipeline / "pipeline.json").is_file():
        parser.error(f"--pipeline {args.pipeline} has no pipeline.json (save one with WAMPipeline.save_pretrained)")
    try:
        return WAMPipeline.from_pretrained(args.pipeline, device=device, dtype=dtype)
    except (ValueError, OSError, TypeError) as exc:
        parser.error(f"--pipeline {args.pipeline} does not load: {exc}")


async def _serve_until_signal(server: PolicyServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.serve(stop)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    pipeline = load_pipeline(args, parser)
    server = PolicyServer(pipeline, args.host, args.port, api_key=args.api_key, seed=args.seed,
                          max_request_bytes=int(args.max_request_mb * (1 << 20)))
    try:
        asyncio.run(_serve_until_signal(server))
    except OSError as exc:  # the port is taken, the address is not ours, ...
        print(f"python -m wam_fast.serve: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0
