"""The HTTP sidecar (FastAPI on uvicorn, in its own thread of the server process).

It only reads state and runs server methods on the loop thread (``CacheServer.post``) with
a deadline, so a stuck loop shows as 503 on /healthcheck instead of a hung probe.
Endpoints: GET /healthcheck, GET /status, GET /metrics, POST /clear-cache (and /cache/clear).
With an auth token set, everything but /healthcheck needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from lmcd import __version__

if TYPE_CHECKING:
    from lmcd.server.daemon import CacheServer

log = logging.getLogger("lmcd.http")
HEALTH_DEADLINE_S = 2.0
CALL_DEADLINE_S = 10.0
START_DEADLINE_S = 30.0


def build_app(server: CacheServer) -> FastAPI:
    app = FastAPI(title="lmcd", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    token = server.config.auth_token

    def unauthorized(request: Request) -> JSONResponse | None:
        if token is None:
            return None
        given = request.headers.get("authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return None
        return JSONResponse({"status": "error", "reason": "missing or wrong 'Authorization: Bearer <token>'"},
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})

    async def on_loop(fn: Any, deadline_s: float) -> Any:
        """Run ``fn`` on the request loop; TimeoutError after ``deadline_s``. No thread waits for the
        answer (a thread per waiting request would let a few slow /status calls on a stuck loop use
        up the default executor, so /healthcheck could not even start its deadline)."""
        aio_loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = aio_loop.create_future()
        gave_up = threading.Event()

        def settle(result: Any, error: BaseException | None) -> None:
            if not answer.done():
                if error is not None:
                    answer.set_exception(error)
                else:
                    answer.set_result(result)

        def run() -> None:  # on the request loop thread
            if gave_up.is_set():
                return
            try:
                result, error = fn(), None
            except Exception as exc:
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the HTTP loop is closed: nobody is waiting
                aio_loop.call_soon_threadsafe(settle, result, error)

        server.post(run)
        try:
            return await asyncio.wait_for(answer, deadline_s)
        except TimeoutError:
            gave_up.set()
            raise

    @app.get("/healthcheck")
    async def healthcheck() -> JSONResponse:
        started = time.monotonic()
        try:
            await on_loop(lambda: None, HEALTH_DEADLINE_S)
        except TimeoutError:
            return JSONResponse({"status": "unhealthy",
                                 "reason": f"request loop did not answer within {HEALTH_DEADLINE_S:.1f} s"},
                                status_code=503)
        if server.stopping:
            return JSONResponse({"status": "unhealthy", "reason": "shutting down"}, status_code=503)
        return JSONResponse({"status": "healthy", "loop_latency_ms": round((time.monotonic() - started) * 1e3, 3)})

    @app.get("/status")
    async def status(request: Request) -> JSONResponse:
        denied = unauthorized(request)
        if denied is not None:
            return denied
        try:
            return JSONResponse(await on_loop(server.status, CALL_DEADLINE_S))
        except TimeoutError:
            return JSONResponse({"status": "error", "reason": "request loop is not answering"}, status_code=503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        denied = unauthorized(request)
        if denied is not None:
            return denied
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def clear(request: Request) -> JSONResponse:
        denied = unauthorized(request)
        if denied is not None:
            return denied
        try:
            num_chunks = await on_loop(server.service.clear, CALL_DEADLINE_S)
        except TimeoutError:
            return JSONResponse({"status": "error", "reason": "request loop is not answering"}, status_code=503)
        return JSONResponse({"status": "ok", "num_chunks": num_chunks})

    app.add_api_route("/clear-cache", clear, methods=["POST"])
    app.add_api_route("/cache/clear", clear, methods=["POST"])
    return app


class HttpSidecar:
    def __init__(self, server: CacheServer) -> None:
        self.server = server
        self._thread: threading.Thread | None = None
        self._uvicorn: uvicorn.Server | None = None

    def start(self) -> str:
        """Bind now (so a busy port fails startup with a clear error), then serve in a thread."""
        cfg = self.server.config
        family = socket.AF_INET6 if ":" in cfg.http_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((cfg.http_host, cfg.http_port))
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot bind the HTTP sidecar to {cfg.http_host}:{cfg.http_port}: {exc.strerror}; "
                          "pick another --http-port or --http-host") from None
        sock.listen(128)
        host, port = sock.getsockname()[:2]
        config = uvicorn.Config(build_app(self.server), log_level="warning", access_log=False, lifespan="off")
        self._uvicorn = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [sock]},
                                        name="lmcd-http", daemon=True)
        self._thread.start()
        self._sock = sock
        # serving before start returns: uvicorn imports and opens files as it starts, which a burst of
        # connections taking every descriptor right after the server says it runs would make fail
        deadline = time.monotonic() + START_DEADLINE_S
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the HTTP sidecar on {cfg.http_host}:{port} did not start within "
                              f"{START_DEADLINE_S:.0f} s (see the error above)")
            time.sleep(0.005)
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        return f"http://{shown}:{port}"

    def stop(self) -> None:
        if self._uvicorn is not None and self._thread is not None:
            self._uvicorn.should_exit = True
            self._thread.join(timeout=5)
        self._sock.close()
