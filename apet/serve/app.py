"""The HTTP routes (Starlette): ``POST /v1/chat/completions``, ``GET /v1/models``, ``/health``, ``/metrics``.

A request's path: read the body under ``--max-body-mb`` -> JSON -> :func:`protocol.parse_chat` (fields,
one medium, the context budget) -> :func:`media.resolve` (decoded off the event loop) -> the scheduler's
queue (503 + ``Retry-After`` when full) -> events from the worker -> one JSON answer or an SSE stream.
Errors before the answer starts are 4xx/5xx JSON in OpenAI's shape; nothing unexpected ever shows a
traceback (it is logged, the client gets a 500 naming the log). The server keeps serving either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from apet import __version__
from apet.errors import ApetError, UsageError
from apet.models.registry import family_of
from apet.runtime.pipeline import Pipeline
from apet.serve import responses
from apet.serve.config import API_KEY_ENV, ServeConfig
from apet.serve.errors import ApiError, from_apet_error, internal_error
from apet.serve.media import MediaLimits, resolve
from apet.serve.metrics import CONTENT_TYPE, Metrics
from apet.serve.protocol import ModelFacts, parse_chat, parse_json
from apet.serve.scheduler import Done, Job, QueueFull, Scheduler
from apet.serve.stream import ClientGone, DisconnectWatcher, sse_events

log = logging.getLogger(__name__)
DRAIN_LIMIT = 64 << 20  # an oversized body is read (and dropped) up to this much, so the client sees the 413


@dataclass
class ServerState:
    pipeline: Pipeline
    config: ServeConfig
    facts: ModelFacts
    limits: MediaLimits
    scheduler: Scheduler
    metrics: Metrics
    started: int


def model_facts(pipeline: Pipeline, model_name: str | None) -> ModelFacts:
    """The model id is the artifact directory's name unless ``--served-model-name`` says otherwise: two
    artifacts of one checkpoint (different budgets) are different models to a client. The name is the path's own as
    given (made absolute, so ``.`` names its directory), not a symlink's target: a ``current`` link swapped between
    releases keeps the id its clients send."""
    manifest, family = pipeline.manifest, family_of(pipeline.manifest)
    default_id = Path(os.path.abspath(pipeline.artifact_dir)).name
    return ModelFacts(model_name or default_id, manifest.model.family, family.media,
                      manifest.max_context, family.max_visual_tokens(manifest))


def create_app(pipeline: Pipeline, config: ServeConfig) -> Starlette:
    """The app over a loaded pipeline; its worker thread starts and stops with the app's lifespan."""
    if config.max_batch > pipeline.manifest.max_batch:
        raise UsageError(f"--max-batch {config.max_batch} exceeds the artifact's max_batch "
                         f"{pipeline.manifest.max_batch}", "lower --max-batch, or re-export/re-build the artifact "
                         "with a larger --max-batch")
    scheduler = Scheduler(pipeline, max_batch=config.max_batch, max_queue=config.max_queue,
                          batch_wait_s=config.batch_wait_ms / 1e3)
    device = str(getattr(pipeline.backend, "device", "") or "")
    metrics = Metrics(queue_length=lambda: scheduler.waiting, running=lambda: scheduler.running, device=device,
                      peak_memory=pipeline.backend.peak_memory_bytes)
    scheduler.on_batch = metrics.batch.observe
    state = ServerState(pipeline, config, model_facts(pipeline, config.model_name),
                        MediaLimits(config.max_body_bytes, config.max_image_pixels, config.allow_fetch,
                                    config.fetch_timeout_s, config.allow_fetch_private,
                                    config.allowed_media_domains),
                        scheduler, metrics, int(time.time()))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(scheduler.stop)

    routes = [  # the API asks for the key where one is set; /health and /metrics (probes, Prometheus) never do
        Route("/v1/chat/completions", _route("chat", chat_completions, keyed=True), methods=["POST"]),
        Route("/v1/models", _route("models", list_models, keyed=True), methods=["GET"]),
        Route("/v1/models/{model_id:path}", _route("models", get_model, keyed=True), methods=["GET"]),
        Route("/health", _route("health", health), methods=["GET"]),
        Route("/metrics", metrics_route, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, Exception: _unexpected})
    app.state.serve = state
    return app


# -- plumbing ---------------------------------------------------------------------------------------
def _route(name: str, handler: Callable[[Request, ServerState], Awaitable[Response]], keyed: bool = False):
    """Errors -> OpenAI-shaped JSON; every answer counted in the metrics; ``keyed``: refused (401) without the
    server's API key, where it has one."""

    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        state: ServerState = request.app.state.serve
        try:
            if keyed and state.config.api_key is not None:
                check_api_key(request.headers.get("authorization"), state.config.api_key)
            response = await handler(request, state)
        except ApiError as exc:
            response = _error_response(exc)
        except ApetError as exc:
            response = _error_response(from_apet_error(exc))
        except Exception:
            log.exception("unexpected error in %s", request.url.path)
            response = _error_response(internal_error())
        state.metrics.requests.labels(name, str(response.status_code)).inc()
        if response.status_code >= 400:
            state.metrics.errors.labels(name, getattr(response, "error_code", "error")).inc()
        return response

    return endpoint


