"""Parameter and memory cost of the model zoo beside PLE (STEM's per-task embedding tables above all).

For every snippet of docs/model-zoo.md, in two input settings:

* ``census``: census-income's inputs (7 numeric, 31 categorical columns, vocabularies fitted on the training
  file), embedding width 4 as the snippets have it, batch 1,024;
* ``large-vocab``: a production-like input, 13 numeric + 26 categorical columns of 100,000 ids (Criteo's
  shape), embedding width 16, batch 4,096: where embedding tables dominate, as in industrial rankers.

Measured per model: trainable parameters; training state (parameters + gradients + Adam's two moments, all
float32: 16 bytes a parameter, every embedding row included since gradients are dense); activation bytes
saved for backward by one training forward (the storages autograd keeps, counted once each, through
``torch.autograd.graph.saved_tensors_hooks``); with ``--device cuda``, the peak CUDA memory of three full
training steps (forward, backward, Adam). Ratios are to PLE in the same setting.

    python benchmarks/zoo_memory.py                       # CPU: docs/results/zoo_memory-cpu.{json,md}
    python benchmarks/zoo_memory.py --device cuda         # + peak GPU memory: docs/results/zoo_memory-cuda.*
    python benchmarks/zoo_memory.py --quick               # large-vocab setting at 1,000 ids, batch 256 (tested)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from mtrank.config import ModelConfig
from mtrank.config.experiment import experiment_from_dict
from mtrank.data.encoders import FeatureEncoder
from mtrank.data.splits import load_splits
from mtrank.evaluate.report import markdown_table
from mtrank.model import MultiTaskModel, count_parameters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_smoke import census_config  # noqa: E402
from zoo_snippets import REPO, zoo_snippets  # noqa: E402

CENSUS_TASKS = [{"name": "income"}, {"name": "never_married"}]


def census_inputs(shared_data: Path) -> dict:
    """Census-income's model inputs from configs/census_income.yaml's features, fitted on the training file."""
    config = experiment_from_dict(census_config(shared_data, 1, {}))
    table, source = load_splits(config)["train"]
    encoder = FeatureEncoder(config.features).fit(table, source)
    names = [f.name for f in config.features.categorical]
    return {"num_dense": encoder.num_dense, "vocab_sizes": encoder.vocab_sizes, "names": names}


def large_inputs(vocab: int) -> dict:
    names = [f"c{i}" for i in range(26)]
    return {"num_dense": 13, "vocab_sizes": [vocab] * 26, "names": names}


def model_for(snippet: dict, inputs: dict, embedding_dim: int) -> MultiTaskModel:
    section = copy.deepcopy(snippet)
    section["inputs"] = {**inputs, "embedding_dim": embedding_dim}
    pepnet = section.get("pepnet")
    if pepnet and inputs["names"][0] == "c0":  # the large setting has no census names: the first columns
        pepnet.update(epnet=[0], ppnet=[1, 2])
    section.setdefault("tasks", CENSUS_TASKS)  # a funnel check names its own (a dependent task)
    if section["block"].get("task_groups"):
        section["block"]["task_groups"] = [[t["name"]] for t in CENSUS_TASKS]
    return MultiTaskModel(ModelConfig.from_dict(section))


def random_batch(inputs: dict, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(rows, inputs["num_dense"], generator=generator)
    sparse = torch.stack([torch.randint(0, v, (rows,), generator=generator) for v in inputs["vocab_sizes"]], 1)
    return dense.to(device), sparse.to(device)


def saved_activation_bytes(model: MultiTaskModel, dense: torch.Tensor, sparse: torch.Tensor) -> int:
    """Bytes of the storages autograd saves for backward in one training forward (each storage once)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if not isinstance(tensor, torch.nn.Parameter):
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(dense, sparse)
    del out
    return sum(nbytes for ptr, nbytes in storages.items() if ptr not in params)


def peak_cuda_bytes(model: MultiTaskModel, dense: torch.Tensor, sparse: torch.Tensor) -> int:
    """Peak CUDA memory of three training steps (forward, backward, Adam), from a clean start."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        out = model(dense, sparse)
        (out.task_logits.float().square().mean() + out.aux_loss).backward()
        optimizer.step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    device = torch.device(args.device)
    snippets = zoo_snippets()
    names = args.models or list(snippets)
    settings = {
        "census": (census_inputs(Path(args.shared_data)), 4, 1024),
        "large-vocab": (large_inputs(args.vocab), 16, 4096),
    }
    if args.quick:
        settings = {"large-vocab": (large_inputs(1000), 8, 256)}
    results = {}
    for setting, (inputs, dim, rows) in settings.items():
        dense, sparse = random_batch(inputs, rows, device)
        for name in names:
            model = model_for(snippets[name], inputs, dim).to(device)
            params = count_parameters(model)
            record = {
                "params": params,
                "training_state_bytes": 16 * params,
                "saved_activation_bytes": saved_activation_bytes(model, dense, sparse),
                "batch": rows,
                "embedding_dim": dim,
            }
            if device.type == "cuda":
                base = torch.cuda.memory_allocated()
                record["peak_cuda_bytes"] = peak_cuda_bytes(model, dense, sparse) - base + 4 * params
            results.setdefault(setting, {})[name] = record
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(setting, name, record, file=sys.stderr)
    return {
        "command": " ".join(["python benchmarks/zoo_memory.py", *sys.argv[1:]]),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "results": results,
    }


def ratio(record: dict, reference: dict | None, key: str) -> str:
    return f"{record[key] / reference[key]:.2f}" if reference else "-"


def table(results: dict) -> str:
    lines = []
    for setting, models in results["results"].items():
        reference = models.get("ple")
        header = ["model", "params", "x PLE", "train state MiB", "saved activations MiB", "x PLE"]
        cuda = "peak_cuda_bytes" in next(iter(models.values()))
        if cuda:
            header += ["peak CUDA MiB", "x PLE"]
        rows = []
        for name, r in models.items():
            row = [name, f"{r['params']:,}", ratio(r, reference, "params"), f"{r['training_state_bytes'] / 2**20:,.1f}"]
            row += [f"{r['saved_activation_bytes'] / 2**20:,.1f}", ratio(r, reference, "saved_activation_bytes")]
            if cuda:
                row += [f"{r['peak_cuda_bytes'] / 2**20:,.1f}", ratio(r, reference, "peak_cuda_bytes")]
            rows.append(row)
        first = next(iter(models.values()))
        lines += [f"### {setting} (batch {first['batch']:,}, embedding width {first['embedding_dim']})", ""]
        lines += [markdown_table(header, rows), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int, default=100_000, help="ids per column of the large-vocab setting")
    parser.add_argument("--models", nargs="+", help="snippet names (default: all of docs/model-zoo.md)")
    parser.add_argument("--quick", action="store_true", help="the large-vocab setting at 1,000 ids, batch 256")
    parser.add_argument("--shared-data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    results = measure(args)
    out = Path(args.out or REPO / "docs" / "results" / f"zoo_memory-{torch.device(args.device).type}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(f"Produced by: `{results['command']}` on {results['device']}\n\n{table(results)}")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
