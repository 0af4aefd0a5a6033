"""Tokenising and batching: `encode` tokenises without padding; `collate` pads one batch."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader

from badge.data.dataset import TextDataset


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


def collate(batch_rows: list[dict], tokenizer: Any) -> dict[str, torch.Tensor]:
    """Right-pad a list of `EncodedDataset` items into tensors with the tokenizer's own `pad`.

    This is what transformers' `DataCollatorWithPadding` calls, with the side fixed: the engine and
    `length_sorted_batches` trim rows by their attention mask's sum, which needs the padding on the right
    whatever the tokenizer's `padding_side`. Returns input_ids, attention_mask (and token_type_ids) as
    (B, T) long tensors, T = the longest row, and labels as (B,) long (single-label), (B, K) float
    (multi-label, for the binary cross-entropy) or (B,) float (regression).
    """
    batch = dict(tokenizer.pad(batch_rows, padding="longest", padding_side="right", return_tensors="pt"))
    labels = batch.get("labels")
    if labels is not None and labels.dim() == 2:  # multi-hot ids are ints; the loss wants floats
        batch["labels"] = labels.float()
    return batch


def make_loader(
    dataset: TextDataset, tokenizer: Any, max_length: int, batch_size: int, shuffle: bool, seed: int = 0
) -> DataLoader:
    """Tokenise a dataset and wrap it in a DataLoader that pads each batch to its longest row."""
    encoded = encode(dataset, tokenizer, max_length)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        EncodedDataset(encoded),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=partial(collate, tokenizer=tokenizer),
    )
