"""Early exit against the fastest plain runtime: every layer of the inference stack on the same data.

    python benchmarks/stack.py runs/quickstart/best --dataset rotten-tomatoes --split test --limit 512 \
        --max-length 64 --threads 2
    python benchmarks/stack.py MODEL_DIR --limit 16 --repeats 5      # a quick check that it runs

Rows, each on the same examples, batch sizes and thread count. `plain` rows run every layer:
    plain Hugging Face (PyTorch)        the plain forward (all layers, final classifier): the reference
    plain, ONNX Runtime, one graph      the plain model as a user deploys it: `torch.onnx.export` of the whole
                                        model, one session
    plain, ONNX Runtime, one graph, int8   the same graph after ONNX Runtime's `quantize_dynamic` (int8 weights)
`badge` rows exit early with the model's stored exit policy (or --rule/--tau/...):
    early exit (PyTorch)                EarlyExitEngine
    early exit + int8 (PyTorch)         the same, encoder linear layers dynamically quantised by torch
    early exit, ONNX Runtime layer by layer, int8   a session call per layer and per exit
    early exit, ONNX Runtime one graph [, int8]     the export joined into one graph, the rule inside (a batch
                                        of one row runs a leaner graph built for one row)
    ... + head pruning                  the int8 one graph of the model with --heads of its heads pruned
                                        (importance on --importance-split, no retraining), or of --pruned;
                                        --heads 0 leaves the row out

For each batch size the plain model and every row run over the same length-sorted batches, one after
the other, `--repeats` times; a row's speedup is the median over repeats of (plain time / row time),
both measured in the same repeat, and the spread is the lowest and highest of those ratios. Writes a
Markdown table (default benchmarks/STACK.md) and the same numbers as JSON (default benchmarks/stack.json).
"""

from __future__ import annotations

import argparse
import json
import os
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
from plain_runtime import Batch, export_plain, onnx_answer, plain_answer

from badge import EarlyExitEngine, ExitPolicy, MultiExitModel
from badge.data import TextDataset, load_named_dataset
from badge.logits import encode_padded, length_sorted_batches
from badge.onnx_engine import OnnxEarlyExitEngine, export_onnx
from badge.pruning import head_importance, prune_heads
from badge.quantize import quantize_torch
from badge.tasks import get_task
from badge.workflows import UsageError, policy_from_options

# Wall-clock time, and the CPU time of this process (all its threads): on a machine shared with other
# jobs the wall clock also counts waiting for a core, the CPU time only the work done.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass
class Row:
    """One configuration: how it answers a batch, and what it measured."""

    name: str
    kind: str  # "plain" (every layer) or "badge" (early exit)
    answer: Callable[[Batch], tuple[torch.Tensor, torch.Tensor | None]]  # -> logits (B, K), exit layers (B,)
    parameters: int
    metric: float = 0.0
    mean_exit_layer: float = 0.0
    # Per clock (`wall`, `cpu`) and batch size: median seconds, median speedup, lowest and highest per-repeat
    # speedup, and the seconds of every repeat.
    seconds: dict[str, dict[int, float]] = field(default_factory=lambda: {clock: {} for clock in CLOCKS})
    speedup: dict[str, dict[int, float]] = field(default_factory=lambda: {clock: {} for clock in CLOCKS})
    spread: dict[str, dict[int, tuple[float, float]]] = field(default_factory=lambda: {clock: {} for clock in CLOCKS})
    times: dict[str, dict[int, list[float]]] = field(default_factory=lambda: {clock: {} for clock in CLOCKS})


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


