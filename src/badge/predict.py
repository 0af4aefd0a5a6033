"""Stream a large CSV / JSON Lines file through the early-exit engine, writing one result per row.

Memory stays constant in the file's size: rows are read (`badge.data.read_rows`, the reader training and
evaluation use), classified and written one batch at a time. A row that cannot be read or has no usable
text is written with an `error` and no prediction, so no row is lost and row i of the output is row i of
the input. The output grows in `TARGET.partial` and takes its name only when every row is written; an
interrupted run continues from the partial file with `resume=True` and ends with the same rows.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from badge.data import DataError, read_rows, row_text, text_columns
from badge.engine import EarlyExitEngine

OUTPUT_FIELDS = ("row", "label", "probability", "exit_layer", "error")
OUTPUT_TYPES = (".csv", ".jsonl")


@dataclass
class PredictionSummary:
    """Counts of a prediction run (rows written by an interrupted run it resumed included)."""

    rows: int
    errors: int
    mean_exit_layer: float


def partial_path(target: Path) -> Path:
    """Where the output grows until every row is written."""
    return target.with_name(target.name + ".partial")


def check_output(source: Path, target: Path) -> None:
    """Refuse, before any work, an output that is the input, a folder, or neither .csv nor .jsonl."""
    if target.is_dir():
        raise DataError(f"output {target} is a folder; expected a .csv or .jsonl file to write")
    if target.suffix.lower() not in OUTPUT_TYPES:
        raise DataError(f"output {target} has type {target.suffix or 'none'!r}; expected .csv or .jsonl")
    same = target.exists() and source.exists() and os.path.samefile(source, target)
    if same or target.resolve() == source.resolve():
        raise DataError(f"output {target} is the input file; write the predictions to another file")


def _count_rows(path: Path) -> int | None:
    with path.open("rb") as handle:
        lines = sum(1 for line in handle if line.strip())
    return lines - 1 if path.suffix.lower() in (".csv", ".tsv") else lines


@dataclass
class _Written:
    rows: int = 0
    errors: int = 0
    layer_sum: int = 0

    def add(self, record: dict[str, Any]) -> None:
        self.rows += 1
        if record.get("error"):
            self.errors += 1
        elif record.get("exit_layer") not in (None, ""):
            self.layer_sum += int(record["exit_layer"])


def _resume_point(partial: Path, as_csv: bool) -> _Written:
    """Read what an interrupted run wrote, cut a half-written last record, and return its counts.

    Raises `DataError` when there is no partial output, or it is not rows 1..n of this output format.
    """
    if not partial.is_file():
        raise DataError(f"--resume: there is no partial output {partial} to continue; run without --resume")
    raw = partial.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]  # a kill mid-write leaves at most one unfinished line
    text = complete.decode("utf-8")
    written = _Written()
    try:
        if as_csv:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            if text and tuple(reader.fieldnames or ()) != OUTPUT_FIELDS:
                raise ValueError(f"its header is {reader.fieldnames}, expected {list(OUTPUT_FIELDS)}")
            records = list(reader)
        else:
            records = [json.loads(line) for line in text.split("\n") if line.strip()]
        for number, record in enumerate(records, start=1):
            if int(record["row"]) != number:
                raise ValueError(f"record {number} is row {record['row']}")
            written.add(record)
    except (ValueError, KeyError, TypeError, csv.Error) as error:
        raise DataError(f"--resume: {partial} is not the partial output of this command ({error}); delete it") from None
    with partial.open("r+b") as handle:
        handle.truncate(len(complete))
    return written


def predict_file(
    engine: EarlyExitEngine,
    source: Path,
    target: Path,
    *,
    text_column: str = "text",
    text_pair_column: str | None = None,
    batch_size: int = 256,
    max_length: int | None = None,
    resume: bool = False,
) -> PredictionSummary:
    """Classify every row of `source` and write `target` (.csv or .jsonl) with label, probability, exit layer.

    Texts are cut to `max_length` tokens (default: what the model was trained with). `resume` continues
    the partial output an interrupted run left (`partial_path(target)`). Raises `DataError`, before
    any row is classified, for an unusable output path or input file (missing, empty, unsupported).
    """
    source, target = Path(source), Path(target)
    check_output(source, target)
    rows = read_rows(source)
    text_column, text_pair_column = text_columns(rows, text_column, text_pair_column)
    rows_iter = iter(rows)
    first = next(rows_iter)  # an empty file raises DataError here, before the output is opened
    label_names = engine.model.label_names
    task = engine.model.config.problem_type
    as_csv = target.suffix.lower() == ".csv"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(target)
    written = _resume_point(partial, as_csv) if resume else _Written()
    with (
        partial.open("a" if resume else "w", encoding="utf-8", newline="") as out,
        tqdm(total=_count_rows(source), initial=written.rows, desc=f"predicting {source.name}", unit="row") as bar,
    ):
        writer = csv.DictWriter(out, fieldnames=OUTPUT_FIELDS) if as_csv else None
        if writer is not None and out.tell() == 0:
            writer.writeheader()

        def emit(record: dict[str, Any]) -> None:
            written.add(record)
            if writer is not None:
                writer.writerow({k: ("" if v is None else v) for k, v in record.items()})
            else:
                out.write(json.dumps(record) + "\n")

        classify = _classifier(engine, task, label_names, text_pair_column is not None, max_length)
        batch: list[tuple[int, str, str | None]] = []

        def flush() -> None:
            for record in classify(batch):
                emit(record)
            bar.update(len(batch))
            batch.clear()
            out.flush()  # whole batches reach the file, so a resumed run loses little

        for row in itertools.chain([first], rows_iter):
            if row.number <= written.rows:  # written by the run this one resumes
                continue
            try:
                if row.problem is not None:
                    raise DataError(row.problem)
                text = row_text(row.values, row.number, rows.source, text_column)
                pair = row_text(row.values, row.number, rows.source, text_pair_column) if text_pair_column else None
            except DataError as error:
                flush()  # keep the output in input order
                emit({"row": row.number, "label": None, "probability": None, "exit_layer": None, "error": str(error)})
                bar.update(1)
                continue
            batch.append((row.number, text, pair))
            if len(batch) >= batch_size:
                flush()
        flush()
    partial.replace(target)
    done = written.rows - written.errors
    return PredictionSummary(written.rows, written.errors, written.layer_sum / done if done else 0.0)


def _classifier(
    engine: EarlyExitEngine, task: str, label_names: list[str], pairs: bool, max_length: int | None
) -> Callable[[list[tuple[int, str, str | None]]], list[dict[str, Any]]]:
    """A function from a batch of (row, text, pair) to the output records of those rows."""

    def classify(batch: list[tuple[int, str, str | None]]) -> list[dict[str, Any]]:
        if not batch:
            return []
        texts = [text for _, text, _ in batch]
        result = engine.classify(texts, [pair for _, _, pair in batch] if pairs else None, max_length=max_length)
        records = []
        for index, (number, _, _) in enumerate(batch):
            predicted = result.labels[index]
            if task == "single_label_classification":
                label, probability = label_names[predicted], float(result.probs[index, predicted])
            elif task == "multi_label_classification":
                label, probability = "|".join(label_names[i] for i in predicted), None
            else:
                label, probability = predicted, None
            layer = int(result.exit_layers[index])
            records.append(
                {"row": number, "label": label, "probability": probability, "exit_layer": layer, "error": None}
            )
        return records

    return classify
