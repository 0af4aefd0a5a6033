"""Comparing exit rules honestly: settings chosen on validation, metrics reported on test, at matched work.

A rule's trade-off is a set of settings (thresholds). Running setting `a` on a share `w` of the texts
and `b` on the rest costs `w·m_a + (1-w)·m_b` layers per text on average, so any mean exit layer between
two settings can be reached by mixing them: trade-off curves are interpolated linearly in mean exit
layer, and a rule's achievable curve is the upper concave hull of its settings.

For a target layer speedup `s` (mean exit layer `L / s`), the mixture with the best metric on the
validation split among those that cost at most `L / s` layers is chosen; its metric on the test split
is what is reported. Rules are compared at the same targets, and an area is only taken over speedups
that every compared rule reaches. Differences come with paired bootstrap intervals that resample the
test texts (and the training seeds, where there are several models per side).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from badge.rules import ExitPolicy, simulate
from badge.tasks import TASKS, get_task

TARGET_SPEEDUPS = (1.5, 2.0, 3.0)
AREA_POINTS = 21  # targets, evenly spaced in saved fraction, that an area averages over
BOOTSTRAP_RESAMPLES = 1000
FULL = ExitPolicy("full")


@dataclass
class SplitLogits:
    """Every exit's logits on one split, with what is needed to replay a policy over them."""

    exit_logits: torch.Tensor  # (N, E, K)
    labels: torch.Tensor  # (N,) or (N, K)
    exit_layers: list[int]
    task: str

    @property
    def num_layers(self) -> int:
        return self.exit_layers[-1]

    def __len__(self) -> int:
        return self.exit_logits.shape[0]


class Scorer:
    """A setting's answers on one split: its mean exit layer and its metric on any resample of the texts.

    Args:
        exit_layers: (N,) layer each text left after.
        per_text: (N,) score per text when the metric is a mean over texts (accuracy, in points), else None.
        chosen, labels, task: (N, K) logits of the answering exits, the labels and the task, for other metrics.
    """

    def __init__(
        self,
        exit_layers: torch.Tensor,
        per_text: torch.Tensor | None,
        chosen: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        task: str = TASKS[0],
    ) -> None:
        self.exit_layers, self.per_text = exit_layers.float(), per_text
        self.chosen, self.labels, self.task = chosen, labels, get_task(task)
        self.metric_name = self.task.metric.name
        self.mean_exit_layer = float(self.exit_layers.mean())
        self.metric = float(self.on(torch.arange(len(exit_layers))[None])[0])

    @classmethod
    def replay(cls, split: SplitLogits, policy: ExitPolicy) -> Scorer:
        """Replay `policy` over the stored logits of `split`."""
        labels = split.labels if policy.needs_labels else None
        return cls.at(split, simulate(split.exit_logits, policy, split.task, split.exit_layers, labels))

    @classmethod
    def at(cls, split: SplitLogits, positions: torch.Tensor) -> Scorer:
        """The answers of `split` when text n leaves at exit position `positions[n]` (N,)."""
        chosen = split.exit_logits[torch.arange(len(split)), positions]  # (N, K)
        exit_layers = torch.tensor(split.exit_layers, dtype=torch.float32)[positions]  # (N,)
        # A metric that is a mean over texts (accuracy) makes a resample one indexing away.
        per_text = get_task(split.task).per_text_metric(chosen, split.labels)
        return cls(exit_layers, per_text, chosen, split.labels, split.task)

    def on(self, texts: torch.Tensor) -> torch.Tensor:
        """The metric on each row of text indices `texts` (B, N) (repeats allowed): (B,)."""
        if self.per_text is not None:
            return self.per_text[texts].mean(-1)
        return self.task.resampled_metric(self.chosen, self.labels, texts)


@dataclass
class Mixture:
    """Run policy `a` on a `weight` share of the texts and `b` on the rest (`b` is `a` for a single setting)."""

    a: ExitPolicy
    b: ExitPolicy
    weight: float

    def describe(self) -> str:
        if self.weight >= 1.0 or self.a == self.b:
            return str(self.a)
        return f"{self.weight:.2f}·{self.a} + {1 - self.weight:.2f}·{self.b}"


