"""Multi-valued features: pooled multi-hot dense columns vs an embedding bag, side by side.

    python benchmarks/bags.py [--vocab 64 1000 10000] [--rows 50000] [--steps 60] [--threads 1]

One multi-valued feature (1-8 values per row, Zipf-like frequencies) plus 4 numeric and 4 categorical columns;
an MMoE (8 experts of 64) learns a click label that depends on the feature. For each vocabulary size, the same
rows are encoded both ways (``embed: false`` / ``true``) and the two models trained in alternation: encoding
rows/s, training samples/s (batch 1024), the block's input width, parameters and test AUC after one epoch.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from mtrank.config import ModelConfig, TaskConfig, TrainConfig
from mtrank.config.experiment import CategoricalFeature, FeaturesSpec, MultiCategoricalFeature, NumericFeature, TaskSpec
from mtrank.data.encoders import FeatureEncoder, as_table
from mtrank.data.readers import encode_labels
from mtrank.data.tensors import TensorData
from mtrank.evaluate.metrics import evaluate
from mtrank.model import MultiTaskModel, count_parameters
from mtrank.train import Trainer


def make_frame(rows: int, vocab: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=vocab)
    frequency = 1.0 / np.arange(1, vocab + 1) ** 0.8
    frequency /= frequency.sum()
    counts = rng.integers(1, 9, rows)
    values = rng.choice(vocab, counts.sum(), p=frequency)
    splits = np.split(values, np.cumsum(counts)[:-1])
    signal = np.array([weight[v].mean() for v in splits])
    frame = pd.DataFrame({f"n{i}": rng.normal(size=rows) for i in range(4)})
    for i in range(4):
        frame[f"c{i}"] = rng.integers(0, 100, rows).astype(str)
    frame["tags"] = ["|".join(f"t{v}" for v in row) for row in splits]
    frame["click"] = (rng.random(rows) < 1 / (1 + np.exp(-(2 * signal + frame["n0"])))).astype(int)
    return frame


def encoded(frame: pd.DataFrame, vocab: int, embed: bool) -> tuple[FeatureEncoder, TensorData, float]:
    spec = FeaturesSpec(
        categorical=[CategoricalFeature(f"c{i}") for i in range(4)],
        numeric=[NumericFeature(f"n{i}") for i in range(4)],
        multi_categorical=[MultiCategoricalFeature("tags", max_vocab=vocab, embed=embed, max_values=8)],
    )
    encoder = FeatureEncoder(spec).fit(frame)
    start = time.perf_counter()
    dense, sparse = encoder.transform(frame)
    seconds = time.perf_counter() - start
    labels = encode_labels(as_table(frame), [TaskSpec("click", column="click")], "generated")
    return encoder, TensorData(torch.from_numpy(dense), torch.from_numpy(sparse), torch.from_numpy(labels)), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[64, 1000, 10000])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rows:,} rows (80% train), batch 1024")
    print("| vocabulary | encoding | block input width | parameters | encode rows/s | train samples/s | test AUC |")
    print("|---|---|---|---|---|---|---|")
    for vocab in args.vocab:
        frame = make_frame(args.rows, vocab)
        cut = int(0.8 * len(frame))
        for embed in (False, True):
            encoder, data, encode_s = encoded(frame, vocab, embed)
            torch.manual_seed(0)
            config = ModelConfig(
                inputs={
                    "num_dense": encoder.num_dense,
                    "vocab_sizes": encoder.vocab_sizes,
                    "embedding_dim": 16,
                    "bags": encoder.bag_inputs,
                },
                tasks=[TaskConfig("click")],
                block={"num_experts": 8},
                experts={"hidden": [64]},
                towers={"hidden": [16]},
            )
            model = MultiTaskModel(config)
            trainer = Trainer(model, TrainConfig(lr=3e-3, batch_size=1024, epochs=1, progress=False))
            result = trainer.fit(data[:cut])
            auc = evaluate(model, data[cut:])["auc/click"]
            print(
                f"| {vocab:,} | {'embedding bag' if embed else 'multi-hot'} | {config.input_dim:,} | "
                f"{count_parameters(model):,} | {len(frame) / encode_s:,.0f} | {result.samples_per_second:,.0f} | "
                f"{auc:.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
