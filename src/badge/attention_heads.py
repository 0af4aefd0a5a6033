"""Cutting attention heads out of an encoder's weight matrices, so a pruned layer is smaller, not merely masked.

Keeping a subset of heads slices the query, key and value projections' output features and the output
projection's input features (`HeadParts`, found by the family's adapter). Which heads to keep is
decided in `badge.pruning`; `MultiExitModel.__init__` calls `apply_heads_kept` so that loading a pruned
folder rebuilds the same shapes before the weights are read.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from badge.families import EncoderFamily, HeadParts


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


def keep_heads(parts: HeadParts, positions: list[int]) -> None:
    """Keep the heads at `positions` (0-based, among the layer's current heads) of one layer, in place."""
    size = parts.head_size
    features = torch.tensor([position * size + offset for position in positions for offset in range(size)])
    for projection in parts.projections:
        _slice_linear(projection, features, dim=0)
    _slice_linear(parts.output, features, dim=1)
    setattr(parts.attention, parts.head_count_name, len(positions))
    if hasattr(parts.attention, "all_head_size"):
        parts.attention.all_head_size = len(positions) * size


def apply_heads_kept(encoder: PreTrainedModel, family: EncoderFamily, heads_kept: dict[int, list[int]]) -> None:
    """Cut an encoder that still has all its heads down to `heads_kept` (1-based layer -> original head ids).

    Raises ValueError naming the layer when a layer or head id is out of range or a layer keeps no head.
    """
    total = encoder.config.num_attention_heads
    layers = encoder.config.num_hidden_layers
    for layer, heads in sorted(heads_kept.items()):
        if not 1 <= layer <= layers:
            raise ValueError(f"heads_kept names layer {layer}; the model has layers 1..{layers}")
        bad = [head for head in heads if not 0 <= head < total]
        if not heads or bad or len(set(heads)) != len(heads):
            raise ValueError(
                f"heads_kept for layer {layer} is {heads}: expected 1 to {total} distinct head ids in 0..{total - 1}"
            )
        keep_heads(family.head_parts(encoder, layer), sorted(heads))
