"""Dynamic micro-batching: many request threads, one worker, one model call per batch.

The scheme of NVIDIA Triton's dynamic batcher and TorchServe's batch_size/max_batch_delay: requests wait in
one queue; a single worker takes the oldest, then keeps collecting for up to `max_wait_ms` or until
`max_batch_size` texts, calls `fn` once on the concatenated texts and hands every request its slice through
a future. On a CPU or GPU one forward pass over 32 texts costs far less than 32 passes over one, so under
concurrent load throughput grows with the batch while each request waits at most `max_wait_ms` extra.

Rules:
- a request's texts are never split across batches; a request with more than `max_batch_size` texts runs
  as a batch of its own (the HTTP layer caps texts per request well below that by default);
- an exception in `fn` (or a wrong number of results) fails exactly the requests of that batch; the worker
  carries on;
- at most `max_queue` texts wait; beyond that `submit` raises `Overloaded` at once (the server turns it
  into HTTP 503 with Retry-After) instead of letting latency grow without bound;
- a request whose future was cancelled before its batch started (its HTTP caller timed out) is dropped;
- `close()` stops the worker after the batch in progress and fails whatever still waits with
  `BatcherClosed`.

Adaptive waiting (`adaptive=True`, what the server uses): a fixed max_wait costs a lone client max_wait_ms
on every request for nothing. So callers announce a request as soon as it arrives, before parsing it
(`with batcher.arriving(): ... submit(...)`), and an open batch waits only while some announced request has
not been submitted yet, still bounded by max_wait_ms. With one client the batch runs at once; under load the
batch waits for exactly the requests already inside the server, and runs as soon as they are all in.

The items need not be texts: /v1/generate (generate.py) queues one generation job per request with
`max_batch_size=1`, so it gets the same bounded queue, 503s, cancellation and shutdown with one request per
model call.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

R = TypeVar("R")


class Overloaded(RuntimeError):
    """The queue is full; the caller should retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BatcherClosed(RuntimeError):
    """The batcher was closed before (or while) the request could run."""


@dataclass
class _Request:
    texts: list[Any]  # texts, or any items `fn` takes
    future: Future
    enqueued: float = field(default_factory=time.monotonic)


