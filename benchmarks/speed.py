"""Wall-clock speedup of the early-exit engine against the plain Hugging Face model, next to the layer speedup.

    python benchmarks/speed.py runs/quickstart/best --dataset rotten-tomatoes --split test

For each batch size the same examples run through the plain model (all layers, final classifier)
and through the engine with the model's stored exit policy (or --rule/--tau/...), alternating,
`--repeats` times; the reported speedup is the median of the per-repeat ratios. Writes a Markdown
table (default benchmarks/SPEED.md) and prints it.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
import transformers

from badge import EarlyExitEngine, ExitPolicy, MultiExitModel
from badge.data import load_named_dataset
from badge.logits import encode_padded
from badge.timing import time_policy
from badge.workflows import UsageError, policy_from_options


def add_sample_options(parser: argparse.ArgumentParser, repeats: int, max_length: int) -> None:
    """The options of a timing benchmark that say which texts run, how often and on how many threads."""
    parser.add_argument("--dataset", default="rotten-tomatoes")
    parser.add_argument("--split", default="test")
    parser.add_argument("--samples", type=int, default=512, help="examples timed (a seeded sample of the split)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--max-length", type=int, default=max_length)
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample of texts timed")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the dataset split (the model's own)")


def load_timed_model(args: argparse.Namespace) -> MultiExitModel:
    """Set torch's threads (`--threads`) and load `args.model_dir` for inference."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return MultiExitModel.from_pretrained(args.model_dir).eval()


def sampled_inputs(model: MultiExitModel, args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The seeded sample of `--samples` texts of the split (`add_sample_options`), padded, with their labels."""
    dataset = load_named_dataset(args.dataset, split_seed=args.split_seed)[args.split]
    inputs, labels = encode_padded(dataset, model.tokenizer, args.max_length)
    sample = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed))[: args.samples]
    return {key: value[sample] for key, value in inputs.items()}, labels[sample]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path)
    add_sample_options(parser, repeats=5, max_length=128)
    parser.add_argument("--rule", default=None, help="override the stored exit policy's rule")
    parser.add_argument("--tau", type=float, default=None, help="threshold of --rule")
    parser.add_argument("--patience", type=int, default=None, help="patience of --rule")
    parser.add_argument("--divergence", default=None, help="divergence of --rule dge")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/SPEED.md"))
    args = parser.parse_args()
    try:  # the same checks as `badge predict --rule`: no --tau without --rule, no oracle
        override = policy_from_options(args.rule, args.tau, args.patience, args.divergence)
    except UsageError as error:
        parser.error(str(error))

    model = load_timed_model(args)
    policy = override or ExitPolicy.from_dict(model.config.exit_policy)
    inputs, labels = sampled_inputs(model, args)

    full = EarlyExitEngine(model, ExitPolicy("full"), batch_size=64).run(**inputs)
    early = EarlyExitEngine(model, policy, batch_size=64).run(**inputs)
    accuracy_full = 100 * (torch.tensor(full.labels) == labels).float().mean().item()
    accuracy_early = 100 * (torch.tensor(early.labels) == labels).float().mean().item()
    layer_speedup = model.num_layers / early.exit_layers.float().mean().item()

    lengths = inputs["attention_mask"].sum(dim=1).float()
    token_speedup = (lengths.sum() * model.num_layers / (lengths * early.exit_layers).sum()).item()

    rows = []
    for batch_size in args.batch_sizes:
        timing = time_policy(model, policy, inputs, batch_size, repeats=args.repeats)
        # The engine with no early exit, against the same plain model: what the engine's own
        # scheduling (padding-free layers, length sorting) gains or loses before any row leaves.
        all_layers = time_policy(model, ExitPolicy("full"), inputs, batch_size, repeats=args.repeats)
        rows.append((batch_size, timing, all_layers))
        print(
            f"batch {batch_size}: plain {timing.plain_s:.3f}s engine {timing.engine_s:.3f}s -> {timing.speedup:.2f}x"
            f" (engine without exits {all_layers.speedup:.2f}x)"
        )

    lines = [
        f"# Wall-clock vs layer speedup: {args.model_dir} on {args.dataset} {args.split}",
        "",
        f"Policy `{policy}`; {len(labels)} examples (seed {args.seed}), max length {args.max_length}; "
        f"accuracy full model {accuracy_full:.2f}, early exit {accuracy_early:.2f}; "
        f"mean exit layer {early.exit_layers.float().mean():.2f} of {model.num_layers}, "
        f"layer speedup {layer_speedup:.2f}x (weighted by tokens: {token_speedup:.2f}x).",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
        f"torch {torch.__version__}, transformers {transformers.__version__}. "
        f"Speedup = median over {args.repeats} repeats of (plain time / engine time) on the same batches.",
        "",
        "| batch size | plain HF (s) | early exit (s) | wall-clock speedup | layer speedup | wall-clock / layer "
        "| engine without exits vs plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch_size, timing, all_layers in rows:
        lines.append(
            f"| {batch_size} | {timing.plain_s:.3f} | {timing.engine_s:.3f} | {timing.speedup:.2f}x "
            f"| {layer_speedup:.2f}x | {timing.speedup / layer_speedup:.2f} | {all_layers.speedup:.2f}x |"
        )
    lines += [
        "",
        "The last column runs every layer through the engine (policy `full`): the part of the speedup "
        "that comes from the engine's own scheduling rather than from exiting early.",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
