"""`badge train`: train a multi-exit model on an encoder checkpoint and your data."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from badge.cli.common import (
    DatasetOption,
    DeviceOption,
    LabelColumn,
    PairColumn,
    SplitSeedOption,
    TestOption,
    TextColumn,
    TrainOption,
    ValidationOption,
    command,
    fail,
    refuse_run_folder,
)
from badge.config import TASKS
from badge.data import sample
from badge.encoders import ENCODERS, resolve_encoder
from badge.training import DEFAULT_SCHEME, SCHEMES, TrainingArguments, scheme_model_options
from badge.workflows import load_data, run_training

Scheme = Enum("Scheme", {name: name for name in SCHEMES}, type=str)
DEFAULT = Scheme(DEFAULT_SCHEME)


Task = Enum("Task", {name: name for name in TASKS}, type=str)


def _parse_layers(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError as error:
        raise fail(f"--exit-layers {value!r} must be comma-separated layer numbers, as in 2,4,6") from error


@command("train")
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
    scheme: Annotated[Scheme, typer.Option(help="training scheme")] = DEFAULT,
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
    attention_pooling: Annotated[
        bool, typer.Option("--attention-pooling", help="each exit pools the tokens with its own learned weights")
    ] = False,
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
    refuse_run_folder(output, resume, overwrite)
    splits = load_data(
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
        if attention_pooling:
            options["attention_pooling"] = True
        run_training(resolve_encoder(encoder), splits, args, options)
    except (ValueError, FileNotFoundError) as error:
        raise fail(str(error)) from error
