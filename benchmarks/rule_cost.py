"""What an exit rule costs the engine: every rule run at a setting where no text leaves early.

    python benchmarks/rule_cost.py runs/quickstart/best --dataset rotten-tomatoes --split test

At such a setting every text runs every layer and every exit, so the only difference between two rules
is their own per-exit work (the gate's features and logistic score against entropy's one reduction).
Each repeat times, one after the other on the same inputs and batch size: the engine with `full` (which
skips the intermediate exits), then every rule. The table gives each rule's median over repeats of
(its time / `full`'s time in the same repeat), and the gate's median ratio to entropy, the rule it
competes with. Writes benchmarks/RULE-COST.md and prints it.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from speed import add_sample_options, load_timed_model, sampled_inputs

from badge import EarlyExitEngine, ExitPolicy, MultiExitModel
from badge.device import synchronize

# Settings under which no text leaves before the last exit: entropy below 0, a probability above 1,
# a divergence below 0, a gate probability above 1.
NEVER_EARLY = {
    "entropy": {"tau": 0.0},
    "maxprob": {"tau": 1.0},
    "dge": {"tau": 0.0, "patience": 1, "divergence": "jsd"},
    "patience": {"patience": 1000},
}


def never_early_policies(model: MultiExitModel) -> dict[str, ExitPolicy]:
    policies = {"full": ExitPolicy("full")}
    policies |= {rule: ExitPolicy(rule, **options) for rule, options in NEVER_EARLY.items()}
    stored = model.config.exit_policy or {}
    if stored.get("rule") == "gate":
        policies["gate"] = ExitPolicy("gate", tau=1.0, gate=stored["gate"])
    return policies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path, help="a model folder that stores a gate")
    add_sample_options(parser, repeats=7, max_length=64)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/RULE-COST.md"))
    args = parser.parse_args()
    model = load_timed_model(args)
    policies = never_early_policies(model)
    if "gate" not in policies:
        parser.error(f"{args.model_dir} stores no gate: run `badge calibrate {args.model_dir} --rule gate` first")
    inputs, _ = sampled_inputs(model, args)

    rows = []
    for batch_size in args.batch_sizes:
        engines = {name: EarlyExitEngine(model, policy, batch_size=batch_size) for name, policy in policies.items()}
        for name, engine in engines.items():  # warm-up, and the check that nobody leaves early
            layers = engine.run(**inputs).exit_layers
            if name != "full" and int(layers.min()) != model.num_layers:
                raise SystemExit(f"{name} {policies[name]} let texts leave at layer {int(layers.min())}")
        times: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(args.repeats):
            for name, engine in engines.items():
                start = time.perf_counter()
                engine.run(**inputs)
                synchronize(model.device)
                times[name].append(time.perf_counter() - start)
        ratio = {
            name: statistics.median(t / f for t, f in zip(times[name], times["full"], strict=True)) for name in times
        }
        gate_vs_entropy = statistics.median(g / e for g, e in zip(times["gate"], times["entropy"], strict=True))
        rows.append((batch_size, {name: statistics.median(t) for name, t in times.items()}, ratio, gate_vs_entropy))
        print(f"batch {batch_size}: " + ", ".join(f"{name} {ratio[name]:.3f}" for name in ratio), flush=True)

    names = list(policies)
    lines = [
        f"# What an exit rule costs: {args.model_dir} on {args.dataset} {args.split}",
        "",
        f"{args.samples} examples (seed {args.seed}), max length {args.max_length}, every rule at a setting where "
        f"no text leaves before layer {model.num_layers}: {', '.join(str(p) for p in policies.values())}. "
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
        f"torch {torch.__version__}, transformers {transformers.__version__}. Median over {args.repeats} repeats "
        "of each rule's time over `full`'s in the same repeat (`full` skips the intermediate exits); the last "
        "column is the gate's median ratio to entropy.",
        "",
        "| batch size | full (s) | " + " | ".join(f"{n} / full" for n in names[1:]) + " | gate / entropy |",
        "|---|---|" + "---|" * (len(names) - 1) + "---|",
    ]
    for batch_size, seconds, ratio, gate_vs_entropy in rows:
        cells = " | ".join(f"{ratio[n]:.3f}" for n in names[1:])
        lines.append(f"| {batch_size} | {seconds['full']:.3f} | {cells} | {gate_vs_entropy:.3f} |")
    lines += ["", "Command: `python benchmarks/rule_cost.py " + " ".join(sys.argv[1:]) + "`"]
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
