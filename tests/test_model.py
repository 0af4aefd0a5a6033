"""The multi-exit model: every encoder family, bypasses, FLOPs, and save/load round-trips."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AlbertConfig,
    BertConfig,
    DistilBertConfig,
    ElectraConfig,
    MPNetConfig,
    RobertaConfig,
)

from badge import MultiExitConfig, MultiExitModel
from badge.modeling import CheckpointError, count_flops, damp_gradient
from badge.packed import PACKED_FAMILIES

SMALL = {"num_attention_heads": 4, "vocab_size": 60}
FAMILIES = {
    "bert": BertConfig(hidden_size=32, num_hidden_layers=4, intermediate_size=64, **SMALL),
    "roberta": RobertaConfig(hidden_size=32, num_hidden_layers=3, intermediate_size=64, **SMALL),
    "distilbert": DistilBertConfig(dim=32, n_layers=3, n_heads=4, hidden_dim=64, vocab_size=60),
    "albert": AlbertConfig(hidden_size=32, embedding_size=16, num_hidden_layers=4, intermediate_size=64, **SMALL),
    "electra": ElectraConfig(hidden_size=32, embedding_size=16, num_hidden_layers=2, intermediate_size=64, **SMALL),
    "mpnet": MPNetConfig(hidden_size=32, num_hidden_layers=3, intermediate_size=64, **SMALL),
}


def batch(rows: int = 3, width: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(5, 60, (rows, width))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids * mask, mask


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_gives_one_logit_tensor_per_exit_and_matches_the_plain_encoder(family: str) -> None:
    config = MultiExitConfig(backbone=FAMILIES[family].to_dict(), num_labels=3)
    model = MultiExitModel(config).eval()
    ids, mask = batch()
    with torch.no_grad():
        out = model(ids, mask, labels=torch.tensor([0, 1, 2]))
        hidden = model.embed(ids)
        attention = model.attention_inputs(hidden, mask)
        for layer in range(1, model.num_layers + 1):
            hidden = model.run_layer(layer, hidden, attention)
        reference = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    assert len(out.exit_logits) == model.num_layers
    assert all(logits.shape == (3, 3) for logits in out.exit_logits)
    assert out.loss is not None and out.exit_losses.shape == (model.num_layers,)
    # The layer-by-layer path that engines use computes exactly what the Hugging Face encoder computes.
    torch.testing.assert_close(hidden[mask.bool()], reference[mask.bool()])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_padding_free_layers_and_pooling_weights_give_the_hugging_face_answers(family: str) -> None:
    config = MultiExitConfig(backbone=FAMILIES[family].to_dict(), num_labels=3)
    model = MultiExitModel(config).eval()
    ids, mask = batch(rows=4)
    mask[3, 2:] = 0
    with torch.no_grad():
        reference = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden = model.embed(ids)
        attention = model.attention_inputs(hidden, mask, packed=True)
        for layer in range(1, model.num_layers + 1):
            hidden = model.run_layer(layer, hidden, attention)
            for pooling in ("cls", "mean"):  # the pooling weights give the first token or the masked mean
                model.config.pooling = pooling
                weights = model.pool_weights(mask, hidden.dtype)
                real = mask.unsqueeze(-1).float()
                expected = hidden[:, 0] if pooling == "cls" else (hidden * real).sum(1) / real.sum(1)
                torch.testing.assert_close(torch.bmm(weights, hidden).squeeze(1), expected)
    # BERT-structured families skip the padding; the others fall back to the Hugging Face layers.
    assert attention.packed == (family in PACKED_FAMILIES)
    torch.testing.assert_close(hidden[mask.bool()], reference[mask.bool()])


def test_default_block_size_and_bypasses_follow_the_method() -> None:
    six = MultiExitConfig(backbone=BertConfig(num_hidden_layers=6, hidden_size=32, **SMALL).to_dict(), num_labels=2)
    twelve = MultiExitConfig(backbone=BertConfig(num_hidden_layers=12, hidden_size=32, **SMALL).to_dict(), num_labels=2)
    assert six.block_size == 2 and twelve.block_size == 3
    model = MultiExitModel(six)
    # Layers 1-2, 3-4 and 5 share three bypasses; the final exit (layer 6) reads the encoder directly.
    assert sorted(model.bypasses) == ["0", "1", "2"]
    assert all(torch.count_nonzero(b.up.weight) == 0 for b in model.bypasses.values())


def test_bypass_starts_as_identity_so_training_starts_as_plain_multi_exit() -> None:
    backbone = FAMILIES["bert"].to_dict()
    torch.manual_seed(0)
    with_bypass = MultiExitModel(MultiExitConfig(backbone=backbone, num_labels=2, use_bypass=True)).eval()
    without = MultiExitModel(MultiExitConfig(backbone=backbone, num_labels=2, use_bypass=False)).eval()
    without.load_state_dict(with_bypass.state_dict(), strict=False)
    ids, mask = batch()
    with torch.no_grad():
        for a, b in zip(with_bypass(ids, mask).exit_logits, without(ids, mask).exit_logits, strict=True):
            torch.testing.assert_close(a, b)


def test_gradient_damper_scales_the_gradient_but_not_the_value() -> None:
    x = torch.ones(2, 4, requires_grad=True)
    y = damp_gradient(x, 0.3)
    y.sum().backward()
    assert torch.equal(y, x)
    torch.testing.assert_close(x.grad, torch.full((2, 4), 0.3))


def test_flop_count_shows_exits_and_bypasses_are_cheap() -> None:
    minilm = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    model = MultiExitModel(MultiExitConfig(backbone=minilm.to_dict(), num_labels=2))
    flops = count_flops(model, seq_len=128)
    assert flops.per_bypass * flops.num_bypassed_exits / flops.backbone < 1e-3
    assert flops.exits_and_bypasses / flops.backbone < 0.01
    assert "extra" in flops.summary()


def test_tasks_multi_label_and_regression_have_losses() -> None:
    backbone = FAMILIES["bert"].to_dict()
    ids, mask = batch()
    multi = MultiExitModel(MultiExitConfig(backbone=backbone, num_labels=4, problem_type="multi_label_classification"))
    out = multi(ids, mask, labels=torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0]]))
    assert out.loss.item() > 0
    regression = MultiExitModel(MultiExitConfig(backbone=backbone, num_labels=1, problem_type="regression"))
    out = regression(ids, mask, labels=torch.tensor([0.5, 1.0, -2.0]))
    assert out.exit_logits[0].shape == (3, 1) and out.loss.item() > 0


def test_exit_subset_keeps_the_final_exit() -> None:
    config = MultiExitConfig(backbone=FAMILIES["bert"].to_dict(), num_labels=2, exit_layers=[2])
    assert config.exit_layers == [2, 4]
    with pytest.raises(ValueError, match="outside 1..4"):
        MultiExitConfig(backbone=FAMILIES["bert"].to_dict(), num_labels=2, exit_layers=[7])


def test_save_and_reload_gives_identical_logits_at_every_exit(tiny_encoder, tmp_path) -> None:
    model = MultiExitModel.from_encoder(
        tiny_encoder, label_names=["negative", "positive"], gamma=0.1, block_size=1, bypass_dim=8
    ).eval()
    model.config.exit_policy = {"rule": "dge", "tau": 0.02, "patience": 2}
    with torch.no_grad():  # give the zero-initialised bypasses something to carry
        for bypass in model.bypasses.values():
            bypass.up.weight.normal_()
    model.save_pretrained(tmp_path / "model")
    names = {p.name for p in (tmp_path / "model").iterdir()}
    assert {"config.json", "model.safetensors", "exit_policy.json", "tokenizer.json"} <= names
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["gamma"] == 0.1 and saved["block_size"] == 1 and saved["bypass_dim"] == 8
    assert saved["id2label"] == {"0": "negative", "1": "positive"}
    reloaded = MultiExitModel.from_pretrained(tmp_path / "model").eval()
    encoded = model.tokenizer(["the movie was great", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model(**encoded).exit_logits
        after = reloaded(**encoded).exit_logits
    assert len(before) == len(after) == 4
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)
    assert reloaded.config.exit_policy == {"rule": "dge", "tau": 0.02, "patience": 2}
    assert reloaded.label_names == ["negative", "positive"]


def test_corrupt_or_incomplete_checkpoint_gets_a_clear_error(tiny_encoder, tmp_path) -> None:
    model = MultiExitModel.from_encoder(tiny_encoder, num_labels=2)
    model.save_pretrained(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="model.safetensors cannot be loaded"):
        MultiExitModel.from_pretrained(tmp_path / "model")
    weights.unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        MultiExitModel.from_pretrained(tmp_path / "model")
    with pytest.raises(CheckpointError, match="nowhere does not exist"):
        MultiExitModel.from_encoder(tmp_path / "nowhere", num_labels=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        MultiExitModel.from_encoder(tmp_path / "empty", num_labels=2)
