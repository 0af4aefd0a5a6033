"""Stream a large CSV / JSON Lines file through the early-exit engine, writing one result per row.

Memory stays constant in the file's size: rows are read, classified and written one batch at a time.
A row whose text is empty is written with an `error` and no prediction, so no row is lost.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from badge.data import DataError
from badge.engine import EarlyExitEngine

OUTPUT_FIELDS = ("row", "label", "probability", "exit_layer", "error")


@dataclass
class PredictionSummary:
    """Counts of a prediction run."""

    rows: int
    errors: int
    mean_exit_layer: float


def _reader(path: Path) -> Iterator[dict[str, Any]]:
    suffix = path.suffix.lower()
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            if suffix in (".jsonl", ".json"):
                for number, line in enumerate(handle, start=1):
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except json.JSONDecodeError as error:
                            raise DataError(f"line {number} of {path} is not valid JSON: {error.msg}") from error
            elif suffix in (".csv", ".tsv"):
                yield from csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            else:
                raise DataError(f"{path}: expected a .csv, .tsv or .jsonl file, not {suffix or 'no suffix'}")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text (byte {error.start} cannot be decoded)") from error


def _count_rows(path: Path) -> int | None:
    with path.open("rb") as handle:
        lines = sum(1 for line in handle if line.strip())
    return lines - 1 if path.suffix.lower() in (".csv", ".tsv") else lines


PREDICTABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")

# A chunk is rows `(row number, text, text pair)` classified in one engine call, or one row whose text is bad.
Chunk = list[tuple[int, Any, Any]]


def read_chunks(
    source: Path, *, text_column: str = "text", text_pair_column: str | None = None, batch_size: int = 256
) -> Iterator[Chunk]:
    """The rows of `source` in order, as chunks of up to `batch_size` good rows or single rows without text.

    A row whose text is empty (or not a string) ends the chunk before it, so the output stays in input order.
    """
    batch: Chunk = []
    for number, record in enumerate(_reader(source), start=1):
        if text_column not in record:
            raise DataError(f"row {number} of {source} has no column {text_column!r}; it has {sorted(record)}")
        text = record[text_column]
        pair = record.get(text_pair_column) if text_pair_column else None
        if not isinstance(text, str) or not text.strip():
            if batch:
                yield batch
                batch = []
            yield [(number, text, pair)]
            continue
        batch.append((number, text, pair))
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_chunk(
    engine: EarlyExitEngine,
    chunk: Chunk,
    *,
    text_column: str = "text",
    with_pairs: bool = False,
    max_length: int | None = None,
) -> list[dict[str, Any]]:
    """Output records (`OUTPUT_FIELDS`) of one chunk from `read_chunks`: one engine call, or one error row."""
    if len(chunk) == 1 and (not isinstance(chunk[0][1], str) or not chunk[0][1].strip()):
        number, text, _ = chunk[0]
        error = f"empty or non-text {text_column!r}: {text!r}"
        return [{"row": number, "label": None, "probability": None, "exit_layer": None, "error": error}]
    label_names = engine.model.label_names
    task = engine.model.config.problem_type
    pairs = [pair for _, _, pair in chunk] if with_pairs else None
    result = engine.classify([text for _, text, _ in chunk], pairs, max_length=max_length)
    records = []
    for index, (number, _, _) in enumerate(chunk):
        predicted = result.labels[index]
        if task == "single_label_classification":
            label, probability = label_names[predicted], float(result.probs[index, predicted])
        elif task == "multi_label_classification":
            label, probability = "|".join(label_names[i] for i in predicted), None
        else:
            label, probability = predicted, None
        layer = int(result.exit_layers[index])
        records.append({"row": number, "label": label, "probability": probability, "exit_layer": layer, "error": None})
    return records


class PredictionWriter:
    """Writes output records to a .csv or .jsonl file through a hidden staging file, renamed when closed."""

    def __init__(self, target: Path) -> None:
        self.target = target
        target.parent.mkdir(parents=True, exist_ok=True)
        self.staging = target.with_name(f".{target.name}.partial")
        self.out = self.staging.open("w", encoding="utf-8", newline="")
        self.writer = csv.DictWriter(self.out, fieldnames=OUTPUT_FIELDS) if target.suffix.lower() == ".csv" else None
        if self.writer is not None:
            self.writer.writeheader()
        self.rows = self.errors = self.layer_sum = 0

    def write(self, record: dict[str, Any]) -> None:
        self.rows += 1
        if record["error"] is not None:
            self.errors += 1
        else:
            self.layer_sum += record["exit_layer"]
        if self.writer is not None:
            self.writer.writerow({k: ("" if v is None else v) for k, v in record.items()})
        else:
            self.out.write(json.dumps(record) + "\n")

    def abort(self) -> None:
        """Close and remove the staging file: a failed run leaves no partial output behind."""
        self.out.close()
        self.staging.unlink(missing_ok=True)

    def close(self) -> PredictionSummary:
        """Finish the file (it appears under its real name only now) and return its counts."""
        self.out.close()
        self.staging.replace(self.target)
        done = self.rows - self.errors
        return PredictionSummary(self.rows, self.errors, self.layer_sum / done if done else 0.0)


def predict_file(
    engine: EarlyExitEngine,
    source: Path,
    target: Path,
    *,
    text_column: str = "text",
    text_pair_column: str | None = None,
    batch_size: int = 256,
    max_length: int | None = None,
) -> PredictionSummary:
    """Classify every row of `source` and write `target` (.csv or .jsonl) with label, probability, exit layer.

    Texts are cut to `max_length` tokens (default: what the model was trained with)."""
    writer = PredictionWriter(target)
    try:
        with tqdm(total=_count_rows(source), desc=f"predicting {source.name}", unit="row") as progress:
            chunks = read_chunks(
                source, text_column=text_column, text_pair_column=text_pair_column, batch_size=batch_size
            )
            for chunk in chunks:
                records = predict_chunk(
                    engine, chunk, text_column=text_column, with_pairs=bool(text_pair_column), max_length=max_length
                )
                for record in records:
                    writer.write(record)
                progress.update(len(records))
    except BaseException:
        writer.abort()
        raise
    return writer.close()
