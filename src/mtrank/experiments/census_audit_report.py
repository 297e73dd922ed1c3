"""Statistics, verdicts, tables and figures of the census audit (:mod:`mtrank.experiments.census_audit`).

Every comparison is MMoE minus another method on the same task, over the same runs: run (k, s) of both is on
split k with seed s. Its uncertainty has two parts, added as variances:

* **runs** (initialisation, batch order, early stopping): a paired bootstrap of the mean difference over the
  (split, seed) pairs, resampled within each split (:func:`mtrank.stats.paired_bootstrap`);
* **rows** (which rows the test half holds): DeLong's variance of the difference of the two methods' mean AUCs
  on each split's test rows (:func:`mtrank.stats.delong_from_components`), averaged over the splits, which
  counts the splits' test halves as if they were the same rows (they share about half their rows), so errs
  wide.

The comparisons that decide the paper's claims form one family, corrected by Holm
(:func:`mtrank.stats.holm_intervals`); the auxiliary task's comparisons and the ablation's are two further
families. A claim is "reproduced" when every comparison it needs is resolved in its favour, "not reproduced"
when one is resolved against it, and otherwise "not resolvable at this sample size".
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from mtrank.evaluate.report import _pyplot, markdown_table, plot_runs
from mtrank.experiments.census import PAPER_TABLES
from mtrank.experiments.census_audit import AuditConfig, final_jobs, job_name, load_components, search_jobs
from mtrank.experiments.common import MODEL_LABELS, write_results
from mtrank.stats import (
    AucComponents,
    bootstrap_interval,
    delong_from_components,
    holm_intervals,
    mann_whitney,
    paired_bootstrap,
    summarize,
    verdict,
)

BASELINES = ("single_task", "shared_bottom", "omoe")
VARIANTS = {"full": "all 38 inputs", "noleak": "without the household columns", "matched": "matched parameters"}


def _read(parts: Path, job: dict) -> dict:
    return json.loads((parts / f"{job_name(job)}.json").read_text())


def load_runs(cfg: AuditConfig, parts: Path) -> dict:
    """``runs[(group, variant, method)]``: per task ``auc`` and ``valid`` ``[K, N]`` (split k, seed s), the
    mean DeLong ``components`` per split, and the method's parameter count and training facts. Single-task's
    two models are joined (its parameters are their sum)."""
    runs: dict = {}
    for job in final_jobs(cfg):  # by split, so each task's rows come in split order
        part, arrays = _read(parts, job), load_components(parts, job)
        key, k = (job["group"], job["variant"], job["method"]), job["split"]
        entry = runs.setdefault(key, {"params_count": 0, "params": {}, "tasks": {}, "training": []})
        if k == 0:
            entry["params_count"] += part["params_count"]
            entry["params"][part["tasks"][0] if job["task"] is not None else "all"] = part["params"]
        split = part["splits"][str(k)]
        valid = {m["seed"]: m["valid"] for m in part["members"]}
        for task in part["tasks"]:
            positive = arrays[f"{k}/components/{task}/positive"].astype(np.float64)
            negative = arrays[f"{k}/components/{task}/negative"].astype(np.float64)
            entry["tasks"].setdefault(task, {"auc": [], "valid": [], "components": {}})
            entry["tasks"][task]["auc"].append(split[f"auc/{task}"])
            entry["tasks"][task]["valid"].append([valid[s][f"auc/{task}"] for s in split["seeds"]])
            entry["tasks"][task]["components"][k] = AucComponents(np.asarray(positive.mean()), positive, negative)
        last = part["total_steps"] - part["eval_every"]  # a best step in the last two evaluations: censored
        entry["training"] += [
            {"censored": m["best_step"] >= last, "stopped_early": m["stopped_early"], "epochs": m["epochs"]}
            for m in part["members"]
        ]
    for entry in runs.values():
        for task in entry["tasks"].values():
            task["auc"], task["valid"] = np.array(task["auc"]), np.array(task["valid"])
    return runs


def compare(a: dict, b: dict, n_boot: int, seed: int = 0) -> dict:
    """MMoE-style comparison of one task's runs ``a`` minus ``b`` (see the module docstring)."""
    runs = min(a["auc"].shape[1], b["auc"].shape[1])
    x, y = a["auc"][:, :runs], b["auc"][:, :runs]
    strata = np.repeat(np.arange(x.shape[0]), runs)
    boot = paired_bootstrap(x.ravel(), y.ravel(), strata=strata, n_boot=n_boot, seed=seed)
    median = paired_bootstrap(x.ravel(), y.ravel(), "median", strata=strata, n_boot=n_boot, seed=seed)
    trimmed = paired_bootstrap(x.ravel(), y.ravel(), "trimmed_mean", strata=strata, n_boot=n_boot, seed=seed)
    rows = [delong_from_components(a["components"][k], b["components"][k]) for k in sorted(a["components"])]
    se_rows = math.sqrt(np.mean([r["se"] ** 2 for r in rows]))
    return {
        "estimate": boot["estimate"],
        "se_runs": boot["se"],
        "runs_interval": [boot["low"], boot["high"]],
        "se_rows": se_rows,
        "se": math.sqrt(boot["se"] ** 2 + se_rows**2),
        "median_diff": median["estimate"],
        "median_interval": [median["low"], median["high"]],
        "trimmed_diff": trimmed["estimate"],
        "trimmed_interval": [trimmed["low"], trimmed["high"]],
        "mann_whitney_p": mann_whitney(x.ravel(), y.ravel())["p"],
        "pairs": int(x.size),
    }


