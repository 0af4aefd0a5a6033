"""The multi-exit model: every encoder family, bypasses, FLOPs, and save/load round-trips."""

from __future__ import annotations

import json
import warnings

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
from badge.exits import damp_gradient
from badge.families import family_for
from badge.flops import count_flops
from badge.loading import CheckpointError

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
    assert attention.packed == family_for(family).packable
    torch.testing.assert_close(hidden[mask.bool()], reference[mask.bool()])


def test_default_block_size_and_bypasses_follow_the_method() -> None:
    six = MultiExitConfig(backbone=BertConfig(num_hidden_layers=6, hidden_size=32, **SMALL).to_dict(), num_labels=2)
    twelve = MultiExitConfig(backbone=BertConfig(num_hidden_layers=12, hidden_size=32, **SMALL).to_dict(), num_labels=2)
    assert six.block_size == 2 and twelve.block_size == 3
    model = MultiExitModel(six)
    # Layers 1-2, 3-4 and 5 share three bypasses; the final exit (layer 6) reads the encoder directly.
    assert sorted(model.bypasses) == ["0", "1", "2"]
    assert all(torch.count_nonzero(b.up.weight) == 0 for b in model.bypasses.values())


def test_one_layer_encoder_gets_a_valid_default_block_size() -> None:
    # A 1-layer cut of an encoder (a shallow model fine-tuned alone) must build with every default.
    one = MultiExitConfig(backbone=BertConfig(num_hidden_layers=1, hidden_size=32, **SMALL).to_dict(), num_labels=2)
    assert one.block_size == 1 and one.exit_layers == [1]
    output = MultiExitModel(one)(input_ids=torch.tensor([[1, 2, 3]]))
    assert len(output.exit_logits) == 1 and output.logits.shape == (1, 2)


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


def test_exit_policy_lives_in_exit_policy_json_only_and_editing_it_takes_effect(tiny_encoder, tmp_path) -> None:
    model = MultiExitModel.from_encoder(tiny_encoder, num_labels=2)
    model.config.exit_policy = {"rule": "maxprob", "tau": 0.8}
    model.save_pretrained(tmp_path / "model")
    assert "exit_policy" not in json.loads((tmp_path / "model" / "config.json").read_text())
    assert json.loads((tmp_path / "model" / "exit_policy.json").read_text()) == {"rule": "maxprob", "tau": 0.8}
    (tmp_path / "model" / "exit_policy.json").write_text('{"rule": "patience", "patience": 2}')
    assert MultiExitModel.from_pretrained(tmp_path / "model").config.exit_policy == {"rule": "patience", "patience": 2}


def test_folders_of_earlier_versions_keep_their_stored_policy(tiny_encoder, tmp_path) -> None:
    """Earlier versions wrote the policy into config.json too (the file won); older ones into config.json only."""
    model = MultiExitModel.from_encoder(tiny_encoder, num_labels=2)
    model.save_pretrained(tmp_path / "model")
    folder = tmp_path / "model"

    def write_config_copy(policy: dict) -> None:
        settings = json.loads((folder / "config.json").read_text())
        settings["exit_policy"] = policy
        (folder / "config.json").write_text(json.dumps(settings))

    (folder / "exit_policy.json").write_text('{"rule": "entropy", "tau": 0.25}')
    write_config_copy({"rule": "entropy", "tau": 0.25})  # both copies agree: loads silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert MultiExitModel.from_pretrained(folder).config.exit_policy == {"rule": "entropy", "tau": 0.25}
    write_config_copy({"rule": "maxprob", "tau": 0.9})  # the copies disagree: the file wins, as it always did
    with pytest.warns(UserWarning, match=r"config.json holds exit policy .*maxprob.*exit_policy.json holds"):
        reloaded = MultiExitModel.from_pretrained(folder)
    assert reloaded.config.exit_policy == {"rule": "entropy", "tau": 0.25}
    reloaded.save_pretrained(folder)  # saving again drops the stale copy
    assert "exit_policy" not in json.loads((folder / "config.json").read_text())
    write_config_copy({"rule": "static", "k": 2})
    (folder / "exit_policy.json").unlink()  # no exit_policy.json at all: config.json holds the policy
    assert MultiExitModel.from_pretrained(folder).config.exit_policy == {"rule": "static", "k": 2}
    write_config_copy({"rule": "static", "k": "two"})
    with pytest.raises(CheckpointError, match="exit policy .* in .*config.json is not valid"):
        MultiExitModel.from_pretrained(folder)


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


def six_layer_backbone() -> dict:
    return BertConfig(hidden_size=32, num_hidden_layers=6, intermediate_size=64, **SMALL).to_dict()


