"""What each layer of the inference stack adds: early exit, ONNX Runtime, int8, head pruning.

    python benchmarks/stack.py runs/quickstart/best --dataset rotten-tomatoes --split test
    python benchmarks/stack.py MODEL_DIR --limit 16 --repeats 5      # a quick check that it runs

Rows, each on the same examples, batch sizes and thread count:
    full model                   the plain Hugging Face forward (all layers, final classifier): the reference
    full model, ONNX Runtime     the float32 export run layer by layer with policy `full`: ONNX Runtime's own share
    early exit                   EarlyExitEngine with the model's stored exit policy (or --rule/--tau/...)
    early exit + int8 (PyTorch)  the same, encoder linear layers dynamically quantised by torch
    early exit + ONNX Runtime    OnnxEarlyExitEngine on a float32 export
    + int8                       OnnxEarlyExitEngine on an int8 export
    + head pruning               the int8 export of the model with --heads of its heads pruned (importance on
                                 --importance-split, no retraining), or of the already pruned --pruned folder

For each batch size the plain model and every row run over the same length-sorted batches, one after
the other, `--repeats` times; a row's speedup is the median over repeats of (plain time / row time),
both measured in the same repeat. Writes a Markdown table (default benchmarks/STACK.md) and prints it.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime
import torch
import transformers

from badge import EarlyExitEngine, ExitPolicy, MultiExitModel
from badge.data import TextDataset, load_named_dataset
from badge.evaluation import encode_padded, length_sorted_batches, plain_forward
from badge.metrics import primary_metric_name, task_metrics
from badge.onnx_engine import OnnxEarlyExitEngine, export_onnx
from badge.pruning import head_importance, prune_heads
from badge.quantize import quantize_torch

Batch = dict[str, torch.Tensor]


@dataclass
class Row:
    """One configuration: how it answers a batch, and what it measured."""

    name: str
    answer: Callable[[Batch], tuple[torch.Tensor, torch.Tensor | None]]  # -> logits (B, K), exit layers (B,)
    parameters: int
    metric: float = 0.0
    mean_exit_layer: float = 0.0
    seconds: dict[int, float] = field(default_factory=dict)
    speedup: dict[int, float] = field(default_factory=dict)


def subset(dataset: TextDataset, limit: int | None, seed: int) -> TextDataset:
    """A seeded random `limit` examples of `dataset` (all of them without a limit)."""
    if limit is None or limit >= len(dataset):
        return dataset
    rows = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit].sort().values.tolist()
    return TextDataset(
        texts=[dataset.texts[i] for i in rows],
        text_pairs=[dataset.text_pairs[i] for i in rows] if dataset.text_pairs is not None else None,
        labels=[dataset.labels[i] for i in rows],
        label_names=dataset.label_names,
        source=dataset.source,
    )


def engine_answer(engine: EarlyExitEngine) -> Callable[[Batch], tuple[torch.Tensor, torch.Tensor]]:
    def answer(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        output = engine.run(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        return output.logits, output.exit_layers

    return answer


def plain_answer(model: MultiExitModel) -> Callable[[Batch], tuple[torch.Tensor, None]]:
    def answer(batch: Batch) -> tuple[torch.Tensor, None]:
        return plain_forward(model, {key: value for key, value in batch.items() if key != "row"}), None

    return answer


def count_parameters(model: MultiExitModel) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def pruned_model(args: argparse.Namespace, splits: dict[str, TextDataset]) -> tuple[MultiExitModel, str]:
    """The model of the `+ head pruning` row, and a line saying where it came from."""
    if args.pruned is not None:
        return MultiExitModel.from_pretrained(args.pruned).eval(), f"the pruned folder {args.pruned}"
    model = MultiExitModel.from_pretrained(args.model_dir).eval()
    data = subset(splits[args.importance_split], args.importance_samples, args.seed)
    importance = head_importance(model, data, batch_size=32, max_length=args.max_length)
    prune_heads(model, args.heads, importance)
    kept = sum(len(heads) for heads in model.config.heads_kept.values())
    return model.eval(), (
        f"{args.heads:.0%} of the heads pruned here ({kept} kept), importance on {len(data)} "
        f"{args.importance_split} examples, not retrained"
    )


def build_rows(
    model: MultiExitModel, policy: ExitPolicy, pruned: MultiExitModel, work: Path, batch_size: int, threads: int
) -> list[Row]:
    """Every configuration of the stack, exports written under `work`."""
    onnx_float = export_onnx(model, work / "onnx")
    onnx_int8 = export_onnx(model, work / "onnx-int8", quantize="int8")
    onnx_pruned = export_onnx(pruned, work / "onnx-int8-pruned", quantize="int8")

    full = ExitPolicy("full")

    def onnx_engine(folder: Path, rule: ExitPolicy = policy) -> OnnxEarlyExitEngine:
        return OnnxEarlyExitEngine(folder, rule, batch_size, num_threads=threads, sort_by_length=False)

    size, pruned_size = count_parameters(model), count_parameters(pruned)
    return [
        Row("full model (plain Hugging Face)", plain_answer(model), size),
        Row("full model, ONNX Runtime (every layer, no exit)", engine_answer(onnx_engine(onnx_float, full)), size),
        Row("early exit", engine_answer(EarlyExitEngine(model, policy, batch_size, sort_by_length=False)), size),
        Row(
            "early exit + int8 (PyTorch)",
            engine_answer(EarlyExitEngine(quantize_torch(model), policy, batch_size, sort_by_length=False)),
            size,
        ),
        Row("early exit + ONNX Runtime", engine_answer(onnx_engine(onnx_float)), size),
        Row("early exit + ONNX Runtime + int8", engine_answer(onnx_engine(onnx_int8)), size),
        Row("early exit + ONNX Runtime + int8 + head pruning", engine_answer(onnx_engine(onnx_pruned)), pruned_size),
    ]


def measure_answers(rows: list[Row], batches: list[Batch], labels: torch.Tensor, task: str, num_layers: int) -> None:
    """Fill each row's metric and mean exit layer (untimed)."""
    for row in rows:
        logits, layers, order = [], [], []
        for batch in batches:
            batch_logits, batch_layers = row.answer(batch)
            logits.append(batch_logits)
            layers.append(batch_layers if batch_layers is not None else torch.full((len(batch_logits),), num_layers))
            order.append(batch["row"])
        rows_in_order = torch.cat(order)
        row.metric = task_metrics(torch.cat(logits), labels[rows_in_order], task)[primary_metric_name(task)]
        row.mean_exit_layer = torch.cat(layers).float().mean().item()


