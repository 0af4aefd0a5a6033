"""Attention-head pruning: score every head, cut the least important ones out of the weight matrices.

Importance follows Michel, Levy and Neubig (2019), "Are Sixteen Heads Really Better than One?": put a
mask `xi_h = 1` on each head's output, accumulate `|dL / dxi_h|` over a labelled split, normalise per
layer (L2). The mask is a forward pre-hook on the attention output projection, whose input is the
heads' outputs side by side (transformers 5 has no `head_mask` any more).

Pruning slices the query, key and value projections' output features and the output projection's
input features, so a pruned layer is smaller and faster, not merely masked. The kept heads are
recorded in `config.heads_kept` (`{"1": [0, 2, 3], ...}`: 1-based layer -> original head ids), and
`MultiExitModel.__init__` calls `apply_heads_kept` so that loading a pruned folder rebuilds the same
shapes before the weights are read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from badge.data import TextDataset, make_loader
from badge.modeling import MultiExitModel

PRUNABLE_FAMILIES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert")


@dataclass
class HeadParts:
    """The modules of one layer's attention that head pruning touches.

    attention: the module holding the head count (`head_count_name`) and `attention_head_size`.
    projections: query, key and value: their output features are the heads side by side.
    output: the output projection: its input features are the heads side by side.
    """

    attention: nn.Module
    projections: list[nn.Linear]
    output: nn.Linear
    head_count_name: str

    @property
    def head_size(self) -> int:
        return self.attention.attention_head_size

    @property
    def num_heads(self) -> int:
        return getattr(self.attention, self.head_count_name)


def head_parts(model: MultiExitModel, layer: int) -> HeadParts:
    """The attention modules of 1-based `layer`; raises ValueError for families without head pruning."""
    if model.family not in PRUNABLE_FAMILIES:
        raise ValueError(
            f"head pruning supports the families {list(PRUNABLE_FAMILIES)}; this model is {model.family!r}"
        )
    if model.family == "distilbert":
        attention = model.encoder.transformer.layer[layer - 1].attention
        return HeadParts(attention, [attention.q_lin, attention.k_lin, attention.v_lin], attention.out_lin, "n_heads")
    attention = model.encoder.encoder.layer[layer - 1].attention
    self_attention = attention.self
    projections = [self_attention.query, self_attention.key, self_attention.value]
    return HeadParts(self_attention, projections, attention.output.dense, "num_attention_heads")


def current_heads(model: MultiExitModel) -> dict[int, list[int]]:
    """Original ids of the heads each 1-based layer still has."""
    total = model.config.backbone_config().num_attention_heads
    heads = {layer: list(range(total)) for layer in range(1, model.num_layers + 1)}
    heads.update({int(layer): sorted(kept) for layer, kept in (model.config.heads_kept or {}).items()})
    return heads


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep only rows (dim 0, output features) or columns (dim 1, input features) `index` of a Linear, in place."""
    index = index.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.detach().index_select(dim, index).clone())
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.detach().index_select(0, index).clone())
        linear.out_features = len(index)
    else:
        linear.in_features = len(index)


def _keep_heads(parts: HeadParts, positions: list[int]) -> None:
    """Keep the heads at `positions` (0-based, among the layer's current heads) of one layer, in place."""
    size = parts.head_size
    features = torch.tensor([position * size + offset for position in positions for offset in range(size)])
    for projection in parts.projections:
        _slice_linear(projection, features, dim=0)
    _slice_linear(parts.output, features, dim=1)
    setattr(parts.attention, parts.head_count_name, len(positions))
    if hasattr(parts.attention, "all_head_size"):
        parts.attention.all_head_size = len(positions) * size


def apply_heads_kept(model: MultiExitModel, heads_kept: dict[int, list[int]]) -> None:
    """Cut a model that still has all its heads down to `heads_kept` (1-based layer -> original head ids).

    Called by `MultiExitModel.__init__` before the weights load, so that a pruned folder's tensors fit.
    """
    total = model.config.backbone_config().num_attention_heads
    for layer, heads in sorted(heads_kept.items()):
        if not 1 <= layer <= model.num_layers:
            raise ValueError(f"heads_kept names layer {layer}; the model has layers 1..{model.num_layers}")
        bad = [head for head in heads if not 0 <= head < total]
        if not heads or bad or len(set(heads)) != len(heads):
            raise ValueError(
                f"heads_kept for layer {layer} is {heads}: expected 1 to {total} distinct head ids in 0..{total - 1}"
            )
        _keep_heads(head_parts(model, layer), sorted(heads))


def _to_loader(data: TextDataset | DataLoader, model: MultiExitModel, batch_size: int, max_length: int) -> DataLoader:
    if isinstance(data, DataLoader):
        return data
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer to encode the dataset: pass a DataLoader instead")
    return make_loader(data, model.tokenizer, max_length, batch_size, shuffle=False)


def _mask_hook(mask: torch.Tensor, head_size: int) -> Callable[[nn.Module, tuple], tuple]:
    """Forward pre-hook multiplying each head's slice of the output projection's input by its mask entry."""

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        heads = args[0]  # (B, T, H * head_size)
        shape = heads.shape
        masked = heads.reshape(*shape[:-1], -1, head_size) * mask.to(heads.dtype)[:, None]  # (B, T, H, head_size)
        return (masked.reshape(shape), *args[1:])

    return hook


