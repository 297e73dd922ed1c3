"""``mtrank serve``: the HTTP scoring service of a model directory."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from mtrank.cli.common import add_command


def _cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from mtrank.blend.rules import Blend
    from mtrank.serve.app import create_app
    from mtrank.serve.service import ScoringService
    from mtrank.serve.workers import run_workers

    if args.legacy_path:  # the request path before issue 10, kept to measure against (docs/serving.md)
        args.codec, args.workers, http, loop = "json", 1, "h11", "asyncio"
    else:
        http, loop = "auto", "auto"  # httptools and uvloop where installed (the serve extra)
    threads = args.torch_threads or (max(1, (os.cpu_count() or 1) // args.workers) if args.workers > 1 else 0)
    service = ScoringService(
        args.model_dir,
        args.backend,
        args.precision,
        threads=threads,
        max_candidates=args.max_candidates,
        learned_blend=not (args.no_learned_blend or args.blend),  # an explicit --blend wins over a learned one
        start=False,
        batch_encoding=not args.legacy_path,
    )
    if args.blend:
        service.blend = Blend.from_dict(json.loads(Path(args.blend).read_text()), service.task_names)

    def build_app():  # in each worker process (after the fork when --workers > 1)
        if threads:
            torch.set_num_threads(threads)
        service.start()
        return create_app(
            service, max_body_bytes=args.max_body_bytes, body_timeout_s=args.body_timeout, codec=args.codec
        )

    print(
        f"mtrank serve: {args.model_dir} ({service.backend}/{service.precision}, tasks {service.task_names}, "
        f"{args.workers} worker(s), codec {args.codec}) on http://{args.host}:{args.port}  "
        "(docs: /docs, metrics: /metrics)",
        flush=True,
    )
    options = {"log_level": args.log_level, "access_log": args.access_log, "http": http, "loop": loop}
    return run_workers(build_app, args.host, args.port, args.workers, **options)


def register(subparsers) -> None:
    """Add ``mtrank serve``."""
    from mtrank.serve.limits import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CANDIDATES

    p = add_command(
        subparsers,
        "serve",
        _cmd_serve,
        help="HTTP scoring service for a model directory (FastAPI + uvicorn)",
        description=(
            "Serve MODEL_DIR over HTTP. POST /v1/score takes {'context': {...}, 'candidates': [{...}, ...]} "
            "(raw feature values by name when the directory has encoders.json; else each candidate is "
            "{'dense': [...], 'sparse': [...]}) and returns per-task scores, the blended score and the ranking. "
            "GET /healthz, /readyz, /metrics (Prometheus), /docs (OpenAPI). The blend comes from --blend, else "
            "MODEL_DIR/learned_blend.json, else MODEL_DIR/blend.json, else equal weights; a request may override "
            "it. Binds to 127.0.0.1 unless --host says otherwise."
        ),
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a model directory written by mtrank")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "eager", "compile", "torchscript", "onnx", "aoti"],
        help="inference path; auto (default): onnxruntime for fp32/int8 on CPU (the fastest exact path "
        "measured in docs/serving.md), TorchScript for bf16/mixed; aoti: torch.export + AOTInductor, "
        "MODEL_DIR/export/model.pt2 from 'mtrank export --format aoti' (else compiled at start)",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "mixed", "int8"],
        help="fp32 (default); bf16 (whole model); mixed (expert bank in bf16 with a split input, the rest "
        "fp32); int8 (eager or onnx backend, CPU). docs/serving.md has latency and score changes of each",
    )
    p.add_argument(
        "--blend",
        help="a blend JSON file: {'method': ..., 'weights': {task: w}, 'transforms': {...}} (default: the model "
        "directory's learned_blend.json, else its blend.json, else equal weights)",
    )
    p.add_argument(
        "--no-learned-blend",
        action="store_true",
        help="ignore MODEL_DIR/learned_blend.json (from 'mtrank blend fit-learned')",
    )
    p.add_argument(
        "--max-candidates",
        type=int,
        default=DEFAULT_MAX_CANDIDATES,
        help=f"most candidates per request (default {DEFAULT_MAX_CANDIDATES})",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"largest request body in bytes (default {DEFAULT_MAX_BODY_BYTES})",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=DEFAULT_BODY_TIMEOUT_S,
        help=f"seconds to receive a request body before answering 408 (default {DEFAULT_BODY_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="intra-op threads of each worker (default: the library default; with --workers N, cores / N)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes on one socket, forked after the model directory is loaded (default 1); "
        "a request's Python work (JSON, validation, encoding) holds one core, so N workers use N cores",
    )
    p.add_argument(
        "--codec",
        default="orjson",
        choices=["orjson", "json"],
        help="request/response JSON: orjson (default, same answers) or the standard library",
    )
    p.add_argument(
        "--legacy-path",
        action="store_true",
        help="the request path before the throughput work (stdlib JSON, pydantic response validation, h11 + "
        "asyncio, one process, each request encoded alone), kept to measure against; overrides --codec and --workers",
    )
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action="store_true", help="log every request")
