"""The model zoo's config snippets, read from docs/model-zoo.md (the snippets the docs show are the ones
benchmarked and tested): every fenced ``yaml`` block whose first line is ``# zoo: <name>``."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "model-zoo.md"


def zoo_snippets(path: Path = DOC) -> dict[str, dict]:
    """``{name: model section}`` in the order of the document."""
    out = {}
    for block in re.findall(r"```yaml\n(.*?)```", path.read_text(), re.S):
        first = block.splitlines()[0]
        if first.startswith("# zoo: "):
            out[first.removeprefix("# zoo: ").strip()] = yaml.safe_load(block)["model"]
    return out
