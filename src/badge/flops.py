"""FLOP counts of a multi-exit model: its layers, exit heads and bypasses, for one sequence."""

from __future__ import annotations

from dataclasses import dataclass

from badge.modeling import MultiExitModel


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
    ff = model.encoder_family.feed_forward_size(backbone)
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
    if model.config.attention_pooling:  # a score per token (2d), its softmax (~5 per token), the weighted sum
        pool = 2 * t * d + 5 * t + 2 * t * d
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
