"""The one runner of the production studies: arms x seeds -> ``results.json``, ``results.md`` (a table of
mean ± std per arm and the paired differences with 95% intervals) and the study's figure.

A study (:class:`Study`) names its arms, the metrics it reports, the pairs of arms it compares, and how one
(arm, seed) runs; the runner does the rest the same way for every study:

* every arm runs with the same seeds (seed ``s`` draws the same data for every arm), so arm A's run ``s`` and
  arm B's run ``s`` are a pair;
* per arm and metric: :func:`mtrank.stats.summarize` (mean, std, ...) over the seeds;
* per compared pair and metric: :func:`mtrank.stats.paired_bootstrap` of ``A - B`` (95%), beside a paired
  Student-t interval; the verdict is decided on the wider of the two, because a percentile bootstrap over
  fewer than :data:`mtrank.stats.MIN_PAIRS` pairs undercovers. "not resolvable" where it spans 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats
from tqdm.auto import tqdm

from mtrank.evaluate.report import markdown_table
from mtrank.experiments.common import write_results
from mtrank.stats import MIN_PAIRS, paired_bootstrap, summarize


@dataclass(frozen=True)
class Metric:
    """A number each run reports: ``key`` in the run's ``metrics``, a label for tables, and its direction."""

    key: str
    label: str
    higher_is_better: bool = True


@dataclass
class Study:
    """A production study: what the runner needs to run it and report it.

    Args:
        name: the command's name (``mtrank study NAME``).
        title: the report's heading.
        setting: ``setting(quick) -> dataclass`` of sizes (``quick``: seconds, for the tests).
        arms: ``arms(setting) -> [arm, ...]``.
        comparisons: ``comparisons(setting) -> [(A, B), ...]``: differences ``A - B`` to report.
        metrics: the metrics every run reports.
        run: ``run(setting, arm, seed) -> {"metrics": {key: float}, ...}`` (anything else is kept in
            ``results.json`` under the run, e.g. curves for the figure).
        figure: ``figure(results, path)`` draws ``path`` (a png) from the results.
        notes: ``notes(setting) -> str``: what ran, in words, above the table.
    """

    name: str
    title: str
    setting: Callable[[bool], Any]
    arms: Callable[[Any], list[str]]
    comparisons: Callable[[Any], list[tuple[str, str]]]
    metrics: list[Metric]
    run: Callable[[Any, str, int], dict]
    figure: Callable[[dict, Path], None]
    notes: Callable[[Any], str] = field(default=lambda setting: "")