def check_api_key(authorization: str | None, key: str) -> None:
    """Refuse a request whose ``Authorization`` header is not ``Bearer <key>`` (OpenAI's clients send their
    ``api_key`` so); compared in constant time, so the answer's timing tells nothing of the key."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
        return
    what = "no API key" if not authorization else "a wrong API key, or not as 'Bearer <key>'"
    raise ApiError(401, f"the request has {what} — send the header 'Authorization: Bearer <key>' with the key the "
                        f"server was started with (apet-serve --api-key or {API_KEY_ENV}; OpenAI clients: api_key=...)",
                   "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _error_response(exc: ApiError) -> Response:
    if exc.status >= 500 and exc.code not in ("queue_full", "shutting_down"):
        log.warning("answering %d: %s", exc.status, exc.message)
    response = JSONResponse(exc.body(), exc.status, headers=exc.headers)
    response.error_code = exc.code  # type: ignore[attr-defined]
    return response


async def _http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    fix = " — the API is POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics"
    return JSONResponse(ApiError(exc.status_code, message + fix, code).body(), exc.status_code)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error in %s", request.url.path, exc_info=exc)
    return JSONResponse(internal_error().body(), 500)


async def _read_body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > limit + DRAIN_LIMIT:
            break
    if size > limit:
        raise ApiError(413, f"the request body is {size:,}+ bytes, over the server's --max-body-mb "
                       f"{limit / (1 << 20):g} MiB — send a smaller image (the model sees a few hundred pixels per "
                       "side), or restart apet-serve with a larger --max-body-mb", "body_too_large",
                       headers={"Connection": "close"})
    return b"".join(chunks)


# -- routes -----------------------------------------------------------------------------------------
async def chat_completions(request: Request, state: ServerState) -> Response:
    arrived = time.perf_counter()
    payload = parse_json(await _read_body(request, state.config.max_body_bytes))
    chat, part = parse_chat(payload, state.facts, state.pipeline.encoder, state.config.default_max_tokens)
    del payload  # this coroutine lives as long as the answer: do not pin megabytes of base64 meanwhile
    media = await run_in_threadpool(resolve, part.kind, part.url, state.limits, part.param)
    del part
    job = Job(chat, media, asyncio.get_running_loop())
    try:
        state.scheduler.submit(job)
    except QueueFull as exc:
        media.close()
        raise ApiError(503, f"the server's queue is full ({state.config.max_queue} waiting requests, "
                       f"--max-queue) — retry after {exc.retry_after_s} s", "queue_full",
                       headers={"Retry-After": str(exc.retry_after_s)}) from None
    except BaseException:
        media.close()
        raise
    del media  # the scheduler owns it now
    watcher = DisconnectWatcher(request.receive)
    request_id = responses.completion_id()

    def close() -> None:
        watcher.close()
        if not job.finished:
            state.scheduler.cancel(job)

    def done(result: Done) -> dict[str, Any]:
        job.finished = True
        apet = responses.apet_extension(result, state.facts)
        state.metrics.observe(responses.usage(result), apet, time.perf_counter() - arrived)
        return apet

    streaming = False
    try:
        kind, event = await watcher.next_event(job)
        if kind == "error":
            job.finished = True
            raise event
        if chat.stream:
            streaming = True
            return StreamingResponse(sse_events(job, (kind, event), watcher, state.facts, request_id, done, close),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        while kind == "delta":
            kind, event = await watcher.next_event(job)
        if kind == "error":
            job.finished = True
            raise event
        body = responses.completion(request_id, event, state.facts)
        done(event)
        return JSONResponse(body)
    except ClientGone:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    finally:
        if not streaming:
            close()


async def list_models(request: Request, state: ServerState) -> Response:
    return JSONResponse(responses.models(state.facts, state.started, _details(state)))


async def get_model(request: Request, state: ServerState) -> Response:
    wanted = request.path_params["model_id"]
    if wanted != state.facts.model_id:
        raise ApiError(404, f"model {wanted!r} is not served here — this server serves {state.facts.model_id!r}",
                       "model_not_found", "model")
    return JSONResponse(responses.model(state.facts, state.started, _details(state)))


def _details(state: ServerState) -> dict[str, Any]:
    manifest = state.pipeline.manifest
    plan = manifest.compression
    return {"family": state.facts.family, "media": state.facts.media, "source": manifest.model.source,
            "artifact": str(state.pipeline.artifact_dir), "backend": state.pipeline.backend.name,
            "dtype": manifest.dtype, "max_context": manifest.max_context, "max_batch": state.config.max_batch,
            "visual_tokens": manifest.visual_tokens, "vision_tokens": manifest.model.n_tokens,
            "stage2_tokens": plan.stage2.keep if plan.stage2 is not None else None,
            "ratio": plan.ratio, "apet_version": __version__}


async def health(request: Request, state: ServerState) -> Response:
    ok = state.scheduler.alive
    body = {"status": "ok" if ok else "worker stopped", "model": state.facts.model_id,
            "backend": state.pipeline.backend.name, "waiting": state.scheduler.waiting,
            "running": state.scheduler.running}
    return JSONResponse(body, 200 if ok else 503)


async def metrics_route(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
