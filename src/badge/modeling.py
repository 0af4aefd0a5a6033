"""MultiExitModel: a Hugging Face encoder with an exit after every layer and block-wise bypasses.

Exit i reads the pooled hidden state of layer i. An intermediate exit sees it through a gradient
damper (forward unchanged, gradient into the backbone times `gamma`) and its block's bypass, a
zero-initialised bottleneck adapter on the pooled vector (v1) or on every token before pooling (v2);
the final exit is an ordinary classifier on the last layer. Training can add self-distillation of the
intermediate exits from the final one and ElasticBERT's gradient equilibrium (see `MultiExitConfig`).
The model also exposes its pieces (`embed`, `attention_inputs`, `run_layer`, `exit_logits`: the
`ExitModel` protocol) so that an inference engine can run it layer by layer and stop early. What differs
between encoder families is the family's adapter (`badge.families`); the exit heads and bypasses are in
`badge.exits`, reading saved folders in `badge.loading`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.utils import ModelOutput

from badge.attention_heads import apply_heads_kept
from badge.config import DEFAULT_MAX_SEQ_LENGTH, MultiExitConfig
from badge.device import resolve_dtype
from badge.exit_model import AttentionInputs, ExitModel
from badge.exits import Bypass, ExitHead, TokenScore, damp_gradient
from badge.families import family_for
from badge.folders import save_folder
from badge.loading import (
    EXIT_POLICY_FILE,
    CheckpointError,
    check_encoder_folder,
    check_exists,
    check_model_folder,
    declared_pooling,
    hub_options,
    read_model_config,
    read_tokenizer,
    unreadable,
)
from badge.packed import real_tokens, tokens_from_lengths
from badge.tasks import get_task


@dataclass
class MultiExitOutput(ModelOutput):
    """Forward result: `logits` (B, K) of the final exit, as a Hugging Face sequence classifier returns them;
    `exit_logits` holds one `(B, K)` tensor per exit, shallowest first (the last is `logits`)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    exit_logits: tuple[torch.Tensor, ...] | None = None
    exit_losses: torch.Tensor | None = None


