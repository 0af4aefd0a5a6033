"""The benchmark behind BADGE's claims, on real pretrained encoders and real labelled data.

    python benchmarks/run.py                  # the full plan (hours on 2 CPU cores)
    python benchmarks/run.py --plan small     # the reduced plan whose numbers RESULTS.md reports

Three parts, each on held-out data with thresholds chosen on validation only:
1. training ablation (MiniLM-L6): plain joint, two-stage, single-exit fine-tune, and BB with
   gamma in {1, 0.3, 0.1} and block sizes {1, default, L}, over several seeds;
2. exit-rule comparison on the best BB model (MiniLM-L6 on each dataset, and the 12-layer MPNet):
   metric at 1.5x / 2x / 3x layer speedup (setting chosen on validation) and area under the test curve;
3. wall-clock: the policy with at most 1 point drop on validation, timed on test against the plain
   Hugging Face model and against the same full model in ONNX Runtime, at batch 1 and 32.

Every trained run is cached under benchmarks/out/ (delete it to retrain); the script writes
benchmarks/RESULTS.md, benchmarks/results.json and plots.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

from badge import EarlyExitEngine, ExitPolicy, MultiExitModel
from badge.data import TextDataset, load_named_dataset
from badge.encoders import minilm_l6_dir, mpnet_base_dir
from badge.evaluation import (
    calibrate,
    encode_padded,
    exit_logits_for,
    sweep,
    time_policy,
    write_sweep,
)
from badge.metrics import per_exit_metrics, primary_metric_name
from badge.training import TrainingArguments, scheme_model_options, train

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"  # trained runs; a plan other than "small"/"full" writes elsewhere (see main)

# name -> (scheme, extra model options)
ABLATION = {
    "joint": ("joint", {}),
    "two_stage": ("two_stage", {}),
    "single_exit": ("single_exit", {}),
    "bb_g1": ("bb", {"gamma": 1.0}),
    "bb_g0.3": ("bb", {"gamma": 0.3}),
    "bb_g0.1": ("bb", {"gamma": 0.1}),
    "bb_block1": ("bb", {"gamma": 0.3, "block_size": 1}),
    "bb_blockL": ("bb", {"gamma": 0.3, "block_size": "L"}),
}
PLANS = {
    "smoke": {  # checks the pipeline end to end in a few minutes; its numbers mean nothing
        "seeds": [0],
        "train_samples": 64,
        "epochs": 1.0,
        "ablation": ["joint", "bb_g0.3", "single_exit"],
        "rule_datasets": ["rotten-tomatoes"],
        "mpnet_train_samples": 32,
        "mpnet_epochs": 1.0,
        "test_limit": 96,
    },
    "small": {
        "seeds": [0, 1, 2],
        "train_samples": 1500,
        "epochs": 2.0,
        "ablation": [name for name in ABLATION if name != "bb_blockL"],  # fits a 2-core afternoon
        "rule_datasets": ["rotten-tomatoes", "reuters-r8"],
        "mpnet_train_samples": 1200,
        "mpnet_epochs": 1.0,
        "test_limit": 1000,
    },
    "full": {
        "seeds": [0, 1, 2],
        "train_samples": None,
        "epochs": 3.0,
        "ablation": list(ABLATION),
        "rule_datasets": ["rotten-tomatoes", "reuters-r8"],
        "mpnet_train_samples": 6000,
        "mpnet_epochs": 2.0,
        "test_limit": None,
    },
}
MAX_LENGTH = {"rotten-tomatoes": 64, "reuters-r8": 128}


def subsample(dataset: TextDataset, limit: int | None, seed: int) -> TextDataset:
    if limit is None or limit >= len(dataset):
        return dataset
    rows = sorted(torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit].tolist())
    return TextDataset(
        texts=[dataset.texts[i] for i in rows],
        text_pairs=None if dataset.text_pairs is None else [dataset.text_pairs[i] for i in rows],
        labels=[dataset.labels[i] for i in rows],
        label_names=dataset.label_names,
        source=dataset.source,
    )


def train_run(
    name: str,
    backbone: Path,
    dataset: str,
    seed: int,
    plan: dict,
    scheme: str,
    options: dict,
    train_samples: int | None,
    epochs: float,
) -> Path:
    """Train one configuration (cached) and return its best-model folder."""
    tag = "mpnet" if "mpnet" in str(backbone) else "minilm"
    folder = OUT / f"{dataset}-{tag}-{name}-s{seed}"
    if (folder / "train_seconds.txt").is_file():  # written only once training has finished
        return folder / "best"
    splits = load_named_dataset(dataset, seed=0)
    options = dict(options)
    model_options = {**scheme_model_options(scheme), **options}
    if model_options.get("block_size") == "L":
        from transformers import AutoConfig

        model_options["block_size"] = AutoConfig.from_pretrained(backbone).num_hidden_layers
    torch.manual_seed(seed)
    model = MultiExitModel.from_encoder(backbone, label_names=splits["train"].label_names, **model_options)
    args = TrainingArguments(
        output_dir=str(folder),
        scheme=scheme,
        epochs=epochs,
        batch_size=16,
        max_length=MAX_LENGTH[dataset],
        seed=seed,
        save_steps=10_000,
    )
    started = time.perf_counter()
    train(model, subsample(splits["train"], train_samples, seed), splits["validation"], args)
    (folder / "train_seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    return folder / "best"


def stored_logits(model_dir: Path, dataset: str, split: str, limit: int | None):
    """All exits' logits on a split (cached beside the model)."""
    cache = model_dir.parent / f"logits-{split}.safetensors"
    if cache.is_file():
        saved = load_file(cache)
        return saved["logits"], saved["labels"], int(saved["seq_len"])
    model = MultiExitModel.from_pretrained(model_dir).eval()
    data = subsample(load_named_dataset(dataset, seed=0)[split], limit, 0)
    inputs, labels = encode_padded(data, model.tokenizer, MAX_LENGTH[dataset])
    logits, seq_len = exit_logits_for(model, inputs, labels, 64)
    save_file({"logits": logits, "labels": labels, "seq_len": torch.tensor(seq_len)}, cache)
    return logits, labels, seq_len


