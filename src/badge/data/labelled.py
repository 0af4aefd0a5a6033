"""A labelled file as a `TextDataset`: text columns, label parsing and checking (`load_file`).

Every problem a user can cause in a file raises `DataError` with the file, the row (1-based data row), the
column, the bad value and what was expected.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

from badge.config import TASKS
from badge.data.dataset import MULTI_LABEL_SEPARATOR, DataError, TextDataset
from badge.data.files import Rows, _cell_error, _read_table, _show, _Table, row_text, row_value
from badge.tasks import get_task


def _missing_column(table: _Table, column: str, role: str, hint: str = "") -> DataError:
    return DataError(f'{table.source} has no {role} column "{column}"; its columns are {_show(table.columns)}{hint}')


def _text_columns(table: _Table, text_column: str, text_pair_column: str | None) -> tuple[str, str | None]:
    """The (text, pair) columns to read: as given, or text_a / text_b when `text` is absent."""
    if text_pair_column is None and text_column == "text" and "text" not in table.columns:
        if "text_a" in table.columns and "text_b" in table.columns:
            return "text_a", "text_b"
    for column in (text_column, text_pair_column):
        if column is not None and column not in table.columns:
            raise _missing_column(table, column, "text", " (for sentence pairs use text_a and text_b)")
    return text_column, text_pair_column


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
    if not get_task(task).has_classes:
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
    multi_label = get_task(task).multi_label
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
        labels, names = [], label_names if get_task(task).has_classes else None
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


def text_columns(rows: Rows, text_column: str, text_pair_column: str | None) -> tuple[str, str | None]:
    """The (text, pair) columns of a delimited file (see `_text_columns`); JSON rows are checked row by row."""
    if rows.columns is None:
        return text_column, text_pair_column
    return _text_columns(_Table(rows.source, rows.columns, [], {}), text_column, text_pair_column)
