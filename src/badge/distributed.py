"""Scale out on Ray (the optional extra `pip install 'badge[ray]'`): Ray Serve replicas and Ray Data prediction.

Serving (`serve_on_ray`): each Ray Serve replica runs the very app of `badge serve` (`create_app`), so
the HTTP API, limits, metrics and admission control are the same. Ray's HTTP proxy spreads requests
over the replicas; each replica gathers its own share into engine batches with our `MicroBatcher`,
not Ray Serve's `@serve.batch`: ours groups texts by exit policy (one engine call per policy), drops
requests whose deadline passed before they take a place in a batch, and refuses work beyond a
bounded queue with 503 + Retry-After. `@serve.batch` does none of these, and the replica would then
serve a different API from the single-process server. Ray restarts a replica whose batching loop
died (`check_health`).

Prediction (`predict_on_ray`): Ray Data reads each input file with the same reader as `badge predict`
(so rows, numbers and bad-row errors are the same), in the same chunks; a pool of workers, each
holding one early-exit engine, classifies the chunks; the driver writes the records in input order.

Ray is imported only inside these functions: the rest of BADGE never needs it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from badge.predict import PREDICTABLE_SUFFIXES, PredictionSummary, PredictionWriter, predict_chunk, read_chunks
from badge.rules import ExitPolicy

DEPLOYMENT_NAME = "badge"


def import_ray() -> Any:
    """The `ray` module, or a clear error naming the extra to install."""
    try:
        import ray
    except ModuleNotFoundError as error:
        raise RuntimeError("Ray is not installed: pip install 'badge[ray]' (ray[serve,data])") from error
    return ray


def connect(address: str | None = None) -> None:
    """Join the Ray cluster at `address` (or $RAY_ADDRESS, or a `ray start` cluster on this machine), else start one."""
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)


# ----- serving -------------------------------------------------------------------------------
def replica_class() -> type:
    """The Ray Serve replica: the `create_app` FastAPI app with its own micro-batcher, one per replica."""
    from ray import serve

    class BadgeReplica:
        """One copy of the model behind Ray's HTTP proxy."""

        def __init__(self, model_dir: str, threads: int | None, app_options: dict[str, Any]) -> None:
            import torch

            from badge.serve import create_app

            if threads is not None:
                torch.set_num_threads(threads)
            self.badge_app = create_app(model_dir, **app_options)

        def __serve_build_asgi_app__(self) -> Any:
            return self.badge_app

        def check_health(self) -> None:
            """Ray Serve calls this periodically; raising makes Ray replace the replica."""
            if not self.badge_app.state.batcher.alive:
                raise RuntimeError("the batching loop of this replica stopped")

    return serve.ingress()(BadgeReplica)


def deployment(
    model_dir: str | os.PathLike,
    *,
    replicas: int = 1,
    threads: int | None = 1,
    max_ongoing_requests: int = 512,
    **app_options: Any,
) -> Any:
    """The bound Ray Serve application: `replicas` copies of the `create_app` app (see `serve_on_ray`)."""
    if replicas < 1 or (threads is not None and threads < 1) or max_ongoing_requests < 1:
        raise ValueError(
            f"replicas {replicas}, threads {threads} and max_ongoing_requests {max_ongoing_requests} must be >= 1"
        )
    from ray import serve

    replica = serve.deployment(
        replica_class(),
        name=DEPLOYMENT_NAME,
        num_replicas=replicas,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": threads or 1},
        health_check_period_s=5,
    )
    return replica.bind(str(model_dir), threads, app_options)


def build_app(args: dict[str, Any]) -> Any:
    """Application builder for `serve run` and KubeRay's RayService: `import_path: badge.distributed:build_app`.

    `args` holds `model_dir` and any keyword of `deployment` (replicas, threads, max_batch_size, ...).
    """
    options = dict(args)
    if "model_dir" not in options:
        raise ValueError(f"args {sorted(options)} lack model_dir: the model folder every node can read")
    return deployment(options.pop("model_dir"), **options)


