"""Public dataset layouts read into one table: MovieLens-100K from GroupLens files or RecBole atomic files.

Both readers give the same columns, so one config serves either download::

    user_id int64, item_id int64, rating float64, timestamp int64,          (u.data / ml-100k.inter)
    age int64, gender string, occupation string, zip_code string,           (u.user / ml-100k.user)
    release_year int64 (null if unknown), genres list<string>               (u.item / ml-100k.item)

GroupLens: ``u.data`` (tab separated), ``u.user`` and ``u.item`` (``|`` separated, latin-1, 19 genre flags).
RecBole: ``ml-100k.inter``, ``ml-100k.user``, ``ml-100k.item`` (tab separated, header ``name:type``, genres as
the space-separated ``class`` token sequence). The data is not shipped here: its terms forbid redistribution.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from mtrank.data.errors import DataError

GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]


def _need(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise DataError(
            f"{folder}: {name} not found; point data.train at the folder holding the MovieLens-100K "
            "files (GroupLens u.data/u.user/u.item or RecBole ml-100k.inter/.user/.item)"
        )
    return path


def _read(
    path: Path, names: list[str] | None, delimiter: str, types: dict[str, pa.DataType], encoding: str = "utf8"
) -> pa.Table:
    raw = path.read_bytes()
    if encoding != "utf8":
        raw = raw.decode(encoding).encode("utf8")
    read = pacsv.ReadOptions(column_names=names) if names else pacsv.ReadOptions()
    parse = pacsv.ParseOptions(delimiter=delimiter, quote_char=False)
    convert = pacsv.ConvertOptions(column_types=types)
    try:
        return pacsv.read_csv(io.BytesIO(raw), read_options=read, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as err:
        raise DataError(f"{path}: not in the MovieLens-100K layout ({err})") from None


def read_grouplens(folder: str | Path) -> pa.Table:
    """Join ``u.data``, ``u.user`` and ``u.item`` of a GroupLens MovieLens-100K folder."""
    folder = Path(folder)
    inter = _read(
        _need(folder, "u.data"),
        ["user_id", "item_id", "rating", "timestamp"],
        "\t",
        {"user_id": pa.int64(), "item_id": pa.int64(), "rating": pa.float64(), "timestamp": pa.int64()},
    )
    users = _read(
        _need(folder, "u.user"),
        ["user_id", "age", "gender", "occupation", "zip_code"],
        "|",
        {"user_id": pa.int64(), "age": pa.int64(), "zip_code": pa.string()},
    )
    item_cols = ["item_id", "title", "release_date", "video_release_date", "url", *GENRES]
    items = _read(
        _need(folder, "u.item"),
        item_cols,
        "|",
        {"item_id": pa.int64(), "release_date": pa.string(), **{g: pa.int64() for g in GENRES}},
        "latin-1",
    )
    year = pc.utf8_slice_codeunits(items.column("release_date"), -4)
    year = pc.cast(pc.if_else(pc.equal(pc.utf8_length(year), 4), year, None), pa.int64())
    flags = [items.column(g).combine_chunks() for g in GENRES]
    # the list of flagged genre names per item (a few thousand items: a Python loop over items is fine here)
    genres = pa.array(
        [[g for g, f in zip(GENRES, row) if f] for row in zip(*[f.to_pylist() for f in flags])],
        pa.list_(pa.string()),
    )
    items = pa.table({"item_id": items.column("item_id"), "release_year": year, "genres": genres})
    return _join(inter, users, items)


def read_recbole(folder: str | Path, name: str = "ml-100k") -> pa.Table:
    """Join RecBole's atomic files ``NAME.inter``, ``NAME.user``, ``NAME.item``."""
    folder = Path(folder)

    def atomic(suffix: str, types: dict[str, pa.DataType]) -> pa.Table:
        path = _need(folder, f"{name}.{suffix}")
        with path.open(encoding="utf8") as handle:
            header = handle.readline().rstrip("\n").split("\t")  # "user_id:token", "rating:float", ...
        raw_types = {c: types.get(c.split(":")[0], pa.string()) for c in header}
        table = _read(path, None, "\t", raw_types)
        return table.rename_columns([c.split(":")[0] for c in table.column_names])

    inter = atomic(
        "inter",
        {"user_id": pa.int64(), "item_id": pa.int64(), "rating": pa.float64(), "timestamp": pa.int64()},
    )
    users = atomic(
        "user",
        {
            "user_id": pa.int64(),
            "age": pa.int64(),
            "gender": pa.string(),
            "occupation": pa.string(),
            "zip_code": pa.string(),
        },
    )
    items = atomic("item", {"item_id": pa.int64(), "class": pa.string(), "release_year": pa.string()})
    year = items.column("release_year")
    year = pc.cast(pc.if_else(pc.match_substring_regex(year, r"^\d{4}$"), year, None), pa.int64())
    genres = pc.split_pattern(pc.fill_null(items.column("class"), ""), " ")
    items = pa.table({"item_id": items.column("item_id"), "release_year": year, "genres": genres})
    return _join(inter, users.select(["user_id", "age", "gender", "occupation", "zip_code"]), items)


