"""Loopback load test of ``mtrank serve``: the old and the new request path side by side, at several client counts.

    .venv/bin/python benchmarks/loadtest.py                      # 1, 8, 32 clients, 20 s each, 100 candidates
    .venv/bin/python benchmarks/loadtest.py --clients 32 --seconds 15 --paths legacy workers2
    .venv/bin/python benchmarks/loadtest.py --quick              # 2 s per setting (a smoke run)

It builds a W2-sized model directory with fitted encoders (13 numeric + 26 categorical features with
vocabularies of ~10,000 values; the user's features in the request context, the item's in each candidate) and
starts one ``mtrank serve`` child process per path (``--paths``; see :data:`PATHS`: ``legacy`` is the request
path before the throughput work, ``mtrank serve --legacy-path``), all at once on free loopback ports. Then, for
each client count, every path is loaded in turn for ``--seconds`` (the paths interleaved, in a rotating order,
so the machine's other load falls on them alike): concurrent clients, each a keep-alive connection sending one
request after the other (request bodies prepared beforehand).

The clients speak HTTP/1.1 over asyncio streams directly: the load generator runs on the same 2 cores as the
server, and an httpx client spent ~1 ms of CPU per request that the server then lacked.

Every answer is kept: after the run, each path's scores for each request body are compared with the
one-at-a-time answer of an in-process :class:`ScoringService` (same backend); the largest difference is reported.
The bare forward time (one 100-candidate forward through the same backend, no HTTP) is measured in-process
beside it. Writes docs/results/loadtest.json.
"""

from __future__ import annotations

import os

# passive OpenMP waiting on a shared 2-core machine (see benchmarks/serving.py); the server inherits it
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
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

from mtrank.artifacts import save_model, seal_model_dir  # noqa: E402
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
    save_model(MultiTaskModel(config), directory, seal=False)
    encoder.save(directory)
    seal_model_dir(directory)  # the manifest names every file, encoders.json included
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


PATHS = {  # name -> mtrank serve options
    "legacy": ["--legacy-path", "--torch-threads", "2"],  # stdlib JSON, pydantic answer, h11 + asyncio, 1 process
    "orjson": ["--torch-threads", "2"],  # orjson both ways, httptools + uvloop, one process
    "workers2": ["--workers", "2"],  # the same, two worker processes of 1 thread each
}


def stage_times(model_dir: Path, bodies: list[bytes], backend: str) -> dict[str, float]:
    """Mean milliseconds per request of each server-side stage, in-process on the same bodies, one at a time
    (the profile that chose the changes): decoding (json / orjson), request validation, feature encoding, the
    forward pass, the answer (pydantic + FastAPI's encoder + json, the old path / plain lists + orjson)."""
    import orjson
    from fastapi.encoders import jsonable_encoder

    from mtrank.serve.schemas import ScoreRequest, ScoreResponse
    from mtrank.serve.service import ScoringService

    service = ScoringService(model_dir, backend)
    service.warm_up()
    stages = {
        "decode_json": lambda b, r: json.loads(b),
        "decode_orjson": lambda b, r: orjson.loads(b),
        "validation": lambda b, r: ScoreRequest.model_validate(orjson.loads(b)),
        "encoding": lambda b, r: service.encode(r.context, r.candidates),
        "forward": lambda b, r: service.scorer(*service.encode(r.context, r.candidates)),
        "answer_old": lambda b, r: json.dumps(jsonable_encoder(ScoreResponse.model_validate(service.score(r)))),
        "answer_new": lambda b, r: orjson.dumps(service.answer(r)),
    }
    requests = [ScoreRequest.model_validate(json.loads(b)) for b in bodies]
    totals = dict.fromkeys(stages, 0.0)
    for body, request in zip(bodies, requests):
        for name, stage in stages.items():
            started = time.perf_counter()
            stage(body, request)
            totals[name] += time.perf_counter() - started
    ms = {name: 1e3 * total / len(bodies) for name, total in totals.items()}
    # the stages that include earlier ones, alone
    ms["validation"] -= ms["decode_orjson"]
    ms["forward"] -= ms["encoding"]
    for name in ("answer_old", "answer_new"):
        ms[name] -= ms["encoding"] + ms["forward"]
    return ms


