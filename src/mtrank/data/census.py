"""UCI Census-Income (KDD): the real-data benchmark of Ma et al. (KDD 2018), preprocessed as in the paper.

Files: ``census-income.data(.gz)`` (199,523 training rows) and ``census-income.test(.gz)`` (99,762 rows),
no header, 42 comma-separated columns (40 features, ``instance_weight``, the income label). Either given as a
folder, or downloaded from UCI and checked against the SHA-256 of their uncompressed bytes.

Preprocessing (the paper's, with what it leaves open marked [ours]):

* ``education`` and ``marital_stat`` are removed from the inputs (they are labels); ``instance_weight`` is a
  sampling weight, not a feature: 38 input columns remain.
* 31 categorical columns -> ids; the vocabulary is fitted on the training file, id 0 is the out-of-vocabulary
  bucket for values seen only in the test file [ours]. They are embedded by the model.
* 7 numeric columns -> standardised with the training file's mean and std [ours: the paper says "scaled"].
* Tasks, group 1: ``income`` (> 50K) + ``marital`` (never married); group 2: ``education`` (associates degree
  or higher, which reproduces the paper's |Pearson| 0.2373) + ``marital``.
* The test file is split 1:1 at random (fixed seed) into validation and test.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mtrank.config import TaskConfig
from mtrank.data.tensors import TensorData

COLUMNS = [
    "age", "class_worker", "det_ind_code", "det_occ_code", "education", "wage_per_hour", "hs_college",
    "marital_stat", "major_ind_code", "major_occ_code", "race", "hisp_origin", "sex", "union_member",
    "unemp_reason", "full_or_part_emp", "capital_gains", "capital_losses", "stock_dividends",
    "tax_filer_stat", "region_prev_res", "state_prev_res", "det_hh_fam_stat", "det_hh_summ",
    "instance_weight", "mig_chg_msa", "mig_chg_reg", "mig_move_reg", "mig_same", "mig_prev_sunbelt",
    "num_emp",
    "fam_under_18", "country_father", "country_mother", "country_self", "citizenship", "own_or_self",
    "vet_question", "vet_benefits", "weeks_worked", "year", "income_50k",
]  # fmt: skip
NUMERIC = [
    "age",
    "wage_per_hour",
    "capital_gains",
    "capital_losses",
    "stock_dividends",
    "num_emp",
    "weeks_worked",
]
REMOVED = ["education", "marital_stat", "instance_weight", "income_50k"]  # labels and the sampling weight
CATEGORICAL = [c for c in COLUMNS if c not in NUMERIC and c not in REMOVED]

ASSOCIATES_OR_HIGHER = {
    "Associates degree-occup /vocational",
    "Associates degree-academic program",
    "Bachelors degree(BA AB BS)",
    "Masters degree(MA MS MEng MEd MSW MBA)",
    "Prof school degree (MD DDS DVM LLB JD)",
    "Doctorate degree(PhD EdD)",
}
PAPER_CORRELATION = {1: 0.1768, 2: 0.2373}  # |Pearson| of the two labels, Ma et al. section 5.2

FILES = {"train": "census-income.data", "test": "census-income.test"}
# SHA-256 of the uncompressed files (the same bytes whether a user has them plain or gzipped)
SHA256 = {
    "train": "3676a81db7d3528f3f8b9f3c699d0f0aa28db45e6e994fa0b8ed38327539ee86",
    "test": "98402b1ab879573d0a7f38a699a40258080e25e33d3401e7bf9c96d3fa0fab8c",
}
UCI_URL = "https://archive.ics.uci.edu/ml/machine-learning-databases/census-income-mld/{name}.gz"


class CensusDataError(ValueError):
    """The census files are missing, corrupt or not in the UCI layout; the message names the file."""


@dataclass
class CensusData:
    """The three splits of one task group, with what the model needs to read them.

    Attributes:
        train, valid, test: rows as :class:`TensorData` (dense = 7 standardised numeric columns, sparse = 31
            categorical ids, labels ``[N, 2]`` float 0/1: main task, marital).
        tasks: the two binary tasks, main first.
        vocab_sizes: vocabulary size of each categorical column (OOV bucket included).
        label_correlation: Pearson correlation of the two labels on the training file.
        group: 1 (income) or 2 (education).
        valid_rows, test_rows: which rows of the test file went to validation and to test.
    """

    train: TensorData
    valid: TensorData
    test: TensorData
    tasks: list[TaskConfig]
    vocab_sizes: list[int]
    label_correlation: float
    group: int
    valid_rows: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    test_rows: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    numeric_columns: list[str] = field(default_factory=lambda: list(NUMERIC))
    categorical_columns: list[str] = field(default_factory=lambda: list(CATEGORICAL))

    @property
    def num_dense(self) -> int:
        return len(self.numeric_columns)


def _file_path(folder: Path, split: str) -> Path:
    for candidate in (folder / FILES[split], folder / f"{FILES[split]}.gz"):
        if candidate.is_file():
            return candidate
    raise CensusDataError(
        f"{folder / FILES[split]}(.gz) not found: give the folder holding census-income.data(.gz) and "
        "census-income.test(.gz), or pass download=True to fetch them from UCI"
    )


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if path.suffix == ".gz" else raw


def sha256_uncompressed(path: Path) -> str:
    """SHA-256 of a census file's uncompressed bytes."""
    return hashlib.sha256(_read_bytes(path)).hexdigest()


