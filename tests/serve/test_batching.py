"""MicroBatcher: slices go back to the right callers, batch size and wait bounds, errors, overload, close.

No strict timing asserts: only lower bounds (a batch cannot start before its wait is over) and generous
timeouts, so a busy machine makes the tests slower, never flaky.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout

import pytest

from llmlab.serve.batching import BatcherClosed, MicroBatcher, Overloaded

WAIT = 10.0  # seconds: the most any future may take in these tests


class Recorder:
    """fn for the batcher: upper-cases texts, records each batch, optionally blocks on a gate."""

    def __init__(self, gate: threading.Event | None = None, delay: float = 0.0):
        self.batches: list[list[str]] = []
        self.gate = gate
        self.delay = delay
        self.entered = threading.Event()

    def __call__(self, texts: list[str]) -> list[str]:
        self.batches.append(list(texts))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(WAIT)
        if self.delay:
            time.sleep(self.delay)
        return [t.upper() for t in texts]


def test_each_request_gets_its_own_slice_and_batches_respect_max_size():
    fn = Recorder(delay=0.01)
    requests = [[f"r{i}-{j}" for j in range(1 + i % 3)] for i in range(30)]  # 1..3 texts each
    with MicroBatcher(fn, max_batch_size=5, max_wait_ms=20) as batcher:
        futures = [batcher.submit(texts) for texts in requests]
        for texts, fut in zip(requests, futures, strict=True):
            assert fut.result(WAIT) == [t.upper() for t in texts]
        stats = batcher.stats()
    assert all(len(b) <= 5 for b in fn.batches)
    assert stats["batches"] == len(fn.batches) < len(requests)  # requests were grouped
    assert stats["requests"] == 30 and stats["texts"] == sum(map(len, requests))
    assert stats["max_batch_size_seen"] <= 5
    assert sum(stats["batch_size_histogram"].values()) == stats["batches"]
    assert stats["mean_batch_size"] == pytest.approx(stats["texts"] / stats["batches"])
    # A request's texts are never split across batches.
    for texts in requests:
        assert any(b[i : i + len(texts)] == texts for b in fn.batches for i in range(len(b)))


def test_a_request_larger_than_the_batch_runs_alone():
    fn = Recorder()
    with MicroBatcher(fn, max_batch_size=4, max_wait_ms=0) as batcher:
        big = [f"t{i}" for i in range(7)]
        assert batcher(big, timeout=WAIT) == [t.upper() for t in big]
    assert fn.batches == [big]


def test_waits_up_to_max_wait_for_company():
    fn = Recorder()
    with MicroBatcher(fn, max_batch_size=8, max_wait_ms=60) as batcher:
        start = time.monotonic()
        assert batcher(["alone"], timeout=WAIT) == ["ALONE"]
        # Lower bound only: the worker held the batch open for its max_wait before running it alone.
        assert time.monotonic() - start >= 0.05
    with MicroBatcher(fn, max_batch_size=2, max_wait_ms=5_000) as batcher:
        start = time.monotonic()
        a, b = batcher.submit(["a"]), batcher.submit(["b"])
        assert a.result(WAIT) == ["A"] and b.result(WAIT) == ["B"]
        assert batcher.stats()["batches"] == 1  # a full batch runs at once, without waiting 5 s
        assert time.monotonic() - start < 4


def test_errors_reach_the_requests_of_that_batch_and_the_worker_survives():
    def fn(texts: list[str]) -> list[str]:
        if "bad" in texts:
            raise ValueError("cannot classify 'bad'")
        if "short" in texts:
            return texts[:-1]  # wrong number of results
        return texts

    with MicroBatcher(fn, max_batch_size=4, max_wait_ms=0) as batcher:
        with pytest.raises(ValueError, match="cannot classify"):
            batcher(["bad"], timeout=WAIT)
        with pytest.raises(RuntimeError, match="returned 1 results for 2 texts"):
            batcher(["short", "x"], timeout=WAIT)
        assert batcher(["fine"], timeout=WAIT) == ["fine"]
        stats = batcher.stats()
        assert stats["failed_batches"] == 2 and stats["batches"] == 3 and batcher.running


def test_full_queue_is_overloaded_not_slow():
    gate = threading.Event()
    fn = Recorder(gate=gate)
    with MicroBatcher(fn, max_batch_size=8, max_wait_ms=0, max_queue=3) as batcher:
        first = batcher.submit(["busy"])
        assert fn.entered.wait(WAIT)  # the worker is inside fn with the first request
        queued = batcher.submit(["q1", "q2", "q3"])
        with pytest.raises(Overloaded, match="max_queue=3") as err:
            batcher.submit(["one too many"])
        assert err.value.retry_after_s > 0
        assert batcher.stats()["rejected_requests"] == 1
        gate.set()
        assert first.result(WAIT) == ["BUSY"] and queued.result(WAIT) == ["Q1", "Q2", "Q3"]
        assert batcher(["later"], timeout=WAIT) == ["LATER"]  # room again


def test_cancelled_requests_are_dropped_before_the_model_runs():
    gate = threading.Event()
    fn = Recorder(gate=gate)
    with MicroBatcher(fn, max_batch_size=1, max_wait_ms=0) as batcher:
        first = batcher.submit(["first"])
        assert fn.entered.wait(WAIT)
        with pytest.raises(FutureTimeout):
            batcher(["gave up"], timeout=0.05)  # times out while queued, so it is cancelled
        gate.set()
        assert first.result(WAIT) == ["FIRST"]
        assert batcher(["next"], timeout=WAIT) == ["NEXT"]
    assert ["gave up"] not in fn.batches


def test_close_fails_waiting_requests_and_refuses_new_ones():
    gate = threading.Event()
    fn = Recorder(gate=gate)
    batcher = MicroBatcher(fn, max_batch_size=1, max_wait_ms=0)
    running = batcher.submit(["running"])
    assert fn.entered.wait(WAIT)
    waiting = batcher.submit(["waiting"])
    closer = threading.Thread(target=batcher.close)
    closer.start()
    with pytest.raises(BatcherClosed):
        waiting.result(WAIT)
    gate.set()  # the batch in progress finishes normally
    assert running.result(WAIT) == ["RUNNING"]
    closer.join(WAIT)
    assert not closer.is_alive() and not batcher.running and not batcher._worker.is_alive()
    with pytest.raises(BatcherClosed):
        batcher.submit(["after"])
    batcher.close()  # idempotent


def test_empty_request_needs_no_model_call_and_bad_settings_are_refused():
    fn = Recorder()
    with MicroBatcher(fn) as batcher:
        assert batcher.submit([]).result(WAIT) == []
    assert fn.batches == []
    for kwargs in ({"max_batch_size": 0}, {"max_wait_ms": -1}, {"max_queue": 0}):
        with pytest.raises(ValueError):
            MicroBatcher(fn, **kwargs)


def test_many_threads_at_once():
    fn = Recorder(delay=0.002)
    results: dict[int, list[str]] = {}
    errors: list[BaseException] = []
    with MicroBatcher(fn, max_batch_size=16, max_wait_ms=10) as batcher:
        barrier = threading.Barrier(16)

        def client(i: int) -> None:
            try:
                barrier.wait(WAIT)
                for j in range(5):
                    results[i * 10 + j] = batcher([f"{i}.{j}"], timeout=WAIT)
            except BaseException as err:  # reported below
                errors.append(err)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT * 2)
        assert not errors and len(results) == 80
        assert all(results[i * 10 + j] == [f"{i}.{j}"] for i in range(16) for j in range(5))
        assert batcher.stats()["batches"] < 80


def test_cancelled_error_is_not_swallowed():
    # A caller that cancels its own future sees CancelledError, as with any concurrent.futures.Future.
    gate = threading.Event()
    fn = Recorder(gate=gate)
    with MicroBatcher(fn, max_batch_size=1, max_wait_ms=0) as batcher:
        batcher.submit(["hold"])
        assert fn.entered.wait(WAIT)
        fut = batcher.submit(["x"])
        assert fut.cancel()
        with pytest.raises(CancelledError):
            fut.result(WAIT)
        gate.set()


def test_adaptive_runs_a_lone_request_at_once():
    fn = Recorder()
    with MicroBatcher(fn, max_batch_size=8, max_wait_ms=5_000, adaptive=True) as batcher:
        start = time.monotonic()
        with batcher.arriving():
            assert batcher(["alone"], timeout=WAIT) == ["ALONE"]
        assert time.monotonic() - start < 4  # nobody else was on the way: no 5 s wait
        assert batcher._arriving == 0


def test_adaptive_waits_for_announced_requests():
    fn = Recorder()
    announced, go = threading.Event(), threading.Event()
    with MicroBatcher(fn, max_batch_size=8, max_wait_ms=5_000, adaptive=True) as batcher:

        def late_client() -> None:
            with batcher.arriving():
                announced.set()
                assert go.wait(WAIT)
                time.sleep(0.05)  # still parsing while the batch is open
                batcher(["late"], timeout=WAIT)

        thread = threading.Thread(target=late_client)
        thread.start()
        assert announced.wait(WAIT)
        start = time.monotonic()
        first = batcher.submit(["first"])
        go.set()
        assert first.result(WAIT) == ["FIRST"]
        thread.join(WAIT)
        assert fn.batches == [["first", "late"]]  # the batch waited for the announced request...
        assert time.monotonic() - start < 4  # ...and ran as soon as it arrived, not after 5 s
        assert batcher._arriving == 0
