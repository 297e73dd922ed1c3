"""Loopback load test of ``mtrank serve``: concurrent clients for a bounded time, requests/s, latency, errors.

    .venv/bin/python benchmarks/loadtest.py                   # 32 clients, 60 s, 100 candidates per request
    .venv/bin/python benchmarks/loadtest.py --clients 8 --seconds 10 --candidates 1000

It builds a W2-sized model directory with fitted encoders (13 numeric + 26 categorical features with
vocabularies of ~10,000 values; the user's features in the request context, the item's in each candidate),
starts ``mtrank serve`` on 127.0.0.1 on a free port as a child process, waits for ``/readyz`` by polling, runs
the clients (asyncio + httpx, request bodies prepared beforehand), then stops the server it started.
Writes docs/results/loadtest.json.
"""

from __future__ import annotations

import os

# passive OpenMP waiting on a shared 2-core machine (see benchmarks/serving.py); the server inherits it
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from mtrank.artifacts import save_model  # noqa: E402
from mtrank.config import ModelConfig, TaskConfig  # noqa: E402
from mtrank.config.experiment import CategoricalFeature, FeaturesSpec, NumericFeature  # noqa: E402
from mtrank.data.encoders import FeatureEncoder  # noqa: E402
from mtrank.model import MultiTaskModel  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
USER_CAT = [f"user_c{i}" for i in range(13)]
ITEM_CAT = [f"item_c{i}" for i in range(13)]
USER_NUM = [f"user_n{i}" for i in range(5)]
ITEM_NUM = [f"item_n{i}" for i in range(8)]


def build_model_dir(directory: Path, vocab: int = 10_000, seed: int = 0) -> FeatureEncoder:
    """A W2-sized model (untrained) + encoders fitted on generated rows, written to ``directory``."""
    rng = np.random.default_rng(seed)
    rows = 4 * vocab
    frame = pd.DataFrame(
        {
            **{c: rng.integers(0, vocab, rows).astype(str) for c in USER_CAT + ITEM_CAT},
            **{c: rng.normal(size=rows) for c in USER_NUM + ITEM_NUM},
        }
    )
    spec = FeaturesSpec(
        categorical=[CategoricalFeature(c) for c in USER_CAT + ITEM_CAT],
        numeric=[NumericFeature(c) for c in USER_NUM + ITEM_NUM],
    )
    encoder = FeatureEncoder(spec).fit(frame)
    torch.manual_seed(seed)
    config = ModelConfig(
        inputs={"num_dense": encoder.num_dense, "vocab_sizes": encoder.vocab_sizes, "embedding_dim": 16},
        tasks=[TaskConfig("click"), TaskConfig("like")],
        block={"type": "mmoe", "num_experts": 8},
        experts={"hidden": [256, 128]},
        towers={"hidden": [64]},
    )
    save_model(MultiTaskModel(config), directory)
    encoder.save(directory)
    return encoder


def request_bodies(count: int, candidates: int, vocab: int, seed: int = 1) -> list[bytes]:
    rng = np.random.default_rng(seed)
    bodies = []
    for _ in range(count):
        context = {c: str(rng.integers(0, vocab)) for c in USER_CAT}
        context.update({c: float(rng.normal()) for c in USER_NUM})
        items = [
            {
                **{c: str(rng.integers(0, vocab)) for c in ITEM_CAT},
                **{c: float(rng.normal()) for c in ITEM_NUM},
            }
            for _ in range(candidates)
        ]
        bodies.append(json.dumps({"context": context, "candidates": items}).encode())
    return bodies


def stage_times(model_dir: Path, bodies: list[bytes], backend: str, precision: str) -> dict[str, float]:
    """Mean milliseconds per request of each server-side stage, measured in-process on the same bodies:
    JSON parsing, request validation, feature encoding, the forward pass, blending + response."""
    from mtrank.serve.schemas import ScoreRequest
    from mtrank.serve.service import ScoringService

    service = ScoringService(model_dir, backend, precision)
    service.warm_up()
    totals = dict.fromkeys(("json", "validation", "encoding", "forward", "score_total"), 0.0)
    for body in bodies:
        t0 = time.perf_counter()
        payload = json.loads(body)
        t1 = time.perf_counter()
        request = ScoreRequest.model_validate(payload)
        t2 = time.perf_counter()
        dense, sparse = service.encode(request.context, request.candidates)
        t3 = time.perf_counter()
        service.batcher(dense, sparse)
        t4 = time.perf_counter()
        service.score(request)  # encoding + forward + blend + response model, end to end
        t5 = time.perf_counter()
        for key, value in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            totals[key] += value
    return {key: 1e3 * value / len(bodies) for key, value in totals.items()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 180.0) -> float:
    """Poll ``/readyz`` until it answers 200; returns the seconds it took."""
    started = time.perf_counter()
    with httpx.Client(timeout=2.0) as client:
        while time.perf_counter() - started < timeout:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with code {process.returncode} before it was ready")
            try:
                if client.get(f"{url}/readyz").status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass
            time.sleep(0.1)  # polling interval of the readiness probe, not a wait for a result
    raise RuntimeError(f"{url}/readyz did not answer 200 within {timeout:.0f} s")


