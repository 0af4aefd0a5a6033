"""Encoder families: everything that differs between kinds of Hugging Face encoder, one adapter per family.

`MultiExitModel` runs an encoder piece by piece (embeddings, then one layer at a time), the padding-free
path runs BERT-structured layers on real tokens only, head pruning slices the attention weights, and
the ONNX export feeds the embeddings their inputs. Where families differ, they differ here: each family
is an `EncoderFamily` registered under the `model_type`s it serves, and nothing else in badge names one.

To support another family, subclass `EncoderFamily` (or the adapter it most resembles), override what
differs from BERT, decorate it with `@register_family`, and add a tiny config of it to `FAMILIES` in
tests/test_model.py (every family there is checked against the plain Hugging Face encoder).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from badge.exit_model import AttentionInputs
from badge.packed import packed_layer


@dataclass
class HeadParts:
    """The modules of one layer's attention that head pruning touches.

    attention: the module holding the head count (`head_count_name`) and `attention_head_size`.
    projections: query, key and value: their output features are the heads side by side.
    output: the output projection: its input features are the heads side by side.
    """

    attention: nn.Module
    projections: list[nn.Linear]
    output: nn.Linear
    head_count_name: str

    @property
    def head_size(self) -> int:
        return self.attention.attention_head_size

    @property
    def num_heads(self) -> int:
        return getattr(self.attention, self.head_count_name)


class EncoderFamily:
    """How badge drives one family of Hugging Face encoders; the defaults are BERT's.

    Class attributes:
        model_types: the `config.model_type` values this adapter serves.
        token_types: the embeddings read `token_type_ids` (an ONNX export then takes them as an input).
        packable: the layers are BERT-structured, so `badge.packed` can run them on real tokens only.
        prunable: `head_parts` finds the attention heads, so `badge.pruning` can cut them.
    """

    model_types: tuple[str, ...] = ()
    token_types: bool = True
    packable: bool = False
    prunable: bool = False

    def layers(self, encoder: PreTrainedModel) -> Sequence[nn.Module]:
        """The module that runs each layer, index = 1-based layer - 1."""
        return encoder.encoder.layer

    def embed(
        self, encoder: PreTrainedModel, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """Embedding output `h_0` (B, T, d) of token ids (B, T)."""
        return encoder.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    def position_bias(self, encoder: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor | None:
        """A bias every layer adds to its attention scores, computed once per batch (None: the family has none)."""
        return None

    def run_layer(
        self, encoder: PreTrainedModel, layer: int, hidden: torch.Tensor, attention: AttentionInputs
    ) -> torch.Tensor:
        """Apply 1-based `layer` to hidden states (B, T, d); packed attention inputs run `badge.packed`."""
        module = self.layers(encoder)[layer - 1]
        if attention.packed:
            return packed_layer(module, hidden, attention.mask, attention.tokens)
        out = module(hidden, attention.mask)
        return out[0] if isinstance(out, tuple) else out

    def position_limit(self, config: PretrainedConfig) -> int | None:
        """The most tokens a text may have (special tokens included); None where the encoder sets no limit."""
        return getattr(config, "max_position_embeddings", None)

    def feed_forward_size(self, config: PretrainedConfig) -> int:
        """Inner width of each layer's feed-forward block (for FLOP counts)."""
        return config.intermediate_size

    def head_parts(self, encoder: PreTrainedModel, layer: int) -> HeadParts:
        """The attention modules of 1-based `layer`; ValueError for a family without head pruning."""
        prunable = [name for name in family_names() if family_for(name).prunable]
        raise ValueError(f"head pruning supports the families {prunable}; this model is {encoder.config.model_type!r}")


_REGISTRY: dict[str, EncoderFamily] = {}


def register_family(adapter_class: type[EncoderFamily]) -> type[EncoderFamily]:
    """Register an adapter under each of its `model_types` (use as a class decorator); returns the class.

    Raises ValueError when a model type is already served by another adapter.
    """
    if not adapter_class.model_types:
        raise ValueError(f"{adapter_class.__name__} names no model_types to serve")
    taken = [name for name in adapter_class.model_types if name in _REGISTRY]
    if taken:
        raise ValueError(f"encoder families {taken} are already registered; choose other model_types")
    adapter = adapter_class()
    _REGISTRY.update({name: adapter for name in adapter_class.model_types})
    return adapter_class


