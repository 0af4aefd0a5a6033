"""The HTTP server: a real uvicorn server on loopback answering like the engine, batching, limits and errors."""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest.mock import ANY

import httpx
import pytest
import torch
import uvicorn
from conftest import SERVED_LABELS, SERVED_TEXTS, save_served_model
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from badge import EarlyExitEngine, ExitPolicy, MultiExitModel
from badge.engine import EngineOutput
from badge.rules import PolicyError
from badge.serve import BatcherStopped, DeadlineExceeded, MicroBatcher, Overloaded, create_app, derive_max_queue
from badge.serve.batcher import SATURATED_AFTER

LABELS = SERVED_LABELS
TEXTS = SERVED_TEXTS
POISON = "[MASK]"  # the failing-model hook below breaks on this token only
LIMITS = {"max_wait_ms": 50, "max_texts": 8, "max_chars": 200, "max_body_bytes": 4096}


@pytest.fixture(scope="module")
def model_dir(tiny_encoder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved 4-layer model whose default policy (maxprob 0.9) sends texts out at layer 2 or 3."""
    return save_served_model(tiny_encoder, tmp_path_factory.mktemp("served") / "model")


@pytest.fixture(scope="module")
def served_model(model_dir: Path) -> MultiExitModel:
    """The model object inside the running server (tests patch it to make it slow or fail)."""
    return MultiExitModel.from_pretrained(model_dir)


@contextmanager
def serving_with_handle(app: FastAPI) -> Iterator[tuple[str, uvicorn.Server]]:
    """Run `app` under uvicorn in a background thread on a free loopback port; yield its URL and server."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """Run `app` under uvicorn in a background thread on a free loopback port; yield its base URL."""
    with serving_with_handle(app) as (url, _):
        yield url


@pytest.fixture(scope="module")
def server(served_model: MultiExitModel) -> Iterator[str]:
    with serving(create_app(served_model, **LIMITS)) as url:
        yield url


@pytest.fixture()
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, trust_env=False, timeout=30) as http:
        yield http


def post_concurrently(url: str, bodies: list[dict]) -> list[httpx.Response]:
    """POST every body to /v1/classify at once."""

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as http:
            return await asyncio.gather(*(http.post("/v1/classify", json=body) for body in bodies))

    return asyncio.run(send_all())


def metric(http: httpx.Client, sample_name: str, **labels: str) -> float:
    """Value of one sample on /metrics (0 if absent)."""
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def slow_constant_model(
    seconds: float, label: int = 0, calls: list[list[str]] | None = None
) -> Callable[[ExitPolicy, list[str], list[str] | None], EngineOutput]:
    """A stand-in for the engine behind a `MicroBatcher`: every call takes `seconds` and answers `label` for every
    text (probabilities 0.5, exit layer 1); each call's texts are appended to `calls` when given."""

    def classify(policy: ExitPolicy, texts: list[str], text_pairs: list[str] | None) -> EngineOutput:
        if calls is not None:
            calls.append(list(texts))
        time.sleep(seconds)
        n = len(texts)
        return EngineOutput(
            labels=[label] * n, probs=torch.ones(n, 2) / 2, exit_layers=torch.ones(n), logits=torch.zeros(n, 2)
        )

    return classify


def break_on_poison(model: MultiExitModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the model raise on any input holding the POISON token, as a real model bug would."""
    poison_id = model.tokenizer.convert_tokens_to_ids(POISON)
    embed = model.embed

    def failing_embed(input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (input_ids == poison_id).any():
            raise RuntimeError("simulated failure inside the model")
        return embed(input_ids, token_type_ids)

    monkeypatch.setattr(model, "embed", failing_embed)


def slow_down(model: MultiExitModel, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Make every engine call take at least `seconds` longer."""
    embed = model.embed

    def slow_embed(input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        time.sleep(seconds)
        return embed(input_ids, token_type_ids)

    monkeypatch.setattr(model, "embed", slow_embed)


# ----- classification ------------------------------------------------------------------------
def test_classify_returns_a_label_probabilities_and_the_exit_layer_per_text(client: httpx.Client) -> None:
    response = client.post("/v1/classify", json={"texts": TEXTS[:3]})
    assert response.status_code == 200
    body = response.json()
    assert body["policy"] == "maxprob(tau=0.9)"
    assert body["policy_settings"] == {"rule": "maxprob", "tau": 0.9}
    assert len(body["results"]) == 3
    for result in body["results"]:
        assert result["label"] == LABELS[result["label_id"]]
        assert set(result["probabilities"]) == set(LABELS)
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert result["exit_layer"] in (1, 2, 3, 4)


def test_a_single_string_is_one_text(client: httpx.Client) -> None:
    response = client.post("/v1/classify", json={"texts": "the movie was good"})
    assert response.status_code == 200
    assert len(response.json()["results"]) == 1


def test_answers_equal_the_engine_alone_or_batched_with_other_requests(server: str, model_dir: Path) -> None:
    engine = EarlyExitEngine(MultiExitModel.from_pretrained(model_dir))
    expected = engine.classify(TEXTS)
    assert len(set(expected.exit_layers.tolist())) > 1, "the fixture should spread exits over layers"
    halves = post_concurrently(server, [{"texts": TEXTS[:6]}, {"texts": TEXTS[6:]}])
    by_half = [result for response in halves for result in response.json()["results"]]
    singles = post_concurrently(server, [{"texts": text} for text in TEXTS])
    by_text = [response.json()["results"][0] for response in singles]
    for results in (by_half, by_text):
        assert [result["label_id"] for result in results] == expected.labels
        assert [result["exit_layer"] for result in results] == expected.exit_layers.tolist()
        probabilities = torch.tensor([[result["probabilities"][name] for name in LABELS] for result in results])
        torch.testing.assert_close(probabilities, expected.probs, atol=1e-5, rtol=1e-5)


def test_text_pairs_are_classified_as_pairs(client: httpx.Client, model_dir: Path) -> None:
    texts, pairs = ["the movie", "the plot"], ["was good", "was dull and boring"]
    response = client.post("/v1/classify", json={"texts": texts, "text_pairs": pairs})
    assert response.status_code == 200
    expected = EarlyExitEngine(MultiExitModel.from_pretrained(model_dir)).classify(texts, pairs)
    assert [result["exit_layer"] for result in response.json()["results"]] == expected.exit_layers.tolist()


def test_a_request_can_choose_its_exit_policy(client: httpx.Client) -> None:
    full = client.post("/v1/classify", json={"texts": TEXTS[:4], "policy": {"rule": "full"}}).json()
    assert [result["exit_layer"] for result in full["results"]] == [4, 4, 4, 4]
    assert full["policy"] == "full()"
    first = client.post("/v1/classify", json={"texts": TEXTS[:4], "policy": {"rule": "static", "k": 1}}).json()
    assert [result["exit_layer"] for result in first["results"]] == [1, 1, 1, 1]
    assert first["policy_settings"] == {"rule": "static", "k": 1}


# ----- invalid requests ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "body, field, message",
    [
        ({}, ["texts"], "Field required"),
        ({"texts": 5}, ["texts"], "valid"),
        ({"texts": ["fine", 3]}, ["texts"], "valid string"),
        ({"texts": []}, ["texts"], "texts is empty"),
        ({"texts": ["good", ""]}, ["texts", 1], "texts[1] is empty"),
        ({"texts": "   "}, ["texts", 0], "only whitespace"),
        ({"texts": ["good"] * 9}, ["texts"], "9 texts; the limit is 8"),
        ({"texts": ["good " * 50]}, ["texts", 0], "250 characters; the limit is 200"),
        ({"texts": ["good", "bad"], "text_pairs": ["film"]}, ["text_pairs"], "1 texts but texts has 2"),
        ({"texts": "good", "label": 1}, ["label"], "Extra inputs"),
        ({"texts": "good", "policy": {"rule": "fastest"}}, ["policy"], "unknown exit rule 'fastest'"),
        ({"texts": "good", "policy": {"rule": "entropy", "tau": 2}}, ["policy"], "tau 2.0 for rule 'entropy'"),
        ({"texts": "good", "policy": {"rule": "dge", "tau": -0.1}}, ["policy"], "tau -0.1 must be"),
        ({"texts": "good", "policy": {"rule": "dge", "patience": 0}}, ["policy"], "patience 0"),
        ({"texts": "good", "policy": {"rule": "static"}}, ["policy"], "needs k"),
        ({"texts": "good", "policy": {"rule": "dge", "speed": 2}}, ["policy", "speed"], "Extra inputs"),
        ({"texts": "good", "policy": {"rule": "oracle"}}, ["policy"], "needs the true labels"),
    ],
    ids=lambda value: str(value)[:40],
)
def test_a_bad_request_gets_a_422_naming_the_field(client: httpx.Client, body: dict, field: list, message: str) -> None:
    response = client.post("/v1/classify", json=body)
    assert response.status_code == 422
    errors = response.json()["detail"]
    assert any(error["loc"][1 : 1 + len(field)] == field and message in error["msg"] for error in errors), errors


def test_malformed_json_gets_a_422(client: httpx.Client) -> None:
    response = client.post("/v1/classify", content=b'{"texts": ["good"', headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "JSON" in response.json()["detail"][0]["msg"]


def test_a_body_over_the_limit_gets_a_413_by_its_length_or_by_what_arrives(client: httpx.Client) -> None:
    declared = client.post("/v1/classify", content=b" " * 5000, headers={"content-type": "application/json"})
    assert declared.status_code == 413
    assert "5000 bytes; the limit is 4096" in declared.json()["detail"]
    chunked = client.post("/v1/classify", content=iter([b" " * 3000, b" " * 3000]))  # no Content-Length
    assert chunked.status_code == 413
    assert "limit is 4096" in chunked.json()["detail"]


# ----- failures, timeouts, concurrency -------------------------------------------------------
def test_a_model_failure_fails_only_that_request_and_the_server_keeps_serving(
    server: str, client: httpx.Client, served_model: MultiExitModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    break_on_poison(served_model, monkeypatch)
    failures_before = metric(client, "badge_errors_total", kind="model")
    good, poisoned = post_concurrently(server, [{"texts": ["good film"]}, {"texts": [f"good {POISON} film"]}])
    assert good.status_code == 200
    assert poisoned.status_code == 500
    assert "simulated failure inside the model" in poisoned.json()["detail"]
    assert client.post("/v1/classify", json={"texts": ["still good"]}).status_code == 200
    assert metric(client, "badge_errors_total", kind="model") == failures_before + 1


def test_healthz_answers_while_the_model_works(
    server: str, served_model: MultiExitModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_down(served_model, monkeypatch, 1.0)

    async def scenario() -> tuple[httpx.Response, bool, float, httpx.Response]:
        async with httpx.AsyncClient(base_url=server, trust_env=False, timeout=30) as http:
            classify = asyncio.create_task(http.post("/v1/classify", json={"texts": "good"}))
            await asyncio.sleep(0.3)  # the model is now inside its slow call
            start = time.perf_counter()
            health = await http.get("/healthz")
            return health, classify.done(), time.perf_counter() - start, await classify

    health, classified_already, seconds, classified = asyncio.run(scenario())
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert not classified_already and seconds < 0.5
    assert classified.status_code == 200


def test_a_request_past_its_timeout_gets_a_504(served_model: MultiExitModel, monkeypatch: pytest.MonkeyPatch) -> None:
    slow_down(served_model, monkeypatch, 0.5)
    with TestClient(create_app(served_model, request_timeout_s=0.1)) as http:
        response = http.post("/v1/classify", json={"texts": "good"})
    assert response.status_code == 504
    assert "timeout of 0.1 s" in response.json()["detail"]


def test_concurrent_requests_share_engine_batches(server: str, client: httpx.Client) -> None:
    calls_before = metric(client, "badge_batch_size_count")
    texts_before = metric(client, "badge_batch_size_sum")
    responses = post_concurrently(server, [{"texts": text} for text in TEXTS + TEXTS[:4]])
    assert [response.status_code for response in responses] == [200] * 16
    assert metric(client, "badge_batch_size_sum") - texts_before == 16
    assert metric(client, "badge_batch_size_count") - calls_before < 16


# ----- metrics, model info, configuration ----------------------------------------------------
def test_metrics_count_requests_exit_layers_and_batch_sizes(client: httpx.Client) -> None:
    client.post("/v1/classify", json={"texts": TEXTS[:2], "policy": {"rule": "static", "k": 1}})
    client.post("/v1/classify", json={"texts": []})
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for layer in range(1, 5):
        assert f'badge_exit_layer_bucket{{le="{layer}.0"}}' in text
    assert 'badge_batch_size_bucket{le="32.0"}' in text
    assert "badge_request_duration_seconds_bucket" in text
    assert metric(client, "badge_exit_layer_bucket", le="1.0") >= 2
    assert metric(client, "badge_requests_total", endpoint="/v1/classify", status="200") >= 1
    assert metric(client, "badge_requests_total", endpoint="/v1/classify", status="422") >= 1
    assert metric(client, "badge_errors_total", kind="invalid") >= 1


def test_model_info_and_openapi_describe_the_served_folder(model_dir: Path) -> None:
    with TestClient(create_app(model_dir)) as http:
        info = http.get("/v1/model").json()
        openapi = http.get("/openapi.json").json()
    assert info["labels"] == LABELS
    assert (info["num_layers"], info["exit_layers"]) == (4, [1, 2, 3, 4])
    assert info["default_policy"] == "maxprob(tau=0.9)"
    assert "dge" in info["rules"] and "oracle" not in info["rules"]
    assert {"/v1/classify", "/v1/model", "/healthz", "/metrics"} <= set(openapi["paths"])


def test_a_forced_policy_runs_every_layer_and_refuses_overrides(served_model: MultiExitModel) -> None:
    with TestClient(create_app(served_model, force_policy=ExitPolicy("full"))) as http:
        answered = http.post("/v1/classify", json={"texts": TEXTS[:3]}).json()
        refused = http.post("/v1/classify", json={"texts": "good", "policy": {"rule": "dge"}})
        info = http.get("/v1/model").json()
    assert [result["exit_layer"] for result in answered["results"]] == [4, 4, 4]
    assert answered["policy"] == "full()"
    assert refused.status_code == 422
    assert "fixed policy full()" in refused.json()["detail"][0]["msg"]
    assert info["policy_fixed"] is True


def test_allowed_rules_limit_what_a_request_may_choose(served_model: MultiExitModel) -> None:
    with TestClient(create_app(served_model, allowed_rules=["static"])) as http:
        refused = http.post("/v1/classify", json={"texts": "good", "policy": {"rule": "dge"}})
        allowed = http.post("/v1/classify", json={"texts": "good", "policy": {"rule": "static", "k": 2}})
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["loc"] == ["body", "policy", "rule"]
    assert allowed.json()["results"][0]["exit_layer"] == 2
    with pytest.raises(PolicyError, match="oracle"):
        create_app(served_model, allowed_rules=["oracle"])


# ----- admission control, deadlines, readiness, shutdown -------------------------------------
def test_a_full_queue_answers_503_with_retry_after_at_once(
    served_model: MultiExitModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serving(create_app(served_model, max_batch_size=1, max_queue=2, max_wait_ms=0)) as url:
        slow_down(served_model, monkeypatch, 0.6)

        async def scenario() -> tuple[list[httpx.Response], httpx.Response, httpx.Response, float, httpx.Response]:
            async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as http:
                running = asyncio.create_task(http.post("/v1/classify", json={"texts": "good"}))
                await asyncio.sleep(0.3)  # the first text is inside the model
                waiting = [asyncio.create_task(http.post("/v1/classify", json={"texts": "fine"}))]
                await asyncio.sleep(0.1)  # one text waits: two more do not fit, one does
                too_big = await http.post("/v1/classify", json={"texts": ["dull", "bad"]})
                waiting.append(asyncio.create_task(http.post("/v1/classify", json={"texts": "fun"})))
                await asyncio.sleep(0.1)  # now the queue is full
                start = time.perf_counter()
                refused = await http.post("/v1/classify", json={"texts": "one too many"})
                seconds = time.perf_counter() - start
                ready = await http.get("/readyz")
                return [await running, *await asyncio.gather(*waiting)], too_big, refused, seconds, ready

        accepted, too_big, refused, seconds, ready = asyncio.run(scenario())
        with httpx.Client(base_url=url, trust_env=False) as http:
            overloaded = metric(http, "badge_errors_total", kind="overloaded")
            ready_after = http.get("/readyz")
    assert [response.status_code for response in accepted] == [200, 200, 200]
    assert too_big.status_code == 503 and "1 texts already wait" in too_big.json()["detail"]
    assert refused.status_code == 503
    assert int(refused.headers["retry-after"]) >= 1
    assert "2 texts already wait for the model; the queue holds 2" in refused.json()["detail"]
    assert seconds < 0.25, "a refusal must not wait for the model"
    assert ready.status_code == 503 and "the queue is full (2 of 2 texts)" in ready.json()["reasons"]
    assert overloaded == 2
    assert ready_after.status_code == 200 and ready_after.json()["status"] == "ready"


def test_a_job_whose_deadline_passed_is_dropped_before_the_model_and_not_batched() -> None:
    calls: list[list[str]] = []
    dropped: list[int] = []

    classify = slow_constant_model(0.3, calls=calls)

    async def scenario() -> list:
        batcher = MicroBatcher(classify, max_batch_size=8, max_wait_ms=0, on_drop=dropped.append)
        batcher.start()
        now = asyncio.get_running_loop().time()
        first = asyncio.create_task(batcher.submit(["first"], None, ExitPolicy("full")))
        await asyncio.sleep(0.05)  # `first` runs alone; the next two wait for it
        late = asyncio.create_task(batcher.submit(["late"], None, ExitPolicy("full"), deadline=now + 0.15))
        on_time = asyncio.create_task(batcher.submit(["on time"], None, ExitPolicy("full"), deadline=now + 30))
        results = await asyncio.gather(first, late, on_time, return_exceptions=True)
        await batcher.stop()
        return results

    first, late, on_time = asyncio.run(scenario())
    assert isinstance(late, DeadlineExceeded)
    assert isinstance(first, EngineOutput) and isinstance(on_time, EngineOutput)
    assert calls == [["first"], ["on time"]], "the late text must never reach the model nor fill a batch place"
    assert dropped == [1]


def test_a_request_that_timed_out_while_queued_never_reaches_the_model(
    served_model: MultiExitModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serving(create_app(served_model, max_batch_size=1, max_queue=8, max_wait_ms=0, request_timeout_s=0.5)) as url:
        slow_down(served_model, monkeypatch, 0.4)
        with httpx.Client(base_url=url, trust_env=False) as http:
            texts_before = metric(http, "badge_batch_size_sum")
            responses = post_concurrently(url, [{"texts": text} for text in TEXTS[:4]])
            time.sleep(0.5)  # let the batcher reach (and drop) what is left in the queue
            texts_run = metric(http, "badge_batch_size_sum") - texts_before
            dropped = metric(http, "badge_dropped_texts_total")
    statuses = [response.status_code for response in responses]
    assert 504 in statuses
    assert texts_run + dropped == 4
    assert texts_run <= 2, f"only the texts the model could start in time may run, not {texts_run}"


def test_readiness_and_liveness_turn_false_when_the_batching_loop_dies(served_model: MultiExitModel) -> None:
    app = create_app(served_model)
    with serving(app) as url, httpx.Client(base_url=url, trust_env=False, timeout=30) as http:
        assert http.get("/readyz").json() == {"status": "ready", "reasons": [], "queued_texts": 0, "max_queue": ANY}
        assert http.post("/v1/classify", json={"texts": "good"}).status_code == 200

        def crash(texts: int) -> None:
            raise RuntimeError("simulated bug in the batching loop")

        app.state.batcher.on_engine_call = crash
        start = time.perf_counter()
        failed = http.post("/v1/classify", json={"texts": "good"})
        seconds = time.perf_counter() - start
        ready, health = http.get("/readyz"), http.get("/healthz")
        after = http.post("/v1/classify", json={"texts": "good"})
    assert failed.status_code == 503 and "simulated bug" in failed.json()["detail"]
    assert seconds < 5, "a dead loop must fail waiting requests at once, not at their timeout"
    assert ready.status_code == 503 and "the batching loop is not running" in ready.json()["reasons"]
    assert health.status_code == 503 and health.json()["status"] == "dead"
    assert after.status_code == 503


def test_shutdown_finishes_the_accepted_requests_then_refuses_connections(
    served_model: MultiExitModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serving_with_handle(create_app(served_model, max_batch_size=1, max_queue=8, max_wait_ms=0)) as (url, server):
        slow_down(served_model, monkeypatch, 0.3)

        async def scenario() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as http:
                accepted = [asyncio.create_task(http.post("/v1/classify", json={"texts": t})) for t in TEXTS[:3]]
                await asyncio.sleep(0.15)  # one runs, two wait in the queue
                server.should_exit = True  # what SIGTERM does
                return await asyncio.gather(*accepted)

        responses = asyncio.run(scenario())
        time.sleep(0.2)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", trust_env=False, timeout=5)
    assert [response.status_code for response in responses] == [200, 200, 200], [r.text for r in responses]
    assert all(len(response.json()["results"]) == 1 for response in responses)


def test_stopping_the_batcher_finishes_the_jobs_it_accepted() -> None:
    classify = slow_constant_model(0.1, label=1)

    async def scenario() -> tuple[list, Exception]:
        batcher = MicroBatcher(classify, max_batch_size=1, max_wait_ms=0)
        batcher.start()
        jobs = [asyncio.create_task(batcher.submit([text], None, ExitPolicy("full"))) for text in TEXTS[:3]]
        await asyncio.sleep(0.01)
        stopping = asyncio.create_task(batcher.stop())
        await asyncio.sleep(0.01)
        try:
            await batcher.submit(["too late"], None, ExitPolicy("full"))
        except BatcherStopped as error:
            refused = error
        await stopping
        return await asyncio.gather(*jobs, return_exceptions=True), refused

    results, refused = asyncio.run(scenario())
    assert [output.labels for output in results] == [[1], [1], [1]]
    assert "shutting down" in str(refused)


def test_a_body_that_does_not_arrive_in_time_gets_a_408_and_the_connection_closes(
    served_model: MultiExitModel,
) -> None:
    with serving(create_app(served_model, body_timeout_s=0.3)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as connection:
            start = time.perf_counter()
            connection.sendall(
                b"POST /v1/classify HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
                b'content-length: 100\r\n\r\n{"texts": '
            )
            answer = b""
            while chunk := connection.recv(4096):  # ends when the server closes the connection
                answer += chunk
            seconds = time.perf_counter() - start
    assert answer.startswith(b"HTTP/1.1 408")
    assert b"did not arrive within 0.3 s" in answer
    assert seconds < 3


@pytest.mark.parametrize(
    "batch_seconds, expected",
    [(0.05, 32 * 8), (0.1, 32 * 3), (0.2, 32 * 2), (2.0, 32 * 2)],
    ids=lambda value: str(value),
)
def test_the_default_queue_holds_what_the_latency_target_allows(batch_seconds: float, expected: int) -> None:
    assert derive_max_queue(32, batch_seconds, latency_target_ms=500) == expected


def test_the_derived_queue_bound_is_reported(model_dir: Path) -> None:
    with TestClient(create_app(model_dir, max_batch_size=4, latency_target_ms=10_000)) as http:
        info = http.get("/v1/model").json()
        ready = http.get("/readyz").json()
    assert info["max_queue"] == ready["max_queue"]
    assert info["max_queue"] % 4 == 0 and info["max_queue"] > 4


def test_the_warm_heap_is_frozen_while_serving_and_handed_back_at_shutdown(model_dir: Path) -> None:
    """A full collection must not walk the model and libraries under load; an embedding process gets its heap back."""
    gc.unfreeze()
    with TestClient(create_app(model_dir, max_batch_size=4)) as http:
        assert http.post("/v1/classify", json={"texts": TEXTS[0]}).status_code == 200
        frozen = gc.get_freeze_count()
    assert frozen > 10_000  # torch, transformers and the model's objects at the least
    assert gc.get_freeze_count() == 0
    with TestClient(create_app(model_dir, max_batch_size=4, freeze_gc=False)):
        assert gc.get_freeze_count() == 0


def test_a_saturated_model_holds_its_queue_to_one_batch_while_bursts_may_fill_max_queue() -> None:
    classify = slow_constant_model(0.25)

    burst_size = 2 * SATURATED_AFTER + 2  # full batches of 2 texts enough to saturate, and 2 texts still waiting

    async def scenario() -> tuple:
        batcher = MicroBatcher(classify, max_batch_size=2, max_wait_ms=0, max_queue=burst_size)
        batcher.start()
        burst = [asyncio.create_task(batcher.submit([f"t{i}"], None, ExitPolicy("full"))) for i in range(burst_size)]
        await asyncio.sleep(0.05)  # the burst fits max_queue: 2 texts run, the rest wait
        burst_limit, saturated_early = batcher.queue_limit, batcher.saturated
        await asyncio.sleep(0.25 * (SATURATED_AFTER - 1) + 0.05)  # the last of SATURATED_AFTER full batches runs
        saturated, overload_limit = batcher.saturated, batcher.queue_limit
        refused = None
        try:
            await batcher.submit(["one too many"], None, ExitPolicy("full"))
        except Overloaded as error:
            refused = str(error)
        results = await asyncio.gather(*burst)
        await batcher.submit(["alone"], None, ExitPolicy("full"))  # a batch that is not full
        after = batcher.saturated, batcher.queue_limit
        await batcher.stop()
        return burst_limit, saturated_early, saturated, overload_limit, refused, results, after

    burst_limit, saturated_early, saturated, overload_limit, refused, results, after = asyncio.run(scenario())
    assert burst_limit == burst_size and not saturated_early
    assert saturated and overload_limit == 2
    expected = "2 texts already wait for the model; the queue holds 2 now (the server is overloaded: it holds"
    assert refused is not None and f"{expected} {burst_size} for bursts)" in refused
    assert len(results) == burst_size and all(isinstance(result, EngineOutput) for result in results)
    assert after == (False, burst_size)
