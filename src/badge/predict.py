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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from badge.data import DataError, read_rows, row_text, text_columns
from badge.engine import EarlyExitEngine
from badge.tasks import get_task

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


# A chunk is rows (row number, text, text pair, error) classified in one engine call, or one row that cannot be
# classified (its error says why). Plain tuples, so that Ray can ship chunks between processes as JSON.
Chunk = list[tuple[int, Any, Any, str | None]]
PREDICTABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


def read_chunks(
    source: Path,
    *,
    text_column: str = "text",
    text_pair_column: str | None = None,
    batch_size: int = 256,
    skip: int = 0,
) -> Iterator[Chunk]:
    """The rows of `source` after row `skip`, in order: chunks of up to `batch_size` good rows, and single rows
    that cannot be classified (with their reason, as training would word it).

    Raises `DataError` for a problem of the whole file (missing, unsupported, empty) before yielding anything.
    """
    rows = read_rows(source)
    text_column, text_pair_column = text_columns(rows, text_column, text_pair_column)
    rows_iter = iter(rows)
    first = next(rows_iter)  # an empty file raises DataError here
    batch: Chunk = []
    for row in itertools.chain([first], rows_iter):
        if row.number <= skip:  # written by the run this one resumes
            continue
        try:
            if row.problem is not None:
                raise DataError(row.problem)
            text = row_text(row.values, row.number, rows.source, text_column)
            pair = row_text(row.values, row.number, rows.source, text_pair_column) if text_pair_column else None
        except DataError as error:
            if batch:  # keep the output in input order
                yield batch
                batch = []
            yield [(row.number, None, None, str(error))]
            continue
        batch.append((row.number, text, pair, None))
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_chunk(
    engine: EarlyExitEngine, chunk: Chunk, *, with_pairs: bool = False, max_length: int | None = None
) -> list[dict[str, Any]]:
    """Output records (`OUTPUT_FIELDS`) of one chunk from `read_chunks`: one engine call, or one error row."""
    if len(chunk) == 1 and chunk[0][3] is not None:
        return [{"row": chunk[0][0], "label": None, "probability": None, "exit_layer": None, "error": chunk[0][3]}]
    label_names = engine.model.label_names
    task = get_task(engine.model.config.problem_type)
    pairs = [pair for _, _, pair, _ in chunk] if with_pairs else None
    result = engine.classify([text for _, text, _, _ in chunk], pairs, max_length=max_length)
    records = []
    for index, (number, _, _, _) in enumerate(chunk):
        predicted = result.labels[index]
        label = task.label_of(predicted, label_names)
        if task.multi_label:
            label = "|".join(label)  # as a training file's cell holds several labels
        probability = task.probability_of(predicted, result.probs[index])
        layer = int(result.exit_layers[index])
        records.append({"row": number, "label": label, "probability": probability, "exit_layer": layer, "error": None})
    return records


class PredictionWriter:
    """Writes output records to `TARGET.partial`, which takes the name `TARGET` when closed.

    With `resume`, the partial output an interrupted run left is checked, cut after its last whole record and
    appended to; `written` then counts its rows.
    """

    def __init__(self, target: Path, resume: bool = False) -> None:
        self.target = target
        self.partial = partial_path(target)
        self.as_csv = target.suffix.lower() == ".csv"
        target.parent.mkdir(parents=True, exist_ok=True)
        self.written = _resume_point(self.partial, self.as_csv) if resume else _Written()
        self.out = self.partial.open("a" if resume else "w", encoding="utf-8", newline="")
        self.writer = csv.DictWriter(self.out, fieldnames=OUTPUT_FIELDS) if self.as_csv else None
        if self.writer is not None and self.out.tell() == 0:
            self.writer.writeheader()

    def write(self, record: dict[str, Any]) -> None:
        self.written.add(record)
        if self.writer is not None:
            self.writer.writerow({k: ("" if v is None else v) for k, v in record.items()})
        else:
            self.out.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        self.out.flush()  # whole chunks reach the file, so a resumed run loses little

    def abort(self) -> None:
        """Close and remove the partial output (for runs that cannot be resumed)."""
        self.out.close()
        self.partial.unlink(missing_ok=True)

    def close(self) -> PredictionSummary:
        """Finish the file (it appears under its real name only now) and return its counts."""
        self.out.close()
        self.partial.replace(self.target)
        done = self.written.rows - self.written.errors
        return PredictionSummary(self.written.rows, self.written.errors, self.written.layer_sum / done if done else 0.0)


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
    chunks = read_chunks(source, text_column=text_column, text_pair_column=text_pair_column, batch_size=batch_size)
    first = next(chunks, None)  # problems of the whole file are raised here, before the output is opened
    writer = PredictionWriter(target, resume)
    skipped = writer.written.rows
    if resume:
        chunks = read_chunks(
            source, text_column=text_column, text_pair_column=text_pair_column, batch_size=batch_size, skip=skipped
        )
        first = next(chunks, None)
    with tqdm(total=_count_rows(source), initial=skipped, desc=f"predicting {source.name}", unit="row") as bar:
        for chunk in itertools.chain([first] if first else [], chunks):
            for record in predict_chunk(engine, chunk, with_pairs=text_pair_column is not None, max_length=max_length):
                writer.write(record)
            writer.flush()
            bar.update(len(chunk))
    return writer.close()
