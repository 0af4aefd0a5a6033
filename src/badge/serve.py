"""Serve an early-exit model over HTTP: `POST /v1/classify`, with dynamic micro-batching.

Requests do not run one by one. A `MicroBatcher` on the event loop gathers the texts of concurrent
requests for up to `max_wait_ms` (or until `max_batch_size` texts wait), groups them by exit policy
and runs each group as one engine call in a single worker thread, so the event loop stays free
(`/healthz` answers while the model works) and the model never runs two batches at once. Each
request gets its own rows back. When an engine call fails, its requests are retried one by one, so
only a request whose texts break the model gets a 500, and the server keeps serving.

Endpoints: `POST /v1/classify`, `GET /v1/model`, `GET /healthz`, `GET /metrics` (Prometheus text)
and FastAPI's `/openapi.json` and `/docs`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from badge import __version__
from badge.engine import EarlyExitEngine, EngineOutput
from badge.modeling import MultiExitModel
from badge.rules import ExitPolicy, PolicyError, names

logger = logging.getLogger(__name__)


MAX_PATIENCE = 1024  # far above any model's exits; larger numbers would overflow the engine's counters


# ----- request and response bodies -----------------------------------------------------------
class PolicySettings(BaseModel):
    """An exit policy in a request; checked by `ExitPolicy` (unknown rule, parameter out of range)."""

    model_config = ConfigDict(extra="forbid")

    rule: str = Field(description=f"exit rule, one of {[name for name in names() if name != 'oracle']}")
    tau: float | None = Field(default=None, strict=True, allow_inf_nan=False, description="threshold of the rule")
    patience: int | None = Field(
        default=None, strict=True, le=MAX_PATIENCE, description="exits the signal must hold for"
    )
    divergence: str | None = Field(default=None, description="divergence of rule `dge`: jsd, kl, rkl, skl, xjsd")
    k: int | None = Field(default=None, strict=True, description="the layer of rule `static`")
    _policy: ExitPolicy = PrivateAttr()

    @model_validator(mode="after")
    def _build_policy(self) -> PolicySettings:
        try:
            self._policy = ExitPolicy(**self.model_dump())
        except PolicyError as error:
            raise ValueError(str(error)) from error
        return self

    @property
    def policy(self) -> ExitPolicy:
        return self._policy


class ClassifyRequest(BaseModel):
    """Texts to classify, optional second texts of each pair, and an optional exit policy override."""

    model_config = ConfigDict(extra="forbid")

    texts: str | list[str] = Field(description="one text or a list of texts")
    text_pairs: str | list[str] | None = Field(default=None, description="second texts, one per text")
    policy: PolicySettings | None = Field(default=None, description="exit policy for this request")


class Prediction(BaseModel):
    """The answer for one text.

    Single-label: `label` is the class name, `label_id` its index. Multi-label: lists of both.
    Regression: `label` is the predicted value, `label_id` is null. `probabilities` are those of the
    exit that answered (null for regression); `exit_layer` is the 1-based layer it left after.
    """

    label: str | list[str] | float
    label_id: int | list[int] | None
    probabilities: dict[str, float] | None
    exit_layer: int


class ClassifyResponse(BaseModel):
    """One prediction per text, in request order, and the exit policy that produced them."""

    results: list[Prediction]
    policy: str
    policy_settings: dict[str, Any]


class ModelInfo(BaseModel):
    """What the server runs and which exit rules a request may choose."""

    labels: list[str]
    task: str
    num_layers: int
    exit_layers: list[int]
    default_policy: str
    default_policy_settings: dict[str, Any]
    policy_fixed: bool
    rules: list[str]
    max_texts: int
    max_chars: int


# ----- metrics -------------------------------------------------------------------------------
class ServeMetrics:
    """Prometheus metrics of one app, in their own registry (two apps in one process do not mix)."""

    def __init__(self, num_layers: int, max_batch_size: int) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "badge_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "badge_request_duration_seconds", "HTTP request latency", ["endpoint"], registry=self.registry
        )
        self.errors = Counter(
            "badge_errors",
            "failed requests by kind: invalid, too_large, timeout, model",
            ["kind"],
            registry=self.registry,
        )
        self.exit_layer = Histogram(
            "badge_exit_layer",
            "1-based layer each text left after",
            buckets=list(range(1, num_layers + 1)),
            registry=self.registry,
        )
        powers = [2**i for i in range(max_batch_size.bit_length()) if 2**i < max_batch_size]
        self.batch_size = Histogram(
            "badge_batch_size", "texts per engine call", buckets=[*powers, max_batch_size], registry=self.registry
        )

    def record_request(self, endpoint: str, status: int, seconds: float) -> None:
        """Count one finished HTTP request; statuses >= 400 also count as an error of their kind."""
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if status >= 400:
            kind = {413: "too_large", 504: "timeout"}.get(status, "model" if status >= 500 else "invalid")
            self.errors.labels(kind).inc()


class _MetricsMiddleware:
    """Times every HTTP request and counts it by endpoint and status (unknown paths count as `other`)."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics, endpoints: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
        start = time.perf_counter()
        status = 500  # an exception escaping the app becomes a 500 further out

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            self.metrics.record_request(endpoint, status, time.perf_counter() - start)


