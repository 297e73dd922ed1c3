"""Hostile requests against a real `uvicorn` server over a socket (issue 10, items 2, 3, 5): the 990k-item
`{"candidates": [1, 1, ...]}` body (time to the refusal, size of the answer, /healthz latency right after), the
/metrics size after N unknown paths, and a client that promises more body than it sends (time until cut off).

    PYTHONPATH=src python benchmarks/hostile_requests.py > docs/results/hostile_requests.txt

Single process, torch threads 1; the client runs on the same (shared, 2-core) machine as the server.
"""

from __future__ import annotations

import argparse
import http.client
import socket
import tempfile
import threading
import time

import torch
import uvicorn

from mtrank import ModelConfig, MultiTaskModel
from mtrank.artifacts import save_model
from mtrank.serve.app import create_app, parse_score_request
from mtrank.serve.requests import RequestError
from mtrank.serve.service import ScoringService


def request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes, float]:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path, body=body, headers={"content-type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", type=int, default=5000, help="unknown paths requested before reading /metrics")
    parser.add_argument("--body-timeout", type=float, default=2.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = MultiTaskModel(ModelConfig(inputs={"num_dense": 8, "vocab_sizes": [100, 50]}))
        service = ScoringService(save_model(model, tmp), "eager")
    app = create_app(service, body_timeout_s=args.body_timeout)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)

    body = b'{"candidates": [' + b",".join([b"1"] * 990_000) + b"]}"
    times = []
    for _ in range(5):
        status, data, seconds = request(port, "POST", "/v1/score", body)
        times.append(seconds)
    _, _, health = request(port, "GET", "/healthz")
    print(
        f"990k-item request ({len(body)} bytes): status {status}, answer {len(data)} bytes, "
        f"{min(times) * 1e3:.1f} ms best / {max(times) * 1e3:.1f} ms worst of 5 (client included); "
        f"/healthz after it {health * 1e3:.1f} ms"
    )
    print(f"  answer: {data.decode()[:200]}")
    for codec in ("orjson", "json"):  # the app's default codec, and the old path's (--legacy-path)
        refusals = []
        for _ in range(5):
            started = time.perf_counter()
            try:
                parse_score_request(body, service.max_candidates, codec)
            except RequestError:
                refusals.append(time.perf_counter() - started)
        print(
            f"  server side (decode + count, no HTTP), codec {codec}: {min(refusals) * 1e3:.1f} ms best / "
            f"{max(refusals) * 1e3:.1f} ms worst of 5"
        )

    before = len(request(port, "GET", "/metrics")[1])
    for i in range(args.paths):
        request(port, "GET", f"/unknown/{i}")
    after = len(request(port, "GET", "/metrics")[1])
    print(f"/metrics: {before} bytes before, {after} bytes after {args.paths} unique unknown paths")

    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
        )
        sock.settimeout(10)
        reply = b""
        try:
            while chunk := sock.recv(4096):
                reply += chunk
            closed = True
        except TimeoutError:
            closed = False
        status_line = reply.split(b"\r\n", 1)[0].decode()
    print(
        f"body promised (1000 bytes) but not sent: '{status_line}' after {time.perf_counter() - started:.2f} s "
        f"(--body-timeout {args.body_timeout:g}); connection closed by the server: {closed}"
    )
    server.should_exit = True


if __name__ == "__main__":
    main()
