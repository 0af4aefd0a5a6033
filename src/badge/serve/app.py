"""The HTTP app of `badge serve`: `create_app` wires the model, the `MicroBatcher`, the middleware and the
endpoints; `run_server` runs it with uvicorn."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from badge import __version__
from badge.engine import EarlyExitEngine, EngineOutput
from badge.modeling import MultiExitModel
from badge.rules import ExitPolicy, PolicyError, names
from badge.serve.batcher import BatcherStopped, DeadlineExceeded, MicroBatcher, Overloaded, derive_max_queue
from badge.serve.middleware import AdmissionMiddleware, BodyLimitMiddleware, MetricsMiddleware, ServeMetrics
from badge.serve.schemas import ClassifyRequest, ClassifyResponse, ModelInfo, PolicySettings, Prediction
from badge.tasks import get_task

logger = logging.getLogger(__name__)


def _invalid(location: list[str | int], message: str) -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors, naming the bad field."""
    return HTTPException(422, detail=[{"loc": ["body", *location], "msg": message, "type": "value_error"}])


def _check_texts(name: str, values: str | list[str], max_texts: int, max_chars: int) -> list[str]:
    """The texts of field `name` as a list, or a 422 naming the first bad one."""
    texts = [values] if isinstance(values, str) else values
    if not texts:
        raise _invalid([name], f"{name} is empty: give at least one text")
    if len(texts) > max_texts:
        raise _invalid([name], f"{name} has {len(texts)} texts; the limit is {max_texts} per request")
    for index, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise _invalid(
                [name, index],
                f"{name}[{index}] holds a lone surrogate at character {error.start}; expected Unicode text",
            ) from None
        if not text.strip():
            raise _invalid([name, index], f"{name}[{index}] is empty or only whitespace")
        if len(text) > max_chars:
            raise _invalid([name, index], f"{name}[{index}] has {len(text)} characters; the limit is {max_chars}")
    return texts


def _json_safe(value: Any) -> Any:
    """`value` with NaN and infinities written as strings, so that an error echoing them is valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


async def _validation_error(request: Any, error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 for an invalid body, also when the body held NaN or Infinity (which JSON cannot echo)."""
    return JSONResponse({"detail": _json_safe(jsonable_encoder(error.errors()))}, status_code=422)


def _check_servable(policy: ExitPolicy, model: MultiExitModel) -> None:
    """Raise PolicyError for a policy the server cannot run: one needing labels, or one unfit for the task."""
    if policy.needs_labels:
        raise PolicyError(f"rule {policy.rule!r} needs the true labels: it is for analysis, not serving")
    policy.build(model.config.problem_type, model.exit_layers)


def _prediction(output: EngineOutput, row: int, label_names: list[str], task: str) -> Prediction:
    exit_layer = int(output.exit_layers[row])
    strategy = get_task(task)
    predicted = output.labels[row]
    label = strategy.label_of(predicted, label_names)
    if not strategy.has_classes:
        return Prediction(label=label, label_id=None, probabilities=None, exit_layer=exit_layer)
    probabilities = {name: float(p) for name, p in zip(label_names, output.probs[row].tolist(), strict=True)}
    return Prediction(label=label, label_id=predicted, probabilities=probabilities, exit_layer=exit_layer)


def _load_servable(model_dir_or_model: str | os.PathLike | MultiExitModel):
    """A loaded model, a saved model folder, or an ONNX export folder (served by ONNX Runtime)."""
    if not isinstance(model_dir_or_model, (str, os.PathLike)):
        return model_dir_or_model.eval()
    from badge.onnx_engine import OnnxMultiExitModel, is_onnx_export

    if is_onnx_export(model_dir_or_model):
        return OnnxMultiExitModel(model_dir_or_model)
    return MultiExitModel.from_pretrained(model_dir_or_model).eval()


WARMUP_TEXT = "a plain sentence of ordinary length, classified once to time one full batch before serving"


