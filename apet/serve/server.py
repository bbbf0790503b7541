"""Running the app under uvicorn: in the foreground (``apet-serve``) or on a background thread with an
ephemeral loopback port (tests, and programs that embed a server next to their own code)."""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import sys
import threading
import time
from typing import Any

from apet.errors import BackendError, UsageError
from apet.runtime.backends.base import import_optional
from apet.serve.config import API_KEY_ENV, ServeConfig

log = logging.getLogger(__name__)


def load_app(config: ServeConfig) -> Any:
    """Load the artifact's pipeline and build the app (imports the HTTP stack, or says how to install it)."""
    for module in ("starlette", "uvicorn", "prometheus_client"):
        import_optional(module, "serve", "apet-serve")
    from apet.runtime.pipeline import Pipeline
    from apet.serve.app import create_app

    pipeline = Pipeline.load(config.artifact, backend=config.backend, device=config.device, threads=config.threads,
                             cuda_graphs=config.cuda_graphs, decode_attention=config.decode_attention,
                             ort_rewrites=config.ort_rewrites)
    return create_app(pipeline, config)


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (not yet listening; uvicorn listens on it). Bound first, before the
    model loads, so a busy port is one line in a second instead of a banner, a load and uvicorn's Errno 98 —
    and then kept, so no other program can take the port in between."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    except (OSError, UnicodeError) as exc:
        raise UsageError(f"--host {host} is not an address of this machine ({exc})",
                         "use 127.0.0.1 (this machine only), 0.0.0.0 (every interface) or one of its addresses"
                         ) from exc
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise _bind_error(host, port, exc) from exc
    return sock


def _bind_error(host: str, port: int, exc: OSError) -> UsageError:
    if exc.errno == errno.EADDRINUSE:
        return UsageError(f"--port {port} is already in use on {host}",
                          "pick another --port, or stop the program listening there (ss -ltnp shows it)")
    if exc.errno == errno.EACCES:
        return UsageError(f"--port {port} on {host} needs privileges (ports below 1024)", "pick a --port of 1024 "
                          "or above, or put a reverse proxy in front")
    if exc.errno == errno.EADDRNOTAVAIL:
        return UsageError(f"--host {host} is not an address of this machine",
                          "use 127.0.0.1 (this machine only), 0.0.0.0 (every interface) or one of its addresses")
    return UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc})", "pick another --port or --host")


def serve(config: ServeConfig, app: Any | None = None) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM)."""
    sock = listen_socket(config.host, config.port)
    try:
        app = app or load_app(config)  # says how to install the HTTP stack if it is missing
        import uvicorn

        state = app.state.serve
        key = "API key required" if config.api_key is not None else "no API key"
        print(f"apet-serve: {state.facts.model_id} ({state.facts.family}, {state.pipeline.backend.name} backend, "
              f"max batch {config.max_batch}, {key}) on http://{config.host}:{config.port}/v1", file=sys.stderr,
              flush=True)
        if config.api_key is None and not _loopback(config.host):
            log.warning("listening on %s without an API key: anyone who reaches port %d can use the model (set "
                        "%s or --api-key to ask clients for one)", config.host, config.port, API_KEY_ENV)
        server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="info",
                                               timeout_graceful_shutdown=30))
        server.run(sockets=[sock])
    finally:
        sock.close()


def _loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to an outside address


class BackgroundServer:
    """``with BackgroundServer(app) as server: httpx.get(server.url + "/health")`` — uvicorn on a thread,
    bound before it starts, so the port (0 = ephemeral) is known and requests never race the start-up."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 30.0) -> None:
        import uvicorn

        self.socket = listen_socket(host, port)
        self.host, self.port = host, self.socket.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=10)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name="apet-serve-http", daemon=True)
        self.start_timeout_s = start_timeout_s

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise BackendError("the HTTP server did not start", "see the log above")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.socket.close()
