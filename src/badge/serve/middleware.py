"""Prometheus metrics and the ASGI middleware in front of the app: request metrics, admission (503 when the
queue is full) and the request body limit.
"""

from __future__ import annotations

import asyncio
import time

from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from badge.serve.batcher import MicroBatcher


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


class MetricsMiddleware:
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


class AdmissionMiddleware:
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


class BodyLimitMiddleware:
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
        try:
            async with asyncio.timeout(self.body_timeout_s):  # one deadline for the whole body, no task per read
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > self.max_body_bytes:
                        break
                    more = message.get("more_body", False)
        except TimeoutError:
            detail = f"the request body did not arrive within {self.body_timeout_s:g} s"
            await JSONResponse({"detail": detail}, status_code=408, headers={"connection": "close"})(
                scope, receive, send
            )
            return
        if size > self.max_body_bytes:
            await self._too_large(f"more than {size}", scope, receive, send)
            return
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
