"""Every example in README.md runs as written, from the repository's root, in the README's order: the shell
commands (train, evaluate, predict, export, torchrun), the service with the curl and Python client examples
against it, and the Python blocks (the API example twice: it must print the same numbers). The command-line
synopsis has placeholders: each command it names must answer --help."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", (REPO / "README.md").read_text(), re.S)
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "TQDM_DISABLE": "1"}


def kind(language: str, code: str) -> str:
    if language == "python":
        return "client" if "httpx" in code else "python"
    if code.startswith("make "):
        return "setup"  # the README's two set-up commands: what CI runs to get here
    if "MODEL_DIR" in code:
        return "synopsis"
    if code.startswith("mtrank serve"):
        return "server"
    return "curl" if code.startswith("curl") else "shell"


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600, **kwargs)


def wait_ready(port: int, server: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, server.stderr.read()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("the README's server did not become ready")


def test_the_readme_has_the_examples_this_test_runs():
    kinds = [kind(language, code) for language, code in BLOCKS]
    assert kinds.count("setup") == 1 and kinds.count("server") == 1 and kinds.count("synopsis") == 1
    assert {"shell", "curl", "client", "python"} <= set(kinds)


@pytest.mark.slow
def test_every_readme_example_runs_as_written():
    server = None
    try:
        for language, code in BLOCKS:
            what = kind(language, code)
            if what == "setup":
                continue
            if what == "synopsis":
                for command in sorted(set(re.findall(r"^mtrank (\w+)", code, re.M))):
                    assert run(["mtrank", command, "--help"]).returncode == 0, command
            elif what == "server":
                port = int(re.search(r"--port (\d+)", code).group(1))
                server = subprocess.Popen(
                    ["bash", "-c", f"exec {code.strip()}"],
                    cwd=REPO,
                    env=ENV,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                    start_new_session=True,
                )
                wait_ready(port, server)
            elif what == "curl":
                done = run(["bash", "-euo", "pipefail", "-c", code])
                assert done.returncode == 0, done.stderr
                body = json.loads(done.stdout)
                assert sorted(body["ranking"]) == [0, 1] and body["blend"]["method"] == "weighted_product"
            elif what == "shell":
                done = run(["bash", "-euo", "pipefail", "-c", code])
                assert done.returncode == 0, f"{code}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            else:
                outputs = [run([sys.executable, "-c", code]) for _ in range(2 if what == "python" else 1)]
                for done in outputs:
                    assert done.returncode == 0, f"{code}\n{done.stderr[-3000:]}"
                assert outputs[0].stdout and outputs[0].stdout == outputs[-1].stdout  # the same numbers each run
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
