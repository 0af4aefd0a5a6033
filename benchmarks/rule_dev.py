"""Exit-rule design variants compared on validation only, never on test.

    python benchmarks/rule_dev.py            # reads the finished runs of benchmarks/runs, writes RULE-DEV.md

Each finished `bb2_distill` run's validation logits are cut in two random halves: a gate is fitted on one
half and measured on the other, then the halves swap; three such cuts. Each rule's accuracy (and agreement
with the full model) is read at 1.5x, 2x, 3x and 4x layer speedup off its upper hull on the measured half
(a mix of two settings), so no setting is chosen on noise. The cell is the variant minus the better of
entropy and max-prob there, in accuracy points, averaged over cuts.

Variants of the agreement gate (`badge.gate`):
- `gate`: as shipped (target: the exit gives the full model's class);
- `+log-odds`: plus log-odds of the largest probability, of the previous exits' mixture's largest
  probability, and whether the exit agrees with that mixture;
- `+class`: plus those and the predicted class (one-hot: a bias per class);
- `correctness target`: the target is "the exit is right" (needs labels) instead of agreement;
- `cost-aware`: leave where 1 - p < lambda * (layers still to go / L) instead of p > tau.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from training_runs import PLANS, finished, load_run, plan_runs  # noqa: E402

from badge.comparison import upper_hull  # noqa: E402
from badge.gate import fit_gate, gate_features  # noqa: E402
from badge.rules import RULES, ExitPolicy, simulate  # noqa: E402

SPEEDUPS = (1.5, 2.0, 3.0, 4.0)
CUTS = 3
TAUS = sorted(set(RULES["gate"].sweep["tau"]) | {0.9995, 0.9998, 0.9999})
LAMBDAS = [10 ** (-x / 8) for x in range(40)]
VARIANTS = ("gate", "+log-odds", "+class", "correctness target", "cost-aware")


def log_odds(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return (p / (1 - p)).log()


def features(exit_logits: torch.Tensor, extra: str) -> list[torch.Tensor]:
    """Per exit but the last, the gate's features (N, F), with the variant's extra columns."""
    state: dict = {}
    out = []
    classes = exit_logits.shape[-1]
    for position in range(exit_logits.shape[1] - 1):
        logits = exit_logits[:, position]
        base, state = gate_features(logits, state)
        columns = [base]
        if extra in ("+log-odds", "+class"):
            mixture = state["mixture_sum"] / state["seen"][:, None]
            agrees = (mixture.argmax(-1) == logits.argmax(-1)).float()
            columns += [log_odds(base[:, :1]), log_odds(mixture.max(-1).values)[:, None], agrees[:, None]]
        if extra == "+class":
            columns.append(torch.nn.functional.one_hot(logits.argmax(-1), classes).float())
        out.append(torch.cat(columns, -1))
    return out


def fit_scores(fit_logits, fit_labels, eval_logits, variant: str) -> torch.Tensor:
    """(N_eval, E - 1) probabilities, from one logistic model per exit fitted on the other half."""
    from sklearn.linear_model import LogisticRegression

    extra = variant if variant in ("+log-odds", "+class") else ""
    reference = fit_labels if variant == "correctness target" else fit_logits[:, -1].argmax(-1)
    train, test = features(fit_logits, extra), features(eval_logits, extra)
    scores = []
    for position, (x, x_eval) in enumerate(zip(train, test, strict=True)):
        target = (fit_logits[:, position].argmax(-1) == reference).numpy()
        if target.all() or not target.any():
            scores.append(torch.full((len(x_eval),), float(target.all())))
            continue
        model = LogisticRegression(max_iter=1000).fit(x.double().numpy(), target)
        scores.append(torch.from_numpy(model.predict_proba(x_eval.double().numpy())[:, 1]).float())
    return torch.stack(scores, -1)


def first_exit(leave: torch.Tensor) -> torch.Tensor:
    """(N,) the first exit where `leave` (N, E - 1) holds, else the last exit (E - 1)."""
    positions = torch.full((leave.shape[0],), leave.shape[1], dtype=torch.long)
    for position in reversed(range(leave.shape[1])):
        positions[leave[:, position]] = position
    return positions


def curve(logits, labels, exit_layers, positions_list) -> list[tuple[float, float, float]]:
    """(mean exit layer, accuracy, agreement with the full model) of each setting, and of the full model."""
    layers = torch.tensor(exit_layers, dtype=torch.float32)
    final = logits[:, -1].argmax(-1)
    points = [(float(exit_layers[-1]), 100 * (final == labels).float().mean().item(), 100.0)]
    for positions in positions_list:
        chosen = logits[torch.arange(len(positions)), positions].argmax(-1)
        points.append(
            (
                layers[positions].mean().item(),
                100 * (chosen == labels).float().mean().item(),
                100 * (chosen == final).float().mean().item(),
            )
        )
    return points


def hull_at(points: list[tuple[float, float]], mean_layer: float) -> float | None:
    """The best value a setting or a mix of two settings gets at this mean exit layer (None: out of reach)."""
    hull = upper_hull([(x, y, None) for x, y in points])
    if len(hull) == 1:
        return hull[0][1] if hull[0][0] == mean_layer else None
    for (x0, y0, _), (x1, y1, _) in zip(hull, hull[1:], strict=False):
        if x0 <= mean_layer <= x1:
            return y0 + (y1 - y0) * (mean_layer - x0) / (x1 - x0)
    return None


def gap_to_best(points, baselines, mean_layer: float, k: int = 1) -> float | None:
    """Measure `k` (1 accuracy, 2 agreement) of the `points` curve at `mean_layer`, minus the best baseline's there;
    None when either is out of reach."""
    mine = hull_at([(p[0], p[k]) for p in points], mean_layer)
    best = [hull_at([(p[0], p[k]) for p in b], mean_layer) for b in baselines]
    best = [b for b in best if b is not None]
    return mine - max(best) if mine is not None and best else None


def cuts(n: int):
    """(fitting half, measured half) index pairs: `CUTS` random halvings of n texts, each used both ways."""
    for cut in range(CUTS):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(100 + cut))
        halves = (order[: n // 2], order[n // 2 :])
        yield from (halves, halves[::-1])


def baseline_curves(split, held: torch.Tensor) -> list[list[tuple[float, float, float]]]:
    """The `curve` of entropy and of max-prob over their sweep grids, on the texts `held`."""
    logits, labels, layers = split.exit_logits[held], split.labels[held], split.exit_layers
    return [
        curve(
            logits,
            labels,
            layers,
            [simulate(logits, ExitPolicy(r, tau=t), split.task, layers) for t in RULES[r].sweep["tau"]],
        )
        for r in ("entropy", "maxprob")
    ]


def shipped_gate_settings(split, fit: torch.Tensor, held: torch.Tensor) -> list[torch.Tensor]:
    """Exit positions on the texts `held` of the shipped gate fitted on the texts `fit`, run by the shipped rule."""
    gate = fit_gate(split.exit_logits[fit])
    logits, layers = split.exit_logits[held], split.exit_layers
    return [simulate(logits, ExitPolicy("gate", tau=t, gate=gate), split.task, layers) for t in TAUS]


def compare(split) -> dict[str, dict[tuple[float, str], float]]:
    """Every variant minus the better of entropy and max-prob, per (speedup, measure), averaged over cuts."""
    sums: dict[str, dict[tuple[float, str], list[float]]] = {v: {} for v in VARIANTS}
    layers = split.exit_layers
    for fit, held in cuts(len(split)):
        logits, labels = split.exit_logits[held], split.labels[held]
        baselines = baseline_curves(split, held)
        for variant in VARIANTS:
            if variant == "gate":
                settings = shipped_gate_settings(split, fit, held)
            else:
                p = fit_scores(split.exit_logits[fit], split.labels[fit], logits, variant)
                if variant == "cost-aware":
                    to_go = torch.tensor([(layers[-1] - x) / layers[-1] for x in layers[:-1]])
                    settings = [first_exit(1 - p < lam * to_go) for lam in LAMBDAS]
                else:
                    settings = [first_exit(p > t) for t in TAUS]
            points = curve(logits, labels, layers, settings)
            for speedup in SPEEDUPS:
                for k, measure in ((1, "accuracy"), (2, "agreement")):
                    gap = gap_to_best(points, baselines, layers[-1] / speedup, k)
                    if gap is not None:
                        sums[variant].setdefault((speedup, measure), []).append(gap)
    return {v: {k: sum(x) / len(x) for k, x in cells.items()} for v, cells in sums.items()}


def main() -> None:
    runs = [r for r in plan_runs(PLANS["v2"]) if r.scheme == "bb2_distill" and finished(HERE / "runs", r)]
    if not runs:
        raise SystemExit("no finished bb2_distill run in benchmarks/runs: run benchmarks/run.py first")
    results = {}
    for run in runs:
        print(f"{run.name} ...", flush=True)
        results[run.name] = compare(load_run(HERE / "runs", run)["validation"])
    lines = [
        "# Exit-rule variants on validation halves",
        "",
        f"`python benchmarks/rule_dev.py` over {len(runs)} finished `bb2_distill` runs.",
        "",
        " ".join(__doc__.split("\n\n")[2].split()),
        "",
        __doc__.split("\n\n")[3].strip(),
        "",
    ]
    for measure in ("accuracy", "agreement"):
        lines += [
            f"## {measure} (points, variant minus the better of entropy and max-prob, mean over runs and cuts)",
            "",
            "| variant | " + " | ".join(f"@{s:g}x" for s in SPEEDUPS) + " | runs ahead at 3x |",
            "|---|" + "---|" * (len(SPEEDUPS) + 1),
        ]
        for variant in VARIANTS:
            cells = []
            for speedup in SPEEDUPS:
                values = [r[variant].get((speedup, measure)) for r in results.values()]
                values = [v for v in values if v is not None]
                cells.append(f"{sum(values) / len(values):+.2f}" if values else "-")
            at3 = [r[variant].get((3.0, measure)) for r in results.values()]
            ahead = sum(v > 0 for v in at3 if v is not None)
            lines.append(f"| {variant} | " + " | ".join(cells) + f" | {ahead} of {len(results)} |")
        lines.append("")
    lines += [
        "## per run (accuracy)",
        "",
        "| run | variant | " + " | ".join(f"@{s:g}x" for s in SPEEDUPS) + " |",
        "|---|---|" + "---|" * len(SPEEDUPS),
    ]
    for name, r in results.items():
        for variant in VARIANTS:
            cells = [f"{r[variant][(s, 'accuracy')]:+.2f}" if (s, "accuracy") in r[variant] else "-" for s in SPEEDUPS]
            lines.append(f"| {name} | {variant} | " + " | ".join(cells) + " |")
    (HERE / "RULE-DEV.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