def family_for(model_type: str) -> EncoderFamily:
    """The adapter serving `model_type`; ValueError naming the supported families if none does."""
    if model_type not in _REGISTRY:
        raise ValueError(f"encoder family {model_type!r} is not supported; expected one of {family_names()}")
    return _REGISTRY[model_type]


def family_names() -> list[str]:
    """Every supported `model_type`, in registration order."""
    return list(_REGISTRY)


@register_family
class BertFamily(EncoderFamily):
    """BERT and MiniLM: the reference structure."""

    model_types = ("bert",)
    packable = True
    prunable = True

    def head_parts(self, encoder: PreTrainedModel, layer: int) -> HeadParts:
        attention = self.layers(encoder)[layer - 1].attention
        self_attention = attention.self
        projections = [self_attention.query, self_attention.key, self_attention.value]
        return HeadParts(self_attention, projections, attention.output.dense, "num_attention_heads")


@register_family
class RobertaFamily(BertFamily):
    """RoBERTa and XLM-R: BERT's layers; positions start after the padding index."""

    model_types = ("roberta", "xlm-roberta")

    def position_limit(self, config: PretrainedConfig) -> int | None:
        return config.max_position_embeddings - (config.pad_token_id + 1)


@register_family
class ElectraFamily(BertFamily):
    """ELECTRA: BERT's layers; smaller embeddings are projected up to the hidden size."""

    model_types = ("electra",)

    def embed(
        self, encoder: PreTrainedModel, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> torch.Tensor:
        hidden = encoder.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        if hasattr(encoder, "embeddings_project"):
            hidden = encoder.embeddings_project(hidden)
        return hidden


@register_family
class DistilBertFamily(EncoderFamily):
    """DistilBERT: no token types; its own attention module names."""

    model_types = ("distilbert",)
    token_types = False
    prunable = True

    def layers(self, encoder: PreTrainedModel) -> Sequence[nn.Module]:
        return encoder.transformer.layer

    def embed(
        self, encoder: PreTrainedModel, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> torch.Tensor:
        return encoder.embeddings(input_ids)

    def feed_forward_size(self, config: PretrainedConfig) -> int:
        return config.hidden_dim

    def head_parts(self, encoder: PreTrainedModel, layer: int) -> HeadParts:
        attention = self.layers(encoder)[layer - 1].attention
        return HeadParts(attention, [attention.q_lin, attention.k_lin, attention.v_lin], attention.out_lin, "n_heads")


@register_family
class AlbertFamily(EncoderFamily):
    """ALBERT: groups of layers share weights; smaller embeddings are mapped up to the hidden size."""

    model_types = ("albert",)

    def layers(self, encoder: PreTrainedModel) -> Sequence[nn.Module]:
        groups = encoder.encoder.albert_layer_groups
        count = encoder.config.num_hidden_layers
        per_group = count / encoder.config.num_hidden_groups
        return [groups[int(index / per_group)] for index in range(count)]

    def embed(
        self, encoder: PreTrainedModel, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> torch.Tensor:
        hidden = encoder.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        return encoder.encoder.embedding_hidden_mapping_in(hidden)


@register_family
class MpnetFamily(EncoderFamily):
    """MPNet: no token types; every layer adds a relative position bias computed once per batch."""

    model_types = ("mpnet",)
    token_types = False

    def embed(
        self, encoder: PreTrainedModel, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> torch.Tensor:
        return encoder.embeddings(input_ids=input_ids)

    def position_bias(self, encoder: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor | None:
        return encoder.encoder.compute_position_bias(hidden)

    def run_layer(
        self, encoder: PreTrainedModel, layer: int, hidden: torch.Tensor, attention: AttentionInputs
    ) -> torch.Tensor:
        out = self.layers(encoder)[layer - 1](hidden, attention.mask, attention.position_bias)
        return out[0] if isinstance(out, tuple) else out