def ablation(plan: dict, dataset: str, report: dict) -> dict:
    """Part 1: per-exit test metrics and curve areas for every training scheme and seed."""
    backbone = minilm_l6_dir()
    rows: dict[str, list[dict]] = {}
    for name in plan["ablation"]:
        scheme, options = ABLATION[name]
        for seed in plan["seeds"]:
            best = train_run(
                name, backbone, dataset, seed, plan, scheme, options, plan["train_samples"], plan["epochs"]
            )
            model = MultiExitModel.from_pretrained(best)
            logits, labels, seq_len = stored_logits(best, dataset, "test", plan["test_limit"])
            metric = primary_metric_name(model.config.problem_type)
            exits = [m[metric] for m in per_exit_metrics(logits, labels, model.config.problem_type)]
            curves = sweep(model, logits, labels, seq_len)
            rows.setdefault(name, []).append(
                {
                    "seed": seed,
                    "exit_metrics": exits,
                    "mean_exit_metric": sum(exits) / len(exits),
                    "final_metric": exits[-1],
                    "auc_entropy": curves.summaries["entropy"]["auc"],
                    "auc_dge_jsd": curves.summaries["dge-jsd"]["auc"],
                }
            )
            print(f"[ablation] {dataset} {name} seed {seed}: exits {[round(e, 1) for e in exits]}", flush=True)
    summary = {}
    for name, runs in rows.items():

        def stat(key: str, runs: list[dict] = runs) -> dict:
            values = [r[key] for r in runs]
            return {"mean": statistics.mean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0}

        summary[name] = {
            "runs": runs,
            "exit_metrics_mean": [
                statistics.mean(r["exit_metrics"][i] for r in runs) for i in range(len(runs[0]["exit_metrics"]))
            ],
            "mean_exit_metric": stat("mean_exit_metric"),
            "final_metric": stat("final_metric"),
            "auc_entropy": stat("auc_entropy"),
            "auc_dge_jsd": stat("auc_dge_jsd"),
        }
    return summary


