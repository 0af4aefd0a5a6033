"""What an exit costs: FLOPs per exit, and wall-clock time of the engine against the plain model."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from badge.device import synchronize
from badge.flops import count_flops
from badge.logits import length_sorted_batches, plain_forward
from badge.modeling import MultiExitModel
from badge.rules import ExitPolicy


def exit_costs(model: MultiExitModel, seq_len: int) -> torch.Tensor:
    """(E,) FLOPs ratio to the plain model of a sample leaving at each exit (exits evaluated on the way included)."""
    flops = count_flops(model, seq_len)
    full = flops.per_layer * model.num_layers + flops.per_exit_head  # the plain model: all layers, one head
    costs = []
    for position, layer in enumerate(model.exit_layers):
        bypassed = min(position + 1, len(model.intermediate_layers)) if model.config.use_bypass else 0
        costs.append(flops.cost_to_exit(layer, position + 1, bypassed) / full)
    return torch.tensor(costs)


@dataclass
class Timing:
    """Median seconds of the plain model and of the engine over the same batches, and their ratio."""

    plain_s: float
    engine_s: float
    speedup: float
    repeats: int


def time_policy(
    model: MultiExitModel,
    policy: ExitPolicy,
    inputs: dict[str, torch.Tensor],
    batch_size: int,
    repeats: int = 5,
    labels: torch.Tensor | None = None,
) -> Timing:
    """Time the plain model and the early-exit engine on the same inputs at the same batch size.

    The plain model runs length-sorted batches of `batch_size`; the engine gets all inputs with the
    same `batch_size` (its most rows per layer call) and sorts them the same way. The two alternate
    `repeats` times; the speedup is the median of per-repeat ratios, so both sides of each ratio
    share the machine's state at that moment.
    """
    from badge.engine import EarlyExitEngine

    batches = length_sorted_batches(inputs, batch_size)
    engine = EarlyExitEngine(model, policy, batch_size=batch_size)
    plain_forward(model, batches[0])  # warm-up, both sides: first calls allocate
    warm = EarlyExitEngine(model, ExitPolicy("full"), batch_size=batch_size)  # needs no labels, unlike oracle
    warm.run(batches[0]["input_ids"], batches[0]["attention_mask"], batches[0].get("token_type_ids"))
    plain_times, engine_times, ratios = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            plain_forward(model, batch)
        synchronize(model.device)
        plain = time.perf_counter() - start
        start = time.perf_counter()
        engine.run(inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids"), labels)
        synchronize(model.device)
        spent = time.perf_counter() - start
        plain_times.append(plain)
        engine_times.append(spent)
        ratios.append(plain / spent)
    return Timing(statistics.median(plain_times), statistics.median(engine_times), statistics.median(ratios), repeats)
