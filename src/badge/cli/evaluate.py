"""`badge evaluate`, `calibrate`, `export` and `prune`: commands on a saved model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from badge.calibration import calibrate_and_store
from badge.cli.common import (
    DataOption,
    DatasetOption,
    DeviceOption,
    DtypeOption,
    EngineOption,
    LabelColumn,
    MaxLengthOption,
    PairColumn,
    SplitOption,
    SplitSeedOption,
    TextColumn,
    TrainOption,
    command,
    fail,
    refuse_target,
    require_extra,
)
from badge.loading import CheckpointError
from badge.modeling import MultiExitModel
from badge.tasks import get_task
from badge.training import TrainingArguments, train
from badge.workflows import (
    console,
    engine_report,
    labelled_split,
    load_data,
    load_model,
    max_length_for,
    print_exit_table,
)

# how the two --quantize modes differ (badge.quantize), for evaluate and export
QUANTIZE_MODES_HELP = (
    "(int8-mixed keeps each FFN output projection in float: slower than int8, far closer to the float model)"
)

# Entropy: at matched speedups in benchmarks/RESULTS.md it is level with max-prob on MiniLM-L6 and level with or ahead
# of the strongest other baseline on MPNet-12, where the gate's validation-chosen settings fell 0.9-1.3 points behind.
# Tasks it does not apply to (regression) fall back to dge.
CALIBRATE_RULE = "entropy"
CALIBRATE_FALLBACKS = ("dge",)


def calibrate_rule_for(task: str) -> str:
    """The rule `badge calibrate` uses when none is given: entropy, or the first fallback the task allows."""
    allowed = [rule for rule in (CALIBRATE_RULE, *CALIBRATE_FALLBACKS) if get_task(task).allows(rule)]
    return allowed[0]


@command("evaluate")
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
    quantize: Annotated[
        str | None,
        typer.Option(
            help=f"int8 or int8-mixed: also run the torch model with int8 linear layers {QUANTIZE_MODES_HELP}"
        ),
    ] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
) -> None:
    """Print every exit's metrics on a labelled split; with --sweep, the trade-off of every exit rule.

    With --engine onnx or --quantize int8, report the early-exit metric of the stored policy instead
    (for --quantize, next to the float model's)."""
    if engine_name == "onnx" or quantize is not None:
        if device == "cuda" or dtype != "float32":
            raise fail("--engine onnx and --quantize int8 run in float32 on the CPU: leave out --device/--dtype")
        engine_report(
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
    model = load_model(model_dir, device, dtype)
    max_length = max_length_for(model, max_length)
    columns = (text_column, text_pair_column, label_column, split_seed)
    evaluated = labelled_split(model, dataset, split, data, *columns)
    if not sweep:
        print_exit_table(model, *evaluated, max_length)
        return
    from badge.extras import missing
    from badge.report import write_sweep
    from badge.sweep import run_sweep

    if data is not None:  # a file: settings are chosen on --validation-data, else on the file itself (said so)
        chosen_on = labelled_split(model, None, "", validation_data, *columns) if validation_data else None
    else:
        if split == "validation":
            raise fail("--sweep chooses settings on the validation split; report on another --split (test)")
        chosen_on = labelled_split(model, dataset, "validation", None, *columns)
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
        raise fail(str(error)) from error
    folder = output_dir or model_dir / "sweep"
    paths = write_sweep(result, folder, title=f"{model_dir.name}: exit rules on {evaluated[1]}")
    console.print(paths["markdown"].read_text().split("\n\nEvery setting on")[0])
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")
    if missing("plots"):
        console.print(escape("no sweep.png: the plot needs pip install 'badge[plots]'"), style="yellow")


@command("export")
def export_command(
    model_dir: Annotated[Path, typer.Argument(help="a saved BADGE model folder")],
    out_dir: Annotated[Path, typer.Argument(help="folder for the ONNX graphs and manifest.json")],
    format: Annotated[str, typer.Option("--format", help="export format (onnx)")] = "onnx",
    quantize: Annotated[
        str | None,
        typer.Option(help=f"int8 or int8-mixed: dynamic int8 quantisation of the layers {QUANTIZE_MODES_HELP}"),
    ] = None,
) -> None:
    """Export as separate ONNX graphs (embeddings, each layer, each exit) that the ONNX engine runs layer by layer."""
    require_extra("onnx", "badge export")
    from badge.onnx_engine import export_onnx

    if format != "onnx":
        raise fail(f"--format {format!r}: only onnx is supported")
    refuse_target(out_dir, "onnx export", model_dir)
    try:
        folder = export_onnx(model_dir, out_dir, quantize=quantize)
    except (CheckpointError, ValueError) as error:
        raise fail(str(error)) from error
    console.print(f"[green]exported[/] {model_dir} to {folder}; run it with --engine onnx")


@command("prune")
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
        raise fail(f"--heads {heads} must lie strictly between 0 and 1")
    refuse_target(out_dir, "model", model_dir)
    model = load_model(model_dir)
    max_length = max_length_for(model, max_length)
    columns = (text_column, text_pair_column, label_column, split_seed)
    importance = None
    if dataset or validation:
        tuning, name = labelled_split(model, dataset, "validation", validation, *columns)
        console.print(f"scoring head importance on {name} ({len(tuning)} examples)")
        importance = head_importance(model, tuning, max_length=max_length)
    else:
        console.print("[yellow]no --dataset/--validation: ranking heads by weight norm instead of gradients[/]")
    before = sum(p.numel() for p in model.parameters())
    try:
        prune_heads(model, heads, importance)
    except ValueError as error:
        raise fail(str(error)) from error
    after = sum(p.numel() for p in model.parameters())
    console.print(f"kept heads per layer: {model.config.heads_kept}; parameters {before:,} -> {after:,}")
    if retrain_epochs > 0:
        splits = load_data(
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


@command("calibrate")
def calibrate_command(
    model_dir: Annotated[Path, typer.Argument(help="a saved BADGE model folder; its exit policy is updated")],
    rule: Annotated[
        str | None,
        typer.Option(
            help=f"exit rule (gate, entropy, dge, ...) or a dge curve such as dge-kl [default: {CALIBRATE_RULE}, "
            f"or {' then '.join(CALIBRATE_FALLBACKS)} for tasks it does not apply to]",
            show_default=False,
        ),
    ] = None,
    max_drop: Annotated[
        float | None,
        typer.Option(
            help="largest metric drop allowed, in points: the fastest setting whose one-sided 95 % upper bound "
            "on its drop below the full model (paired over the validation texts) stays within it"
        ),
    ] = None,
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
        raise fail("give exactly one target: --max-drop POINTS or --speedup X")
    if rule is not None and rule.split("-")[0] == "oracle":
        raise fail("rule 'oracle' needs the true labels: it is an analysis bound, not a policy to deploy")
    model = load_model(model_dir, device, dtype)
    rule = rule or calibrate_rule_for(model.config.problem_type)
    max_length = max_length_for(model, max_length)
    columns = (text_column, text_pair_column, label_column, split_seed)
    tuning = labelled_split(model, dataset, "validation", validation, *columns)
    held_out = labelled_split(model, dataset, "test", test, *columns) if test or dataset else None
    calibrate_and_store(model, model_dir, tuning, held_out, rule, max_drop, speedup, max_length, dry_run)
