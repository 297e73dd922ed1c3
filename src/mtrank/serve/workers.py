"""Several server processes on one listening socket: ``mtrank serve --workers N``.

The parent opens the model directory once (weights verified and in memory), binds the socket, then forks N
workers. Each worker starts its own scorer (:meth:`ScoringService.start`: onnxruntime sessions and OpenMP
thread pools do not survive a fork), warms up and serves on the inherited socket; the kernel hands each new
connection to one worker that is accepting, so a worker still warming up takes none. The model's weights stay
shared between the workers copy-on-write for the PyTorch backends (eager, compile, TorchScript); onnxruntime
copies them into each worker's session.

Why processes: a request spends most of its time in Python (JSON, validation, encoding) under the GIL, so one
process keeps one core busy however many threads it has; with N workers the Python work of N requests runs at
once (measured in docs/serving.md). Each worker keeps its own Prometheus counters: ``/metrics`` shows those of
the worker that answered.

The parent forwards SIGTERM / SIGINT to the workers and waits for them; when a worker dies on its own, the
parent stops the others and exits 1, so the process supervisor sees the failure and restarts the service.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def run_workers(
    build_app: Callable[[], Any],
    host: str,
    port: int,
    workers: int,
    **uvicorn_options: Any,
) -> int:
    """Serve ``build_app()`` (called once in each worker, after the fork) from ``workers`` processes on
    ``host:port``; returns the exit status (0 after a requested stop, 1 when a worker died on its own).

    ``uvicorn_options`` go to :class:`uvicorn.Config` (log level, access log, HTTP and loop implementations).
    """
    import uvicorn

    if workers < 1:
        raise ValueError(f"--workers: {workers}; give at least 1")
    if workers == 1:
        uvicorn.run(build_app(), host=host, port=port, **uvicorn_options)
        return 0
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(2048)
    listener.set_inheritable(True)
    gc.freeze()  # objects made so far are never collected: the GC does not write to (and so copy) shared pages
    children: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # the worker: serve until SIGTERM, then leave without running the parent's exit handlers
            code = 1
            try:
                uvicorn.Server(uvicorn.Config(build_app(), **uvicorn_options)).run(sockets=[listener])
                code = 0
            except BaseException:
                log.exception("worker %d failed", os.getpid())
            finally:
                os._exit(code)
        children.append(pid)
    listener.close()
    stopping = False

    def stop(signum: int = signal.SIGTERM, frame: Any = None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            with contextlib.suppress(ProcessLookupError):  # already gone
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    status = 0
    while children:
        pid, wait_status = os.wait()
        children.remove(pid)
        code = os.waitstatus_to_exitcode(wait_status)
        if not stopping:
            log.error("mtrank serve: worker %d exited with code %d; stopping the other workers", pid, code)
            status = 1
            stop()
    return status