def level(a: dict, reference: float, n_boot: int) -> dict:
    """Mean AUC of runs ``a`` minus a published ``reference``: bootstrap over runs plus DeLong's row variance."""
    strata = np.repeat(np.arange(a["auc"].shape[0]), a["auc"].shape[1])
    boot = bootstrap_interval(a["auc"].ravel(), strata=strata, n_boot=n_boot)
    se_rows = math.sqrt(np.mean([float(c.variance()) for c in a["components"].values()]))
    return {
        "estimate": boot["estimate"] - reference,
        "se_runs": boot["se"],
        "runs_interval": [boot["low"] - reference, boot["high"] - reference],
        "se_rows": se_rows,
        "se": math.sqrt(boot["se"] ** 2 + se_rows**2),
        "pairs": int(a["auc"].size),
    }


def decide(family: list[dict]) -> list[dict]:
    """Holm over the family; each comparison gets ``p``, ``p_holm``, its Holm-consistent ``low``/``high`` and a
    ``verdict``."""
    tests = holm_intervals([c["estimate"] for c in family], [c["se"] for c in family])
    for c, t in zip(family, tests):
        c.update(p=t["p"], p_holm=t["p_holm"], low=t["low"], high=t["high"], level=t["level"])
        c["verdict"] = verdict(t, c["a"], c["b"])
    return family


def analyse(cfg: AuditConfig, parts: Path) -> dict:
    """Every number of the report: searches, run summaries, the three families of comparisons, the claims."""
    runs = load_runs(cfg, parts)
    searches = {}
    for job in search_jobs(cfg):
        part = _read(parts, job)
        searches[job_name(job)] = {
            k: part[k] for k in ("method", "task", "best", "space", "checks", "limits", "widened")
        } | {"trials": len(part["trials"]), "values": [t["value"] for t in part["trials"]]}
        searches[job_name(job)]["params_tried"] = [t["params"] for t in part["trials"]]
    tables: dict = {}
    primary, auxiliary, ablation, leak = [], [], [], []
    for (group, variant, method), entry in runs.items():
        for task, r in entry["tasks"].items():
            summary = summarize(r["auc"].ravel(), cfg.collapse_below)
            best = np.unravel_index(np.argmax(r["valid"][0]), r["valid"][0].shape)[0]  # split 0: the paper's
            censored = np.mean([t["censored"] for t in entry["training"]])
            tables.setdefault(f"{group}/{variant}", {}).setdefault(task, {})[method] = {
                **summary,
                "split0_mean": float(r["auc"][0].mean()),
                "best_run": float(r["auc"][0][best]),
                "params_count": entry["params_count"],
                "censored": float(censored),
                "stopped_early": float(np.mean([t["stopped_early"] for t in entry["training"]])),
                "epochs": float(np.mean([t["epochs"] for t in entry["training"]])),
            }
    for group in cfg.groups:
        main, other = list(runs[group, "full", "mmoe"]["tasks"])
        mmoe = runs[group, "full", "mmoe"]["tasks"]
        for variant, family_main, family_other in (("full", primary, auxiliary), ("noleak", ablation, ablation)):
            if (group, variant, "mmoe") not in runs:
                continue
            mine = runs[group, variant, "mmoe"]["tasks"]
            for baseline in BASELINES:
                if (group, variant, baseline) not in runs:
                    continue
                theirs = runs[group, variant, baseline]["tasks"]
                for task, family in ((main, family_main), (other, family_other)):
                    c = compare(mine[task], theirs[task], cfg.n_boot)
                    family.append({**c, "group": group, "variant": variant, "task": task, "baseline": baseline})
        if (group, "matched", "shared_bottom") in runs:
            c = compare(mmoe[main], runs[group, "matched", "shared_bottom"]["tasks"][main], cfg.n_boot)
            primary.append({**c, "group": group, "variant": "matched", "task": main, "baseline": "shared_bottom"})
        paper = PAPER_TABLES[group]["mmoe"][1]
        primary.append(
            {**level(mmoe[main], paper, cfg.n_boot), "group": group, "variant": "paper", "task": main, "baseline": ""}
        )
        for method in cfg.methods:
            if (group, "noleak", method) in runs:
                full, cut = runs[group, "full", method]["tasks"], runs[group, "noleak", method]["tasks"]
                for task in (other, main):
                    c = compare(full[task], cut[task], cfg.n_boot)
                    leak.append({**c, "group": group, "variant": "leak", "task": task, "baseline": method})
    for family in (primary, auxiliary, ablation, leak):
        for c in family:
            c["a"], c["b"] = _names(c)
        if family:
            decide(family)
    return {
        "searches": searches,
        "tables": tables,
        "comparisons": {"primary": primary, "auxiliary": auxiliary, "ablation": ablation, "leak": leak},
        "claims": claims(cfg, primary, tables),
    }


