"""Model-work scheduler: a bounded queue, dynamic batching, dropping abandoned work.

Every model call goes through `Scheduler.run`. Work waits in per-bucket queues (one bucket per
model, op, input shape and parameters; see app.http.batching). One dispatcher coroutine hands the
oldest bucket's work to a free worker slot (`workers`: app.http.app.default_model_threads); calls
running at once share the CPU cores equally (`share`, models/vae/threads.py); while all slots
are busy, work of one bucket piles up and runs as one batch, up to `max_batch` rows. A bucket
with fewer rows waits at most `max_wait` for companions before it runs anyway.

Backpressure: more than `max_queue` waiting items -> Unavailable (503) with Retry-After at
once, never an unbounded wait. A client that goes away, or whose deadline passes, has its
waiting work removed before it reaches the model, and its running work stopped at the next tile
or frame (models.vae.tiling.stop_when), which frees the slot. `abort` (past the shutdown grace
period) answers every waiting and running request at once and stops the running work the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Hashable

import anyio

from app.protocol.errors import DeadlineExceeded, Unavailable
from models.vae import threads, tiling


@dataclass(eq=False)
class Work:
    fn: Callable[[Any], Any]  # req -> result, for one request
    req: Any
    key: Hashable  # bucket: same key = may share one forward pass
    rows: int = 1  # batch rows this request adds
    merge: Callable[[list], tuple[Any, Callable[[Any], list]]] | None = None  # reqs -> (req, split)
    future: asyncio.Future | None = None
    stop: threading.Event = field(default_factory=threading.Event)  # set: stop at the next tile or frame
    enqueued: float = field(default_factory=time.monotonic)
    started: float = 0.0
    finished: float = 0.0


class SchedulerHooks:
    """Observability callbacks (app.http.observability implements them); no-ops by default."""

    def depth(self, n: int) -> None: ...
    def running(self, n: int) -> None: ...
    def batch(self, size: int) -> None: ...
    def rejected(self, reason: str) -> None: ...


class Scheduler:
    def __init__(self, *, workers: int = 1, max_queue: int = 64, max_batch: int = 1,
                 max_wait: float = 0.002, limiter: anyio.CapacityLimiter | None = None,
                 hooks: SchedulerHooks | None = None, share: threads.ThreadShare | None = None):
        self.share = share  # the cores divided between calls running at once (models/vae/threads.py)
        self.workers, self.max_queue = max(1, workers), max(1, max_queue)
        self.max_batch, self.max_wait = max(1, max_batch), max(0.0, max_wait)
        self.limiter = limiter
        self.hooks = hooks or SchedulerHooks()
        self.buckets: dict[Hashable, deque[Work]] = {}
        self.running = 0  # requests whose model work has started and not finished
        self._running: set[Work] = set()
        self.closed = False  # draining: refuse new work
        self._solo = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._avg_item_s = 0.1  # EWMA of seconds per request, for Retry-After

    # --- state ----------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return sum(len(q) for q in self.buckets.values())

    @property
    def idle(self) -> bool:
        return self.depth == 0 and self.running == 0

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained (at least 1)."""
        return max(1, math.ceil((self.depth + self.running) * self._avg_item_s / self.workers))

    # --- submitting ---------------------------------------------------------------------------
    async def run(self, work: Work, *, deadline: float | None = None,
                  abandoned: Callable[[], Awaitable[Any]] | None = None) -> Any:
        """Queue `work`, wait for its result. `deadline` (monotonic) -> 504 when passed;
        `abandoned()` returns when the client has gone: the work is then dropped."""
        if self.closed:
            self.hooks.rejected("shutting_down")
            raise Unavailable("the server is shutting down: retry on another instance", {"Retry-After": "1"})
        if self.depth >= self.max_queue:
            self.hooks.rejected("queue_full")
            raise Unavailable(f"server busy: {self.depth} requests already waiting for the model",
                              {"Retry-After": str(self.retry_after())})
        self._ensure_started()
        if work.key is None:
            work.key = ("solo", next(self._solo))
        work.future = self._loop.create_future()
        work.enqueued = time.monotonic()
        self.buckets.setdefault(work.key, deque()).append(work)
        self._changed()

        watcher = asyncio.ensure_future(abandoned()) if abandoned else None
        try:
            waits = {work.future} | ({watcher} if watcher else set())
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if work.future in done:
                return work.future.result()
            reason = "client_gone" if watcher in done else "deadline"
            self._drop(work, reason)
            if reason == "deadline":
                raise DeadlineExceeded("the request did not finish within the server's deadline")
            raise Unavailable("client disconnected")  # nobody reads this answer
        except asyncio.CancelledError:
            self._drop(work, "cancelled")
            raise
        finally:
            if watcher:
                watcher.cancel()

    def abort(self, error: Callable[[], BaseException]) -> int:
        """Refuse new work; every waiting and running request gets `error()` now, and running work
        stops at its next tile or frame. Returns how many requests were answered."""
        self.closed = True
        waiting = [w for q in self.buckets.values() for w in q]
        self.buckets.clear()
        self._changed()
        for work in waiting + list(self._running):
            work.stop.set()
            if work.future is not None and not work.future.done():
                work.future.set_exception(error())
        return len(waiting) + len(self._running)

    def _drop(self, work: Work, reason: str) -> None:
        """Remove waiting work from its bucket; work already running stops at its next tile or frame."""
        work.stop.set()
        q = self.buckets.get(work.key)
        if q is not None and work in q:
            q.remove(work)
            if not q:
                del self.buckets[work.key]
            self.hooks.rejected(reason)
            self._changed()
        if not work.future.done():
            work.future.cancel()

    # --- dispatching ----------------------------------------------------------------------
    def _ensure_started(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first use, or a new event loop (tests reuse apps)
            self._loop = loop
            self._wake = asyncio.Event()
            self._slots = asyncio.Semaphore(self.workers)
            self._dispatcher = loop.create_task(self._dispatch())

    def _changed(self) -> None:
        self.hooks.depth(self.depth)
        if self._loop is not None:
            self._wake.set()

    async def _dispatch(self) -> None:
        while True:
            await self._slots.acquire()
            batch = await self._next_batch()
            self._loop.create_task(self._execute(batch))

    async def _next_batch(self) -> list[Work]:
        while True:
            self._wake.clear()
            if self.buckets:
                key = min(self.buckets, key=lambda k: self.buckets[k][0].enqueued)
                q = self.buckets[key]
                rows = sum(w.rows for w in q)
                wait = q[0].enqueued + self.max_wait - time.monotonic()
                if rows >= self.max_batch or wait <= 0 or q[0].merge is None or self.max_batch == 1:
                    return self._take(key)
                try:  # a partial batch: wait for companions (or any change) until max_wait
                    await asyncio.wait_for(self._wake.wait(), wait)
                except asyncio.TimeoutError:
                    pass
            else:
                await self._wake.wait()

    def _take(self, key: Hashable) -> list[Work]:
        q = self.buckets[key]
        batch = [q.popleft()]
        rows = batch[0].rows
        while q and batch[0].merge is not None and rows + q[0].rows <= self.max_batch:
            rows += q[0].rows
            batch.append(q.popleft())
        if not q:
            del self.buckets[key]
        self._changed()
        return batch

    async def _execute(self, batch: list[Work]) -> None:
        self.running += len(batch)
        self._running.update(batch)
        self.hooks.running(self.running)
        self.hooks.batch(len(batch))
        try:
            # abandon_on_cancel: at shutdown the event loop does not wait for a model call to end.
            results = await anyio.to_thread.run_sync(_compute, batch, self.share, limiter=self.limiter,
                                                     abandon_on_cancel=True)
        except BaseException as exc:  # noqa: BLE001 - cancelled at shutdown: fail the waiters
            results = [exc] * len(batch)
        finally:
            self._running.difference_update(batch)
            self.running -= len(batch)
            self.hooks.running(self.running)
            self._slots.release()
        if batch[0].finished > batch[0].started:
            per_item = (batch[0].finished - batch[0].started) / len(batch)
            self._avg_item_s = 0.8 * self._avg_item_s + 0.2 * per_item
        for work, result in zip(batch, results):
            if work.future.done():
                continue  # the client left while its work ran
            if isinstance(result, BaseException):
                work.future.set_exception(result)
            else:
                work.future.set_result(result)


_busy = 0  # model calls running in worker threads (a cancelled event loop may have left them)
_busy_lock = threading.Lock()


def busy_threads() -> int:
    """Worker threads still inside a model call (`vae serve` does not wait for them past its deadline)."""
    return _busy


def _compute(batch: list[Work], share: threads.ThreadShare | None = None) -> list:
    global _busy
    with _busy_lock:
        _busy += 1
    try:
        with share.call() if share is not None else contextlib.nullcontext():
            return _compute_batch(batch)
    finally:
        with _busy_lock:
            _busy -= 1


def _compute_batch(batch: list[Work]) -> list:
    """Worker thread: one forward pass for the whole batch; on failure each request alone, so
    one bad request cannot fail its companions."""
    started = time.monotonic()
    for w in batch:
        w.started = started
    results: list = []
    if len(batch) > 1:
        try:
            with tiling.stop_when(lambda: all(w.stop.is_set() for w in batch)):
                merged, split = batch[0].merge([w.req for w in batch])
                results = split(batch[0].fn(merged))
        except tiling.Stopped as exc:  # every request of the batch was abandoned
            results = [exc] * len(batch)
        except Exception:  # noqa: BLE001
            results = []
    if not results:
        for w in batch:
            try:
                with tiling.stop_when(w.stop.is_set):
                    results.append(w.fn(w.req))
            except Exception as exc:  # noqa: BLE001 - delivered to that request's handler
                results.append(exc)
    finished = time.monotonic()
    for w in batch:
        w.finished = finished
    return results
