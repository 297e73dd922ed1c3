"""The model zoo on a GPU: every snippet of docs/model-zoo.md trained the same steps with the whole step in a
CUDA graph and eagerly, fp32 and bf16; the trainer's step path and the largest parameter difference.

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
from zoo_memory import large_inputs, model_for, random_batch  # noqa: E402
from zoo_snippets import zoo_snippets  # noqa: E402


def train(name: str, snippet: dict, data: TensorData, graphs: bool, precision: str) -> tuple[dict, Trainer]:
    model = model_for(snippet, large_inputs(1000), 8)
    config = TrainConfig(batch_size=256, steps=40, device="cuda", precision=precision, progress=False, seed=0)
    trainer = Trainer(model, config, cuda_graphs=graphs)
    trainer.fit(data)
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items()}, trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    dense, sparse = random_batch(large_inputs(1000), 256 * 40, torch.device("cpu"))
    labels = (torch.rand(len(dense), 2, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    data = TensorData(dense, sparse, labels)
    results = {}
    for name, snippet in zoo_snippets().items():
        for precision in ("fp32", "bf16"):
            graphed, trainer = train(name, snippet, data, True, precision)
            eager, _ = train(name, snippet, data, False, precision)
            diff = max((graphed[k] - eager[k]).abs().max().item() for k in graphed)
            results[f"{name} {precision}"] = {
                "step_path": trainer.step_path,
                "reason": trainer.step_path_reason,
                "max_abs_diff": diff,
            }
            print(f"{name:>10} {precision}: {trainer.step_path:<10} max |graphed - eager| = {diff:.3g}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
