"""Training: exits learn, schemes differ as named, checkpoints resume, and two processes work."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from badge import MultiExitModel
from badge.data import load_file, make_loader
from badge.training import DISTILL_OPTIONS, TrainingArguments, scheme_model_options, stage_exit_weights, train


def exit_losses(model: MultiExitModel, dataset) -> torch.Tensor:
    loader = make_loader(dataset, model.tokenizer, 32, 256, shuffle=False)
    model.eval()
    with torch.no_grad():
        batch = next(iter(loader))
        return model(**batch).exit_losses


@pytest.fixture
def data(review_files):
    return {split: load_file(path) for split, path in review_files.items()}


def fast_args(tmp_path, **overrides) -> TrainingArguments:
    settings = {"epochs": 2, "batch_size": 16, "encoder_lr": 3e-3, "head_lr": 5e-3, "max_length": 32, "save_steps": 5}
    return TrainingArguments(output_dir=str(tmp_path / "run"), **{**settings, **overrides})


def test_training_lowers_every_exits_loss_and_keeps_the_best_model(tiny_encoder, data, tmp_path) -> None:
    torch.manual_seed(0)
    model = MultiExitModel.from_encoder(tiny_encoder, label_names=data["train"].label_names, pooling="mean")
    before = exit_losses(model, data["train"])
    result = train(model, data["train"], data["validation"], fast_args(tmp_path, epochs=3))
    after = exit_losses(model, data["train"])
    assert (after < before).all(), f"per-exit losses before {before.tolist()} after {after.tolist()}"
    assert len(result.history) == 3 and len(result.history[0]["exit_metrics"]) == model.num_layers
    assert result.history[-1]["mean"] > 80.0  # the sentiment word decides the label: every exit can learn it
    best = MultiExitModel.from_pretrained(result.best_dir)
    assert best.label_names == ["negative", "positive"]
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["global_step"] == 48 and state["epoch"] == 3


def test_same_seed_gives_the_same_model(tiny_encoder, data, tmp_path) -> None:
    weights = []
    for run in ("a", "b"):
        torch.manual_seed(0)
        model = MultiExitModel.from_encoder(tiny_encoder, label_names=data["train"].label_names, pooling="mean")
        train(model, data["train"], data["validation"], fast_args(tmp_path / run, epochs=1))
        weights.append(model.exits["4"].out.weight.clone())
    assert torch.equal(weights[0], weights[1])


def test_resume_continues_an_interrupted_run(tiny_encoder, data, tmp_path, monkeypatch) -> None:
    import badge.training

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the run dies just before its first end-of-epoch evaluation

    torch.manual_seed(0)
    model = MultiExitModel.from_encoder(tiny_encoder, label_names=data["train"].label_names, pooling="mean")
    with monkeypatch.context() as patch:
        patch.setattr(badge.training, "_end_of_epoch", crash)
        with pytest.raises(KeyboardInterrupt):
            train(model, data["train"], data["validation"], fast_args(tmp_path))
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["global_step"] == 15 and state["step_in_epoch"] == 15  # last checkpoint (every 5 steps)
    saved = MultiExitModel.from_pretrained(tmp_path / "run" / "checkpoint" / "model")
    fresh = MultiExitModel.from_encoder(tiny_encoder, label_names=data["train"].label_names, pooling="mean")
    result = train(fresh, data["train"], data["validation"], fast_args(tmp_path, resume=True, epochs=2))
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["global_step"] == 32 and [h["epoch"] for h in result.history] == [1, 2]
    assert not torch.equal(fresh.exits["1"].out.weight, saved.exits["1"].out.weight)  # it kept training
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(fresh, data["train"], data["validation"], fast_args(tmp_path / "other", resume=True))


def test_schemes_set_bypasses_and_loss_weights(tiny_encoder, data, tmp_path) -> None:
    assert scheme_model_options("joint") == {"use_bypass": False, "gamma": 1.0}
    model = MultiExitModel.from_encoder(tiny_encoder, label_names=["negative", "positive"])
    assert stage_exit_weights(model, "two_stage", 1).tolist() == [0, 0, 0, 1]
    second = stage_exit_weights(model, "two_stage", 2)
    assert second[-1] == 0 and torch.isclose(second.sum(), torch.tensor(1.0))
    assert torch.allclose(stage_exit_weights(model, "bb", 1), torch.tensor([1, 2, 3, 4]) / 10)
    # Two-stage: the second stage trains only the intermediate exits, so the backbone and the final exit (its head
    # and token scores) are untouched by it.
    joint = MultiExitModel.from_encoder(
        tiny_encoder, label_names=["negative", "positive"], attention_pooling=True, **scheme_model_options("joint")
    )
    train(joint, data["train"], data["validation"], fast_args(tmp_path, scheme="two_stage", epochs=2))
    assert all(not p.requires_grad for p in joint.encoder.parameters())
    last = str(joint.num_layers)
    assert all(not p.requires_grad for p in [*joint.exits[last].parameters(), *joint.poolers[last].parameters()])
    assert all(p.requires_grad for p in joint.poolers["1"].parameters())


def test_old_schemes_keep_their_options_and_bad_schemes_are_named() -> None:
    assert scheme_model_options("bb") == {"use_bypass": True}  # the v1 defaults of MultiExitConfig
    for scheme in ("joint", "two_stage", "single_exit"):
        assert scheme_model_options(scheme) == {"use_bypass": False, "gamma": 1.0}
    assert scheme_model_options("distill") == {**scheme_model_options("joint"), **DISTILL_OPTIONS}
    assert scheme_model_options("bb_distill") == {"use_bypass": True, **DISTILL_OPTIONS}
    assert scheme_model_options("bb2_distill") == {**scheme_model_options("bb2"), **DISTILL_OPTIONS}
    with pytest.raises(ValueError, match="scheme 'bb3' is not one of"):
        scheme_model_options("bb3")


@pytest.mark.parametrize("scheme", ["distill", "bb_distill", "bb2", "bb2_distill"])
def test_new_schemes_train_and_round_trip_through_save_and_load(scheme, tiny_encoder, data, tmp_path) -> None:
    torch.manual_seed(0)
    model = MultiExitModel.from_encoder(
        tiny_encoder, label_names=data["train"].label_names, pooling="mean", **scheme_model_options(scheme)
    )
    before = exit_losses(model, data["train"])
    result = train(model, data["train"], data["validation"], fast_args(tmp_path, scheme=scheme, epochs=1))
    after = exit_losses(model, data["train"])
    assert after.sum() < before.sum(), f"{scheme}: per-exit losses before {before.tolist()} after {after.tolist()}"
    saved = json.loads((result.best_dir / "config.json").read_text())
    for key, value in scheme_model_options(scheme).items():
        assert saved[key] == value, f"{scheme}: config.json has {key}={saved[key]!r}, expected {value!r}"
    best = MultiExitModel.from_pretrained(result.best_dir).eval()  # one epoch: the best is the trained model
    batch = next(iter(make_loader(data["validation"], best.tokenizer, 32, 64, shuffle=False)))
    with torch.no_grad():
        for a, b in zip(best(**batch).exit_logits, model.eval()(**batch).exit_logits, strict=True):
            torch.testing.assert_close(a, b)
    if scheme.startswith("bb"):
        assert any(torch.count_nonzero(bypass.up.weight) > 0 for bypass in best.bypasses.values())


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test")
def test_two_process_training_with_gloo(tiny_encoder, review_files, tmp_path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        "-m",
        "badge.cli",
        "train",
        "--encoder",
        str(tiny_encoder),
        "--train",
        str(review_files["train"]),
        "--validation",
        str(review_files["validation"]),
        "--output",
        str(tmp_path / "ddp"),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--max-length",
        "32",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((tmp_path / "ddp" / "checkpoint" / "trainer_state.json").read_text())
    assert state["global_step"] == 16  # 256 rows / (8 per step x 2 processes)
    kept = sorted(path.name for path in (tmp_path / "ddp" / "checkpoint").glob("rng_state_*"))
    assert kept == ["rng_state_0.safetensors", "rng_state_1.safetensors"]  # each process's random state
    assert MultiExitModel.from_pretrained(tmp_path / "ddp" / "best").num_layers == 4


def run_twice(encoder, data, tmp_path, monkeypatch, before_resume=lambda checkpoint: None, **model_options) -> dict:
    """Train 2 epochs uninterrupted, and again killed at step 16 of 32 (last checkpoint: step 15, mid-epoch)
    and resumed in a fresh random state. Returns both runs' final weights."""
    import badge.training

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    runs = {}
    for name in ("uninterrupted", "resumed"):
        torch.manual_seed(0)
        model = MultiExitModel.from_encoder(
            encoder, label_names=data["train"].label_names, pooling="mean", **model_options
        )
        if name == "resumed":
            with monkeypatch.context() as patch:
                patch.setattr(badge.training, "_end_of_epoch", crash)
                with pytest.raises(KeyboardInterrupt):
                    train(model, data["train"], data["validation"], fast_args(tmp_path / name))
            before_resume(tmp_path / name / "run" / "checkpoint")
            torch.manual_seed(123)  # a new process: nothing of the killed run's random state is left
            model = MultiExitModel.from_encoder(
                encoder, label_names=data["train"].label_names, pooling="mean", **model_options
            )
        train(model, data["train"], data["validation"], fast_args(tmp_path / name, resume=name == "resumed"))
        runs[name] = model.state_dict()
    return runs


