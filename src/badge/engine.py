"""Layer-by-layer early-exit inference with per-sample exits inside real batches.

A batch runs one layer at a time. After each layer that carries an exit, the exit rule decides per
row; rows that leave are recorded and dropped from the batch at once, so deeper layers run on fewer
rows, and padding columns no row still needs are cut off. A sample's answer does not depend on its
batch: the rule's state is per row, and padding is masked out of attention and pooling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from badge.modeling import MultiExitModel
from badge.rules import ExitPolicy, select_rows


@dataclass
class EngineOutput:
    """Per-sample results, in input order.

    labels: predicted class id per sample (single-label), list of label ids (multi-label), or value (regression).
    probs: (N, K) probabilities of the exit that answered (the value itself for regression).
    exit_layers: (N,) 1-based layer each sample left after.
    logits: (N, K) logits of the exit that answered.
    """

    labels: list
    probs: torch.Tensor
    exit_layers: torch.Tensor
    logits: torch.Tensor


def predictions_from_logits(logits: torch.Tensor, task: str) -> tuple[list, torch.Tensor]:
    """Labels and probabilities from (N, K) logits for the given task."""
    if task == "regression":
        values = logits.float().squeeze(-1)
        return values.tolist(), values.unsqueeze(-1)
    if task == "multi_label_classification":
        probs = torch.sigmoid(logits.float())
        return [torch.nonzero(row > 0.5).flatten().tolist() for row in probs], probs
    probs = torch.softmax(logits.float(), dim=-1)
    return probs.argmax(-1).tolist(), probs


def trim_padding(attention_mask: torch.Tensor) -> int:
    """Number of leading columns that hold any real token (right padding assumed)."""
    return int(attention_mask.sum(dim=1).max().item())


class EarlyExitEngine:
    """Run a `MultiExitModel` with early exits, dropping rows from the batch as they leave.

    Args:
        model: a trained multi-exit model (switched to eval mode).
        policy: the exit policy; default the one stored with the model.
        batch_size: rows per batch.
        num_threads: torch intra-op threads for inference (None = leave as is).
        sort_by_length: batch samples of similar length together (results are unchanged).
    """

    def __init__(
        self,
        model: MultiExitModel,
        policy: ExitPolicy | None = None,
        batch_size: int = 32,
        num_threads: int | None = None,
        sort_by_length: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be >= 1")
        self.model = model.eval()
        self.policy = policy if policy is not None else ExitPolicy.from_dict(model.config.exit_policy)
        self.batch_size = batch_size
        self.sort_by_length = sort_by_length
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.layers_run = 0
        self.exits_run = 0

    @property
    def task(self) -> str:
        return self.model.config.problem_type

    @torch.inference_mode()
    def run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> EngineOutput:
        """Classify right-padded inputs of shape (N, T) in batches of `batch_size`.

        `labels` (N,) are needed only by the `oracle` policy. `layers_run` grows by the number of
        (layer, row) evaluations performed.
        """
        if self.policy.needs_labels and labels is None:
            raise ValueError(f"policy {self.policy} needs labels")
        n = input_ids.shape[0]
        lengths = attention_mask.sum(dim=1)
        order = torch.argsort(lengths, stable=True) if self.sort_by_length else torch.arange(n)
        k = self.model.config.num_labels
        out_logits = torch.zeros(n, k)
        out_layers = torch.zeros(n, dtype=torch.long)
        for start in range(0, n, self.batch_size):
            rows = order[start : start + self.batch_size]
            batch_labels = labels[rows] if labels is not None else None
            types = token_type_ids[rows] if token_type_ids is not None else None
            logits, layers = self._run_batch(input_ids[rows], attention_mask[rows], types, batch_labels)
            out_logits[rows] = logits
            out_layers[rows] = layers
        predicted, probs = predictions_from_logits(out_logits, self.task)
        return EngineOutput(labels=predicted, probs=probs, exit_layers=out_layers, logits=out_logits)

    def _run_batch(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        labels: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        width = trim_padding(attention_mask)
        input_ids, attention_mask = input_ids[:, :width], attention_mask[:, :width]
        if token_type_ids is not None:
            token_type_ids = token_type_ids[:, :width]
        b = input_ids.shape[0]
        step = self.policy.build(self.task, model.exit_layers)
        exit_positions = {layer: position for position, layer in enumerate(model.exit_layers)}
        out_logits = torch.zeros(b, model.config.num_labels)
        out_layers = torch.zeros(b, dtype=torch.long)
        alive = torch.arange(b)  # original row of each running row
        hidden = model.embed(input_ids, token_type_ids)  # (B, T, d)
        attention = model.attention_inputs(hidden, attention_mask)
        state: dict[str, torch.Tensor] = {}
        for layer in range(1, model.num_layers + 1):
            hidden = model.run_layer(layer, hidden, attention)
            self.layers_run += hidden.shape[0]
            if layer not in exit_positions:
                continue
            logits = model.exit_logits(layer, hidden, attention_mask)  # (b, K)
            self.exits_run += hidden.shape[0]
            if layer == model.num_layers:
                leave = torch.ones(hidden.shape[0], dtype=torch.bool)
            else:
                row_labels = labels[alive] if labels is not None else None
                leave, state = step(logits, state, exit_positions[layer], row_labels)
            out_logits[alive[leave]] = logits[leave].float()
            out_layers[alive[leave]] = layer
            if bool(leave.all()):
                break
            if bool(leave.any()):
                keep = ~leave
                alive, hidden, attention_mask = alive[keep], hidden[keep], attention_mask[keep]
                state = select_rows(state, keep)
                width = trim_padding(attention_mask)
                if width < hidden.shape[1]:
                    hidden, attention_mask = hidden[:, :width], attention_mask[:, :width]
                attention = model.attention_inputs(hidden, attention_mask)
        return out_logits, out_layers

    def classify(
        self, texts: Sequence[str], text_pairs: Sequence[str] | None = None, max_length: int = 128
    ) -> EngineOutput:
        """Tokenise texts with the model's tokenizer and run them."""
        tokenizer = self.model.tokenizer
        if tokenizer is None:
            raise ValueError("the model has no tokenizer: load it from a saved folder or set model.tokenizer")
        encoded = tokenizer(
            list(texts),
            list(text_pairs) if text_pairs is not None else None,
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        return self.run(encoded["input_ids"], encoded["attention_mask"], encoded.get("token_type_ids"))
