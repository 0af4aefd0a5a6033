"""The small modules a multi-exit model adds to its encoder: exit heads, bypasses and the gradient damper.

An exit head classifies one pooled vector. A bypass is a zero-initialised bottleneck adapter that the
intermediate exits of one block read through. The damper leaves the forward value unchanged and scales
the gradient flowing back into the encoder, so shallow exits bend the shared layers less.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _GradientDamper(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `gamma` on the way back."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, gamma: float) -> torch.Tensor:
        ctx.gamma = gamma
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.gamma, None


def damp_gradient(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """Return `x` unchanged; gradients flowing back through it are scaled by `gamma`."""
    if gamma >= 1.0 or not torch.is_grad_enabled():
        return x
    return _GradientDamper.apply(x, gamma)


class Bypass(nn.Module):
    """Bottleneck adapter `W_up GELU(W_down LN(x))`; `W_up` starts at zero so training starts as plain multi-exit."""

    def __init__(self, hidden_size: int, bypass_dim: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.down = nn.Linear(hidden_size, bypass_dim)
        self.up = nn.Linear(bypass_dim, hidden_size)
        self.up.zero_init = True  # read by MultiExitModel._init_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(nn.functional.gelu(self.down(self.norm(x))))  # (B, d)


class TokenScore(nn.Module):
    """An exit's attention pooling: a linear score per token, softmax over the real tokens -> weights (B, 1, T).

    The score starts at zero, so the weights start uniform over the real tokens (mean pooling)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.score = nn.Linear(hidden_size, 1)
        self.score.zero_init = True  # read by MultiExitModel._init_weights

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        scores = self.score(hidden).squeeze(-1)  # (B, T)
        scores = scores.masked_fill(attention_mask == 0, torch.finfo(scores.dtype).min)
        return torch.softmax(scores, dim=-1).unsqueeze(1)  # (B, 1, T)


class ExitHead(nn.Module):
    """Small classifier on a pooled vector: dense + tanh (as BERT's pooler), then a linear layer to the labels."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if not self.training:  # skip the no-op dropout calls: at batch 1 an exit costs ~15 % of a layer
            return self.out(torch.tanh(self.dense(pooled)))  # (B, K)
        x = torch.tanh(self.dense(self.dropout(pooled)))
        return self.out(self.dropout(x))  # (B, K)
