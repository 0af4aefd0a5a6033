"""MultiExitModel: a Hugging Face encoder with an exit after every layer and block-wise bypasses.

Exit i reads the pooled hidden state of layer i. An intermediate exit sees it through a gradient
damper (forward unchanged, gradient into the backbone times `gamma`) and its block's bypass, a
zero-initialised bottleneck adapter on the pooled vector (v1) or on every token before pooling (v2);
the final exit is an ordinary classifier on the last layer. Training can add self-distillation of the
intermediate exits from the final one and ElasticBERT's gradient equilibrium (see `MultiExitConfig`).
The model also exposes its pieces (`embed`, `attention_inputs`, `run_layer`, `exit_logits`) so that
an inference engine can run it layer by layer and stop early.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.utils import ModelOutput, cached_file

from badge.config import DEFAULT_MAX_SEQ_LENGTH, MultiExitConfig
from badge.device import resolve_dtype
from badge.folders import TOKENIZER_FILES, load_tokenizer, refuse_shipped_code, save_folder
from badge.packed import PACKED_FAMILIES, packed_layer, real_tokens, tokens_from_lengths
from badge.rules import ExitPolicy
from badge.tasks import get_task

SUPPORTED_FAMILIES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "albert", "mpnet")
EXIT_POLICY_FILE = "exit_policy.json"
# Keyword arguments of `from_pretrained` that say where files come from (a folder or the Hugging Face Hub).
HUB_OPTIONS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "proxies", "subfolder")


class CheckpointError(ValueError):
    """A model folder that is missing files or holds unreadable weights."""


class _GradientDamper(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `gamma` on the way back."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, gamma: float) -> torch.Tensor:
        ctx.gamma = gamma
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.gamma, None


def damp_gradient(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """Return `x` unchanged; gradients flowing back through it are scaled by `gamma`."""
    if gamma >= 1.0 or not torch.is_grad_enabled():
        return x
    return _GradientDamper.apply(x, gamma)


class Bypass(nn.Module):
    """Bottleneck adapter `W_up GELU(W_down LN(x))`; `W_up` starts at zero so training starts as plain multi-exit."""

    def __init__(self, hidden_size: int, bypass_dim: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.down = nn.Linear(hidden_size, bypass_dim)
        self.up = nn.Linear(bypass_dim, hidden_size)
        self.up.zero_init = True  # read by MultiExitModel._init_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(nn.functional.gelu(self.down(self.norm(x))))  # (B, d)


class ExitHead(nn.Module):
    """Small classifier on a pooled vector: dense + tanh (as BERT's pooler), then a linear layer to the labels."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if not self.training:  # skip the no-op dropout calls: at batch 1 an exit costs ~15 % of a layer
            return self.out(torch.tanh(self.dense(pooled)))  # (B, K)
        x = torch.tanh(self.dense(self.dropout(pooled)))
        return self.out(self.dropout(x))  # (B, K)


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


@dataclass
class MultiExitOutput(ModelOutput):
    """Forward result: `logits` (B, K) of the final exit, as a Hugging Face sequence classifier returns them;
    `exit_logits` holds one `(B, K)` tensor per exit, shallowest first (the last is `logits`)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    exit_logits: tuple[torch.Tensor, ...] | None = None
    exit_losses: torch.Tensor | None = None


class MultiExitModel(PreTrainedModel):
    """A multi-exit classifier over any supported Hugging Face encoder (see `SUPPORTED_FAMILIES`)."""

    config_class = MultiExitConfig
    base_model_prefix = "multi_exit"
    main_input_name = "input_ids"

    def __init__(self, config: MultiExitConfig, encoder: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        backbone_config = config.backbone_config()
        self.family = backbone_config.model_type
        if self.family not in SUPPORTED_FAMILIES:
            raise ValueError(
                f"encoder family {self.family!r} is not supported; expected one of {list(SUPPORTED_FAMILIES)}"
            )
        self.encoder = encoder if encoder is not None else AutoModel.from_config(backbone_config)
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None  # unused: exits pool for themselves, and unused weights break DDP
        if config.heads_kept:
            from badge.pruning import apply_heads_kept

            apply_heads_kept(self, {int(k): v for k, v in config.heads_kept.items()})
        hidden = backbone_config.hidden_size
        num_labels = config.num_labels
        self.exits = nn.ModuleDict(
            {str(layer): ExitHead(hidden, num_labels, config.classifier_dropout) for layer in config.exit_layers}
        )
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
        # v2 bypasses read tokens; with [CLS] pooling only the first token is pooled, so that is the pooled vector
        self._token_bypass = config.use_bypass and config.bypass_input == "tokens" and config.pooling == "mean"
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
        backbone = self.encoder.config
        limit = getattr(backbone, "max_position_embeddings", None)
        if limit is not None and self.family in ("roberta", "xlm-roberta"):
            limit -= backbone.pad_token_id + 1  # positions start after the padding index
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
        return list(self.exits.parameters()) + list(self.bypasses.parameters())

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if getattr(module, "zero_init", False):
            init.zeros_(module.weight)
            init.zeros_(module.bias)

    # ----- layer-by-layer pieces (used by forward and by the engines) ------------------------
    def _layer_modules(self) -> nn.ModuleList:
        if self.family == "distilbert":
            return self.encoder.transformer.layer
        return self.encoder.encoder.layer

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embedding output `h_0`, shape (B, T, d)."""
        embeddings = self.encoder.embeddings
        if self.family == "distilbert":
            return embeddings(input_ids)
        if self.family == "mpnet":
            return embeddings(input_ids=input_ids)
        hidden = embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        if self.family == "electra" and hasattr(self.encoder, "embeddings_project"):
            hidden = self.encoder.embeddings_project(hidden)
        if self.family == "albert":
            hidden = self.encoder.encoder.embedding_hidden_mapping_in(hidden)
        return hidden

    def attention_inputs(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        packed: bool = False,
        lengths: torch.Tensor | None = None,
    ) -> AttentionInputs:
        """Prepare the mask (and MPNet's relative position bias) for hidden states of shape (B, T, d).

        `packed=True` asks for padding-free layers (inference only); families outside
        `PACKED_FAMILIES` and a model in training mode keep the Hugging Face layers. `lengths` (B,), a
        host (CPU) copy of the real tokens per row, lets a model on a GPU prepare the masks without
        waiting for the device (reading the mask's contents on the host would).
        """
        weights = self.pool_weights(attention_mask, hidden.dtype)
        width = attention_mask.shape[1]
        if packed and self.family in PACKED_FAMILIES and not self.training:
            if lengths is None:
                tokens = real_tokens(attention_mask)
            else:
                tokens = tokens_from_lengths(lengths, width, hidden.device)
            # The packed layers call SDPA themselves: a (B, 1, 1, T) key-padding mask, none without padding.
            mask = None if tokens is None else attention_mask.bool()[:, None, None, :]
            return AttentionInputs(mask, None, weights, packed=True, tokens=tokens)
        bias = self.encoder.encoder.compute_position_bias(hidden) if self.family == "mpnet" else None
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
        if self.family == "albert":
            albert = self.encoder.encoder
            groups = self.encoder.config.num_hidden_groups
            group = int((layer - 1) / (self.num_layers / groups))
            return albert.albert_layer_groups[group](hidden, attention.mask)
        module = self._layer_modules()[layer - 1]
        if attention.packed:
            return packed_layer(module, hidden, attention.mask, attention.tokens)
        if self.family == "mpnet":
            out = module(hidden, attention.mask, attention.position_bias)
        else:
            out = module(hidden, attention.mask)
        return out[0] if isinstance(out, tuple) else out

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
        if pool_weights is None:
            pool_weights = self.pool_weights(attention_mask, hidden.dtype)  # (B, 1, T)
        bypass = self._exit_bypass.get(layer)
        if bypass is not None and self._token_bypass:  # v2: adapter on every token, then pooling
            if torch.is_grad_enabled():
                hidden = damp_gradient(hidden, self._exit_gamma[layer])
            pooled = torch.bmm(pool_weights, hidden + self.bypasses[bypass](hidden)).squeeze(1)  # (B, d)
            return self.exits[str(layer)](pooled)
        pooled = torch.bmm(pool_weights, hidden).squeeze(1)  # (B, d)
        if layer in self._exit_bypass:  # an intermediate exit
            if torch.is_grad_enabled():
                pooled = damp_gradient(pooled, self._exit_gamma[layer])
            if bypass is not None:
                pooled = pooled + self.bypasses[bypass](pooled)
        return self.exits[str(layer)](pooled)

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
        hub = _hub_options(load_options or {})
        _check_exists(path)
        if os.path.isdir(path):
            folder = Path(path) / hub.get("subfolder", "")
            if not (folder / "config.json").is_file():
                raise CheckpointError(f"{folder} has no config.json: expected a Hugging Face encoder folder")
            if not (folder / "model.safetensors").is_file():
                raise CheckpointError(f"{folder} has no model.safetensors: only safetensors weights are loaded")
            refuse_shipped_code(folder)
        if label_names is not None:
            num_labels = len(label_names) if num_labels is None else num_labels
            if num_labels != len(label_names):
                raise ValueError(f"num_labels {num_labels} does not match {len(label_names)} label names")
        if num_labels is None:
            raise ValueError("give num_labels or label_names")
        if label_names is None:
            label_names = ["value"] if problem_type == "regression" else [str(i) for i in range(num_labels)]
        try:
            backbone = AutoConfig.from_pretrained(path, trust_remote_code=False, **hub)
            encoder = AutoModel.from_pretrained(
                path, config=backbone, use_safetensors=True, trust_remote_code=False, **hub
            )
        except (OSError, ValueError) as error:
            raise CheckpointError(_unreadable(path, error)) from error
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
        if os.path.isdir(path):
            model.tokenizer = load_tokenizer(Path(path) / hub.get("subfolder", ""), encoder.config.vocab_size)
        else:
            model.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, **hub)
        return model

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save config, safetensors weights, tokenizer and `exit_policy.json` into `save_directory`.

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
        `exit_policy.json` next to the weights wins over the policy in `config.json`; the tokenizer is
        loaded when the model's files include one.
        """
        source = str(pretrained_model_name_or_path)
        hub = _hub_options(kwargs)
        _check_exists(source)
        if os.path.isdir(source):
            folder = Path(source) / hub.get("subfolder", "")
            if not (folder / "config.json").is_file():
                raise CheckpointError(f"{folder} is not a saved BADGE model: config.json is missing")
            if not (folder / "model.safetensors").is_file():
                raise CheckpointError(f"{folder} is not a saved BADGE model: model.safetensors is missing")
            refuse_shipped_code(folder)
            if config is None:
                config = read_config(folder)  # names a wrong type or range in the file
        if kwargs.get("use_safetensors") is False:
            raise ValueError("use_safetensors=False: BADGE models are loaded from safetensors weights only")
        kwargs["use_safetensors"] = True
        kwargs.pop("trust_remote_code", None)  # the model's code is this module: nothing remote ever runs
        if not isinstance(config, PretrainedConfig):
            try:
                config = MultiExitConfig.from_pretrained(config or source, **hub)
            except (OSError, ValueError) as error:
                raise CheckpointError(_unreadable(source, error, "config.json")) from error
        if not isinstance(config, MultiExitConfig):
            raise CheckpointError(
                f"{source} holds a {type(config).__name__} ({config.model_type!r}), not a BADGE model "
                f"({MultiExitConfig.model_type!r}): build one with MultiExitModel.from_encoder"
            )
        policy_file = _optional_file(source, EXIT_POLICY_FILE, hub)
        if policy_file is not None:
            try:
                config.exit_policy = json.loads(policy_file.read_text())
            except json.JSONDecodeError as error:
                raise CheckpointError(f"{policy_file} is not valid JSON: {error}") from error
        check_exit_policy(config.exit_policy, policy_file or Path(source) / "config.json")
        try:
            model = super().from_pretrained(source, *model_args, config=config, **kwargs)
        except Exception as error:  # safetensors raises its own types for truncated or corrupt files
            raise CheckpointError(_unreadable(source, error, "model.safetensors")) from error
        requested = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if requested not in (None, "auto"):  # the encoder is built from its own config, in its own dtype
            model = model.to(resolve_dtype(requested))
        if os.path.isdir(source):
            folder = Path(source) / hub.get("subfolder", "")
            if any((folder / name).is_file() for name in TOKENIZER_FILES):
                model.tokenizer = load_tokenizer(folder, model.encoder.config.vocab_size)
        elif _optional_file(source, "tokenizer_config.json", hub) is not None:
            model.tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, **hub)
        return model


def read_config(path: Path) -> MultiExitConfig:
    """The `MultiExitConfig` in `path/config.json`; `CheckpointError` naming the file when a value has the wrong
    type or range (a string for `num_labels`, a list for `id2label` ...)."""
    try:
        config = MultiExitConfig.from_pretrained(path)
        config.backbone_config()
        names = [config.id2label[i] for i in range(config.num_labels)]
    except Exception as error:  # a config is user data: any failure to read it is the file's fault
        raise CheckpointError(
            f"{path}/config.json cannot be read as a BADGE model config ({type(error).__name__}: {error}); "
            "expected the file `save_pretrained` wrote"
        ) from error
    if not all(isinstance(name, str) for name in names):
        raise CheckpointError(f"{path}/config.json: label names {names} must be strings")
    return config


def check_exit_policy(policy: Any, where: Path) -> None:
    """Raise `CheckpointError` naming `where` unless `policy` is a valid exit policy (`ExitPolicy.from_dict`)."""
    example = '{"rule": "entropy", "tau": 0.3}'
    if not isinstance(policy, dict):
        raise CheckpointError(f"exit policy {policy!r} in {where} is not an object; expected one like {example}")
    try:
        ExitPolicy.from_dict(policy)
    except (ValueError, TypeError) as error:
        raise CheckpointError(
            f"exit policy {policy} in {where} is not valid: {error}; expected one like {example}"
        ) from error


def _hub_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The `from_pretrained` keyword arguments that say where files come from (see `HUB_OPTIONS`)."""
    return {key: kwargs[key] for key in HUB_OPTIONS if kwargs.get(key) is not None}


