"""The agreement gate: divergence-based exiting that can leave at any exit, the first included.

The paper's DGE leaves once consecutive exits barely diverge, so it never leaves at the first exit
and ignores how sure each exit is. The gate combines both signals: at every exit but the last, a
small logistic model reads

- the exit's confidence: largest probability, normalised entropy, margin between the top two;
- its divergence (JSD) from the previous exit and from the mixture (mean) of all previous exits
  (0 at the first exit, where there is nothing to diverge from);
- the agreement streak: how many exits in a row, ending here, give the same class;

and estimates the probability that this exit already gives the final exit's answer. A text leaves
where that probability exceeds `tau`. The target needs no labels (the final exit's answer is the
reference), so a gate can be fitted on unlabelled traffic. One weight vector per exit is stored in
the policy as plain JSON numbers.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from badge.distributions import divergence, normalized_entropy, softmax_log_probs

Tensor = torch.Tensor
State = dict[str, Tensor]
FEATURES = ("max_prob", "entropy", "margin", "jsd_previous", "jsd_mixture", "streak")


def gate_features(logits: Tensor, state: State) -> tuple[Tensor, State]:
    """Features (B, F) of one exit's logits (B, K), given the state left by the previous exits."""
    log_probs = softmax_log_probs(logits)  # (B, K): the gate is for single-label classification
    probs = log_probs.exp()
    top2 = probs.topk(min(2, probs.shape[-1]), dim=-1).values  # (B, 2)
    margin = top2[:, 0] - (top2[:, 1] if top2.shape[1] > 1 else 0.0)
    predicted = probs.argmax(-1)  # (B,)
    previous = state.get("previous")
    if previous is None:
        zeros = torch.zeros_like(margin)
        jsd_previous, jsd_mixture, streak = zeros, zeros, torch.ones_like(margin)
        mixture_sum, seen = probs, torch.ones_like(margin)
    else:
        seen = state["seen"] + 1  # (B,) exits read so far, this one included
        mixture_sum = state["mixture_sum"] + probs
        mixture = (state["mixture_sum"] / state["seen"][:, None]).clamp(min=1e-12).log()  # previous exits' mean
        jsd_previous = divergence(previous, log_probs, "jsd")
        jsd_mixture = divergence(mixture, log_probs, "jsd")
        streak = torch.where(predicted == state["predicted"], state["streak"] + 1, torch.ones_like(margin))
    features = torch.stack(
        [top2[:, 0], normalized_entropy(log_probs), margin, jsd_previous, jsd_mixture, streak], dim=-1
    )  # (B, F)
    new_state = {
        "previous": log_probs,
        "mixture_sum": mixture_sum,
        "predicted": predicted,
        "streak": streak,
        "seen": seen,
    }
    return features, new_state


def check_gate(gate: Any) -> None:
    """Raise ValueError naming what is wrong with a stored gate (it comes from a user-editable JSON file)."""
    if not isinstance(gate, dict) or set(gate) != {"features", "weights", "bias"}:
        raise ValueError(f'a gate is a dict with keys "features", "weights" and "bias", not {str(gate)[:80]}')
    if gate["features"] != list(FEATURES):
        raise ValueError(f"gate features {gate['features']} differ from {list(FEATURES)}: refit the gate")
    weights, bias = gate["weights"], gate["bias"]
    rows_ok = isinstance(weights, list) and all(isinstance(row, list) and len(row) == len(FEATURES) for row in weights)
    if not rows_ok or not isinstance(bias, list) or len(bias) != len(weights):
        raise ValueError(f"gate weights must be one list of {len(FEATURES)} numbers per exit, with one bias each")
    numbers = [value for row in weights for value in row] + bias
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
        raise ValueError("gate weights and biases must be finite numbers")


def gate_step(gate: dict[str, Any], tau: float):
    """A rule step (see `badge.rules`): leave where the gate's probability of agreeing with the final exit
    exceeds `tau`."""
    weights = torch.tensor(gate["weights"], dtype=torch.float32)  # (E - 1, F)
    bias = torch.tensor(gate["bias"], dtype=torch.float32)  # (E - 1,)
    threshold = math.log(tau / (1 - tau)) if 0 < tau < 1 else (math.inf if tau >= 1 else -math.inf)

    def step(logits: Tensor, state: State, position: int, labels: Tensor | None = None) -> tuple[Tensor, State]:
        features, state = gate_features(logits, state)
        if position >= len(bias):  # the final exit answers anyway
            return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device), state
        score = features @ weights[position].to(features.device) + bias[position].to(features.device)  # (B,)
        return score > threshold, state  # sigmoid(score) > tau, without the sigmoid

    return step


def fit_gate(exit_logits: Tensor, regularisation: float = 1.0) -> dict[str, Any]:
    """Fit one logistic model per exit (all but the last) on stored logits (N, E, K); no labels needed.

    The target at exit i is "exit i's class equals the final exit's class". Returns the gate as a JSON-ready
    dict: {"features": FEATURES, "weights": (E - 1) lists of len(FEATURES), "bias": E - 1 numbers}.
    """
    from sklearn.linear_model import LogisticRegression  # only fitting needs scikit-learn

    final = exit_logits[:, -1].argmax(-1)  # (N,)
    state: State = {}
    weights, bias = [], []
    for position in range(exit_logits.shape[1] - 1):
        features, state = gate_features(exit_logits[:, position], state)
        agrees = (exit_logits[:, position].argmax(-1) == final).numpy()
        if agrees.all() or not agrees.any():  # one class only: a constant gate
            weights.append([0.0] * len(FEATURES))
            bias.append(10.0 if agrees.all() else -10.0)
            continue
        model = LogisticRegression(C=regularisation, max_iter=1000).fit(features.double().numpy(), agrees)
        weights.append([float(w) for w in model.coef_[0]])
        bias.append(float(model.intercept_[0]))
    return {"features": list(FEATURES), "weights": weights, "bias": bias}
