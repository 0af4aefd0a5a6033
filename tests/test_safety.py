"""A user's files, models and machine are safe: nothing deleted, no foreign code, no silent wrong answers."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
from conftest import make_encoder
from typer.testing import CliRunner

from badge import MultiExitModel
from badge.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tiny_encoder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny model saved as a BADGE folder (module-scoped: tests copy it before changing it)."""
    model = MultiExitModel.from_encoder(tiny_encoder, label_names=["negative", "positive"], max_seq_length=32)
    folder = tmp_path_factory.mktemp("safety") / "model"
    model.save_pretrained(folder)
    return folder


def copy_model(model_dir: Path, tmp_path: Path, name: str = "model") -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / name))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ----- 1. saving writes only its own files ------------------------------------------------------
def test_saving_a_model_again_keeps_the_sweep_report_and_readme_and_uses_ordinary_permissions(
    model_dir: Path, tmp_path: Path
) -> None:
    folder = copy_model(model_dir, tmp_path)
    (folder / "README.md").write_text("my notes")
    (folder / "sweep").mkdir()
    (folder / "sweep" / "sweep.json").write_text("{}")
    (folder / "model-00001-of-00002.safetensors").write_text("a shard an earlier save left")
    previous = os.umask(0o022)
    try:
        model = MultiExitModel.from_pretrained(folder)
        model.config.exit_policy = {"rule": "entropy", "tau": 0.2}
        model.save_pretrained(folder)  # what `badge calibrate` does
    finally:
        os.umask(previous)
    assert (folder / "README.md").read_text() == "my notes"
    assert (folder / "sweep" / "sweep.json").read_text() == "{}"
    assert not (folder / "model-00001-of-00002.safetensors").exists(), "a stale shard of ours is removed"
    assert MultiExitModel.from_pretrained(folder).config.exit_policy == {"rule": "entropy", "tau": 0.2}
    assert mode(folder / "model.safetensors") == 0o644 and mode(folder / "config.json") == 0o644
    fresh = tmp_path / "fresh"
    previous = os.umask(0o022)
    try:
        model.save_pretrained(fresh)
    finally:
        os.umask(previous)
    assert mode(fresh) == 0o755 and mode(fresh / "model.safetensors") == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder is left behind"


