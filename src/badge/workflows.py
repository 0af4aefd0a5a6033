"""What the `badge` commands do, as functions a Python user can call: load the data or a labelled split, build
and train a model, load a model or an engine, parse an exit policy from its options, report an engine's
early-exit metric.

A problem the caller can fix raises `UsageError` (or `DataError` for the data) with a message naming the bad
value and what was expected; the command line prints it and exits with code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from badge.config import DEFAULT_MAX_SEQ_LENGTH
from badge.data import DATASETS, DataError, TextDataset, load_file, load_splits, make_loader, training_overlap
from badge.device import place
from badge.extras import require
from badge.flops import count_flops
from badge.folders import FolderError
from badge.loading import CheckpointError
from badge.logits import collect_exit_logits
from badge.metrics import exit_table, per_exit_metrics
from badge.modeling import MultiExitModel
from badge.rules import ExitPolicy
from badge.tasks import TASKS, get_task
from badge.training import SCHEMES, TrainingArguments, scheme_model_options, train

console = Console(stderr=True, soft_wrap=True)  # long messages stay on one line in logs


class UsageError(ValueError):
    """A request the caller can correct (an option value, a file, a split); the message names the bad value and
    what was expected."""


def load_data(
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
    """Train / validation / test of the named `dataset` or of the given files (see `badge.data.load_splits`)."""
    if dataset is None and train_file is None:
        raise UsageError(f"give --dataset (one of {sorted(DATASETS)}) or --train FILE")
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
        raise UsageError(str(error)) from error


def run_training(
    encoder: str | Path,
    splits: dict[str, TextDataset],
    args: TrainingArguments,
    model_options: dict,
) -> Path:
    """Build a multi-exit model on `encoder`, train it, print the test per-exit table; return the best folder."""
    train_data = splits["train"]
    problem_type = model_options.pop("problem_type", TASKS[0])
    options = {**scheme_model_options(args.scheme), **model_options}
    try:
        model = MultiExitModel.from_encoder(
            encoder,
            label_names=train_data.label_names or ["value"],
            problem_type=problem_type,
            **options,
        )
    except (CheckpointError, ValueError) as error:
        raise UsageError(str(error)) from error
    max_length_for(model, args.max_length)  # within the encoder's positions, before any work
    pooling = "attention" if model.config.attention_pooling else model.config.pooling
    console.print(
        f"[bold]{encoder}[/]: {model.family}, {model.num_layers} layers, exits after {model.exit_layers}, "
        f"pooling {pooling}, bypass {'on' if model.config.use_bypass else 'off'} "
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
        print_exit_table(best, splits["test"], "test", args.max_length)
    console.print(f"[green]saved[/] the best model to {result.best_dir}")
    return result.best_dir


def print_exit_table(model: MultiExitModel, dataset: TextDataset, split: str, max_length: int) -> None:
    """Print every exit's metrics on a labelled dataset (`split` names it in the title)."""
    loader = make_loader(dataset, model.tokenizer, max_length, 64, shuffle=False)
    logits, labels = collect_exit_logits(model, loader, progress=True)
    metrics = per_exit_metrics(logits, labels, model.config.problem_type)
    console.print(exit_table(model.exit_layers, metrics, title=f"{split} split ({len(dataset)} examples)"))


def max_length_for(model: Any, requested: int | None) -> int:
    """Tokens per text for `model`: `requested`, else what it was trained with (checked for a PyTorch model)."""
    if not isinstance(model, MultiExitModel):  # an ONNX export keeps its own shapes
        if requested is not None and requested < 2:
            raise UsageError(
                f"--max-length {requested} must be an integer >= 2 (tokens per text, special tokens included)"
            )
        return requested or getattr(model.config, "max_seq_length", None) or DEFAULT_MAX_SEQ_LENGTH
    try:
        return model.max_length(requested)
    except ValueError as error:
        raise UsageError(f"--max-length: {error}") from error


def load_model(model_dir: Path, device: str | None = None, dtype: str | None = None) -> MultiExitModel:
    """A saved model folder, placed on `device` in `dtype`, with its tokenizer."""
    try:
        model = place(MultiExitModel.from_pretrained(model_dir), device, dtype)
    except (CheckpointError, FolderError, ValueError) as error:
        raise UsageError(str(error)) from error
    require_tokenizer(model, model_dir)
    return model