def measure_speed(rows: list[Row], batches: list[Batch], batch_size: int, repeats: int) -> None:
    """Time every row over `batches`, `repeats` times; speedups are per-repeat ratios to the first row (plain)."""
    for row in rows:
        row.answer(batches[0])  # warm-up: first calls allocate
    times: dict[str, list[float]] = {row.name: [] for row in rows}
    for _ in range(repeats):
        for row in rows:
            start = time.perf_counter()
            for batch in batches:
                row.answer(batch)
            times[row.name].append(time.perf_counter() - start)
    plain = times[rows[0].name]
    for row in rows:
        row.seconds[batch_size] = statistics.median(times[row.name])
        row.speedup[batch_size] = statistics.median(p / t for p, t in zip(plain, times[row.name], strict=True))


def markdown(rows: list[Row], args: argparse.Namespace, header: list[str]) -> str:
    metric_name = primary_metric_name(args.task)
    sizes = args.batch_sizes
    lines = [
        *header,
        "",
        f"| configuration | {metric_name} | mean exit layer | parameters (M) | "
        + " | ".join(f"speedup batch {b} | s batch {b}" for b in sizes)
        + " |",
        "|---|---|---|---|" + "---|---|" * len(sizes),
    ]
    for row in rows:
        cells = " | ".join(f"{row.speedup[b]:.2f}x | {row.seconds[b]:.3f}" for b in sizes)
        lines.append(
            f"| {row.name} | {row.metric:.2f} | {row.mean_exit_layer:.2f} | {row.parameters / 1e6:.2f} | {cells} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--dataset", default="rotten-tomatoes")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="examples timed (a seeded sample of the split)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads (default: torch's)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rule", default=None, help="override the stored exit policy's rule")
    parser.add_argument("--tau", type=float, default=None)
    parser.add_argument("--patience", type=int, default=None)
    parser.add_argument("--divergence", default=None)
    parser.add_argument("--heads", type=float, default=0.3, help="share of attention heads to prune")
    parser.add_argument("--pruned", type=Path, default=None, help="an already pruned (and retrained) model folder")
    parser.add_argument("--importance-split", default="validation")
    parser.add_argument("--importance-samples", type=int, default=512)
    parser.add_argument("--work-dir", type=Path, default=None, help="where the ONNX exports go (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/STACK.md"))
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error(f"--repeats {args.repeats}: the median needs at least 5 repeats")

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    model = MultiExitModel.from_pretrained(args.model_dir).eval()
    args.task = model.config.problem_type
    policy = (
        ExitPolicy(args.rule, tau=args.tau, patience=args.patience, divergence=args.divergence)
        if args.rule
        else ExitPolicy.from_dict(model.config.exit_policy)
    )
    splits = load_named_dataset(args.dataset, split_seed=args.seed)
    data = subset(splits[args.split], args.limit, args.seed)
    inputs, labels = encode_padded(data, model.tokenizer, args.max_length)
    inputs["row"] = torch.arange(len(labels))  # follows each example through the length sorting
    pruned, pruned_origin = pruned_model(args, splits)

    with tempfile.TemporaryDirectory() as temporary:
        work = args.work_dir or Path(temporary)
        rows = build_rows(model, policy, pruned, work, max(args.batch_sizes), threads)
        measure_answers(rows, length_sorted_batches(inputs, 32), labels, args.task, model.num_layers)
        for batch_size in args.batch_sizes:
            measure_speed(rows, length_sorted_batches(inputs, batch_size), batch_size, args.repeats)
            print(f"batch {batch_size}: " + ", ".join(f"{r.name} {r.speedup[batch_size]:.2f}x" for r in rows))

    header = [
        f"# The inference stack: {args.model_dir} on {args.dataset} {args.split}",
        "",
        f"Policy `{policy}`; {len(labels)} examples (seed {args.seed}), max length {args.max_length}, "
        f"{model.num_layers} layers. Pruned row: {pruned_origin}.",
        f"Machine: {platform.processor() or platform.machine()}, {threads} threads (torch and ONNX Runtime); "
        f"torch {torch.__version__}, transformers {transformers.__version__}, onnxruntime {onnxruntime.__version__}.",
        f"Speedup = median over {args.repeats} repeats of (plain Hugging Face time / row time), both timed in the "
        "same repeat on the same length-sorted batches; s = median seconds for all examples.",
    ]
    table = markdown(rows, args, header)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
