"""The production studies (issue 12): one module per study, each a :class:`~.runner.Study` named ``STUDY``,
all run by :func:`~.runner.run_study` (``mtrank study NAME``)."""

from __future__ import annotations

import difflib
import importlib

from mtrank.experiments.studies.runner import Study

STUDIES = {
    "gate-polarization": "gate_polarization",
    "position-bias": "position_bias",
    "infra-cost": "infra_cost",
    "score-stability": "score_stability",
    "distill-retention": "distill_retention",
    "blending": "blending",
    "summarization": "summarization",
}


def get_study(name: str) -> Study:
    """The study called ``name``; an unknown name is a one-line error listing the studies."""
    if name not in STUDIES:
        close = difflib.get_close_matches(name, list(STUDIES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"study: unknown study {name!r}{hint}; choose one of {sorted(STUDIES)}")
    return importlib.import_module(f"mtrank.experiments.studies.{STUDIES[name]}").STUDY