def test_bb_v1_settings_are_the_defaults_and_an_old_config_reads_as_v1(tmp_path) -> None:
    config = MultiExitConfig(backbone=six_layer_backbone(), num_labels=2)
    v1 = (True, "pooled", "constant", 0.3)
    assert (config.use_bypass, config.bypass_input, config.gamma_schedule, config.gamma) == v1
    assert (config.distill_weight, config.gradient_equilibrium, config.attention_pooling) == (0.0, False, False)
    assert [config.exit_gamma(layer) for layer in range(1, 6)] == [0.3] * 5
    # A config.json written before these settings existed loads with the v1 values.
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    later = ("bypass_input", "gamma_schedule", "distill_weight", "distill_temperature", "gradient_equilibrium")
    for key in (*later, "attention_pooling"):
        saved.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    old = MultiExitConfig.from_pretrained(tmp_path)
    assert (old.bypass_input, old.gamma_schedule, old.distill_weight, old.gradient_equilibrium) == (
        "pooled",
        "constant",
        0.0,
        False,
    )
    assert not old.attention_pooling and not MultiExitModel(old).poolers


def test_bb_v1_exit_is_head_of_pooled_plus_bypass_of_pooled() -> None:
    torch.manual_seed(0)
    model = MultiExitModel(MultiExitConfig(backbone=six_layer_backbone(), num_labels=2, pooling="mean")).eval()
    for bypass in model.bypasses.values():
        torch.nn.init.normal_(bypass.up.weight)
    hidden = torch.randn(3, 9, 32)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    expected = model.exits["3"](pooled + model.bypasses["1"](pooled))
    torch.testing.assert_close(model.exit_logits(3, hidden, mask), expected)


def test_bad_new_settings_get_clear_errors() -> None:
    backbone = six_layer_backbone()
    with pytest.raises(ValueError, match="distill_weight 1.5"):
        MultiExitConfig(backbone=backbone, distill_weight=1.5)
    with pytest.raises(ValueError, match="distill_temperature 0"):
        MultiExitConfig(backbone=backbone, distill_temperature=0)
    with pytest.raises(ValueError, match="bypass_input 'words'"):
        MultiExitConfig(backbone=backbone, bypass_input="words")
    with pytest.raises(ValueError, match="gamma_schedule 'cubic'"):
        MultiExitConfig(backbone=backbone, gamma_schedule="cubic")


def test_distillation_loss_equals_the_formula_on_hand_made_logits() -> None:
    student = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.3, -0.7]])
    teacher = torch.tensor([[1.0, 0.0, 3.0], [-2.0, 1.5, 0.2]])
    t = 2.0
    model = MultiExitModel(MultiExitConfig(backbone=FAMILIES["bert"].to_dict(), num_labels=3, distill_temperature=t))
    p_teacher = torch.softmax(teacher / t, dim=-1)
    p_student = torch.softmax(student / t, dim=-1)
    kl = (p_teacher * (p_teacher.log() - p_student.log())).sum(-1).mean()
    torch.testing.assert_close(model.distill_loss(student, teacher), t * t * kl)
    assert model.distill_loss(teacher, teacher).abs() < 1e-6

    multi = MultiExitModel(
        MultiExitConfig(
            backbone=FAMILIES["bert"].to_dict(),
            num_labels=3,
            distill_temperature=t,
            problem_type="multi_label_classification",
        )
    )
    q, p = torch.sigmoid(teacher / t), torch.sigmoid(student / t)
    binary_kl = q * (q.log() - p.log()) + (1 - q) * ((1 - q).log() - (1 - p).log())
    torch.testing.assert_close(multi.distill_loss(student, teacher), t * t * binary_kl.mean())
    assert multi.distill_loss(teacher, teacher).abs() < 1e-6

    regression = MultiExitModel(
        MultiExitConfig(backbone=FAMILIES["bert"].to_dict(), num_labels=1, problem_type="regression")
    )
    torch.testing.assert_close(
        regression.distill_loss(student[:, :1], teacher[:, :1]), ((student[:, 0] - teacher[:, 0]) ** 2).mean()
    )