class _BodyLimitMiddleware:
    """Answers 413 to a body over `max_body_bytes`: by its Content-Length, or by the bytes that really arrive."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(declared.decode("latin-1"), scope, receive, send)
            return
        # Read the whole body here (it is bounded) so a chunked upload cannot slip past the limit.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await self._too_large(f"more than {size}", scope, receive, send)
                return
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, size: str, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"request body is {size} bytes; the limit is {self.max_body_bytes} bytes"
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)


# ----- micro-batching ------------------------------------------------------------------------
@dataclass
class _Job:
    """One request's texts waiting for the model, and the future its rows come back through."""

    texts: list[str]
    text_pairs: list[str] | None
    policy: ExitPolicy
    future: asyncio.Future = field(repr=False)

    @property
    def group(self) -> tuple[str, bool]:
        """Jobs with the same key run in one engine call: the same policy, and all with or all without pairs."""
        return json.dumps(self.policy.to_dict(), sort_keys=True), self.text_pairs is not None


def _rows(output: EngineOutput, start: int, stop: int) -> EngineOutput:
    return EngineOutput(
        labels=output.labels[start:stop],
        probs=output.probs[start:stop],
        exit_layers=output.exit_layers[start:stop],
        logits=output.logits[start:stop],
    )


class MicroBatcher:
    """Gathers concurrent requests into engine calls that run, one at a time, in a worker thread.

    Args:
        classify: runs one engine call, `(policy, texts, text_pairs) -> EngineOutput`, in the worker thread.
        max_batch_size: texts gathered before a batch runs at once (a larger single request runs alone).
        max_wait_ms: how long the first request of a batch waits for others.
        on_engine_call: called with the number of texts of every engine call (for metrics).
    """

    def __init__(
        self,
        classify: Callable[[ExitPolicy, list[str], list[str] | None], EngineOutput],
        max_batch_size: int,
        max_wait_ms: float,
        on_engine_call: Callable[[int], None] = lambda texts: None,
    ) -> None:
        self.classify = classify
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.on_engine_call = on_engine_call
        self._queue: asyncio.Queue[_Job] | None = None
        self._carry: _Job | None = None  # a job that did not fit the last batch starts the next
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start the worker thread and the gathering loop (call inside the running event loop)."""
        self._queue, self._carry = asyncio.Queue(), None  # made here: a queue belongs to one event loop
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="badge-model")
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop gathering, cancel waiting requests and let the worker thread finish its current call."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        waiting = [self._carry] if self._carry else []
        while self._queue is not None and not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        for job in waiting:
            job.future.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, texts: list[str], text_pairs: list[str] | None, policy: ExitPolicy) -> EngineOutput:
        """Queue one request's texts and wait for its rows; cancelling the wait drops the request."""
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(texts, text_pairs, policy, future))
        return await future

    async def _loop(self) -> None:
        while True:
            batch = await self._gather()
            groups: dict[tuple[str, bool], list[_Job]] = {}
            for job in batch:
                if not job.future.done():  # a request that timed out while queued is not run
                    groups.setdefault(job.group, []).append(job)
            for jobs in groups.values():
                await self._run(jobs)

    async def _gather(self) -> list[_Job]:
        """Wait for one job, then collect more until the batch is full or `max_wait_ms` has passed."""
        loop = asyncio.get_running_loop()
        first = self._carry if self._carry is not None else await self._queue.get()
        self._carry = None
        batch, size = [first], len(first.texts)
        deadline = loop.time() + self.max_wait_s
        while size < self.max_batch_size:
            if self._queue.empty():
                try:
                    job = await asyncio.wait_for(self._queue.get(), max(deadline - loop.time(), 0))
                except TimeoutError:
                    break
            else:
                job = self._queue.get_nowait()
            if size + len(job.texts) > self.max_batch_size:
                self._carry = job
                break
            batch.append(job)
            size += len(job.texts)
        return batch

    async def _run(self, jobs: list[_Job]) -> None:
        """One engine call for jobs of one group; on failure, each job alone, so only the broken one fails."""
        texts = [text for job in jobs for text in job.texts]
        pairs = [pair for job in jobs for pair in job.text_pairs] if jobs[0].text_pairs is not None else None
        self.on_engine_call(len(texts))
        loop = asyncio.get_running_loop()
        try:
            output = await loop.run_in_executor(self._executor, self.classify, jobs[0].policy, texts, pairs)
        except Exception as error:
            if len(jobs) > 1:
                for job in jobs:
                    await self._run([job])
                return
            logger.exception("the model failed on a request of %d texts", len(texts))
            if not jobs[0].future.done():
                jobs[0].future.set_exception(error)
            return
        start = 0
        for job in jobs:
            stop = start + len(job.texts)
            if not job.future.done():
                job.future.set_result(_rows(output, start, stop))
            start = stop


