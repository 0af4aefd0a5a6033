"""MultiExitConfig: every setting of a multi-exit encoder, serialised to config.json.

The backbone's own configuration is nested under `backbone` (a plain dict with its `model_type`),
so a saved folder rebuilds the same encoder without the original checkpoint.
"""

from __future__ import annotations

import json
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from badge.tasks import TASKS

POOLINGS = ("cls", "mean")
LOSS_WEIGHTS = ("uniform", "ascending", "descending")
BYPASS_INPUTS = ("pooled", "tokens")
GAMMA_SCHEDULES = ("constant", "depth")

DEFAULT_EXIT_POLICY: dict[str, Any] = {"rule": "entropy", "tau": 0.3}
DEFAULT_MAX_SEQ_LENGTH = 128  # for models saved before max_seq_length was recorded


class MultiExitConfig(PretrainedConfig):
    """Configuration of a `MultiExitModel`.

    Args:
        backbone: the encoder's config as a dict (`AutoConfig.to_dict()`), with `model_type`.
        exit_layers: 1-based layers that carry an exit; the last layer always does. None = every layer.
        pooling: `cls` (first token) or `mean` (masked mean over tokens).
        use_bypass: add one block-wise bypass adapter per block of `block_size` layers.
        block_size: layers per bypass block; None = `max(2, L // 4)`, at most L (a 1-layer encoder has blocks of 1).
        bypass_dim: bottleneck width `r` of each bypass.
        gamma: gradient damper between the backbone and intermediate exits (1 = no damping).
        bypass_input: what a bypass reads: `pooled` (v1: the pooled vector) or `tokens` (v2: every token's
            hidden state, pooled after the adapter, so an exit gets a per-token non-linearity before pooling).
        gamma_schedule: `constant` (v1: every intermediate exit damped by `gamma`) or `depth` (the damper
            of exit i is `gamma ** ((L - i) / (L - 1))`: `gamma` at layer 1, rising towards 1 near the end).
        distill_weight: self-distillation weight alpha of every intermediate exit: its loss is
            `(1 - alpha) * task loss + alpha * T^2 * KL(final exit || exit)` (0 = off; the final exit keeps its
            plain task loss and, as teacher, receives no gradient from the distillation term).
        distill_temperature: the temperature T of the self-distillation targets.
        gradient_equilibrium: rescale gradients in the backbone so that the gradient every exit's loss sends
            into the hidden states of layer j is divided by the number of exits at or above j (ElasticBERT).
            Each layer's whole gradient is then scaled by one constant, which AdamW (`badge.training`) cancels.
        attention_pooling: every exit pools the tokens with its own learned weights (a zero-initialised linear
            score per token, softmax over the real tokens: mean pooling at the start) instead of `pooling`'s.
        classifier_dropout: dropout inside every exit head.
        loss_weights: `uniform`, `ascending` or `descending` weights over exits in the joint loss.
        exit_policy: the default exit rule and its parameters (see `badge.rules`). Saved to `exit_policy.json`
            beside config.json, not into it: that file is the policy's one home (see `to_json_string`).
        heads_kept: per layer (str index) the attention heads kept after pruning, or None.
        max_seq_length: tokens per text the model was trained with; every command uses it unless told otherwise
            (named as in sentence-transformers: transformers reserves `max_length` for generation).
        training_data: where the training and validation texts came from (`badge.data` origins), so that
            evaluation can refuse a split that overlaps them.
    """

    model_type = "badge-multi-exit"

    def __init__(
        self,
        backbone: dict[str, Any] | None = None,
        exit_layers: list[int] | None = None,
        pooling: str = "cls",
        use_bypass: bool = True,
        block_size: int | None = None,
        bypass_dim: int = 32,
        gamma: float = 0.3,
        bypass_input: str = "pooled",
        gamma_schedule: str = "constant",
        distill_weight: float = 0.0,
        distill_temperature: float = 1.0,
        gradient_equilibrium: bool = False,
        attention_pooling: bool = False,
        classifier_dropout: float = 0.1,
        loss_weights: str = "ascending",
        exit_policy: dict[str, Any] | None = None,
        heads_kept: dict[str, list[int]] | None = None,
        max_seq_length: int | None = None,
        training_data: dict[str, Any] | None = None,
        initializer_range: float = 0.02,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("num_layers", None)  # derived from the backbone; stored only for readers of config.json
        self.backbone = dict(backbone) if backbone else {"model_type": "bert"}
        num_layers = self.backbone_config().num_hidden_layers
        if exit_layers is None:
            exit_layers = list(range(1, num_layers + 1))
        exit_layers = sorted(set(int(layer) for layer in exit_layers) | {num_layers})
        bad = [layer for layer in exit_layers if not 1 <= layer <= num_layers]
        if bad:
            raise ValueError(f"exit_layers {bad} are outside 1..{num_layers} (the backbone has {num_layers} layers)")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r} is not one of {list(POOLINGS)}")
        if loss_weights not in LOSS_WEIGHTS:
            raise ValueError(f"loss_weights {loss_weights!r} is not one of {list(LOSS_WEIGHTS)}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma {gamma} must lie in [0, 1]")
        if bypass_input not in BYPASS_INPUTS:
            raise ValueError(f"bypass_input {bypass_input!r} is not one of {list(BYPASS_INPUTS)}")
        if gamma_schedule not in GAMMA_SCHEDULES:
            raise ValueError(f"gamma_schedule {gamma_schedule!r} is not one of {list(GAMMA_SCHEDULES)}")
        if not 0.0 <= distill_weight <= 1.0:
            raise ValueError(f"distill_weight {distill_weight} must lie in [0, 1]")
        if not distill_temperature > 0.0:
            raise ValueError(f"distill_temperature {distill_temperature} must be > 0")
        if block_size is None:
            block_size = min(num_layers, max(2, num_layers // 4))
        if not 1 <= block_size <= num_layers:
            raise ValueError(f"block_size {block_size} must lie in 1..{num_layers}")
        if bypass_dim < 1:
            raise ValueError(f"bypass_dim {bypass_dim} must be a positive integer")
        if max_seq_length is not None and (
            isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 1
        ):
            raise ValueError(f"max_seq_length {max_seq_length!r} must be a positive integer (tokens per text)")
        self.num_layers = num_layers
        self.exit_layers = exit_layers
        self.pooling = pooling
        self.use_bypass = bool(use_bypass)
        self.block_size = int(block_size)
        self.bypass_dim = int(bypass_dim)
        self.gamma = float(gamma)
        self.bypass_input = bypass_input
        self.gamma_schedule = gamma_schedule
        self.distill_weight = float(distill_weight)
        self.distill_temperature = float(distill_temperature)
        self.gradient_equilibrium = bool(gradient_equilibrium)
        self.attention_pooling = bool(attention_pooling)
        self.classifier_dropout = float(classifier_dropout)
        self.loss_weights = loss_weights
        self.exit_policy = dict(exit_policy) if exit_policy else dict(DEFAULT_EXIT_POLICY)
        self.heads_kept = heads_kept
        self.max_seq_length = max_seq_length
        self.training_data = training_data
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        if self.problem_type is None:
            self.problem_type = TASKS[0]
        if self.problem_type not in TASKS:
            raise ValueError(f"problem_type {self.problem_type!r} is not one of {list(TASKS)}")

    def to_json_string(self, use_diff: bool = True) -> str:
        """The text of config.json: every setting but `exit_policy`, whose one home is `exit_policy.json`
        (`MultiExitModel.save_pretrained` writes it), so that no stale copy can disagree with it."""
        settings = json.loads(super().to_json_string(use_diff))
        settings.pop("exit_policy", None)
        return json.dumps(settings, indent=2, sort_keys=True) + "\n"

    def backbone_config(self) -> PretrainedConfig:
        """The encoder's own `PretrainedConfig`, rebuilt from the nested dict."""
        settings = dict(self.backbone)
        return AutoConfig.for_model(settings.pop("model_type"), **settings)

    def exit_gamma(self, layer: int) -> float:
        """Gradient damper of the intermediate exit after 1-based `layer` (see `gamma_schedule`)."""
        if self.gamma_schedule == "constant" or self.num_layers == 1:
            return self.gamma
        return self.gamma ** ((self.num_layers - layer) / (self.num_layers - 1))

    def block_of(self, layer: int) -> int:
        """0-based bypass block that 1-based `layer` belongs to."""
        return (layer - 1) // self.block_size