def serve_on_ray(
    model_dir: str | os.PathLike,
    *,
    replicas: int = 1,
    host: str = "127.0.0.1",
    port: int = 8000,
    threads: int | None = 1,
    max_ongoing_requests: int = 512,
    address: str | None = None,
    blocking: bool = True,
    **app_options: Any,
) -> None:
    """Serve the model with Ray Serve: `replicas` copies behind one HTTP address, the same API as `badge serve`.

    Args:
        model_dir: a saved model folder (or ONNX export) readable at this path on every node of the cluster.
        replicas: copies of the model; Ray places them on the cluster's nodes (each needs `threads` CPUs).
        host, port: where Ray's HTTP proxy listens (on every node that runs one).
        threads: torch threads per replica, also the CPUs Ray reserves for it.
        max_ongoing_requests: requests Ray hands one replica at once; above the replica's own queue
            bound, so the replica's admission control (503 + Retry-After) decides, not Ray's queue.
        address: the Ray cluster to join (None: $RAY_ADDRESS, a local `ray start` cluster, or a new local one).
        blocking: serve until SIGINT or SIGTERM, then delete the deployment; False returns once it is up.
        app_options: options of `badge.serve.create_app` (max_batch_size, max_queue, request_timeout_s, ...).
    """
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model folder {model_dir} does not exist")
    app = deployment(
        Path(model_dir).resolve(),
        replicas=replicas,
        threads=threads,
        max_ongoing_requests=max_ongoing_requests,
        **app_options,
    )
    connect(address)
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=DEPLOYMENT_NAME, route_prefix="/")
    if not blocking:
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # a container stop ends the deployment like Ctrl-C
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        serve.delete(DEPLOYMENT_NAME)


# ----- batch prediction ----------------------------------------------------------------------
def input_files(source: Path) -> list[Path]:
    """`source` itself, or the predictable files directly inside the folder `source`, sorted by name."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"input {source} is neither a file nor a folder")
    files = sorted(path for path in source.iterdir() if path.is_file() and path.suffix.lower() in PREDICTABLE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"folder {source} holds no {', '.join(PREDICTABLE_SUFFIXES)} file")
    return files


def output_files(source: Path, target: Path, files: list[Path]) -> list[Path]:
    """Where each input's predictions go: `target` for one file; for a folder, `target/NAME.csv` or `.jsonl`."""
    if source.is_file():
        return [target]
    return [
        target / (path.stem + (".jsonl" if path.suffix.lower() in (".jsonl", ".json") else ".csv")) for path in files
    ]


def _read_file(batch: dict[str, Any], text_column: str, text_pair_column: str | None, batch_size: int) -> Any:
    """Ray Data task: one input file (a batch of one row) -> its chunks, a few at a time, in order."""
    file_index, path = int(batch["file"][0]), Path(str(batch["path"][0]))
    files, chunks = [], []
    for chunk in read_chunks(path, text_column=text_column, text_pair_column=text_pair_column, batch_size=batch_size):
        files.append(file_index)
        chunks.append(json.dumps(chunk))  # JSON keeps every value as read (None, numbers), whatever Arrow would infer
        if len(chunks) == 16:
            yield {"file": files, "chunk": chunks}
            files, chunks = [], []
    if chunks:
        yield {"file": files, "chunk": chunks}