def head_importance(
    model: MultiExitModel, data: TextDataset | DataLoader, batch_size: int = 32, max_length: int = 128
) -> torch.Tensor:
    """Importance of every attention head: accumulated |dL/dmask| over `data`, L2-normalised per layer.

    Args:
        model: the multi-exit model; its joint loss over all exits (the loss it was trained on, with the
            gradient damper switched off so that the gradient is the loss's true sensitivity) is used.
        data: a labelled `TextDataset` (encoded with the model's tokenizer) or a DataLoader of batches
            with `labels`.
        batch_size, max_length: how a `TextDataset` is batched and truncated.
    Returns:
        (L, H) importance per layer and original head id; NaN for heads already pruned away.
    """
    loader = _to_loader(data, model, batch_size, max_length)
    kept = current_heads(model)
    parts = {layer: head_parts(model, layer) for layer in kept}
    masks = {layer: torch.ones(len(heads), device=model.device, requires_grad=True) for layer, heads in kept.items()}
    scores = {layer: torch.zeros(len(heads)) for layer, heads in kept.items()}
    hooks = [
        parts[layer].output.register_forward_pre_hook(_mask_hook(masks[layer], parts[layer].head_size))
        for layer in kept
    ]
    gamma, model.config.gamma = model.config.gamma, 1.0
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            batch = {key: value.to(model.device) for key, value in batch.items()}
            loss = model(**batch).loss
            grads = torch.autograd.grad(loss, [masks[layer] for layer in kept])
            for layer, grad in zip(kept, grads, strict=True):
                scores[layer] += grad.abs().detach().cpu()
    finally:
        for hook in hooks:
            hook.remove()
        model.config.gamma = gamma
        model.train(was_training)
    total = model.config.backbone_config().num_attention_heads
    importance = torch.full((model.num_layers, total), float("nan"))
    for layer, heads in kept.items():
        layer_scores = scores[layer]
        importance[layer - 1, heads] = layer_scores / (layer_scores.norm() + 1e-20)
    return importance


def weight_importance(model: MultiExitModel) -> torch.Tensor:
    """A data-free stand-in for `head_importance`: the L2 norm of each head's columns of the output projection.

    Returns (L, H) per layer and original head id, normalised per layer; NaN for heads already pruned.
    """
    kept = current_heads(model)
    total = model.config.backbone_config().num_attention_heads
    importance = torch.full((model.num_layers, total), float("nan"))
    for layer, heads in kept.items():
        parts = head_parts(model, layer)
        weight = parts.output.weight.detach().float().cpu()  # (d, H * head_size)
        norms = weight.reshape(weight.shape[0], len(heads), parts.head_size).norm(dim=(0, 2))  # (H,)
        importance[layer - 1, heads] = norms / (norms.norm() + 1e-20)
    return importance


def heads_to_keep(importance: torch.Tensor, fraction: float) -> dict[int, list[int]]:
    """Drop the `fraction` least important of the present (non-NaN) heads, keeping at least one per layer.

    Args:
        importance: (L, H) per layer and original head id, NaN for heads already gone.
        fraction: share of the present heads to remove, in [0, 1).
    Returns:
        1-based layer -> sorted original ids of the heads kept.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"head fraction {fraction} must lie in [0, 1): the share of heads to remove")
    present = ~torch.isnan(importance)
    kept = {layer + 1: set(torch.nonzero(present[layer]).flatten().tolist()) for layer in range(importance.shape[0])}
    to_remove = round(fraction * int(present.sum()))
    order = torch.argsort(torch.where(present, importance, torch.inf).flatten(), stable=True)
    for flat in order[: int(present.sum())].tolist():
        if to_remove == 0:
            break
        layer, head = divmod(flat, importance.shape[1])
        if len(kept[layer + 1]) > 1:  # an empty layer would have nothing to attend with
            kept[layer + 1].discard(head)
            to_remove -= 1
    return {layer: sorted(heads) for layer, heads in kept.items()}


def prune_heads(model: MultiExitModel, fraction: float, importance: torch.Tensor | None = None) -> MultiExitModel:
    """Remove the `fraction` least important attention heads of `model`, in place, and return it.

    Args:
        model: a multi-exit model of a family in `PRUNABLE_FAMILIES` (it may be pruned already).
        fraction: share of the model's present heads to remove, in [0, 1); every layer keeps at least one.
        importance: (L, H) from `head_importance`; None = `weight_importance` (no data needed, cruder).
    Returns:
        The same model, smaller, with `config.heads_kept` recording the heads left.
    """
    if importance is None:
        importance = weight_importance(model)
    before = current_heads(model)
    after = heads_to_keep(importance, fraction)
    for layer, heads in after.items():
        positions = [before[layer].index(head) for head in heads]
        if len(positions) < len(before[layer]):
            _keep_heads(head_parts(model, layer), positions)
    model.config.heads_kept = {str(layer): heads for layer, heads in after.items()}
    return model