def _join(inter: pa.Table, users: pa.Table, items: pa.Table) -> pa.Table:
    """Left-join user and item attributes onto the interactions (a vectorised lookup by id: pyarrow's join
    does not carry list columns), ordered by time."""
    table = inter.select(["user_id", "item_id", "rating", "timestamp"])
    for side, key in ((users, "user_id"), (items, "item_id")):
        rows = pc.index_in(table.column(key), value_set=side.column(key).combine_chunks())
        for name in side.column_names:
            if name != key:
                table = table.append_column(name, side.column(name).combine_chunks().take(rows))
    table = table.sort_by([("timestamp", "ascending"), ("user_id", "ascending"), ("item_id", "ascending")])
    return table.select(
        [
            "user_id",
            "item_id",
            "rating",
            "timestamp",
            "age",
            "gender",
            "occupation",
            "zip_code",
            "release_year",
            "genres",
        ]
    )


def add_history(
    table: pa.Table,
    max_length: int,
    user: str = "user_id",
    item: str = "item_id",
    time: str = "timestamp",
    action: str = "rating",
) -> pa.Table:
    """Each row's preceding history of its user: ``history_items``, ``history_ratings`` and ``history_times``
    (list<int64> each), the items that user rated strictly before the row's timestamp, the ratings given and
    when, oldest first, at most the ``max_length`` most recent.

    Strictly before: ratings of the same user at the same timestamp are not in each other's history (their order
    within the second is unknown, so one would leak the other's label), and no row sees its own item. Ties among
    the earlier ratings are ordered by item id. Vectorised: rows sorted by (user, time, item); a row's history is
    the slice of its user's rows from ``max(user start, tie start - max_length)`` to the first row of its
    timestamp (``tie start``), gathered as one flat index.

    Example:
        >>> t = pa.table({"user_id": [1, 1, 1, 2], "item_id": [10, 11, 12, 10], "timestamp": [5, 7, 7, 1],
        ...               "rating": [4.0, 3.0, 5.0, 1.0]})
        >>> add_history(t, 5).column("history_items").to_pylist()
        [[], [10], [10], []]
    """
    users = table.column(user).to_numpy().astype(np.int64)
    times = table.column(time).to_numpy().astype(np.int64)
    items = table.column(item).to_numpy().astype(np.int64)
    order = np.lexsort((items, times, users))  # by user, then time, then item
    u, t = users[order], times[order]
    n = len(order)
    first = np.ones(n, dtype=bool)
    first[1:] = u[1:] != u[:-1]
    user_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    tie = first.copy()
    tie[1:] |= t[1:] != t[:-1]
    tie_start = np.maximum.accumulate(np.where(tie, np.arange(n), 0))  # first row of (user, time)
    start = np.maximum(user_start, tie_start - max_length)
    lengths = tie_start - start
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.arange(offsets[-1]) - np.repeat(offsets[:-1] - start, lengths)  # sorted positions of each history
    sorted_items = items[order]
    sorted_actions = table.column(action).to_numpy().astype(np.int64)[order]
    out = {}
    columns = (("history_items", sorted_items), ("history_ratings", sorted_actions), ("history_times", t))
    for name, values in columns:
        lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values[flat]))
        out[name] = lists.take(pa.array(np.argsort(order)))  # back to the table's row order
    for name, lists in out.items():
        table = table.append_column(name, lists)
    return table


def read_movielens(folder: str | Path, flavour: str, history: int = 0) -> pa.Table:
    """``flavour`` = ``grouplens`` or ``recbole``; ``history > 0`` adds each rating's preceding history
    (:func:`add_history`, at most ``history`` items)."""
    if flavour == "grouplens":
        table = read_grouplens(folder)
    elif flavour == "recbole":
        table = read_recbole(folder)
    else:
        raise DataError(f"unknown MovieLens flavour {flavour!r}; expected grouplens or recbole")
    return add_history(table, history) if history else table
