"""The HTTP server every role runs: /healthz, /readyz and /metrics, plus the role's own routes.

A role is a long-lived process: `run_role` serves the role's FastAPI app and, next to it, the
role's body (the controller's RL loop, say). The process ends when the body returns, when the
body raises (exit 1, traceback in the log), or on SIGTERM/SIGINT (graceful stop, exit 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterator

import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, disable_created_metrics, generate_latest

from kubeforge import auth, limits
from kubeforge.contract import EXIT_TRANSIENT, HTTP_PORT, RoleContext

log = logging.getLogger("kubeforge.role")

EXIT_PORT_IN_USE = 3
STOP_SECONDS = 5.0  # how long a stopping role waits for its open HTTP requests

# Every runtime metric carries these, from the environment contract. Prometheus must scrape with
# honor_labels (a ServiceMonitor's honorLabels), or its own `job` label renames ours to exported_job.
ROLE_LABELS = ("job", "namespace", "role", "replica")
# No `<counter>_created` series beside each counter and histogram: one series per metric is enough.
disable_created_metrics()
ROLE_READY = Gauge("kubeforge_role_ready", "1 when the role answers /readyz with 200.", ROLE_LABELS)
ROLE_STARTED = Gauge("kubeforge_role_start_time_seconds", "Unix time the role process started.", ROLE_LABELS)


class TransientFailure(RuntimeError):
    """Raised by a role's body when it cannot go on but a fresh process would (a generator whose
    weight update stopped half-way): the role exits with EXIT_TRANSIENT and says so in its
    termination log, so the failure policy restarts it instead of failing the job."""


def role_labels(ctx: RoleContext) -> dict[str, str]:
    """The labels every runtime metric carries."""
    return {"job": ctx.job, "namespace": ctx.namespace, "role": ctx.role, "replica": str(ctx.replica)}


def configure_logging() -> None:
    # The launcher and `kubectl logs` add who is speaking; the line says when and what.
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the role's own log


class BodyLimit:
    """ASGI middleware: a request body over `limits.max_body_bytes(path)` is answered 413, unread.

    A declared Content-Length over the limit is refused before any byte is read; a body without
    one (chunked) is read up to the limit and refused as soon as it passes it.
    """

    def __init__(self, app: Callable, limit: Callable[[str], int] = limits.max_body_bytes):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._refuse(scope, send, int(declared), limit)
        if declared is not None:  # the server (h11) delivers no more than it declares
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message]), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                return await self._refuse(scope, send, size, limit, at_least=more)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)

    @staticmethod
    async def _refuse(scope: dict, send: Callable, size: int, limit: int, at_least: bool = False) -> None:
        name = "MAX_BATCH_BODY_BYTES" if limit == limits.MAX_BATCH_BODY_BYTES else "MAX_BODY_BYTES"
        detail = (
            f"request body is {'more than ' if at_least else ''}{size} bytes; {scope['path']} takes at most "
            f"{limit} ({name} in kubeforge/limits.py)"
        )
        await JSONResponse({"detail": detail}, status_code=413, headers={"Connection": "close"})(
            scope, _replay([]), send
        )


def _replay(messages: list[dict], then: Callable | None = None) -> Callable:
    """An ASGI receive that gives `messages`, then defers to `then` (or reports a disconnect)."""
    queue = list(messages)

    async def receive() -> dict:
        if queue:
            return queue.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive


class RoleServer:
    """A role's FastAPI app with the health, readiness and metrics routes every role serves."""

    def __init__(self, ctx: RoleContext):
        self.ctx = ctx
        self.app = FastAPI(title=f"kubeforge {ctx.role}", docs_url=None, redoc_url=None)
        self.app.add_middleware(BodyLimit)  # every route's body is bounded (kubeforge/limits.py)
        # Added last, so it runs first: a caller without the route's token is refused before its body is read.
        self.app.add_middleware(
            auth.TokenAuth,
            credentials=ctx.credentials,
            role=ctx.role,
            open_openai=ctx.spec.roles.generator.openai_without_token,
        )
        self._not_ready = "starting"
        # Role-specific last words (the controller's final progress), added to the termination log.
        self.final_status: dict[str, object] = {}
        self._labels = role_labels(ctx)
        ROLE_STARTED.labels(**self._labels).set(time.time())
        ROLE_READY.labels(**self._labels).set(0)

        @self.app.get("/healthz")
        async def healthz() -> dict[str, str]:
            return {"status": "ok", "role": ctx.name}

        @self.app.get("/readyz")
        async def readyz() -> JSONResponse:
            if self._not_ready:
                return JSONResponse({"ready": False, "reason": self._not_ready}, status_code=503)
            return JSONResponse({"ready": True})

        @self.app.get("/metrics")
        async def metrics() -> Response:
            return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @property
    def ready(self) -> bool:
        return not self._not_ready

    def set_ready(self) -> None:
        self._not_ready = ""
        ROLE_READY.labels(**self._labels).set(1)
        log.info("%s ready on port %d", self.ctx.name, self.ctx.http_port)

    def set_not_ready(self, reason: str) -> None:
        self._not_ready = reason
        ROLE_READY.labels(**self._labels).set(0)

    def write_termination_log(self, exit_code: int, error: str = "", transient: bool = False) -> None:
        """Leave the role's last words where the launcher or the kubelet picks them up."""
        if not self.ctx.termination_log:
            return
        message = {"role": self.ctx.name, "exitCode": exit_code, **self.final_status}
        if error:
            message["error"] = error[-2000:]  # Kubernetes keeps at most 4 KiB
        if transient:
            message["transient"] = True  # contract.permanent_error: a restart cures it
        try:
            with open(self.ctx.termination_log, "w") as f:
                json.dump(message, f, default=str)
        except OSError as e:
            log.warning("cannot write the termination log %s: %s", self.ctx.termination_log, e)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # run_role owns SIGTERM/SIGINT so that it can stop the role's body too.
        yield


