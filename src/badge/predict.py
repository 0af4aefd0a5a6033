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
    label_names = engine.model.label_names
    task = engine.model.config.problem_type
    rows = errors = layer_sum = 0
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial")
    as_csv = target.suffix.lower() == ".csv"
    with (
        staging.open("w", encoding="utf-8", newline="") as out,
        tqdm(total=_count_rows(source), desc=f"predicting {source.name}", unit="row") as progress,
    ):
        writer = csv.DictWriter(out, fieldnames=OUTPUT_FIELDS) if as_csv else None
        if writer is not None:
            writer.writeheader()

        def emit(record: dict[str, Any]) -> None:
            if writer is not None:
                writer.writerow({k: ("" if v is None else v) for k, v in record.items()})
            else:
                out.write(json.dumps(record) + "\n")

        def flush(batch: list[tuple[int, str, str | None]]) -> None:
            nonlocal layer_sum
            if not batch:
                return
            pairs = [pair for _, _, pair in batch] if text_pair_column else None
            result = engine.classify([text for _, text, _ in batch], pairs, max_length=max_length)
            for index, (number, _, _) in enumerate(batch):
                predicted = result.labels[index]
                if task == "single_label_classification":
                    label, probability = label_names[predicted], float(result.probs[index, predicted])
                elif task == "multi_label_classification":
                    label, probability = "|".join(label_names[i] for i in predicted), None
                else:
                    label, probability = predicted, None
                layer = int(result.exit_layers[index])
                layer_sum += layer
                emit({"row": number, "label": label, "probability": probability, "exit_layer": layer, "error": None})
            progress.update(len(batch))

        batch: list[tuple[int, str, str | None]] = []
        for number, record in enumerate(_reader(source), start=1):
            rows += 1
            if text_column not in record:
                raise DataError(f"row {number} of {source} has no column {text_column!r}; it has {sorted(record)}")
            text = record[text_column]
            pair = record.get(text_pair_column) if text_pair_column else None
            if not isinstance(text, str) or not text.strip():
                flush(batch)  # keep the output in input order
                batch = []
                errors += 1
                emit(
                    {
                        "row": number,
                        "label": None,
                        "probability": None,
                        "exit_layer": None,
                        "error": f"empty or non-text {text_column!r}: {text!r}",
                    }
                )
                progress.update(1)
                continue
            batch.append((number, text, pair))
            if len(batch) >= batch_size:
                flush(batch)
                batch = []
        flush(batch)
    staging.replace(target)
    done = rows - errors
    return PredictionSummary(rows=rows, errors=errors, mean_exit_layer=layer_sum / done if done else 0.0)
