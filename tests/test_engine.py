"""The early-exit engine: per-sample exits inside batches, equal to batch size 1 and to offline replay."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig

from badge import EarlyExitEngine, ExitPolicy, MultiExitConfig, MultiExitModel
from badge.gate import FEATURES
from badge.rules import simulate


@pytest.fixture(scope="module")
def model() -> MultiExitModel:
    torch.manual_seed(0)
    backbone = BertConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, vocab_size=80
    )
    model = MultiExitModel(MultiExitConfig(backbone=backbone.to_dict(), num_labels=3)).eval()
    with torch.no_grad():  # spread the random exits so that rules fire at different layers
        for head in model.exits.values():
            head.out.weight.normal_(std=2.0)
    return model


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    lengths = torch.randint(3, 24, (64,))
    mask = (torch.arange(24)[None, :] < lengths[:, None]).long()
    return torch.randint(5, 80, (64, 24)) * mask, mask


POLICIES = [
    ExitPolicy("dge", tau=0.05),
    ExitPolicy("dge", tau=0.2, patience=2, divergence="kl"),
    ExitPolicy("entropy", tau=0.9),
    ExitPolicy("maxprob", tau=0.6),
    ExitPolicy("patience", patience=1),
    ExitPolicy("pcee", tau=0.9, patience=2),
    ExitPolicy("static:2"),
    # a hand-set gate (features: max_prob, entropy, margin, jsd_previous, jsd_mixture, streak), one row per exit
    ExitPolicy(
        "gate",
        tau=0.6,
        gate={"features": list(FEATURES), "weights": [[6.0, 0.0, 1.0, -3.0, -3.0, 0.5]] * 3, "bias": [-4.5] * 3},
    ),
]


@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_batch_of_64_gives_the_same_answers_as_batch_size_1(model, inputs, policy) -> None:
    ids, mask = inputs
    batched = EarlyExitEngine(model, policy, batch_size=64).run(ids, mask)
    single = EarlyExitEngine(model, policy, batch_size=1).run(ids, mask)
    assert torch.equal(batched.exit_layers, single.exit_layers)
    assert batched.labels == single.labels
    torch.testing.assert_close(batched.probs, single.probs, atol=1e-5, rtol=1e-5)


def test_padding_free_layers_change_no_answer(model, inputs) -> None:
    ids, mask = inputs
    policy = ExitPolicy("entropy", tau=0.9)
    padded = EarlyExitEngine(model, policy, batch_size=16, packed=False).run(ids, mask)
    packed = EarlyExitEngine(model, policy, batch_size=16, packed=True).run(ids, mask)
    assert torch.equal(padded.exit_layers, packed.exit_layers)
    assert padded.labels == packed.labels
    torch.testing.assert_close(padded.probs, packed.probs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_engine_exits_where_replaying_the_rule_on_all_exits_says(model, inputs, policy) -> None:
    ids, mask = inputs
    with torch.no_grad():
        all_exits = torch.stack(model(ids, mask).exit_logits, dim=1)  # (N, E, K)
    positions = simulate(all_exits, policy, model.config.problem_type, model.exit_layers)
    out = EarlyExitEngine(model, policy, batch_size=16).run(ids, mask)
    assert out.exit_layers.tolist() == [model.exit_layers[p] for p in positions.tolist()]
    expected = all_exits[torch.arange(64), positions].argmax(-1)
    assert out.labels == expected.tolist()


def test_exited_rows_leave_the_batch_and_no_layer_runs_past_the_deepest_exit(model, inputs) -> None:
    ids, mask = inputs
    engine = EarlyExitEngine(model, ExitPolicy("maxprob", tau=0.6), batch_size=64)
    out = engine.run(ids, mask)
    # Every sample costs exactly the layers up to its own exit: rows that left ran no further layer.
    assert engine.layers_run == int(out.exit_layers.sum())
    assert 1 < out.exit_layers.float().mean() < model.num_layers
    static = EarlyExitEngine(model, ExitPolicy("static:2"), batch_size=8)
    static.run(ids, mask)
    assert static.layers_run == 2 * 64  # layers 3 and 4 never ran


def test_exits_the_rule_does_not_read_are_not_evaluated(model, inputs) -> None:
    ids, mask = inputs
    static = EarlyExitEngine(model, ExitPolicy("static:2"), batch_size=16)
    out = static.run(ids, mask)
    assert static.exits_run == 64  # only the exit after layer 2, once per sample
    assert out.exit_layers.eq(2).all()
    full = EarlyExitEngine(model, ExitPolicy("full"), batch_size=16)
    answers = full.run(ids, mask)
    assert full.exits_run == 64 and full.layers_run == 64 * model.num_layers
    with torch.no_grad():
        final = model(ids, mask).exit_logits[-1]
    torch.testing.assert_close(answers.logits, final, atol=1e-5, rtol=1e-5)


def test_layer_calls_stop_at_the_deepest_exit_in_the_batch(model, inputs, monkeypatch) -> None:
    ids, mask = inputs
    called: list[int] = []
    original = model.run_layer

    def counting(layer, hidden, attention):
        called.append(layer)
        return original(layer, hidden, attention)

    monkeypatch.setattr(model, "run_layer", counting)
    EarlyExitEngine(model, ExitPolicy("static:3"), batch_size=64).run(ids, mask)
    assert called == [1, 2, 3]


def test_a_sample_that_never_meets_the_rule_leaves_at_the_last_layer(model, inputs) -> None:
    ids, mask = inputs
    out = EarlyExitEngine(model, ExitPolicy("maxprob", tau=1.0), batch_size=32).run(ids, mask)
    assert (out.exit_layers == model.num_layers).all()


def test_default_policy_comes_from_the_model_and_calls_can_override_it(model) -> None:
    model.config.exit_policy = {"rule": "static", "k": 1}
    assert str(EarlyExitEngine(model).policy) == "static(k=1)"
    assert EarlyExitEngine(model, ExitPolicy("entropy", tau=0.1)).policy.rule == "entropy"


def test_survivors_wait_for_a_full_batch_so_deep_layers_do_not_run_on_a_few_rows(model, inputs, monkeypatch) -> None:
    ids, mask = inputs
    sizes: dict[int, list[int]] = {}
    original = model.run_layer

    def recording(layer, hidden, attention):
        sizes.setdefault(layer, []).append(hidden.shape[0])
        return original(layer, hidden, attention)

    monkeypatch.setattr(model, "run_layer", recording)
    engine = EarlyExitEngine(model, ExitPolicy("maxprob", tau=0.6), batch_size=8)
    out = engine.run(ids, mask)
    for layer, calls in sizes.items():
        assert all(size == 8 for size in calls[:-1]), f"layer {layer} ran on batches {calls}"
        assert sum(calls) == int((out.exit_layers >= layer).sum())
    assert len(sizes[2]) < len(sizes[1])  # fewer, fuller calls once rows have left


def test_left_padded_input_is_refused_with_a_clear_message(model) -> None:
    ids = torch.tensor([[0, 0, 7, 8], [5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match="right-padded"):
        EarlyExitEngine(model, ExitPolicy("static:1")).run(ids, mask)