def _check_exists(source: str | os.PathLike) -> None:
    """Refuse a path that names a local folder (absolute, relative with ./, or deeper than `namespace/name`)
    but does not exist, rather than asking the Hub for it."""
    text = str(source)
    local = os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1
    if local and not os.path.exists(os.path.expanduser(text)):
        raise CheckpointError(
            f"{text} does not exist: expected a model folder or a Hugging Face Hub id (namespace/name)"
        )


def _optional_file(source: str | os.PathLike, filename: str, hub: dict[str, Any]) -> Path | None:
    """Path of `filename` in a model folder or Hub repository (downloaded if need be), None where it has none."""
    found = cached_file(
        str(source),
        filename,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub,
    )
    return Path(found) if found else None


def _unreadable(source: str | os.PathLike, error: Exception, filename: str | None = None) -> str:
    """The message for a model that cannot be read: a broken local file, or a Hub id that cannot be fetched."""
    if os.path.isdir(source):
        return f"{Path(source) / filename if filename else source} cannot be loaded: {error}"
    return (
        f"{source} is not a local folder and cannot be loaded from the Hugging Face Hub "
        f"(a typo in the path, no network, or a private repository without a token?): {error}"
    )


def declared_pooling(path: str | os.PathLike, hub: dict[str, Any] | None = None) -> str:
    """Pooling a sentence-transformers checkpoint (folder or Hub id) declares in `1_Pooling/config.json`, else `cls`."""
    pooling_file = _optional_file(path, "1_Pooling/config.json", hub or {})
    if pooling_file is not None:
        declared = json.loads(pooling_file.read_text())
        if declared.get("pooling_mode_mean_tokens"):
            return "mean"
    return "cls"


