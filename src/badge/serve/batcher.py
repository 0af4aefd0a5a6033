"""Dynamic micro-batching: a `MicroBatcher` on the event loop gathers the texts of concurrent requests for up
to `max_wait_ms` (or until `max_batch_size` texts wait), groups them by exit policy and runs each group as
one engine call in a single worker thread. When an engine call fails, its requests are retried one by one,
so only a request whose texts break the model fails.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from badge.engine import EngineOutput
from badge.rules import ExitPolicy

logger = logging.getLogger(__name__)


# Full batches in a row after which the queue is held to one batch (see `MicroBatcher`). Near capacity a few
# full batches come in bursts; under overload every batch is full.
SATURATED_AFTER = 4


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
    `max_queue` is there for bursts. `SATURATED_AFTER` full batches in a row (as many texts as a batch
    holds, or more waiting) are saturation, not a burst: while it lasts at most `max_batch_size` texts may wait, so an
    accepted text runs in the next batch and waits about two batches, not `max_queue` texts' worth.
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
        self._full = [False] * SATURATED_AFTER  # was each of the last gathered batches full
        self._stopping = False

    def start(self) -> None:
        """Start the worker thread and the gathering loop (call inside the running event loop)."""
        self._queue, self._carry = asyncio.Queue(), None  # made here: a queue belongs to one event loop
        self.waiting_texts, self._stopping, self._full = 0, False, [False] * SATURATED_AFTER
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="badge-model")
        self._task = asyncio.get_running_loop().create_task(self._loop())
        self._task.add_done_callback(self._on_loop_end)

    @property
    def alive(self) -> bool:
        """True while the gathering loop runs and the batcher is not shutting down."""
        return self._task is not None and not self._task.done() and not self._stopping

    @property
    def saturated(self) -> bool:
        """True while the model cannot keep up: the last `SATURATED_AFTER` batches were full."""
        return all(self._full)

    @property
    def queue_limit(self) -> int:
        """Most texts that may wait now: `max_queue`, or one batch while the model is saturated."""
        return min(self.max_queue, self.max_batch_size) if self.saturated else self.max_queue

    @property
    def queue_full(self) -> bool:
        return self.waiting_texts >= self.queue_limit

    def retry_after_s(self) -> int:
        """Whole seconds until the texts waiting now are likely done (at least 1)."""
        return max(1, math.ceil(self.waiting_texts * self.seconds_per_text))

    def overloaded(self) -> Overloaded:
        """The refusal for a request that does not fit the queue now."""
        return Overloaded(
            f"{self.waiting_texts} texts already wait for the model; the queue holds {self.queue_limit} now"
            + (f" (the server is overloaded: it holds {self.max_queue} for bursts)" if self.saturated else ""),
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
        if self.waiting_texts > 0 and self.waiting_texts + len(texts) > self.queue_limit:
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
            full = sum(len(job.texts) for job in batch) >= self.max_batch_size or self.waiting_texts > 0
            self._full = [*self._full[1:], full or self._carry is not None]
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
