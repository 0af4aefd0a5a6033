"""Comparing exit rules at matched speedups, and calibration, on hand-made curves and stored logits."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BertConfig

from badge import ExitPolicy, MultiExitConfig, MultiExitModel
from badge.calibration import calibrate, drop_bound
from badge.comparison import (
    RuleCurve,
    Scorer,
    SplitLogits,
    compare_curves,
    held,
    mean_over_seeds,
    paired_bootstrap,
    upper_hull,
)
from badge.logits import exit_logits_for
from badge.rules import simulate
from badge.sweep import SweepPoint, SweepResult, fit_gate_for, sweep
from badge.timing import exit_costs


def point(speedup: float, metric: float, curve: str = "r", **policy) -> SweepPoint:
    return SweepPoint(curve, {"rule": "entropy", **policy}, metric, 6 / speedup, speedup, 1 - 1 / speedup, 1 / speedup)


def scores(mean_exit_layer: float, accuracy: float, n: int = 200) -> Scorer:
    """A hand-made setting on `n` texts: every text leaves at `mean_exit_layer`, `accuracy` % of them right."""
    right = round(n * accuracy / 100)
    return Scorer(torch.full((n,), mean_exit_layer), 100.0 * (torch.arange(n) < right).float())


def hand_made_curve(name: str, settings: dict[float, tuple[float, float]]) -> RuleCurve:
    """A 6-layer rule whose settings (keyed by tau) have (mean exit layer, accuracy) on validation and on test;
    `settings[tau] = ((layer, validation accuracy), (layer, test accuracy))`."""
    validation = [(ExitPolicy("entropy", tau=tau), scores(*on_val)) for tau, (on_val, _) in settings.items()]
    on_test = {str(ExitPolicy("entropy", tau=tau)): scores(*on_t) for tau, (_, on_t) in settings.items()}
    return RuleCurve(name, validation, lambda policy: on_test[str(policy)], num_layers=6)


def test_upper_hull_keeps_only_points_a_mix_of_settings_cannot_beat() -> None:
    policies = [ExitPolicy("entropy", tau=t) for t in (0.1, 0.2, 0.3, 0.4)]
    points = [(6.0, 90.0, policies[0]), (4.5, 80.0, policies[1]), (3.0, 88.0, policies[2]), (1.0, 60.0, policies[3])]
    hull = upper_hull(points)
    assert [(m, a) for m, a, _ in hull] == [(1.0, 60.0), (3.0, 88.0), (6.0, 90.0)]  # (4.5, 80) lies below


def test_mixing_two_settings_is_linear_in_mean_exit_layer() -> None:
    curve = hand_made_curve("r", {0.0: ((6, 90), (6, 90)), 0.5: ((3, 87), (3, 84))})
    measured = curve.report(1.5)  # a budget of 4 layers: 2/3 of the texts at 3 layers, 1/3 at 6
    assert measured.mixture.a == ExitPolicy("entropy", tau=0.5) and measured.mixture.weight == pytest.approx(2 / 3)
    assert measured.mean_exit_layer == pytest.approx(4.0)
    assert measured.metric == pytest.approx(90 / 3 + 84 * 2 / 3)
    assert curve.report(2.0).metric == pytest.approx(84.0) and curve.report(2.5) is None


def test_a_short_reaching_accurate_rule_beats_a_long_reaching_inaccurate_one_at_matched_speedups() -> None:
    accurate = hand_made_curve("accurate", {0.0: ((6, 90), (6, 90)), 0.5: ((3, 89), (3, 89))})  # reaches 2x
    reaching = hand_made_curve(
        "reaching", {0.0: ((6, 90), (6, 90)), 0.5: ((3, 85), (3, 85)), 0.9: ((1.5, 70), (1.5, 70))}
    )  # reaches 4x
    targets, results = compare_curves({"accurate": accurate, "reaching": reaching}, "reaching", 200, resamples=200)
    assert targets["common"] == pytest.approx(2.0)  # the area spans only what both rules reach
    assert results["accurate"].at["3x"] is None and results["reaching"].at["3x"].metric == pytest.approx(75.0)
    for label in ("1.5x", "2x", "common"):
        assert results["accurate"].at[label].metric > results["reaching"].at[label].metric
    assert results["accurate"].area > results["reaching"].area
    diff, low, high = results["accurate"].difference["2x"]
    assert diff == pytest.approx(4.0) and low > 0 and held((low, high))


def test_summary_points_are_chosen_on_validation_and_reported_on_test() -> None:
    # On validation setting 0.5 looks best at 2x; on test setting 0.6 would be: the report keeps 0.5.
    curve = hand_made_curve("r", {0.0: ((6, 90), (6, 90)), 0.5: ((3, 88), (3, 70)), 0.6: ((3, 80), (3, 95))})
    measured = curve.report(2.0)
    assert measured.mixture.a == ExitPolicy("entropy", tau=0.5) and measured.metric == pytest.approx(70.0)


def test_paired_bootstrap_interval_contains_zero_for_equal_sides_and_excludes_it_for_a_real_gain() -> None:
    better, worse = scores(3, 80, n=400), scores(3, 70, n=400)
    low, high = paired_bootstrap(lambda texts, seeds: better.on(texts) - better.on(texts), 400, resamples=200)
    assert low == high == 0.0 and not held((low, high))
    low, high = paired_bootstrap(lambda texts, seeds: better.on(texts) - worse.on(texts), 400, resamples=200)
    assert 0 < low < 10 < high


def test_seeds_are_resampled_with_the_texts() -> None:
    per_seed = [scores(3, 60), scores(3, 90)]
    low, high = paired_bootstrap(lambda texts, seeds: mean_over_seeds(per_seed, texts, seeds), 200, 2, 400)
    assert low < 62 and high > 88  # a resample may hold the same seed twice
    texts_only = paired_bootstrap(lambda texts, seeds: mean_over_seeds(per_seed[:1], texts, seeds), 200, 1, 400)
    assert texts_only[1] - texts_only[0] < 20


def test_calibrate_meets_the_target_on_the_sweep() -> None:
    class Result:
        full_metric = 84.0
        metric_name = "accuracy"
        curves = ["entropy"]
        points = [point(1.2, 83.9, tau=0.1), point(1.8, 83.2, tau=0.2), point(2.5, 81.0, tau=0.4)]
        full_per_text = None  # no per-text scores: max_drop compares the drops themselves

    assert calibrate(Result, "entropy", max_drop=1.0).policy["tau"] == 0.2
    assert calibrate(Result, "entropy", speedup=2.0).policy["tau"] == 0.4
    with pytest.raises(ValueError, match="reaches 3.0x"):
        calibrate(Result, "entropy", speedup=3.0)
    with pytest.raises(ValueError, match="has no sweep points"):
        calibrate(Result, "pcee", speedup=1.1)


def correct_on(n: int, right: list[int]) -> torch.Tensor:
    """(n,) per-text scores in points: 100 on the texts in `right`, 0 elsewhere."""
    scores = torch.zeros(n)
    scores[right] = 100.0
    return scores


def test_drop_bound_is_the_paired_drop_plus_1_645_standard_errors() -> None:
    full, setting = torch.tensor([100.0, 100.0, 100.0, 0.0]), torch.tensor([100.0, 0.0, 100.0, 0.0])
    # full - setting = (0, 100, 0, 0): mean 25, standard deviation 50, standard error 50 / sqrt(4) = 25
    drop, bound = drop_bound(setting, full)
    assert drop == pytest.approx(25.0)
    assert bound == pytest.approx(25.0 + 1.6448536 * 25.0)
    assert drop_bound(full, full) == (0.0, 0.0)


def test_max_drop_passes_over_a_setting_whose_drop_only_looks_small() -> None:
    n = 400
    full = correct_on(n, list(range(320)))  # 80 %
    # fast: 40 of the full model's right answers lost, 38 of its wrong ones gained: drop 0.5, but noisy
    fast = correct_on(n, list(range(40, 320)) + list(range(320, 358)))
    # safe: one right answer lost: drop 0.25, bound 0.25 + 1.645 * 5 / 20
    safe = correct_on(n, list(range(1, 320)))
    points = [
        point(2.5, float(fast.mean()), tau=0.6),
        point(1.5, float(safe.mean()), tau=0.3),
        point(1.0, 80.0, tau=0.0),
    ]
    for setting, scores in zip(points, (fast, safe, full), strict=True):
        setting.per_text = scores
    result = SweepResult("accuracy", 6, 80.0, points, full)

    assert drop_bound(fast, full)[0] == pytest.approx(0.5) and drop_bound(fast, full)[1] > 1.0
    assert drop_bound(safe, full)[1] == pytest.approx(0.25 + 1.6448536 * 5.0 / 20.0, abs=1e-3)
    assert calibrate(result, "entropy", max_drop=1.0).policy["tau"] == 0.3
    assert calibrate(result, "entropy", max_drop=5.0).policy["tau"] == 0.6
    result.full_per_text = None  # the same sweep without per-text scores: the point estimate alone decides
    assert calibrate(result, "entropy", max_drop=1.0).policy["tau"] == 0.6
    with pytest.raises(ValueError, match="with 95 % confidence"):
        calibrate(SweepResult("accuracy", 6, 80.0, points[:1], full), "entropy", max_drop=1.0)


@pytest.fixture(scope="module")
def model() -> MultiExitModel:
    backbone = BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64)
    return MultiExitModel(MultiExitConfig(backbone=backbone.to_dict(), num_labels=2))


def test_flops_ratio_grows_with_the_exit_layer_and_is_about_one_at_the_end(model) -> None:
    costs = exit_costs(model, seq_len=32)
    assert torch.all(costs[1:] > costs[:-1])
    assert 1.0 < costs[-1].item() < 1.05  # all layers plus the evaluated exits and bypasses


def test_sweep_over_stored_logits_reports_every_rule_and_the_oracle_bound(model) -> None:
    torch.manual_seed(0)
    labels = torch.randint(0, 2, (300,))
    # Exits grow more accurate and more confident with depth.
    logits = torch.stack([(2 * labels - 1)[:, None].float() * (0.5 * e) + torch.randn(300, 2) for e in range(4)], 1)
    result = sweep(model, logits, labels, seq_len=16)
    assert {"dge-jsd", "entropy", "maxprob", "patience", "pcee", "static", "oracle"} <= set(result.curves)
    static_points = {p.policy["k"]: p for p in result.points if p.curve == "static"}
    assert static_points[2].layer_speedup == pytest.approx(2.0)
    assert static_points[4].metric == pytest.approx(result.full_metric)
    oracle = next(p for p in result.points if p.curve == "oracle")
    assert oracle.metric >= max(p.metric for p in result.points if p.curve != "oracle")
    assert all(math.isfinite(p.metric) and 1.0 <= p.layer_speedup <= 4.0 for p in result.points)
    assert ExitPolicy.from_dict(oracle.policy).needs_labels


def test_stored_logits_come_back_in_input_order_though_batches_are_sorted_by_length(model) -> None:
    torch.manual_seed(2)
    lengths = torch.tensor([9, 3, 12, 5, 3, 7])
    mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
    inputs = {"input_ids": torch.randint(5, 100, (6, 12)) * mask, "attention_mask": mask}
    logits, mean_length = exit_logits_for(model.eval(), inputs, torch.zeros(6, dtype=torch.long), batch_size=2)
    for row in range(6):
        alone = model(inputs["input_ids"][row : row + 1, : lengths[row]], mask[row : row + 1, : lengths[row]])
        torch.testing.assert_close(logits[row], torch.cat(alone.exit_logits), atol=1e-5, rtol=1e-5)
    assert mean_length == 6


def test_the_gate_threshold_is_chosen_from_exits_decided_by_a_gate_fitted_without_those_texts() -> None:
    torch.manual_seed(3)
    labels = torch.randint(0, 3, (200,))
    logits = torch.randn(200, 4, 3) + 3.0 * torch.nn.functional.one_hot(labels, 3)[:, None] * torch.rand(200, 4, 1)
    split = SplitLogits(logits, labels, [1, 2, 3, 4], "single_label_classification")
    fitted = fit_gate_for(split)
    first, second = fitted.halves
    assert sorted(torch.cat([first, second]).tolist()) == list(range(200))  # two disjoint halves
    positions = fitted.positions(0.8)
    half_policy = ExitPolicy("gate", tau=0.8, gate=fitted.half_gates[1])  # fitted on the second half only
    expected = simulate(logits[first], half_policy, "single_label_classification", [1, 2, 3, 4])
    assert torch.equal(positions[first], expected)
    curve = fitted.curve(split)
    deployed = [policy.gate for _, _, policy in curve.hull if policy.rule == "gate"]
    assert deployed and all(gate == fitted.gate for gate in deployed)  # what is chosen deploys the full fit
