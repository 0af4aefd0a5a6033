"""What an early-exit engine drives: the `ExitModel` protocol and the per-batch `AttentionInputs`.

`EarlyExitEngine` runs a model piece by piece: embeddings, one layer at a time, an exit where the rule
reads one. `MultiExitModel` (PyTorch) and `OnnxMultiExitModel` (ONNX Runtime) both implement this
protocol; anything else that implements it can be driven the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class AttentionInputs:
    """What the layers and exits need besides the hidden states, prepared once per batch of rows.

    mask: the layers' attention mask (None where no row is padded); position_bias: MPNet's relative
    position bias; pool_weights: (B, 1, T) weights that pool hidden states (B, T, d) into (B, 1, d);
    packed: run the layers on real tokens only (`badge.packed`), with `tokens` their flat indices.
    """

    mask: torch.Tensor | None
    position_bias: torch.Tensor | None = None
    pool_weights: torch.Tensor | None = None
    packed: bool = False
    tokens: torch.Tensor | None = None  # real-token indices for the packed layers (None: no padding)


@runtime_checkable
class ExitModelConfig(Protocol):
    """The settings an engine reads from a model: its task, its number of labels and its stored exit policy."""

    problem_type: str
    exit_policy: dict[str, Any]

    @property
    def num_labels(self) -> int: ...


@runtime_checkable
class ExitModel(Protocol):
    """A multi-exit classifier an engine can run layer by layer (`badge.engine.EarlyExitEngine`).

    config: see `ExitModelConfig`. tokenizer: a Hugging Face tokenizer, or None where the model has none.
    """

    config: ExitModelConfig
    tokenizer: Any

    @property
    def num_layers(self) -> int:
        """Transformer layers of the encoder."""
        ...

    @property
    def exit_layers(self) -> list[int]:
        """1-based layers with an exit, shallowest first; the last is always `num_layers`."""
        ...

    @property
    def label_names(self) -> list[str]:
        """Class names, index = label id."""
        ...

    @property
    def device(self) -> torch.device:
        """Where the model's tensors live, and so the rows' tensors while it runs them."""
        ...

    def eval(self) -> ExitModel:
        """Switch to inference mode; returns the model."""
        ...

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embedding output (B, T, d) of token ids (B, T)."""
        ...

    def attention_inputs(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        packed: bool = False,
        lengths: torch.Tensor | None = None,
    ) -> AttentionInputs:
        """Prepare what the layers and exits need for hidden states (B, T, d) and the padding mask (B, T).

        `packed` asks for padding-free layers where the model has them; `lengths` (B,) is a host copy of
        the real tokens per row.
        """
        ...

    def run_layer(self, layer: int, hidden: torch.Tensor, attention: AttentionInputs) -> torch.Tensor:
        """Apply 1-based transformer layer `layer` to hidden states (B, T, d); returns (B, T, d)."""
        ...

    def exit_logits(
        self, layer: int, hidden: torch.Tensor, attention_mask: torch.Tensor, pool_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, K) of the exit after 1-based `layer`, from hidden states (B, T, d) and the mask (B, T)."""
        ...
