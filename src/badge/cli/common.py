"""What every `badge` command shares: the typer app, error handling, the options several commands take."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from badge.data import DATASETS, DataError
from badge.device import DEVICES, DTYPES
from badge.extras import MissingExtra, require
from badge.folders import FolderError, check_target
from badge.training import check_run_folder
from badge.workflows import UsageError, console

app = typer.Typer(
    help="BADGE: early-exit BERT-family encoders with block-wise bypasses and divergence-based exiting.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str) -> typer.Exit:
    """Print `message` as an error; raise the returned exit (code 2) to end the command."""
    console.print(f"[bold red]error:[/] {escape(message)}")  # messages hold brackets: badge[serve], [1, 2]
    return typer.Exit(code=2)


def command(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a `badge` subcommand; the errors a user can cause (`UsageError`, `DataError`, `MissingExtra`)
    end it with their message and exit code 2 instead of a stack trace."""

    def register(function: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> None:
            try:
                function(*args, **kwargs)
            except (UsageError, DataError, MissingExtra) as error:
                raise fail(str(error)) from error

        return app.command(name)(run)

    return register


MaxLengthOption = Annotated[int | None, typer.Option(help="tokens per text (default: what the model was trained with)")]


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


def refuse_run_folder(output: Path, resume: bool, overwrite: bool) -> None:
    """Refuse, before any work, a run folder that holds another run (unless --resume or --overwrite)."""
    try:
        check_run_folder(output, resume, overwrite)
    except ValueError as error:
        raise fail(str(error)) from error


SplitOption = Annotated[str, typer.Option(help="split of --dataset to use")]
DataOption = Annotated[Path | None, typer.Option(help="a labelled file to use instead of --dataset")]


def refuse_target(out_dir: Path, kind: str, model_dir: Path) -> None:
    """Refuse, before any work, an output folder that is the source or holds something else (`badge.folders`)."""
    try:
        check_target(out_dir, kind, [model_dir])
    except FolderError as error:
        raise fail(str(error)) from error


RuleOption = Annotated[str | None, typer.Option(help="exit rule overriding the model's stored policy")]
EngineOption = Annotated[
    str, typer.Option("--engine", help="torch (a saved model folder) or onnx (a folder written by badge export)")
]


def require_extra(extra: str, purpose: str) -> None:
    """Refuse a command whose optional dependencies are missing, naming the extra that brings them."""
    try:
        require(extra, purpose)
    except MissingExtra as error:
        raise fail(str(error)) from error


TauOption = Annotated[float | None, typer.Option(help="threshold of --rule")]
PatienceOption = Annotated[int | None, typer.Option(help="patience of --rule")]
DivergenceOption = Annotated[str | None, typer.Option(help="divergence of --rule dge: jsd, kl, rkl, skl, xjsd")]


RayAddressOption = Annotated[
    str | None, typer.Option(help="Ray cluster to join with --ray (default: $RAY_ADDRESS, a local `ray start`, or new)")
]
ThreadsOption = Annotated[int | None, typer.Option(help="torch threads (per replica / worker with --ray)")]