def create_app(
    model_dir_or_model: str | os.PathLike | MultiExitModel,
    *,
    max_batch_size: int = 32,
    max_wait_ms: float = 5,
    max_queue: int | None = None,
    latency_target_ms: float = 500,
    max_texts: int = 64,
    max_chars: int = 2000,
    max_body_bytes: int = 1_000_000,
    body_timeout_s: float = 10.0,
    request_timeout_s: float = 30.0,
    max_length: int | None = None,
    allowed_rules: list[str] | None = None,
    force_policy: ExitPolicy | None = None,
    freeze_gc: bool = True,
) -> FastAPI:
    """Build the HTTP app around a saved model folder (or a loaded `MultiExitModel` with a tokenizer).

    Args:
        model_dir_or_model: a saved BADGE model folder, an ONNX export folder (`badge export`), or a
            loaded model (`MultiExitModel` or `OnnxMultiExitModel`) whose `tokenizer` is set.
        max_batch_size: texts gathered into one engine call (also the engine's rows per layer call).
        max_wait_ms: how long a request waits for others to share its batch.
        max_queue: most texts waiting for the model; a request beyond it gets a 503 with Retry-After at
            once. None derives it at startup from `max_batch_size` and `latency_target_ms`, by timing
            one full batch through every layer (`derive_max_queue`).
        latency_target_ms: the latency an accepted request should stay under (sets the default `max_queue`).
        max_texts: most texts in one request (more: 422).
        max_chars: most characters in one text (more: 422).
        max_body_bytes: largest request body (more: 413).
        body_timeout_s: a request body not fully arrived after this gets a 408.
        request_timeout_s: a request not answered in time gets a 504; one still queued then is dropped
            before the model runs it. Also how long shutdown waits for accepted requests.
        max_length: tokens per text (longer texts are truncated); None = what the model was trained with.
        allowed_rules: exit rules a request may choose; None = every rule but `oracle`. The server's
            own default policy is always allowed.
        force_policy: run every request with this policy instead of the model's default; a request
            that names a policy then gets a 422.
        freeze_gc: at startup, after the model is loaded and warm, move every object alive to the garbage
            collector's permanent generation (`gc.freeze`, undone at shutdown). Python's full collections
            then skip them; walking the model, torch and the web stack stalled every request for about
            200 ms each time one ran under load.
    Returns:
        The FastAPI app; the batcher starts with the app's lifespan (uvicorn, or `with TestClient(app)`).
        `app.state.batcher` is its `MicroBatcher`.
    """
    if min(max_batch_size, max_texts, max_chars, max_body_bytes, 1 if max_length is None else max_length) < 1:
        raise ValueError("max_batch_size, max_texts, max_chars, max_body_bytes and max_length must be >= 1")
    if max_queue is not None and max_queue < 1:
        raise ValueError(f"max_queue {max_queue} must be >= 1 (or None to derive it from latency_target_ms)")
    if max_wait_ms < 0 or min(request_timeout_s, body_timeout_s, latency_target_ms) <= 0:
        raise ValueError(
            f"max_wait_ms {max_wait_ms} must be >= 0; request_timeout_s {request_timeout_s}, "
            f"body_timeout_s {body_timeout_s} and latency_target_ms {latency_target_ms} must be > 0"
        )
    model = _load_servable(model_dir_or_model)
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer: serve a saved model folder, or set model.tokenizer")
    servable = [name for name in names() if name != "oracle"]
    rules = servable if allowed_rules is None else list(allowed_rules)
    unknown = [name for name in rules if name not in servable]
    if unknown:
        raise PolicyError(f"allowed_rules {unknown} are not servable rules; expected some of {servable}")
    default_policy = force_policy if force_policy is not None else ExitPolicy.from_dict(model.config.exit_policy)
    _check_servable(default_policy, model)
    label_names, task = model.label_names, model.config.problem_type
    metrics = ServeMetrics(model.num_layers, max_batch_size)

    def run_engine(policy: ExitPolicy, texts: list[str], text_pairs: list[str] | None) -> EngineOutput:
        engine = EarlyExitEngine(model, policy, batch_size=max_batch_size)
        return engine.classify(texts, text_pairs, max_length=max_length)

    def time_full_batch() -> float:
        """Seconds of one full batch through every layer (the worst case): median of 3, after a warm-up call."""
        texts = [WARMUP_TEXT] * max_batch_size
        run_engine(ExitPolicy("full"), texts, None)
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            run_engine(ExitPolicy("full"), texts, None)
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds)

    batcher = MicroBatcher(
        run_engine,
        max_batch_size,
        max_wait_ms,
        max_queue=max_queue or max_batch_size,
        on_engine_call=metrics.batch_size.observe,
        on_drop=metrics.dropped_texts.inc,
    )
    metrics.queued_texts.set_function(lambda: batcher.waiting_texts)
    loaded = False

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal loaded
        batcher.start()
        batch_seconds = await batcher.run_in_worker(time_full_batch)
        if max_queue is None:
            batcher.max_queue = derive_max_queue(max_batch_size, batch_seconds, latency_target_ms)
        logger.info(
            "one full batch of %d texts took %.0f ms; at most %d texts may wait",
            max_batch_size,
            1000 * batch_seconds,
            batcher.max_queue,
        )
        if freeze_gc:
            # The model and the libraries live as long as the server: keep them out of the collector's full
            # passes, which otherwise walk them all and stall the event loop (about 200 ms with MiniLM).
            gc.collect()
            gc.freeze()
        loaded = True
        yield
        loaded = False
        await batcher.stop(drain_timeout_s=request_timeout_s)
        if freeze_gc:
            gc.unfreeze()  # whoever embeds the app gets a collectable heap back

    app = FastAPI(
        title="BADGE early-exit classifier",
        version=__version__,
        description="Classify texts with an early-exit encoder; concurrent requests share batches.",
        lifespan=lifespan,
    )
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.state.batcher = batcher

    def resolve_policy(settings: PolicySettings | None) -> ExitPolicy:
        if settings is None:
            return default_policy
        if force_policy is not None:
            raise _invalid(["policy"], f"this server runs the fixed policy {force_policy}; leave out `policy`")
        policy = settings.policy
        try:
            _check_servable(policy, model)
        except PolicyError as error:
            raise _invalid(["policy"], str(error)) from error
        if policy.rule not in rules:
            raise _invalid(["policy", "rule"], f"rule {policy.rule!r} is not allowed here; expected one of {rules}")
        return policy

    @app.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        responses={503: {"description": "the queue is full (see Retry-After) or the server is stopping"}},
    )
    async def classify(request: ClassifyRequest) -> ClassifyResponse:
        """Classify one text or a list; each answer says where the text left the network."""
        texts = _check_texts("texts", request.texts, max_texts, max_chars)
        pairs = None
        if request.text_pairs is not None:
            pairs = _check_texts("text_pairs", request.text_pairs, max_texts, max_chars)
            if len(pairs) != len(texts):
                raise _invalid(["text_pairs"], f"text_pairs has {len(pairs)} texts but texts has {len(texts)}")
        policy = resolve_policy(request.policy)
        deadline = asyncio.get_running_loop().time() + request_timeout_s
        try:
            async with asyncio.timeout(request_timeout_s):  # cancels the wait (and so the job) without a new task
                output = await batcher.submit(texts, pairs, policy, deadline)
        except Overloaded as error:
            raise HTTPException(503, detail=str(error), headers={"retry-after": str(error.retry_after_s)}) from error
        except BatcherStopped as error:
            raise HTTPException(503, detail=str(error), headers={"retry-after": "1"}) from error
        except (TimeoutError, DeadlineExceeded) as error:
            raise HTTPException(504, detail=f"no answer within the request timeout of {request_timeout_s} s") from error
        except Exception as error:
            detail = f"the model failed on this request: {type(error).__name__}: {error}"
            raise HTTPException(500, detail=detail) from error
        results = [_prediction(output, row, label_names, task) for row in range(len(texts))]
        for result in results:
            metrics.exit_layer.observe(result.exit_layer)
        return ClassifyResponse(results=results, policy=str(policy), policy_settings=policy.to_dict())

    @app.get("/v1/model", response_model=ModelInfo)
    async def model_info() -> ModelInfo:
        """Labels, layers, the default exit policy and the rules a request may choose."""
        return ModelInfo(
            labels=label_names,
            task=task,
            num_layers=model.num_layers,
            exit_layers=model.exit_layers,
            default_policy=str(default_policy),
            default_policy_settings=default_policy.to_dict(),
            policy_fixed=force_policy is not None,
            rules=[] if force_policy is not None else rules,
            max_texts=max_texts,
            max_chars=max_chars,
            max_queue=batcher.max_queue,
        )

    @app.get("/healthz", responses={503: {"description": "the batching loop has stopped: restart the server"}})
    async def healthz() -> JSONResponse:
        """Liveness: ok while the event loop answers and the batching loop runs (the model runs off the loop)."""
        if loaded and not batcher.alive:
            return JSONResponse({"status": "dead", "reason": "the batching loop stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", responses={503: {"description": "not ready: the reasons are listed"}})
    async def readyz() -> JSONResponse:
        """Readiness: the model is loaded and timed, the batching loop runs, and the queue has room."""
        reasons = []
        if not loaded:
            reasons.append("the model is not loaded yet, or the server is stopping")
        if not batcher.alive:
            reasons.append("the batching loop is not running")
        if batcher.queue_full:
            reasons.append(f"the queue is full ({batcher.waiting_texts} of {batcher.queue_limit} texts)")
        body = {
            "status": "not ready" if reasons else "ready",
            "reasons": reasons,
            "queued_texts": batcher.waiting_texts,
            "max_queue": batcher.max_queue,
        }
        return JSONResponse(body, status_code=503 if reasons else 200)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> PlainTextResponse:
        """Prometheus text: requests, latency, errors, exit layers, batch sizes, queue and dropped texts."""
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(BodyLimitMiddleware, max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s)
    app.add_middleware(AdmissionMiddleware, batcher=batcher)
    app.add_middleware(MetricsMiddleware, metrics=metrics, endpoints={route.path for route in app.routes})
    return app


def run_server(
    model_dir: str | os.PathLike | MultiExitModel,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    threads: int | None = None,
    **create_app_kwargs: Any,
) -> None:
    """Serve `create_app(model_dir, **create_app_kwargs)` with uvicorn until interrupted (loopback by default).

    `threads` sets torch's intra-op threads (None: torch's default). On SIGINT or SIGTERM the server
    stops accepting connections, finishes the requests it accepted, then exits.
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads {threads} must be >= 1")
        torch.set_num_threads(threads)
    app = create_app(model_dir, **create_app_kwargs)
    grace_s = create_app_kwargs.get("request_timeout_s", 30.0) + 5
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace_s)
