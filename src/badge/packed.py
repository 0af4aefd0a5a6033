"""Padding-free inference for BERT-structured layers: the matrix products run on real tokens only.

A padded batch pays for its padding in every matrix product. Early exiting makes this worse: the
rows still running after a few exits are the hard ones, gathered from many input batches, so
their lengths differ more than those of a length-sorted input batch. Here the linear parts of a
layer (query/key/value, attention output, feed-forward: nearly all of its FLOPs) run on the
packed real tokens (N, d); only the attention itself sees the padded (B, T) layout. Same weights
and same operations as the Hugging Face layer (BERT, MiniLM, RoBERTa, XLM-R, ELECTRA), equal
within float rounding; inference only (no dropout, no gradients needed). Every operation here
(index_select, index_copy_, SDPA) runs on any device, so the path is the same on a GPU. Which families
have such layers is an adapter's `packable` (`badge.families`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional


def real_tokens(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Flat indices (N,) of the real tokens of a (B, T) mask into B * T positions; None when none is padding."""
    if bool(attention_mask.all()):
        return None
    return attention_mask.flatten().nonzero().squeeze(1)


def packed_layer(
    layer: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None, tokens: torch.Tensor | None
) -> torch.Tensor:
    """Apply one BERT-structured layer to hidden states (B, T, d), computing only the real tokens.

    Args:
        layer: a `BertLayer` (or the RoBERTa / XLM-R / ELECTRA copy of it), possibly with pruned heads
            or int8 linear layers.
        hidden: (B, T, d) hidden states, right-padded.
        attention_mask: a boolean SDPA mask broadcastable to (B, h, T, T), True where a key may be attended
            (None when nothing is padded).
        tokens: `real_tokens` of the (B, T) padding mask.
    Returns:
        (B, T, d) output; padding positions hold zeros (every reader masks them out).
    """
    batch, length, width = hidden.shape
    attention = layer.attention.self
    head_size = attention.attention_head_size
    flat = hidden.reshape(batch * length, width)
    x = flat if tokens is None else flat.index_select(0, tokens)  # (N, d)

    def heads(projection: nn.Module) -> torch.Tensor:
        values = projection(x)  # (N, h * head_size)
        if tokens is not None:
            values = values.new_zeros(batch * length, values.shape[-1]).index_copy_(0, tokens, values)
        return values.view(batch, length, -1, head_size).transpose(1, 2)  # (B, h, T, head_size)

    context = functional.scaled_dot_product_attention(
        heads(attention.query),
        heads(attention.key),
        heads(attention.value),
        attn_mask=attention_mask,
        scale=attention.scaling,
    )  # (B, h, T, head_size)
    context = context.transpose(1, 2).reshape(batch * length, -1)  # (B * T, h * head_size)
    if tokens is not None:
        context = context.index_select(0, tokens)  # (N, h * head_size)
    output = layer.attention.output
    attended = output.LayerNorm(output.dense(context) + x)  # (N, d)
    inner = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(attended))  # (N, d_ff)
    out = layer.output.LayerNorm(layer.output.dense(inner) + attended)  # (N, d)
    if tokens is None:
        return out.view(batch, length, width)
    return out.new_zeros(batch * length, width).index_copy_(0, tokens, out).view(batch, length, width)


def tokens_from_lengths(lengths: torch.Tensor, width: int, device: torch.device) -> torch.Tensor | None:
    """`real_tokens` of right-padded rows of `lengths` (B,) real tokens in `width` columns, computed on the host.

    `lengths` is a CPU tensor: no device sync is needed to find the indices, which are then copied to
    `device` without waiting for it. None when no row is padded.
    """
    if bool((lengths == width).all()):
        return None
    positions = torch.arange(width)  # (T,)
    host = (positions[None, :] < lengths[:, None]).flatten().nonzero().squeeze(1)  # (N,)
    return host.to(device, non_blocking=True)
