"""Many clients at once over real HTTP: requests are micro-batched, and batching changes no result."""

from __future__ import annotations

import random
import threading

import pytest

from llmlab.serve.app import ServeLimits, start_server
from tests.serve.helpers import AG_NEWS_LABELS, TEXTS, classify, request

THREADS = 8
REQUESTS_PER_THREAD = 5


def test_concurrent_requests_are_batched_and_match_unbatched_results(classifier):
    rng = random.Random(0)
    plans = [
        [rng.sample(TEXTS, rng.randint(1, 3)) for _ in range(REQUESTS_PER_THREAD)] for _ in range(THREADS)
    ]
    replies: dict[tuple[int, int], object] = {}
    errors: list[BaseException] = []
    limits = ServeLimits(max_texts=8, max_batch_size=16, max_wait_ms=20, max_queue=256)
    with start_server(classifier, limits, threads=THREADS * 2) as handle:
        barrier = threading.Barrier(THREADS)

        def client(i: int) -> None:
            try:
                barrier.wait(30)
                for j, texts in enumerate(plans[i]):
                    replies[i, j] = classify(handle.port, texts, timeout=30)
            except BaseException as err:  # reported below
                errors.append(err)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        stats = request(handle.port, "GET", "/v1/stats").json()["batcher"]
    assert not errors and not any(t.is_alive() for t in threads)
    total = THREADS * REQUESTS_PER_THREAD
    assert stats["requests"] == total
    assert stats["batches"] < total, stats  # some requests shared a model call
    assert stats["max_batch_size_seen"] <= 16 and stats["mean_batch_size"] > 1

    # Every text's result equals the model's output for that text alone (no padding neighbours).
    alone = {text: classifier.classify([text])[0] for text in TEXTS}
    for (i, j), reply in replies.items():
        assert reply.status == 200, reply.body
        results = reply.json()["results"]
        assert len(results) == len(plans[i][j])
        for text, got in zip(plans[i][j], results, strict=True):
            want = alone[text]
            assert got["label"] == want["label"]
            for label in AG_NEWS_LABELS:
                assert got["scores"][label] == pytest.approx(want["scores"][label], abs=1e-5)
