"""Token-by-token answers as server-sent events, and noticing a client that went away.

Each text delta the pipeline produces becomes one ``chat.completion.chunk`` event; the last chunk has the
``finish_reason`` and the ``apet`` extension, an optional usage chunk follows (``stream_options:
{"include_usage": true}``), then ``data: [DONE]``. The pipeline already holds back text that could start a
stop string (:mod:`apet.runtime.stopping`), so the streamed text equals the non-streamed answer.

uvicorn drops writes to a closed connection silently, so a generator would never learn that its reader
left; :class:`DisconnectWatcher` listens for the ASGI ``http.disconnect`` message instead, and the caller
cancels the job, which stops generating for it at the next token.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Awaitable, Callable

from apet.serve import responses
from apet.serve.errors import ApiError
from apet.serve.protocol import ModelFacts
from apet.serve.scheduler import Done, Job


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was complete."""


class DisconnectWatcher:
    def __init__(self, receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self._task = asyncio.ensure_future(self._watch(receive))

    @staticmethod
    async def _watch(receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def next_event(self, job: Job) -> tuple[str, Any]:
        """The job's next event, or ClientGone as soon as the client disconnects."""
        get = asyncio.ensure_future(job.events.get())
        done, _ = await asyncio.wait({get, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        raise ClientGone()

    def close(self) -> None:
        self._task.cancel()


def event(data: dict[str, Any] | str) -> bytes:
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {body}\n\n".encode()


async def sse_events(job: Job, first: tuple[str, Any], watcher: DisconnectWatcher, facts: ModelFacts,
                     request_id: str, on_done: Callable[[Done], dict[str, Any]],
                     on_close: Callable[[], None]) -> AsyncIterator[bytes]:
    """The event stream of one request; ``on_done`` records metrics and returns the ``apet`` extension,
    ``on_close`` runs however the stream ends (finished, failed, or the client gone)."""
    created = int(time.time())
    try:
        yield event(responses.chunk(request_id, created, facts, {"role": "assistant", "content": ""}))
        kind, payload = first
        while True:
            if kind == "delta":
                if payload:
                    yield event(responses.chunk(request_id, created, facts, {"content": payload}))
            elif kind == "done":
                apet = on_done(payload)
                finish = responses.FINISH[payload.result.finish_reason]
                yield event(responses.chunk(request_id, created, facts, {}, finish, apet=apet))
                if job.request.include_usage:
                    yield event(responses.usage_chunk(request_id, created, facts, payload))
                break
            else:  # an error after the response started: OpenAI's clients read an "error" object
                error: ApiError = payload
                yield event(error.body())
                break
            kind, payload = await watcher.next_event(job)
        yield event("[DONE]")
    except ClientGone:
        pass
    finally:
        on_close()
