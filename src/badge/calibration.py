"""Calibration: pick an exit rule's setting on a validation sweep for a target speedup or a maximum metric drop
(`calibrate`), and store it as a saved model's exit policy (`calibrate_and_store`, what `badge calibrate` runs)."""

from __future__ import annotations

import math
from pathlib import Path
from statistics import NormalDist

import torch

from badge.data import TextDataset
from badge.modeling import MultiExitModel
from badge.rules import ExitPolicy
from badge.sweep import SweepPoint, SweepResult, sweep_dataset
from badge.workflows import UsageError, console

Z_ONE_SIDED_95 = NormalDist().inv_cdf(0.95)  # 1.645


def drop_bound(setting: torch.Tensor, full: torch.Tensor) -> tuple[float, float]:
    """A setting's drop below the full model, paired over the same texts, and its one-sided 95 % upper bound.

    Args:
        setting, full: (N,) per-text scores (points) of the setting and of the full model on the same texts.
    Returns:
        (drop, upper bound): mean(full - setting) and that plus 1.645 standard errors (normal approximation).
    """
    differences = (full - setting).double()  # (N,)
    drop = float(differences.mean())
    spread = float(differences.std()) if len(differences) > 1 else 0.0
    return drop, drop + Z_ONE_SIDED_95 * spread / math.sqrt(len(differences))


def calibrate(
    result: SweepResult, rule: str, *, max_drop: float | None = None, speedup: float | None = None
) -> SweepPoint:
    """Pick a rule's setting on a validation sweep: the fastest within `max_drop` points of the full model,
    or the most accurate at `speedup` or more (layer speedup). `rule` is a rule (`dge`) or a curve (`dge-kl`).

    With `max_drop`, a setting fits when the one-sided 95 % upper bound of its drop (`drop_bound`, paired over
    the sweep's per-text scores) is at most `max_drop`, so that noise in the validation split does not pick a
    setting that only looks close; where the sweep kept no per-text scores (a metric that is not a mean over
    texts), the drop itself is compared."""
    if (max_drop is None) == (speedup is None):
        raise ValueError("give exactly one target: max_drop or speedup")
    candidates = [p for p in result.points if p.curve == rule or p.policy["rule"] == rule]
    if not candidates:
        raise ValueError(f"rule {rule!r} has no sweep points; rules swept: {sorted(result.curves)}")
    if max_drop is not None:
        if paired(result, candidates):
            bounds = [drop_bound(p.per_text, result.full_per_text)[1] for p in candidates]
            fitting = [p for p, bound in zip(candidates, bounds, strict=True) if bound <= max_drop]
            if not fitting:
                safest = min(bounds)
                raise ValueError(
                    f"no {rule} setting keeps {result.metric_name} within {max_drop} points of the full model with "
                    f"95 % confidence; the smallest upper bound on the drop is {safest:.2f}"
                )
            return max(fitting, key=lambda p: (p.layer_speedup, p.metric))
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


def paired(result: SweepResult, points: list[SweepPoint]) -> bool:
    """Whether the sweep kept per-text scores for the full model and every one of `points`."""
    return result.full_per_text is not None and all(p.per_text is not None for p in points)


def calibrate_and_store(
    model: MultiExitModel,
    model_dir: Path,
    tuning: tuple[TextDataset, str],
    held_out: tuple[TextDataset, str] | None,
    rule: str,
    max_drop: float | None,
    speedup: float | None,
    max_length: int,
    dry_run: bool = False,
) -> SweepPoint:
    """Choose the rule's setting on the tuning split, report it there and on the held-out split, store it in
    `model_dir` (unless `dry_run`); returns the chosen setting as measured on the tuning split."""
    swept = sweep_dataset(model, tuning[0], max_length, keep_scores=True)
    try:
        chosen = calibrate(swept, rule, max_drop=max_drop, speedup=speedup)
    except ValueError as error:
        raise UsageError(str(error)) from error
    if paired(swept, [chosen]):
        drop, bound = drop_bound(chosen.per_text, swept.full_per_text)
        margin = f"drop {drop:.2f} (95 % upper bound {bound:.2f})"
    else:
        drop = swept.full_metric - chosen.metric
        margin = f"drop {drop:.2f} (no upper bound: {swept.metric_name} is not a mean over texts)"
    console.print(
        f"chosen on {tuning[1]}: {ExitPolicy.from_dict(chosen.policy)} gives {swept.metric_name} {chosen.metric:.2f} "
        f"(full model {swept.full_metric:.2f}, {margin}) at {chosen.layer_speedup:.2f}x layer speedup"
    )
    if held_out is not None:
        policy = [(chosen.curve, ExitPolicy.from_dict(chosen.policy))]
        report = sweep_dataset(model, held_out[0], max_length, policy)
        point = report.points[0]
        console.print(
            f"reported on {held_out[1]}: {report.metric_name} {point.metric:.2f} (full model "
            f"{report.full_metric:.2f}) at {point.layer_speedup:.2f}x layer speedup, "
            f"FLOPs ratio {point.flops_ratio:.3f}"
        )
    if not dry_run:
        if model.dtype != torch.float32:  # store the policy beside the float32 weights, not half-precision copies
            model = MultiExitModel.from_pretrained(model_dir)
        model.config.exit_policy = chosen.policy
        model.save_pretrained(model_dir)
        console.print(f"[green]stored[/] exit policy {ExitPolicy.from_dict(chosen.policy)} in {model_dir}")
    return chosen