@dataclass
class Measured:
    """A mixture measured on one split."""

    mixture: Mixture
    metric: float
    mean_exit_layer: float
    num_layers: int
    score_a: Scorer = field(repr=False)
    score_b: Scorer = field(repr=False)

    @property
    def layer_speedup(self) -> float:
        return self.num_layers / self.mean_exit_layer

    def on(self, texts: torch.Tensor) -> torch.Tensor:
        """The mixture's expected metric on each row of text indices `texts` (B, N): (B,)."""
        w = self.mixture.weight
        if w >= 1.0:
            return self.score_a.on(texts)
        return w * self.score_a.on(texts) + (1 - w) * self.score_b.on(texts)


class RuleCurve:
    """One rule's settings: chooses mixtures on validation, measures them on test.

    Args:
        name: the curve's name.
        validation: (policy, its `Scorer` on validation) for every setting, the full model included.
        score_test: a policy's `Scorer` on test.
        num_layers: L.
    """

    def __init__(
        self,
        name: str,
        validation: Sequence[tuple[ExitPolicy, Scorer]],
        score_test: Callable[[ExitPolicy], Scorer],
        num_layers: int,
    ) -> None:
        self.name, self.num_layers, self._score_test = name, num_layers, score_test
        self._test_scores: dict[str, Scorer] = {}
        self.hull = upper_hull([(s.mean_exit_layer, s.metric, policy) for policy, s in validation])

    @classmethod
    def replay(cls, name: str, policies: Sequence[ExitPolicy], validation: SplitLogits, test: SplitLogits) -> RuleCurve:
        """The curve of `policies` (and the full model) replayed over stored logits of both splits."""
        scored = [(policy, Scorer.replay(validation, policy)) for policy in (*policies, FULL)]
        return cls(name, scored, lambda policy: Scorer.replay(test, policy), validation.num_layers)

    @property
    def fastest_layer(self) -> float:
        """The smallest mean exit layer this rule reaches on validation."""
        return self.hull[0][0]

    @property
    def max_speedup(self) -> float:
        return self.num_layers / self.fastest_layer

    def validation_metric(self, target_speedup: float) -> float | None:
        """The validation metric of the mixture `choose` picks (the hull's value at the budget)."""
        mixture = self.choose(target_speedup)
        if mixture is None:
            return None
        metric = {str(policy): value for _, value, policy in self.hull}
        return mixture.weight * metric[str(mixture.a)] + (1 - mixture.weight) * metric[str(mixture.b)]

    def choose(self, target_speedup: float) -> Mixture | None:
        """The mixture with the best validation metric costing at most `L / target_speedup` layers; None if the
        rule cannot get that fast on validation."""
        budget = self.num_layers / target_speedup
        if budget < self.fastest_layer - 1e-9:
            return None
        best = max(range(len(self.hull)), key=lambda i: self.hull[i][1])
        if budget >= self.hull[best][0]:  # the best setting is within budget: spend no more
            return Mixture(self.hull[best][2], self.hull[best][2], 1.0)
        for (m0, _, p0), (m1, _, p1) in zip(self.hull, self.hull[1:], strict=False):
            if m0 - 1e-9 <= budget <= m1:
                weight = 1.0 if m1 == m0 else (m1 - budget) / (m1 - m0)
                return Mixture(p0, p1, weight)
        raise AssertionError("a budget within the hull's span lies on one of its segments")

    def _score(self, policy: ExitPolicy) -> Scorer:
        key = str(policy)
        if key not in self._test_scores:
            self._test_scores[key] = self._score_test(policy)
        return self._test_scores[key]

    def report(self, target_speedup: float) -> Measured | None:
        """The validation-chosen mixture for `target_speedup`, measured on test (None if unreachable)."""
        mixture = self.choose(target_speedup)
        if mixture is None:
            return None
        a, b = self._score(mixture.a), self._score(mixture.b)
        w = mixture.weight
        return Measured(
            mixture,
            w * a.metric + (1 - w) * b.metric,
            w * a.mean_exit_layer + (1 - w) * b.mean_exit_layer,
            self.num_layers,
            a,
            b,
        )