def count_parameters(model: MultiExitModel) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def pruned_model(args: argparse.Namespace, splits: dict[str, TextDataset]) -> tuple[MultiExitModel | None, str]:
    """The model of the `+ head pruning` row (None with --heads 0), and a line saying where it came from."""
    if args.pruned is None and args.heads == 0:
        return None, "left out (--heads 0)"
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
    model: MultiExitModel,
    policy: ExitPolicy,
    pruned: MultiExitModel | None,
    work: Path,
    batch_size: int,
    threads: int,
) -> list[Row]:
    """Every configuration of the stack, exports written under `work`; batch_size: the engines' rows per call."""
    plain_float, plain_int8 = export_plain(model, work / "plain")
    onnx_float = export_onnx(model, work / "onnx")
    onnx_int8 = export_onnx(model, work / "onnx-int8", quantize="int8")

    def onnx_engine(folder: Path, graph: str) -> OnnxEarlyExitEngine:
        return OnnxEarlyExitEngine(folder, policy, batch_size, num_threads=threads, sort_by_length=False, graph=graph)

    def torch_engine(network: MultiExitModel) -> EarlyExitEngine:
        return EarlyExitEngine(network, policy, batch_size, sort_by_length=False)

    size = count_parameters(model)
    rows = [
        Row("plain Hugging Face (PyTorch)", "plain", plain_answer(model), size),
        Row("plain, ONNX Runtime, one graph", "plain", onnx_answer(plain_float, threads), size),
        Row("plain, ONNX Runtime, one graph, int8", "plain", onnx_answer(plain_int8, threads), size),
        Row("early exit (PyTorch)", "badge", engine_answer(torch_engine(model)), size),
        Row("early exit + int8 (PyTorch)", "badge", engine_answer(torch_engine(quantize_torch(model))), size),
        Row(
            "early exit, ONNX Runtime layer by layer, int8",
            "badge",
            engine_answer(onnx_engine(onnx_int8, "layers")),
            size,
        ),
        Row("early exit, ONNX Runtime one graph", "badge", engine_answer(onnx_engine(onnx_float, "one")), size),
        Row("early exit, ONNX Runtime one graph, int8", "badge", engine_answer(onnx_engine(onnx_int8, "one")), size),
    ]
    if pruned is not None:
        onnx_pruned = export_onnx(pruned, work / "onnx-int8-pruned", quantize="int8")
        rows.append(
            Row(
                "early exit, ONNX Runtime one graph, int8 + head pruning",
                "badge",
                engine_answer(onnx_engine(onnx_pruned, "one")),
                count_parameters(pruned),
            )
        )
    return rows


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
        row.metric = get_task(task).metric.compute(torch.cat(logits), labels[rows_in_order])
        row.mean_exit_layer = torch.cat(layers).float().mean().item()


def measure_speed(rows: list[Row], batches: list[Batch], batch_size: int, repeats: int) -> None:
    """Time every row over `batches`, `repeats` times; speedups are per-repeat ratios to the first row (plain)."""
    for row in rows:
        row.answer(batches[0])  # warm-up: first calls allocate
    times: dict[str, dict[str, list[float]]] = {clock: {row.name: [] for row in rows} for clock in CLOCKS}
    for _ in range(repeats):
        for row in rows:
            start = {clock: read() for clock, read in CLOCKS.items()}
            for batch in batches:
                row.answer(batch)
            for clock, read in CLOCKS.items():
                times[clock][row.name].append(read() - start[clock])
    for clock in CLOCKS:
        plain = times[clock][rows[0].name]
        for row in rows:
            ratios = [p / t for p, t in zip(plain, times[clock][row.name], strict=True)]
            row.seconds[clock][batch_size] = statistics.median(times[clock][row.name])
            row.speedup[clock][batch_size] = statistics.median(ratios)
            row.spread[clock][batch_size] = (min(ratios), max(ratios))
            row.times[clock][batch_size] = times[clock][row.name]


@dataclass
class Comparison:
    """The fastest early-exit row against the fastest plain row at one batch size (rows within the allowed drop)."""

    clock: str
    batch_size: int
    plain: str
    badge: str
    ratio: float  # median over repeats of (plain row time / badge row time)
    spread: tuple[float, float]


def compare_best(rows: list[Row], sizes: list[int], max_drop: float) -> list[Comparison]:
    """Per clock and batch size, the fastest badge row over the fastest plain row, among rows at most
    `max_drop` points below the plain Hugging Face model's metric."""
    reference = rows[0].metric
    allowed = [row for row in rows if reference - row.metric <= max_drop]
    comparisons = []
    for clock in CLOCKS:
        for size in sizes:
            best = {
                kind: max(
                    (row for row in allowed if row.kind == kind), key=lambda row: row.speedup[clock][size], default=None
                )
                for kind in ("plain", "badge")
            }
            if best["plain"] is None or best["badge"] is None:
                continue
            plain_times, badge_times = best["plain"].times[clock][size], best["badge"].times[clock][size]
            ratios = [p / b for p, b in zip(plain_times, badge_times, strict=True)]
            spread = (min(ratios), max(ratios))
            comparisons.append(
                Comparison(clock, size, best["plain"].name, best["badge"].name, statistics.median(ratios), spread)
            )
    return comparisons


