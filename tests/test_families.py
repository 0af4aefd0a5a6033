"""Encoder families as adapters, the ExitModel protocol the engine drives, and one-way imports."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AlbertConfig, BertConfig, CamembertConfig

from badge import EarlyExitEngine, ExitPolicy, MultiExitConfig, MultiExitModel, families
from badge.exit_model import AttentionInputs, ExitModel
from badge.families import RobertaFamily, family_for, family_names, register_family

SMALL = {"hidden_size": 32, "num_hidden_layers": 3, "intermediate_size": 64, "num_attention_heads": 4}


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(2)
    lengths = torch.tensor([9, 4, 7, 2, 9, 5])
    mask = (torch.arange(9)[None, :] < lengths[:, None]).long()
    return torch.randint(5, 60, (6, 9)) * mask, mask


def test_every_supported_family_has_one_adapter_and_others_get_a_clear_error() -> None:
    assert family_names() == ["bert", "roberta", "xlm-roberta", "electra", "distilbert", "albert", "mpnet"]
    assert family_for("xlm-roberta") is family_for("roberta")
    with pytest.raises(ValueError, match=r"encoder family 'gpt2' is not supported; expected one of \['bert'"):
        MultiExitModel(MultiExitConfig(backbone={"model_type": "gpt2", "n_layer": 2}, num_labels=2))
    with pytest.raises(ValueError, match=r"already registered"):
        register_family(type("Again", (RobertaFamily,), {"model_types": ("roberta",)}))


def test_a_new_family_is_one_registered_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(families, "_REGISTRY", dict(families._REGISTRY))  # forget the test family afterwards
    backbone = CamembertConfig(vocab_size=60, **SMALL)
    with pytest.raises(ValueError, match="'camembert' is not supported"):
        MultiExitModel(MultiExitConfig(backbone=backbone.to_dict(), num_labels=2))

    @register_family
    class CamembertFamily(RobertaFamily):
        model_types = ("camembert",)

    torch.manual_seed(0)
    model = MultiExitModel(MultiExitConfig(backbone=backbone.to_dict(), num_labels=2)).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        reference = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden = model.embed(ids)
        attention = model.attention_inputs(hidden, mask, packed=True)
        for layer in range(1, model.num_layers + 1):
            hidden = model.run_layer(layer, hidden, attention)
        for head in model.exits.values():  # spread the random exits so that rows leave at different layers
            head.out.weight.normal_(std=3.0)
    assert attention.packed  # the padding-free layers and head pruning come with the adapter it extends
    torch.testing.assert_close(hidden[mask.bool()], reference[mask.bool()])
    policy = ExitPolicy("entropy", tau=0.5)
    assert torch.equal(
        EarlyExitEngine(model, policy, batch_size=6).run(ids, mask).exit_layers,
        EarlyExitEngine(model, policy, batch_size=1).run(ids, mask).exit_layers,
    )


def test_albert_adapter_runs_each_layer_with_its_group_of_shared_weights() -> None:
    backbone = AlbertConfig(vocab_size=60, embedding_size=16, num_hidden_groups=2, **{**SMALL, "num_hidden_layers": 4})
    model = MultiExitModel(MultiExitConfig(backbone=backbone.to_dict(), num_labels=2))
    groups = model.encoder.encoder.albert_layer_groups
    assert list(model.encoder_family.layers(model.encoder)) == [groups[0], groups[0], groups[1], groups[1]]
    refused = r"head pruning supports the families \[.*'distilbert'\]; this model is 'albert'"
    with pytest.raises(ValueError, match=refused):
        model.encoder_family.head_parts(model.encoder, 1)


class OnlyTheProtocol(ExitModel):
    """An ExitModel with nothing but the protocol's members, delegating to a MultiExitModel."""

    def __init__(self, model: MultiExitModel) -> None:
        self._model = model
        self.config = model.config
        self.tokenizer = model.tokenizer

    @property
    def num_layers(self) -> int:
        return self._model.num_layers

    @property
    def exit_layers(self) -> list[int]:
        return self._model.exit_layers

    @property
    def label_names(self) -> list[str]:
        return self._model.label_names

    @property
    def device(self) -> torch.device:
        return self._model.device

    def eval(self) -> OnlyTheProtocol:
        self._model.eval()
        return self

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self._model.embed(input_ids, token_type_ids)

    def attention_inputs(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, packed: bool = False, lengths=None
    ) -> AttentionInputs:
        return self._model.attention_inputs(hidden, attention_mask, packed, lengths)

    def run_layer(self, layer: int, hidden: torch.Tensor, attention: AttentionInputs) -> torch.Tensor:
        return self._model.run_layer(layer, hidden, attention)

    def exit_logits(self, layer, hidden, attention_mask, pool_weights=None) -> torch.Tensor:
        return self._model.exit_logits(layer, hidden, attention_mask, pool_weights)


def test_the_engine_needs_nothing_beyond_the_exit_model_protocol() -> None:
    torch.manual_seed(0)
    backbone = BertConfig(vocab_size=60, **SMALL)
    model = MultiExitModel(MultiExitConfig(backbone=backbone.to_dict(), num_labels=3)).eval()
    with torch.no_grad():
        for head in model.exits.values():
            head.out.weight.normal_(std=3.0)
    assert isinstance(model, ExitModel)
    ids, mask = padded_batch()
    policy = ExitPolicy("maxprob", tau=0.7)
    direct = EarlyExitEngine(model, policy, batch_size=4).run(ids, mask)
    through = EarlyExitEngine(OnlyTheProtocol(model), policy, batch_size=4).run(ids, mask)
    assert len(set(direct.exit_layers.tolist())) > 1  # rows leave at different layers
    assert torch.equal(direct.exit_layers, through.exit_layers) and direct.labels == through.labels
    torch.testing.assert_close(direct.logits, through.logits)


def badge_imports(module: str) -> set[str]:
    """The badge modules `module` imports anywhere in its source, at the top or inside a function."""
    source = Path(importlib.util.find_spec(module).origin).read_text()
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("badge"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("badge"))
    return found


@pytest.mark.parametrize(
    "module", ["badge.modeling", "badge.families", "badge.attention_heads", "badge.exit_model", "badge.loading"]
)
def test_the_model_never_imports_what_drives_it(module: str) -> None:
    above = {"badge.engine", "badge.evaluation", "badge.pruning", "badge.training", "badge.cli", "badge.serve"}
    assert badge_imports(module) & above == set()


def test_pruning_does_not_import_evaluation_so_no_import_circle() -> None:
    assert badge_imports("badge.pruning") & {"badge.evaluation", "badge.engine"} == set()
