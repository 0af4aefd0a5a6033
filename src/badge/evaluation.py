"""Evaluation: every exit's metric, and early-exit trade-off sweeps over exit rules."""

from __future__ import annotations

import itertools
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from badge.data import EncodedDataset, TextDataset, collate, encode
from badge.device import synchronize
from badge.metrics import primary_metric_name, task_metrics
from badge.modeling import MultiExitModel, count_flops
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
    """All points of a sweep with each curve's summary."""

    metric_name: str
    num_layers: int
    full_metric: float
    points: list[SweepPoint]
    summaries: dict[str, dict[str, float | None]] = field(default_factory=dict)


def default_policies(task: str, num_layers: int, include_oracle: bool = True) -> list[tuple[str, ExitPolicy]]:
    """Every registered rule over its sweep grid, as (curve name, policy) pairs."""
    policies: list[tuple[str, ExitPolicy]] = []
    for name, spec in RULES.items():
        if name == "full" or (spec.needs_labels and (not include_oracle or task != "single_label_classification")):
            continue
        if task == "regression" and name in ("entropy", "maxprob", "pcee"):
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
                policies.append((curve, ExitPolicy(rule=name, **settings)))
    return policies


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
) -> SweepPoint:
    """Replay one policy over stored exit logits (N, E, K) and measure metric, speedups and FLOPs."""
    task = model.config.problem_type
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


def pareto_front(points: list[SweepPoint]) -> list[SweepPoint]:
    """Points no other point beats on both metric and speed, sorted by layer speedup."""
    ordered = sorted(points, key=lambda p: (-p.layer_speedup, -p.metric))
    front, best = [], -math.inf
    for point in ordered:
        if point.metric > best:
            front.append(point)
            best = point.metric
    return sorted(front, key=lambda p: p.layer_speedup)


def anchored_curve(front: list[SweepPoint], full_metric: float) -> list[tuple[float, float]]:
    """(layer speedup, metric) along a front, starting at the full model (1x, its metric)."""
    return [(1.0, full_metric)] + [(p.layer_speedup, p.metric) for p in front if p.layer_speedup > 1.0]


def metric_at_speedup(curve: list[tuple[float, float]], target: float) -> float | None:
    """Metric at `target` layer speedup, interpolated linearly along a curve; None if it never gets there."""
    for (x0, y0), (x1, y1) in itertools.pairwise(curve):
        if x0 <= target <= x1:
            share = 0.0 if x1 == x0 else (target - x0) / (x1 - x0)
            return y0 + share * (y1 - y0)
    return None


AUC_MAX_SPEEDUP = 3.0


def area_under_curve(curve: list[tuple[float, float]], max_speedup: float = AUC_MAX_SPEEDUP) -> float:
    """Area under metric vs saved fraction (1 - 1/speedup) from the full model to `max_speedup`, divided
    by that width: the mean metric over the range, in metric points. Past its last point a curve adds
    nothing, so a rule that cannot reach the range's end scores lower."""
    end = 1.0 - 1.0 / max_speedup
    points = [(1.0 - 1.0 / speedup, metric) for speedup, metric in curve]
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 >= end:
            break
        if x1 > end:  # cut the last segment at the range's end
            y1 = y0 + (y1 - y0) * (end - x0) / (x1 - x0)
            x1 = end
        area += (x1 - x0) * (y0 + y1) / 2
    return area / end


def sweep(
    model: MultiExitModel,
    exit_logits: torch.Tensor,
    labels: torch.Tensor,
    seq_len: int,
    policies: list[tuple[str, ExitPolicy]] | None = None,
) -> SweepResult:
    """Sweep every rule's thresholds over stored logits; summarise each curve at 1.5x / 2x / 3x and by area."""
    task = model.config.problem_type
    policies = policies if policies is not None else default_policies(task, model.num_layers)
    costs = exit_costs(model, seq_len)
    full = evaluate_policy(exit_logits, labels, ExitPolicy("full"), model, costs, "full")
    points = [evaluate_policy(exit_logits, labels, policy, model, costs, curve) for curve, policy in policies]
    result = SweepResult(primary_metric_name(task), model.num_layers, full.metric, points)
    for curve in dict.fromkeys(p.curve for p in points):
        line = anchored_curve(pareto_front([p for p in points if p.curve == curve]), full.metric)
        result.summaries[curve] = {
            "auc": area_under_curve(line),
            "metric_at_1.5x": metric_at_speedup(line, 1.5),
            "metric_at_2x": metric_at_speedup(line, 2.0),
            "metric_at_3x": metric_at_speedup(line, 3.0),
            "max_speedup": line[-1][0],
        }
    return result


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
    """All exits' logits (N, E, K) for padded inputs, and the mean sequence length (for FLOPs)."""
    loader = length_sorted_batches({**inputs, "labels": labels}, batch_size, sort=False)  # keeps input order
    exit_logits, _ = collect_exit_logits(model, loader, progress=True)
    return exit_logits, int(inputs["attention_mask"].sum(dim=1).float().mean().round())


