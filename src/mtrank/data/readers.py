"""Readers: CSV / Parquet files, directories of shards and pandas DataFrames -> pyarrow; labels and weights.

One path for every source: :func:`open_dataset` builds a ``pyarrow.dataset`` (a file or a directory of
shards, CSV or Parquet, gzip CSV included) with the experiment's CSV options and column types; whole splits
are read with :func:`read_table`, large ones streamed by :mod:`mtrank.data.streaming` from the same object.
Declared numeric columns are read as float64 and categorical ones as strings, so a text value in a numeric
CSV column fails here, with the file, column, line and the line itself in the message.
"""

from __future__ import annotations

import difflib
import gzip
import operator
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds

from mtrank.config.experiment import DataSpec, ExperimentConfig, TaskSpec, parse_comparison
from mtrank.data.encoders import (
    _first_non_numeric,
    as_table,
    check_no_infinity,
    is_numeric_type,
    numeric_column,
)
from mtrank.data.errors import DataError, check_not_all_missing, data_error, example_row
from mtrank.data.movielens import read_movielens

PARQUET_MAGIC = b"PAR1"
_OPS = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}
_CSV_ERROR = re.compile(r"CSV column #(\d+): Row #(\d+): CSV conversion error to (\w+): invalid value '(.*)'")


def detect_format(path: Path) -> str:
    """``parquet`` if the file starts with the Parquet magic bytes, else ``csv``."""
    with open(path, "rb") as handle:
        return "parquet" if handle.read(4) == PARQUET_MAGIC else "csv"


def _shards(path: Path) -> list[Path]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith((".", "_")))
    if not files:
        raise DataError(f"{path}: the directory has no data files; put CSV or Parquet shards in it")
    return files


def csv_file_format(spec: DataSpec, column_types: dict[str, pa.DataType] | None = None) -> ds.CsvFileFormat:
    read = pacsv.ReadOptions(column_names=spec.csv_columns or None, block_size=1 << 22)
    if spec.csv_header and spec.csv_columns:
        read = pacsv.ReadOptions(column_names=spec.csv_columns, skip_rows=1, block_size=1 << 22)
    nulls = ["", "NA", "N/A", "NaN", "nan", "null", "NULL", "None", *spec.null_values]
    convert = pacsv.ConvertOptions(
        column_types=column_types or {}, null_values=nulls, strings_can_be_null=bool(spec.null_values)
    )
    return ds.CsvFileFormat(
        read_options=read,
        parse_options=pacsv.ParseOptions(delimiter=spec.csv_delimiter),
        convert_options=convert,
    )


def column_types(config: ExperimentConfig | None) -> dict[str, pa.DataType]:
    """CSV column types from the schema: numeric features float64, categorical features strings."""
    if config is None:
        return {}
    types: dict[str, pa.DataType] = {f.column: pa.string() for f in config.features.categorical}
    types.update({f.column: pa.string() for f in config.features.multi_categorical})
    for feat in config.features.sequence:  # a CSV holds a sequence as a separated string
        types.update(
            {column: pa.string() for column in (feat.column, feat.actions_column, feat.times_column) if column}
        )
        if feat.time_column:
            types[feat.time_column] = pa.float64()
    types.update({f.column: pa.float64() for f in config.features.numeric})
    return types


def open_dataset(path: str | Path, spec: DataSpec, config: ExperimentConfig | None = None) -> ds.Dataset:
    """A pyarrow dataset over a file or a directory of shards; the format is detected from the content."""
    path = Path(path)
    if not path.exists():
        where = (
            f" (paths in {config.source} are relative to its folder)" if config is not None and config.source else ""
        )
        raise DataError(
            f"{path}: file not found (looked for {path.resolve()}){where}; check data.train / data.valid / "
            "data.test in the config"
        )
    files = _shards(path) if path.is_dir() else [path]
    for file in files:
        if file.stat().st_size == 0:
            raise DataError(f"{file}: the file is empty (0 bytes); it needs a header and at least one row")
    fmt = spec.format if spec.format in ("csv", "parquet") else detect_format(files[0])
    file_format: Any = "parquet" if fmt == "parquet" else csv_file_format(spec, column_types(config))
    try:
        return ds.dataset([str(f) for f in files], format=file_format)
    except pa.ArrowInvalid as err:
        raise _csv_error(err, files, spec) from None


def _csv_error(err: Exception, files: list[Path], spec: DataSpec) -> DataError:
    """Turn pyarrow's CSV conversion error into one naming the file, column, line and the line's text."""
    text = str(err)
    match = _CSV_ERROR.search(text)
    source = next((str(f) for f in files if str(f) in text), str(files[0]))
    if not match:
        if "Empty CSV file" in text:
            return DataError(f"{source}: the file is empty; it needs a header and at least one row")
        return DataError(
            f"{source}: cannot be read as {spec.format if spec.format != 'auto' else 'CSV/Parquet'} "
            f"({text.split(': ', 1)[-1]})"
        )
    col_index, line_no, to_type, value = (
        int(match.group(1)),
        int(match.group(2)),
        match.group(3),
        match.group(4),
    )
    opener = gzip.open if source.endswith(".gz") else open
    with opener(source, "rt", errors="replace") as handle:
        lines = [line.rstrip("\n") for _, line in zip(range(line_no), handle)]
    names = spec.csv_columns or (lines[0].split(spec.csv_delimiter) if lines else [])
    column = names[col_index].strip() if col_index < len(names) else f"#{col_index}"
    example = lines[-1][:300] if lines else ""
    return DataError(
        f"{source}: column {column!r}: text {value!r} in a numeric column (read as {to_type}) at "
        f"line {line_no}: {example!r}. Fix or remove the value, or declare the column under "
        f"features.categorical"
    )