def _names(c: dict) -> tuple[str, str]:
    if c["variant"] == "paper":
        return "MMoE", "the paper's mean"
    if c["variant"] == "leak":
        return "with the household columns", "without them"
    suffix = " (matched parameters)" if c["variant"] == "matched" else ""
    return "MMoE", MODEL_LABELS[c["baseline"]] + suffix


def claims(cfg: AuditConfig, primary: list[dict], tables: dict) -> list[dict]:
    """The paper's claims on census that the audit can decide, each with its verdict and deciding comparisons."""
    out = []
    for group in cfg.groups:
        versus = [c for c in primary if c["group"] == group and c["variant"] == "full"]
        if not versus:
            continue
        task = versus[0]["task"]
        lost = [c for c in versus if c["verdict"] == c["b"] + " better"]
        won = [c for c in versus if c["verdict"] == "MMoE better"]
        status = "reproduced" if len(won) == len(versus) else "not reproduced" if lost else "not resolvable"
        out.append(
            {
                "claim": f"Table {group}: MMoE has the highest mean {task} AUC of the paper's four methods",
                "status": status,
                "comparisons": versus,
            }
        )
        for variant, text in (
            ("matched", f"MMoE beats Shared-Bottom on {task} AUC at the same parameter count (the issue's check)"),
            ("paper", f"MMoE's mean {task} AUC reaches the paper's {PAPER_TABLES[group]['mmoe'][1]}"),
        ):
            found = [c for c in primary if c["group"] == group and c["variant"] == variant]
            if found:
                resolved = found[0]["verdict"]
                status = (
                    "reproduced"
                    if resolved == found[0]["a"] + " better"
                    else "not reproduced"
                    if resolved == found[0]["b"] + " better"
                    else "not resolvable"
                )
                out.append({"claim": text, "status": status, "comparisons": found})
    return out


# ---------------------------------------------------------------------------------------------- report


def _f(x: float, digits: int = 4) -> str:
    return f"{x:+.{digits}f}" if x else f"{x:.{digits}f}"


def _interval(low: float, high: float, digits: int = 4) -> str:
    return f"[{low:+.{digits}f}, {high:+.{digits}f}]"


def comparison_rows(family: list[dict]) -> list[list[str]]:
    rows = []
    for c in family:
        what = f"{c['a']} − {c['b']}" if c["variant"] not in ("paper", "leak") else c["a"]
        if c["variant"] == "leak":
            what = f"{MODEL_LABELS[c['baseline']]}: all inputs − without household columns"
        if c["variant"] == "paper":
            what = f"MMoE mean − paper's {PAPER_TABLES[c['group']]['mmoe'][1]}"
        rows.append(
            [
                str(c["group"]),
                c["task"],
                what,
                _f(c["estimate"]),
                _interval(*c["runs_interval"]),
                f"{c['se_runs']:.4f}",
                f"{c['se_rows']:.4f}",
                _interval(c["low"], c["high"]),
                f"{c['p_holm']:.3g}",
                f"**{c['verdict']}**",
                _f(c["median_diff"]) if "median_diff" in c else "-",
                f"{c['mann_whitney_p']:.3g}" if "mann_whitney_p" in c else "-",
            ]
        )
    return rows


