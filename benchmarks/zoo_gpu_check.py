"""The model zoo on a GPU: every snippet of docs/model-zoo.md trained the same steps with the whole step in a
CUDA graph and eagerly, fp32 and bf16; the trainer's step path and the largest parameter difference. The task
dependencies (``funnel esmm``, ``funnel escm2-ips``, ``funnel escm2-dr``, ``funnel aitm``: the MMoE snippet with
its second task depending on the first, whose label is then missing where the first's is 0) are checked too.

    python benchmarks/zoo_gpu_check.py --json docs/results/zoo_gpu_check-h200.json     # on a CUDA machine

Inputs: the large-vocab shape of benchmarks/zoo_memory.py at 1,000 ids per column (random rows, random labels),
batch 256, 40 steps; a difference of 0 means the graphed step replays the eager one bit for bit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mtrank.config import TrainConfig
from mtrank.data.tensors import TensorData
from mtrank.train import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_funnel import FUNNELS  # noqa: E402
from zoo_memory import large_inputs, model_for, random_batch  # noqa: E402
from zoo_snippets import zoo_snippets  # noqa: E402

FUNNEL_TASKS = [{"name": "income"}, {"name": "never_married", "depends_on": "income"}]


def checked_snippets() -> dict[str, dict]:
    """Every snippet of docs/model-zoo.md, and MMoE under each funnel type."""
    snippets = zoo_snippets()
    for name, funnel in FUNNELS.items():
        if name != "naive":
            snippets[f"funnel {name}"] = {**snippets["mmoe"], "tasks": FUNNEL_TASKS, "funnel": funnel}
    return snippets


def train(name: str, snippet: dict, data: TensorData, graphs: bool, precision: str) -> tuple[dict, Trainer]:
    model = model_for(snippet, large_inputs(1000), 8)
    config = TrainConfig(batch_size=256, steps=40, device="cuda", precision=precision, progress=False, seed=0)
    trainer = Trainer(model, config, cuda_graphs=graphs)
    trainer.fit(data)
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items()}, trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="", help="results file (merged into when it exists)")
    parser.add_argument("--only", nargs="*", default=None, help="these snippets only (one process each isolates them)")
    args = parser.parse_args(argv)
    dense, sparse = random_batch(large_inputs(1000), 256 * 40, torch.device("cpu"))
    labels = (torch.rand(len(dense), 2, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    data = TensorData(dense, sparse, labels)
    dependent = labels.clone()
    dependent[labels[:, 0] == 0, 1] = float("nan")  # the second task is seen where the first is 1
    funnel_data = TensorData(dense, sparse, dependent)
    out = Path(args.json) if args.json else None
    results = json.loads(out.read_text())["results"] if out and out.exists() else {}
    for name, snippet in checked_snippets().items():
        if args.only is not None and name not in args.only:
            continue
        rows = funnel_data if "tasks" in snippet else data
        for precision in ("fp32", "bf16"):
            try:
                graphed, trainer = train(name, snippet, rows, True, precision)
            except RuntimeError as err:  # recorded, not hidden: the table shows which path fails and why
                results[f"{name} {precision}"] = {"step_path": "error", "reason": f"{type(err).__name__}: {err}"}
                print(f"{name:>10} {precision}: error {err}", flush=True)
                continue
            eager, _ = train(name, snippet, rows, False, precision)
            diff = max((graphed[k] - eager[k]).abs().max().item() for k in graphed if graphed[k].numel())
            results[f"{name} {precision}"] = {
                "step_path": trainer.step_path,
                "reason": trainer.step_path_reason,
                "max_abs_diff": diff,
            }
            print(f"{name:>10} {precision}: {trainer.step_path:<10} max |graphed - eager| = {diff:.3g}", flush=True)
    if out:
        out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
