"""Task types: answers, losses, metrics and exit-rule signals on hand-made logits."""

from __future__ import annotations

import math
import re

import pytest
import torch

from badge import ExitPolicy, MultiExitConfig
from badge.gate import fit_gate
from badge.rules import RULES, PolicyError, simulate
from badge.tasks import TASKS, Metric, MultiLabel, Regression, SingleLabel, Task, get_task

SINGLE, MULTI, REGRESSION = "single_label_classification", "multi_label_classification", "regression"
LAYERS = [1, 2, 3, 4]


def test_every_problem_type_has_one_task_and_the_config_accepts_exactly_those() -> None:
    assert TASKS == (SINGLE, MULTI, REGRESSION)
    assert [type(get_task(name)) for name in TASKS] == [SingleLabel, MultiLabel, Regression]
    with pytest.raises(ValueError, match=r"problem_type 'ranking' is not one of \['single_label_classification'"):
        get_task("ranking")
    with pytest.raises(ValueError, match="problem_type 'ranking'"):
        MultiExitConfig(num_labels=2, problem_type="ranking")


def test_single_label_metrics_on_hand_counted_answers() -> None:
    # Predicted 0, 1, 1, 2, 2 against 0, 1, 2, 2, 0: three right.
    logits = torch.eye(3)[[0, 1, 1, 2, 2]] * 5.0
    labels = torch.tensor([0, 1, 2, 2, 0])
    metrics = get_task(SINGLE).evaluate(logits, labels)
    assert metrics["accuracy"] == pytest.approx(60.0)
    # F1 per class: 0 -> 2/3 (tp 1, fn 1), 1 -> 2/3 (tp 1, fp 1), 2 -> 1/2 (tp 1, fp 1, fn 1).
    assert metrics["macro_f1"] == pytest.approx(100.0 * (2 / 3 + 2 / 3 + 1 / 2) / 3)
    # A class neither predicted nor present does not count towards the macro mean.
    wide = torch.cat([logits, torch.full((5, 1), -9.0)], dim=-1)
    assert get_task(SINGLE).evaluate(wide, labels)["macro_f1"] == pytest.approx(metrics["macro_f1"])


def test_multi_label_metrics_on_hand_counted_answers() -> None:
    logits = torch.tensor([[3.0, -3.0, 3.0], [-3.0, 3.0, -3.0]])  # predicts {0, 2} and {1}
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # true {0} and {1}
    metrics = get_task(MULTI).evaluate(logits, labels)
    assert metrics["micro_f1"] == pytest.approx(100.0 * 2 * 2 / (2 * 2 + 1 + 0))  # tp 2, fp 1, fn 0
    assert metrics["exact_match"] == pytest.approx(50.0)
    nothing = get_task(MULTI).evaluate(-logits.abs(), torch.zeros(2, 3))  # no label anywhere: 0, not an error
    assert nothing["micro_f1"] == 0.0 and nothing["exact_match"] == 100.0


def test_regression_metrics_on_hand_made_values() -> None:
    labels = torch.tensor([1.0, 2.0, 3.0, 4.0])
    shifted = (labels + 1.0)[:, None]  # perfectly correlated, off by one everywhere
    metrics = get_task(REGRESSION).evaluate(shifted, labels)
    assert metrics["pearson"] == pytest.approx(100.0)
    assert metrics["mse"] == pytest.approx(1.0)  # the plain mean squared error, offset included
    flipped = get_task(REGRESSION).evaluate(-labels[:, None], labels)
    assert flipped["pearson"] == pytest.approx(-100.0)
    assert flipped["mse"] == pytest.approx((2**2 + 4**2 + 6**2 + 8**2) / 4)
    assert get_task(REGRESSION).evaluate(torch.zeros(4, 1), labels)["pearson"] == 0.0  # constant: 0, not NaN


@pytest.mark.parametrize("problem_type", TASKS)
def test_the_metric_on_resampled_texts_equals_the_metric_of_each_resample(problem_type: str) -> None:
    torch.manual_seed(0)
    task = get_task(problem_type)
    logits = torch.randn(40, 1 if problem_type == REGRESSION else 4)
    labels = {SINGLE: torch.randint(4, (40,)), MULTI: (torch.rand(40, 4) > 0.6).float(), REGRESSION: torch.randn(40)}
    texts = torch.randint(40, (25, 40))  # 25 bootstrap resamples of the 40 texts
    resampled = task.resampled_metric(logits, labels[problem_type], texts)
    expected = [task.metric.compute(logits[row], labels[problem_type][row]) for row in texts]
    assert resampled.shape == (25,)
    assert resampled.tolist() == pytest.approx(expected, rel=1e-6)  # float32 at worst