def check_columns(
    schema_names: list[str], config: ExperimentConfig, source: str, table: pa.Table | None = None
) -> None:
    """Every column the config names exists; the error names the config field and suggests a close name."""
    wanted: list[tuple[str, str]] = []
    for kind in ("numeric", "multi_categorical", "categorical", "sequence"):
        for i, feat in enumerate(getattr(config.features, kind)):
            wanted.append((f"features.{kind}[{i}]", feat.column))
    for i, feat in enumerate(config.features.sequence):
        for key in ("actions_column", "times_column", "time_column"):
            if getattr(feat, key):
                wanted.append((f"features.sequence[{i}].{key}", getattr(feat, key)))
    for i, task in enumerate(config.tasks):
        wanted.append((f"tasks[{i}].column", task.column))
        if task.mask_column:
            wanted.append((f"tasks[{i}].mask_column", task.mask_column))
    if config.data.weight_column:
        wanted.append(("data.weight_column", config.data.weight_column))
    if config.data.split.method == "time":
        wanted.append(("data.split.time_column", config.data.split.time_column))
    for field_name, column in wanted:
        if column not in schema_names:
            close = difflib.get_close_matches(column, schema_names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            example = ""
            if table is not None and table.num_rows:
                example = f" (data row 0: {example_row(table, 0)})"
            raise DataError(
                f"{source}: column {column!r} named by {field_name} is not in the data "
                f"(columns: {schema_names[:25]}{'...' if len(schema_names) > 25 else ''}){example}. "
                f"{hint}Fix {field_name} in {config.source or 'the config'}"
            )


def head_rows(dataset: ds.Dataset, columns: list[str] | None, rows: int, batch_rows: int = 65_536) -> pa.Table:
    """The first ``rows`` rows, read one record batch at a time (``Dataset.head`` reads ahead across many
    fragments at once, which for a directory of shards costs memory proportional to the number of files)."""
    scanner = dataset.scanner(columns=columns, batch_size=batch_rows, batch_readahead=1, fragment_readahead=1)
    batches, have = [], 0
    for batch in scanner.to_batches():
        batches.append(batch.slice(0, rows - have))
        have += batches[-1].num_rows
        if have >= rows:
            break
    schema = dataset.schema if columns is None else pa.schema([dataset.schema.field(c) for c in columns])
    return pa.Table.from_batches(batches, schema=schema) if batches else schema.empty_table()


def read_table(
    data: Any, config: ExperimentConfig, source: str | None = None, max_rows: int = 0
) -> tuple[pa.Table, str]:
    """Read the columns the experiment needs from a path, DataFrame or Table: ``(table, source name)``.

    Fails with a :class:`DataError` for a missing file, an empty file, a column the config names that is not
    in the data, or text in a numeric CSV column.
    """
    spec = config.data
    if not isinstance(data, (str, Path)):
        table = as_table(data)
        name = source or "dataframe"
    elif spec.format in ("movielens-grouplens", "movielens-recbole"):
        table = read_movielens(data, spec.format.split("-")[1], spec.history)
        name = str(data)
    else:
        dataset = open_dataset(data, spec, config)
        name = str(data)
        files = getattr(dataset, "files", [name])
        try:
            missing = [c for c in config.input_columns() if c not in dataset.schema.names]
            example = head_rows(dataset, None, 1, 1) if missing and dataset.schema.names else None
            check_columns(dataset.schema.names, config, name, example)
            if max_rows:
                table = head_rows(dataset, config.input_columns(), max_rows)
            else:
                table = dataset.to_table(columns=config.input_columns())
        except pa.ArrowInvalid as err:
            raise _csv_error(err, [Path(f) for f in files], spec) from None
    check_columns(table.column_names, config, name, table)
    if table.num_rows == 0:
        raise DataError(f"{name}: no rows (only a header or an empty table); give at least one row")
    return table.select(config.input_columns()), name


def encode_labels(table: pa.Table, tasks: list[TaskSpec], source: str, config_source: str = "") -> np.ndarray:
    """Task labels ``[N, K]`` float32; NaN where a label is missing or masked.

    Binary labels must be 0/1 (or booleans), unless derived with ``positive`` (a comparison) or
    ``positive_values``; anything else fails naming the file, column and an example row.
    """
    labels = np.empty((table.num_rows, len(tasks)), dtype=np.float32)
    for k, task in enumerate(tasks):
        col = table.column(task.column)
        where = f"tasks[{k}] ({task.name!r})"
        if task.positive_values:
            values = pa.array(task.positive_values)
            if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                values = pa.array([str(v) for v in task.positive_values], pa.string())
            else:
                values = pc.cast(values, col.type)
            y = pc.is_in(col, value_set=values).to_numpy(zero_copy_only=False).astype(np.float32)
            y[~pc.is_valid(col).to_numpy(zero_copy_only=False)] = np.nan
            if not np.nanmax(y, initial=0) > 0:
                raise data_error(
                    source,
                    task.column,
                    f"no row has a value in {where}.positive_values {task.positive_values!r}",
                    "Check the values (string values keep their spaces, e.g. ' 50000+.')",
                    table,
                    0,
                )
        else:
            if not is_numeric_type(col.type):
                raise _label_type_error(table, task, where, source)
            x = numeric_column(table, task.column, source)
            if task.positive:
                op, threshold = parse_comparison(task.positive, f"{where}.positive")
                y = _OPS[op](x, threshold).astype(np.float32)
                y[np.isnan(x)] = np.nan
            else:
                if task.type == "regression":
                    check_regression_label(x, task, where, source, table)
                y = x.astype(np.float32)
                if task.type == "binary":
                    bad = np.flatnonzero(~np.isnan(y) & (y != 0) & (y != 1))
                    if bad.size:
                        raise data_error(
                            source,
                            task.column,
                            f"binary label {float(y[bad[0]])!r} is outside {{0, 1}} ({bad.size} such rows)",
                            f"Use type: regression, or derive the label with {where}.positive, e.g. positive: '>= 1'",
                            table,
                            int(bad[0]),
                        )
        if task.mask_column:
            mask = pc.fill_null(pc.cast(table.column(task.mask_column), pa.float64()), 0)
            y[mask.to_numpy(zero_copy_only=False) == 0] = np.nan
        labels[:, k] = y
    return labels


LABEL_LIMIT = float(np.sqrt(np.finfo(np.float32).max))  # ~1.8e19: the MSE of a larger label overflows float32


def check_regression_label(x: np.ndarray, task: TaskSpec, where: str, source: str, table: pa.Table) -> None:
    """A regression label is missing (NaN: the row has no label for the task) or finite with ``|y|`` below
    :data:`LABEL_LIMIT`; anything else fails naming the file, column and row (not an epoch later as a NaN)."""
    with np.errstate(invalid="ignore"):
        bad = np.flatnonzero(np.isinf(x) | (np.abs(x) >= LABEL_LIMIT))
    if bad.size:
        value = float(x[bad[0]])
        problem = "is not a finite number" if np.isinf(value) else f"is too large (|y| must be < {LABEL_LIMIT:.2g})"
        raise data_error(
            source,
            task.column,
            f"regression label {value!r} of {where} {problem} ({bad.size} such rows)",
            "Fix or drop those rows, leave them empty (no label), or rescale the column (e.g. log or divide)",
            table,
            int(bad[0]),
        )


def check_numeric_features(table: pa.Table, config: ExperimentConfig, source: str) -> None:
    """Numeric features hold numbers, are not all missing, and hold no ``+-inf`` unless ``clip`` bounds them (the
    policy of :mod:`mtrank.data.encoders`), checked on a whole file so that errors give its row numbers."""
    for position, feat in enumerate(config.features.numeric):
        x = numeric_column(table, feat.column, source)
        check_not_all_missing(x, source, feat.column, table)
        check_no_infinity(x, feat, position, source, table)


def _label_type_error(table: pa.Table, task: TaskSpec, where: str, source: str) -> DataError:
    col = table.column(task.column)
    bad = _first_non_numeric(col) if pa.types.is_string(col.type) else 0
    value = col[bad].as_py() if bad is not None else None
    return data_error(
        source,
        task.column,
        f"label of {where} has text {value!r} (type {col.type})",
        f"Give numbers, or derive the label with {where}.positive_values, e.g. positive_values: [{value!r}]",
        table,
        bad if bad is not None else 0,
    )


def encode_weights(table: pa.Table, column: str, source: str) -> np.ndarray | None:
    """Sample weights ``[N]`` float32 (None without a weight column); missing or negative weights fail."""
    if not column:
        return None
    w = numeric_column(table, column, source)
    bad = np.flatnonzero(~np.isfinite(w) | (w < 0))
    if bad.size:
        raise data_error(
            source,
            column,
            f"sample weight {float(w[bad[0]])!r} is missing or negative ({bad.size} rows)",
            "Fill or drop those rows, or remove data.weight_column",
            table,
            int(bad[0]),
        )
    return w.astype(np.float32)


def validate_table(table: pa.Table, config: ExperimentConfig, source: str) -> None:
    """Check a whole file before it is split, so errors give the row number in the file: numeric features hold
    finite numbers (or nothing) and are not all missing, labels are valid, weights are present and >= 0."""
    check_numeric_features(table, config, source)
    encode_labels(table, config.tasks, source)
    encode_weights(table, config.data.weight_column, source)
