"""Every exit's logits for a dataset, in one pass of the model: loaders, length-sorted batches, padding,
and the plain Hugging Face forward the engine is timed against.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from badge.comparison import SplitLogits
from badge.data import EncodedDataset, TextDataset, collate, encode
from badge.modeling import MultiExitModel


@torch.no_grad()
def collect_exit_logits(
    model: MultiExitModel, loader: DataLoader, accelerator: Accelerator | None = None, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of every exit (N, E, K) and labels for a whole loader (gathered across processes)."""
    model.eval()
    all_logits, all_labels = [], []
    for batch in tqdm(loader, desc="evaluating", disable=not progress, leave=False):
        labels = batch.pop("labels")
        if accelerator is None:  # a prepared loader already yields batches on the model's device
            batch = {key: value.to(model.device) for key, value in batch.items()}
        output = model(**batch)
        logits = torch.stack(output.exit_logits, dim=1)  # (B, E, K)
        if accelerator is not None:
            logits, labels = accelerator.gather_for_metrics((logits, labels))
        all_logits.append(logits.float().cpu())
        all_labels.append(labels.cpu())
    return torch.cat(all_logits), torch.cat(all_labels)


def length_sorted_batches(
    encoded: dict[str, torch.Tensor], batch_size: int, sort: bool = True
) -> list[dict[str, torch.Tensor]]:
    """Split right-padded inputs (N, T) into batches of similar length, each trimmed to its longest row.

    One-dimensional entries (labels) are split along with them. `sort=False` keeps the input order."""
    lengths = encoded["attention_mask"].sum(dim=1)
    order = torch.argsort(lengths, stable=True) if sort else torch.arange(len(lengths))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = int(lengths[rows].max())
        batches.append(
            {key: value[rows, :width] if value.dim() == 2 else value[rows] for key, value in encoded.items()}
        )
    return batches


@torch.inference_mode()
def plain_forward(model: MultiExitModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The plain Hugging Face model: the encoder's own forward over all layers, then the final classifier."""
    inputs = {key: value.to(model.device) for key, value in batch.items() if key != "labels"}
    hidden = model.encoder(**inputs).last_hidden_state
    return model.exit_logits(model.num_layers, hidden, inputs["attention_mask"])


def encode_padded(
    dataset: TextDataset, tokenizer: Any, max_length: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Tokenise a whole dataset into right-padded (N, T) tensors and a labels tensor."""
    encoded = encode(dataset, tokenizer, max_length)
    rows = [EncodedDataset(encoded)[i] for i in range(len(dataset))]
    batch = collate(rows, tokenizer)
    labels = batch.pop("labels")
    return batch, labels


def exit_logits_for(
    model: MultiExitModel, inputs: dict[str, torch.Tensor], labels: torch.Tensor, batch_size: int = 32
) -> tuple[torch.Tensor, int]:
    """All exits' logits (N, E, K) for padded inputs, in input order, and the mean sequence length (for FLOPs).

    Batches hold texts of similar length, so little time goes into padding."""
    lengths = inputs["attention_mask"].sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    sorted_inputs = {key: value[order] for key, value in {**inputs, "labels": labels}.items()}
    loader = length_sorted_batches(sorted_inputs, batch_size, sort=False)
    exit_logits, _ = collect_exit_logits(model, loader, progress=True)
    in_order = torch.empty_like(exit_logits)
    in_order[order] = exit_logits
    return in_order, int(lengths.float().mean().round())


def split_logits(
    model: MultiExitModel, dataset: TextDataset, max_length: int, batch_size: int = 32
) -> tuple[SplitLogits, dict[str, torch.Tensor], int]:
    """Every exit's logits on a labelled dataset, its padded inputs, and the mean sequence length."""
    inputs, labels = encode_padded(dataset, model.tokenizer, max_length)
    exit_logits, seq_len = exit_logits_for(model, inputs, labels, batch_size)
    return SplitLogits(exit_logits, labels, model.exit_layers, model.config.problem_type), inputs, seq_len
