"""The benchmark scripts' own logic: choosing runs to train and reading rule curves (no training here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

rule_dev = pytest.importorskip("rule_dev")
beyond_final = pytest.importorskip("beyond_final")
rule_dev_hidden = pytest.importorskip("rule_dev_hidden")
run_report = pytest.importorskip("run")


def test_run_refuses_an_only_pattern_that_matches_no_run() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--only", "no-such-run-*", "--report-only"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "--only 'no-such-run-*' matches none of the plan's runs" in done.stderr


def test_hull_mixes_two_settings_and_says_when_a_speedup_is_out_of_reach() -> None:
    points = [(6.0, 80.0), (3.0, 78.0), (2.0, 70.0), (4.0, 70.0)]  # (mean exit layer, accuracy)
    assert rule_dev.hull_at(points, 4.0) == pytest.approx(78.0 + 2.0 / 3.0)  # mix of 3.0 and 6.0, not the 4.0 point
    assert rule_dev.hull_at(points, 3.0) == 78.0
    assert rule_dev.hull_at(points, 1.5) is None  # faster than any setting


def test_first_exit_is_the_first_exit_that_leaves_else_the_last() -> None:
    leave = torch.tensor([[False, True], [True, True], [False, False]])
    assert rule_dev.first_exit(leave).tolist() == [1, 0, 2]


def test_a_cut_encoder_keeps_the_first_layers_and_leaves_the_source_alone(tiny_encoder: Path, tmp_path: Path) -> None:
    solo_depth = pytest.importorskip("solo_depth")
    from badge import MultiExitModel

    before = {p.name: p.read_bytes() for p in tiny_encoder.iterdir() if p.is_file()}
    cut = solo_depth.cut_encoder(2, tmp_path / "cut", source=tiny_encoder)
    full = MultiExitModel.from_encoder(tiny_encoder, label_names=["a", "b"])
    short = MultiExitModel.from_encoder(cut, label_names=["a", "b"])
    assert short.num_layers == 2 and short.exit_layers == [1, 2] and full.num_layers == 4
    for name, weight in short.encoder.encoder.layer.state_dict().items():  # layers 0 and 1, as in the source
        torch.testing.assert_close(weight, full.encoder.encoder.layer.state_dict()[name])
    assert {p.name: p.read_bytes() for p in tiny_encoder.iterdir() if p.is_file()} == before
    with pytest.raises(ValueError, match="depth 5 must lie in 1..4"):
        solo_depth.cut_encoder(5, tmp_path / "too-deep", source=tiny_encoder)


def test_a_cached_run_counts_as_trained_only_when_its_checkpoint_reached_the_last_epoch(tmp_path: Path) -> None:
    from training_runs import cached_training_finished

    models = tmp_path / "run"
    assert not cached_training_finished(models, 3.0)  # nothing there
    (models / "best").mkdir(parents=True)
    (models / "best" / "config.json").write_text("{}")
    assert cached_training_finished(models, 3.0)  # best and no checkpoint: an older finished run
    (models / "checkpoint").mkdir()
    (models / "checkpoint" / "trainer_state.json").write_text('{"epoch": 2, "global_step": 750}')
    assert not cached_training_finished(models, 3.0)  # interrupted after epoch 2: resume
    assert cached_training_finished(models, 2.0)
    (models / "checkpoint" / "trainer_state.json").write_text('{"epoch": 3, "global_step": 1125}')
    assert cached_training_finished(models, 3.0) and cached_training_finished(models, 2.5)


def _split_where_exit_1_is_right_only_on_confident_texts():
    """3 exits, 2 classes, 200 texts. Exit 1 is very sure and right on texts 0-59 where the final exit is wrong,
    unsure and wrong on the rest where the final exit is right; exit 2 always agrees with the final exit."""
    from badge.comparison import SplitLogits

    labels = torch.zeros(200, dtype=torch.long)
    logits = torch.zeros(200, 3, 2)
    logits[:, 1:, 0] = 1.0  # exits 2 and 3 say class 0 ...
    logits[:60, 1:] = torch.tensor([0.0, 1.0])  # ... except on texts 0-59, where they are wrong
    logits[:60, 0] = torch.tensor([5.0, 0.0])  # exit 1: sure and right there
    logits[60:, 0] = torch.tensor([0.0, 0.3])  # unsure and wrong elsewhere
    return SplitLogits(logits, labels, [1, 2, 3], "single_label_classification")


def test_gains_and_the_oracle_count_texts_where_a_shallow_exit_is_right_and_the_final_wrong() -> None:
    split = _split_where_exit_1_is_right_only_on_confident_texts()
    g = beyond_final.gains(split)
    assert g.shape == (200, 2)
    assert g[:60, 0].tolist() == [1] * 60 and g[60:, 0].tolist() == [-1] * 140
    assert g[:, 1].abs().sum() == 0  # exit 2 answers as the final exit does
    assert beyond_final.oracle_change(split).sum() == 60


def test_the_fitted_rule_leaves_early_exactly_where_its_validation_shows_a_gain() -> None:
    split = _split_where_exit_1_is_right_only_on_confident_texts()
    change, speedup, margin = beyond_final.fitted_rule(split, split)
    assert margin < 2  # leaving early pays on held-out halves, so it does not choose "never"
    assert change.sum() == 60 and (change >= 0).all()  # every confident text gains, no other text leaves
    assert speedup == pytest.approx(3 / ((60 * 1 + 140 * 3) / 200))
    models = beyond_final.fit_models(beyond_final.rule_features(split), beyond_final.gains(split))
    never, layer = beyond_final.apply_rule(
        models, beyond_final.rule_features(split), beyond_final.gains(split), [1, 2, 3], 2.0
    )
    assert never.abs().sum() == 0 and layer == 3.0  # margin 2 is the full model


def test_the_hidden_gate_learns_agreement_that_only_the_hidden_vector_shows() -> None:
    # 2 exits, 2 classes: exit 1 is equally unsure on every text, and agrees with the final exit exactly where the
    # first coordinate of its hidden vector is positive
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(400, 2, 8, generator=generator)
    hidden[:, :, 0] *= 3.0  # the widest direction, so that the first principal component is this coordinate
    final = torch.randint(2, (400,), generator=generator)
    agrees = hidden[:, 0, 0] > 0
    first = torch.where(agrees, final, 1 - final)
    logits = torch.zeros(400, 2, 2)
    logits[torch.arange(400), 0, first] = 0.1
    logits[torch.arange(400), 1, final] = 3.0
    for components, c in ((None, 1.0), (4, 1.0)):
        p = rule_dev_hidden.scores(logits[:200], hidden[:200], logits[200:], hidden[200:], components, c)
        assert p.shape == (200, 1)
        held_agrees = agrees[200:]
        assert p[held_agrees, 0].mean() > 0.7 > 0.3 > p[~held_agrees, 0].mean()


def tiny_plan(schemes: list[str], ablation: list[str]) -> dict:
    """A two-seed plan on rotten-tomatoes whose runs the tests write by hand."""
    return {
        "datasets": ["rotten-tomatoes"],
        "seeds": [0, 1],
        "schemes": schemes,
        "ablation": ablation,
        "train_samples": 8,
        "epochs": 1.0,
        "mpnet": None,
        "resamples": 200,
    }


def write_run(folder: Path, validation_correct: int, test_correct: int) -> None:
    """A finished 2-exit run of 10 texts, all of class 0: on each split every exit gets the first `*_correct` texts
    right and the others wrong."""
    import json

    from safetensors.torch import save_file

    labels = torch.zeros(10, dtype=torch.long)
    right, wrong = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])

    def exits(correct: int) -> torch.Tensor:
        return torch.stack([right if i < correct else wrong for i in range(10)])[:, None].repeat(1, 2, 1)  # (N, 2, 2)

    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"exit_layers": [1, 2]}))
    tensors = {"validation_logits": exits(validation_correct), "validation_labels": labels}
    tensors |= {"test_logits": exits(test_correct), "test_labels": labels.clone()}
    save_file(tensors, folder / "logits.safetensors")


def test_the_ablation_pairs_schemes_that_differ_in_one_ingredient_over_the_seeds_both_have(tmp_path: Path) -> None:
    plan = tiny_plan(["joint"], ["bb", "bb2"])
    correct_texts = {"joint": 5, "bb": 4, "bb2": 8}  # texts every exit gets right; the others every exit gets wrong
    for run in run_report.plan_runs(plan):
        if run.scheme == "bb" and run.seed == 1:
            continue  # bb has seed 0 only, so its contrast pairs one seed
        write_run(tmp_path / run.name, correct_texts[run.scheme], correct_texts[run.scheme])
    rows = {(row["a"], row["b"]): row for row in run_report.ablation_section(tmp_path, plan)}
    assert set(rows) == {("bb2", "joint"), ("bb2", "bb")}  # the contrasts whose two schemes are both in the plan
    assert rows[("bb2", "joint")]["seeds"] == 2 and rows[("bb2", "bb")]["seeds"] == 1
    for (a, b), row in rows.items():
        expected = 10.0 * (correct_texts[a] - correct_texts[b])  # points
        assert row["mean"][0] == pytest.approx(expected) and row["final"][0] == pytest.approx(expected)
        assert row["mean"][1] <= expected <= row["mean"][2]


def test_the_training_table_compares_each_scheme_with_the_default_on_validation_not_test(tmp_path: Path) -> None:
    plan = tiny_plan([run_report.DEFAULT_SCHEME, "joint"], [])
    # texts every exit gets right, on (validation, test): joint is behind on validation and ahead on test
    correct_texts = {run_report.DEFAULT_SCHEME: (7, 5), "joint": (4, 9)}
    for run in run_report.plan_runs(plan):
        write_run(tmp_path / run.name, *correct_texts[run.scheme])
    rows = run_report.training_section(tmp_path, plan, "rotten-tomatoes")
    assert rows["joint"]["validation_mean_exit_metric"] == pytest.approx(40.0)
    assert rows["joint"]["mean_exit_metric"] == pytest.approx(90.0)
    diff, low, high = rows["joint"]["validation_vs_default_mean"]
    assert diff == pytest.approx(-30.0) and low <= -30.0 <= high
    assert "validation_vs_default_mean" not in rows[run_report.DEFAULT_SCHEME]