class _ChunkPredictor:
    """Ray Data actor: holds one early-exit engine and turns chunks into output records (as JSON lines)."""

    def __init__(
        self,
        model_dir: str,
        engine: str,
        policy: dict[str, Any] | None,
        batch_size: int,
        threads: int | None,
        text_column: str,
        with_pairs: bool,
        max_length: int | None,
    ) -> None:
        from badge.onnx_engine import load_engine

        policy_object = ExitPolicy.from_dict(policy) if policy is not None else None
        self.engine = load_engine(model_dir, engine, policy_object, batch_size, num_threads=threads)
        self.options = {"with_pairs": with_pairs, "max_length": max_length}

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        files, records = [], []
        for file_index, chunk in zip(batch["file"], batch["chunk"], strict=True):
            rows = [tuple(row) for row in json.loads(str(chunk))]
            for record in predict_chunk(self.engine, rows, **self.options):
                files.append(int(file_index))
                records.append(json.dumps(record))
        return {"file": files, "record": records}


def predict_on_ray(
    model_dir: str | os.PathLike,
    source: Path,
    target: Path,
    *,
    engine: str = "torch",
    policy: ExitPolicy | None = None,
    text_column: str = "text",
    text_pair_column: str | None = None,
    batch_size: int = 32,
    chunk_size: int = 256,
    max_length: int | None = None,
    workers: int = 2,
    threads: int = 1,
    address: str | None = None,
) -> list[PredictionSummary]:
    """Classify a file, or every file of a folder, with Ray Data; the output rows equal `predict_file`'s.

    Args:
        model_dir: a saved model folder (or ONNX export) readable at this path on every node.
        source: a .csv/.tsv/.jsonl file, or a folder of them (readable on every node).
        target: the output file (.csv or .jsonl) for a file; for a folder, a folder that gets
            `NAME.csv` (or `NAME.jsonl` for JSON Lines inputs) per input file.
        engine, policy, batch_size, max_length: as for `badge predict` (`chunk_size` rows per engine call
            = its `--batch-size` x 8, so the engine sees the same inputs and gives the same answers).
        workers: engine copies (Ray actors), each with `threads` torch threads and as many CPUs reserved.
        address: the Ray cluster to join (None: $RAY_ADDRESS, a local `ray start` cluster, or a new local one).
    Returns:
        One `PredictionSummary` per input file, in the order of `input_files(source)`.
    """
    if min(workers, threads, batch_size, chunk_size, 1 if max_length is None else max_length) < 1:
        raise ValueError(
            f"workers {workers}, threads {threads}, batch_size {batch_size}, chunk_size {chunk_size} "
            f"and max_length {max_length} must be >= 1"
        )
    files = input_files(Path(source))
    targets = output_files(Path(source), Path(target), files)
    for path in files:  # a file that cannot be read at all (empty, bad header) is refused before any work
        next(read_chunks(path, text_column=text_column, text_pair_column=text_pair_column, batch_size=1), None)
    connect(address)
    import ray

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows come back in input order
    context.enable_progress_bars = False
    items = [{"file": index, "path": str(path.resolve())} for index, path in enumerate(files)]
    records = (
        ray.data.from_items(items)
        .map_batches(
            _read_file,
            batch_size=1,
            fn_kwargs={"text_column": text_column, "text_pair_column": text_pair_column, "batch_size": chunk_size},
        )
        .map_batches(
            _ChunkPredictor,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=threads,
            fn_constructor_kwargs={
                "model_dir": str(Path(model_dir).resolve()),
                "engine": engine,
                "policy": policy.to_dict() if policy is not None else None,
                "batch_size": batch_size,
                "threads": threads,
                "text_column": text_column,
                "with_pairs": bool(text_pair_column),
                "max_length": max_length,
            },
        )
    )
    summaries: list[PredictionSummary] = []
    writer: PredictionWriter | None = None
    try:
        for row in records.iter_rows():
            file_index = int(row["file"])
            while writer is None or len(summaries) < file_index:  # files without rows still get an output
                if writer is not None:
                    summaries.append(writer.close())
                writer = PredictionWriter(targets[len(summaries)])
            writer.write(json.loads(row["record"]))
        while len(summaries) < len(files):
            if writer is None:
                writer = PredictionWriter(targets[len(summaries)])
            summaries.append(writer.close())
            writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return summaries
