"""Small generated tables and configs for the tabular pipeline tests (no real data needed)."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models train far faster on one thread on the shared 2-core machine; restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_frame(n: int = 800, seed: int = 0) -> pd.DataFrame:
    """Rows with a learnable signal: click depends on city and age, buy on click and price."""
    rng = np.random.default_rng(seed)
    city = rng.choice(["paris", "rome", "oslo", "lima"], n)
    age = rng.normal(40, 12, n).round(1)
    price = rng.exponential(20, n).round(2)
    user = rng.integers(0, 50, n)
    tags = rng.choice(["a|b", "b", "c|a", "d"], n)
    logit = 3.0 * (city == "paris") - 2.0 * (city == "oslo") + 0.08 * (age - 40)
    click = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    buy = (click * (rng.random(n) < 1 / (1 + np.exp(0.15 * (price - 20))))).astype(int)
    return pd.DataFrame(
        {
            "user": user,
            "city": city,
            "age": age,
            "price": price,
            "tags": tags,
            "click": click,
            "buy": buy,
            "ts": np.arange(n)[rng.permutation(n)],
        }
    )


BASE_CONFIG = {
    "name": "tiny",
    "data": {"split": {"method": "random", "fractions": [0.7, 0.15, 0.15], "seed": 0}},
    "features": {
        "categorical": ["city", {"name": "user", "min_count": 2}],
        "numeric": ["age", {"name": "price", "log1p": True}],
        "multi_categorical": [{"name": "tags", "separator": "|"}],
    },
    "tasks": [{"name": "click"}, {"name": "buy", "weight": 0.5}],
    "model": {
        "inputs": {"embedding_dim": 4},
        "block": {"type": "mmoe", "num_experts": 3},
        "experts": {"hidden": [8]},
        "towers": {"hidden": [4]},
    },
    "train": {"epochs": 6, "batch_size": 64, "lr": 0.01, "progress": False, "seed": 0},
}


def config(**sections) -> dict:
    """A deep copy of BASE_CONFIG with top-level sections updated (dicts merged one level deep)."""
    out = copy.deepcopy(BASE_CONFIG)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out
