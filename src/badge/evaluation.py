"""Evaluation: every exit's metric, and early-exit trade-off sweeps over exit rules."""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from badge.comparison import BOOTSTRAP_RESAMPLES, RuleComparison, RuleCurve, Scorer, SplitLogits, compare_rules
from badge.data import EncodedDataset, TextDataset, collate, encode
from badge.device import synchronize
from badge.flops import count_flops
from badge.gate import fit_gate
from badge.metrics import primary_metric_name, task_metrics
from badge.modeling import MultiExitModel
from badge.rules import DIVERGENCES, RULES, ExitPolicy, simulate


@torch.no_grad()
def collect_exit_logits(
    model: MultiExitModel, loader: DataLoader, accelerator: Accelerator | None = None, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of every exit (N, E, K) and labels for a whole loader (gathered across processes)."""
    model.eval()
    all_logits, all_labels = [], []
    for batch in tqdm(loader, desc="evaluating", disable=not progress, leave=False):
        labels = batch.pop("labels")
        if accelerator is None:  # a prepared loader already yields batches on the model's device
            batch = {key: value.to(model.device) for key, value in batch.items()}
        output = model(**batch)
        logits = torch.stack(output.exit_logits, dim=1)  # (B, E, K)
        if accelerator is not None:
            logits, labels = accelerator.gather_for_metrics((logits, labels))
        all_logits.append(logits.float().cpu())
        all_labels.append(labels.cpu())
    return torch.cat(all_logits), torch.cat(all_labels)


def make_loader(
    dataset: TextDataset, tokenizer: Any, max_length: int, batch_size: int, shuffle: bool, seed: int = 0
) -> DataLoader:
    """Tokenise a dataset and wrap it in a DataLoader that pads each batch to its longest row."""
    encoded = encode(dataset, tokenizer, max_length)
    generator = torch.Generator().manual_seed(seed)
    pad = tokenizer.pad_token_id or 0
    return DataLoader(
        EncodedDataset(encoded),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=lambda rows: collate(rows, pad),
    )


# ----- trade-off sweeps ----------------------------------------------------------------------
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


@dataclass
class SweepResult:
    """All points of a sweep on one split."""

    metric_name: str
    num_layers: int
    full_metric: float
    points: list[SweepPoint]

    @property
    def curves(self) -> list[str]:
        return list(dict.fromkeys(p.curve for p in self.points))


def default_policies(
    task: str, num_layers: int, include_oracle: bool = True, gate: dict[str, Any] | None = None
) -> list[tuple[str, ExitPolicy]]:
    """Every registered rule over its sweep grid, as (curve name, policy) pairs; the `gate` rule only when a
    fitted gate is given (`fit_gate_for`)."""
    policies: list[tuple[str, ExitPolicy]] = []
    for name, spec in RULES.items():
        if name == "full" or (spec.needs_labels and (not include_oracle or task != "single_label_classification")):
            continue
        if task == "regression" and name in ("entropy", "maxprob", "pcee"):
            continue
        if name == "gate" and gate is None:
            continue
        grid = dict(spec.sweep)
        if name == "static":
            grid = {"k": tuple(range(1, num_layers + 1))}
        divergences = DIVERGENCES[:-1] if name == "dge" and task != "regression" else (None,)
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
    if split.task != "single_label_classification" or len(split.exit_layers) < 2 or len(split) < 4:
        return None
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    halves = (order[: len(split) // 2], order[len(split) // 2 :])
    half_gates = (fit_gate(split.exit_logits[halves[0]]), fit_gate(split.exit_logits[halves[1]]))
    return FittedGate(split, fit_gate(split.exit_logits), halves, half_gates)


def exit_costs(model: MultiExitModel, seq_len: int) -> torch.Tensor:
    """(E,) FLOPs ratio to the plain model of a sample leaving at each exit (exits evaluated on the way included)."""
    flops = count_flops(model, seq_len)
    full = flops.per_layer * model.num_layers + flops.per_exit_head  # the plain model: all layers, one head
    costs = []
    for position, layer in enumerate(model.exit_layers):
        bypassed = min(position + 1, len(model.intermediate_layers)) if model.config.use_bypass else 0
        costs.append(flops.cost_to_exit(layer, position + 1, bypassed) / full)
    return torch.tensor(costs)


def evaluate_policy(
    exit_logits: torch.Tensor,
    labels: torch.Tensor,
    policy: ExitPolicy,
    model: MultiExitModel,
    costs: torch.Tensor,
    curve: str | None = None,
    positions: torch.Tensor | None = None,
) -> SweepPoint:
    """Replay one policy over stored exit logits (N, E, K) and measure metric, speedups and FLOPs.

    `positions` (N,), when given, are the exits to measure instead (the gate's cross-fitted ones)."""
    task = model.config.problem_type
    if positions is None:
        positions = simulate(exit_logits, policy, task, model.exit_layers, labels)
    chosen = exit_logits[torch.arange(len(positions)), positions]  # (N, K)
    metric = task_metrics(chosen, labels, task)[primary_metric_name(task)]
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
) -> SweepResult:
    """Every rule's settings replayed over stored logits of one split: the raw points, nothing chosen.

    `fitted`: a gate fitted on this same split, whose points then come from its cross-fitted exits."""
    task = model.config.problem_type
    policies = policies if policies is not None else default_policies(task, model.num_layers)
    costs = exit_costs(model, seq_len)
    full = evaluate_policy(exit_logits, labels, ExitPolicy("full"), model, costs, "full")
    points = [
        evaluate_policy(
            exit_logits,
            labels,
            policy,
            model,
            costs,
            curve,
            fitted.positions(policy.tau) if fitted is not None and policy.rule == "gate" else None,
        )
        for curve, policy in policies
    ]
    return SweepResult(primary_metric_name(task), model.num_layers, full.metric, points)


# ----- wall-clock ----------------------------------------------------------------------------
def length_sorted_batches(
    encoded: dict[str, torch.Tensor], batch_size: int, sort: bool = True
) -> list[dict[str, torch.Tensor]]:
    """Split right-padded inputs (N, T) into batches of similar length, each trimmed to its longest row.

    One-dimensional entries (labels) are split along with them. `sort=False` keeps the input order."""
    lengths = encoded["attention_mask"].sum(dim=1)
    order = torch.argsort(lengths, stable=True) if sort else torch.arange(len(lengths))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = int(lengths[rows].max())
        batches.append(
            {key: value[rows, :width] if value.dim() == 2 else value[rows] for key, value in encoded.items()}
        )
    return batches


@torch.inference_mode()
def plain_forward(model: MultiExitModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The plain Hugging Face model: the encoder's own forward over all layers, then the final classifier."""
    inputs = {key: value.to(model.device) for key, value in batch.items() if key != "labels"}
    hidden = model.encoder(**inputs).last_hidden_state
    return model.exit_logits(model.num_layers, hidden, inputs["attention_mask"])


@dataclass
class Timing:
    """Median seconds of the plain model and of the engine over the same batches, and their ratio."""

    plain_s: float
    engine_s: float
    speedup: float
    repeats: int


def time_policy(
    model: MultiExitModel,
    policy: ExitPolicy,
    inputs: dict[str, torch.Tensor],
    batch_size: int,
    repeats: int = 5,
    labels: torch.Tensor | None = None,
) -> Timing:
    """Time the plain model and the early-exit engine on the same inputs at the same batch size.

    The plain model runs length-sorted batches of `batch_size`; the engine gets all inputs with the
    same `batch_size` (its most rows per layer call) and sorts them the same way. The two alternate
    `repeats` times; the speedup is the median of per-repeat ratios, so both sides of each ratio
    share the machine's state at that moment.
    """
    from badge.engine import EarlyExitEngine

    batches = length_sorted_batches(inputs, batch_size)
    engine = EarlyExitEngine(model, policy, batch_size=batch_size)
    plain_forward(model, batches[0])  # warm-up, both sides: first calls allocate
    warm = EarlyExitEngine(model, ExitPolicy("full"), batch_size=batch_size)  # needs no labels, unlike oracle
    warm.run(batches[0]["input_ids"], batches[0]["attention_mask"], batches[0].get("token_type_ids"))
    plain_times, engine_times, ratios = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            plain_forward(model, batch)
        synchronize(model.device)
        plain = time.perf_counter() - start
        start = time.perf_counter()
        engine.run(inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids"), labels)
        synchronize(model.device)
        spent = time.perf_counter() - start
        plain_times.append(plain)
        engine_times.append(spent)
        ratios.append(plain / spent)
    return Timing(statistics.median(plain_times), statistics.median(engine_times), statistics.median(ratios), repeats)


# ----- the full sweep, as `badge evaluate --sweep` runs it ---------------------------------------
def encode_padded(
    dataset: TextDataset, tokenizer: Any, max_length: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Tokenise a whole dataset into right-padded (N, T) tensors and a labels tensor."""
    encoded = encode(dataset, tokenizer, max_length)
    rows = [EncodedDataset(encoded)[i] for i in range(len(dataset))]
    batch = collate(rows, tokenizer.pad_token_id or 0)
    labels = batch.pop("labels")
    return batch, labels


def exit_logits_for(
    model: MultiExitModel, inputs: dict[str, torch.Tensor], labels: torch.Tensor, batch_size: int = 32
) -> tuple[torch.Tensor, int]:
    """All exits' logits (N, E, K) for padded inputs, in input order, and the mean sequence length (for FLOPs).

    Batches hold texts of similar length, so little time goes into padding."""
    lengths = inputs["attention_mask"].sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    sorted_inputs = {key: value[order] for key, value in {**inputs, "labels": labels}.items()}
    loader = length_sorted_batches(sorted_inputs, batch_size, sort=False)
    exit_logits, _ = collect_exit_logits(model, loader, progress=True)
    in_order = torch.empty_like(exit_logits)
    in_order[order] = exit_logits
    return in_order, int(lengths.float().mean().round())


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


def split_logits(
    model: MultiExitModel, dataset: TextDataset, max_length: int, batch_size: int = 32
) -> tuple[SplitLogits, dict[str, torch.Tensor], int]:
    """Every exit's logits on a labelled dataset, its padded inputs, and the mean sequence length."""
    inputs, labels = encode_padded(dataset, model.tokenizer, max_length)
    exit_logits, seq_len = exit_logits_for(model, inputs, labels, batch_size)
    return SplitLogits(exit_logits, labels, model.exit_layers, model.config.problem_type), inputs, seq_len


def sweep_dataset(
    model: MultiExitModel,
    dataset: TextDataset,
    max_length: int | None = None,
    policies: list[tuple[str, ExitPolicy]] | None = None,
    batch_size: int = 32,
) -> SweepResult:
    """Every rule's settings (or `policies`) on one labelled dataset: the model runs once, rules replay."""
    split, _, seq_len = split_logits(model, dataset, model.max_length(max_length), batch_size)
    fitted = fit_gate_for(split) if policies is None else None
    if policies is None:
        policies = default_policies(model.config.problem_type, model.num_layers, gate=fitted.gate if fitted else None)
    return sweep(model, split.exit_logits, split.labels, seq_len, policies, fitted)


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


# ----- calibration -----------------------------------------------------------------------------
def calibrate(
    result: SweepResult, rule: str, *, max_drop: float | None = None, speedup: float | None = None
) -> SweepPoint:
    """Pick a rule's setting on a validation sweep: the fastest within `max_drop` points of the full model,
    or the most accurate at `speedup` or more (layer speedup). `rule` is a rule (`dge`) or a curve (`dge-kl`)."""
    if (max_drop is None) == (speedup is None):
        raise ValueError("give exactly one target: max_drop or speedup")
    candidates = [p for p in result.points if p.curve == rule or p.policy["rule"] == rule]
    if not candidates:
        raise ValueError(f"rule {rule!r} has no sweep points; rules swept: {sorted(result.curves)}")
    if max_drop is not None:
        floor = result.full_metric - max_drop
        fitting = [p for p in candidates if p.metric >= floor]
        if not fitting:
            best = max(candidates, key=lambda p: p.metric)
            raise ValueError(f"no {rule} setting keeps {result.metric_name} >= {floor:.2f}; best is {best.metric:.2f}")
        return max(fitting, key=lambda p: (p.layer_speedup, p.metric))
    fitting = [p for p in candidates if p.layer_speedup >= speedup]
    if not fitting:
        fastest = max(candidates, key=lambda p: p.layer_speedup)
        raise ValueError(f"no {rule} setting reaches {speedup}x; the fastest gives {fastest.layer_speedup:.2f}x")
    return max(fitting, key=lambda p: (p.metric, p.layer_speedup))
