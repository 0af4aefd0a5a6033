"""What every loader returns: a `TextDataset` of texts and labels, or a `DataError` naming the bad value."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
