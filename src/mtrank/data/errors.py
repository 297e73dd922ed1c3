"""Errors and warnings about input data, written for the person who has to fix the file."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pyarrow as pa


class DataError(ValueError):
    """The data does not match the experiment; the message names file, column, an example row and a fix."""


class DataWarning(UserWarning):
    """The data is legal but suspicious (a label used as a feature, a constant label, many unseen categories);
    the message names file and column and says what to check. ``mtrank`` commands print it on one line."""


def warn(message: str) -> None:
    """Emit a :class:`DataWarning`."""
    warnings.warn(message, DataWarning, stacklevel=3)


def example_row(
    table: pa.Table | pa.RecordBatch, index: int, columns: list[str] | None = None, max_columns: int = 8
) -> str:
    """Row ``index`` (0-based) of ``table`` as ``{column: value, ...}``, the named columns first, at most
    ``max_columns`` entries so messages stay readable."""
    if table.num_rows == 0:
        return "{}"
    index = min(max(index, 0), table.num_rows - 1)
    names = list(dict.fromkeys([*(columns or []), *table.column_names]))[:max_columns]
    names = [n for n in names if n in table.column_names]
    row: dict[str, Any] = {name: table.column(name)[index].as_py() for name in names}
    more = "" if len(table.column_names) <= len(names) else ", ..."
    return "{" + ", ".join(f"{k!r}: {v!r}" for k, v in row.items()) + more + "}"


def data_error(
    source: str,
    column: str | None,
    problem: str,
    fix: str,
    table: pa.Table | pa.RecordBatch | None = None,
    row: int | None = None,
    first_row: int = 0,
) -> DataError:
    """A :class:`DataError` reading ``SOURCE: column 'C': PROBLEM (data row R: {...}). FIX`` (0-based; ``table``
    may be a slice of the data that starts at row ``first_row``)."""
    where = f"{source}: " + (f"column {column!r}: " if column else "")
    example = ""
    if table is not None and table.num_rows > 0:
        index = 0 if row is None else int(row)
        example = f" (data row {first_row + index}: {example_row(table, index, [column] if column else None)})"
    return DataError(f"{where}{problem}{example}. {fix}")


def check_not_all_missing(values, source: str, column: str, table: pa.Table) -> None:
    """Raise a :func:`data_error` when a numeric column has no finite value at all."""
    if not np.isfinite(values).any():
        raise data_error(
            source,
            column,
            f"every value is missing (all {len(values)} rows are null/NaN)",
            "Remove the feature from features.numeric or fix the column",
            table,
            0,
        )
