"""Shared by the tests and the docstring examples (``pytest --doctest-modules src``)."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent


def shared_data_path() -> Path:
    """The shared data folder: $MTRANK_SHARED_DATA, else ../shared/data beside the repo."""
    return Path(os.environ.get("MTRANK_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    """Names docstring examples may use: ``shared_data`` (the data folder)."""
    doctest_namespace["shared_data"] = shared_data_path()
