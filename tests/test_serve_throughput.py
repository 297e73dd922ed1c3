"""The faster request path gives the old path's answers: the orjson codec answers every body as the standard
library's does, requests encoded and scored together get the scores of their own forward pass (and their own
errors), and `mtrank serve --workers 2` serves from two processes and stops cleanly (issue 10, throughput)."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from tests.test_serve import CANDIDATES, CONTEXT, model_dir  # noqa: F401  (the served model directory fixture)

from mtrank.serve.app import create_app
from mtrank.serve.requests import RequestError
from mtrank.serve.schemas import ScoreRequest
from mtrank.serve.service import ScoringService

BODIES = {
    "plain": json.dumps({"context": CONTEXT, "candidates": CANDIDATES}).encode(),
    "blend and top_k": json.dumps(
        {
            "context": CONTEXT,
            "candidates": CANDIDATES,
            "blend": {"method": "weighted_sum", "weights": {"click": 2, "like": 1}, "transforms": {"like": "rank"}},
            "top_k": 2,
        }
    ).encode(),
    "90-digit integer id": json.dumps(
        {"context": CONTEXT, "candidates": [{"category": 10**90, "price": 1.0}]}
    ).encode(),
    "20-digit negative integer": b'{"context": {"country": "fr", "hour": -12345678901234567890}, '
    b'"candidates": [{"category": "hats", "price": 1.0}]}',
    "NaN literal": b'{"context": {"country": "fr", "hour": NaN}, "candidates": [{"category": "hats", "price": 1}]}',
    "1e400": b'{"context": {"country": "fr", "hour": 1e400}, "candidates": [{"category": "hats", "price": 1}]}',
    "1e308": b'{"context": {"country": "fr", "hour": 1}, "candidates": [{"category": "hats", "price": 1e308}]}',
    "lone surrogate": b'{"context": {"country": "\\ud800", "hour": 1}, "candidates": [{"category": "a", "price": 1}]}',
    "not UTF-8": b'{"candidates": ["\xff\xfe"]}',
    "BOM": b'\xef\xbb\xbf{"candidates": [{"category": "hats", "price": 1}]}',
    "malformed": b'{"candidates": [',
    "too deep": b"[" * 100_000 + b"]" * 100_000,
    "duplicate key": b'{"context": {"country": "fr", "hour": 1, "hour": 2}, "candidates": [{"category": "a", '
    b'"price": 1}]}',
    "wrong type": json.dumps({"context": CONTEXT, "candidates": [{"category": "hats", "price": "cheap"}]}).encode(),
    "too many": json.dumps({"candidates": [{"category": "hats", "price": 1.0}] * 51}).encode(),
}


@pytest.fixture(scope="module")
def clients(model_dir):  # noqa: F811
    service = ScoringService(model_dir, "eager", max_candidates=50)
    with (
        TestClient(create_app(service, codec="json")) as old,
        TestClient(create_app(service, codec="orjson")) as new,
    ):
        yield old, new


@pytest.mark.parametrize("name", list(BODIES))
def test_the_orjson_codec_answers_every_body_as_the_standard_library_does(clients, name):
    old, new = (
        c.post("/v1/score", content=BODIES[name], headers={"content-type": "application/json"}) for c in clients
    )
    assert old.status_code == new.status_code
    assert old.json() == new.json()  # same scores, same ranking, same error naming the same field


def test_a_normal_request_is_decoded_by_orjson(clients, monkeypatch):
    from mtrank.serve import app as app_module

    strict = []
    monkeypatch.setattr(app_module, "_decode_strict", lambda body: strict.append(body) or json.loads(body))
    assert clients[1].post("/v1/score", content=BODIES["plain"]).status_code == 200
    assert strict == []
    assert clients[1].post("/v1/score", content=BODIES["90-digit integer id"]).status_code == 422
    assert len(strict) == 1  # a long integer literal: the strict decode keeps it an integer


def _held_requests(service, requests):
    """Answer ``requests`` from threads while the coalescer is held busy, so that all of them queue and run
    as one batch; returns the answers (or the RequestError) by index."""
    coalescer = service.coalescer
    results = {}

    def answer(i):
        try:
            results[i] = service.answer(requests[i])
        except RequestError as err:
            results[i] = err

    threads = [threading.Thread(target=answer, args=(i,)) for i in range(len(requests))]
    with coalescer.held():  # as if a batch were running: every request queues, then they run as one batch
        for thread in threads:
            thread.start()
        with coalescer.condition:
            assert coalescer.condition.wait_for(lambda: len(coalescer.pending) == len(requests), timeout=30)
    for thread in threads:
        thread.join(timeout=30)
    return results


def test_requests_encoded_and_scored_together_get_their_own_forward_passes_answer(model_dir):  # noqa: F811
    service = ScoringService(model_dir, "eager")
    rng = np.random.default_rng(0)
    requests = [
        ScoreRequest(
            context={"country": str(rng.choice(["fr", "de", "us", "zz"])), "hour": int(rng.integers(0, 24))},
            candidates=[
                {"category": str(rng.choice(["shoes", "hats", "bags", "new"])), "price": float(rng.uniform(1, 99))}
                for _ in range(int(rng.integers(1, 12)))
            ],
        )
        for _ in range(8)
    ]
    alone = [service.answer(r) for r in requests]  # one at a time: a batch of one each
    batches_before = service.coalescer.batches
    together = _held_requests(service, requests)
    assert service.coalescer.batches == batches_before + 1  # all eight in one encoding and one forward pass
    for i, expected in enumerate(alone):
        got = together[i]
        assert got["ranking"] == expected["ranking"] and got["unseen"] == expected["unseen"]
        np.testing.assert_allclose(
            [[row[t] for t in got["tasks"]] for row in got["scores"]],
            [[row[t] for t in expected["tasks"]] for row in expected["scores"]],
            atol=1e-6,
            rtol=0,
        )


def test_a_bad_request_in_a_batch_gets_its_own_error_and_the_others_their_scores(model_dir):  # noqa: F811
    service = ScoringService(model_dir, "eager")
    good = ScoreRequest(context=CONTEXT, candidates=CANDIDATES)
    bad = ScoreRequest(context={"country": "fr", "hour": 1e308}, candidates=CANDIDATES)  # overflows standardised
    expected = service.answer(good)
    results = _held_requests(service, [good, bad, good])
    assert isinstance(results[1], RequestError) and "candidates[0]: feature 'hour'" in str(results[1])
    assert results[0]["scores"] == expected["scores"] and results[2]["scores"] == expected["scores"]


def test_the_legacy_path_encodes_each_request_alone_with_the_same_answer(model_dir):  # noqa: F811
    new = ScoringService(model_dir, "eager")
    old = ScoringService(model_dir, "eager", batch_encoding=False)
    request = ScoreRequest(context=CONTEXT, candidates=CANDIDATES)
    assert old.answer(request) == new.answer(request)
    assert old.coalescer.calls == 0 and old.batcher.calls == 1 and new.coalescer.calls == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_mtrank_serve_with_two_workers_answers_from_both_and_stops_on_sigterm(model_dir):  # noqa: F811
    import httpx

    port = _free_port()
    command = [sys.executable, "-m", "mtrank.cli", "serve", str(model_dir), "--port", str(port)]
    server = subprocess.Popen(
        command + ["--backend", "eager", "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    url = f"http://127.0.0.1:{port}"
    expected = ScoringService(model_dir, "eager").answer(ScoreRequest(context=CONTEXT, candidates=CANDIDATES))
    try:
        deadline = time.monotonic() + 90
        workers: set[int] = set()
        while len(workers) < 2:  # each new connection goes to a worker that is accepting
            assert server.poll() is None, server.stderr.read().decode()
            assert time.monotonic() < deadline, f"answers came from workers {workers} only within 90 s"
            try:
                with httpx.Client(timeout=5.0) as client:  # a new connection each time
                    response = client.post(f"{url}/v1/score", json={"context": CONTEXT, "candidates": CANDIDATES})
                    assert response.status_code == 200 and response.json()["scores"] == expected["scores"]
                    workers.add(int(client.get(f"{url}/readyz").json()["pid"]))
            except httpx.TransportError:
                time.sleep(0.05)  # polling interval while the workers start
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_the_coalescer_gives_each_of_many_concurrent_callers_its_own_result():
    from mtrank.serve.batching import Coalescer

    runs = []

    def run(items):  # a batch: each item's own answer, or its own error
        runs.append(len(items))
        return [ValueError(f"bad {x}") if x % 7 == 0 else x * x for x in items]

    coalescer = Coalescer(run, rows=lambda x: 1, max_rows=5)
    results = {}

    def caller(k):
        for x in range(k * 100, k * 100 + 20):
            try:
                results[x] = coalescer(x)
            except ValueError as err:
                results[x] = str(err)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert results == {
        x: (f"bad {x}" if x % 7 == 0 else x * x) for k in range(32) for x in range(k * 100, k * 100 + 20)
    }
    assert sum(runs) == 640 and max(runs) <= 5 and not coalescer.busy and not coalescer.pending
