"""`badge predict` and `badge serve`: run a saved model on a file or over HTTP, alone or on a Ray cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from badge.cli.common import (
    DeviceOption,
    DivergenceOption,
    DtypeOption,
    EngineOption,
    MaxLengthOption,
    PairColumn,
    PatienceOption,
    RayAddressOption,
    RuleOption,
    TauOption,
    TextColumn,
    ThreadsOption,
    command,
    fail,
    require_extra,
)
from badge.data import DataError
from badge.workflows import console, load_engine, max_length_for, policy_from_options, refuse_label_rules


@command("predict")
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
    policy = policy_from_options(rule, tau, patience, divergence)
    if ray:
        from badge.distributed import import_ray, predict_on_ray

        if policy is not None:
            refuse_label_rules(policy)

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
            raise fail(str(error)) from error
        rows, errors = sum(s.rows for s in summaries), sum(s.errors for s in summaries)
        console.print(
            f"wrote {rows} rows of {len(summaries)} file(s) to {target} on Ray with {workers} workers"
            + (f"; [yellow]{errors} rows had no text[/] (see their error column)" if errors else "")
        )
        return
    from badge.predict import check_output, partial_path, predict_file

    if not source.is_file():
        raise fail(f"input file {source} does not exist" + (" (a folder needs --ray)" if source.is_dir() else ""))
    try:
        check_output(source, target)
    except DataError as error:
        raise fail(str(error)) from error
    if threads is not None:
        if threads < 1:
            raise fail(f"--threads {threads} must be >= 1")
        import torch

        torch.set_num_threads(threads)
    engine = load_engine(model_dir, engine_name, policy, batch_size, device, dtype)
    refuse_label_rules(engine.policy)
    model = engine.model
    max_length = max_length_for(model, max_length)
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
        raise fail(str(error)) from error
    except KeyboardInterrupt:
        console.print(f"interrupted: the rows so far are in {partial_path(target)}; add --resume to continue")
        raise typer.Exit(code=130) from None
    console.print(
        f"wrote {summary.rows} rows to {target} with policy {engine.policy}: mean exit layer "
        f"{summary.mean_exit_layer:.2f} of {model.num_layers}"
        + (f"; [yellow]{summary.errors} rows could not be read[/] (see their error column)" if summary.errors else "")
    )


@command("serve")
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
    require_extra("serve", "badge serve")
    from badge.serve import run_server

    if threads is not None and threads < 1:
        raise fail(f"--threads {threads} must be >= 1")
    if max_queue is not None and max_queue < 1:
        raise fail(f"--max-queue {max_queue} must be >= 1 (or leave it out to derive it from the latency target)")
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
    policy = policy_from_options(rule, tau, patience, divergence)
    if ray:
        from badge.distributed import import_ray, serve_on_ray

        if engine_name != "torch" or policy is not None:
            raise fail(
                "--ray serves the folder as saved (an ONNX export runs on ONNX Runtime) with its stored policy: "
                "leave out --engine and --rule (`badge calibrate` stores a policy)"
            )
        try:
            import_ray()
            serve_on_ray(
                model_dir, replicas=replicas, host=host, port=port, threads=threads or 1, address=ray_address, **options
            )
        except (RuntimeError, ValueError, FileNotFoundError) as error:
            raise fail(str(error)) from error
        return
    model = load_engine(model_dir, engine_name, None, max_batch_size, device, dtype).model
    options["max_length"] = max_length_for(model, max_length)
    if policy is not None:
        model.config.exit_policy = policy.to_dict()  # the default for requests that name no policy
    run_server(model, host=host, port=port, threads=threads, **options)