def require_tokenizer(model: Any, model_dir: Path) -> None:
    """Refuse a model folder without tokenizer files: nothing can be tokenised for it."""
    if getattr(model, "tokenizer", None) is None:
        raise UsageError(
            f"{model_dir} has no tokenizer files (tokenizer.json, vocab.txt ...); copy the encoder's into it"
        )


def labelled_split(
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
                label_names=model.label_names if get_task(task).has_classes else None,
                task=task,
            )
        except DataError as error:
            raise UsageError(str(error)) from error
        chosen, name = loaded, str(data)
    else:
        splits = load_data(dataset, None, None, None, text_column, text_pair_column, label_column, task, split_seed)
        if split not in splits:
            raise UsageError(f"split {split!r} is not one of {sorted(splits)}")
        chosen, name = splits[split], f"{dataset} {split}"
    overlap = training_overlap(getattr(model.config, "training_data", None), chosen)
    if overlap is not None:
        raise UsageError(f"refusing to score {name}: {overlap}")
    return chosen, name


def engine_report(
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
    from badge.quantize import check_mode, quantize_torch

    try:
        check_mode(quantize)
    except ValueError as error:
        raise UsageError(str(error)) from error
    if quantize is not None and engine_name == "onnx":
        raise UsageError("--quantize applies to the torch engine; for ONNX use badge export --quantize")
    engine = load_engine(model_dir, engine_name, None, batch_size)
    variants = [(engine_name, engine)]
    if quantize is not None:
        variants.append(
            (f"torch {quantize}", EarlyExitEngine(quantize_torch(engine.model, quantize), batch_size=batch_size))
        )
    evaluated, name = labelled_split(
        engine.model, dataset, split, data, text_column, text_pair_column, label_column, split_seed
    )
    inputs, labels = encode_padded(evaluated, engine.model.tokenizer, max_length_for(engine.model, max_length))
    task = engine.model.config.problem_type
    metric = get_task(task).metric
    table = Table(title=f"{model_dir} on {name}, policy {engine.policy}")
    for column in ("engine", metric.name, "mean exit layer", "layer speedup"):
        table.add_column(column, justify="right")
    for label, variant in variants:
        out = variant.run(inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids"))
        mean_layer = out.exit_layers.float().mean().item()
        score = metric.compute(out.logits, labels)
        table.add_row(label, f"{score:.2f}", f"{mean_layer:.2f}", f"{variant.model.num_layers / mean_layer:.2f}x")
    console.print(table)


def policy_from_options(
    rule: str | None, tau: float | None, patience: int | None, divergence: str | None
) -> ExitPolicy | None:
    """The exit policy that the options `rule`, `tau`, `patience` and `divergence` describe, or None when no
    `rule` is given (use the stored policy). Refuses settings without a rule and rules that need the true labels."""
    if rule is None:
        if any(value is not None for value in (tau, patience, divergence)):
            raise UsageError("--tau, --patience and --divergence need --rule")
        return None
    try:
        policy = ExitPolicy(rule=rule, tau=tau, patience=patience, divergence=divergence)
    except ValueError as error:
        raise UsageError(str(error)) from error
    refuse_label_rules(policy)
    return policy


def refuse_label_rules(policy: ExitPolicy) -> None:
    """Refuse a policy whose rule needs the true labels (`oracle`): an analysis bound, not a policy to deploy."""
    if policy.needs_labels:
        raise UsageError(f"rule {policy.rule!r} needs the true labels: it is an analysis bound, not a policy to deploy")


def load_engine(
    path: Path, engine: str, policy: ExitPolicy | None, batch_size: int, device: str = "auto", dtype: str = "float32"
):
    """An early-exit engine over a saved model folder (`engine="torch"`) or an ONNX export (`"onnx"`), with
    `policy` (None: the stored one) and at most `batch_size` rows per layer call."""
    from badge.engine import EarlyExitEngine

    if engine not in ("torch", "onnx"):
        raise UsageError(f"--engine {engine!r} is not one of torch, onnx")
    try:
        if engine == "torch":  # needs no ONNX Runtime
            model = MultiExitModel.from_pretrained(path)
            loaded = EarlyExitEngine(model, policy, batch_size, device=device, dtype=dtype)
        else:
            require("onnx", "--engine onnx")
            if device == "cuda" or dtype != "float32":
                raise UsageError("--engine onnx runs in float32 on the CPU: leave out --device/--dtype")
            from badge.onnx_engine import load_engine

            loaded = load_engine(path, engine, policy, batch_size)
    except (CheckpointError, ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from error
    require_tokenizer(loaded.model, path)
    return loaded
