"""Running the app under uvicorn: in the foreground (``apet-serve``) or on a background thread with an
ephemeral loopback port (tests, and programs that embed a server next to their own code)."""

from __future__ import annotations

import socket
import sys
import threading
import time
from typing import Any

from apet.errors import BackendError, UsageError
from apet.runtime.backends.base import import_optional
from apet.serve.config import ServeConfig


def load_app(config: ServeConfig) -> Any:
    """Load the artifact's pipeline and build the app (imports the HTTP stack, or says how to install it)."""
    for module in ("starlette", "uvicorn", "prometheus_client"):
        import_optional(module, "serve", "apet-serve")
    from apet.runtime.pipeline import Pipeline
    from apet.serve.app import create_app

    pipeline = Pipeline.load(config.artifact, backend=config.backend, device=config.device, threads=config.threads)
    return create_app(pipeline, config)


def serve(config: ServeConfig, app: Any | None = None) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM)."""
    import uvicorn

    app = app or load_app(config)
    state = app.state.serve
    print(f"apet-serve: {state.facts.model_id} ({state.facts.family}, {state.pipeline.backend.name} backend, "
          f"max batch {config.max_batch}) on http://{config.host}:{config.port}/v1", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=30)
    except OSError as exc:  # address in use, permission denied
        raise UsageError(f"cannot listen on {config.host}:{config.port} ({exc})", "pick another --port") from exc


class BackgroundServer:
    """``with BackgroundServer(app) as server: httpx.get(server.url + "/health")`` — uvicorn on a thread,
    bound before it starts, so the port (0 = ephemeral) is known and requests never race the start-up."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 30.0) -> None:
        import uvicorn

        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
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