class MicroBatcher(Generic[R]):
    """Queue texts (or other items) from many threads; run `fn(texts) -> results` (same length, same order) in
    batches."""

    def __init__(
        self,
        fn: Callable[[list[Any]], Sequence[R]],
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        adaptive: bool = False,
        name: str = "llmlab-microbatcher",
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size}: must be at least 1")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms={max_wait_ms}: must be >= 0")
        if max_queue < 1:
            raise ValueError(f"max_queue={max_queue}: must be at least 1")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.adaptive = adaptive
        self._queue: deque[_Request] = deque()
        self._queued_texts = 0
        self._arriving = 0  # announced requests (see arriving()) not yet submitted
        self._local = threading.local()
        self._cond = threading.Condition()
        self._closed = False
        # Statistics, guarded by _cond.
        self._batches = 0
        self._requests = 0
        self._texts = 0
        self._rejected = 0
        self._failed_batches = 0
        self._sizes: Counter[int] = Counter()  # texts per batch -> number of batches
        self._busy_s = 0.0
        self._worker = threading.Thread(target=self._run, name=name, daemon=True)
        self._worker.start()

    # -- client side --------------------------------------------------------------------------------------
    def submit(self, texts: Sequence[Any]) -> Future:
        """Queue one request; its future resolves to `fn`'s results for exactly these texts."""
        texts = list(texts)
        fut: Future = Future()
        with self._cond:
            # This thread's announced request has arrived (or is refused below), in the same locked step
            # as it is queued, so the worker never sees it as neither on its way nor queued.
            self._withdraw_locked()
            if not texts:
                fut.set_result([])
                return fut
            if self._closed:
                raise BatcherClosed("the batcher is closed")
            if self._queued_texts + len(texts) > self.max_queue:
                self._rejected += 1
                raise Overloaded(
                    f"overloaded: {self._queued_texts} texts already queued (max_queue={self.max_queue}); "
                    "retry shortly",
                    retry_after_s=1.0,
                )
            self._queue.append(_Request(texts, fut))
            self._queued_texts += len(texts)
            self._cond.notify()
        return fut

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Announce, from the thread that will call submit(), a request on its way (being parsed).

        With `adaptive=True`, an open batch that is not full waits (up to max_wait_ms) only while some
        announced request has not been submitted yet; with none on the way it runs at once, so a lone client
        pays no wait. The announcement ends at this thread's next submit() or when the block exits.
        """
        with self._cond:
            self._arriving += 1
        self._local.announced = True
        try:
            yield
        finally:
            self._withdraw()

    def _withdraw(self) -> None:
        with self._cond:
            self._withdraw_locked()

    def _withdraw_locked(self) -> None:
        if getattr(self._local, "announced", False):
            self._local.announced = False
            self._arriving -= 1
            self._cond.notify()

    def __call__(self, texts: Sequence[Any], timeout: float | None = None) -> list[R]:
        """Submit and wait. On timeout the request is cancelled (dropped if it has not started)."""
        fut = self.submit(texts)
        try:
            return fut.result(timeout=timeout)
        except FutureTimeout:
            fut.cancel()
            raise

    @property
    def running(self) -> bool:
        return self._worker.is_alive() and not self._closed

    def stats(self) -> dict[str, Any]:
        """Counts since start: batches, requests, texts, batch-size histogram (texts per batch) and means."""
        with self._cond:
            batches = self._batches
            return {
                "batches": batches,
                "requests": self._requests,
                "texts": self._texts,
                "failed_batches": self._failed_batches,
                "rejected_requests": self._rejected,
                "queued_texts": self._queued_texts,
                "queued_requests": len(self._queue),
                "mean_batch_size": self._texts / batches if batches else 0.0,
                "mean_requests_per_batch": self._requests / batches if batches else 0.0,
                "max_batch_size_seen": max(self._sizes) if self._sizes else 0,
                "batch_size_histogram": {str(k): v for k, v in sorted(self._sizes.items())},
                "busy_seconds": self._busy_s,
                "max_batch_size": self.max_batch_size,
                "max_wait_ms": self.max_wait_s * 1000.0,
                "adaptive": self.adaptive,
                "max_queue": self.max_queue,
                "running": self.running,
            }

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the batch in progress; fail everything still queued with BatcherClosed."""
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._queued_texts = 0
            self._cond.notify_all()
        for req in pending:
            if req.future.set_running_or_notify_cancel():
                req.future.set_exception(BatcherClosed("the batcher was closed before this request ran"))
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout)

    def __enter__(self) -> MicroBatcher[R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- worker side --------------------------------------------------------------------------------------
    def _next_batch(self) -> list[_Request] | None:
        """Block for the first request, then gather more until the batch is full, max_wait has passed, or
        (adaptive) no announced request is still on its way."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            batch = [self._queue.popleft()]
            size = len(batch[0].texts)
            deadline = time.monotonic() + self.max_wait_s
            while size < self.max_batch_size:
                if not self._queue:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._closed or (self.adaptive and self._arriving == 0):
                        break
                    self._cond.wait(remaining)
                    continue
                nxt = self._queue[0]
                if size + len(nxt.texts) > self.max_batch_size:
                    break  # it opens the next batch; requests are never split
                batch.append(self._queue.popleft())
                size += len(nxt.texts)
            self._queued_texts -= size
            return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            # Requests cancelled while queued (their caller gave up) are dropped before the model runs.
            live = [req for req in batch if req.future.set_running_or_notify_cancel()]
            if not live:
                continue
            texts = [t for req in live for t in req.texts]
            start = time.monotonic()
            try:
                results = list(self.fn(texts))
                if len(results) != len(texts):
                    raise RuntimeError(
                        f"batch function returned {len(results)} results for {len(texts)} texts"
                    )
            except BaseException as err:  # the worker must survive anything fn raises
                for req in live:
                    req.future.set_exception(err)
                with self._cond:
                    self._record(live, len(texts), time.monotonic() - start, failed=True)
                continue
            with self._cond:
                self._record(live, len(texts), time.monotonic() - start, failed=False)
            offset = 0
            for req in live:
                n = len(req.texts)
                req.future.set_result(results[offset : offset + n])
                offset += n

    def _record(self, live: list[_Request], n_texts: int, seconds: float, failed: bool) -> None:
        self._batches += 1
        self._requests += len(live)
        self._texts += n_texts
        self._sizes[n_texts] += 1
        self._busy_s += seconds
        self._failed_batches += int(failed)