def rule_comparison(model_dir: Path, dataset: str, limit: int | None, tag: str) -> dict:
    """Part 2: every rule; settings for 1.5x/2x/3x chosen on validation, reported on test; test-curve areas."""
    model = MultiExitModel.from_pretrained(model_dir)
    val_logits, val_labels, val_len = stored_logits(model_dir, dataset, "validation", limit)
    test_logits, test_labels, test_len = stored_logits(model_dir, dataset, "test", limit)
    on_validation = sweep(model, val_logits, val_labels, val_len)
    on_test = sweep(model, test_logits, test_labels, test_len)
    write_sweep(on_test, HERE / "plots" / tag, title=f"{tag}: test split")
    rules = {}
    for curve, summary in on_test.summaries.items():
        entry = {"auc": summary["auc"], "max_speedup_test": summary["max_speedup"]}
        for target in (1.5, 2.0, 3.0):
            key = f"metric_at_{target:g}x"
            try:
                chosen = calibrate(on_validation, curve, speedup=target)
            except ValueError:
                entry[key] = None
                entry[f"speedup_at_{target:g}x"] = None
                continue
            policy = [(curve, ExitPolicy.from_dict(chosen.policy))]
            point = sweep(model, test_logits, test_labels, test_len, policy).points[0]
            entry[key] = point.metric
            entry[f"speedup_at_{target:g}x"] = point.layer_speedup
        rules[curve] = entry
    return {"full_metric": on_test.full_metric, "num_layers": model.num_layers, "rules": rules, "plot": f"plots/{tag}"}


def onnx_full_engine(model_dir: Path):
    """The same full model run by ONNX Runtime (every layer, no early exit), or None if export is unavailable."""
    try:
        from badge.onnx_engine import OnnxEarlyExitEngine, export_onnx
    except ImportError:
        return None
    export_dir = model_dir.parent / "onnx"
    if not (export_dir / "manifest.json").is_file():
        export_onnx(model_dir, export_dir)
    return lambda policy, batch_size: OnnxEarlyExitEngine(export_dir, policy, batch_size=batch_size)


def wallclock(
    model_dir: Path, dataset: str, limit: int | None, repeats: int, timed_examples: int = 512, timed_bs1: int = 200
) -> dict:
    """Part 3: the rule with the best validation AUC, at its fastest setting within 1 point of the full
    model on validation (or its most accurate one if none is), timed on test."""
    model = MultiExitModel.from_pretrained(model_dir).eval()
    val_logits, val_labels, val_len = stored_logits(model_dir, dataset, "validation", limit)
    on_validation = sweep(model, val_logits, val_labels, val_len)
    rule = max((c for c in on_validation.summaries if c != "oracle"), key=lambda c: on_validation.summaries[c]["auc"])
    try:
        chosen, target_met = calibrate(on_validation, rule, max_drop=1.0), True
    except ValueError:
        chosen, target_met = max((p for p in on_validation.points if p.curve == rule), key=lambda p: p.metric), False
    policy = ExitPolicy.from_dict(chosen.policy)
    test_logits, test_labels, test_len = stored_logits(model_dir, dataset, "test", limit)
    on_test = sweep(model, test_logits, test_labels, test_len, [(rule, policy)])
    point = on_test.points[0]
    data = subsample(load_named_dataset(dataset, seed=0)["test"], timed_examples, 1)
    inputs, _ = encode_padded(data, model.tokenizer, MAX_LENGTH[dataset])
    result = {
        "rule": rule,
        "policy": chosen.policy,
        "validation_target_met": target_met,
        "metric_full": on_test.full_metric,
        "metric_early": point.metric,
        "metric_drop": on_test.full_metric - point.metric,
        "layer_speedup": point.layer_speedup,
        "timed_examples": len(data),
        "timed_examples_bs1": min(timed_bs1, len(data)),
    }
    ort = onnx_full_engine(model_dir)
    for batch_size in (1, 32):
        timed = inputs if batch_size > 1 else {key: value[:timed_bs1] for key, value in inputs.items()}
        timing = time_policy(model, policy, timed, batch_size, repeats=repeats)
        result[f"speedup_vs_hf_bs{batch_size}"] = timing.speedup
        result[f"hf_seconds_bs{batch_size}"] = timing.plain_s
        result[f"engine_seconds_bs{batch_size}"] = timing.engine_s
        result[f"speedup_vs_ort_bs{batch_size}"] = None
        if ort is not None:
            full_ort = ort(ExitPolicy("full"), batch_size)
            early = EarlyExitEngine(model, policy, batch_size=batch_size)
            ratios = []
            for _ in range(repeats):
                start = time.perf_counter()
                full_ort.run(timed["input_ids"], timed["attention_mask"], timed.get("token_type_ids"))
                ort_time = time.perf_counter() - start
                start = time.perf_counter()
                early.run(timed["input_ids"], timed["attention_mask"], timed.get("token_type_ids"))
                ratios.append(ort_time / (time.perf_counter() - start))
            result[f"speedup_vs_ort_bs{batch_size}"] = statistics.median(ratios)
        print(f"[wallclock] {model_dir.parent.name} batch {batch_size}: {result}", flush=True)
    return result


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"
    return f"{value:.{digits}f}"


