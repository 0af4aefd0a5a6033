"""The `badge` command, used as a person would: train, evaluate, sweep, calibrate, predict."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from badge import MultiExitModel
from badge.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tiny_encoder, review_files, tmp_path_factory):
    """A tiny model trained through the CLI (module-scoped: several tests read it)."""
    output = tmp_path_factory.mktemp("cli") / "run"
    result = runner.invoke(
        app,
        [
            "train",
            "--encoder",
            str(tiny_encoder),
            "--train",
            str(review_files["train"]),
            "--validation",
            str(review_files["validation"]),
            "--test",
            str(review_files["test"]),
            "--output",
            str(output),
            "--epochs",
            "3",
            "--pooling",
            "mean",
            "--max-length",
            "32",
            "--encoder-lr",
            "3e-3",
            "--head-lr",
            "5e-3",
        ],
    )
    assert result.exit_code == 0, result.output
    return output / "best", result.output


def test_help_reads_well() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "evaluate", "calibrate", "predict", "serve", "quickstart"):
        assert command in result.output
    train_help = runner.invoke(app, ["train", "--help"]).output
    assert "--scheme" in train_help and "--resume" in train_help


def test_train_prints_per_exit_tables_and_saves_a_loadable_model(trained) -> None:
    best, output = trained
    assert "validation after epoch 3" in output and "test split" in output and "FLOPs" in output
    model = MultiExitModel.from_pretrained(best)
    assert model.num_layers == 4 and model.label_names == ["negative", "positive"]


def test_evaluate_prints_every_exit(trained, review_files) -> None:
    best, _ = trained
    result = runner.invoke(app, ["evaluate", str(best), "--data", str(review_files["test"]), "--max-length", "32"])
    assert result.exit_code == 0, result.output
    assert "exit layer" in result.output and "mean" in result.output


def test_sweep_writes_json_markdown_and_plot(trained, review_files, tmp_path) -> None:
    best, _ = trained
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(best),
            "--data",
            str(review_files["validation"]),
            "--sweep",
            "--output-dir",
            str(tmp_path),
            "--timing",
            "front",
            "--timing-samples",
            "16",
            "--repeats",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    swept = json.loads((tmp_path / "sweep.json").read_text())
    curves = {p["curve"] for p in swept["points"]}
    assert {"dge-jsd", "dge-kl", "entropy", "maxprob", "patience", "pcee", "static", "oracle"} <= curves
    assert any(p["wallclock_speedup"] is not None for p in swept["points"])
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert "| rule | AUC |" in (tmp_path / "sweep.md").read_text()


def test_calibrate_stores_the_policy_in_the_model_folder(trained, review_files, tmp_path) -> None:
    best, _ = trained
    copy = tmp_path / "model"
    MultiExitModel.from_pretrained(best).save_pretrained(copy)
    result = runner.invoke(
        app,
        [
            "calibrate",
            str(copy),
            "--rule",
            "entropy",
            "--speedup",
            "1.5",
            "--validation",
            str(review_files["validation"]),
            "--test",
            str(review_files["test"]),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "chosen on" in result.output and "reported on" in result.output
    stored = json.loads((copy / "exit_policy.json").read_text())
    assert stored["rule"] == "entropy"
    assert MultiExitModel.from_pretrained(copy).config.exit_policy == stored


def test_predict_streams_a_file_and_keeps_rows_with_empty_text(trained, tmp_path) -> None:
    best, _ = trained
    source = tmp_path / "in.csv"
    with source.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text"])
        writer.writerows([["the movie was great"], [""], ["dull and boring plot"], ["a lovely film"]])
    target = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["predict", str(best), str(source), str(target), "--rule", "static:2"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["row"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["error"] and rows[1]["label"] is None
    assert {r["exit_layer"] for r in rows if r["label"]} == {2}
    assert all(r["label"] in ("negative", "positive") for r in rows if r["label"])


def test_bad_inputs_get_a_clear_error_and_exit_code_2(trained, tiny_encoder, review_files, tmp_path) -> None:
    best, _ = trained
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nthe movie was great,positive\nquite dull,positve\n")
    result = runner.invoke(
        app,
        [
            "train",
            "--encoder",
            str(tiny_encoder),
            "--train",
            str(review_files["train"]),
            "--validation",
            str(bad),
            "--output",
            str(tmp_path / "x"),
        ],
    )
    assert result.exit_code == 2 and "positve" in result.output
    result = runner.invoke(app, ["evaluate", str(tmp_path / "nothing-here"), "--data", str(bad)])
    assert result.exit_code == 2 and "config.json is missing" in result.output
    result = runner.invoke(app, ["predict", str(best), str(bad), str(tmp_path / "o.csv"), "--rule", "entropi"])
    assert result.exit_code == 2 and "unknown exit rule 'entropi'" in result.output
    result = runner.invoke(app, ["calibrate", str(best), "--data-missing"])
    assert result.exit_code != 0


def test_export_then_evaluate_predict_with_the_onnx_engine(trained, review_files, tmp_path) -> None:
    best, _ = trained
    export = tmp_path / "onnx"
    result = runner.invoke(app, ["export", str(best), str(export), "--format", "onnx"])
    assert result.exit_code == 0, result.output
    report = runner.invoke(app, ["evaluate", str(export), "--engine", "onnx", "--data", str(review_files["test"])])
    assert report.exit_code == 0, report.output
    assert "onnx" in report.output and "mean exit layer" in report.output
    source = tmp_path / "in.csv"
    source.write_text("text\nthe movie was great\ndull and boring plot\n")
    onnx_out, torch_out = tmp_path / "onnx.jsonl", tmp_path / "torch.jsonl"
    assert runner.invoke(app, ["predict", str(export), str(source), str(onnx_out), "--engine", "onnx"]).exit_code == 0
    assert runner.invoke(app, ["predict", str(best), str(source), str(torch_out)]).exit_code == 0
    onnx_rows = [json.loads(line) for line in onnx_out.read_text().splitlines()]
    torch_rows = [json.loads(line) for line in torch_out.read_text().splitlines()]
    assert [(r["label"], r["exit_layer"]) for r in onnx_rows] == [(r["label"], r["exit_layer"]) for r in torch_rows]
    wrong = runner.invoke(app, ["predict", str(best), str(source), str(onnx_out), "--engine", "onnx"])
    assert wrong.exit_code == 2 and "badge export" in wrong.output


def test_evaluate_reports_the_int8_metric_next_to_the_float_one(trained, review_files) -> None:
    best, _ = trained
    result = runner.invoke(app, ["evaluate", str(best), "--quantize", "int8", "--data", str(review_files["test"])])
    assert result.exit_code == 0, result.output
    assert "torch int8" in result.output


def test_prune_saves_a_smaller_model_that_reloads(trained, review_files, tmp_path) -> None:
    best, _ = trained
    result = runner.invoke(
        app,
        [
            "prune",
            str(best),
            str(tmp_path / "pruned"),
            "--heads",
            "0.5",
            "--validation",
            str(review_files["validation"]),
        ],
    )
    assert result.exit_code == 0, result.output
    pruned = MultiExitModel.from_pretrained(tmp_path / "pruned")
    original = MultiExitModel.from_pretrained(best)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in original.parameters())
    kept = pruned.config.heads_kept.values()
    assert sum(len(heads) for heads in kept) == 8 and all(heads for heads in kept)  # half of 4 x 4, ranked globally
    assert runner.invoke(app, ["prune", str(best), str(tmp_path / "x"), "--heads", "1.5"]).exit_code == 2


def test_train_options_for_distillation_and_bypass_v2_reach_config_json(tiny_encoder, review_files, tmp_path) -> None:
    common = ["train", "--encoder", str(tiny_encoder), "--train", str(review_files["train"])]
    common += ["--validation", str(review_files["validation"]), "--max-length", "32", "--pooling", "mean"]
    result = runner.invoke(
        app,
        [
            *common,
            "--output",
            str(tmp_path / "run"),
            "--epochs",
            "1",
            "--scheme",
            "bb2_distill",
            "--distill-weight",
            "0.3",
            "--distill-temperature",
            "3",
            "--gamma",
            "0.2",
            "--gradient-equilibrium",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "self-distillation 0.3 at T 3.0, gradient equilibrium" in result.output
    config = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    expected = {"bypass_input": "tokens", "gamma_schedule": "depth", "gamma": 0.2, "distill_weight": 0.3}
    assert {key: config[key] for key in expected} == expected
    assert config["distill_temperature"] == 3.0 and config["gradient_equilibrium"] is True
    result = runner.invoke(app, [*common, "--output", str(tmp_path / "bad"), "--distill-weight", "2"])
    assert result.exit_code == 2 and "distill_weight 2.0 must lie in [0, 1]" in result.output