def bare_forward_ms(model_dir: Path, backend: str, candidates: int, threads: int, calls: int = 200) -> dict:
    """p50 / p99 ms of one ``candidates``-row forward through the service's scorer (no HTTP, no encoding)."""
    from mtrank.export.common import random_inputs
    from mtrank.serve.service import ScoringService

    torch.set_num_threads(threads)
    service = ScoringService(model_dir, backend, threads=threads)
    dense, sparse = random_inputs(service.model, candidates)
    times = []
    for _ in range(calls + 10):
        started = time.perf_counter()
        service.scorer(dense, sparse)
        times.append(time.perf_counter() - started)
    times = 1e3 * np.array(times[10:])
    return {"threads": threads, "p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


def reference_answers(model_dir: Path, bodies: list[bytes], backend: str) -> list[np.ndarray]:
    """The one-at-a-time answer of each body: ``[N, K + 1]`` (task scores and the blended score)."""
    from mtrank.serve.schemas import ScoreRequest
    from mtrank.serve.service import ScoringService

    service = ScoringService(model_dir, backend)
    return [_score_matrix(service.answer(ScoreRequest.model_validate(json.loads(b)))) for b in bodies]


def _score_matrix(answer: dict) -> np.ndarray:
    tasks = answer["tasks"]
    return np.array([[row[t] for t in tasks] + [b] for row, b in zip(answer["scores"], answer["blended"])])


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


async def post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> tuple[int, bytes]:
    """One ``POST /v1/score`` on a keep-alive HTTP/1.1 connection: (status, answer body)."""
    writer.write(
        b"POST /v1/score HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%b" % (len(body), body)
    )
    status = int((await reader.readline()).split(b" ", 2)[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def run_clients(port: int, bodies: list[bytes], clients: int, seconds: float) -> tuple[dict, dict]:
    """``clients`` connections posting for ``seconds``: the summary, and the first answer to each body."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    answers: dict[int, bytes] = {}
    deadline = time.perf_counter() + seconds

    async def client_loop(offset: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = offset
        try:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    status, answer = await post(reader, writer, bodies[i % len(bodies)])
                    key = str(status)
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as err:
                    key, status = type(err).__name__, 0
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                latencies.append(time.perf_counter() - started)
                statuses[key] = statuses.get(key, 0) + 1
                if status == 200 and i % len(bodies) not in answers:
                    answers[i % len(bodies)] = answer
                i += clients
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client_loop(k) for k in range(clients)))
    elapsed = time.perf_counter() - started
    ok = statuses.get("200", 0)
    lat = np.array(latencies) * 1e3
    summary = {
        "clients": clients,
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
        "load_average_1m_after": os.getloadavg()[0],
    }
    return summary, answers


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of process ``pid`` and its live children (the workers), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def start_server(model_dir: Path, options: list[str], max_body: int, candidates: int, log: Path):
    port = free_port()
    command = [sys.executable, "-m", "mtrank.cli", "serve", str(model_dir), "--port", str(port)]
    command += ["--max-body-bytes", str(max_body), "--max-candidates", str(max(1000, candidates)), *options]
    # stderr to a file: a pipe nobody reads would block the server once full (it logs unseen values)
    return port, subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("w")), command


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="client counts (default 1 8 32)")
    parser.add_argument("--seconds", type=float, default=20.0, help="per path and client count, at most 300")
    parser.add_argument("--candidates", type=int, default=100, help="candidates per request (default 100)")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS), help="server paths")
    parser.add_argument("--backend", default="auto", help="mtrank serve --backend (default auto)")
    parser.add_argument("--rounds", type=int, default=1, help="times each (path, clients) setting runs (default 1)")
    parser.add_argument("--quick", action="store_true", help="2 s per setting, 32 clients only (a smoke run)")
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "results" / "loadtest.json")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.clients = 2.0, [32]
    if not 0 < args.seconds <= 300:
        parser.error("--seconds: give a duration in (0, 300]")
    logging.getLogger("mtrank.serve.service").setLevel(logging.ERROR)  # unseen values, once per request
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="mtrank-loadtest-") as tmp:
        model_dir = Path(tmp) / "w2"
        encoder = build_model_dir(model_dir)
        bodies = request_bodies(64, args.candidates, max(encoder.vocab_sizes) - 1)
        stages = stage_times(model_dir, bodies[:16], args.backend)
        print("in-process ms per request: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()), flush=True)
        forward = [bare_forward_ms(model_dir, args.backend, args.candidates, t) for t in (1, 2)]
        print(f"bare forward of {args.candidates} candidates: {forward}", flush=True)
        reference = reference_answers(model_dir, bodies, args.backend)
        max_body = max(2_000_000, 2 * max(len(b) for b in bodies))
        servers = {
            name: start_server(
                model_dir,
                PATHS[name] + ["--backend", args.backend],
                max_body,
                args.candidates,
                Path(tmp) / f"{name}.log",
            )
            for name in args.paths
        }
        runs: list[dict] = []
        differences = dict.fromkeys(args.paths, 0.0)
        try:
            for name, (port, process, _) in servers.items():
                print(f"{name}: ready in {wait_ready(f'http://127.0.0.1:{port}', process):.1f} s", flush=True)
            settings = [(c, r) for c in args.clients for r in range(args.rounds)]
            for k, (clients, _) in enumerate(settings):
                order = args.paths[k % len(args.paths) :] + args.paths[: k % len(args.paths)]  # rotating
                for name in order:
                    cpu_before = cpu_seconds(servers[name][1].pid)
                    summary, answers = asyncio.run(run_clients(servers[name][0], bodies, clients, args.seconds))
                    # server CPU per answered request: what a request costs whatever else the machine runs
                    summary["server_cpu_ms_per_request"] = (
                        1e3 * (cpu_seconds(servers[name][1].pid) - cpu_before) / max(summary["ok"], 1)
                    )
                    for i, answer in answers.items():
                        got = _score_matrix(json.loads(answer))
                        differences[name] = max(differences[name], float(np.abs(got - reference[i]).max()))
                    runs.append({"path": name, **summary})
                    print(
                        f"{name:>9} {clients:>3} clients: {summary['requests_per_s']:7.1f} req/s, p50 "
                        f"{summary['p50_ms']:6.1f} ms, p99 {summary['p99_ms']:6.1f} ms, errors {summary['errors']}, "
                        f"server CPU {summary['server_cpu_ms_per_request']:.2f} ms/request",
                        flush=True,
                    )
            readiness = {
                name: httpx.get(f"http://127.0.0.1:{port}/readyz").json() for name, (port, _, _) in servers.items()
            }
        finally:
            for _, process, _ in servers.values():
                process.terminate()
            for _, process, _ in servers.values():
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    result = {
        "candidates_per_request": args.candidates,
        "seconds_per_setting": args.seconds,
        "backend": args.backend,
        "paths": {name: " ".join(["mtrank serve MODEL_DIR", *PATHS[name]]) for name in args.paths},
        "runs": runs,
        "max_abs_score_difference": differences,
        "bare_forward_ms": forward,
        "stage_ms": stages,
        "requests_per_pass": {name: r.get("requests_per_pass") for name, r in readiness.items()},
        "request_bytes_mean": float(np.mean([len(b) for b in bodies])),
        "load_average_1m_before": load_before,
        "load_average_1m_after": os.getloadavg()[0],
        "cores": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "command": "python benchmarks/loadtest.py " + " ".join(sys.argv[1:]),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"largest score difference to the one-at-a-time answer: {differences}")
    print(f"wrote {args.json}")
    return 0 if all(r["errors"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