def test_distillation_mixes_the_intermediate_losses_and_alpha_zero_is_the_plain_loss() -> None:
    ids, mask = batch()
    labels = torch.tensor([0, 2, 1])
    backbone = FAMILIES["bert"].to_dict()
    torch.manual_seed(0)
    plain = MultiExitModel(MultiExitConfig(backbone=backbone, num_labels=3, distill_weight=0.0)).eval()
    distilled = MultiExitModel(
        MultiExitConfig(backbone=backbone, num_labels=3, distill_weight=0.4, distill_temperature=3.0)
    ).eval()
    distilled.load_state_dict(plain.state_dict())
    out = plain(ids, mask, labels=labels)
    task = [torch.nn.functional.cross_entropy(z, labels) for z in out.exit_logits]
    weights = plain.default_exit_weights()
    assert torch.equal(out.exit_losses, torch.stack(task).detach())
    assert torch.equal(out.loss, (torch.stack(task) * weights).sum())

    mixed = distilled(ids, mask, labels=labels)
    teacher = mixed.exit_logits[-1]
    expected = [
        0.6 * ce + 0.4 * distilled.distill_loss(z, teacher)
        for ce, z in zip(task[:-1], mixed.exit_logits[:-1], strict=True)
    ]
    torch.testing.assert_close(mixed.exit_losses, torch.stack([*expected, task[-1]]).detach())
    # The final exit is the teacher: its head gets the same gradient with or without distillation.
    out.loss.backward()
    mixed.loss.backward()
    torch.testing.assert_close(distilled.exits["4"].out.weight.grad, plain.exits["4"].out.weight.grad)
    assert not torch.allclose(distilled.exits["1"].out.weight.grad, plain.exits["1"].out.weight.grad)


def test_token_bypass_pools_after_the_adapter_and_equals_v1_under_cls_pooling() -> None:
    torch.manual_seed(0)
    config = MultiExitConfig(backbone=six_layer_backbone(), num_labels=2, pooling="mean", bypass_input="tokens")
    model = MultiExitModel(config).eval()
    for bypass in model.bypasses.values():
        torch.nn.init.normal_(bypass.up.weight)
    hidden = torch.randn(3, 9, 32)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    hidden = hidden * mask[..., None]  # the layers leave padded positions as they are; pooling ignores them
    adapted = hidden + model.bypasses["0"](hidden)
    pooled = (adapted * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(model.exit_logits(2, hidden, mask), model.exits["2"](pooled))
    flops = count_flops(model, seq_len=64)
    assert flops.per_bypass > 64 * 2 * 32 * 32 * 2  # the adapter runs on every token

    cls_tokens = MultiExitModel(MultiExitConfig(**{**config.to_dict(), "pooling": "cls"})).eval()
    cls_pooled = MultiExitModel(MultiExitConfig(**{**config.to_dict(), "pooling": "cls", "bypass_input": "pooled"}))
    cls_pooled.load_state_dict(cls_tokens.state_dict())
    torch.testing.assert_close(cls_tokens.exit_logits(2, hidden, mask), cls_pooled.eval().exit_logits(2, hidden, mask))


def test_depth_damper_rises_from_gamma_at_layer_one_to_one_at_the_top() -> None:
    config = MultiExitConfig(backbone=six_layer_backbone(), num_labels=2, gamma=0.1, gamma_schedule="depth")
    gammas = [config.exit_gamma(layer) for layer in range(1, 7)]
    assert gammas[0] == pytest.approx(0.1) and gammas[-1] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(gammas[:-1], gammas[1:], strict=True))
    model = MultiExitModel(config).eval()  # eval: no dropout, gradients still flow
    hidden = torch.randn(2, 5, 32, requires_grad=True)
    mask = torch.ones(2, 5, dtype=torch.long)
    plain = MultiExitModel(MultiExitConfig(**{**config.to_dict(), "gamma": 1.0}))
    plain.load_state_dict(model.state_dict())
    plain.eval()
    for layer in (1, 4):
        (grad,) = torch.autograd.grad(model.exit_logits(layer, hidden, mask).sum(), hidden)
        (reference,) = torch.autograd.grad(plain.exit_logits(layer, hidden, mask).sum(), hidden)
        torch.testing.assert_close(grad, gammas[layer - 1] * reference)


def test_gradient_equilibrium_divides_every_losss_gradient_by_the_exits_above() -> None:
    ids, mask = batch()
    backbone = FAMILIES["bert"].to_dict()  # 4 layers, 4 exits: h_1 feeds 4 losses, h_2 three
    torch.manual_seed(0)
    plain = MultiExitModel(MultiExitConfig(backbone=backbone, num_labels=2, use_bypass=False, gamma=1.0)).eval()
    balanced = MultiExitModel(MultiExitConfig(**{**plain.config.to_dict(), "gradient_equilibrium": True})).eval()
    balanced.load_state_dict(plain.state_dict())

    def gradients_at(model: MultiExitModel, exit_index: int) -> dict[int, torch.Tensor]:
        outputs = {}
        run_layer = model.run_layer

        def recording(layer, hidden, attention):
            out = run_layer(layer, hidden, attention)
            out.retain_grad()
            outputs[layer] = out
            return out

        model.run_layer = recording
        model(ids, mask).exit_logits[exit_index].sum().backward()
        del model.run_layer  # back to the class's method
        return {layer: out.grad for layer, out in outputs.items() if out.grad is not None}

    for exit_index in (0, 1, 3):
        before, after = gradients_at(plain, exit_index), gradients_at(balanced, exit_index)
        for layer, n in ((1, 4), (2, 3)):
            if layer <= exit_index + 1:
                torch.testing.assert_close(after[layer], before[layer] / n)
    with torch.no_grad():
        for a, b in zip(plain(ids, mask).exit_logits, balanced(ids, mask).exit_logits, strict=True):
            torch.testing.assert_close(a, b)  # the forward pass is unchanged


