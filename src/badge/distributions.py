"""Distributions of an exit's logits in log space, and the divergences between two exits.

Everything is computed from logits with `log_softmax` (or `logsigmoid` per label for multi-label),
never from rounded probabilities. Which distribution a task's exits give is the task's choice (`badge.tasks`).
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor

DIVERGENCES = ("jsd", "kl", "rkl", "skl", "xjsd", "argmax")


# ----- distributions in log space ------------------------------------------------------------
def softmax_log_probs(logits: Tensor) -> Tensor:
    """Log-probabilities (B, K) in float32 of one distribution over K classes."""
    return torch.log_softmax(logits.float(), dim=-1)


def sigmoid_log_probs(logits: Tensor) -> Tensor:
    """Log-probabilities (B, K, 2) in float32 of K independent binary distributions (label on, label off)."""
    logits = logits.float()
    return torch.stack([torch.nn.functional.logsigmoid(logits), torch.nn.functional.logsigmoid(-logits)], -1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) over the last axis, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1).clamp(min=0.0)


def divergence(log_p: Tensor, log_q: Tensor, kind: str = "jsd") -> Tensor:
    """Divergence between two distributions given as log-probabilities over the last axis.

    Args:
        log_p: previous exit's log-probabilities (..., K).
        log_q: current exit's log-probabilities (..., K).
        kind: `jsd`, `kl` (KL(p||q)), `rkl` (KL(q||p)), `skl` (kl + rkl), `xjsd` (JSD plus the mean
            entropy: cross-entropies against the mixture), or `argmax` (0/1 disagreement).
    Returns:
        (...) divergence per distribution.
    """
    if kind == "argmax":
        return (log_p.argmax(-1) != log_q.argmax(-1)).float()
    if kind == "kl":
        return _kl(log_p, log_q)
    if kind == "rkl":
        return _kl(log_q, log_p)
    if kind == "skl":
        return _kl(log_p, log_q) + _kl(log_q, log_p)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
    if kind == "jsd":
        return (0.5 * _kl(log_p, log_m) + 0.5 * _kl(log_q, log_m)).clamp(min=0.0)
    if kind == "xjsd":
        return -0.5 * (log_p.exp() * log_m).sum(-1) - 0.5 * (log_q.exp() * log_m).sum(-1)
    raise ValueError(f"divergence {kind!r} is not one of {list(DIVERGENCES)}")


def normalized_entropy(log_probs: Tensor) -> Tensor:
    """Entropy over the last axis divided by log K, in [0, 1]."""
    k = log_probs.shape[-1]
    return -(log_probs.exp() * log_probs).sum(-1) / math.log(k)
