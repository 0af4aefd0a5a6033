"""Can an exit rule be more accurate than the full model by leaving early? Measured on the benchmark's runs.

    python benchmarks/beyond_final.py  # reads the finished bb2_distill runs of benchmarks/runs, writes BEYOND-FINAL.md

At 1.5x and 2x layer speedup the strongest baseline rule already matches the full model's accuracy within noise
(`RESULTS.md`, "full model - baseline"), so a rule can only be clearly ahead there by being *more* accurate than
the full model: by leaving at a shallow exit on texts where that exit is right and the final exit is wrong.
Answering at exit i instead of the final exit changes a text's correctness by g_i = correct_i - correct_final,
which is +1, 0 or -1. This script measures how much of that is reachable:

- `oracle`: leave at the first exit with g = +1 where there is one (it knows the labels): the headroom;
- `disagree -> exit i`: per exit, of the texts where exit i and the final exit disagree, the share where exit i
  is right. Below 50 %, leaving at exit i on every disagreement costs accuracy;
- `fitted`: a rule given more than any label-free rule knows. Per intermediate exit, a 3-class logistic model
  of g_i is fitted on the **validation** labels from what a rule sees at exit i (the gate's features of
  `badge.gate`: confidence, divergences from the previous exits, agreement streak; plus the predicted class).
  On **test** a text leaves at the first exit where the predicted P(g = +1) - P(g = -1) exceeds a margin,
  where leaving is expected to gain accuracy. The margin (2 = never leave early) is the one with the best gain on
  held-out validation halves (fitted on one half, measured on the other). Its test accuracy minus the full
  model's, with a bootstrap 95 % interval (test texts and seeds resampled), says whether the exits' outputs
  reveal when the final exit is wrong and a shallow exit right.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from rule_dev import features  # noqa: E402
from training_runs import DEFAULT_SCHEME, PLANS, finished, load_run, plan_runs  # noqa: E402

from badge.comparison import SplitLogits, paired_bootstrap  # noqa: E402

RESAMPLES = 1000
MARGINS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 2.0)  # 2.0: never leave early (P(+1) - P(-1) <= 1)
CUTS = 3  # random halvings of validation that choose the margin


def rule_features(split: SplitLogits) -> list[torch.Tensor]:
    """Per intermediate exit, what a rule leaving there can see (N, F): the gate's features and the predicted
    class one-hot."""
    classes = split.exit_logits.shape[-1]
    return [
        torch.cat(
            [base, torch.nn.functional.one_hot(split.exit_logits[:, position].argmax(-1), classes).float()], 1
        ).double()
        for position, base in enumerate(features(split.exit_logits, ""))
    ]


def gains(split: SplitLogits) -> torch.Tensor:
    """(N, E - 1) g_i = correct_i - correct_final per text and intermediate exit."""
    correct = (split.exit_logits.argmax(-1) == split.labels[:, None]).long()  # (N, E)
    return correct[:, :-1] - correct[:, -1:]


def fit_models(features: list[torch.Tensor], g: torch.Tensor) -> list:
    """Per intermediate exit, a 3-class logistic model of g_i (None where exit i is never right where the final
    one is wrong: there is nothing to learn)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    models = []
    for position, x in enumerate(features):
        target = g[:, position].numpy()
        if (target == 1).sum() < 2 or len(set(target)) < 2:
            models.append(None)
            continue
        models.append(make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(x.numpy(), target))
    return models


def apply_rule(models: list, features: list[torch.Tensor], g: torch.Tensor, layers: list[int], margin: float):
    """Leave at the first exit whose expected gain P(+1) - P(-1) exceeds `margin`: the per-text change in
    correctness over the full model (N,) and the mean exit layer."""
    n = g.shape[0]
    left = torch.zeros(n, dtype=torch.bool)
    change = torch.zeros(n, dtype=torch.float64)
    exit_layer = torch.full((n,), float(layers[-1]), dtype=torch.float64)
    for position, model in enumerate(models):
        if model is None:
            continue
        probability = torch.from_numpy(model.predict_proba(features[position].numpy()))  # (N, classes)
        classes = list(model.classes_)
        expected = probability[:, classes.index(1)] - (probability[:, classes.index(-1)] if -1 in classes else 0.0)
        leave = (expected > margin) & ~left
        change[leave] = g[leave, position].double()
        exit_layer[leave] = float(layers[position])
        left |= leave
    return change, float(exit_layer.mean())


