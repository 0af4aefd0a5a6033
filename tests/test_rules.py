"""Exit rules on hand-made logits where the right exit is known."""

from __future__ import annotations

import json
import math

import pytest
import torch

from badge import ExitPolicy
from badge.distributions import divergence, softmax_log_probs
from badge.gate import FEATURES, fit_gate, gate_features
from badge.rules import PolicyError, names, simulate

SINGLE = "single_label_classification"
LAYERS = [1, 2, 3, 4]


def logits_from_probs(*rows: list[list[float]]) -> torch.Tensor:
    """(N, E, K) logits whose softmax gives the given probabilities per exit."""
    return torch.tensor(rows, dtype=torch.float32).log()


def exits(policy: ExitPolicy, logits: torch.Tensor, labels: torch.Tensor | None = None) -> list[int]:
    """1-based exit layer of each sample."""
    return [LAYERS[p] for p in simulate(logits, policy, SINGLE, LAYERS, labels).tolist()]


UNSURE = [0.5, 0.5]
SURE = [0.02, 0.98]
# Sample 0 is confident from exit 2; sample 1 flips its answer until exit 3; sample 2 never settles.
LOGITS = logits_from_probs(
    [UNSURE, SURE, SURE, SURE],
    [[0.9, 0.1], [0.1, 0.9], [0.15, 0.85], [0.12, 0.88]],
    [[0.8, 0.2], [0.2, 0.8], [0.8, 0.2], [0.2, 0.8]],
)


def test_registry_lists_every_rule() -> None:
    assert {"dge", "entropy", "maxprob", "patience", "pcee", "static", "oracle"} <= set(names())


def test_entropy_and_maxprob_leave_at_the_first_confident_exit() -> None:
    assert exits(ExitPolicy("entropy", tau=0.2), LOGITS) == [2, 4, 4]
    assert exits(ExitPolicy("maxprob", tau=0.95), LOGITS) == [2, 4, 4]
    assert exits(ExitPolicy("maxprob", tau=0.85), LOGITS) == [2, 1, 4]  # 0.9 at exit 1


def test_dge_waits_for_consecutive_exits_that_agree() -> None:
    # Sample 0: exits 2 and 3 are identical -> divergence 0 at exit 3.
    # Sample 1: exit 3 vs exit 2 differ slightly (JSD ~ 0.002) -> leaves at 3 with tau 0.01.
    assert exits(ExitPolicy("dge", tau=0.01, patience=1), LOGITS) == [3, 3, 4]
    assert exits(ExitPolicy("dge", tau=0.01, patience=2), LOGITS) == [4, 4, 4]
    assert exits(ExitPolicy("dge", tau=1e-9, patience=1), LOGITS) == [3, 4, 4]


def test_dge_with_argmax_divergence_is_pabee() -> None:
    torch.manual_seed(0)
    logits = torch.randn(200, 6, 3) * 2
    layers = list(range(1, 7))
    for patience in (1, 2, 3):
        dge = simulate(logits, ExitPolicy("dge", tau=0.5, patience=patience, divergence="argmax"), SINGLE, layers)
        pabee = simulate(logits, ExitPolicy("patience", patience=patience), SINGLE, layers)
        assert torch.equal(dge, pabee)


def test_patience_pcee_static_and_oracle() -> None:
    assert exits(ExitPolicy("patience", patience=1), LOGITS) == [3, 3, 4]
    assert exits(ExitPolicy("pcee", tau=0.2, patience=2), LOGITS) == [3, 4, 4]
    assert exits(ExitPolicy("static:2"), LOGITS) == [2, 2, 2]
    assert exits(ExitPolicy("oracle"), LOGITS, labels=torch.tensor([1, 1, 0])) == [2, 2, 1]
    with pytest.raises(PolicyError, match="needs labels"):
        exits(ExitPolicy("oracle"), LOGITS)


def test_a_sample_that_never_meets_the_rule_leaves_at_the_last_layer() -> None:
    never = logits_from_probs([UNSURE, UNSURE, UNSURE, UNSURE])
    for policy in (ExitPolicy("entropy", tau=0.1), ExitPolicy("maxprob", tau=0.99), ExitPolicy("full")):
        assert exits(policy, never) == [4]


def test_divergences_are_stable_for_near_one_hot_distributions() -> None:
    p = softmax_log_probs(torch.tensor([[60.0, -60.0]]))
    q = softmax_log_probs(torch.tensor([[-60.0, 60.0]]))
    same = divergence(p, p, "jsd")
    assert same.item() == 0.0
    opposite = divergence(p, q, "jsd")
    assert math.isclose(opposite.item(), math.log(2), rel_tol=1e-5)  # JSD's maximum
    for kind in ("kl", "rkl", "skl"):
        value = divergence(p, q, kind)
        assert torch.isfinite(value).all() and value.item() > 100.0  # ~120 nats apart
    # xjsd adds the mean entropy, zero for one-hot distributions.
    assert math.isclose(divergence(p, q, "xjsd").item(), math.log(2), rel_tol=1e-5)
    jsd_swapped = divergence(q, p, "jsd")
    assert torch.allclose(opposite, jsd_swapped)