def test_attention_pooling_starts_as_mean_pooling_learns_its_own_weights_and_survives_a_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    options = {"backbone": six_layer_backbone(), "num_labels": 3, "bypass_input": "tokens", "gamma_schedule": "depth"}
    mean = MultiExitModel(MultiExitConfig(**options, pooling="mean")).eval()
    attention = MultiExitModel(MultiExitConfig(**options, pooling="cls", attention_pooling=True)).eval()
    assert sorted(attention.poolers) == [str(layer) for layer in range(1, 7)]
    missing, unexpected = attention.load_state_dict(mean.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("poolers.") for name in missing)
    for bypass in attention.bypasses.values():
        torch.nn.init.normal_(bypass.up.weight)
    mean.load_state_dict({k: v for k, v in attention.state_dict().items() if not k.startswith("poolers.")})
    hidden = torch.randn(3, 9, 32)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    hidden = hidden * mask[..., None]
    for layer in (2, 6):  # zero scores: uniform weights over the real tokens, as mean pooling (tokens bypass too)
        torch.testing.assert_close(attention.exit_logits(layer, hidden, mask), mean.exit_logits(layer, hidden, mask))
    assert any(p is attention.poolers["1"].score.weight for p in attention.exit_parameters())
    per_exit = count_flops(mean, seq_len=64).per_exit_head, count_flops(attention, seq_len=64).per_exit_head
    assert per_exit[0] < per_exit[1] < count_flops(attention, seq_len=64).per_layer / 50  # a score per token

    torch.nn.init.normal_(attention.poolers["6"].score.weight)
    weights = attention.poolers["6"](hidden, mask)  # (B, 1, T)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 1))
    assert float(weights.detach()[1, 0, 5:].abs().max()) == 0.0  # padding gets no weight
    assert not torch.allclose(weights[0], torch.full((1, 9), 1 / 9))
    expected = attention.exits["6"](torch.bmm(weights, hidden).squeeze(1))
    torch.testing.assert_close(attention.exit_logits(6, hidden, mask), expected)
    # a precomputed shared pooling (the engine passes one) does not replace the exit's own weights
    torch.testing.assert_close(attention.exit_logits(6, hidden, mask, attention.pool_weights(mask)), expected)

    attention.save_pretrained(tmp_path / "model")
    reloaded = MultiExitModel.from_pretrained(tmp_path / "model").eval()
    assert reloaded.config.attention_pooling
    torch.testing.assert_close(reloaded.exit_logits(6, hidden, mask), expected)


@pytest.mark.parametrize("attention_pooling", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_engine_runs_a_token_bypass_model_as_its_forward_pass(packed: bool, attention_pooling: bool) -> None:
    from badge import EarlyExitEngine, ExitPolicy

    torch.manual_seed(0)
    config = MultiExitConfig(
        backbone=six_layer_backbone(),
        num_labels=3,
        pooling="mean",
        bypass_input="tokens",
        attention_pooling=attention_pooling,
    )
    model = MultiExitModel(config).eval()
    for bypass in model.bypasses.values():
        torch.nn.init.normal_(bypass.up.weight)
    for pooler in model.poolers.values():  # each exit's own token weights, when it has them
        torch.nn.init.normal_(pooler.score.weight)
    lengths = torch.randint(3, 12, (20,))
    mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
    ids = torch.randint(5, 60, (20, 12)) * mask
    with torch.no_grad():
        expected = torch.softmax(model(ids, mask).exit_logits[1], dim=-1)
    for batch_size in (1, 8):
        result = EarlyExitEngine(model, ExitPolicy("static:2"), batch_size=batch_size, packed=packed).run(ids, mask)
        assert result.exit_layers.tolist() == [2] * 20
        torch.testing.assert_close(result.probs, expected, atol=1e-5, rtol=1e-5)