async def run_clients(url: str, bodies: list[bytes], clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    deadline = time.perf_counter() + seconds
    headers = {"content-type": "application/json"}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client_loop(client: httpx.AsyncClient, offset: int) -> None:
        i = offset
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                response = await client.post(f"{url}/v1/score", content=bodies[i % len(bodies)], headers=headers)
                key = str(response.status_code)
            except httpx.HTTPError as err:
                key = type(err).__name__
            latencies.append(time.perf_counter() - started)
            statuses[key] = statuses.get(key, 0) + 1
            i += clients

    started = time.perf_counter()
    async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:
        await asyncio.gather(*(client_loop(client, k) for k in range(clients)))
    elapsed = time.perf_counter() - started
    ok = statuses.get("200", 0)
    lat = np.array(latencies) * 1e3
    return {
        "requests": len(latencies),
        "ok": ok,
        "errors": len(latencies) - ok,
        "statuses": statuses,
        "seconds": elapsed,
        "requests_per_s": ok / elapsed,
        "p50_ms": float(np.percentile(lat, 50)),
        "p90_ms": float(np.percentile(lat, 90)),
        "p99_ms": float(np.percentile(lat, 99)),
        "max_ms": float(lat.max()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--seconds", type=float, default=60.0, help="test duration, at most 300 (default 60)")
    parser.add_argument("--candidates", type=int, default=100, help="candidates per request (default 100)")
    parser.add_argument("--backend", default="auto", help="mtrank serve --backend (default auto)")
    parser.add_argument("--precision", default="fp32", help="mtrank serve --precision (default fp32)")
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "results" / "loadtest.json")
    args = parser.parse_args()
    if not 0 < args.seconds <= 300:
        parser.error("--seconds: give a duration in (0, 300]")
    with tempfile.TemporaryDirectory(prefix="mtrank-loadtest-") as tmp:
        model_dir = Path(tmp) / "w2"
        encoder = build_model_dir(model_dir)
        vocab = max(encoder.vocab_sizes) - 1
        bodies = request_bodies(64, args.candidates, vocab)
        stages = stage_times(model_dir, bodies[:16], args.backend, args.precision)
        print("in-process ms per request: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()), flush=True)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [
            sys.executable,
            "-m",
            "mtrank.cli",
            "serve",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend",
            args.backend,
            "--precision",
            args.precision,
            "--torch-threads",
            str(args.torch_threads),
            "--max-body-bytes",
            str(max(2_000_000, 2 * max(len(b) for b in bodies))),
            "--max-candidates",
            str(max(1000, args.candidates)),
        ]
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            ready_s = wait_ready(url, server)
            print(
                f"server ready in {ready_s:.1f} s; {args.clients} clients for {args.seconds:.0f} s ...",
                flush=True,
            )
            result = asyncio.run(run_clients(url, bodies, args.clients, args.seconds))
            metrics = httpx.get(f"{url}/metrics").text
            ready = httpx.get(f"{url}/readyz").json()
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    result.update(
        {
            "clients": args.clients,
            "duration_s": args.seconds,
            "candidates_per_request": args.candidates,
            "backend": f"{args.backend}/{args.precision}",
            "server_ready_s": ready_s,
            "request_bytes_mean": float(np.mean([len(b) for b in bodies])),
            "load_average_1m_after": os.getloadavg()[0],
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "stage_ms": stages,
            "forward_passes": ready.get("forward_passes"),
            "requests_per_pass": ready.get("requests_per_pass"),
            "server_counted_200": _counter(metrics, 'mtrank_requests_total{endpoint="/v1/score",status="200"}'),
            "command": "python benchmarks/loadtest.py " + " ".join(sys.argv[1:]),
        }
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(
        f"{result['requests']} requests ({result['errors']} errors, statuses {result['statuses']}) in "
        f"{result['seconds']:.1f} s: {result['requests_per_s']:.1f} req/s, "
        f"{result['requests_per_s'] * args.candidates:.0f} candidates/s; latency p50 "
        f"{result['p50_ms']:.1f} ms, "
        f"p99 {result['p99_ms']:.1f} ms"
    )
    print(f"wrote {args.json}")
    return 0 if result["errors"] == 0 else 1


def _counter(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    return None


if __name__ == "__main__":
    sys.exit(main())