def write_report(results: dict) -> None:
    (HERE / "results.json").write_text(json.dumps(results, indent=2))
    lines = [
        "# BADGE benchmark results",
        "",
        f"Produced by `python benchmarks/run.py --plan {results['plan_name']}` on {results['machine']}; "
        f"torch {results['versions']['torch']}, transformers {results['versions']['transformers']}; "
        f"seeds {results['seeds']}. Plan: {json.dumps(results['plan'])}.",
        "Thresholds are chosen on the validation split; every number below is on the test split.",
        "",
        f"## 1. Training ablation: {results['backbone']} on {results['dataset']} (mean ± std over seeds)",
        "",
        "| training | exit metrics (mean over seeds) | mean over exits | final exit | AUC entropy | AUC dge-jsd |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in results["ablation"].items():
        exits = " ".join(f"{v:.1f}" for v in row["exit_metrics_mean"])
        lines.append(
            f"| {name} | {exits} | {fmt(row['mean_exit_metric'])} | {fmt(row['final_metric'])} "
            f"| {fmt(row['auc_entropy'])} | {fmt(row['auc_dge_jsd'])} |"
        )
    for tag, comparison in results["rule_comparison"].items():
        lines += [
            "",
            f"## 2. Exit rules: {tag} (full model {comparison['full_metric']:.2f}, {comparison['num_layers']} layers)",
            "",
            "Metric at a target layer speedup: the setting reaching it on validation, measured on test "
            "(the test speedup in brackets). AUC: area under the test metric vs saved-fraction curve.",
            "",
            "| rule | AUC | @1.5x | @2x | @3x |",
            "|---|---|---|---|---|",
        ]
        for curve, entry in comparison["rules"].items():
            cells = [
                f"{fmt(entry[f'metric_at_{t}x'])} ({fmt(entry[f'speedup_at_{t}x'])}x)"
                if entry[f"metric_at_{t}x"] is not None
                else "-"
                for t in ("1.5", "2", "3")
            ]
            lines.append(f"| {curve} | {fmt(entry['auc'])} | " + " | ".join(cells) + " |")
        lines.append(f"\n![{tag}]({comparison['plot']}/sweep.png)")
    for tag, clock in results["wallclock_runs"].items():
        lines += [
            "",
            f"## 3. Wall-clock: {tag}",
            "",
            f"Rule {clock['rule']} (best validation AUC), policy `{clock['policy']}` (chosen on validation for "
            f"<= 1 point drop{'' if clock['validation_target_met'] else ': NOT reachable, most accurate setting'}): "
            "test metric "
            f"{clock['metric_early']:.2f} vs full {clock['metric_full']:.2f} (drop {clock['metric_drop']:.2f}), "
            f"layer speedup {clock['layer_speedup']:.2f}x. Median of per-repeat ratios over "
            f"{results['repeats']} repeats, "
            f"{clock['timed_examples']} test examples ({clock['timed_examples_bs1']} at batch 1).",
            "",
            "The ONNX Runtime baseline is BADGE's own layer-by-layer export run with policy `full` (every layer, "
            "the final exit only, one session per piece), not a single-graph export of the plain model; the "
            "early-exit side of that column is the PyTorch engine. MPNet runs padded layers (the padding-free "
            "path covers the BERT-structured families), MiniLM runs padding-free.",
            "",
            "| batch size | vs plain HF (PyTorch) | vs full model in ONNX Runtime |",
            "|---|---|---|",
            f"| 1 | {fmt(clock['speedup_vs_hf_bs1'])}x | {fmt(clock['speedup_vs_ort_bs1'])}x |",
            f"| 32 | {fmt(clock['speedup_vs_hf_bs32'])}x | {fmt(clock['speedup_vs_ort_bs32'])}x |",
        ]
    lines += ["", "## Claims", ""] + results["claims"]
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")


def claims(results: dict) -> list[str]:
    """State plainly which claims held, from the numbers."""
    ab = results["ablation"]
    out = []
    bb_name = results["best_bb"]
    if "joint" in ab:
        better_mean = ab[bb_name]["mean_exit_metric"]["mean"] > ab["joint"]["mean_exit_metric"]["mean"]
        better_auc = ab[bb_name]["auc_dge_jsd"]["mean"] > ab["joint"]["auc_dge_jsd"]["mean"]
        out.append(
            f"- BB ({bb_name}) over plain joint training: mean over exits "
            f"{fmt(ab[bb_name]['mean_exit_metric'])} vs {fmt(ab['joint']['mean_exit_metric'])}, AUC (dge-jsd) "
            f"{fmt(ab[bb_name]['auc_dge_jsd'])} vs {fmt(ab['joint']['auc_dge_jsd'])}: "
            f"**{'held' if better_mean and better_auc else 'did not hold'}**."
        )
    if "single_exit" in ab:
        gap = ab["single_exit"]["final_metric"]["mean"] - ab[bb_name]["final_metric"]["mean"]
        out.append(
            f"- BB final exit within 0.5 points of a single-exit fine-tune: {fmt(ab[bb_name]['final_metric'])} vs "
            f"{fmt(ab['single_exit']['final_metric'])} (gap {gap:.2f}): **{'held' if gap <= 0.5 else 'did not hold'}**."
        )
    for tag, comparison in results["rule_comparison"].items():
        rules = comparison["rules"]
        dge = {k: v for k, v in rules.items() if k.startswith("dge")}
        others = {k: v for k, v in rules.items() if not k.startswith("dge") and k != "oracle"}
        best_dge = max(dge, key=lambda k: dge[k]["auc"])
        best_other = max(others, key=lambda k: others[k]["auc"])
        held = dge[best_dge]["auc"] > others[best_other]["auc"]
        out.append(
            f"- DGE over the other rules on {tag}: best DGE ({best_dge}) AUC {dge[best_dge]['auc']:.2f} vs best "
            f"other ({best_other}) {others[best_other]['auc']:.2f}: **{'held' if held else 'did not hold'}**."
        )
    for tag, clock in results["wallclock_runs"].items():
        held = clock["metric_drop"] <= 1.0 and clock["speedup_vs_hf_bs32"] > 1.0
        out.append(
            f"- Wall-clock speedup at <= 1 point drop on {tag}: drop {clock['metric_drop']:.2f}, "
            f"{fmt(clock['speedup_vs_hf_bs1'])}x (batch 1) and {fmt(clock['speedup_vs_hf_bs32'])}x (batch 32) over "
            f"the plain HF model: **{'held' if held else 'did not hold'}**."
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", choices=sorted(PLANS), default="small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-mpnet", action="store_true", help="leave out the 12-layer MPNet runs")
    args = parser.parse_args()
    plan = PLANS[args.plan]
    global OUT, HERE
    if args.plan == "smoke":  # keep smoke runs and reports away from the real ones
        OUT = HERE / "out-smoke"
        HERE = OUT
    OUT.mkdir(parents=True, exist_ok=True)
    dataset = "rotten-tomatoes"
    results: dict = {
        "plan_name": args.plan,
        "plan": plan,
        "dataset": dataset,
        "backbone": "all-MiniLM-L6-v2 (6 layers)",
        "seeds": plan["seeds"],
        "repeats": args.repeats,
        "machine": f"{platform.machine()} {platform.processor()}, {torch.get_num_threads()} torch threads",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": sys.version.split()[0],
        },
    }
    results["ablation"] = ablation(plan, dataset, results)
    bb_names = [n for n in results["ablation"] if n.startswith("bb")]
    best_bb = max(bb_names, key=lambda n: results["ablation"][n]["mean_exit_metric"]["mean"])
    results["best_bb"] = best_bb
    results["training"] = {
        key: {
            "setting": name,
            "mean_exit_metric": results["ablation"][name]["mean_exit_metric"]["mean"],
            "mean_exit_metric_std": results["ablation"][name]["mean_exit_metric"]["std"],
            "final_metric": results["ablation"][name]["final_metric"]["mean"],
            "final_metric_std": results["ablation"][name]["final_metric"]["std"],
            "auc_dge_jsd": results["ablation"][name]["auc_dge_jsd"]["mean"],
        }
        for key, name in (
            ("joint", "joint"),
            ("two_stage", "two_stage"),
            ("bb", best_bb),
            ("single_exit", "single_exit"),
        )
        if name in results["ablation"]
    }
    scheme, options = ABLATION[best_bb]
    results["rule_comparison"], results["wallclock_runs"] = {}, {}
    seed = plan["seeds"][0]
    for rule_dataset in plan["rule_datasets"]:
        best = train_run(
            best_bb, minilm_l6_dir(), rule_dataset, seed, plan, scheme, options, plan["train_samples"], plan["epochs"]
        )
        tag = f"MiniLM-L6 on {rule_dataset}"
        results["rule_comparison"][tag] = rule_comparison(
            best, rule_dataset, plan["test_limit"], f"minilm-{rule_dataset}"
        )
    if not args.skip_mpnet:
        best = train_run(
            best_bb,
            mpnet_base_dir(),
            dataset,
            seed,
            plan,
            scheme,
            options,
            plan["mpnet_train_samples"],
            plan["mpnet_epochs"],
        )
        results["rule_comparison"]["MPNet-12 on rotten-tomatoes"] = rule_comparison(
            best, dataset, plan["test_limit"], "mpnet-rotten-tomatoes"
        )
        results["wallclock_runs"]["MPNet-12 on rotten-tomatoes"] = wallclock(
            best, dataset, plan["test_limit"], args.repeats, timed_examples=256, timed_bs1=64
        )
    minilm_best = train_run(
        best_bb, minilm_l6_dir(), dataset, seed, plan, scheme, options, plan["train_samples"], plan["epochs"]
    )
    results["wallclock_runs"]["MiniLM-L6 on rotten-tomatoes"] = wallclock(
        minilm_best, dataset, plan["test_limit"], args.repeats
    )
    headline = (
        results["rule_comparison"].get("MPNet-12 on rotten-tomatoes")
        or results["rule_comparison"][f"MiniLM-L6 on {dataset}"]
    )
    results["rules"] = {
        name: {"auc": entry["auc"], "metric_at_2x": entry["metric_at_2x"]} for name, entry in headline["rules"].items()
    }
    results["wallclock"] = (
        results["wallclock_runs"].get("MPNet-12 on rotten-tomatoes")
        or results["wallclock_runs"]["MiniLM-L6 on rotten-tomatoes"]
    )
    results["claims"] = claims(results)
    write_report(results)
    print((HERE / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
