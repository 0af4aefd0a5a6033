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
import statistics
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
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
    max_queue: int


# ----- metrics -------------------------------------------------------------------------------
class ServeMetrics:
    """Prometheus metrics of one app, in their own registry (two apps in one process do not mix)."""

    def __init__(self, num_layers: int, max_batch_size: int) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "badge_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "badge_request_duration_seconds", "HTTP request latency", ["endpoint", "status"], registry=self.registry
        )
        self.errors = Counter(
            "badge_errors",
            "failed requests by kind: invalid, too_large, body_timeout, overloaded, timeout, model",
            ["kind"],
            registry=self.registry,
        )
        self.exit_layer = Histogram(
            "badge_exit_layer",
            "1-based layer each text left after",
            buckets=list(range(1, num_layers + 1)),
            registry=self.registry,
        )
        self.queued_texts = Gauge("badge_queued_texts", "texts waiting for the model", registry=self.registry)
        self.dropped_texts = Counter(
            "badge_dropped_texts",
            "texts dropped before the model: their deadline passed or their caller gave up",
            registry=self.registry,
        )
        powers = [2**i for i in range(max_batch_size.bit_length()) if 2**i < max_batch_size]
        self.batch_size = Histogram(
            "badge_batch_size", "texts per engine call", buckets=[*powers, max_batch_size], registry=self.registry
        )

    def record_request(self, endpoint: str, status: int, seconds: float) -> None:
        """Count one finished HTTP request; statuses >= 400 also count as an error of their kind.

        A probe's 503 (`/healthz`, `/readyz`) is an answer, not a failed request: it counts only by status.
        """
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint, str(status)).observe(seconds)
        if status >= 400 and endpoint not in ("/healthz", "/readyz"):
            kind = {408: "body_timeout", 413: "too_large", 503: "overloaded", 504: "timeout"}.get(
                status, "model" if status >= 500 else "invalid"
            )
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


class _AdmissionMiddleware:
    """Refuses `POST /v1/classify` with 503 before reading its body while the queue is full.

    The handler checks again with the request's own text count; this early check only spares a
    refused request the body read and validation, so an overloaded server answers the excess fast.
    """

    def __init__(self, app: ASGIApp, batcher: MicroBatcher) -> None:
        self.app = app
        self.batcher = batcher

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/classify" and self.batcher.queue_full:
            error = self.batcher.overloaded()
            headers = {"retry-after": str(error.retry_after_s)}
            await JSONResponse({"detail": str(error)}, status_code=503, headers=headers)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class _BodyLimitMiddleware:
    """Reads the whole body before the app sees it, within limits of size and of time.

    A body over `max_body_bytes` gets a 413 (by its Content-Length, or by the bytes that really
    arrive); a body that has not fully arrived after `body_timeout_s` gets a 408 and the connection
    is closed, so slow senders cannot hold connections open.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout_s: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

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
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.body_timeout_s
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(give_up - loop.time(), 0))
            except TimeoutError:
                detail = f"the request body did not arrive within {self.body_timeout_s:g} s"
                await JSONResponse({"detail": detail}, status_code=408, headers={"connection": "close"})(
                    scope, receive, send
                )
                return
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
class Overloaded(Exception):
    """The queue cannot take a request now; `retry_after_s` says when it likely can."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BatcherStopped(Exception):
    """The gathering loop is not running (it crashed, or the server is shutting down)."""


class DeadlineExceeded(Exception):
    """A request's deadline passed while it waited, so it was dropped before the model ran."""


@dataclass
class _Job:
    """One request's texts waiting for the model, and the future its rows come back through."""

    texts: list[str]
    text_pairs: list[str] | None
    policy: ExitPolicy
    future: asyncio.Future = field(repr=False)
    deadline: float = math.inf  # event-loop time after which the answer is of no use
    waiting: bool = True  # still counted in the queue

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


def derive_max_queue(max_batch_size: int, batch_seconds: float, latency_target_ms: float) -> int:
    """Most texts that may wait so that an accepted text is answered within `latency_target_ms`.

    A text that joins a full queue waits for the batch running now, for the queue ahead of it, and for
    its own batch: about `(max_queue / max_batch_size + 2)` batches of `batch_seconds` each. The queue
    holds at least two batches even when the target is tighter than that: arrivals come in bursts,
    and a one-batch queue refuses requests while the model is only partly busy.
    """
    batches = math.floor(latency_target_ms / 1000 / max(batch_seconds, 1e-6)) - 2
    return max_batch_size * max(2, batches)


