"""Trade-off sweeps: every exit rule's settings replayed over stored exit logits, and `badge evaluate --sweep`'s
comparison of rules chosen on one split and reported on another.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from badge.comparison import BOOTSTRAP_RESAMPLES, RuleComparison, RuleCurve, Scorer, SplitLogits, compare_rules
from badge.data import TextDataset
from badge.gate import fit_gate
from badge.logits import split_logits
from badge.modeling import MultiExitModel
from badge.rules import RULES, ExitPolicy, simulate
from badge.tasks import get_task
from badge.timing import exit_costs, time_policy


@dataclass
class SweepPoint:
    """One threshold setting of one rule, measured on a split."""

    curve: str  # rule name, with the divergence for dge (`dge-jsd`)
    policy: dict[str, Any]
    metric: float
    mean_exit_layer: float
    layer_speedup: float
    saved_fraction: float
    flops_ratio: float
    wallclock_speedup: float | None = None
    per_text: torch.Tensor | None = field(default=None, repr=False)  # (N,) score per text, when kept


@dataclass
class SweepResult:
    """All points of a sweep on one split."""

    metric_name: str
    num_layers: int
    full_metric: float
    points: list[SweepPoint]
    full_per_text: torch.Tensor | None = field(default=None, repr=False)  # (N,) the full model's, when kept

    @property
    def curves(self) -> list[str]:
        return list(dict.fromkeys(p.curve for p in self.points))


def default_policies(
    task: str, num_layers: int, include_oracle: bool = True, gate: dict[str, Any] | None = None
) -> list[tuple[str, ExitPolicy]]:
    """Every registered rule over its sweep grid, as (curve name, policy) pairs; the `gate` rule only when a
    fitted gate is given (`fit_gate_for`)."""
    policies: list[tuple[str, ExitPolicy]] = []
    strategy = get_task(task)
    for name, spec in RULES.items():
        if name == "full" or not strategy.allows(name) or (spec.needs_labels and not include_oracle):
            continue
        if name == "gate" and gate is None:
            continue
        grid = dict(spec.sweep)
        if name == "static":
            grid = {"k": tuple(range(1, num_layers + 1))}
        divergences = strategy.divergences if name == "dge" else (None,)
        for kind in divergences:
            curve = f"{name}-{kind}" if kind else name
            keys = list(grid)
            for values in itertools.product(*(grid[key] for key in keys)):
                settings = dict(zip(keys, values, strict=True))
                if kind:
                    settings["divergence"] = kind
                if name == "gate":
                    settings["gate"] = gate
                policies.append((curve, ExitPolicy(rule=name, **settings)))
    return policies


@dataclass
class FittedGate:
    """The agreement gate fitted on a split (the one to deploy), with honest exits on that same split.

    Choosing the gate's threshold on the texts it was fitted on flatters it: there it agrees with the final
    exit more often than on new texts. `positions(tau)` therefore gives each text's exit under a gate fitted
    on the other half of the split (2-fold cross-fitting), and choices on this split are made from those.
    """

    split: SplitLogits
    gate: dict[str, Any]
    halves: tuple[torch.Tensor, torch.Tensor]
    half_gates: tuple[dict[str, Any], dict[str, Any]]

    def policy(self, tau: float) -> ExitPolicy:
        return ExitPolicy("gate", tau=tau, gate=self.gate)

    def positions(self, tau: float) -> torch.Tensor:
        """(N,) exit position of every text of the split, each decided by the gate fitted without it."""
        positions = torch.empty(len(self.split), dtype=torch.long)
        for held_out, gate in zip(self.halves, self.half_gates[::-1], strict=True):
            logits = self.split.exit_logits[held_out]
            policy = ExitPolicy("gate", tau=tau, gate=gate)
            positions[held_out] = simulate(logits, policy, self.split.task, self.split.exit_layers)
        return positions

    def curve(self, test: SplitLogits) -> RuleCurve:
        """The gate's trade-off: chosen from cross-fitted exits on this split, measured on `test`."""
        taus = RULES["gate"].sweep["tau"]
        scored = [(self.policy(tau), Scorer.at(self.split, self.positions(tau))) for tau in taus]
        scored.append((ExitPolicy("full"), Scorer.replay(self.split, ExitPolicy("full"))))
        return RuleCurve("gate", scored, lambda policy: Scorer.replay(test, policy), self.split.num_layers)


