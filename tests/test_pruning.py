"""Head pruning: importance from gradients, smaller layers, and a pruned folder that reloads and early-exits."""

from __future__ import annotations

import pytest
import torch
from transformers import AlbertConfig

from badge import EarlyExitEngine, ExitPolicy, MultiExitConfig, MultiExitModel
from badge.data import load_file
from badge.flops import count_flops
from badge.pruning import head_importance, head_parts, heads_to_keep, prune_heads


@pytest.fixture
def validation(review_files):
    return load_file(review_files["validation"])


@pytest.fixture
def model(tiny_encoder, validation) -> MultiExitModel:
    torch.manual_seed(0)
    return MultiExitModel.from_encoder(tiny_encoder, label_names=validation.label_names).eval()


def parameters(model: MultiExitModel) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def test_importance_scores_every_head_and_a_silenced_head_scores_zero(model, validation) -> None:
    parts = head_parts(model, 2)
    with torch.no_grad():  # head 1 of layer 2 now contributes nothing to the output
        parts.output.weight[:, parts.head_size : 2 * parts.head_size] = 0.0
    importance = head_importance(model, validation, batch_size=16)
    assert importance.shape == (4, 4)
    assert importance[1, 1] == 0.0 and (importance[1, [0, 2, 3]] > 0).all()
    torch.testing.assert_close(importance.norm(dim=1), torch.ones(4))  # L2-normalised per layer
    prune_heads(model, 1 / 16, importance)
    assert model.config.heads_kept["2"] == [0, 2, 3]  # the one head removed is the silent one


def test_pruned_model_is_smaller_and_reloads_with_identical_logits(model, validation, tmp_path) -> None:
    ids = model.tokenizer(
        ["a good film", "the plot was dull and the acting was poor"], padding=True, return_tensors="pt"
    )
    before, flops_before = parameters(model), count_flops(model).per_layer
    prune_heads(model, 0.5, head_importance(model, validation, batch_size=16))
    kept = model.config.heads_kept
    assert sum(len(heads) for heads in kept.values()) == 8 and all(kept.values())
    assert parameters(model) < before and count_flops(model).per_layer < flops_before
    model.save_pretrained(tmp_path / "pruned")
    reloaded = MultiExitModel.from_pretrained(tmp_path / "pruned").eval()
    assert reloaded.config.heads_kept == kept and parameters(reloaded) == parameters(model)
    with torch.no_grad():
        for original, loaded in zip(model(**ids).exit_logits, reloaded(**ids).exit_logits, strict=True):
            assert torch.equal(original, loaded)


def test_pruned_model_early_exits_as_any_model(model) -> None:
    prune_heads(model, 0.5)
    with torch.no_grad():  # spread the random exits so that rows leave at different layers
        for head in model.exits.values():
            head.out.weight.normal_(std=2.0)
    torch.manual_seed(1)
    lengths = torch.randint(3, 16, (24,))
    mask = (torch.arange(16)[None, :] < lengths[:, None]).long()
    ids = torch.randint(5, 30, (24, 16)) * mask
    policy = ExitPolicy("entropy", tau=0.95)
    batched = EarlyExitEngine(model, policy, batch_size=24).run(ids, mask)
    single = EarlyExitEngine(model, policy, batch_size=1).run(ids, mask)
    assert batched.exit_layers.float().mean() < model.num_layers
    assert torch.equal(batched.exit_layers, single.exit_layers) and batched.labels == single.labels


def test_pruning_again_keeps_original_head_ids_and_one_head_per_layer(model) -> None:
    prune_heads(model, 0.5)
    first = model.config.heads_kept
    prune_heads(model, 0.9)
    second = model.config.heads_kept
    assert all(len(heads) == 1 for heads in second.values())
    assert all(set(second[layer]) <= set(first[layer]) for layer in first)
    assert model.encoder.encoder.layer[0].attention.self.query.out_features == 8  # one head of size 8


def test_heads_to_keep_removes_the_least_important_but_never_a_whole_layer() -> None:
    importance = torch.tensor([[0.1, 0.2, float("nan")], [0.9, 0.8, 0.7]])
    assert heads_to_keep(importance, 0.4) == {1: [1], 2: [0, 1]}
    with pytest.raises(ValueError, match="must lie in"):
        heads_to_keep(importance, 1.0)


def test_families_without_head_pruning_say_so() -> None:
    backbone = AlbertConfig(hidden_size=32, embedding_size=16, num_hidden_layers=2, num_attention_heads=4)
    albert = MultiExitModel(MultiExitConfig(backbone=backbone.to_dict(), num_labels=2))
    with pytest.raises(ValueError, match="head pruning supports the families"):
        prune_heads(albert, 0.5)