COMPARISON_HEADER = [
    "group",
    "task",
    "comparison",
    "mean diff",
    "95% runs only",
    "SE runs",
    "SE rows",
    "Holm-adjusted interval (runs + rows)",
    "p (Holm)",
    "verdict",
    "median diff",
    "Mann-Whitney p",
]


def runs_table(table: dict, group: int, variant: str, collapse_below: float) -> str:
    rows = []
    for task, methods in table.items():
        for method, s in methods.items():
            paper = PAPER_TABLES[group].get(method)
            column = 1 if task != "marital" else 2
            rows.append(
                [
                    task,
                    MODEL_LABELS[method],
                    f"{s['params_count']:,}",
                    str(s["n"]),
                    f"{s['mean']:.4f} ± {s['se']:.4f}",
                    f"{s['median']:.4f}",
                    f"{s['trimmed_mean']:.4f}",
                    f"{s['std']:.4f}",
                    f"{s['min']:.4f}",
                    f"{s['collapses']} ({s['collapse_rate']:.1%})",
                    f"{s['split0_mean']:.4f}",
                    f"{s['best_run']:.4f}",
                    f"{paper[column]:.4f}" if paper and variant == "full" else "-",
                ]
            )
    header = [
        "task",
        "method",
        "params",
        "runs",
        "mean ± SE",
        "median",
        "trimmed mean (10%)",
        "std",
        "worst",
        f"collapsed (AUC < {collapse_below:g})",
        "mean, split 0",
        "best run, split 0",
        "paper mean",
    ]
    return markdown_table(header, rows)


def search_table(searches: dict) -> str:
    rows = []
    for name, s in searches.items():
        group = name.split("-")[1][1:]
        best = s["best"]
        params = best["params"]
        checks = []
        for p, where in s["checks"].items():
            low, high = s["space"][p][:2]
            text = f"{p} {params[p]:.3g} in [{low:g}, {high:g}]: {where}"
            if where != "inside":
                text += " (a fixed limit)" if s["limits"].get(p) else " **(not inside)**"
            checks.append(text)
        widened = {k: v for k, v in s["widened"].items() if k != "none"}
        rows.append(
            [
                group,
                MODEL_LABELS[s["method"]] + (f" ({s['task']})" if s["method"] == "single_task" else ""),
                f"{params['lr']:.2e}",
                str(params["width"]),
                str(params.get("experts", "-")),
                f"{best['params_count']:,}",
                f"{best['value']:.4f}",
                str(s["trials"]),
                "; ".join(checks),
                ", ".join(f"{k} to {v}" for k, v in widened.items()) or "-",
            ]
        )
    header = [
        "group",
        "method",
        "lr",
        "width",
        "experts",
        "params",
        "valid AUC",
        "trials",
        "range check",
        "widened",
    ]
    return markdown_table(header, rows)


def training_table(tables: dict) -> str:
    rows = []
    for key, table in tables.items():
        group, variant = key.split("/")
        first = next(iter(table.values()))
        for method, s in first.items():
            rows.append(
                [
                    group,
                    VARIANTS[variant],
                    MODEL_LABELS[method],
                    f"{s['epochs']:.1f}",
                    f"{s['stopped_early']:.0%}",
                    f"{s['censored']:.0%}",
                ]
            )
    header = ["group", "inputs", "method", "epochs trained (mean)", "stopped early", "best step in last 2 evals"]
    return markdown_table(header, rows)


def censoring_note(tables: dict, max_epochs: int, share: float = 0.25) -> str:
    """Which run sets the epoch budget cut short: at least ``share`` of their runs had their best validation
    step in the budget's last two evaluations (still improving, or about to)."""
    cut = []
    for key, table in tables.items():
        group, variant = key.split("/")
        for method, s in next(iter(table.values())).items():
            if s["censored"] >= share:
                cut.append(f"group {group} {VARIANTS[variant]} {MODEL_LABELS[method]} ({s['censored']:.0%})")
    if not cut:
        return f"The {max_epochs}-epoch budget cut short fewer than {share:.0%} of the runs of every method."
    return (
        f"The {max_epochs}-epoch budget cut short at least {share:.0%} of the runs (best step in the last two "
        f"evaluations) of: {'; '.join(cut)}. Their numbers are what that budget gives, not the method's best."
    )