def fit_gate_for(split: SplitLogits, seed: int = 0) -> FittedGate | None:
    """The agreement gate fitted on a split's stored logits (no labels used), with its cross-fitted halves;
    None where the rule does not apply."""
    if not get_task(split.task).allows("gate") or len(split.exit_layers) < 2 or len(split) < 4:
        return None
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    halves = (order[: len(split) // 2], order[len(split) // 2 :])
    half_gates = (fit_gate(split.exit_logits[halves[0]]), fit_gate(split.exit_logits[halves[1]]))
    return FittedGate(split, fit_gate(split.exit_logits), halves, half_gates)


def evaluate_policy(
    exit_logits: torch.Tensor,
    labels: torch.Tensor,
    policy: ExitPolicy,
    model: MultiExitModel,
    costs: torch.Tensor,
    curve: str | None = None,
    positions: torch.Tensor | None = None,
    keep_scores: bool = False,
) -> SweepPoint:
    """Replay one policy over stored exit logits (N, E, K) and measure metric, speedups and FLOPs.

    `positions` (N,), when given, are the exits to measure instead (the gate's cross-fitted ones).
    `keep_scores`: also keep each text's score (None where the metric is not a mean over texts)."""
    task = model.config.problem_type
    if positions is None:
        positions = simulate(exit_logits, policy, task, model.exit_layers, labels)
    chosen = exit_logits[torch.arange(len(positions)), positions]  # (N, K)
    metric = get_task(task).metric.compute(chosen, labels)
    layers = torch.tensor(model.exit_layers, dtype=torch.float32)[positions]
    mean_layer = float(layers.mean())
    return SweepPoint(
        curve=curve or policy.rule,
        policy=policy.to_dict(),
        metric=metric,
        mean_exit_layer=mean_layer,
        layer_speedup=model.num_layers / mean_layer,
        saved_fraction=1.0 - mean_layer / model.num_layers,
        flops_ratio=float(costs[positions].mean()),
        per_text=get_task(task).per_text_metric(chosen, labels) if keep_scores else None,
    )


def curve_name(policy: ExitPolicy) -> str:
    """The sweep curve a policy belongs to: the rule, with the divergence for `dge` (`dge-jsd`)."""
    if policy.rule == "dge":
        return f"dge-{policy.divergence or 'jsd'}"
    return policy.rule


def sweep(
    model: MultiExitModel,
    exit_logits: torch.Tensor,
    labels: torch.Tensor,
    seq_len: int,
    policies: list[tuple[str, ExitPolicy]] | None = None,
    fitted: FittedGate | None = None,
    keep_scores: bool = False,
) -> SweepResult:
    """Every rule's settings replayed over stored logits of one split: the raw points, nothing chosen.

    `fitted`: a gate fitted on this same split, whose points then come from its cross-fitted exits.
    `keep_scores`: keep each text's score under every setting and the full model (what `calibrate` pairs)."""
    task = model.config.problem_type
    policies = policies if policies is not None else default_policies(task, model.num_layers)
    costs = exit_costs(model, seq_len)
    full = evaluate_policy(exit_logits, labels, ExitPolicy("full"), model, costs, "full", keep_scores=keep_scores)
    points = [
        evaluate_policy(
            exit_logits,
            labels,
            policy,
            model,
            costs,
            curve,
            fitted.positions(policy.tau) if fitted is not None and policy.rule == "gate" else None,
            keep_scores,
        )
        for curve, policy in policies
    ]
    return SweepResult(get_task(task).metric.name, model.num_layers, full.metric, points, full.per_text)


@dataclass
class SweepReport:
    """`badge evaluate --sweep`: every rule compared at matched speedups, chosen on one split, reported on another.

    `same_split` is True when only one labelled split was given, so choice and report share it (optimistic).
    `timed` holds (curve, policy, wall-clock speedup) of the reference rule's settings, when timing was asked for.
    """

    selection: str
    reported: str
    same_split: bool
    comparison: RuleComparison
    points: SweepResult  # every setting on the reported split, nothing chosen
    timed: list[tuple[str, dict[str, Any], float]] = field(default_factory=list)


def sweep_dataset(
    model: MultiExitModel,
    dataset: TextDataset,
    max_length: int | None = None,
    policies: list[tuple[str, ExitPolicy]] | None = None,
    batch_size: int = 32,
    keep_scores: bool = False,
) -> SweepResult:
    """Every rule's settings (or `policies`) on one labelled dataset: the model runs once, rules replay.
    `keep_scores`: keep each text's score per setting (see `sweep`)."""
    split, _, seq_len = split_logits(model, dataset, model.max_length(max_length), batch_size)
    fitted = fit_gate_for(split) if policies is None else None
    if policies is None:
        policies = default_policies(model.config.problem_type, model.num_layers, gate=fitted.gate if fitted else None)
    return sweep(model, split.exit_logits, split.labels, seq_len, policies, fitted, keep_scores)


def run_sweep(
    model: MultiExitModel,
    validation: tuple[TextDataset, str],
    test: tuple[TextDataset, str] | None = None,
    *,
    reference: str | None = None,
    batch_size: int = 32,
    max_length: int | None = None,
    timing: bool = False,
    timing_samples: int = 256,
    repeats: int = 5,
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> SweepReport:
    """Compare every rule: settings chosen on `validation`, metrics and intervals on `test` (dataset, name).

    The model runs once per split; every rule is replayed over the stored logits. Without `test`, the
    validation split is also the reported one and the report says so. `reference` is the curve the others
    are compared with (default: the model's stored policy). With `timing`, the reference rule's settings are
    timed against the plain model on `timing_samples` reported texts.
    """
    max_length = model.max_length(max_length)
    task = model.config.problem_type
    chosen_on, inputs, seq_len = split_logits(model, validation[0], max_length, batch_size)
    reported_on = chosen_on
    if test is not None:
        reported_on, inputs, seq_len = split_logits(model, test[0], max_length, batch_size)
    fitted = fit_gate_for(chosen_on)  # the gate learns on validation
    policies = default_policies(task, model.num_layers, gate=fitted.gate if fitted else None)
    curves: dict[str, list[ExitPolicy] | RuleCurve] = {}
    for curve, policy in policies:
        curves.setdefault(curve, []).append(policy)
    if fitted is not None:
        curves["gate"] = fitted.curve(reported_on)
    reference = reference or curve_name(ExitPolicy.from_dict(model.config.exit_policy))
    if reference not in curves:
        reference = "entropy" if "entropy" in curves else next(iter(curves))
    with tqdm(total=len([c for c in curves if c != "oracle"]), desc="comparing rules") as bar:
        comparison = compare_rules(
            curves, chosen_on, reported_on, reference, resamples=resamples, progress=lambda _: bar.update(1)
        )
    points = sweep(model, reported_on.exit_logits, reported_on.labels, seq_len, policies)
    reported = (test or validation)[1]
    report = SweepReport(validation[1], reported, test is None, comparison, points)
    if timing:
        generator = torch.Generator().manual_seed(seed)
        sample = torch.randperm(len(reported_on), generator=generator)[:timing_samples]
        sampled = {key: value[sample] for key, value in inputs.items()}
        chosen = curves[reference]
        hull = (
            chosen if isinstance(chosen, RuleCurve) else RuleCurve.replay(reference, chosen, chosen_on, reported_on)
        ).hull
        for _, _, policy in tqdm(hull, desc=f"timing {reference}"):
            timed = time_policy(model, policy, sampled, batch_size, repeats)
            report.timed.append((reference, policy.to_dict(), timed.speedup))
    return report
