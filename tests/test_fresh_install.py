"""A fresh virtual environment with a plain `pip install .` (no extras) trains, evaluates, calibrates and
predicts, and the commands that need an extra name it. Slow (it installs badge and its dependencies), so
it runs only when asked: `BADGE_FRESH_INSTALL=1 python -m pytest tests/test_fresh_install.py`.

torch is installed first at the version this interpreter runs (a local CPU build where there is one), so
the check measures badge's own dependency resolution rather than a multi-gigabyte GPU download.
"""

from __future__ import annotations

import os
import subprocess
import venv
from pathlib import Path

import pytest
import torch
from conftest import make_reviews, write_csv

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    os.environ.get("BADGE_FRESH_INSTALL") != "1", reason="installs into a new venv: set BADGE_FRESH_INSTALL=1"
)


def run(*command: str | Path, expect: int = 0) -> str:
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    output = done.stdout + done.stderr
    assert done.returncode == expect, f"{command} exited {done.returncode}:\n{output[-3000:]}"
    return output


def test_plain_install_runs_the_core_commands_and_names_missing_extras(tiny_encoder: Path, tmp_path: Path) -> None:
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=True)
    python, badge = environment / "bin" / "python", environment / "bin" / "badge"
    run(python, "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}")
    run(python, "-m", "pip", "install", "-q", ROOT)
    absent = run(
        python,
        "-c",
        "import importlib.util as u; print([m for m in ('fastapi', 'uvicorn', 'onnxruntime', 'onnx', 'matplotlib',"
        " 'datasets', 'httpx') if u.find_spec(m)])",
    )
    assert absent.strip() == "[]", f"a plain install brought optional packages: {absent}"

    data = {split: write_csv(tmp_path / f"{split}.csv", make_reviews(48, seed=i)) for i, split in enumerate("abc")}
    train, validation, test = data["a"], data["b"], data["c"]
    output = tmp_path / "run"
    run(
        badge, "train", "--encoder", tiny_encoder, "--train", train, "--validation", validation, "--test", test,
        "--output", output, "--epochs", "1", "--max-length", "32", "--device", "cpu",
    )  # fmt: skip
    best = output / "best"
    assert "exit" in run(badge, "evaluate", best, "--data", test, "--max-length", "32")
    sweep = run(badge, "evaluate", best, "--data", test, "--sweep", "--output-dir", tmp_path / "s")
    assert "pip install 'badge[plots]'" in sweep and (tmp_path / "s" / "sweep.json").is_file()
    run(badge, "calibrate", best, "--validation", validation, "--rule", "entropy", "--max-drop", "5")
    run(badge, "predict", best, test, tmp_path / "predictions.csv", "--device", "cpu")
    assert len((tmp_path / "predictions.csv").read_text().splitlines()) == 49  # header and 48 rows

    serve = run(badge, "serve", best, expect=2)
    assert "pip install 'badge[serve]'" in serve
    export = run(badge, "export", best, tmp_path / "onnx", expect=2)
    assert "pip install 'badge[onnx]'" in export