def assert_same_weights(runs: dict) -> None:
    for key, value in runs["uninterrupted"].items():
        torch.testing.assert_close(runs["resumed"][key], value, msg=lambda m, key=key: f"{key}: {m}")


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tiny_encoder, data, tmp_path, monkeypatch) -> None:
    """The data order, dropout's random numbers, the optimizer and the learning-rate schedule all pick up
    where the checkpoint left them."""
    assert_same_weights(run_twice(tiny_encoder, data, tmp_path, monkeypatch))
    checkpoint = tmp_path / "resumed" / "run" / "checkpoint"
    assert json.loads((checkpoint / "scheduler.json").read_text())["last_epoch"] == 32
    kinds = {path.suffix for path in checkpoint.rglob("*") if path.is_file()}
    assert kinds == {".json", ".safetensors"}, kinds  # nothing pickled


def test_a_checkpoint_without_schedule_or_random_state_still_resumes_on_schedule(
    tiny_encoder, data, tmp_path, monkeypatch
) -> None:
    """Checkpoints written before they kept the scheduler and random state resume with the schedule placed
    by the step count (no dropout here, so the random state cannot matter)."""
    encoder = shutil.copytree(tiny_encoder, tmp_path / "encoder")
    config = json.loads((encoder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (encoder / "config.json").write_text(json.dumps(config))

    def forget_schedule_and_random_state(checkpoint) -> None:
        (checkpoint / "scheduler.json").unlink()
        (checkpoint / "rng_state_0.safetensors").unlink()

    runs = run_twice(encoder, data, tmp_path, monkeypatch, forget_schedule_and_random_state, classifier_dropout=0.0)
    assert_same_weights(runs)