def markdown(rows: list[Row], comparisons: list[Comparison], args: argparse.Namespace, header: list[str]) -> str:
    metric_name = get_task(args.task).metric.name
    sizes = args.batch_sizes
    columns = [(clock, b) for clock in CLOCKS for b in sizes]
    lines = [
        *header,
        "",
        f"| configuration | kind | {metric_name} | mean exit layer | parameters (M) | "
        + " | ".join(f"{clock} speedup batch {b} (spread) | {clock} s batch {b}" for clock, b in columns)
        + " |",
        "|---|---|---|---|---|" + "---|---|" * len(columns),
    ]
    for row in rows:
        cells = " | ".join(
            f"{row.speedup[c][b]:.2f}x ({row.spread[c][b][0]:.2f}-{row.spread[c][b][1]:.2f}) | {row.seconds[c][b]:.3f}"
            for c, b in columns
        )
        lines.append(
            f"| {row.name} | {row.kind} | {row.metric:.2f} | {row.mean_exit_layer:.2f} | "
            f"{row.parameters / 1e6:.2f} | {cells} |"
        )
    lines += [
        "",
        f"Fastest early-exit row over fastest plain row, among rows at most {args.max_drop:g} point(s) below the "
        f"plain model's {metric_name} (median of per-repeat time ratios, spread in brackets; `inf`: no early-exit "
        "row was within --max-drop, so all rows are compared):",
        "",
    ]
    lines += [
        f"- {c.clock}, batch {c.batch_size}: **{c.ratio:.2f}x** ({c.spread[0]:.2f}-{c.spread[1]:.2f}): "
        f"{c.badge} against {c.plain}"
        for c in comparisons
    ]
    return "\n".join(lines) + "\n"


def as_json(rows: list[Row], comparisons: list[Comparison], args: argparse.Namespace, settings: dict) -> dict:
    """The table as `{"model", ..., "rows": [{"name", "kind", "accuracy", "speedup": {"1": ..., "32": ...}}]}`.

    `speedup` is the wall-clock speedup; `cpu_speedup` the same ratio of CPU times."""

    def per_size(values: dict[int, float]) -> dict[str, float]:
        return {str(b): round(values[b], 4) for b in args.batch_sizes}

    return {
        "model": str(args.model_dir),
        **settings,
        "rows": [
            {
                "name": row.name,
                "kind": row.kind,
                get_task(args.task).metric.name: round(row.metric, 4),
                "mean_exit_layer": round(row.mean_exit_layer, 4),
                "parameters": row.parameters,
                "speedup": per_size(row.speedup["wall"]),
                "cpu_speedup": per_size(row.speedup["cpu"]),
                "speedup_spread": {str(b): [round(x, 4) for x in row.spread["wall"][b]] for b in args.batch_sizes},
                "cpu_speedup_spread": {str(b): [round(x, 4) for x in row.spread["cpu"][b]] for b in args.batch_sizes},
                "seconds": per_size(row.seconds["wall"]),
                "cpu_seconds": per_size(row.seconds["cpu"]),
            }
            for row in rows
        ],
        "best_badge_over_best_plain": [
            {
                "clock": c.clock,
                "batch_size": c.batch_size,
                "ratio": round(c.ratio, 4),
                "spread": [round(x, 4) for x in c.spread],
                "badge": c.badge,
                "plain": c.plain,
            }
            for c in comparisons
        ],
    }


