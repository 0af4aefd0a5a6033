"""Calibration: pick an exit rule's setting on a validation sweep for a target speedup or a maximum metric drop."""

from __future__ import annotations

from badge.sweep import SweepPoint, SweepResult


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