class MultiExitModel(PreTrainedModel, ExitModel):
    """A multi-exit classifier over any Hugging Face encoder whose family has an adapter (`badge.families`).

    `family` is the encoder's `model_type`; `encoder_family` the adapter that knows how to drive it.
    """

    config_class = MultiExitConfig
    base_model_prefix = "multi_exit"
    main_input_name = "input_ids"

    def __init__(self, config: MultiExitConfig, encoder: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        backbone_config = config.backbone_config()
        self.family = backbone_config.model_type
        self.encoder_family = family_for(self.family)
        self.encoder = encoder if encoder is not None else AutoModel.from_config(backbone_config)
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None  # unused: exits pool for themselves, and unused weights break DDP
        if config.heads_kept:
            apply_heads_kept(self.encoder, self.encoder_family, {int(k): v for k, v in config.heads_kept.items()})
        hidden = backbone_config.hidden_size
        num_labels = config.num_labels
        self.exits = nn.ModuleDict(
            {str(layer): ExitHead(hidden, num_labels, config.classifier_dropout) for layer in config.exit_layers}
        )
        # attention pooling: one zero-initialised token score per exit (uniform weights over real tokens at first)
        self.poolers = nn.ModuleDict()
        if config.attention_pooling:
            self.poolers.update({str(layer): TokenScore(hidden) for layer in config.exit_layers})
        self.bypasses = nn.ModuleDict()
        if config.use_bypass:
            blocks = sorted({config.block_of(layer) for layer in self.intermediate_layers})
            eps = getattr(backbone_config, "layer_norm_eps", 1e-12)
            self.bypasses.update({str(b): Bypass(hidden, config.bypass_dim, eps) for b in blocks})
        # The bypass key feeding each intermediate exit (None: no bypass), resolved once because at
        # inference an exit runs after every layer and config lookups cost more than its small ops.
        self._exit_bypass = {
            layer: str(config.block_of(layer)) if config.use_bypass else None for layer in self.intermediate_layers
        }
        self._exit_gamma = {layer: config.exit_gamma(layer) for layer in self.intermediate_layers}
        # v2 bypasses read tokens; with [CLS] pooling (and no attention pooling) only the first token is pooled,
        # so that is the pooled vector
        pools_tokens = config.pooling == "mean" or config.attention_pooling
        self._token_bypass = config.use_bypass and config.bypass_input == "tokens" and pools_tokens
        self.tokenizer = None
        self.post_init()

    # ----- structure -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def exit_layers(self) -> list[int]:
        """1-based layers with an exit, shallowest first; the last is always `num_layers`."""
        return list(self.config.exit_layers)

    @property
    def intermediate_layers(self) -> list[int]:
        return [layer for layer in self.config.exit_layers if layer != self.config.num_layers]

    def max_length(self, requested: int | None = None) -> int:
        """Tokens per text: `requested`, else what the model was trained with; checked against the encoder.

        Raises ValueError naming the value when it is not a positive integer or exceeds the encoder's
        position limit.
        """
        value = self.config.max_seq_length or DEFAULT_MAX_SEQ_LENGTH if requested is None else requested
        limit = self.encoder_family.position_limit(self.encoder.config)
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(f"max length {value!r} must be an integer >= 2 (tokens per text, special tokens included)")
        if limit is not None and value > limit:
            raise ValueError(f"max length {value} exceeds the {limit} positions of this {self.family} encoder")
        return value

    @property
    def label_names(self) -> list[str]:
        return [self.config.id2label[i] for i in range(self.config.num_labels)]

    def exit_parameters(self) -> list[nn.Parameter]:
        """Parameters of the exits and bypasses (new, randomly initialised: trained with their own rate)."""
        return list(self.exits.parameters()) + list(self.poolers.parameters()) + list(self.bypasses.parameters())

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if getattr(module, "zero_init", False):
            init.zeros_(module.weight)
            init.zeros_(module.bias)

    # ----- layer-by-layer pieces (used by forward and by the engines) ------------------------
    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embedding output `h_0`, shape (B, T, d)."""
        return self.encoder_family.embed(self.encoder, input_ids, token_type_ids)

    def attention_inputs(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        packed: bool = False,
        lengths: torch.Tensor | None = None,
    ) -> AttentionInputs:
        """Prepare the mask (and the family's position bias, e.g. MPNet's) for hidden states of shape (B, T, d).

        `packed=True` asks for padding-free layers (inference only); families whose adapter is not
        `packable` and a model in training mode keep the Hugging Face layers. `lengths` (B,), a
        host (CPU) copy of the real tokens per row, lets a model on a GPU prepare the masks without
        waiting for the device (reading the mask's contents on the host would).
        """
        weights = self.pool_weights(attention_mask, hidden.dtype)
        width = attention_mask.shape[1]
        if packed and self.encoder_family.packable and not self.training:
            if lengths is None:
                tokens = real_tokens(attention_mask)
            else:
                tokens = tokens_from_lengths(lengths, width, hidden.device)
            # The packed layers call SDPA themselves: a (B, 1, 1, T) key-padding mask, none without padding.
            mask = None if tokens is None else attention_mask.bool()[:, None, None, :]
            return AttentionInputs(mask, None, weights, packed=True, tokens=tokens)
        bias = self.encoder_family.position_bias(self.encoder, hidden)
        implementation = self.encoder.config._attn_implementation
        if lengths is not None and bool((lengths == width).all()):
            mask = None  # no padding: the layers need no mask
        elif lengths is not None and implementation in ("sdpa", "eager"):
            # The mask create_bidirectional_mask builds, without its check of the mask's contents (a device sync).
            keep = attention_mask.bool()[:, None, None, :].expand(-1, 1, width, -1)  # (B, 1, T, T)
            if implementation == "sdpa":
                mask = keep
            else:  # eager attention adds the mask to its scores
                mask = torch.zeros(keep.shape, dtype=hidden.dtype, device=hidden.device)
                mask.masked_fill_(~keep, torch.finfo(hidden.dtype).min)
        else:
            mask = create_bidirectional_mask(
                config=self.encoder.config, inputs_embeds=hidden, attention_mask=attention_mask
            )
        return AttentionInputs(mask, bias, weights)

    def run_layer(self, layer: int, hidden: torch.Tensor, attention: AttentionInputs) -> torch.Tensor:
        """Apply 1-based transformer layer `layer` to hidden states (B, T, d)."""
        return self.encoder_family.run_layer(self.encoder, layer, hidden, attention)

    def pool_weights(self, attention_mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, 1, T) pooling weights by the configured `pooling`: one-hot on the first token (`cls`) or the
        masked mean (`mean`). Their batched product with hidden states (B, T, d) is the pooled vector.

        Computed once per batch of rows (`attention_inputs`), so each exit pools with one `bmm`.
        """
        if self.config.pooling == "cls":
            weights = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
            weights[:, 0] = 1.0
        else:
            weights = attention_mask.to(dtype)
            weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1.0)
        return weights.unsqueeze(1)  # (B, 1, T)

    def exit_logits(
        self,
        layer: int,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        pool_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, K) of the exit after 1-based `layer`; pass `pool_weights` when they are already at hand."""
        key = str(layer)
        bypass = self._exit_bypass.get(layer)
        on_tokens = bypass is not None and self._token_bypass
        if on_tokens:  # v2: adapter on every token, then pooling
            if torch.is_grad_enabled():
                hidden = damp_gradient(hidden, self._exit_gamma[layer])
            hidden = hidden + self.bypasses[bypass](hidden)
        if key in self.poolers:  # this exit's own token weights, from the states it pools
            pool_weights = self.poolers[key](hidden, attention_mask)
        elif pool_weights is None:
            pool_weights = self.pool_weights(attention_mask, hidden.dtype)  # (B, 1, T)
        pooled = torch.bmm(pool_weights, hidden).squeeze(1)  # (B, d)
        if layer in self._exit_bypass and not on_tokens:  # an intermediate exit, damped (and bypassed) when pooled
            if torch.is_grad_enabled():
                pooled = damp_gradient(pooled, self._exit_gamma[layer])
            if bypass is not None:
                pooled = pooled + self.bypasses[bypass](pooled)
        return self.exits[key](pooled)

    # ----- training forward ------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        exit_weights: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> MultiExitOutput:
        """Run every layer and every exit.

        Args:
            input_ids, attention_mask, token_type_ids: (B, T) tensors.
            labels: (B,) class ids, (B, K) multi-hot floats, or (B,) regression targets.
            exit_weights: (E,) weights of the per-exit losses; default from `config.loss_weights`.
        Returns:
            `MultiExitOutput` with `exit_logits` (one (B, K) tensor per exit) and, given labels,
            `loss` (weighted sum) and `exit_losses` (E,).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.embed(input_ids, token_type_ids)
        attention = self.attention_inputs(hidden, attention_mask)
        wanted = set(self.config.exit_layers)
        equilibrium = self.config.gradient_equilibrium and torch.is_grad_enabled()
        logits = []
        for layer in range(1, self.num_layers + 1):
            hidden = self.run_layer(layer, hidden, attention)
            if layer in wanted:
                branch = hidden
                if equilibrium and layer < self.num_layers:
                    # n losses reach h_j (this exit and the n - 1 above): the branch gets 1/n of its gradient,
                    # the path upwards (n - 1)/n, so every loss's gradient into h_j ends up divided by n.
                    n = sum(1 for e in self.config.exit_layers if e >= layer)
                    branch = damp_gradient(hidden, 1.0 / n)
                    hidden = damp_gradient(hidden, (n - 1) / n)
                logits.append(self.exit_logits(layer, branch, attention_mask, attention.pool_weights))
        if labels is None:
            return MultiExitOutput(logits=logits[-1], exit_logits=tuple(logits))
        losses = torch.stack(self.exit_losses(logits, labels))  # (E,)
        weights = self.default_exit_weights() if exit_weights is None else exit_weights
        loss = (losses * weights.to(losses.device)).sum()
        return MultiExitOutput(loss=loss, logits=logits[-1], exit_logits=tuple(logits), exit_losses=losses.detach())

    def exit_losses(self, logits: list[torch.Tensor] | tuple[torch.Tensor, ...], labels: torch.Tensor) -> list:
        """Per-exit training losses, shallowest first: the task loss, mixed with self-distillation from the
        (detached) final exit for the intermediate exits when `config.distill_weight` > 0."""
        losses = [self.task_loss(z, labels) for z in logits]
        alpha = self.config.distill_weight
        if alpha > 0.0:
            teacher = logits[-1].detach()
            for e in range(len(logits) - 1):
                distill = self.distill_loss(logits[e], teacher)
                losses[e] = (1.0 - alpha) * losses[e] + alpha * distill
        return losses

    def distill_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Self-distillation loss of one exit's logits (B, K) towards the teacher's logits (B, K), at
        `config.distill_temperature`, as the task defines it (`badge.tasks`)."""
        return get_task(self.config.problem_type).distill_loss(student, teacher, self.config.distill_temperature)

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of one exit for this model's task (`badge.tasks`)."""
        return get_task(self.config.problem_type).loss(logits, labels)

    def default_exit_weights(self) -> torch.Tensor:
        """Per-exit loss weights from `config.loss_weights`, summing to one."""
        positions = torch.tensor(self.config.exit_layers, dtype=torch.float32)
        scheme = self.config.loss_weights
        if scheme == "uniform":
            weights = torch.ones_like(positions)
        elif scheme == "ascending":
            weights = positions
        else:
            weights = positions.flip(0)
        return weights / weights.sum()

    # ----- building, saving, loading ---------------------------------------------------------
    @classmethod
    def from_encoder(
        cls,
        path: str | os.PathLike,
        num_labels: int | None = None,
        label_names: list[str] | None = None,
        problem_type: str = "single_label_classification",
        load_options: dict[str, Any] | None = None,
        **exit_options: Any,
    ) -> MultiExitModel:
        """Build a new multi-exit model from a plain encoder checkpoint: a folder or a Hugging Face Hub id.

        Args:
            path: folder with the encoder's `config.json`, `model.safetensors` and tokenizer files, or a Hub id.
            num_labels: number of classes (1 for regression); inferred from `label_names` if omitted.
            label_names: class names, index = label id.
            problem_type: `single_label_classification`, `multi_label_classification` or `regression`.
            load_options: where the files come from, as `from_pretrained` takes it (`revision`, `cache_dir`,
                `token`, `local_files_only` ...; see `HUB_OPTIONS`).
            exit_options: any `MultiExitConfig` field (`use_bypass`, `gamma`, `block_size`, `pooling` ...).
        """
        hub = hub_options(load_options or {})
        check_exists(path)
        if os.path.isdir(path):
            check_encoder_folder(Path(path) / hub.get("subfolder", ""))
        if label_names is not None:
            num_labels = len(label_names) if num_labels is None else num_labels
            if num_labels != len(label_names):
                raise ValueError(f"num_labels {num_labels} does not match {len(label_names)} label names")
        if num_labels is None:
            raise ValueError("give num_labels or label_names")
        if label_names is None:
            label_names = [str(i) for i in range(num_labels)] if get_task(problem_type).has_classes else ["value"]
        try:
            backbone = AutoConfig.from_pretrained(path, trust_remote_code=False, **hub)
            encoder = AutoModel.from_pretrained(
                path, config=backbone, use_safetensors=True, trust_remote_code=False, **hub
            )
        except (OSError, ValueError) as error:
            raise CheckpointError(unreadable(path, error)) from error
        exit_options.setdefault("pooling", declared_pooling(path, hub))
        config = MultiExitConfig(
            backbone=backbone.to_dict(),
            num_labels=num_labels,
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
            problem_type=problem_type,
            **exit_options,
        )
        model = cls(config, encoder=encoder)
        model.tokenizer = read_tokenizer(path, hub, encoder.config.vocab_size, required=True)
        return model

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save config, safetensors weights, tokenizer and `exit_policy.json` into `save_directory`.

        The exit policy is written to `exit_policy.json` only (its one home: config.json does not repeat it).

        Each file is replaced atomically and every other file in the folder is kept (`badge.folders`);
        a folder of another kind (an ONNX export, a plain encoder) is refused with `FolderError`.
        """

        def write(staging: Path) -> None:
            PreTrainedModel.save_pretrained(self, staging, **kwargs)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(staging)
            (staging / EXIT_POLICY_FILE).write_text(json.dumps(self.config.exit_policy, indent=2) + "\n")

        save_folder(save_directory, write, kind="model")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        config: PretrainedConfig | str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> MultiExitModel:
        """Load a saved multi-exit model from a folder or a Hugging Face Hub id (safetensors weights only).

        Takes the keyword arguments of `PreTrainedModel.from_pretrained` (`revision`, `cache_dir`, `token`,
        `local_files_only`, `dtype`, `device_map` ...), so `AutoModel` and `pipeline` load it as well.
        `config` (a `MultiExitConfig`, or where to read one) defaults to the model's own config.json; the exit
        policy comes from `exit_policy.json` (`badge.loading.stored_exit_policy`); the tokenizer is loaded
        when the model's files include one.
        """
        source = str(pretrained_model_name_or_path)
        hub = hub_options(kwargs)
        check_exists(source)
        if os.path.isdir(source):
            check_model_folder(Path(source) / hub.get("subfolder", ""))
        if kwargs.get("use_safetensors") is False:
            raise ValueError("use_safetensors=False: BADGE models are loaded from safetensors weights only")
        kwargs["use_safetensors"] = True
        kwargs.pop("trust_remote_code", None)  # the model's code is this module: nothing remote ever runs
        config = read_model_config(source, hub, config)
        try:
            model = super().from_pretrained(source, *model_args, config=config, **kwargs)
        except Exception as error:  # safetensors raises its own types for truncated or corrupt files
            raise CheckpointError(unreadable(source, error, "model.safetensors")) from error
        requested = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if requested not in (None, "auto"):  # the encoder is built from its own config, in its own dtype
            model = model.to(resolve_dtype(requested))
        model.tokenizer = read_tokenizer(source, hub, model.encoder.config.vocab_size, required=False)
        return model


# After `import badge`, transformers' Auto classes (and so `pipeline("text-classification")`) load saved models.
AutoConfig.register(MultiExitConfig.model_type, MultiExitConfig)
AutoModel.register(MultiExitConfig, MultiExitModel)
AutoModelForSequenceClassification.register(MultiExitConfig, MultiExitModel)
