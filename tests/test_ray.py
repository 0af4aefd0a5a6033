"""Ray (optional extra): Ray Data prediction and Ray Serve replicas answer like the single-process code.

These start a local Ray with 2 CPUs once for the module (about a minute in all on 2 busy cores) and are
marked `ray`: `pytest -m ray` runs only them, `pytest -m "not ray"` skips them. Without Ray installed
they are skipped.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'badge[ray]'")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is part of the extra: pip install 'badge[ray]'")

from conftest import SERVED_LABELS, SERVED_TEXTS, save_served_model  # noqa: E402

from badge import EarlyExitEngine, MultiExitModel  # noqa: E402
from badge.data import DataError  # noqa: E402
from badge.distributed import build_app, input_files, output_files, predict_on_ray, serve_on_ray  # noqa: E402
from badge.predict import predict_file  # noqa: E402

pytestmark = pytest.mark.ray

LABELS = SERVED_LABELS
TEXTS = SERVED_TEXTS[:10]


@pytest.fixture(scope="module")
def model_dir(tiny_encoder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved 4-layer model whose exits are spread, so texts leave at different layers."""
    return save_served_model(tiny_encoder, tmp_path_factory.mktemp("ray-model") / "model")


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Run the single-process reference with one torch thread, like each Ray worker, for bit-equal floats."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def write_inputs(folder: Path) -> Path:
    """A folder of three inputs: a CSV with rows without text, a JSON Lines file, and a CSV with no rows."""
    folder.mkdir()
    rows = [(text,) for text in TEXTS * 3]
    rows[4], rows[17] = ("",), ("   ",)
    (folder / "a.csv").write_text("text\n" + "".join(f'"{text}"\n' for (text,) in rows))
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in [*TEXTS, None, TEXTS[0]]))
    (folder / "c.csv").write_text("text\n")
    (folder / "notes.txt").write_text("not an input")
    return folder


def test_ray_data_prediction_writes_the_rows_of_single_process_predict(
    local_ray: None, model_dir: Path, tmp_path: Path, one_thread: None
) -> None:
    inputs = write_inputs(tmp_path / "inputs")
    with pytest.raises(DataError, match="c.csv has a header .* but no data rows"):  # as single-process predict
        predict_on_ray(model_dir, inputs, tmp_path / "out", batch_size=4, chunk_size=8, workers=2)
    assert not (tmp_path / "out").exists()  # refused before any work
    (inputs / "c.csv").unlink()
    summaries = predict_on_ray(model_dir, inputs, tmp_path / "out", batch_size=4, chunk_size=8, workers=2)
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["a.csv", "b.jsonl"]
    assert [(summary.rows, summary.errors) for summary in summaries] == [(30, 2), (12, 1)]
    engine = EarlyExitEngine(MultiExitModel.from_pretrained(model_dir), batch_size=4)
    for name in ("a.csv", "b.jsonl"):
        expected = tmp_path / f"single-{name}"
        predict_file(engine, inputs / name, expected, batch_size=8)
        assert (tmp_path / "out" / name).read_text() == expected.read_text(), name
    layers = {json.loads(line)["exit_layer"] for line in (tmp_path / "out" / "b.jsonl").read_text().splitlines()}
    assert len(layers - {None}) > 1, "the fixture should spread exits over layers"


def test_one_file_goes_to_the_target_and_a_folder_to_one_file_per_input(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "inputs")
    files = input_files(inputs)
    assert [path.name for path in files] == ["a.csv", "b.jsonl", "c.csv"]
    assert output_files(inputs, tmp_path / "out", files) == [
        tmp_path / "out" / name for name in ("a.csv", "b.jsonl", "c.csv")
    ]
    assert output_files(inputs / "b.jsonl", tmp_path / "b.csv", [inputs / "b.jsonl"]) == [tmp_path / "b.csv"]
    with pytest.raises(FileNotFoundError, match="neither a file nor a folder"):
        input_files(tmp_path / "missing")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ray_serve_replicas_answer_like_the_engine_with_the_same_api(local_ray: None, model_dir: Path) -> None:
    port = free_port()
    serve_on_ray(model_dir, replicas=2, port=port, threads=1, blocking=False, max_batch_size=8, max_queue=64)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    with httpx.Client(base_url=url, trust_env=False, timeout=30) as http:
        while http.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the Ray Serve replicas did not become ready"
            time.sleep(0.2)
        info = http.get("/v1/model").json()
        invalid = http.post("/v1/classify", json={"texts": []})

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as http:
            return await asyncio.gather(*(http.post("/v1/classify", json={"texts": text}) for text in TEXTS))

    responses = asyncio.run(send_all())
    serve.delete("badge")
    assert info["labels"] == LABELS and info["max_queue"] == 64
    assert invalid.status_code == 422 and "texts is empty" in invalid.json()["detail"][0]["msg"]
    assert [response.status_code for response in responses] == [200] * len(TEXTS)
    results = [response.json()["results"][0] for response in responses]
    expected = EarlyExitEngine(MultiExitModel.from_pretrained(model_dir)).classify(TEXTS)
    assert [result["label_id"] for result in results] == expected.labels
    assert [result["exit_layer"] for result in results] == expected.exit_layers.tolist()
    probabilities = torch.tensor([[result["probabilities"][name] for name in LABELS] for result in results])
    torch.testing.assert_close(probabilities, expected.probs, atol=1e-5, rtol=1e-5)


def test_the_application_builder_for_kuberay_needs_a_model_folder(model_dir: Path) -> None:
    application = build_app({"model_dir": str(model_dir), "replicas": 2, "max_batch_size": 8})
    assert isinstance(application, serve.Application)
    with pytest.raises(ValueError, match=r"lack model_dir"):
        build_app({"replicas": 2})
    with pytest.raises(ValueError, match="replicas 0"):
        build_app({"model_dir": str(model_dir), "replicas": 0})
