"""Every exit's task metrics (the metrics themselves are in `badge.tasks`), and the per-exit table that
training and evaluation print."""

from __future__ import annotations

import torch
from rich.table import Table

from badge.tasks import get_task


def per_exit_metrics(exit_logits: torch.Tensor, labels: torch.Tensor, task: str) -> list[dict[str, float]]:
    """Every metric of a task (a `problem_type`) at every exit: `exit_logits` (N, E, K) -> E dicts, in percent
    (Pearson as a correlation x 100; see `badge.tasks`)."""
    task_type = get_task(task)
    return [task_type.evaluate(exit_logits[:, e], labels) for e in range(exit_logits.shape[1])]


def exit_table(exit_layers: list[int], metrics: list[dict[str, float]], title: str = "per-exit metrics") -> Table:
    """A rich table with one row per exit and one column per metric, plus the mean over exits."""
    names = list(metrics[0])
    table = Table(title=title)
    table.add_column("exit layer", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for layer, row in zip(exit_layers, metrics, strict=True):
        table.add_row(str(layer), *(f"{row[name]:.2f}" for name in names))
    table.add_row("mean", *(f"{sum(r[name] for r in metrics) / len(metrics):.2f}" for name in names), style="bold")
    return table