def replace_directory(source: Path, target: Path) -> None:
    """Move the finished folder `source` to `target`, so a reader never sees a half-written `target`."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)


@dataclass
class FlopCount:
    """Floating-point operations (2 per multiply-add) for one sequence of `seq_len` tokens."""

    seq_len: int
    per_layer: float
    per_exit_head: float
    per_bypass: float
    num_layers: int
    num_exits: int
    num_bypassed_exits: int

    @property
    def backbone(self) -> float:
        return self.per_layer * self.num_layers

    @property
    def exits_and_bypasses(self) -> float:
        return self.per_exit_head * self.num_exits + self.per_bypass * self.num_bypassed_exits

    @property
    def total(self) -> float:
        return self.backbone + self.exits_and_bypasses

    def cost_to_exit(self, layer: int, exits_evaluated: int, bypasses_evaluated: int) -> float:
        """FLOPs spent by a sample that leaves after `layer` having evaluated the given exits."""
        return self.per_layer * layer + self.per_exit_head * exits_evaluated + self.per_bypass * bypasses_evaluated

    def summary(self) -> str:
        extra = self.exits_and_bypasses / self.backbone
        bypass_share = self.per_bypass * self.num_bypassed_exits / self.backbone
        return (
            f"FLOPs per sequence of {self.seq_len} tokens: backbone {self.backbone / 1e9:.3f} G, "
            f"exits + bypasses {self.exits_and_bypasses / 1e6:.3f} M ({100 * extra:.3f} % extra, "
            f"of which bypasses {100 * bypass_share:.4f} %)"
        )


def count_flops(model: MultiExitModel, seq_len: int = 128) -> FlopCount:
    """Count FLOPs of the model's layers, exit heads and bypasses for one sequence of `seq_len` tokens."""
    backbone = model.config.backbone_config()
    d = backbone.hidden_size
    ff = backbone.intermediate_size if hasattr(backbone, "intermediate_size") else backbone.hidden_dim
    heads = backbone.num_attention_heads
    head_dim = d // heads
    kept = [len(h) for h in model.config.heads_kept.values()] if model.config.heads_kept else []
    mean_heads = sum(kept) / len(kept) if kept else heads
    attn_width = mean_heads * head_dim
    t = seq_len
    per_layer = (
        2 * t * d * attn_width * 4  # Q, K, V and output projections
        + 2 * 2 * t * t * attn_width  # scores and weighted sum
        + 2 * 2 * t * d * ff  # feed-forward in and out
    )
    k = model.config.num_labels
    pool = t * d if model.config.pooling == "mean" else 0
    per_exit_head = pool + 2 * d * d + 2 * d * k
    r = model.config.bypass_dim
    per_bypass = 2 * d * r * 2 + 5 * d  # down, up, layer norm
    if model._token_bypass:  # v2 on tokens: the adapter runs on every token, then one more pooling
        per_bypass = per_bypass * t + t * d
    bypassed = len(model.intermediate_layers) if model.config.use_bypass else 0
    return FlopCount(
        seq_len=seq_len,
        per_layer=float(per_layer),
        per_exit_head=float(per_exit_head),
        per_bypass=float(per_bypass),
        num_layers=model.num_layers,
        num_exits=len(model.exit_layers),
        num_bypassed_exits=bypassed,
    )


# After `import badge`, transformers' Auto classes (and so `pipeline("text-classification")`) load saved models.
AutoConfig.register(MultiExitConfig.model_type, MultiExitConfig)
AutoModel.register(MultiExitConfig, MultiExitModel)
AutoModelForSequenceClassification.register(MultiExitConfig, MultiExitModel)
