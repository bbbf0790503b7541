"""Token-by-token answers as server-sent events, and noticing a client that went away.

Each text delta the pipeline produces becomes one ``chat.completion.chunk`` event; the last chunk has the
``finish_reason`` and the ``apet`` extension, an optional usage chunk follows (``stream_options:
{"include_usage": true}``), then ``data: [DONE]``. Text that could still turn out to start a stop string is
held back, so the streamed text always equals the non-streamed answer (which ends before the stop string,
as OpenAI's does).

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


class StopHoldback:
    """Passes streamed text through, except a tail that may be the start of a stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        self.text += delta
        hits = [self.text.find(s) for s in self.stops if s in self.text]
        if hits:
            safe, self.stopped = min(hits), True
        else:
            safe = len(self.text) - max((_overlap(self.text, s) for s in self.stops), default=0)
        out = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out

    def finish(self, final_text: str) -> str:
        """What remains of the final answer once the stream ended (held-back text, the decoder's flush)."""
        sent = self.text[: self.emitted]
        return final_text[len(sent):] if final_text.startswith(sent) else ""


def _overlap(text: str, stop: str) -> int:
    """Length of the longest proper prefix of ``stop`` that ``text`` ends with."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


def event(data: dict[str, Any] | str) -> bytes:
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {body}\n\n".encode()


async def sse_events(job: Job, first: tuple[str, Any], watcher: DisconnectWatcher, facts: ModelFacts,
                     request_id: str, on_done: Callable[[Done], dict[str, Any]],
                     on_close: Callable[[], None]) -> AsyncIterator[bytes]:
    """The event stream of one request; ``on_done`` records metrics and returns the ``apet`` extension,
    ``on_close`` runs however the stream ends (finished, failed, or the client gone)."""
    created = int(time.time())
    holdback = StopHoldback(job.request.config.stop)
    try:
        yield event(responses.chunk(request_id, created, facts, {"role": "assistant", "content": ""}))
        kind, payload = first
        while True:
            if kind == "delta":
                text = holdback.push(payload)
                if text:
                    yield event(responses.chunk(request_id, created, facts, {"content": text}))
            elif kind == "done":
                rest = holdback.finish(payload.result.text)
                if rest:
                    yield event(responses.chunk(request_id, created, facts, {"content": rest}))
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
