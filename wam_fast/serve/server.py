"""``PolicyServer``: a WAMPipeline served over a websocket, in openpi's policy protocol.

On connect the server sends the pipeline's metadata (msgpack); then each binary message is an observation
and each reply the actions (``wam_fast.serve.adapter``). A bad request gets a text frame naming the problem
and the connection stays usable; a message over ``max_request_bytes`` closes that connection with code 1009
and a reason naming the limit. Other connections never notice either.

Each connection has its own episode (its own session: KV cache rows, noise stream). The model runs on ONE
inference thread: requests from all connections are serialised there (one model on one device), while the
event loop keeps accepting connections, answering pings and /healthz.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import logging
import threading
from http import HTTPStatus
from typing import Optional

from wam_fast.serve import wire
from wam_fast.serve.adapter import ObservationError, PipelineSessionAdapter
from wam_fast.utils.optional import missing_reason

logger = logging.getLogger("wam_fast.serve")
DEFAULT_MAX_REQUEST_MB = 32


class PolicyServer:
    """pipeline: a WAMPipeline (or anything with ``metadata()`` and ``new_session(seed)``).
    api_key: when set, a client must send ``Authorization: Api-Key <key>`` (openpi's client does, given
    ``api_key=``); others are refused with 401 at the handshake. seed: each session's noise seed (None: random)."""

    def __init__(self, pipeline, host: str = "127.0.0.1", port: int = 8000, *, api_key: Optional[str] = None,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_MB << 20, seed: Optional[int] = None):
        for package in ("websockets", "msgpack"):
            reason = missing_reason(package)
            if reason is not None:
                raise ImportError(reason)
        if not isinstance(max_request_bytes, int) or max_request_bytes <= 0:
            raise ValueError(f"max_request_bytes must be a positive int, got {max_request_bytes!r}")
        self.pipeline, self.host, self.port = pipeline, host, port
        self.api_key, self.max_request_bytes, self.seed = api_key, max_request_bytes, seed
        self.metadata = dict(pipeline.metadata())
        self.metadata["max_request_bytes"] = max_request_bytes
        self._packed_metadata = wire.packb(self.metadata)
        self._inference = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="wam_fast-inference")
        self.bound_port: Optional[int] = None
        self.connections = 0

    # ---- HTTP side: health check and api key ----------------------------------------------------------------
    def _process_request(self, connection, request):
        if request.path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if self.api_key is not None:
            sent = request.headers.get("Authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Api-Key {self.api_key}".encode()):
                logger.warning("refused a connection from %s: missing or wrong api key", connection.remote_address)
                return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong api key "
                                                                   "(send Authorization: Api-Key <key>)\n")
        return None

    # ---- one connection -----------------------------------------------------------------------------------------
    async def _handle(self, connection):
        from websockets.exceptions import ConnectionClosed

        peer = connection.remote_address
        self.connections += 1
        logger.info("connection from %s (%d open)", peer, self.connections)
        loop = asyncio.get_running_loop()
        try:
            session = await loop.run_in_executor(self._inference, PipelineSessionAdapter, self.pipeline,
                                                 self.metadata, self.seed)
            await connection.send(self._packed_metadata)
            async for message in connection:
                reply = await self._answer(loop, session, message, peer)
                await connection.send(reply)
        except ConnectionClosed as exc:
            if exc.rcvd is None and exc.sent is not None and exc.sent.code == 1009:
                logger.warning("closed %s: a message over the %d-byte limit", peer, self.max_request_bytes)
        finally:
            self.connections -= 1
            logger.info("connection from %s closed (%d open)", peer, self.connections)

    async def _answer(self, loop, session, message, peer):
        """The reply to one message: packed actions, or a str (a text frame) saying what was wrong."""
        if isinstance(message, str):
            return "error: expected a binary msgpack observation, got a text frame"
        try:
            obs = wire.unpackb(message)
            result = await loop.run_in_executor(self._inference, session.infer, obs)
            return wire.packb(result)
        except (wire.WireError, ObservationError, ValueError, TypeError) as exc:
            logger.warning("bad request from %s: %s", peer, exc)
            return f"error: bad observation: {exc}"
        except Exception as exc:  # the server keeps serving: the client gets the error, the log the traceback
            logger.exception("inference failed for %s", peer)
            return f"error: inference failed: {type(exc).__name__}: {exc}"

    # ---- lifetime ---------------------------------------------------------------------------------------------------
    async def serve(self, stop: asyncio.Event, ready: Optional[threading.Event] = None) -> None:
        """Serve until ``stop`` is set; sets ``ready`` once listening (``bound_port`` then holds the port)."""
        from websockets.asyncio.server import serve

        async with serve(self._handle, self.host, self.port, max_size=self.max_request_bytes, compression=None,
                         process_request=self._process_request) as server:
            self.bound_port = server.sockets[0].getsockname()[1]
            logger.info("serving %s on ws://%s:%d", self.metadata.get("model", {}).get("name", "a pipeline"),
                        self.host, self.bound_port)
            if ready is not None:
                ready.set()
            await stop.wait()
        self._inference.shutdown(wait=True)
        logger.info("stopped")


class ServerThread:
    """A PolicyServer on a background thread (tests, notebooks, a robot process that serves itself):
    ``with ServerThread(server) as port: ...``."""

    def __init__(self, server: PolicyServer):
        self.server = server
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stop: Optional[asyncio.Event] = None
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="wam_fast-serve", daemon=True)

    def _run(self):
        async def main():
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            await self.server.serve(self._stop, self._ready)
        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._ready.set()

    def start(self, timeout: float = 30.0) -> int:
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"the server did not start: {self._error!r}")
        return self.server.bound_port

    def stop(self, timeout: float = 30.0) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def __enter__(self) -> int:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
