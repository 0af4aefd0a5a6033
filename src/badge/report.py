"""Writing a rule comparison (`badge evaluate --sweep`) as JSON, Markdown and a plot."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from badge.comparison import Measured, RuleComparison, held
from badge.extras import missing
from badge.sweep import SweepReport


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_difference(entry: tuple[float, float, float] | None) -> str:
    """`+0.42 [-0.10, +0.95]`, in bold when the interval excludes 0."""
    if entry is None:
        return "-"
    diff, low, high = entry
    text = f"{diff:+.2f} [{low:+.2f}, {high:+.2f}]"
    return f"**{text}**" if held((low, high)) or high < 0 else text


def fmt_measured(measured: Measured | None) -> str:
    """`83.10 (1.52x)`: the metric and, in brackets, the layer speedup it was measured at."""
    return "-" if measured is None else f"{measured.metric:.2f} ({measured.layer_speedup:.2f}x)"


def measured_dict(measured: Measured | None) -> dict[str, Any] | None:
    if measured is None:
        return None
    return {
        "metric": measured.metric,
        "layer_speedup": measured.layer_speedup,
        "mean_exit_layer": measured.mean_exit_layer,
        "setting": measured.mixture.describe(),
        "a": measured.mixture.a.to_dict(),
        "b": measured.mixture.b.to_dict(),
        "weight_a": measured.mixture.weight,
    }


def comparison_dict(comparison: RuleComparison) -> dict[str, Any]:
    """A JSON-ready view of a comparison (measurements as numbers and the settings that gave them)."""
    return {
        "metric_name": comparison.metric_name,
        "num_layers": comparison.num_layers,
        "full_metric": comparison.full_metric,
        "reference": comparison.reference,
        "targets": comparison.targets,
        "area_range": list(comparison.area_range),
        "oracle": measured_dict(comparison.oracle),
        "rules": {
            name: {
                "max_speedup_validation": result.max_speedup_validation,
                "at": {label: measured_dict(m) for label, m in result.at.items()},
                "area": result.area,
                "difference": {
                    label: None if entry is None else {"diff": entry[0], "interval": [entry[1], entry[2]]}
                    for label, entry in result.difference.items()
                },
            }
            for name, result in comparison.rules.items()
        },
    }


def comparison_markdown(comparison: RuleComparison, selection: str, reported: str, same_split: bool) -> list[str]:
    """The summary tables: each rule at matched speedups, its area, and its difference to the reference."""
    metric, labels = comparison.metric_name, list(comparison.targets)
    common = comparison.area_range[1]
    lines = [
        f"Settings chosen on **{selection}**; every number measured on **{reported}**. "
        f"Full model {metric}: {comparison.full_metric:.2f} ({comparison.num_layers} layers).",
    ]
    if same_split:
        lines += [
            "",
            f"**Chosen and reported on the same split ({reported}): these numbers are optimistic.** "
            "Give a separate validation split for honest ones.",
        ]
    lines += [
        "",
        f"Each cell: the {metric} on {reported} of the setting (or mix of two settings, linear in mean exit layer) "
        f"with the best {selection} {metric} at that layer speedup, and its layer speedup on {reported} in "
        f"brackets. `common` = {common:.2f}x, the largest speedup every rule reaches on {selection}; the area is "
        f"the mean {metric} over layer speedups 1x..{common:.2f}x (evenly spaced in saved fraction), a range "
        "every rule covers.",
        "",
        "| rule | " + " | ".join(f"@{label}" for label in labels) + f" | area 1-{common:.2f}x | reaches |",
        "|---|" + "---|" * (len(labels) + 2),
    ]
    for name, result in comparison.rules.items():
        cells = [fmt_measured(result.at[label]) for label in labels]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {fmt(result.area)} | {result.max_speedup_validation:.2f}x |"
        )
    if comparison.oracle is not None:
        oracle = comparison.oracle
        lines.append(f"| oracle (uses labels: a bound) | {oracle.metric:.2f} at {oracle.layer_speedup:.2f}x |")
    lines += [
        "",
        f"Difference to **{comparison.reference}** (rule - {comparison.reference}, {metric} points) with paired "
        f"bootstrap 95 % intervals over the {reported} texts; bold where the interval excludes 0.",
        "",
        "| rule | " + " | ".join(f"@{label}" for label in labels) + " | area |",
        "|---|" + "---|" * (len(labels) + 1),
    ]
    for name, result in comparison.rules.items():
        if name == comparison.reference:
            continue
        cells = [fmt_difference(result.difference.get(label)) for label in [*labels, "area"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def sweep_markdown(report: SweepReport, title: str) -> str:
    """The whole report: summary, timings if any, then every setting's raw point on the reported split."""
    points = report.points
    lines = [f"# {title}", ""] + comparison_markdown(
        report.comparison, report.selection, report.reported, report.same_split
    )
    if report.timed:
        lines += ["", "| timed setting | wall-clock speedup over the plain model |", "|---|---|"]
        lines += [f"| {curve} {policy} | {speedup:.2f}x |" for curve, policy, speedup in report.timed]
    lines += [
        "",
        f"Every setting on {report.reported} (raw points; nothing above is chosen from them):",
        "",
        f"| rule | policy | {points.metric_name} | mean exit layer | layer speedup | saved | FLOPs ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in points.points:
        policy = ", ".join(f"{k}={v}" for k, v in p.policy.items() if k != "rule")
        lines.append(
            f"| {p.curve} | {policy} | {p.metric:.2f} | {p.mean_exit_layer:.2f} | {p.layer_speedup:.2f} "
            f"| {p.saved_fraction:.2f} | {p.flops_ratio:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot_comparison(comparison: RuleComparison, path: Path, title: str) -> None:
    """Metric vs layer speedup of every rule's validation-chosen settings, measured on the reported split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, result in comparison.rules.items():
        span = [m for m in result.span if m is not None]
        axis.plot([m.layer_speedup for m in span], [m.metric for m in span], marker="o", markersize=2, label=name)
    axis.set_xlabel("layer speedup (L / mean exit layer)")
    axis.set_ylabel(comparison.metric_name)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_sweep(report: SweepReport, folder: Path, title: str) -> dict[str, Path]:
    """Write `sweep.json`, `sweep.md` and, where matplotlib is installed (`badge[plots]`), `sweep.png` into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "sweep.json", "markdown": folder / "sweep.md"}
    document = {
        "selection": report.selection,
        "reported": report.reported,
        "same_split": report.same_split,
        "comparison": comparison_dict(report.comparison),
        "timed": [{"curve": c, "policy": p, "wallclock_speedup": s} for c, p, s in report.timed],
        "points": asdict(report.points),
    }
    paths["json"].write_text(json.dumps(document, indent=2))
    paths["markdown"].write_text(sweep_markdown(report, title))
    if not missing("plots"):
        paths["plot"] = folder / "sweep.png"
        plot_comparison(report.comparison, paths["plot"], title)
    return paths
