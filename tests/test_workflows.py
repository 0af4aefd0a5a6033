"""badge.workflows and badge.calibration: what the commands do, called from Python, with the same refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from badge import ExitPolicy, MultiExitModel
from badge.calibration import calibrate_and_store
from badge.data import load_file
from badge.workflows import UsageError, labelled_split, load_model, policy_from_options

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def saved_model(tiny_encoder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("workflows") / "model"
    MultiExitModel.from_encoder(tiny_encoder, label_names=["negative", "positive"]).save_pretrained(folder)
    return folder


def test_policy_options_give_a_policy_or_none() -> None:
    assert policy_from_options(None, None, None, None) is None
    policy = policy_from_options("dge", 0.2, None, "kl")
    assert policy == ExitPolicy(rule="dge", tau=0.2, divergence="kl")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ((None, 0.3, None, None), "--tau, --patience and --divergence need --rule"),
        (("oracle", None, None, None), "rule 'oracle' needs the true labels"),
        (("no-such-rule", None, None, None), "no-such-rule"),
    ],
)
def test_policy_options_refuse_what_cannot_be_deployed(options: tuple, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        policy_from_options(*options)


def test_a_benchmark_refuses_tau_without_rule_instead_of_ignoring_it(saved_model: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "speed.py"), str(saved_model), "--tau", "0.3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "--tau, --patience and --divergence need --rule" in done.stderr


def test_labelled_split_names_a_missing_split(saved_model: Path, review_files: dict[str, Path]) -> None:
    model = load_model(saved_model, "cpu")
    evaluated, name = labelled_split(model, None, "test", review_files["test"], "text", None, "label", 0)
    assert name == str(review_files["test"]) and len(evaluated) > 0
    with pytest.raises(UsageError, match="give --dataset"):
        labelled_split(model, None, "test", None, "text", None, "label", 0)


def test_calibrate_and_store_returns_and_stores_the_chosen_setting(
    saved_model: Path, review_files: dict[str, Path], tmp_path: Path
) -> None:
    model = load_model(saved_model, "cpu")
    validation = load_file(review_files["validation"], label_names=model.label_names)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    chosen = calibrate_and_store(model, folder, (validation, "validation"), None, "entropy", None, 1.0, 32)
    assert chosen.curve == "entropy" and chosen.layer_speedup >= 1.0
    assert MultiExitModel.from_pretrained(folder).config.exit_policy == chosen.policy
    with pytest.raises(UsageError, match="no entropy setting reaches 99"):
        calibrate_and_store(model, folder, (validation, "validation"), None, "entropy", None, 99.0, 32, dry_run=True)
