"""The `badge` command, used as a person would: train, evaluate, sweep, calibrate, predict."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from badge import MultiExitModel
from badge.cli import app
from badge.cli.evaluate import calibrate_rule_for

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


def test_sweep_chooses_on_validation_reports_on_test_and_writes_json_markdown_and_plot(
    trained, review_files, tmp_path
) -> None:
    best, _ = trained
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(best),
            "--data",
            str(review_files["test"]),
            "--validation-data",
            str(review_files["validation"]),
            "--sweep",
            "--output-dir",
            str(tmp_path),
            "--timing",
            "--timing-samples",
            "16",
            "--repeats",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    swept = json.loads((tmp_path / "sweep.json").read_text())
    assert swept["selection"] == str(review_files["validation"]) and swept["reported"] == str(review_files["test"])
    assert not swept["same_split"]
    rules = swept["comparison"]["rules"]
    assert {"dge-jsd", "dge-kl", "gate", "entropy", "maxprob", "patience", "pcee", "static"} <= set(rules)
    assert swept["comparison"]["oracle"] is not None and "oracle" not in rules  # a bound, never compared
    assert swept["comparison"]["reference"] == "entropy"  # the stored policy's rule
    low, high = rules["maxprob"]["difference"]["1.5x"]["interval"]
    assert low <= rules["maxprob"]["difference"]["1.5x"]["diff"] <= high
    assert swept["timed"] and all(t["wallclock_speedup"] > 0 for t in swept["timed"])
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    markdown = (tmp_path / "sweep.md").read_text()
    assert "Settings chosen on" in markdown and "optimistic" not in markdown
    assert "| rule | @1.5x | @2x | @3x | @common |" in markdown


def test_sweep_on_a_single_file_says_it_chose_and_reported_on_it(trained, review_files, tmp_path) -> None:
    best, _ = trained
    result = runner.invoke(
        app, ["evaluate", str(best), "--data", str(review_files["test"]), "--sweep", "--output-dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "Chosen and reported on the same split" in result.output
    assert json.loads((tmp_path / "sweep.json").read_text())["same_split"]


def test_max_length_is_stored_and_used_by_default(trained, review_files) -> None:
    best, _ = trained
    model = MultiExitModel.from_pretrained(best)
    assert model.config.max_seq_length == 32 and model.max_length() == 32
    assert json.loads((best / "config.json").read_text())["max_seq_length"] == 32
    assert model.max_length(16) == 16
    with pytest.raises(ValueError, match="max length 0 must be an integer >= 2"):
        model.max_length(0)
    with pytest.raises(ValueError, match="max length 100000 exceeds the 64 positions"):
        model.max_length(100_000)
    result = runner.invoke(app, ["evaluate", str(best), "--data", str(review_files["test"]), "--max-length", "-1"])
    assert result.exit_code == 2 and "--max-length: max length -1" in result.output


def test_oracle_is_refused_by_calibrate_and_predict(trained, review_files, tmp_path) -> None:
    best, _ = trained
    data = ["--validation", str(review_files["validation"])]
    result = runner.invoke(app, ["calibrate", str(best), "--rule", "oracle", "--speedup", "1.5", *data])
    assert result.exit_code == 2 and "needs the true labels" in result.output
    source = tmp_path / "in.csv"
    source.write_text("text\ngood film\n")
    result = runner.invoke(app, ["predict", str(best), str(source), str(tmp_path / "out.csv"), "--rule", "oracle"])
    assert result.exit_code == 2 and "needs the true labels" in result.output
    assert not (tmp_path / "out.csv").exists()


def test_evaluate_refuses_the_training_file(trained, review_files) -> None:
    best, _ = trained
    result = runner.invoke(app, ["evaluate", str(best), "--data", str(review_files["train"])])
    assert result.exit_code == 2
    assert "refusing to score" in result.output and "holds this model's training data" in result.output


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


def test_calibrate_fits_the_gate_on_validation_and_stores_it_as_readable_json(trained, review_files, tmp_path) -> None:
    best, _ = trained
    copy = tmp_path / "model"
    MultiExitModel.from_pretrained(best).save_pretrained(copy)
    files = ["--validation", str(review_files["validation"]), "--test", str(review_files["test"])]
    result = runner.invoke(app, ["calibrate", str(copy), "--rule", "gate", "--max-drop", "2", *files])
    assert result.exit_code == 0, result.output
    assert "stored exit policy gate(tau=" in result.output and "'weights':" not in result.output  # a summary
    stored = json.loads((copy / "exit_policy.json").read_text())
    assert stored["rule"] == "gate" and len(stored["gate"]["weights"]) == 3  # one per exit before the last
    source = tmp_path / "in.csv"
    source.write_text("text\ngood film\nbad film\n")
    result = runner.invoke(app, ["predict", str(copy), str(source), str(tmp_path / "out.csv")])
    assert result.exit_code == 0, result.output
    assert "policy gate(tau=" in result.output


@pytest.mark.parametrize(
    ("task", "rule"),
    [
        ("single_label_classification", "entropy"),
        ("multi_label_classification", "entropy"),  # the least sure label's entropy
        ("regression", "dge"),  # no class probabilities for entropy
    ],
)
def test_calibrate_falls_back_to_a_rule_the_task_allows(task: str, rule: str) -> None:
    assert calibrate_rule_for(task) == rule


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
    assert result.exit_code == 2 and "nothing-here does not exist" in result.output
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


@pytest.mark.parametrize("mode", ["int8", "int8-mixed"])
def test_evaluate_reports_the_int8_metric_next_to_the_float_one(trained, review_files, mode) -> None:
    best, _ = trained
    result = runner.invoke(app, ["evaluate", str(best), "--quantize", mode, "--data", str(review_files["test"])])
    assert result.exit_code == 0, result.output
    assert f"torch {mode}" in result.output


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
            "--attention-pooling",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "self-distillation 0.3 at T 3.0, gradient equilibrium" in result.output
    assert "pooling attention" in result.output
    config = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    expected = {"bypass_input": "tokens", "gamma_schedule": "depth", "gamma": 0.2, "distill_weight": 0.3}
    assert {key: config[key] for key in expected} == expected
    assert config["distill_temperature"] == 3.0 and config["gradient_equilibrium"] is True
    assert config["attention_pooling"] is True
    result = runner.invoke(app, [*common, "--output", str(tmp_path / "bad"), "--distill-weight", "2"])
    assert result.exit_code == 2 and "distill_weight 2.0 must lie in [0, 1]" in result.output


def test_training_seed_does_not_move_the_split_and_an_overlapping_split_is_refused(
    tiny_encoder, fake_rotten_tomatoes, tmp_path
) -> None:
    run = ["train", "--encoder", str(tiny_encoder), "--dataset", "rotten-tomatoes", "--epochs", "1"]
    for seed in ("0", "1"):
        result = runner.invoke(app, [*run, "--seed", seed, "--output", str(tmp_path / seed), "--max-length", "16"])
        assert result.exit_code == 0, result.output
    records = [MultiExitModel.from_pretrained(tmp_path / seed / "best").config.training_data for seed in ("0", "1")]
    assert records[0] == records[1]  # same split for both training seeds
    assert records[0]["train"] == {"dataset": "rotten-tomatoes", "split": "train", "split_seed": 0}
    best = str(tmp_path / "1" / "best")
    assert runner.invoke(app, ["evaluate", best, "--dataset", "rotten-tomatoes"]).exit_code == 0
    refused = runner.invoke(app, ["evaluate", best, "--dataset", "rotten-tomatoes", "--split-seed", "1"])
    assert refused.exit_code == 2 and "are in this model's training data" in refused.output
    refused = runner.invoke(
        app, ["calibrate", best, "--dataset", "rotten-tomatoes", "--split-seed", "1", "--speedup", "2"]
    )
    assert refused.exit_code == 2 and "refusing to score" in refused.output
