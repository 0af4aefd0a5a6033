"""Serve an early-exit model over HTTP: `POST /v1/classify`, with dynamic micro-batching.

Requests do not run one by one. A `MicroBatcher` on the event loop gathers the texts of concurrent
requests for up to `max_wait_ms` (or until `max_batch_size` texts wait), groups them by exit policy
and runs each group as one engine call in a single worker thread, so the event loop stays free
(`/healthz` answers while the model works) and the model never runs two batches at once. Each
request gets its own rows back. When an engine call fails, its requests are retried one by one, so
only a request whose texts break the model gets a 500, and the server keeps serving.

Endpoints: `POST /v1/classify`, `GET /v1/model`, `GET /healthz`, `GET /metrics` (Prometheus text)
and FastAPI's `/openapi.json` and `/docs`.

- `schemas`: request and response bodies (pydantic).
- `middleware`: Prometheus metrics, admission control, the body limit.
- `batcher`: `MicroBatcher` and `derive_max_queue`.
- `app`: `create_app` and `run_server`.
"""

from badge.serve.app import create_app, run_server
from badge.serve.batcher import BatcherStopped, DeadlineExceeded, MicroBatcher, Overloaded, derive_max_queue

__all__ = [
    "BatcherStopped",
    "DeadlineExceeded",
    "MicroBatcher",
    "Overloaded",
    "create_app",
    "derive_max_queue",
    "run_server",
]