# ----- the app -------------------------------------------------------------------------------
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
    if task == "regression":
        return Prediction(label=float(output.labels[row]), label_id=None, probabilities=None, exit_layer=exit_layer)
    probabilities = {name: float(p) for name, p in zip(label_names, output.probs[row].tolist(), strict=True)}
    label_id = output.labels[row]
    label = [label_names[i] for i in label_id] if isinstance(label_id, list) else label_names[label_id]
    return Prediction(label=label, label_id=label_id, probabilities=probabilities, exit_layer=exit_layer)


def _load_servable(model_dir_or_model: str | os.PathLike | MultiExitModel):
    """A loaded model, a saved model folder, or an ONNX export folder (served by ONNX Runtime)."""
    if not isinstance(model_dir_or_model, (str, os.PathLike)):
        return model_dir_or_model.eval()
    from badge.onnx_engine import OnnxMultiExitModel, is_onnx_export

    if is_onnx_export(model_dir_or_model):
        return OnnxMultiExitModel(model_dir_or_model)
    return MultiExitModel.from_pretrained(model_dir_or_model).eval()


def create_app(
    model_dir_or_model: str | os.PathLike | MultiExitModel,
    *,
    max_batch_size: int = 32,
    max_wait_ms: float = 5,
    max_texts: int = 64,
    max_chars: int = 2000,
    max_body_bytes: int = 1_000_000,
    request_timeout_s: float = 30.0,
    max_length: int | None = None,
    allowed_rules: list[str] | None = None,
    force_policy: ExitPolicy | None = None,
) -> FastAPI:
    """Build the HTTP app around a saved model folder (or a loaded `MultiExitModel` with a tokenizer).

    Args:
        model_dir_or_model: a saved BADGE model folder, an ONNX export folder (`badge export`), or a
            loaded model (`MultiExitModel` or `OnnxMultiExitModel`) whose `tokenizer` is set.
        max_batch_size: texts gathered into one engine call (also the engine's rows per layer call).
        max_wait_ms: how long a request waits for others to share its batch.
        max_texts: most texts in one request (more: 422).
        max_chars: most characters in one text (more: 422).
        max_body_bytes: largest request body (more: 413).
        request_timeout_s: a request not answered in time gets a 504.
        max_length: tokens per text (longer texts are truncated); None = what the model was trained with.
        allowed_rules: exit rules a request may choose; None = every rule but `oracle`. The server's
            own default policy is always allowed.
        force_policy: run every request with this policy instead of the model's default; a request
            that names a policy then gets a 422.
    Returns:
        The FastAPI app; the batcher starts with the app's lifespan (uvicorn, or `with TestClient(app)`).
    """
    if min(max_batch_size, max_texts, max_chars, max_body_bytes, 1 if max_length is None else max_length) < 1:
        raise ValueError("max_batch_size, max_texts, max_chars, max_body_bytes and max_length must be >= 1")
    if max_wait_ms < 0 or request_timeout_s <= 0:
        raise ValueError(f"max_wait_ms {max_wait_ms} must be >= 0 and request_timeout_s {request_timeout_s} > 0")
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

    batcher = MicroBatcher(run_engine, max_batch_size, max_wait_ms, on_engine_call=metrics.batch_size.observe)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(
        title="BADGE early-exit classifier",
        version=__version__,
        description="Classify texts with an early-exit encoder; concurrent requests share batches.",
        lifespan=lifespan,
    )
    app.add_exception_handler(RequestValidationError, _validation_error)

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

    @app.post("/v1/classify", response_model=ClassifyResponse)
    async def classify(request: ClassifyRequest) -> ClassifyResponse:
        """Classify one text or a list; each answer says where the text left the network."""
        texts = _check_texts("texts", request.texts, max_texts, max_chars)
        pairs = None
        if request.text_pairs is not None:
            pairs = _check_texts("text_pairs", request.text_pairs, max_texts, max_chars)
            if len(pairs) != len(texts):
                raise _invalid(["text_pairs"], f"text_pairs has {len(pairs)} texts but texts has {len(texts)}")
        policy = resolve_policy(request.policy)
        try:
            output = await asyncio.wait_for(batcher.submit(texts, pairs, policy), request_timeout_s)
        except TimeoutError as error:
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
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: answers while the model works, since the model runs off the event loop."""
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> PlainTextResponse:
        """Prometheus text: requests, latency, errors, exit layers and batch sizes."""
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(_BodyLimitMiddleware, max_body_bytes=max_body_bytes)
    app.add_middleware(_MetricsMiddleware, metrics=metrics, endpoints={route.path for route in app.routes})
    return app


def run_server(
    model_dir: str | os.PathLike | MultiExitModel,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    **create_app_kwargs: Any,
) -> None:
    """Serve `create_app(model_dir, **create_app_kwargs)` with uvicorn until interrupted (loopback by default)."""
    uvicorn.run(create_app(model_dir, **create_app_kwargs), host=host, port=port, log_level=log_level)