def test_answers_of_each_task() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [-4.0, 3.0, 0.0]])
    single, multi, regression = get_task(SINGLE), get_task(MULTI), get_task(REGRESSION)
    assert single.predictions(logits) == [0, 1]
    assert torch.allclose(single.probabilities(logits).sum(-1), torch.ones(2))
    assert single.label_of(1, ["neg", "pos", "mixed"]) == "pos"
    assert single.probability_of(0, single.probabilities(logits)[0]) == pytest.approx(
        math.exp(2) / (math.exp(2) + math.exp(-1) + math.exp(0.5))
    )
    assert multi.predictions(logits) == [[0, 2], [1]]
    assert multi.label_of([0, 2], ["acting", "plot", "music"]) == ["acting", "music"]
    assert multi.probability_of([0, 2], multi.probabilities(logits)[0]) is None
    assert regression.predictions(logits[:, :1]) == [2.0, -4.0]
    assert regression.label_of(2.5, ["value"]) == 2.5 and regression.probability_of(2.5, logits[0, :1]) is None


def test_losses_of_each_task_are_the_textbook_losses() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    assert get_task(SINGLE).loss(logits, torch.tensor([0, 1])) == pytest.approx(
        -(torch.log_softmax(logits, -1)[0, 0] + torch.log_softmax(logits, -1)[1, 1]).item() / 2
    )
    multi_hot = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    bce = -(
        multi_hot * torch.nn.functional.logsigmoid(logits) + (1 - multi_hot) * torch.nn.functional.logsigmoid(-logits)
    )
    assert get_task(MULTI).loss(logits, multi_hot) == pytest.approx(bce.mean().item())
    assert get_task(REGRESSION).loss(logits[:, :1], torch.tensor([1.0, 1.5])) == pytest.approx((1.0 + 1.0) / 2)


@pytest.mark.parametrize("problem_type", TASKS)
def test_every_rule_a_task_allows_runs_and_every_other_is_refused_by_name(problem_type: str) -> None:
    torch.manual_seed(0)
    task = get_task(problem_type)
    logits = torch.randn(6, len(LAYERS), 1 if problem_type == REGRESSION else 3) * 3  # (N, E, K)
    labels = torch.randint(3, (6,))
    for name in RULES:
        settings = {"static": {"k": 2}, "gate": {"gate": fit_gate(torch.randn(20, len(LAYERS), 3))}}.get(name, {})
        policy = ExitPolicy(name, **settings)
        if task.allows(name):
            positions = simulate(logits, policy, problem_type, LAYERS, labels if policy.needs_labels else None)
            assert positions.shape == (6,) and bool(((positions >= 0) & (positions < len(LAYERS))).all())
        else:
            with pytest.raises(PolicyError, match=re.escape(f"rule {name!r} {task.refused_rules[name]}")):
                simulate(logits, policy, problem_type, LAYERS)


def test_multi_label_rule_signals_follow_the_least_sure_label() -> None:
    task = get_task(MULTI)
    sure_and_unsure = task.rule_distribution(torch.tensor([[9.0, 0.0]]))  # label 0 sure, label 1 a coin flip
    assert task.uncertainty(sure_and_unsure).item() == pytest.approx(1.0, abs=1e-6)
    assert task.confidence(sure_and_unsure).item() == pytest.approx(0.5)
    off, on = task.rule_distribution(torch.tensor([[9.0, -0.1]])), task.rule_distribution(torch.tensor([[9.0, 0.1]]))
    assert task.change(off, on, "argmax").item() == 1.0  # label 1 switched on: the label set changed
    assert task.change(sure_and_unsure, sure_and_unsure, "jsd").item() == 0.0


def test_regression_moves_by_the_distance_between_values_whatever_the_divergence() -> None:
    task = get_task(REGRESSION)
    before, after = (
        task.rule_distribution(torch.tensor([[1.0], [2.0]])),
        task.rule_distribution(torch.tensor([[1.5], [2.0]])),
    )
    for kind in ("jsd", "kl", "argmax"):
        assert task.change(before, after, kind).tolist() == [0.5, 0.0]
    assert task.divergences == (None,)


def test_a_task_whose_primary_metric_must_be_minimised_is_refused() -> None:
    with pytest.raises(TypeError, match="primary metric 'mse' must be higher-is-better"):

        class LowestError(Task):
            name = "lowest_error"
            metrics = (Metric("mse", lambda logits, labels: 0.0, higher_is_better=False),)


@pytest.mark.parametrize("problem_type", TASKS)
def test_the_sweep_offers_exactly_the_rules_and_divergences_a_task_allows(problem_type: str) -> None:
    from badge.sweep import default_policies

    task = get_task(problem_type)
    gate = fit_gate(torch.randn(20, len(LAYERS), 3)) if task.allows("gate") else None
    policies = default_policies(problem_type, len(LAYERS), gate=gate)
    assert {policy.rule for _, policy in policies} == {name for name in RULES if name != "full" and task.allows(name)}
    dge_curves = {curve for curve, policy in policies if policy.rule == "dge"}
    assert dge_curves == {f"dge-{kind}" if kind else "dge" for kind in task.divergences}
