"""Layer-by-layer early-exit inference with per-sample exits inside real batches.

A batch runs one layer at a time. After each layer whose exit the rule reads, the rule decides per
row; rows that leave are recorded and dropped from the batch at once, and padding columns no row
still needs are cut off. Survivors wait in a pool for their next layer, which runs once the pool
holds a full batch again (rows from later input batches join them), so deep layers do not run on
ever-smaller batches. A sample's answer does not depend on its batch: the rule's state is per row,
and padding is masked out of attention and pooling.

On a GPU the rows' tensors (hidden states, masks, the rule's state, logits) stay on the device; the
scheduling (which input row is where, how many real tokens each has) is kept on the host, so the
only wait for the device is the exit decision itself: one copy of the (b,) leave mask per exit read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from badge.config import DEFAULT_MAX_SEQ_LENGTH
from badge.device import place
from badge.exit_model import AttentionInputs, ExitModel
from badge.rules import ExitPolicy, select_rows
from badge.tasks import get_task


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
    """Labels and probabilities from (N, K) logits for the given task (a `problem_type`)."""
    task_type = get_task(task)
    return task_type.predictions(logits), task_type.probabilities(logits)


def check_right_padded(attention_mask: torch.Tensor) -> None:
    """Raise ValueError unless every row of the (B, T) mask has its real tokens first."""
    if bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
        raise ValueError("attention_mask must be right-padded (real tokens first); tokenise with padding_side='right'")


@dataclass
class _Rows:
    """Rows in flight between two layers: hidden states, mask, input row ids and the rule's per-row state.

    `hidden`, `mask` and `state` live on the model's device; `rows` and `lengths` on the host, so that
    choosing rows and cutting padding never waits for the device. `attention` (the prepared mask and
    pooling weights) is kept while the rows stay together, so a batch that loses no row prepares it
    once, not once per layer.
    """

    hidden: torch.Tensor  # (b, T, d)
    mask: torch.Tensor  # (b, T)
    rows: torch.Tensor  # (b,) positions in the run's inputs (host)
    lengths: torch.Tensor  # (b,) real tokens per row (host)
    state: dict[str, torch.Tensor]
    attention: AttentionInputs | None = None

    def select(self, keep: torch.Tensor) -> _Rows:
        """Keep rows (host indices) and cut padding columns no kept row needs."""
        lengths = self.lengths[keep]
        width = int(lengths.max()) if len(lengths) else 0
        on_device = keep.to(self.hidden.device, non_blocking=True)
        return _Rows(
            self.hidden.index_select(0, on_device)[:, :width],
            self.mask.index_select(0, on_device)[:, :width],
            self.rows[keep],
            lengths,
            select_rows(self.state, on_device),
        )


def _count(groups: list[_Rows]) -> int:
    return sum(len(group.rows) for group in groups)


def _take(groups: list[_Rows], limit: int) -> _Rows:
    """Take up to `limit` waiting rows, oldest first, merged into one group; the rest stays queued.

    Whole groups are taken as they are and only the group that straddles the limit is split, so
    each row is copied once on its way into the next layer call (the padded merge).
    """
    taken, count = [], 0
    while groups and count < limit:
        group = groups.pop(0)
        room = limit - count
        if len(group.rows) > room:
            groups.insert(0, group.select(torch.arange(room, len(group.rows))))
            group = group.select(torch.arange(room))
        taken.append(group)
        count += len(group.rows)
    if len(taken) == 1:
        return taken[0]
    width = max(group.hidden.shape[1] for group in taken)

    def pad(tensor: torch.Tensor) -> torch.Tensor:
        missing = width - tensor.shape[1]
        if not missing:
            return tensor
        return torch.nn.functional.pad(tensor, (0, 0, 0, missing) if tensor.dim() == 3 else (0, missing))

    return _Rows(
        torch.cat([pad(group.hidden) for group in taken]),
        torch.cat([pad(group.mask) for group in taken]),
        torch.cat([group.rows for group in taken]),
        torch.cat([group.lengths for group in taken]),
        {key: torch.cat([group.state[key] for group in taken]) for key in taken[0].state},
    )


class EarlyExitEngine:
    """Run a multi-exit model with early exits, dropping rows from the batch as they leave.

    Args:
        model: a trained `ExitModel` (a `MultiExitModel`, or an export's `OnnxMultiExitModel`; switched to eval mode).
        policy: the exit policy; default the one stored with the model.
        batch_size: rows per batch.
        num_threads: torch intra-op threads for inference (None = leave as is).
        sort_by_length: batch samples of similar length together (results are unchanged).
        packed: run BERT-structured layers on real tokens only, skipping padding (`badge.packed`;
            results equal within float rounding). Other families always run padded.
        device: `cpu`, `cuda`, `auto` or a `torch.device` to move the model to; None = where it is.
        dtype: `float32`, `float16` or `bfloat16` to cast the model's weights to; None = as they are.
    """

    def __init__(
        self,
        model: ExitModel,
        policy: ExitPolicy | None = None,
        batch_size: int = 32,
        num_threads: int | None = None,
        sort_by_length: bool = True,
        packed: bool = True,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be >= 1")
        if isinstance(model, torch.nn.Module):
            model = place(model, device, dtype)
        elif device not in (None, "cpu", "auto") or dtype not in (None, "float32", torch.float32):
            raise ValueError(f"{type(model).__name__} runs in float32 on the CPU only, not on {device} in {dtype}")
        self.model = model.eval()
        self.policy = policy if policy is not None else ExitPolicy.from_dict(model.config.exit_policy)
        self.batch_size = batch_size
        self.sort_by_length = sort_by_length
        self.packed = packed
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.layers_run = 0
        self.exits_run = 0

    @property
    def task(self) -> str:
        return self.model.config.problem_type

    @property
    def device(self) -> torch.device:
        """Where the model's tensors (and so every row's) live."""
        return self.model.device

    @torch.inference_mode()
    def run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> EngineOutput:
        """Classify right-padded inputs of shape (N, T), at most `batch_size` rows per layer call.

        Rows that leave make room: survivors wait in a pool per layer, and a layer runs once its pool
        holds `batch_size` rows (or when no new input is left), so deep layers run on full batches too.
        `labels` (N,) are needed only by the `oracle` policy. `layers_run` grows by the number of
        (layer, row) evaluations performed. Inputs may live on any device: each batch is copied to the
        model's; the returned tensors are on the CPU.
        """
        if self.policy.needs_labels and labels is None:
            raise ValueError(f"policy {self.policy} needs labels")
        check_right_padded(attention_mask)
        backend = self.model
        device = self.device
        n = input_ids.shape[0]
        input_lengths = attention_mask.sum(dim=1).cpu()  # (N,) on the host: scheduling never waits for the device
        if labels is not None:
            labels = labels.to(device)
        order = torch.argsort(input_lengths, stable=True) if self.sort_by_length else torch.arange(n)
        step = self.policy.build(self.task, backend.exit_layers)
        exit_positions = {layer: position for position, layer in enumerate(backend.exit_layers)}
        consulted = set(self.policy.exits_consulted(backend.exit_layers))
        last = backend.num_layers
        answered: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # (rows, their logits, exit layer)
        pools: dict[int, list[_Rows]] = {layer: [] for layer in range(2, last + 1)}
        next_row = 0
        while True:
            full = [layer for layer in range(last, 1, -1) if _count(pools[layer]) >= self.batch_size]
            if full:
                layer = full[0]
                group = _take(pools[layer], self.batch_size)
            elif next_row < n:
                layer = 1
                rows = order[next_row : next_row + self.batch_size]
                next_row += len(rows)
                lengths = input_lengths[rows]
                width = int(lengths.max())

                def batch(tensor: torch.Tensor, rows: torch.Tensor = rows, width: int = width) -> torch.Tensor:
                    picked = tensor.index_select(0, rows.to(tensor.device))[:, :width]  # (b, T)
                    return picked.to(device, non_blocking=True)

                types = batch(token_type_ids) if token_type_ids is not None else None
                hidden = backend.embed(batch(input_ids), types)  # (b, T, d)
                group = _Rows(hidden, batch(attention_mask), rows, lengths, {})
            else:  # no input left: drain the shallowest pool first, so its survivors fill the next one
                waiting = [layer for layer in range(2, last + 1) if pools[layer]]
                if not waiting:
                    break
                layer = waiting[0]
                group = _take(pools[layer], self.batch_size)
            if group.attention is None:
                group.attention = backend.attention_inputs(
                    group.hidden, group.mask, packed=self.packed, lengths=group.lengths
                )
            hidden = backend.run_layer(layer, group.hidden, group.attention)
            self.layers_run += hidden.shape[0]
            group.hidden = hidden
            if layer in consulted:
                logits = backend.exit_logits(layer, hidden, group.mask, group.attention.pool_weights)  # (b, K)
                self.exits_run += hidden.shape[0]
                if layer == last:  # every row leaves: nothing to decide
                    answered.append((group.rows, logits, layer))
                    continue
                row_labels = labels[group.rows.to(device)] if labels is not None else None
                leave, group.state = step(logits, group.state, exit_positions[layer], row_labels)
                leave = leave.cpu()  # (b,) the one wait for the device per exit decision
                leaving = int(leave.sum())
                if leaving == len(group.rows):  # the whole group leaves: no row selection needed
                    answered.append((group.rows, logits, layer))
                    continue
                if leaving:  # the rows that stay run on without the others, and keep no extra padding
                    gone = leave.nonzero().squeeze(1)
                    answered.append((group.rows[gone], logits.index_select(0, gone.to(device)), layer))
                    group = group.select((~leave).nonzero().squeeze(1))
            pools[layer + 1].append(group)
        out_logits = torch.zeros(n, self.model.config.num_labels)
        out_layers = torch.zeros(n, dtype=torch.long)
        if answered:
            row_ids, row_logits, layers = zip(*answered, strict=True)
            positions = torch.cat(row_ids)
            out_logits[positions] = torch.cat(row_logits).float().cpu()
            out_layers[positions] = torch.cat(
                [torch.full((len(ids),), at) for ids, at in zip(row_ids, layers, strict=True)]
            )
        predicted, probs = predictions_from_logits(out_logits, self.task)
        return EngineOutput(labels=predicted, probs=probs, exit_layers=out_layers, logits=out_logits)

    def classify(
        self, texts: Sequence[str], text_pairs: Sequence[str] | None = None, max_length: int | None = None
    ) -> EngineOutput:
        """Tokenise texts (cut to `max_length` tokens, default: the model's own) and run them."""
        if max_length is None:
            max_length = getattr(self.model.config, "max_seq_length", None) or DEFAULT_MAX_SEQ_LENGTH
        tokenizer = self.model.tokenizer
        if tokenizer is None:
            raise ValueError("the model has no tokenizer: load it from a saved folder or set model.tokenizer")
        tokenizer.padding_side = "right"  # the engine trims padding columns from the right
        encoded = tokenizer(
            list(texts),
            list(text_pairs) if text_pairs is not None else None,
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        return self.run(encoded["input_ids"], encoded["attention_mask"], encoded.get("token_type_ids"))
