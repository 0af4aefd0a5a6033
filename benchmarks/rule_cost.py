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

from badge import EarlyExitEngine, ExitPolicy, MultiExitModel
from badge.data import load_named_dataset
from badge.device import synchronize
from badge.logits import encode_padded

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
    parser.add_argument("model_dir", type=Path, help="a model folder; its stored gate is timed when it has one")
    parser.add_argument("--dataset", default="rotten-tomatoes")
    parser.add_argument("--split", default="test")
    parser.add_argument("--samples", type=int, default=512, help="examples timed (a seeded sample of the split)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample of texts timed")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/RULE-COST.md"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = MultiExitModel.from_pretrained(args.model_dir).eval()
    policies = never_early_policies(model)
    if "gate" not in policies:
        parser.error(f"{args.model_dir} stores no gate: run `badge calibrate` on it first (the gate is the default)")
    dataset = load_named_dataset(args.dataset, split_seed=0)[args.split]
    inputs, _ = encode_padded(dataset, model.tokenizer, args.max_length)
    sample = torch.randperm(len(inputs["input_ids"]), generator=torch.Generator().manual_seed(args.seed))
    inputs = {key: value[sample[: args.samples]] for key, value in inputs.items()}

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