def choose_margin(features: list[torch.Tensor], g: torch.Tensor, layers: list[int]) -> float:
    """The margin with the best mean gain on held-out validation halves (fit on one half, measure on the other,
    both ways, `CUTS` random cuts); ties go to the larger margin (leaving less)."""
    generator = torch.Generator().manual_seed(0)
    totals = dict.fromkeys(MARGINS, 0.0)
    for _ in range(CUTS):
        order = torch.randperm(g.shape[0], generator=generator)
        halves = (order[: len(order) // 2], order[len(order) // 2 :])
        for fit, measure in (halves, halves[::-1]):
            models = fit_models([x[fit] for x in features], g[fit])
            for margin in MARGINS:
                change, _ = apply_rule(models, [x[measure] for x in features], g[measure], layers, margin)
                totals[margin] += float(change.mean())
    return max(MARGINS, key=lambda m: (round(totals[m], 9), m))


def fitted_rule(validation: SplitLogits, test: SplitLogits) -> tuple[torch.Tensor, float, float]:
    """Per test text the change in correctness (N,) of the fitted rule over the full model, its layer speedup,
    and the margin chosen on validation."""
    train_x, train_g = rule_features(validation), gains(validation)
    margin = choose_margin(train_x, train_g, validation.exit_layers)
    models = fit_models(train_x, train_g)
    change, mean_layer = apply_rule(models, rule_features(test), gains(test), test.exit_layers, margin)
    return change, test.exit_layers[-1] / mean_layer, margin


def oracle_change(test: SplitLogits) -> torch.Tensor:
    return (gains(test) == 1).any(1).double()


def interval(per_seed: list[torch.Tensor]) -> tuple[float, float]:
    """Bootstrap 95 % interval of the mean over seeds of the mean per-text value, in points."""
    stacked = torch.stack(per_seed)  # (R, N)

    def difference(texts: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        per_resample = stacked[:, texts].mean(-1)  # (R, B)
        return 100 * per_resample.gather(0, seeds.T).mean(0)

    return paired_bootstrap(difference, stacked.shape[1], stacked.shape[0], RESAMPLES)


def main() -> None:
    plan = PLANS["v2"]
    runs_dir = HERE / "runs"
    groups: dict[tuple[str, str], list] = {}
    for run in plan_runs(plan):
        if run.scheme == DEFAULT_SCHEME and finished(runs_dir, run):
            groups.setdefault((run.dataset, run.backbone), []).append(run)
    lines = [
        "# Beyond the full model: what leaving early can add",
        "",
        f"`python benchmarks/beyond_final.py` over the finished `{DEFAULT_SCHEME}` runs of `benchmarks/runs`. Rules "
        "fitted on the **validation** split, every number measured on the **test** split; accuracy points, mean "
        "over seeds, bootstrap 95 % intervals over test texts and seeds. See the script's docstring for the method.",
        "",
        "| dataset | backbone | seeds | full model | oracle headroom | fitted rule - full model | its layer speedup |"
        " margin per seed | exit right where it disagrees with the final exit, exits 1..L-1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    pooled_changes: dict[int, list[torch.Tensor]] = {}
    for (dataset, backbone), runs in groups.items():
        changes, speedups, oracles, fulls, shares, margins = [], [], [], [], [], []
        for run in runs:
            splits = load_run(runs_dir, run)
            change, speedup, margin = fitted_rule(splits["validation"], splits["test"])
            margins.append(margin)
            changes.append(change)
            speedups.append(speedup)
            oracles.append(oracle_change(splits["test"]))
            test = splits["test"]
            fulls.append(100 * float((test.exit_logits[:, -1].argmax(-1) == test.labels).double().mean()))
            g = gains(test)
            shares.append([(g[:, i] == 1).sum() / max(1, (g[:, i] != 0).sum()) for i in range(g.shape[1])])
            if backbone == "minilm":
                pooled_changes.setdefault(run.seed, []).append(change)
        share = " ".join(f"{100 * statistics.mean(float(s[i]) for s in shares):.0f} %" for i in range(len(shares[0])))
        mean_change = 100 * statistics.mean(float(c.mean()) for c in changes)
        headroom = 100 * statistics.mean(float(o.mean()) for o in oracles)
        low, high = interval(changes)
        lines.append(
            f"| {dataset} | {backbone} | {len(runs)} | {statistics.mean(fulls):.2f} | "
            f"+{headroom:.2f} | {mean_change:+.2f} [{low:+.2f}, {high:+.2f}] | "
            f"{statistics.mean(speedups):.2f}x | {' '.join(f'{m:g}' for m in margins)} | {share} |"
        )
    seeds = [seed for seed, parts in sorted(pooled_changes.items()) if len(parts) == len(PLANS["v2"]["datasets"])]
    if seeds:
        per_seed = [torch.cat(pooled_changes[seed]) for seed in seeds]
        low, high = interval(per_seed)
        mean_change = 100 * statistics.mean(float(c.mean()) for c in per_seed)
        lines.append(
            f"| pooled (MiniLM, every dataset's test texts) | minilm | {len(seeds)} | | | "
            f"{mean_change:+.2f} [{low:+.2f}, {high:+.2f}] | | | |"
        )
    (HERE / "BEYOND-FINAL.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