def upper_hull(points: list[tuple[float, float, ExitPolicy]]) -> list[tuple[float, float, ExitPolicy]]:
    """Upper concave hull of (mean exit layer, metric, policy) points, by increasing mean exit layer.

    Mixing two settings reaches every point on the segment between them, so the hull is what a rule
    can achieve; points below it are never worth running.
    """
    ordered = sorted(points, key=lambda p: (p[0], -p[1]))
    hull: list[tuple[float, float, ExitPolicy]] = []
    for point in ordered:
        if hull and point[0] == hull[-1][0]:
            continue  # same cost, lower metric (sorted so)
        while len(hull) >= 2:
            (x0, y0, _), (x1, y1, _) = hull[-2], hull[-1]
            # drop the middle point when it lies on or below the line from hull[-2] to `point`
            if (y1 - y0) * (point[0] - x0) <= (point[1] - y0) * (x1 - x0):
                hull.pop()
            else:
                break
        hull.append(point)
    return hull


def area_targets(max_speedup: float, points: int = AREA_POINTS) -> list[float]:
    """Speedups evenly spaced in saved fraction (1 - 1/speedup) from 1x to `max_speedup`."""
    end = 1.0 - 1.0 / max_speedup
    return [1.0 / (1.0 - end * i / (points - 1)) for i in range(points)]


def area(measured: Sequence[Measured]) -> float:
    """Mean test metric over `area_targets`: the area under the curve over saved fraction, per unit width."""
    return sum(m.metric for m in measured) / len(measured)


# ----- paired bootstrap ----------------------------------------------------------------------
def paired_bootstrap(
    difference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    num_texts: int,
    num_seeds: int = 1,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of a paired difference under resampling of texts (and seeds).

    Args:
        difference: maps (text indices (B, N), seed indices (B, R)) to the (B,) differences between the two
            sides, each side computed on the same resampled texts and seeds.
        num_texts, num_seeds: how many test texts and seeds (models per side) there are.
    Returns:
        (low, high) of the `level` interval.
    """
    generator = torch.Generator().manual_seed(seed)
    texts = torch.randint(num_texts, (resamples, num_texts), generator=generator)
    seeds = torch.randint(num_seeds, (resamples, num_seeds), generator=generator)
    values = torch.sort(difference(texts, seeds).double()).values
    tail = (1.0 - level) / 2
    low = values[max(0, math.floor(tail * resamples))]
    high = values[min(resamples - 1, math.ceil((1.0 - tail) * resamples) - 1)]
    return float(low), float(high)


def held(interval: tuple[float, float]) -> bool:
    """A difference is called held only when its interval excludes 0 on the positive side."""
    return interval[0] > 0


def mean_over_seeds(per_seed: Sequence[Measured | Scorer], texts: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Each resample's metric (B,): the mean over its resampled seeds (B, R) of that seed's model (or mixture)
    on its resampled texts (B, N)."""
    values = torch.stack([measure.on(texts) for measure in per_seed])  # (R, B)
    return values.gather(0, seeds.T).mean(0)


def _span(curve: RuleCurve, common: float) -> list[Measured | None]:
    return [curve.report(speedup) for speedup in area_targets(common)]


def _span_mean(span: Sequence[Measured], texts: torch.Tensor) -> torch.Tensor:
    return torch.stack([m.on(texts) for m in span]).mean(0)


# ----- comparing rules -----------------------------------------------------------------------
@dataclass
class RuleResult:
    """One rule at every target: the validation-chosen mixture measured on test, and its difference to the
    reference rule with a paired bootstrap interval."""

    name: str
    max_speedup_validation: float
    at: dict[str, Measured | None] = field(default_factory=dict)  # target label -> measurement
    validation_metric: dict[str, float | None] = field(default_factory=dict)  # what the choice saw
    span: list[Measured | None] = field(default_factory=list)  # at `area_targets` over the common range
    area: float | None = None
    difference: dict[str, tuple[float, float, float] | None] = field(default_factory=dict)  # (diff, low, high)


@dataclass
class RuleComparison:
    """Every compared rule at the same targets (labels "1.5x", "2x", "3x", and "common" = the largest speedup
    every rule reaches on validation), plus areas over [1x, common]."""

    metric_name: str
    num_layers: int
    full_metric: float
    reference: str
    targets: dict[str, float]
    rules: dict[str, RuleResult]
    area_range: tuple[float, float]
    oracle: Measured | None = None


def target_label(speedup: float) -> str:
    return f"{speedup:g}x"


def compare_curves(
    fitted: dict[str, RuleCurve],
    reference: str,
    num_texts: int,
    targets: Sequence[float] = TARGET_SPEEDUPS,
    resamples: int = BOOTSTRAP_RESAMPLES,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, float], dict[str, RuleResult]]:
    """Every curve at the same targets, its area over the common range, and its difference to `reference`.

    Returns the targets by label ("1.5x", ..., "common") and a `RuleResult` per curve.
    """
    if reference not in fitted:
        raise ValueError(f"reference rule {reference!r} is not among the compared rules {sorted(fitted)}")
    common = min(curve.max_speedup for curve in fitted.values())
    labelled = {target_label(t): t for t in targets}
    labelled["common"] = common
    results: dict[str, RuleResult] = {}
    for name, curve in fitted.items():
        if progress is not None:
            progress(name)
        result = RuleResult(name, curve.max_speedup)
        result.at = {label: curve.report(speedup) for label, speedup in labelled.items()}
        result.validation_metric = {label: curve.validation_metric(s) for label, s in labelled.items()}
        result.span = _span(curve, common)
        result.area = area(result.span) if all(result.span) else None
        results[name] = result
    base = results[reference]
    for name, result in results.items():
        if name == reference:
            continue
        for label in labelled:
            mine, theirs = result.at[label], base.at[label]
            if mine is None or theirs is None:
                result.difference[label] = None
                continue
            low, high = paired_bootstrap(
                lambda texts, seeds, a=mine, b=theirs: a.on(texts) - b.on(texts), num_texts, resamples=resamples
            )
            result.difference[label] = (mine.metric - theirs.metric, low, high)
        if result.area is not None and base.area is not None:
            low, high = paired_bootstrap(
                lambda texts, seeds, a=result.span, b=base.span: _span_mean(a, texts) - _span_mean(b, texts),
                num_texts,
                resamples=resamples,
            )
            result.difference["area"] = (result.area - base.area, low, high)
    return labelled, results