def download_census(folder: str | Path) -> Path:
    """Fetch both files from UCI into ``folder`` (gzipped) and check their checksums; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, name in FILES.items():
        target = folder / f"{name}.gz"
        if not target.is_file():
            url = UCI_URL.format(name=name)
            with urllib.request.urlopen(url, timeout=120) as response:  # noqa: S310 (fixed https URL)
                target.write_bytes(response.read())
        verify_checksum(target, split)
    return folder


def verify_checksum(path: Path, split: str) -> None:
    """Raise :class:`CensusDataError` unless ``path`` holds the UCI file of ``split`` (train / test)."""
    digest = sha256_uncompressed(path)
    if digest != SHA256[split]:
        raise CensusDataError(
            f"{path}: SHA-256 of the uncompressed file is {digest}, expected {SHA256[split]} (the UCI "
            f"{FILES[split]}); the file is incomplete or not the UCI original: delete it and download again"
        )


def read_census_file(path: str | Path) -> pd.DataFrame:
    """One census file as a DataFrame with the 42 UCI column names; string values stripped of spaces."""
    path = Path(path)
    try:
        frame = pd.read_csv(
            io.BytesIO(_read_bytes(path)),
            header=None,
            names=COLUMNS,
            skipinitialspace=True,
            keep_default_na=False,
        )  # "NA" is a real value (hisp_origin)
    except (OSError, EOFError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise CensusDataError(f"{path}: cannot read it as the UCI census-income file ({err})") from None
    if frame.shape[1] != len(COLUMNS) or frame["income_50k"].isna().any():
        raise CensusDataError(f"{path}: expected {len(COLUMNS)} comma-separated columns per row (the UCI layout)")
    for column in NUMERIC:
        if not pd.api.types.is_numeric_dtype(frame[column]):
            bad = frame[column][pd.to_numeric(frame[column], errors="coerce").isna()].iloc[0]
            raise CensusDataError(f"{path}: column {column!r} must be numeric, found {bad!r}")
    return frame


def census_labels(frame: pd.DataFrame, group: int) -> np.ndarray:
    """``[N, 2]`` float32 0/1 labels: (main task of ``group``, never married)."""
    if group == 1:
        main = frame["income_50k"].astype(str).str.strip().eq("50000+.")
    elif group == 2:
        main = frame["education"].astype(str).str.strip().isin(ASSOCIATES_OR_HIGHER)
    else:
        raise ValueError(f"group must be 1 (income) or 2 (education), got {group}")
    marital = frame["marital_stat"].astype(str).str.strip().eq("Never married")
    return np.stack([main.to_numpy(), marital.to_numpy()], 1).astype(np.float32)


def _encode(train: pd.DataFrame, other: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Categorical ids, vocabulary from ``train`` (0 = out of vocabulary), for both frames."""
    train_ids, other_ids, sizes = [], [], []
    for column in CATEGORICAL:
        vocab = pd.Index(sorted(train[column].astype(str).unique()))
        train_ids.append(vocab.get_indexer(train[column].astype(str)) + 1)
        other_ids.append(vocab.get_indexer(other[column].astype(str)) + 1)  # unseen: -1 + 1 = 0
        sizes.append(len(vocab) + 1)
    return np.stack(train_ids, 1), np.stack(other_ids, 1), sizes


def load_census(
    path: str | Path,
    group: int = 1,
    split_seed: int = 0,
    download: bool = False,
    check: bool = True,
) -> CensusData:
    """Load, preprocess and split the census data for one task group (see the module docstring).

    Args:
        path: folder with ``census-income.data(.gz)`` and ``census-income.test(.gz)``.
        group: 1 = income + marital, 2 = education + marital.
        split_seed: seed of the 1:1 split of the test file into validation and test.
        download: fetch missing files from UCI into ``path`` first.
        check: verify the files' SHA-256 (off only for deliberately modified copies).

    Example:
        >>> data = load_census(shared_data / "census-income", group=1)  # shared_data: the data folder
        >>> data.train.sparse.shape, len(data.valid), len(data.test), [t.name for t in data.tasks]
        (torch.Size([199523, 31]), 49881, 49881, ['income', 'marital'])
    """
    if group not in (1, 2):
        raise ValueError(f"group must be 1 (income) or 2 (education), got {group}")
    folder = Path(path)
    if download:
        download_census(folder)
    files = {split: _file_path(folder, split) for split in FILES}
    if check:
        for split, file in files.items():
            verify_checksum(file, split)
    train_frame, test_frame = read_census_file(files["train"]), read_census_file(files["test"])

    train_ids, test_ids, vocab_sizes = _encode(train_frame, test_frame)
    numeric_train = train_frame[NUMERIC].to_numpy(np.float64)
    mean, std = numeric_train.mean(0), numeric_train.std(0)
    std[std == 0] = 1.0

    def rows(frame: pd.DataFrame, ids: np.ndarray) -> TensorData:
        dense = (frame[NUMERIC].to_numpy(np.float64) - mean) / std
        return TensorData(
            dense=torch.from_numpy(dense.astype(np.float32)),
            sparse=torch.from_numpy(ids.astype(np.int64)),
            labels=torch.from_numpy(census_labels(frame, group)),
        )

    train, held_out = rows(train_frame, train_ids), rows(test_frame, test_ids)
    order = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(split_seed))
    half = len(held_out) // 2
    valid_rows, test_rows = order[:half].sort().values, order[half:].sort().values
    valid, test = held_out[valid_rows], held_out[test_rows]
    labels = train.labels.double()
    correlation = float(torch.corrcoef(labels.T)[0, 1])
    main = "income" if group == 1 else "education"
    tasks = [TaskConfig(main, "binary"), TaskConfig("marital", "binary")]
    return CensusData(train, valid, test, tasks, vocab_sizes, correlation, group, valid_rows, test_rows)
