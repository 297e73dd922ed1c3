"""TorchRec sharding end to end on CPU (Gloo): train a W2-shaped model (fewer rows) with the tables sharded
table-wise and column-wise over --world processes, and the plain model in one process, side by side in one run
on the same batches; report samples/s and the largest score difference from the plain model after training.

    PYTHONPATH=src python benchmarks/torchrec_sharding.py --out docs/results/torchrec_sharding.json
    PYTHONPATH=src python benchmarks/torchrec_sharding.py --quick  # seconds (tests/test_torchrec_example.py)

Both engines take exact SGD at --lr on every parameter (TorchRec's fused table update, torch.optim.SGD on the
dense part), so the sharded runs must end with the plain run's scores.
"""

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from mtrank.config import ModelConfig
from mtrank.model import MultiTaskModel
from mtrank.train import sharded


def make_model(args) -> MultiTaskModel:
    config = ModelConfig(
        inputs={"num_dense": 13, "vocab_sizes": [args.rows] * args.features, "embedding_dim": args.dim},
        block={"type": "mmoe", "num_experts": 4},
    )
    return MultiTaskModel(config, seed=0)


def batches(args):
    g = torch.Generator().manual_seed(7)
    for _ in range(args.steps + 1):  # the last one scores
        dense = torch.randn(args.batch, 13, generator=g)
        sparse = torch.randint(0, args.rows, (args.batch, args.features), generator=g)
        labels = (torch.rand(args.batch, 2, generator=g) < 0.3).float()
        yield dense, sparse, labels


def train(model_call, params, args, rank: int, world: int, to_inputs):
    optimizer = torch.optim.SGD(params, lr=args.lr)
    local = slice(rank * args.batch // world, (rank + 1) * args.batch // world)
    data = list(batches(args))
    start = time.perf_counter()
    for dense, sparse, labels in data[:-1]:
        logits = model_call(*to_inputs(dense[local], sparse[local]))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[local])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    dense, sparse, _ = data[-1]
    with torch.no_grad():
        scores = model_call(*to_inputs(dense[local], sparse[local]))
    return seconds, scores


def worker(rank: int, world: int, port: int, sharding_type: str, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    module = sharded.TorchRecModel.from_model(make_model(args))
    dmp = sharded.shard(module, sharding_type, lr=args.lr)
    dense_params = [p for n, p in dmp.named_parameters() if "ebc" not in n]
    seconds, scores = train(dmp, dense_params, args, rank, world, lambda d, s: (d, sharded.to_features(s, module.keys)))
    gathered = [torch.empty_like(scores) for _ in range(world)]
    torch.distributed.all_gather(gathered, scores)
    if rank == 0:
        torch.save({"seconds": seconds, "scores": torch.cat(gathered)}, out)
    sharded.end_worker()  # (destroys the process group)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows of each of the --features tables")
    parser.add_argument("--features", type=int, default=26)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.features, args.dim, args.batch, args.steps = 50, 4, 4, 64, 3
    reason = sharded.torchrec_available()
    if reason is not None:
        sys.exit(reason)
    torch.set_num_threads(1)
    model = make_model(args)
    seconds, plain = train(lambda d, s: model(d, s).task_logits, model.parameters(), args, 0, 1, lambda d, s: (d, s))
    result = {
        "args": vars(args) | {"out": str(args.out)},
        "plain": {"samples_per_s": args.batch * args.steps / seconds},
    }
    print(f"plain, 1 process: {result['plain']['samples_per_s']:,.0f} samples/s")
    for sharding_type in sharded.SHARDING_TYPES:
        tmp = Path(f"/tmp/mtrank_torchrec_{os.getpid()}_{sharding_type}.pt")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(worker, args=(args.world, port, sharding_type, args, str(tmp)), nprocs=args.world, join=True)
        got = torch.load(tmp)
        tmp.unlink()
        diff = (got["scores"] - plain).abs().max().item()
        result[sharding_type] = {"samples_per_s": args.batch * args.steps / got["seconds"], "max_score_diff": diff}
        print(
            f"{sharding_type}, {args.world} processes: {result[sharding_type]['samples_per_s']:,.0f} samples/s, "
            f"max |score - plain| after {args.steps} steps {diff:.2e}"
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