def compare_rules(
    curves: dict[str, Sequence[ExitPolicy] | RuleCurve],
    validation: SplitLogits,
    test: SplitLogits,
    reference: str,
    targets: Sequence[float] = TARGET_SPEEDUPS,
    resamples: int = BOOTSTRAP_RESAMPLES,
    progress: Callable[[str], None] | None = None,
) -> RuleComparison:
    """Compare rules at matched layer speedups, choosing on `validation` and reporting on `test`.

    Args:
        curves: rule (curve) name -> the settings to choose from (or a ready `RuleCurve`, e.g. one whose
            validation scores come from cross-fitting); `oracle` is reported as a bound only.
        reference: the curve every other is compared with (difference = other - reference).
        targets: layer speedups to compare at; the largest speedup every rule reaches is added.
    """
    fitted = {
        name: policies if isinstance(policies, RuleCurve) else RuleCurve.replay(name, policies, validation, test)
        for name, policies in curves.items()
        if name != "oracle"
    }
    labelled, results = compare_curves(fitted, reference, len(test), targets, resamples, progress)
    oracle = None
    if "oracle" in curves and get_task(validation.task).allows("oracle"):
        score = Scorer.replay(test, ExitPolicy("oracle"))
        bound = Mixture(ExitPolicy("oracle"), ExitPolicy("oracle"), 1.0)
        oracle = Measured(bound, score.metric, score.mean_exit_layer, test.num_layers, score, score)
    return RuleComparison(
        get_task(test.task).metric.name,
        test.num_layers,
        Scorer.replay(test, FULL).metric,
        reference,
        labelled,
        results,
        (1.0, labelled["common"]),
        oracle,
    )