def run_sweep(
    model: MultiExitModel,
    dataset: TextDataset,
    *,
    batch_size: int = 32,
    max_length: int = 128,
    timing: str = "front",
    timing_samples: int = 256,
    repeats: int = 5,
    seed: int = 0,
    policies: list[tuple[str, ExitPolicy]] | None = None,
) -> SweepResult:
    """Sweep every rule on a labelled split and, for `timing` = `front` (each curve's best points) or `all`,
    measure the wall-clock speedup over the plain model on `timing_samples` of its examples."""
    inputs, labels = encode_padded(dataset, model.tokenizer, max_length)
    exit_logits, seq_len = exit_logits_for(model, inputs, labels, batch_size)
    result = sweep(model, exit_logits, labels, seq_len, policies)
    if timing == "none":
        return result
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randperm(len(labels), generator=generator)[:timing_samples]
    sampled = {key: value[sample] for key, value in inputs.items()}
    chosen = result.points
    if timing == "front":
        front_ids = set()
        for curve in result.summaries:
            front_ids |= {id(p) for p in pareto_front([p for p in result.points if p.curve == curve])}
        chosen = [p for p in result.points if id(p) in front_ids]
    for point in tqdm(chosen, desc="timing"):
        policy = ExitPolicy.from_dict(point.policy)
        point.wallclock_speedup = time_policy(
            model, policy, sampled, batch_size, repeats, labels[sample] if policy.needs_labels else None
        ).speedup
    return result


def write_sweep(result: SweepResult, folder: Path, title: str = "early-exit trade-off") -> dict[str, Path]:
    """Write the sweep as `sweep.json`, `sweep.md` (summary and points) and, where matplotlib is installed
    (`badge[plots]`), `sweep.png` (metric vs speedup)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "sweep.json", "markdown": folder / "sweep.md"}
    paths["json"].write_text(json.dumps(asdict(result), indent=2))
    paths["markdown"].write_text(sweep_markdown(result, title))
    try:
        import matplotlib
    except ModuleNotFoundError:
        return paths
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths["plot"] = folder / "sweep.png"
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for curve in result.summaries:
        line = anchored_curve(pareto_front([p for p in result.points if p.curve == curve]), result.full_metric)
        style = "--" if curve == "oracle" else "-"
        axis.plot(*zip(*line, strict=True), style, marker="o", markersize=3, label=curve)
    axis.set_xlabel("layer speedup (L / mean exit layer)")
    axis.set_ylabel(result.metric_name)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(paths["plot"], dpi=120)
    plt.close(figure)
    return paths


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def sweep_markdown(result: SweepResult, title: str) -> str:
    """Markdown tables: one summary row per curve, then every point."""
    lines = [
        f"# {title}",
        "",
        f"Full model {result.metric_name}: {result.full_metric:.2f} ({result.num_layers} layers).",
        "",
        f"| rule | AUC | {result.metric_name} @1.5x | @2x | @3x | max layer speedup |",
        "|---|---|---|---|---|---|",
    ]
    for curve, s in result.summaries.items():
        lines.append(
            f"| {curve} | {_fmt(s['auc'])} | {_fmt(s['metric_at_1.5x'])} | {_fmt(s['metric_at_2x'])} "
            f"| {_fmt(s['metric_at_3x'])} | {_fmt(s['max_speedup'])} |"
        )
    lines += [
        "",
        f"| rule | policy | {result.metric_name} | mean exit layer | layer speedup | saved | FLOPs ratio "
        "| wall-clock speedup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in result.points:
        policy = ", ".join(f"{k}={v}" for k, v in p.policy.items() if k != "rule")
        lines.append(
            f"| {p.curve} | {policy} | {p.metric:.2f} | {p.mean_exit_layer:.2f} | {p.layer_speedup:.2f} "
            f"| {p.saved_fraction:.2f} | {p.flops_ratio:.3f} | {_fmt(p.wallclock_speedup)} |"
        )
    return "\n".join(lines) + "\n"


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
        raise ValueError(f"rule {rule!r} has no sweep points; rules swept: {sorted(result.summaries)}")
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