def leakage_section(leakage: dict) -> str:
    lines = []
    for group, rows in leakage.items():
        tasks = [k for k in rows[0] if k != "column"]
        top = sorted(rows, key=lambda r: -r["marital"])[:8]
        table = markdown_table(
            ["column", *[f"{t} AUC alone" for t in tasks]],
            [[r["column"], *[f"{r[t]:.4f}" for t in tasks]] for r in top],
        )
        lines.append(f"Group {group}, the 8 columns that predict marital status best on their own:\n\n{table}")
    return "\n\n".join(lines)


def plot_intervals(families: dict, path: Path) -> None:
    """A forest plot: each comparison's mean difference with its Holm-adjusted interval (runs + rows, thick)
    and its runs-only 95% bootstrap interval (thin)."""
    plt = _pyplot()
    panels = {k: v for k, v in families.items() if v}
    height = max(len(v) for v in panels.values())
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 0.9 + 0.32 * height), squeeze=False)
    for ax, (title, family) in zip(axes[0], panels.items()):
        for i, c in enumerate(family):
            y = len(family) - 1 - i
            ax.plot(c["runs_interval"], [y, y], color="0.6", lw=1)
            ax.plot([c["low"], c["high"]], [y, y], color="C0" if "better" in c["verdict"] else "C7", lw=3)
            ax.plot([c["estimate"]], [y], "o", color="black", ms=3)
        labels = [f"g{c['group']} {c['task']}: {c['a']} − {c['b']}" for c in family]
        ax.set_yticks(range(len(family)), labels[::-1], fontsize=7)
        ax.axvline(0, color="red", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("AUC difference")
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_searches(searches: dict, path: Path, floor: float = 0.01) -> None:
    """Every trial's validation AUC minus its search's best, against each searched value; one panel per
    (group, parameter), the chosen trial circled, each search's range as dashed lines; trials more than
    ``floor`` below their best are drawn on the lower edge."""
    plt = _pyplot()
    groups = sorted({name.split("-")[1] for name in searches})
    fig, axes = plt.subplots(len(groups), 3, figsize=(12, 3.2 * len(groups)), squeeze=False)
    for row, group in zip(axes, groups):
        mine = [s for name, s in searches.items() if name.split("-")[1] == group]
        for ax, param in zip(row, ("lr", "width", "experts")):
            for i, s in enumerate(mine):
                tried = [(t[param], v) for t, v in zip(s["params_tried"], s["values"]) if param in t]
                if not tried:
                    continue
                x, y = np.array(tried).T
                y = np.maximum(y - max(s["values"]), -floor)
                label = MODEL_LABELS[s["method"]] + (f" ({s['task']})" if s["method"] == "single_task" else "")
                ax.scatter(x, y, s=10, color=f"C{i}", label=label)
                ax.scatter([s["best"]["params"][param]], [0.0], s=60, facecolors="none", color=f"C{i}")
                for edge in s["space"][param][:2]:
                    ax.axvline(edge, color=f"C{i}", ls="--", lw=0.6)
            if param != "experts":
                ax.set_xscale("log")
            ax.set_title(f"group {group[1:]}: {param}", fontsize=9)
            ax.set_ylabel("valid AUC − search's best")
            ax.set_ylim(-floor * 1.05, floor * 0.1)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(cfg: AuditConfig, out: Path, leakage: dict, seconds: float) -> dict:
    """``out/results.json``, ``results.md``, ``census_auc.png``, ``intervals.png``, ``searches.png``."""
    parts = out / "parts"
    numbers = analyse(cfg, parts)
    comparisons = numbers["comparisons"]
    panels, reference = {}, {}
    runs = load_runs(cfg, parts)
    for key, table in numbers["tables"].items():
        group, variant = key.split("/")
        if variant != "full":
            continue
        for task in table:
            title = f"group {group}: {task}"
            panels[title] = {
                MODEL_LABELS[m]: runs[int(group), "full", m]["tasks"][task]["auc"].ravel().tolist() for m in table[task]
            }
            column = 2 if task == "marital" else 1
            reference[title] = {MODEL_LABELS[m]: PAPER_TABLES[int(group)][m][column] for m in table[task]}
    plot_runs(out / "census_auc.png", panels, reference, ylabel=f"test AUC ({cfg.runs} runs x {cfg.splits} splits)")
    plot_intervals(
        {
            "paper's claims (Holm family 1)": comparisons["primary"],
            "marital task (family 2)": comparisons["auxiliary"],
            "without household columns (family 3)": comparisons["ablation"],
        },
        out / "intervals.png",
    )
    plot_searches(numbers["searches"], out / "searches.png")
    summary = {
        "config": dataclasses.asdict(cfg),
        **numbers,
        "leakage": {str(g): rows for g, rows in leakage.items()},
        "seconds": seconds,
        "training_seconds": sum(_read(parts, job)["seconds"] for job in final_jobs(cfg)),
    }
    return write_results(out, summary, markdown(cfg, summary))


def markdown(cfg: AuditConfig, summary: dict) -> str:
    comparisons = summary["comparisons"]
    claim_rows = []
    for c in summary["claims"]:
        deciding = "; ".join(
            f"{x['a']} − {x['b']}: {_f(x['estimate'])} {_interval(x['low'], x['high'])}" for x in c["comparisons"]
        )
        claim_rows.append([c["claim"], f"**{c['status']}**", deciding])
    label = {"full": "the full budget", "medium": "a smaller CPU run", "quick": "the quick mode (CI)"}[cfg.preset]
    text = [
        f"# Census audit, {label}: can the data decide Ma et al.'s Tables 1 and 2?",
        "",
        f"Budget per method (the same for all): {cfg.trials} optuna TPE trials (+{cfg.widen_trials} after widening a "
        f"range whose optimum sat at its edge) of {cfg.tune_seeds} run(s) each on split 0's validation rows; lr in "
        f"{cfg.lr_range}, width (hidden units of the shared part) in {cfg.width_range}, experts in "
        f"{cfg.experts_range}; up to {cfg.max_epochs} epochs, {cfg.evals_per_epoch} evaluations per epoch, early "
        f"stopping after {cfg.patience} evaluations without improvement, the best validation step kept. Then "
        f"{cfg.runs} runs per method on each of {cfg.splits} random 1:1 validation/test splits of the test file "
        f"(split 0 = the earlier runs' split); training rows: {cfg.train_rows or 'all 199,523'}. Single-task = one "
        "independent model per task (own embeddings), each tuned on its task.",
        "",
        "## The paper's claims",
        "",
        markdown_table(
            ["claim", "verdict", "deciding intervals (MMoE − other, Holm-adjusted, runs + rows)"], claim_rows
        ),
        "",
        "## Test AUC of the runs",
        "",
    ]
    for key, table in summary["tables"].items():
        group, variant = key.split("/")
        if variant == "matched":
            continue
        text += [
            f"### Group {group}, {VARIANTS[variant]}",
            "",
            runs_table(table, int(group), variant, cfg.collapse_below),
            "",
        ]
    matched = [(k, t) for k, t in summary["tables"].items() if k.endswith("/matched")]
    for key, table in matched:
        s = next(iter(table.values()))["shared_bottom"]
        task = next(iter(table))
        text += [
            f"Group {key[0]}, Shared-Bottom at MMoE's parameter count ({s['params_count']:,} parameters): mean "
            f"{task} AUC {s['mean']:.4f} ± {s['se']:.4f} over {s['n']} runs.",
            "",
        ]
    text += ["![every run](census_auc.png)", "", "## Comparisons", ""]
    for title, family in (
        ("Family 1: the paper's claims", comparisons["primary"]),
        ("Family 2: the auxiliary task (marital)", comparisons["auxiliary"]),
        ("Family 3: without the household columns", comparisons["ablation"]),
        ("The household columns' effect (own Holm family)", comparisons["leak"]),
    ):
        if family:
            text += [f"### {title}", "", markdown_table(COMPARISON_HEADER, comparison_rows(family)), ""]
    text += [
        "Mean diff: over the (split, seed) pairs. 95% runs only: paired bootstrap within splits. SE rows: DeLong on "
        "each split's test rows, averaged over splits. The Holm-adjusted interval uses both SEs and excludes 0 "
        "exactly when Holm's procedure rejects 'no difference' at 5% within its family.",
        "",
        "![intervals](intervals.png)",
        "",
        "## The searches",
        "",
        search_table(summary["searches"]),
        "",
        "![searches](searches.png)",
        "",
        training_table(summary["tables"]),
        "",
        censoring_note(summary["tables"], cfg.max_epochs),
        "",
        "## Which columns leak the marital status",
        "",
        leakage_section({int(g): r for g, r in summary["leakage"].items()}),
        "",
        f"Wall time of this call: {summary['seconds']:.0f} s (a call that finds every part done only computes the "
        f"statistics); training time recorded in the run parts: {summary['training_seconds']:.0f} s.",
        "",
    ]
    return "\n".join(text)
