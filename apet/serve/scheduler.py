"""The request queue and the one worker thread that runs the pipeline.

A Pipeline serves one ``generate_batch`` at a time (it owns one KV cache), so the server has exactly one
worker: it takes the oldest waiting request and, with ``max_batch > 1``, the next waiting ones that fit
beside it (the batch's longest prompt plus its largest ``max_tokens`` must fit the artifact's context,
the rule the KV cache imposes on a left-padded batch), waiting ``batch_wait`` for company at most. Every
row carries its own :class:`GenerationConfig` (its own seeded sampler, limits and stop strings), so an
answer never depends on its batch-mates; greedy answers are token-identical to batch 1.

Requests never share state: each :class:`Job` has its own event queue, fed from the worker thread with
``call_soon_threadsafe`` on the event loop that submitted it. A job cancelled while waiting leaves the
queue at once; one cancelled while running stops generating at the next token (``cancelled`` hook).
A full queue raises :class:`QueueFull`, which the app answers with 503 and ``Retry-After``. Once submitted,
a job's media (a video's temporary file) belongs to the scheduler, which closes it when the job leaves.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from apet.errors import ApetError
from apet.runtime.pipeline import Pipeline, Result
from apet.serve.errors import ApiError, from_apet_error, internal_error
from apet.serve.media import Media
from apet.serve.protocol import ChatRequest

log = logging.getLogger(__name__)


class QueueFull(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"queue full, retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Done:
    result: Result
    batch: int  # requests decoded together
    row: int  # this request's row in the batch (its entries in result.stats)
    queue_ms: float


@dataclass(eq=False)
class Job:
    """One request between the event loop (which awaits ``events``) and the worker thread."""

    request: ChatRequest
    media: Media
    loop: asyncio.AbstractEventLoop
    # ("delta", str) | ("done", Done) | ("error", ApiError), put by the worker, read by the request's coroutine
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False

    def post(self, kind: str, payload: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: the server is shutting down, nobody is listening
            pass


class Scheduler:
    def __init__(self, pipeline: Pipeline, *, max_batch: int, max_queue: int, batch_wait_s: float,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.pipeline = pipeline
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self.max_context = pipeline.manifest.max_context
        self.on_batch = on_batch
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.running = 0
        self._seconds_per_batch = 1.0  # running mean, for Retry-After

    # -- the event loop's side ----------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="apet-serve-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            pending, self._waiting = list(self._waiting), collections.deque()
            self._cond.notify_all()
        for job in pending:
            job.media.close()
            job.post("error", ApiError(503, "the server is shutting down — retry on another instance",
                                       "shutting_down"))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise ApiError(503, "the server is shutting down — retry on another instance", "shutting_down")
            if len(self._waiting) >= self.max_queue:
                batches_ahead = math.ceil((len(self._waiting) + 1) / self.max_batch)
                raise QueueFull(max(1, math.ceil(batches_ahead * self._seconds_per_batch)))
            self._waiting.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if it waits, stop generating for it if it runs."""
        job.cancelled.set()
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                return  # running (the worker closes its media) or already done
        job.media.close()

    # -- the worker's side --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            started = time.perf_counter()
            self.running = len(batch)
            try:
                self._run(batch)
            finally:
                for job in batch:
                    job.media.close()
                del batch, job  # do not keep the last requests (and their media) alive while idle
                self.running = 0
                self._seconds_per_batch = 0.8 * self._seconds_per_batch + 0.2 * (time.perf_counter() - started)

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._waiting and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            batch = [self._waiting.popleft()]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch:
                job = self._fitting(batch)
                if job is not None:
                    self._waiting.remove(job)
                    batch.append(job)
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping:
                    break
                self._cond.wait(left)
            return batch

    def _fitting(self, batch: list[Job]) -> Job | None:
        """The oldest waiting job whose prompt and answer fit the KV cache beside ``batch``."""
        longest = max(j.request.prompt_tokens for j in batch)
        most_new = max(j.request.config.max_new_tokens for j in batch)
        for job in self._waiting:
            prompt, new = job.request.prompt_tokens, job.request.config.max_new_tokens
            if max(longest, prompt) + max(most_new, new) <= self.max_context:
                return job
        return None

    def _run(self, batch: list[Job]) -> None:
        streamed = False
        started = time.perf_counter()
        if self.on_batch is not None:
            self.on_batch(len(batch))

        def on_delta(row: int, delta: str) -> None:
            nonlocal streamed
            streamed = True
            batch[row].post("delta", delta)

        try:
            results = self.pipeline.generate_batch([j.media.value for j in batch], [j.request.prompt for j in batch],
                                                   [j.request.config for j in batch], on_delta,
                                                   lambda row: batch[row].cancelled.is_set())
        except ApetError as exc:
            if len(batch) > 1 and not streamed:  # one request's data must not fail its batch-mates
                log.warning("batch of %d failed (%s); running its requests one by one", len(batch), exc)
                for job in batch:
                    self._run([job])
                return
            for job in batch:
                job.post("error", from_apet_error(exc))
            return
        except Exception:
            log.exception("generation failed")
            for job in batch:
                job.post("error", internal_error())
            return
        for row, (job, result) in enumerate(zip(batch, results)):
            job.post("done", Done(result, len(batch), row, (started - job.arrived) * 1e3))
