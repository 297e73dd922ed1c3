"""What stripping categorical values costs the encoder, side by side in one run.

    python benchmarks/encode_strip.py [--rounds 15]

26 categorical columns (10,000 values each) and 13 numeric ones, as a 100-row request and as a 50,000-row
file. Three ways, interleaved and timed ``rounds`` times (the minimum is reported; 1 torch/numpy thread):

* ``no strip``: the encoder's lookup of the values as they are (encoders written before stripping);
* ``strip all``: every string column trimmed with ``pyarrow.compute.utf8_trim_whitespace``, then looked up;
* ``strip misses``: what the encoder does: look up as they are, trim and look up again only the values not
  found (the vocabulary holds stripped values, so a found value needs no trimming).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from mtrank.config.experiment import CategoricalFeature, FeaturesSpec, NumericFeature
from mtrank.data.encoders import FeatureEncoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    categorical = [f"c{i}" for i in range(26)]
    frame = pd.DataFrame({c: rng.integers(0, 10_000, 50_000).astype(str) for c in categorical})
    frame = frame.assign(**{f"n{i}": rng.normal(size=50_000) for i in range(13)})
    spec = FeaturesSpec(
        categorical=[CategoricalFeature(c) for c in categorical], numeric=[NumericFeature(f"n{i}") for i in range(13)]
    )
    encoder = FeatureEncoder(spec).fit(frame)
    encoder.prepare_lookups()
    tables = {"100-row request": pa.Table.from_pandas(frame.iloc[:100], preserve_index=False)}
    tables["50,000-row file"] = pa.Table.from_pandas(frame, preserve_index=False)

    def strip_all(table: pa.Table) -> None:
        trimmed = table
        for c in categorical:
            trimmed = trimmed.set_column(trimmed.schema.get_field_index(c), c, pc.utf8_trim_whitespace(table[c]))
        encoder.transform(trimmed)

    ways = {"no strip": (False, encoder.transform), "strip all": (False, strip_all)}
    ways["strip misses"] = (True, encoder.transform)
    best: dict[tuple[str, str], float] = {}
    for _ in range(args.rounds):
        for way, (flag, encode) in ways.items():
            for state in encoder.state.values():
                state["strip"] = flag
            for name, table in tables.items():
                repeats = 200 if table.num_rows <= 100 else 2
                start = time.perf_counter()
                for _ in range(repeats):
                    encode(table)
                seconds = (time.perf_counter() - start) / repeats
                best[way, name] = min(best.get((way, name), np.inf), seconds)
    print(f"encoding time, minimum of {args.rounds} interleaved rounds:")
    print(f"{'':<14}" + "".join(f"{name:>20}" for name in tables))
    for way in ways:
        print(f"{way:<14}" + "".join(f"{best[way, name] * 1e3:>17.3f} ms" for name in tables))


if __name__ == "__main__":
    main()
