"""The example configs in configs/ load real files: the shared samples, census-income, clothing reviews, and
MovieLens-100K in both of its layouts (tiny generated files here: the real data may not be redistributed)."""

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

import mtrank
from mtrank.config.experiment import experiment_from_dict
from mtrank.data.encoders import FeatureEncoder
from mtrank.data.movielens import GENRES, read_grouplens, read_recbole
from mtrank.data.readers import encode_labels, read_table
from tabular_helpers import one_torch_thread  # noqa: F401

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def example(name: str, shared_data: Path, **train) -> dict:
    """configs/NAME.yaml with its ../../shared/data paths (relative to configs/) pointed at the shared data
    fixture, quick training."""
    raw = yaml.safe_load((CONFIGS / name).read_text())
    for key in ("train", "valid", "test"):
        if raw["data"].get(key, "").startswith("../../shared/data/"):
            raw["data"][key] = str(shared_data / raw["data"][key][len("../../shared/data/") :])
    raw["train"].update({"progress": False, **train})
    return raw


@pytest.mark.parametrize("name, rows", [("kuairand.yaml", 160), ("ali_ccp.yaml", 100), ("aliexpress.yaml", 80)])
def test_sample_layout_configs_train_on_the_shared_samples(name, rows, shared_data):
    result = mtrank.fit(example(name, shared_data, epochs=2, batch_size=64), output=None)
    assert result.rows["train"] == rows
    assert all(math.isfinite(m["loss"]) for m in result.metrics.values())


def test_census_config_reads_the_uci_file_with_the_papers_labels(shared_data):
    cfg = experiment_from_dict(example("census_income.yaml", shared_data))
    table, _ = read_table(cfg.data.train, cfg, max_rows=5000)
    labels = encode_labels(table, cfg.tasks, "census")
    assert table.num_rows == 5000 and not np.isnan(labels).any()
    assert 0.03 < labels[:, 0].mean() < 0.10  # income > 50K: about 6% of rows
    assert 0.35 < labels[:, 1].mean() < 0.50  # never married: about 43%
    dense, sparse = FeatureEncoder(cfg.features).fit(table).transform(table)
    assert dense.shape == (5000, 7) and sparse.shape == (5000, 31)  # as mtrank.data.census


def test_clothing_reviews_config_learns_the_recommended_task(shared_data):
    raw = example("womens_clothing_reviews.yaml", shared_data, steps=40, batch_size=512, lr=0.01)
    result = mtrank.fit(raw, output=None)
    assert result.rows == {"train": 18789, "valid": 2349, "test": 2348}
    assert result.metrics["test"]["auc/recommended"] > 0.55


def write_movielens(folder: Path, seed: int = 0, n: int = 400) -> None:
    """Tiny random ratings as GroupLens files (folder/grouplens) and RecBole files (folder/recbole)."""
    rng = np.random.default_rng(seed)
    users, items = 30, 20
    (folder / "grouplens").mkdir(parents=True)
    (folder / "recbole").mkdir()
    inter = [
        (
            int(rng.integers(1, users + 1)),
            int(rng.integers(1, items + 1)),
            int(rng.integers(1, 6)),
            880000000 + i * 37,
        )
        for i in range(n)
    ]
    ug = [
        (
            u,
            int(rng.integers(18, 70)),
            str(rng.choice(["M", "F"])),
            str(rng.choice(["student", "writer"])),
            f"{int(rng.integers(0, 99999)):05d}",
        )
        for u in range(1, users + 1)
    ]
    flags = rng.random((items, len(GENRES))) < 0.2
    years = [int(rng.integers(1950, 1999)) for _ in range(items)]
    gl = folder / "grouplens"
    (gl / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in inter))
    (gl / "u.user").write_text("".join(f"{u}|{a}|{g}|{o}|{z}\n" for u, a, g, o, z in ug))
    lines = [
        f"{i + 1}|Film {i} (é)|01-Jan-{years[i]}||http://x|" + "|".join(str(int(f)) for f in flags[i])
        for i in range(items)
    ]
    (gl / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    rb = folder / "recbole"
    (rb / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in inter)
    )
    (rb / "ml-100k.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        + "".join(f"{u}\t{a}\t{g}\t{o}\t{z}\n" for u, a, g, o, z in ug)
    )
    (rb / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        + "".join(
            f"{i + 1}\tFilm {i}\t{years[i]}\t" + " ".join(g for g, f in zip(GENRES, flags[i]) if f) + "\n"
            for i in range(items)
        )
    )


def test_grouplens_and_recbole_layouts_read_into_the_same_table(tmp_path):
    write_movielens(tmp_path)
    a, b = read_grouplens(tmp_path / "grouplens"), read_recbole(tmp_path / "recbole")
    assert a.num_rows == 400 and a.schema.names == b.schema.names
    for name in a.schema.names:
        assert a.column(name).to_pylist() == b.column(name).to_pylist(), name
    assert a.column("zip_code").type == pa.string()  # leading zeros kept


@pytest.mark.parametrize("flavour", ["grouplens", "recbole"])
def test_movielens_config_trains_on_either_layout_with_a_time_split(tmp_path, flavour):
    write_movielens(tmp_path)
    raw = example("movielens_100k.yaml", tmp_path, epochs=1, batch_size=64)
    raw["data"].update(train=str(tmp_path / flavour), format=f"movielens-{flavour}")
    result = mtrank.fit(raw, output=tmp_path / "model")
    assert result.rows == {"train": 320, "valid": 40, "test": 40}
    assert "genres=<oov>" in result.encoder.feature_names
    metrics = mtrank.pipeline.evaluate_model_dir(tmp_path / "model", tmp_path / flavour)
    assert math.isfinite(metrics["loss"])