def paired_difference(a: list[float], b: list[float], higher_is_better: bool, names: tuple[str, str]) -> dict:
    """``A - B`` over paired runs: the 95% paired bootstrap, a paired t interval, and the verdict on the wider."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    boot = paired_bootstrap(a, b, n_boot=10_000, seed=0)
    n = diff.size
    half = float(scipy_stats.t.ppf(0.975, n - 1) * diff.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    t_low, t_high = float(diff.mean()) - half, float(diff.mean()) + half
    low, high = min(boot["low"], t_low), max(boot["high"], t_high)
    better, worse = names if higher_is_better else names[::-1]
    if low > 0:
        decision = f"{better} better"
    elif high < 0:
        decision = f"{worse} better"
    else:
        decision = "not resolvable"
    return {
        "estimate": float(diff.mean()),
        "bootstrap": [boot["low"], boot["high"]],
        "t_interval": [t_low, t_high],
        "low": low,
        "high": high,
        "n": n,
        "undercovered_bootstrap": n < MIN_PAIRS,
        "verdict": decision,
    }


def run_study(study: Study, out: Path, quick: bool = False, seeds: int = 5, progress: bool = True, **overrides) -> dict:
    """Run every arm of ``study`` with seeds ``0..seeds-1``; write ``out/results.json``, ``results.md`` and
    ``out/<name>.png``; return the results (with the report under ``markdown``). ``overrides``: setting fields
    (e.g. ``device="cuda"``) replaced before running."""
    if seeds < 2:
        raise ValueError(f"study {study.name}: --seeds must be >= 2 for a std and a paired interval, got {seeds}")
    setting = study.setting(quick)
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(setting)})
    if unknown:
        raise ValueError(f"study {study.name}: the setting has no field {unknown[0]!r}")
    setting = dataclasses.replace(setting, **overrides)
    out.mkdir(parents=True, exist_ok=True)
    arms = study.arms(setting)
    started = time.perf_counter()
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    with tqdm(total=len(arms) * seeds, desc=f"study {study.name}", disable=not progress) as bar:
        for seed in range(seeds):
            for arm in arms:
                bar.set_postfix_str(f"{arm} seed {seed}")
                runs[arm].append(study.run(setting, arm, seed))
                bar.update()
    values = {arm: {m.key: [r["metrics"][m.key] for r in runs[arm]] for m in study.metrics} for arm in arms}
    summary = {arm: {m.key: summarize(values[arm][m.key], collapse_below=None) for m in study.metrics} for arm in arms}
    differences = [
        {
            "a": a,
            "b": b,
            "metric": m.key,
            **paired_difference(values[a][m.key], values[b][m.key], m.higher_is_better, (a, b)),
        }
        for a, b in study.comparisons(setting)
        for m in study.metrics
    ]
    results = {
        "study": study.name,
        "quick": quick,
        "setting": dataclasses.asdict(setting),
        "seeds": list(range(seeds)),
        "arms": arms,
        "metrics": [dataclasses.asdict(m) for m in study.metrics],
        "runs": runs,
        "summary": summary,
        "differences": differences,
        "seconds": time.perf_counter() - started,
    }
    figure = out / f"{study.name}.png"
    study.figure(results, figure)
    return write_results(out, results, report(study, results, setting, figure.name))


def number(value: float, sign: str = "") -> str:
    """4 decimals; thousands separators from 1,000; two significant digits below 0.001 (a change of 3e-06
    should not read as 0.0000)."""
    if abs(value) >= 1000:
        return f"{value:{sign},.0f}"
    if 0 < abs(value) < 1e-3:
        return f"{value:{sign}.1e}"
    return f"{value:{sign}.4f}"


def rewrite_study(study: Study, out: Path) -> dict:
    """``results.md`` and the figure of ``out/results.json`` again, from the numbers (no training)."""
    results = json.loads((Path(out) / "results.json").read_text())
    base = study.setting(results["quick"])
    setting = dataclasses.replace(base, **{k: _frozen(v) for k, v in results["setting"].items()})
    figure = Path(out) / f"{study.name}.png"
    study.figure(results, figure)
    return write_results(Path(out), results, report(study, results, setting, figure.name))


def _frozen(value: Any) -> Any:
    """JSON lists back to the tuples a setting holds."""
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def mean_std_cell(summary: dict) -> str:
    """``mean ± std``: 4 decimals, or thousands separators for large counts (parameters, FLOPs)."""
    return f"{number(summary['mean'])} ± {number(summary['std'])}"


def report(study: Study, results: dict, setting: Any, figure: str) -> str:
    """``results.md``: what ran, the table of mean ± std, the paired differences, the figure."""
    metrics = study.metrics
    rows = [
        [
            arm,
            *(mean_std_cell(results["summary"][arm][m.key]) for m in metrics),
        ]
        for arm in results["arms"]
    ]
    table = markdown_table(["arm", *(m.label + (" ↑" if m.higher_is_better else " ↓") for m in metrics)], rows)
    labels = {m.key: m.label for m in metrics}
    diff_rows = [
        [
            f"{d['a']} − {d['b']}",
            labels[d["metric"]],
            number(d["estimate"], "+"),
            f"[{number(d['low'], '+')}, {number(d['high'], '+')}]",
            d["verdict"],
        ]
        for d in results["differences"]
    ]
    diffs = markdown_table(["pair (A − B)", "metric", "mean difference", "95% interval", "verdict"], diff_rows)
    n = len(results["seeds"])
    return (
        f"# {study.title}\n\n{study.notes(setting)}\n\n"
        f"Seeds 0..{n - 1} ({n} runs per arm; every arm sees the same data draw for a seed). "
        f"Setting: `{results['setting']}`. Wall time {results['seconds']:.0f} s.\n\n"
        f"## Mean ± std over {n} seeds\n\n{table}\n\n"
        f"## Paired differences\n\nInterval: the wider of the 95% paired bootstrap (10,000 resamples) and the paired "
        f"t interval{' (fewer than 10 pairs: the bootstrap alone undercovers)' if n < MIN_PAIRS else ''}; "
        f'"not resolvable" where it spans 0.\n\n{diffs}\n\n![{study.name}]({figure})\n'
    )
