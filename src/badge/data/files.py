"""Reading the rows of a user's file one at a time: .csv / .tsv / .jsonl / .json, or a `datasets` folder.

`read_rows` is the one reader of a user's rows: prediction streams it, `load_file` collects it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from badge.data.dataset import DataError


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
    from badge.extras import missing

    if missing("datasets"):
        raise DataError(f"{source} is a datasets folder: reading it needs pip install 'badge[datasets]'")
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
