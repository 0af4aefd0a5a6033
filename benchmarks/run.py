"""The benchmark behind BADGE's claims, on real pretrained encoders and real labelled data.

    python benchmarks/run.py --plan v2                # the full plan: many hours on 2 CPU cores, resumable
    python benchmarks/run.py --plan v2 --report-only  # rewrite RESULTS.md from the runs finished so far
    python benchmarks/run.py --plan smoke             # the pipeline end to end in minutes (numbers mean nothing)
    python benchmarks/run.py --only 'rotten-tomatoes-*-s2'  # train only the plan's runs whose name matches

Every number is on the test split; every setting is chosen on the validation split, never on test.
1. Training: each scheme's per-exit accuracy, mean over exits and final exit, over several seeds, with paired
   bootstrap 95 % intervals (test texts and seeds resampled) against plain joint training and a single-exit
   fine-tune.
2. Exit rules, on the default scheme's models: every rule at matched layer speedups (1.5x, 2x, 3x and the
   largest speedup every rule reaches), mixtures of two settings chosen on validation; the default rule against
   the strongest baseline at each speedup, per dataset and pooled over datasets.

A finished run leaves `benchmarks/runs/<run>/`: `run.json` (settings, training time, validation history) and
`logits.safetensors` (every exit's logits on validation and test). They are small and committed, so the report
rebuilds without training. Weights and resumable checkpoints stay in `$BADGE_CACHE/benchmark-models/<run>`;
an interrupted run resumes from its checkpoint. Delete a run's folder to train it again.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import statistics
import sys
from pathlib import Path

import torch
import transformers
from training_runs import (
    ABLATION_CONTRASTS,
    BASELINE_RULES,
    DEFAULT_RULE,
    DEFAULT_SCHEME,
    HERE,
    PLANS,
    Run,
    finished,
    load_run,
    machine,
    plan_runs,
    train_and_store,
)

from badge.comparison import (
    TARGET_SPEEDUPS,
    Measured,
    RuleComparison,
    Scorer,
    SplitLogits,
    compare_rules,
    mean_over_seeds,
    paired_bootstrap,
)
from badge.report import comparison_markdown, fmt, fmt_difference
from badge.sweep import default_policies, fit_gate_for


# ----- 1. training ---------------------------------------------------------------------------
def exit_scores(split: SplitLogits) -> torch.Tensor:
    """(E, N) per-text correctness of every exit, in points."""
    predicted = split.exit_logits.argmax(-1)  # (N, E)
    return 100.0 * (predicted == split.labels[:, None]).float().T


def per_text(values: torch.Tensor) -> Scorer:
    """A `Scorer` over fixed per-text scores (N,), so seeds and texts can be resampled like any setting."""
    return Scorer(torch.zeros(len(values)), values)


def paired_difference(a: list[Scorer], b: list[Scorer], resamples: int) -> tuple[float, float, float]:
    """Mean over seeds of a - b, and its interval resampling test texts and seeds (seed i of a paired with b's)."""
    seeds = min(len(a), len(b))
    a, b = a[:seeds], b[:seeds]
    diff = statistics.mean(s.metric for s in a) - statistics.mean(s.metric for s in b)
    low, high = paired_bootstrap(
        lambda texts, picks: mean_over_seeds(a, texts, picks) - mean_over_seeds(b, texts, picks),
        len(a[0].per_text),
        seeds,
        resamples,
    )
    return diff, low, high


def scheme_scores(
    runs_dir: Path, plan: dict, dataset: str, scheme: str
) -> tuple[list[Run], dict[str, list[torch.Tensor]]]:
    """A scheme's finished MiniLM runs on `dataset`, by seed, and per split ("validation", "test") each one's
    per-exit correctness (E, N); every run's logits are read once."""
    done = [r for r in plan_runs(plan) if r.dataset == dataset and r.backbone == "minilm" and r.scheme == scheme]
    done = [r for r in done if finished(runs_dir, r)]
    splits = [load_run(runs_dir, r) for r in done]
    return done, {split: [exit_scores(s[split]) for s in splits] for split in ("validation", "test")}


def mean_and_final(per_seed: list[torch.Tensor]) -> dict[str, list[Scorer]]:
    """Per seed, the per-text scores of the mean over exits and of the final exit, from each (E, N) correctness."""
    return {"mean": [per_text(s.mean(0)) for s in per_seed], "final": [per_text(s[-1]) for s in per_seed]}


def training_section(runs_dir: Path, plan: dict, dataset: str) -> dict:
    """Per scheme: per-exit test accuracy (mean over seeds), mean over exits, final exit; differences with intervals."""
    schemes = plan["schemes"] + (plan["ablation"] if dataset == plan["datasets"][0] else [])
    rows = {}
    scores: dict[str, dict[str, list[Scorer]]] = {}
    validation_scores: dict[str, list[Scorer]] = {}
    for scheme in schemes:
        done, per_split = scheme_scores(runs_dir, plan, dataset, scheme)
        if not done:
            continue
        per_seed = per_split["test"]
        scores[scheme] = mean_and_final(per_seed)
        exits = torch.stack([s.mean(1) for s in per_seed]).mean(0)  # (E,)
        validation_scores[scheme] = mean_and_final(per_split["validation"])["mean"]
        rows[scheme] = {
            "seeds": [r.seed for r in done],
            # what chooses between schemes
            "validation_mean_exit_metric": statistics.mean(s.metric for s in validation_scores[scheme]),
            "exit_metrics": exits.tolist(),
            "mean_exit_metric": statistics.mean(s.metric for s in scores[scheme]["mean"]),
            "mean_exit_metric_std": statistics.pstdev([s.metric for s in scores[scheme]["mean"]]),
            "final_metric": statistics.mean(s.metric for s in scores[scheme]["final"]),
        }
    for scheme, row in rows.items():
        if scheme != DEFAULT_SCHEME and DEFAULT_SCHEME in validation_scores:
            # what chooses between schemes: see the README's v2 section
            row["validation_vs_default_mean"] = paired_difference(
                validation_scores[scheme], validation_scores[DEFAULT_SCHEME], plan["resamples"]
            )
        if scheme != "joint" and "joint" in scores:
            row["vs_joint_mean"] = paired_difference(scores[scheme]["mean"], scores["joint"]["mean"], plan["resamples"])
            row["vs_joint_final"] = paired_difference(
                scores[scheme]["final"], scores["joint"]["final"], plan["resamples"]
            )
        if scheme != "single_exit" and "single_exit" in scores:
            row["vs_single_exit_final"] = paired_difference(
                scores[scheme]["final"], scores["single_exit"]["final"], plan["resamples"]
            )
    return rows


def ablation_section(runs_dir: Path, plan: dict) -> list[dict]:
    """Each ingredient of the default alone (`ABLATION_CONTRASTS`) on the first dataset: a - b in mean over exits and
    final exit, over the seeds both schemes have, with intervals."""
    planned = set(plan["schemes"] + plan["ablation"])
    named = {scheme for a, b, _ in ABLATION_CONTRASTS for scheme in (a, b)} & planned
    scores = {scheme: scheme_scores(runs_dir, plan, plan["datasets"][0], scheme)[1]["test"] for scheme in named}
    scores = {scheme: mean_and_final(per_seed) for scheme, per_seed in scores.items() if per_seed}
    out = []
    for a, b, isolates in ABLATION_CONTRASTS:
        if a in scores and b in scores:
            row = {"a": a, "b": b, "isolates": isolates, "seeds": min(len(scores[a]["mean"]), len(scores[b]["mean"]))}
            for key in ("mean", "final"):
                row[key] = paired_difference(scores[a][key], scores[b][key], plan["resamples"])
            out.append(row)
    return out


# ----- 2. exit rules -------------------------------------------------------------------------
def rule_curves(validation: SplitLogits, test: SplitLogits) -> dict[str, list]:
    """Every rule's settings; the gate is fitted on the validation logits (without their labels), and its
    threshold chosen from cross-fitted exits there (see `FittedGate`)."""
    curves: dict[str, list] = {}
    for curve, policy in default_policies(validation.task, validation.num_layers):
        curves.setdefault(curve, []).append(policy)
    fitted = fit_gate_for(validation)
    if fitted is not None:
        curves["gate"] = fitted.curve(test)
    return curves


def measured_per_text(measured: Measured) -> Scorer:
    """A mixture's expected per-text score (linear in its weight), as a `Scorer` for pooling."""
    w = measured.mixture.weight
    return per_text(w * measured.score_a.per_text + (1 - w) * measured.score_b.per_text)


def agreement_speedup(split: SplitLogits) -> float:
    """Layer speedup of leaving at the first exit that gives the final exit's class: what a perfect label-free
    rule (one that knew the final answer) would reach at exactly the full model's accuracy."""
    predicted = split.exit_logits.argmax(-1)  # (N, E)
    first = (predicted == predicted[:, -1:]).float().argmax(1)  # (N,) the last exit always agrees
    return split.num_layers / float(torch.tensor(split.exit_layers, dtype=torch.float32)[first].mean())


def rules_section(runs_dir: Path, runs: list[Run], resamples: int) -> tuple[dict, dict]:
    """Every rule on each seed's model; the default rule against the strongest baseline at each target, and the
    full model against that baseline (the room a rule that imitates the final exit has at that speedup).

    Returns the JSON section and, per target, the per-seed per-text scores of both sides and of the full model
    (for pooling)."""
    comparisons: list[RuleComparison] = []
    fulls: list[Scorer] = []
    agreement: list[float] = []
    for run in runs:
        splits = load_run(runs_dir, run)
        curves = rule_curves(splits["validation"], splits["test"])
        comparisons.append(compare_rules(curves, splits["validation"], splits["test"], DEFAULT_RULE, resamples=200))
        fulls.append(per_text(exit_scores(splits["test"])[-1]))
        agreement.append(agreement_speedup(splits["test"]))
    first = comparisons[0]
    table = {
        name: {label: _mean([c.rules[name].at[label] for c in comparisons]) for label in first.targets}
        | {"area": _mean_value([c.rules[name].area for c in comparisons])}
        for name in first.rules
    }
    head_to_head, sides = {}, {}
    for label in (f"{t:g}x" for t in TARGET_SPEEDUPS):
        default = [c.rules[DEFAULT_RULE].at[label] for c in comparisons]
        if any(m is None for m in default):
            continue
        # the strongest baseline at this speedup, judged by its validation metric (mean over seeds)
        candidates = [r for r in BASELINE_RULES if r != DEFAULT_RULE and all(c.rules[r].at[label] for c in comparisons)]
        if not candidates:
            continue
        best = max(candidates, key=lambda r: statistics.mean(c.rules[r].validation_metric[label] for c in comparisons))
        a = [measured_per_text(m) for m in default]
        b = [measured_per_text(c.rules[best].at[label]) for c in comparisons]
        head_to_head[label] = {
            "a": DEFAULT_RULE,
            "b": best,
            "a_metric": statistics.mean(s.metric for s in a),
            "b_metric": statistics.mean(s.metric for s in b),
            "a_speedup": statistics.mean(m.layer_speedup for m in default),
            "b_speedup": statistics.mean(c.rules[best].at[label].layer_speedup for c in comparisons),
            "difference": paired_difference(a, b, resamples),
            "full_minus_baseline": paired_difference(fulls, b, resamples),
        }
        sides[label] = (a, b, best, fulls)
    section = {
        "scheme": runs[0].scheme,
        "seeds": [r.seed for r in runs],
        "full_metric": statistics.mean(c.full_metric for c in comparisons),
        "common_speedup": statistics.mean(c.targets["common"] for c in comparisons),
        "agreement_speedup": statistics.mean(agreement),
        "table": table,
        "default_vs_best_baseline": head_to_head,
        "seed0_markdown": comparison_markdown(first, "validation", "test", False),
    }
    return section, sides


def _mean(measured: list[Measured | None]) -> dict | None:
    if any(m is None for m in measured):
        return None
    return {
        "metric": statistics.mean(m.metric for m in measured),
        "layer_speedup": statistics.mean(m.layer_speedup for m in measured),
    }


def _mean_value(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else statistics.mean(values)


def pooled_side(sides_by_dataset: dict[str, dict], label: str, side: int, seeds: int) -> list[Scorer]:
    """Per seed, one side's per-text scores at `label` (0 default rule, 1 baseline, 3 full model), datasets joined."""
    datasets = sides_by_dataset.values()
    return [per_text(torch.cat([sides[label][side][i].per_text for sides in datasets])) for i in range(seeds)]


def pooled(sides_by_dataset: dict[str, dict], resamples: int) -> dict:
    """Default rule vs each dataset's strongest baseline, every dataset's test texts pooled, per target, over the
    seeds every dataset has so far (seed i of one dataset pooled with seed i of the others)."""
    out = {}
    labels = set.intersection(*(set(sides) for sides in sides_by_dataset.values())) if sides_by_dataset else set()
    for label in sorted(labels):
        seeds = min(len(sides[label][0]) for sides in sides_by_dataset.values())
        a, b, full = (pooled_side(sides_by_dataset, label, side, seeds) for side in (0, 1, 3))
        out[label] = {
            "a": DEFAULT_RULE,
            "b": "best baseline per dataset",
            "a_metric": statistics.mean(s.metric for s in a),
            "b_metric": statistics.mean(s.metric for s in b),
            "seeds": seeds,
            "full_metric": statistics.mean(s.metric for s in full),
            "difference": paired_difference(a, b, resamples),
            "full_minus_baseline": paired_difference(full, b, resamples),
        }
    return out


# ----- report --------------------------------------------------------------------------------
def build_results(plan_name: str, plan: dict, runs_dir: Path) -> dict:
    runs = plan_runs(plan)
    done = [r for r in runs if finished(runs_dir, r)]
    results: dict = {
        "plan_name": plan_name,
        "plan": plan,
        "machine": machine(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version},
        "default_scheme": DEFAULT_SCHEME,
        "default_rule": DEFAULT_RULE,
        "finished_runs": [r.name for r in done],
        "pending_runs": [r.name for r in runs if r not in done],
        "training": {},
        "rules": {},
        "comparisons": [],
    }
    results["ablation"] = ablation_section(runs_dir, plan)
    sides_by_dataset = {}
    for dataset in plan["datasets"]:
        results["training"][dataset] = training_section(runs_dir, plan, dataset)
        for scheme, row in results["training"][dataset].items():
            if scheme == DEFAULT_SCHEME and "vs_joint_mean" in row:
                diff, low, high = row["vs_joint_mean"]
                results["comparisons"].append(
                    comparison_entry("training", dataset, "MiniLM-L6", None, scheme, "joint", row, diff, low, high)
                )
        default_runs = [
            r for r in done if r.dataset == dataset and r.backbone == "minilm" and r.scheme == DEFAULT_SCHEME
        ]
        if default_runs:
            section, sides = rules_section(runs_dir, default_runs, plan["resamples"])
            results["rules"][f"MiniLM-L6 on {dataset}"] = section
            sides_by_dataset[dataset] = sides
            for label, entry in section["default_vs_best_baseline"].items():
                results["comparisons"].append(rule_entry(dataset, label, entry))
        paper_runs = [r for r in done if r.dataset == dataset and r.backbone == "minilm" and r.scheme == "bb"]
        if paper_runs and DEFAULT_SCHEME != "bb":  # the paper's DGE on the paper's bypasses, for reference
            section, _ = rules_section(runs_dir, paper_runs, plan["resamples"])
            results["rules"][f"MiniLM-L6 on {dataset}, bb (v1) models"] = section
    if len(sides_by_dataset) == len(plan["datasets"]):
        results["pooled_rules"] = pooled(sides_by_dataset, plan["resamples"])
        for label, entry in results["pooled_rules"].items():
            results["comparisons"].append(rule_entry("pooled", label, entry))
    mpnet_runs = [r for r in done if r.backbone == "mpnet"]
    if mpnet_runs:
        section, _ = rules_section(runs_dir, mpnet_runs, plan["resamples"])
        results["rules"][f"MPNet-12 on {mpnet_runs[0].dataset}"] = section
        for label, entry in section["default_vs_best_baseline"].items():
            results["comparisons"].append(rule_entry(mpnet_runs[0].dataset, label, entry, "MPNet-12"))
    return results


def rule_entry(dataset: str, label: str, entry: dict, backbone: str = "MiniLM-L6") -> dict:
    """One `comparisons` row: the default rule against the strongest baseline at speedup `label` ("2x")."""
    _, low, high = entry["difference"]
    return {
        "what": "rule",
        "dataset": dataset,
        "backbone": backbone,
        "speedup": float(label[:-1]),
        "a": entry["a"],
        "b": entry["b"],
        "a_metric": entry["a_metric"],
        "b_metric": entry["b_metric"],
        "diff_interval": [low, high],
    }


def comparison_entry(what, dataset, backbone, speedup, a, b, row, diff, low, high) -> dict:
    return {
        "what": what,
        "dataset": dataset,
        "backbone": backbone,
        "speedup": speedup,
        "a": a,
        "b": b,
        "a_metric": row["mean_exit_metric"],
        "b_metric": row["mean_exit_metric"] - diff,
        "diff_interval": [low, high],
    }


def write_report(results: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plan = results["plan"]
    lines = [
        "# BADGE benchmark results",
        "",
        f"`python benchmarks/run.py --plan {results['plan_name']}` on {results['machine']}. Seeds {plan['seeds']}, "
        f"{plan['train_samples'] or 'all'} training texts, {plan['epochs']:g} epochs per MiniLM-L6 run. Every number "
        "is on the test split; every setting was chosen on the validation split. Intervals: paired bootstrap 95 % "
        "(test texts and seeds resampled); a difference is called **held** only when its interval excludes 0.",
        "",
        f"Finished runs: {len(results['finished_runs'])}; pending: {len(results['pending_runs'])}"
        + (f" ({', '.join(results['pending_runs'])})." if results["pending_runs"] else "."),
    ]
    for dataset, rows in results["training"].items():
        if not rows:
            continue
        lines += [
            "",
            f"## 1. Training: MiniLM-L6 on {dataset} (test accuracy, mean over seeds)",
            "",
            "The last two columns are on validation: the mean over exits and seeds, and its difference to "
            f"{DEFAULT_SCHEME} (paired over validation texts and seeds): what chooses between schemes (README, v2); "
            "the test split does not choose.",
            "",
            "| scheme | seeds | exits 1..L | mean over exits | final exit | mean vs joint | final vs single-exit "
            "| validation: mean over exits | validation: vs default |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for scheme, row in rows.items():
            exits = " ".join(f"{v:.1f}" for v in row["exit_metrics"])
            lines.append(
                f"| {scheme} | {len(row['seeds'])} | {exits} | {row['mean_exit_metric']:.2f} "
                f"± {row['mean_exit_metric_std']:.2f} | {row['final_metric']:.2f} "
                f"| {fmt_difference(row.get('vs_joint_mean'))} | {fmt_difference(row.get('vs_single_exit_final'))} "
                f"| {row['validation_mean_exit_metric']:.2f} "
                f"| {fmt_difference(row.get('validation_vs_default_mean'))} |"
            )
    if results.get("ablation"):
        lines += [
            "",
            f"## 1. Ablation: one ingredient at a time, MiniLM-L6 on {plan['datasets'][0]} (test accuracy)",
            "",
            "Each row sets two schemes that differ in one ingredient against each other, seed i of one paired with "
            "seed i of the other, over the seeds both have.",
            "",
            "| a | b | what a - b isolates | seeds | mean over exits, a - b | final exit, a - b |",
            "|---|---|---|---|---|---|",
        ]
        for row in results["ablation"]:
            lines.append(
                f"| {row['a']} | {row['b']} | {row['isolates']} | {row['seeds']} | {fmt_difference(row['mean'])} "
                f"| {fmt_difference(row['final'])} |"
            )
    for tag, section in results["rules"].items():
        labels = list(next(iter(section["table"].values())))
        lines += [
            "",
            f"## 2. Exit rules: {tag} ({section['scheme']} models, seeds {section['seeds']}; full model "
            f"{section['full_metric']:.2f})",
            "",
            "Mean over seeds of the test accuracy (and test layer speedup) of each rule's setting chosen on "
            f"validation at each layer speedup; `common` = {section['common_speedup']:.2f}x on average, the largest "
            "speedup every rule reaches; the area is the mean accuracy over 1x..common.",
            "",
            "| rule | " + " | ".join(f"@{label}" if label != "area" else "area" for label in labels) + " |",
            "|---|" + "---|" * len(labels),
        ]
        for rule, cells in section["table"].items():
            shown = [
                fmt(cells[label])
                if label == "area"
                else "-"
                if cells[label] is None
                else f"{cells[label]['metric']:.2f} ({cells[label]['layer_speedup']:.2f}x)"
                for label in labels
            ]
            lines.append(f"| {rule} | " + " | ".join(shown) + " |")
        lines += [
            "",
            f"{DEFAULT_RULE} against the strongest baseline at each speedup (chosen on validation), and the full model "
            "against that baseline: the most a rule that imitates the final exit can gain there. Leaving at the "
            "first exit that gives the final exit's class (a bound that knows the final answer) keeps the full "
            f"model's accuracy at {section['agreement_speedup']:.2f}x.",
            "",
            "| speedup | strongest baseline | " + f"{DEFAULT_RULE} | baseline | difference | full model - baseline |",
            "|---|---|---|---|---|---|",
        ]
        for label, entry in section["default_vs_best_baseline"].items():
            lines.append(
                f"| {label} | {entry['b']} | {entry['a_metric']:.2f} | {entry['b_metric']:.2f} "
                f"| {fmt_difference(entry['difference'])} | {fmt_difference(entry['full_minus_baseline'])} |"
            )
        lines += ["", "<details><summary>seed 0, every rule against " + DEFAULT_RULE + "</summary>", ""]
        lines += section["seed0_markdown"] + ["", "</details>"]
    if results.get("pooled_rules"):
        seeds = min(entry["seeds"] for entry in results["pooled_rules"].values())
        lines += [
            "",
            f"## 3. Exit rules pooled over {', '.join(plan['datasets'])} (every dataset's test texts, MiniLM-L6, "
            f"{DEFAULT_SCHEME} models, the first {seeds} seed(s) of each)",
            "",
            f"| speedup | {DEFAULT_RULE} | best baseline per dataset | difference | full model "
            "| full model - baseline |",
            "|---|---|---|---|---|---|",
        ]
        for label, entry in results["pooled_rules"].items():
            lines.append(
                f"| {label} | {entry['a_metric']:.2f} | {entry['b_metric']:.2f} "
                f"| {fmt_difference(entry['difference'])} | {entry['full_metric']:.2f} "
                f"| {fmt_difference(entry['full_minus_baseline'])} |"
            )
    lines += ["", "## Comparisons (results.json `comparisons`)", ""]
    lines += [
        "| what | dataset | backbone | speedup | a | b | a | b | interval of a - b | held |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in results["comparisons"]:
        low, high = c["diff_interval"]
        lines.append(
            f"| {c['what']} | {c['dataset']} | {c['backbone']} | {fmt(c['speedup'], 1)} | {c['a']} | {c['b']} "
            f"| {c['a_metric']:.2f} | {c['b_metric']:.2f} | [{low:+.2f}, {high:+.2f}] | {'yes' if low > 0 else 'no'} |"
        )
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", choices=sorted(PLANS), default="v2")
    parser.add_argument("--report-only", action="store_true", help="write the report from finished runs only")
    parser.add_argument("--runs-dir", type=Path, help="where finished runs are kept (default benchmarks/runs)")
    parser.add_argument(
        "--only",
        action="append",
        metavar="PATTERN",
        help="train only the plan's runs whose name matches this shell pattern (repeatable; the report still "
        "covers every finished run)",
    )
    args = parser.parse_args()
    plan = PLANS[args.plan]
    out = HERE if args.plan != "smoke" else HERE / "out-smoke"  # smoke numbers never reach RESULTS.md
    runs_dir = args.runs_dir or (HERE / "runs" if args.plan != "smoke" else out / "runs")
    runs_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan_runs(plan)
    todo = [r for r in runs if not finished(runs_dir, r)]
    if args.only:
        names = [r.name for r in runs]
        unmatched = [p for p in args.only if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            parser.error(f"--only {unmatched[0]!r} matches none of the plan's runs, such as {names[0]!r}")
        todo = [r for r in todo if any(fnmatch.fnmatchcase(r.name, p) for p in args.only)]
    hours = sum(r.expected_seconds() for r in todo) / 3600
    done = sum(finished(runs_dir, r) for r in runs)
    print(
        f"plan {args.plan}: {len(runs)} runs, {done} finished, {len(todo)} to train "
        f"(about {hours:.1f} h on 2 CPU cores)",
        flush=True,
    )
    if not args.report_only:
        for index, run in enumerate(todo, start=1):
            left = sum(r.expected_seconds() for r in todo[index - 1 :]) / 3600
            print(f"[{index}/{len(todo)}] {run.name} (about {run.expected_seconds() / 60:.0f} min; {left:.1f} h left)")
            train_and_store(run, runs_dir, args.plan, plan["eval_limit"])
            write_report(build_results(args.plan, plan, runs_dir), out)
    write_report(build_results(args.plan, plan, runs_dir), out)
    print((out / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
