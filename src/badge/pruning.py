"""Attention-head pruning: score every head, cut the least important ones out of the weight matrices.

Importance follows Michel, Levy and Neubig (2019), "Are Sixteen Heads Really Better than One?": put a
mask `xi_h = 1` on each head's output, accumulate `|dL / dxi_h|` over a labelled split, normalise per
layer (L2). The mask is a forward pre-hook on the attention output projection, whose input is the
heads' outputs side by side (transformers 5 has no `head_mask` any more).

Pruning cuts the chosen heads out of the weight matrices (`badge.attention_heads`), so a pruned layer
is smaller and faster, not merely masked. The kept heads are recorded in `config.heads_kept`
(`{"1": [0, 2, 3], ...}`: 1-based layer -> original head ids), from which loading a pruned folder
rebuilds the same shapes. Which families can be pruned is their adapter's `prunable` (`badge.families`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from badge.attention_heads import keep_heads
from badge.data import TextDataset, make_loader
from badge.families import HeadParts
from badge.modeling import MultiExitModel


def head_parts(model: MultiExitModel, layer: int) -> HeadParts:
    """The attention modules of 1-based `layer`; raises ValueError for families without head pruning."""
    return model.encoder_family.head_parts(model.encoder, layer)


def current_heads(model: MultiExitModel) -> dict[int, list[int]]:
    """Original ids of the heads each 1-based layer still has."""
    total = model.config.backbone_config().num_attention_heads
    heads = {layer: list(range(total)) for layer in range(1, model.num_layers + 1)}
    heads.update({int(layer): sorted(kept) for layer, kept in (model.config.heads_kept or {}).items()})
    return heads


def _to_loader(data: TextDataset | DataLoader, model: MultiExitModel, batch_size: int, max_length: int) -> DataLoader:
    """`data` itself when it is a DataLoader, else its texts encoded with the model's tokenizer, in order."""
    if isinstance(data, DataLoader):
        return data
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("the model has no tokenizer to encode the dataset: pass a DataLoader instead")
    return make_loader(data, tokenizer, max_length, batch_size, shuffle=False)


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
        model: a multi-exit model whose family's adapter is `prunable` (it may be pruned already).
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
            keep_heads(head_parts(model, layer), positions)
    model.config.heads_kept = {str(layer): heads for layer, heads in after.items()}
    return model