def test_regression_and_multi_label_variants() -> None:
    values = torch.tensor([[[0.0], [1.0], [1.05], [1.06]]])
    positions = simulate(values, ExitPolicy("dge", tau=0.1), "regression", LAYERS)
    assert positions.tolist() == [2]  # |1.05 - 1.0| < 0.1 at the third exit
    multi = torch.tensor([[[0.0, 0.0], [8.0, -8.0], [8.0, -8.0], [8.0, -8.0]]])
    assert simulate(multi, ExitPolicy("dge", tau=0.01), "multi_label_classification", LAYERS).tolist() == [2]
    assert simulate(multi, ExitPolicy("entropy", tau=0.1), "multi_label_classification", LAYERS).tolist() == [1]
    with pytest.raises(PolicyError, match="regression"):
        simulate(values, ExitPolicy("entropy", tau=0.1), "regression", LAYERS)


def test_bad_policies_are_refused_with_the_bad_value_named() -> None:
    with pytest.raises(PolicyError, match="unknown exit rule 'entropi'"):
        ExitPolicy("entropi")
    with pytest.raises(PolicyError, match="tau 1.5"):
        ExitPolicy("entropy", tau=1.5)
    with pytest.raises(PolicyError, match="patience 0"):
        ExitPolicy("dge", patience=0)
    with pytest.raises(PolicyError, match="divergence 'hellinger'"):
        ExitPolicy("dge", divergence="hellinger")
    with pytest.raises(PolicyError, match="static:3"):
        ExitPolicy("static:x")
    assert ExitPolicy.from_dict({"rule": "static:3"}).to_dict() == {"rule": "static", "k": 3}


def test_policies_name_the_exits_they_read_so_engines_can_skip_the_rest() -> None:
    layers = [2, 4, 6, 8]
    assert ExitPolicy("full").exits_consulted(layers) == [8]
    assert ExitPolicy("static:3").exits_consulted(layers) == [4, 8]
    assert ExitPolicy("static:9").exits_consulted(layers) == [8]
    assert ExitPolicy("dge", tau=0.1).exits_consulted(layers) == layers


# ----- the agreement gate --------------------------------------------------------------------
def agreeing_exits(n: int = 400, seed: int = 0) -> torch.Tensor:
    """(n, 4, 3) logits: shallow exits agree with the final one where they are confident, and guess elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    final = torch.randint(0, 3, (n,), generator=generator)
    exits = []
    for position in range(4):
        confident = torch.rand(n, generator=generator) < 0.3 + 0.2 * position
        guess = torch.where(confident, final, torch.randint(0, 3, (n,), generator=generator))
        logits = torch.randn(n, 3, generator=generator) * 0.3
        logits[torch.arange(n), guess] += torch.where(confident, 4.0, 0.5)
        exits.append(logits)
    return torch.stack(exits, dim=1)


def test_gate_features_at_the_first_exit_have_no_divergence_and_a_streak_of_one() -> None:
    features, state = gate_features(torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), {})
    assert features.shape == (2, len(FEATURES))
    assert features[:, 3:5].abs().max() == 0 and features[:, 5].tolist() == [1.0, 1.0]
    assert features[0, 0] > 0.9 and features[1, 1] == pytest.approx(1.0)  # max prob, normalised entropy
    features, _ = gate_features(torch.tensor([[4.0, 0.0, 0.0], [0.0, 5.0, 0.0]]), state)
    assert features[:, 5].tolist() == [2.0, 1.0]  # the streak counts exits that agree in a row
    assert features[1, 3] > features[0, 3]  # the second row changed its mind: it diverges more


def test_a_fitted_gate_learns_from_unlabelled_logits_and_can_leave_at_the_first_exit() -> None:
    logits = agreeing_exits()
    gate = fit_gate(logits)
    assert len(gate["weights"]) == 3 and gate["features"] == list(FEATURES)
    policy = ExitPolicy("gate", tau=0.8, gate=gate)
    positions = simulate(logits, policy, "single_label_classification", [1, 2, 3, 4])
    assert (positions == 0).any()  # unlike the paper's DGE, which needs two exits
    final = logits[:, -1].argmax(-1)
    chosen = logits[torch.arange(len(logits)), positions].argmax(-1)
    early = positions < 3
    assert (chosen[early] == final[early]).float().mean() > 0.9  # the texts it lets go agree with the final exit
    stored = json.loads(json.dumps(policy.to_dict()))  # plain JSON, as exit_policy.json holds it
    assert ExitPolicy.from_dict(stored) == policy


def test_a_malformed_gate_is_refused_with_what_is_wrong() -> None:
    with pytest.raises(PolicyError, match="needs a fitted gate"):
        ExitPolicy("gate", tau=0.9).build("single_label_classification", [1, 2])
    with pytest.raises(PolicyError, match="finite numbers"):
        ExitPolicy("gate", tau=0.9, gate={"features": list(FEATURES), "weights": [[float("nan")] * 6], "bias": [0]})
    with pytest.raises(PolicyError, match="one list of 6 numbers per exit"):
        ExitPolicy("gate", tau=0.9, gate={"features": list(FEATURES), "weights": [[1.0]], "bias": [0.0]})
    with pytest.raises(PolicyError, match="must lie in \\[0, 1\\]"):
        ExitPolicy("gate", tau=2.0)
    gate = {"features": list(FEATURES), "weights": [[0.0] * 6], "bias": [0.0]}
    with pytest.raises(PolicyError, match="fitted for 2 exits; this model has 4"):
        ExitPolicy("gate", tau=0.9, gate=gate).build("single_label_classification", [1, 2, 3, 4])
