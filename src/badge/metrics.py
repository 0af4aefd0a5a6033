"""Task metrics over logits by `problem_type` (the metrics themselves are in `badge.tasks`), and the per-exit
table that training and evaluation print."""

from __future__ import annotations

import torch
from rich.table import Table

from badge.tasks import get_task


def primary_metric_name(task: str) -> str:
    """The metric that model selection and calibration use for a task (a `problem_type`)."""
    return get_task(task).metric.name


def task_metrics(logits: torch.Tensor, labels: torch.Tensor, task: str) -> dict[str, float]:
    """Every metric of a task (a `problem_type`) for (N, K) logits against labels: in percent, Pearson as a
    correlation x 100 (`badge.tasks`)."""
    return get_task(task).evaluate(logits, labels)


def per_exit_metrics(exit_logits: torch.Tensor, labels: torch.Tensor, task: str) -> list[dict[str, float]]:
    """Metrics of every exit: `exit_logits` (N, E, K) -> E dicts."""
    return [task_metrics(exit_logits[:, e], labels, task) for e in range(exit_logits.shape[1])]


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