class MicroBatcher:
    """Gathers concurrent requests into engine calls that run, one at a time, in a worker thread.

    Admission: at most `max_queue` texts wait; `submit` refuses more with `Overloaded` at once, so an
    overloaded server answers the excess quickly instead of queueing it past any useful deadline.
    A job whose deadline passed (or whose caller gave up) is dropped when it leaves the queue and
    again just before its engine call: it never takes a place in a batch or a moment of the model.

    Args:
        classify: runs one engine call, `(policy, texts, text_pairs) -> EngineOutput`, in the worker thread.
        max_batch_size: texts gathered before a batch runs at once (a larger single request runs alone).
        max_wait_ms: how long the first request of a batch waits for others.
        max_queue: most texts waiting for the model (a larger single request is taken when nothing waits).
        on_engine_call: called with the number of texts of every engine call (for metrics).
        on_drop: called with the number of texts of every job dropped unrun (for metrics).
    """

    def __init__(
        self,
        classify: Callable[[ExitPolicy, list[str], list[str] | None], EngineOutput],
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int = 1_000_000,
        on_engine_call: Callable[[int], None] = lambda texts: None,
        on_drop: Callable[[int], None] = lambda texts: None,
    ) -> None:
        self.classify = classify
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self.on_engine_call = on_engine_call
        self.on_drop = on_drop
        self.waiting_texts = 0
        self.seconds_per_text = 0.0  # moving average over engine calls, for Retry-After
        self._queue: asyncio.Queue[_Job] | None = None
        self._carry: _Job | None = None  # a job that did not fit the last batch starts the next
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None
        self._batch: list[_Job] = []  # the jobs taken off the queue for the current batch
        self._running = False  # an engine call is in progress
        self._stopping = False

    def start(self) -> None:
        """Start the worker thread and the gathering loop (call inside the running event loop)."""
        self._queue, self._carry = asyncio.Queue(), None  # made here: a queue belongs to one event loop
        self.waiting_texts, self._stopping = 0, False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="badge-model")
        self._task = asyncio.get_running_loop().create_task(self._loop())
        self._task.add_done_callback(self._on_loop_end)

    @property
    def alive(self) -> bool:
        """True while the gathering loop runs and the batcher is not shutting down."""
        return self._task is not None and not self._task.done() and not self._stopping

    @property
    def queue_full(self) -> bool:
        return self.waiting_texts >= self.max_queue

    def retry_after_s(self) -> int:
        """Whole seconds until the texts waiting now are likely done (at least 1)."""
        return max(1, math.ceil(self.waiting_texts * self.seconds_per_text))

    def overloaded(self) -> Overloaded:
        """The refusal for a request that does not fit the queue now."""
        return Overloaded(
            f"{self.waiting_texts} texts already wait for the model; the queue holds {self.max_queue}",
            self.retry_after_s(),
        )

    async def run_in_worker(self, function: Callable[[], Any]) -> Any:
        """Run `function` in the model's worker thread (between batches, never beside one)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function)

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Take no new jobs, finish the accepted ones (for up to `drain_timeout_s`), then stop the loop.

        Jobs still waiting after the drain timeout are cancelled; the worker thread finishes its current call.
        """
        self._stopping = True
        loop = asyncio.get_running_loop()
        give_up = loop.time() + drain_timeout_s
        while (
            self._task is not None
            and not self._task.done()
            and (self.waiting_texts > 0 or self._running)
            and loop.time() < give_up
        ):
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for job in self._drain_queue():
            job.future.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(
        self, texts: list[str], text_pairs: list[str] | None, policy: ExitPolicy, deadline: float = math.inf
    ) -> EngineOutput:
        """Queue one request's texts and wait for its rows; cancelling the wait drops the request.

        Raises:
            Overloaded: `max_queue` texts already wait.
            BatcherStopped: the gathering loop is not running.
            DeadlineExceeded: `deadline` (event-loop time) passed before the model could run the texts.
        """
        if not self.alive:
            raise BatcherStopped("the server is shutting down" if self._stopping else "the batching loop stopped")
        if self.waiting_texts > 0 and self.waiting_texts + len(texts) > self.max_queue:
            raise self.overloaded()
        future = asyncio.get_running_loop().create_future()
        job = _Job(texts, text_pairs, policy, future, deadline)
        future.add_done_callback(lambda _: self._leave_queue(job))  # a caller that gives up frees its place
        self.waiting_texts += len(texts)
        self._queue.put_nowait(job)
        return await future

    def _leave_queue(self, job: _Job) -> None:
        if job.waiting:
            job.waiting = False
            self.waiting_texts -= len(job.texts)

    def _drain_queue(self) -> list[_Job]:
        jobs = [self._carry] if self._carry else []
        self._carry = None
        while self._queue is not None and not self._queue.empty():
            jobs.append(self._queue.get_nowait())
        return jobs

    def _on_loop_end(self, task: asyncio.Task) -> None:
        """When the loop dies of an error, fail every waiting job at once instead of letting them time out."""
        if task.cancelled() or task.exception() is None:
            return
        logger.error("the batching loop stopped", exc_info=task.exception())
        error = BatcherStopped(f"the batching loop stopped: {type(task.exception()).__name__}: {task.exception()}")
        for job in [*self._batch, *self._drain_queue()]:
            if not job.future.done():
                job.future.set_exception(error)

    def _expired(self, job: _Job, now: float) -> bool:
        """True (and counted as dropped) for a job not worth running: its caller gave up or its deadline passed."""
        if not job.future.done() and now < job.deadline:
            return False
        if not job.future.done():
            job.future.set_exception(DeadlineExceeded("the request's deadline passed while it waited"))
        self.on_drop(len(job.texts))
        return True

    async def _loop(self) -> None:
        while True:
            self._batch = []
            self._batch = batch = await self._gather()
            groups: dict[tuple[str, bool], list[_Job]] = {}
            for job in batch:
                groups.setdefault(job.group, []).append(job)
            for jobs in groups.values():
                now = asyncio.get_running_loop().time()  # an earlier group's engine call may have taken a while
                jobs = [job for job in jobs if not self._expired(job, now)]
                if jobs:
                    await self._run(jobs)

    async def _next_live_job(self, timeout: float | None) -> _Job | None:
        """The next job that is still worth running, taken off the queue; None when `timeout` passes first."""
        loop = asyncio.get_running_loop()
        give_up = None if timeout is None else loop.time() + timeout
        while True:
            if self._carry is not None:
                job, self._carry = self._carry, None
                return job  # it left the queue when it was first taken
            if self._queue.empty() and give_up is not None:
                try:
                    job = await asyncio.wait_for(self._queue.get(), max(give_up - loop.time(), 0))
                except TimeoutError:
                    return None
            else:
                job = await self._queue.get()
            self._leave_queue(job)
            if not self._expired(job, loop.time()):
                return job

    async def _gather(self) -> list[_Job]:
        """Wait for one live job, then collect more until the batch is full or `max_wait_ms` has passed."""
        loop = asyncio.get_running_loop()
        first = await self._next_live_job(None)
        batch, size = [first], len(first.texts)
        close = loop.time() + self.max_wait_s
        while size < self.max_batch_size:
            job = await self._next_live_job(max(close - loop.time(), 0))
            if job is None:
                break
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
        self._running = True
        start = loop.time()
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
        finally:
            self._running = False
        per_text = (loop.time() - start) / len(texts)
        self.seconds_per_text = per_text if self.seconds_per_text == 0 else 0.8 * self.seconds_per_text + 0.2 * per_text
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
        loaded = True
        yield
        loaded = False
        await batcher.stop(drain_timeout_s=request_timeout_s)

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
            output = await asyncio.wait_for(batcher.submit(texts, pairs, policy, deadline), request_timeout_s)
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
            reasons.append(f"the queue is full ({batcher.waiting_texts} of {batcher.max_queue} texts)")
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

    app.add_middleware(_BodyLimitMiddleware, max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s)
    app.add_middleware(_AdmissionMiddleware, batcher=batcher)
    app.add_middleware(_MetricsMiddleware, metrics=metrics, endpoints={route.path for route in app.routes})
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