def bind(host: str, port: int) -> socket.socket:
    """Bind the role's port up front, so that a port conflict is one clear line, not a traceback."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            log.error("port %d on %s is already in use (%s); free it or choose other ports", port, host, HTTP_PORT)
            raise SystemExit(EXIT_PORT_IN_USE) from None
        raise
    sock.set_inheritable(True)
    return sock


async def run_role(server: RoleServer, body: Callable[[], Awaitable[None]]) -> int:
    """Serve `server` and run `body` beside it; return the process exit code."""
    ctx = server.ctx
    sock = bind(ctx.http_host, ctx.http_port)
    # A bounded graceful stop: a connection accepted while the server closes (Prometheus scraping
    # every second, say) is never told to close, and would keep a finished role alive forever.
    config = uvicorn.Config(
        server.app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=STOP_SECONDS
    )
    http = _Server(config)
    http_task = asyncio.create_task(http.serve(sockets=[sock]), name="http")
    body_task = asyncio.create_task(body(), name="body")

    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    stop_task = asyncio.create_task(stop_requested.wait(), name="stop")

    done, _ = await asyncio.wait({http_task, body_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    code, error, transient = 0, "", False
    if stop_task in done:
        log.info("%s stopping on signal", ctx.name)
    elif body_task in done:
        exc = body_task.exception()
        if isinstance(exc, TransientFailure):
            log.error("%s stops, a restart cures it: %s", ctx.name, exc)
            code, error, transient = EXIT_TRANSIENT, f"{type(exc).__name__}: {exc}", True
        elif exc is not None:
            log.error("%s failed: %s", ctx.name, exc, exc_info=exc)
            code, error = 1, f"{type(exc).__name__}: {exc}"
    else:
        code, error = 1, "HTTP server stopped unexpectedly"
        log.error("%s: %s", ctx.name, error)
    server.write_termination_log(code, error, transient)

    server.set_not_ready("stopping")
    for task in (body_task, stop_task):
        task.cancel()
    http.should_exit = True
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(http_task, body_task, stop_task, return_exceptions=True)
    return code


def main(body: Callable[[RoleServer], Awaitable[None]]) -> None:
    """Entry point of a role process: read the contract, serve, run the body, exit with its code.

    The body adds the role's routes to `server.app`, calls `server.set_ready()` once it can
    take requests, and returns when the role's work is done (or never, for a service).
    """
    configure_logging()
    server = RoleServer(RoleContext.from_env())

    async def run() -> int:
        return await run_role(server, lambda: body(server))

    sys.exit(asyncio.run(run()))


async def serve_forever(server: RoleServer) -> None:
    """Body of a role that only answers requests: ready at once, runs until stopped."""
    server.set_ready()
    await asyncio.Event().wait()