def _loads(loads: tuple[float, float, float]) -> str:
    return " / ".join(f"{load:.1f}" for load in loads)


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
    parser.add_argument("--tau", type=float, default=None, help="threshold of --rule")
    parser.add_argument("--patience", type=int, default=None, help="patience of --rule")
    parser.add_argument("--divergence", default=None, help="divergence of --rule dge")
    parser.add_argument("--heads", type=float, default=0.3, help="share of attention heads to prune")
    parser.add_argument("--pruned", type=Path, default=None, help="an already pruned (and retrained) model folder")
    parser.add_argument("--importance-split", default="validation")
    parser.add_argument("--importance-samples", type=int, default=512)
    parser.add_argument("--work-dir", type=Path, default=None, help="where the ONNX exports go (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-drop", type=float, default=1.0, help="points below the plain model a compared row may be"
    )
    parser.add_argument("--output", type=Path, default=Path("benchmarks/STACK.md"))
    parser.add_argument("--json", type=Path, default=Path("benchmarks/stack.json"))
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error(f"--repeats {args.repeats}: the median needs at least 5 repeats")
    try:  # the same checks as `badge predict --rule`: no --tau without --rule, no oracle
        override = policy_from_options(args.rule, args.tau, args.patience, args.divergence)
    except UsageError as error:
        parser.error(str(error))

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    model = MultiExitModel.from_pretrained(args.model_dir).eval()
    args.task = model.config.problem_type
    policy = override or ExitPolicy.from_dict(model.config.exit_policy)
    splits = load_named_dataset(args.dataset, split_seed=args.seed)
    data = subset(splits[args.split], args.limit, args.seed)
    inputs, labels = encode_padded(data, model.tokenizer, args.max_length)
    inputs["row"] = torch.arange(len(labels))  # follows each example through the length sorting
    pruned, pruned_origin = pruned_model(args, splits)

    load_before = os.getloadavg()  # 1, 5 and 15 minute load averages: how shared the machine was
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work_dir or Path(temporary)
        rows = build_rows(model, policy, pruned, work, max(args.batch_sizes), threads)
        measure_answers(rows, length_sorted_batches(inputs, 32), labels, args.task, model.num_layers)
        for batch_size in args.batch_sizes:
            measure_speed(rows, length_sorted_batches(inputs, batch_size), batch_size, args.repeats)
            print(f"batch {batch_size}: " + ", ".join(f"{r.name} {r.speedup['wall'][batch_size]:.2f}x" for r in rows))
    load_after = os.getloadavg()

    header = [
        f"# The inference stack: {args.model_dir} on {args.dataset} {args.split}",
        "",
        f"Policy `{policy}`; {len(labels)} examples (seed {args.seed}), max length {args.max_length}, "
        f"{model.num_layers} layers. Pruned row: {pruned_origin}.",
        f"Machine: {platform.processor() or platform.machine()}, {threads} threads (torch and ONNX Runtime); "
        f"torch {torch.__version__}, transformers {transformers.__version__}, onnxruntime {onnxruntime.__version__}.",
        f"Speedup = median over {args.repeats} repeats of (plain Hugging Face time / row time), both timed in the "
        "same repeat on the same length-sorted batches, rows alternating within each repeat; spread = lowest and "
        "highest per-repeat ratio; s = median seconds for all examples. `wall` is the wall clock; `cpu` the CPU "
        "time of the process (all threads): on a shared machine the wall clock also counts the wait for a core.",
        f"Load average (1, 5, 15 min) at the start {_loads(load_before)}, at the end {_loads(load_after)}, "
        f"on {os.cpu_count()} cores.",
    ]
    comparisons = compare_best(rows, args.batch_sizes, args.max_drop)
    if not any(
        c.clock == "wall" for c in comparisons
    ):  # no early-exit row is accurate enough: say so, then compare all
        print(f"no early-exit row is within {args.max_drop:g} point(s) of the plain model; comparing all rows")
        args.max_drop = float("inf")
        comparisons = compare_best(rows, args.batch_sizes, args.max_drop)
    table = markdown(rows, comparisons, args, header)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table)
    settings = {
        "dataset": args.dataset,
        "split": args.split,
        "examples": len(labels),
        "seed": args.seed,
        "max_length": args.max_length,
        "threads": threads,
        "policy": policy.to_dict(),
        "repeats": args.repeats,
        "max_drop": args.max_drop if args.max_drop != float("inf") else None,
        "pruned": pruned_origin,
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "cores": os.cpu_count(),
        "load_average": {"start": [round(x, 2) for x in load_before], "end": [round(x, 2) for x in load_after]},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(as_json(rows, comparisons, args, settings), indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
