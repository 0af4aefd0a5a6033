"""Task metrics over logits, and the per-exit table that training and evaluation print."""

from __future__ import annotations

import torch
from rich.table import Table


def primary_metric_name(task: str) -> str:
    """The metric that model selection and calibration use for a task."""
    return {"regression": "pearson", "multi_label_classification": "micro_f1"}.get(task, "accuracy")


def task_metrics(logits: torch.Tensor, labels: torch.Tensor, task: str) -> dict[str, float]:
    """Metrics (in percent, Pearson as a correlation x 100) of (N, K) logits against labels."""
    logits = logits.float()
    if task == "regression":
        x, y = logits.squeeze(-1), labels.float()
        x, y = x - x.mean(), y - y.mean()
        denominator = (x.norm() * y.norm()).clamp(min=1e-12)
        return {"pearson": 100.0 * float((x * y).sum() / denominator), "mse": float(((x - y) ** 2).mean())}
    if task == "multi_label_classification":
        predicted = logits > 0
        truth = labels > 0.5
        tp = (predicted & truth).sum().item()
        fp = (predicted & ~truth).sum().item()
        fn = (~predicted & truth).sum().item()
        f1 = 2 * tp / max(2 * tp + fp + fn, 1)
        exact = (predicted == truth).all(-1).float().mean().item()
        return {"micro_f1": 100.0 * f1, "exact_match": 100.0 * exact}
    predicted = logits.argmax(-1)
    labels = labels.long()
    accuracy = (predicted == labels).float().mean().item()
    f1s = []
    for k in range(logits.shape[-1]):
        tp = ((predicted == k) & (labels == k)).sum().item()
        fp = ((predicted == k) & (labels != k)).sum().item()
        fn = ((predicted != k) & (labels == k)).sum().item()
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": 100.0 * accuracy, "macro_f1": 100.0 * sum(f1s) / max(len(f1s), 1)}


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