def test_export_and_prune_keep_unrelated_files_and_never_write_over_the_source(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = runner.invoke(app, ["export", str(model_dir), str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "notes.txt").read_text() == "keep me" and (out / "manifest.json").is_file()

    weights = (model_dir / "model.safetensors").read_bytes()
    for command in (["export", str(model_dir), str(model_dir)], ["prune", str(model_dir), str(model_dir)]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        assert "is the folder being read" in result.output
    assert (model_dir / "model.safetensors").read_bytes() == weights

    result = runner.invoke(app, ["prune", str(model_dir), str(out)])  # a model over an ONNX export
    assert result.exit_code == 2 and "holds an onnx export" in result.output, result.output
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    (pruned / "README.md").write_text("model card")
    result = runner.invoke(app, ["prune", str(model_dir), str(pruned), "--heads", "0.25"])
    assert result.exit_code == 0, result.output
    assert (pruned / "README.md").read_text() == "model card"
    assert MultiExitModel.from_pretrained(pruned).config.heads_kept


# ----- 2. predict never writes over its input -----------------------------------------------------
def test_predict_refuses_to_write_over_its_own_input_before_any_work(model_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "data.csv"
    source.write_text("text\nthe movie was great\n")
    for target in (source, tmp_path / "." / "data.csv"):
        result = runner.invoke(app, ["predict", str(model_dir), str(source), str(target)])
        assert result.exit_code == 2 and "is the input file" in result.output, result.output
    assert source.read_text() == "text\nthe movie was great\n"
    result = runner.invoke(app, ["predict", str(model_dir), str(source), str(tmp_path)])
    assert result.exit_code == 2 and "is a folder" in result.output, result.output


# ----- 3. a finished run is not overwritten by accident ---------------------------------------------
def test_training_into_an_existing_run_needs_resume_or_overwrite(tiny_encoder: Path, review_files, tmp_path) -> None:
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / "best" / "config.json").write_text("{}")
    command = ["train", "--encoder", str(tiny_encoder), "--train", str(review_files["train"]), "--output", str(run)]
    result = runner.invoke(app, command)
    assert result.exit_code == 2, result.output
    assert "already holds a run" in result.output and "--resume" in result.output and "--overwrite" in result.output
    assert (run / "best" / "config.json").read_text() == "{}"
    result = runner.invoke(app, [*command, "--resume", "--overwrite"])
    assert result.exit_code == 2 and "not both" in result.output


# ----- 4. a diverged run stops and keeps its last good checkpoint ------------------------------------
def test_a_loss_that_becomes_nan_stops_training_and_is_never_saved_as_best(
    tiny_encoder: Path, review_files, tmp_path, monkeypatch
) -> None:
    from badge.data import load_file
    from badge.training import TrainingArguments, TrainingDiverged, train

    task_loss = MultiExitModel.task_loss
    calls = {"n": 0}

    def loss_that_diverges(self, logits, labels):  # finite for the first 6 steps (4 exits each), then NaN
        calls["n"] += 1
        loss = task_loss(self, logits, labels)
        return loss * float("nan") if calls["n"] > 6 * 4 else loss

    monkeypatch.setattr(MultiExitModel, "task_loss", loss_that_diverges)
    train_data, validation = load_file(review_files["train"]), load_file(review_files["validation"])
    model = MultiExitModel.from_encoder(tiny_encoder, label_names=train_data.label_names)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), epochs=1, max_length=32, save_steps=5)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 7 .*last checkpoint .*step 5"):
        train(model, train_data, validation, args)
    assert not (tmp_path / "run" / "best").exists()
    saved = MultiExitModel.from_pretrained(tmp_path / "run" / "checkpoint" / "model")
    assert all(bool(p.isfinite().all()) for p in saved.parameters())

    result = runner.invoke(
        app,
        ["train", "--encoder", str(tiny_encoder), "--train", str(review_files["train"]), "--output",
         str(tmp_path / "nan"), "--encoder-lr", "nan"],
    )  # fmt: skip
    assert result.exit_code == 2 and "encoder_lr nan must be a finite number" in result.output, result.output


# ----- 6. no code shipped in a folder runs, and nothing is read from standard input ----------------------
class _WatchedStdin:
    """Standard input of a person who would answer "y"; records every read."""

    def __init__(self) -> None:
        self.reads = 0

    def readline(self, *args) -> str:
        self.reads += 1
        return "y\n"

    read = readline

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("config_file", ["tokenizer_config.json", "config.json"])
def test_a_folder_asking_to_run_its_own_code_is_refused_without_a_prompt(
    model_dir: Path, tiny_encoder: Path, tmp_path, monkeypatch, config_file: str
) -> None:
    import json
    import sys

    marker = tmp_path / "code-ran"
    for folder in (copy_model(model_dir, tmp_path), Path(shutil.copytree(tiny_encoder, tmp_path / "encoder"))):
        settings = json.loads((folder / config_file).read_text())
        settings.pop("tokenizer_class", None)
        settings["auto_map"] = {"AutoTokenizer": ["shipped.Tokenizer", None], "AutoConfig": "shipped.Config"}
        (folder / config_file).write_text(json.dumps(settings))
        (folder / "shipped.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    stdin = _WatchedStdin()
    monkeypatch.setattr(sys, "stdin", stdin)
    (tmp_path / "in.csv").write_text("text\na great film\n")
    result = runner.invoke(app, ["predict", str(tmp_path / "model"), str(tmp_path / "in.csv"), str(tmp_path / "o.csv")])
    assert result.exit_code == 2 and "never runs code shipped" in result.output, result.output
    with pytest.raises(ValueError, match="never runs code shipped"):
        MultiExitModel.from_encoder(tmp_path / "encoder", label_names=["a", "b"])
    assert not marker.exists() and stdin.reads == 0


# ----- 5. a model folder without its vocabulary is refused, not run with a 5-token tokenizer -------------
def test_a_model_folder_without_its_vocabulary_is_refused_instead_of_labelling_every_row_the_same(
    model_dir: Path, tmp_path: Path
) -> None:
    folder = copy_model(model_dir, tmp_path)
    for name in ("tokenizer.json", "vocab.txt"):
        (folder / name).unlink(missing_ok=True)
    data = tmp_path / "in.csv"
    data.write_text("text,label\na great film,positive\na dull film,negative\n")
    for command in (
        ["predict", str(folder), str(data), str(tmp_path / "o.csv")],
        ["evaluate", str(folder), "--data", str(data)],
    ):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        assert "has no tokenizer vocabulary" in result.output and "tokenizer.json" in result.output
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    result = runner.invoke(app, ["evaluate", str(folder), "--data", str(data)])
    assert result.exit_code == 2 and "has no tokenizer files" in result.output, result.output


# ----- 7. resume checks its settings, leaves no debris and finds a checkpoint a kill left aside -----------
def test_resume_names_a_changed_setting_and_recovers_a_checkpoint_a_kill_left_aside(
    tiny_encoder: Path, review_files, tmp_path
) -> None:
    run = tmp_path / "run"
    base = [
        "train",
        "--encoder",
        str(tiny_encoder),
        "--train",
        str(review_files["train"]),
        "--validation",
        str(review_files["validation"]),
        "--output",
        str(run),
        "--max-length",
        "32",
        "--epochs",
        "0.25",
    ]
    result = runner.invoke(app, base)  # 4 steps of 16 rows: its checkpoint is at step 4
    assert result.exit_code == 0, result.output
    # A kill between the two renames of a checkpoint save: the checkpoint is aside, a staging folder is left.
    os.replace(run / "checkpoint", run / ".checkpoint.old")
    (run / ".checkpoint.k3j2x9").mkdir()
    result = runner.invoke(app, [*base, "--batch-size", "8", "--resume"])
    assert result.exit_code == 2, result.output
    assert "batch_size 16 (this run: 8)" in result.output and "--overwrite" in result.output
    other = make_encoder(tmp_path / "other", layers=2)
    result = runner.invoke(app, [*base, "--resume", "--encoder", str(other)])
    assert result.exit_code == 2 and "encoder" in result.output and "Traceback" not in result.output, result.output
    result = runner.invoke(app, [*base, "--resume", "--save-steps", "50"])  # a setting that does not matter
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output and "step 4" in result.output
    assert sorted(p.name for p in run.iterdir()) == ["best", "checkpoint"]
    assert mode(run / "checkpoint") == mode(run / "best")


def test_resume_unpickles_nothing_and_names_a_damaged_checkpoint_file(
    tiny_encoder: Path, review_files, tmp_path, monkeypatch
) -> None:
    import pickle

    import torch

    import badge.training
    from badge.data import load_file
    from badge.training import TrainingArguments, train

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    run = tmp_path / "run"
    train_data, validation = load_file(review_files["train"]), load_file(review_files["validation"])
    model = MultiExitModel.from_encoder(tiny_encoder, label_names=train_data.label_names)
    args = TrainingArguments(output_dir=str(run), epochs=1, max_length=32, save_steps=5)
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(badge.training, "_end_of_epoch", interrupt)  # killed at step 16: the checkpoint is at 15
        train(model, train_data, validation, args)

    def unpickle(*args, **kwargs):
        raise AssertionError("a file of the run folder was unpickled")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, unpickle)
    command = ["train", "--encoder", str(tiny_encoder), "--train", str(review_files["train"]), "--validation",
               str(review_files["validation"]), "--output", str(run), "--max-length", "32", "--epochs", "1",
               "--save-steps", "5", "--resume"]  # fmt: skip
    intact = shutil.copytree(run / "checkpoint", tmp_path / "intact")
    for name, damage in (("rng_state_0.safetensors", b"not a checkpoint"), ("scheduler.json", b"{")):
        (run / "checkpoint" / name).write_bytes(damage)
        result = runner.invoke(app, command)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert f"{name} cannot be read" in result.output and "--overwrite" in result.output, result.output
        shutil.copy(intact / name, run / "checkpoint" / name)
    result = runner.invoke(app, command)  # optimizer, schedule and random state read back mid-epoch
    assert result.exit_code == 0 and "step 15" in result.output, result.output


# ----- 9. predict reads as training does, answers every bad row, and resumes -----------------------------
def test_predict_writes_an_error_row_for_each_unreadable_row_with_the_reason_training_gives(
    model_dir: Path, tmp_path: Path
) -> None:
    import json

    from badge.data import DataError, load_file

    lines = [
        '{"text": "a great film"}',
        "[1, 2]",
        '[{"text": "one line"}, {"text": "holding an array"}]',
        '{"review": "no text key"}',
        "{not json",
        '{"text": "", "label": "positive"}',
        '{"text": "the plot was dull"}',
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    target = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["predict", str(model_dir), str(source), str(target)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["row"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert [bool(r["error"]) for r in rows] == [False, True, True, True, True, True, False]
    assert "is [1, 2]; expected an object" in rows[1]["error"] and 'no "text" field' in rows[3]["error"]
    assert "not valid JSON" in rows[4]["error"] and "is empty" in rows[5]["error"]
    for number in (2, 4, 5):  # training stops at the same row with the same words
        single = tmp_path / f"row{number}.jsonl"
        single.write_text('{"text": "fine"}\n' * (number - 1) + lines[number - 1] + "\n")
        with pytest.raises(DataError) as raised:
            load_file(single, require_labels=False)
        assert str(raised.value).replace(str(single), "F") == rows[number - 1]["error"].replace(str(source), "F")

    long_csv = tmp_path / "long.csv"
    long_csv.write_bytes("\ufefftext\n".encode() + b'"' + b"good " * 220_000 + b'"\nquite dull\n')  # BOM, 1 MB field
    result = runner.invoke(app, ["predict", str(model_dir), str(long_csv), str(tmp_path / "long.csv.out.csv")])
    assert result.exit_code == 0, result.output
    assert len(list(csv_rows(tmp_path / "long.csv.out.csv"))) == 2

    for empty, expected in (("", "is empty"), ("text\n", "has a header")):
        (tmp_path / "empty.csv").write_text(empty)
        result = runner.invoke(app, ["predict", str(model_dir), str(tmp_path / "empty.csv"), str(tmp_path / "e.csv")])
        assert result.exit_code == 2 and expected in result.output, result.output
        assert not (tmp_path / "e.csv").exists() and not (tmp_path / "e.csv.partial").exists()


def csv_rows(path: Path) -> list[dict]:
    import csv

    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_an_interrupted_predict_resumes_to_exactly_the_rows_of_an_uninterrupted_run(
    model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    from badge.engine import EarlyExitEngine

    source = tmp_path / "in.csv"
    texts = [f"the film was {'good' if i % 3 else 'dull'} and {'' if i % 7 else 'warm'}" for i in range(60)]
    texts[10] = " "
    source.write_text("text\n" + "\n".join(texts) + "\n")
    whole, resumed = tmp_path / "whole.csv", tmp_path / "resumed.csv"
    command = ["predict", str(model_dir), str(source)]
    assert runner.invoke(app, [*command, str(whole), "--batch-size", "1"]).exit_code == 0

    classify, calls = EarlyExitEngine.classify, {"n": 0}

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return classify(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(EarlyExitEngine, "classify", interrupted)
        result = runner.invoke(app, [*command, str(resumed), "--batch-size", "1"])  # 8 rows per engine batch
    assert result.exit_code == 130 and "--resume" in result.output, result.output
    partial = tmp_path / "resumed.csv.partial"
    assert not resumed.exists() and len(csv_rows(partial)) == 19  # rows 1-8, 9-10, the empty 11, 12-19
    with partial.open("a") as handle:
        handle.write("20,posit")  # a record the kill cut in half
    result = runner.invoke(app, [*command, str(resumed), "--batch-size", "1", "--resume"])
    assert result.exit_code == 0, result.output
    assert resumed.read_bytes() == whole.read_bytes() and not partial.exists()
    result = runner.invoke(app, [*command, str(resumed), "--resume"])
    assert result.exit_code == 2 and "no partial output" in result.output


# ----- 10. labels mean what they say --------------------------------------------------------------------
def test_numeric_labels_make_the_classes_a_person_means_and_gaps_or_duplicate_columns_are_refused(
    tmp_path: Path,
) -> None:
    from badge.data import DataError, load_file

    mixed = tmp_path / "mixed.csv"
    mixed.write_text("text,label\na,0\nb,1\nc,1.0\nd,0.0\n")
    loaded = load_file(mixed)
    assert loaded.label_names == ["0", "1"] and loaded.labels == [0, 1, 1, 0]
    jsonl = tmp_path / "numbers.jsonl"
    jsonl.write_text('{"text": "a", "label": 1.0}\n{"text": "b", "label": 0}\n')
    assert load_file(jsonl).labels == [1, 0]

    for labels, shown in (([0, 1000000], r"ids 1, 2, 3, 4, 5 \.\.\. \(999999 in all\) never appear"),
                          ([1, 2, 3, 4, 5], r"ids 0 never appear; number the 5 classes 0\.\.4")):  # fmt: skip
        path = tmp_path / "ids.csv"
        path.write_text("text,label\n" + "".join(f"t{label},{label}\n" for label in labels))
        with pytest.raises(DataError, match=shown):
            load_file(path)
    fraction = tmp_path / "fraction.csv"
    fraction.write_text("text,label\na,0\nb,0.5\n")
    with pytest.raises(DataError, match=r'label "0.5" in row 2 .* is a fraction'):
        load_file(fraction)

    twice = tmp_path / "twice.csv"
    twice.write_text("text,label,text\na,0,b\n")
    with pytest.raises(DataError, match=r'names the column\(s\) \["text"\] more than once'):
        load_file(twice)
    keys = tmp_path / "keys.jsonl"
    keys.write_text('{"text": "a", "label": 0, "text": "b"}\n')
    with pytest.raises(DataError, match=r'row 1 \(line 1\) of .* names the key\(s\) \["text"\] more than once'):
        load_file(keys)


# ----- 8. lengths and steps out of range are refused up front ---------------------------------------------
@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--max-length", "0", "max_length 0 must be an integer >= 2"),
        ("--max-length", "-1", "max_length -1 must be an integer >= 2"),
        ("--max-length", "100", "max length 100 exceeds the 64 positions of this bert encoder"),
        ("--save-steps", "0", "save_steps 0 must be an integer >= 1"),
    ],
)
def test_train_refuses_a_max_length_or_save_steps_out_of_range(
    tiny_encoder: Path, review_files, tmp_path, option: str, value: str, message: str
) -> None:
    command = ["train", "--encoder", str(tiny_encoder), "--train", str(review_files["train"])]
    result = runner.invoke(app, [*command, "--output", str(tmp_path / "run"), option, value])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "run" / "checkpoint").exists()


# ----- 11. a malformed model folder gets a message, not a stack trace ------------------------------------
@pytest.mark.parametrize(
    ("file", "change", "message"),
    [
        ("config.json", {"num_labels": "two"}, "config.json cannot be read as a BADGE model config"),
        ("config.json", {"id2label": ["a", "b"]}, "config.json cannot be read as a BADGE model config"),
        ("config.json", {"gamma": "high"}, "config.json cannot be read as a BADGE model config"),
        ("exit_policy.json", {"rule": "fastest"}, "unknown exit rule 'fastest'"),
        ("exit_policy.json", {"rule": "entropy", "tau": "high"}, "tau 'high' must be a number"),
        ("exit_policy.json", {"rule": "patience", "patience": 1.5}, "patience 1.5 must be an integer"),
    ],
    ids=lambda value: str(value)[:30],
)
def test_a_malformed_model_folder_gets_a_clear_message(
    model_dir: Path, tmp_path: Path, file: str, change: dict, message: str
) -> None:
    import json

    folder = copy_model(model_dir, tmp_path)
    settings = json.loads((folder / file).read_text()) if file == "config.json" else {}
    (folder / file).write_text(json.dumps({**settings, **change}))
    data = tmp_path / "in.csv"
    data.write_text("text\na great film\n")
    result = runner.invoke(app, ["predict", str(folder), str(data), str(tmp_path / "out.csv")])
    assert result.exit_code == 2 and message in result.output and file in result.output, result.output


# ----- 12. the server answers a client's mistake with a 422 naming the field -------------------------------
@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        (b'{"texts": ["a \\ud800 film"]}', ["texts", 0], "lone surrogate"),
        (b'{"texts": "good", "policy": {"rule": "dge", "patience": 1180591620717411303424}}', ["policy", "patience"],
         "less than or equal to 1024"),
        (b'{"texts": "good", "policy": {"rule": "dge", "tau": NaN}}', ["policy", "tau"], "finite number"),
        (b'{"texts": "good", "policy": {"rule": "dge", "tau": Infinity}}', ["policy", "tau"], "finite number"),
        (b'{"texts": "good", "policy": {"rule": "static", "k": 9}}', ["policy"], "beyond this model's 4 layers"),
        (b'{"texts": "good", "policy": {"rule": "entropy", "tau": true}}', ["policy", "tau"], "valid number"),
    ],
    ids=["surrogate", "patience-2**70", "nan", "infinity", "static-k", "tau-true"],
)  # fmt: skip
def test_the_server_answers_a_clients_mistake_with_a_422_naming_the_field(
    model_dir: Path, body: bytes, field: list, message: str
) -> None:
    from fastapi.testclient import TestClient

    from badge.serve import create_app

    with TestClient(create_app(model_dir)) as client:
        response = client.post("/v1/classify", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 422, response.text
        errors = response.json()["detail"]
        assert any(e["loc"][1 : 1 + len(field)] == field and message in e["msg"] for e in errors), errors
        assert client.post("/v1/classify", json={"texts": "a great film"}).status_code == 200
