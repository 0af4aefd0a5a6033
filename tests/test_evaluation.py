"""Trade-off summaries and calibration on hand-made curves and stored logits."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BertConfig

from badge import ExitPolicy, MultiExitConfig, MultiExitModel
from badge.evaluation import (
    SweepPoint,
    anchored_curve,
    area_under_curve,
    calibrate,
    exit_costs,
    metric_at_speedup,
    pareto_front,
    sweep,
)


def point(speedup: float, metric: float, curve: str = "r", **policy) -> SweepPoint:
    return SweepPoint(curve, {"rule": "entropy", **policy}, metric, 6 / speedup, speedup, 1 - 1 / speedup, 1 / speedup)


def test_metric_at_speedup_interpolates_along_the_curve_from_the_full_model() -> None:
    curve = anchored_curve([point(2.0, 80.0), point(4.0, 70.0)], full_metric=84.0)
    assert metric_at_speedup(curve, 1.5) == pytest.approx(82.0)
    assert metric_at_speedup(curve, 3.0) == pytest.approx(75.0)
    assert metric_at_speedup(curve, 5.0) is None


def test_area_is_the_mean_metric_up_to_3x_and_counts_nothing_past_a_curve_end() -> None:
    flat = anchored_curve([point(3.0, 80.0)], full_metric=80.0)
    assert area_under_curve(flat) == pytest.approx(80.0)
    short = anchored_curve([point(1.5, 80.0)], full_metric=80.0)  # reaches saved fraction 1/3 of 2/3
    assert area_under_curve(short) == pytest.approx(40.0)


def test_pareto_front_drops_dominated_points() -> None:
    points = [point(1.5, 82.0), point(2.0, 83.0), point(2.5, 79.0), point(1.2, 81.0)]
    assert [(p.layer_speedup, p.metric) for p in pareto_front(points)] == [(2.0, 83.0), (2.5, 79.0)]


def test_calibrate_meets_the_target_on_the_sweep() -> None:
    class Result:
        full_metric = 84.0
        metric_name = "accuracy"
        summaries = {"entropy": {}}
        points = [point(1.2, 83.9, tau=0.1), point(1.8, 83.2, tau=0.2), point(2.5, 81.0, tau=0.4)]

    assert calibrate(Result, "entropy", max_drop=1.0).policy["tau"] == 0.2
    assert calibrate(Result, "entropy", speedup=2.0).policy["tau"] == 0.4
    with pytest.raises(ValueError, match="reaches 3.0x"):
        calibrate(Result, "entropy", speedup=3.0)
    with pytest.raises(ValueError, match="has no sweep points"):
        calibrate(Result, "pcee", speedup=1.1)


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
    assert {"dge-jsd", "entropy", "maxprob", "patience", "pcee", "static", "oracle"} <= set(result.summaries)
    static_points = {p.policy["k"]: p for p in result.points if p.curve == "static"}
    assert static_points[2].layer_speedup == pytest.approx(2.0)
    assert static_points[4].metric == pytest.approx(result.full_metric)
    oracle = next(p for p in result.points if p.curve == "oracle")
    assert oracle.metric >= max(p.metric for p in result.points if p.curve != "oracle")
    assert all(math.isfinite(s["auc"]) for s in result.summaries.values())
    assert ExitPolicy.from_dict(oracle.policy).needs_labels
