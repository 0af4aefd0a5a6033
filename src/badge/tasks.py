"""Task types: single-label classification, multi-label classification and regression, one class each.

Everything that differs between task types lives here, so a new task type is one `Task` subclass added
to `TASK_TYPES` (plus tests). A task turns one exit's logits (B, K) into

- answers: probabilities, predicted labels, the name(s) or value shown to a user;
- training: the loss of one exit, and the self-distillation loss towards the final exit;
- metrics: what is reported, the primary metric first (model selection, calibration and rule
  comparisons maximise it), computed with scikit-learn where it gives the numbers;
- exit-rule signals: the per-row distribution a rule carries from exit to exit, how much it changed
  between two exits, how unsure and how confident one exit is, and which rules the task cannot run.

Look a task up by the `problem_type` stored in a model's config: `get_task("regression")`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from badge.distributions import DIVERGENCES, divergence, normalized_entropy, sigmoid_log_probs, softmax_log_probs

Tensor = torch.Tensor


@dataclass(frozen=True)
class Metric:
    """A task metric: its name, how to compute it from (N, K) logits and labels (in points), and its direction."""

    name: str
    compute: Callable[[Tensor, Tensor], float]
    higher_is_better: bool = True


_SINGLE_LABEL_ONLY = "is defined for single-label classification only"


class Task(ABC):
    """What one task type does with an exit's logits. A subclass sets `name` and `metrics` and implements the
    abstract methods; the rest has defaults.

    Attributes:
        name: the `problem_type` stored in config.json.
        metrics: reported metrics, the primary one first.
        has_classes: the logits score named classes (False: they hold a value).
        multi_label: a text may carry any number of classes.
        refused_rules: exit rules (by name) this task cannot run, with the reason.
        divergences: the `dge` divergences worth sweeping: (None,) where the kind makes no difference.
    """

    name: ClassVar[str]
    metrics: ClassVar[tuple[Metric, ...]]
    has_classes: ClassVar[bool] = True
    multi_label: ClassVar[bool] = False
    refused_rules: ClassVar[dict[str, str]] = {}
    divergences: ClassVar[tuple[str | None, ...]] = DIVERGENCES[:-1]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Model selection, calibration and rule comparisons all maximise the primary metric.
        if "metrics" in cls.__dict__ and not cls.metrics[0].higher_is_better:
            raise TypeError(f"task {cls.__name__}: its primary metric {cls.metrics[0].name!r} must be higher-is-better")

    @property
    def metric(self) -> Metric:
        """The primary metric."""
        return self.metrics[0]

    def evaluate(self, logits: Tensor, labels: Tensor) -> dict[str, float]:
        """Every metric of (N, K) logits against the labels, by name."""
        return {metric.name: metric.compute(logits, labels) for metric in self.metrics}

    def resampled_metric(self, logits: Tensor, labels: Tensor, texts: Tensor) -> Tensor:
        """The primary metric on each row of text indices `texts` (B, N), repeats allowed: (B,)."""
        return torch.tensor([self.metric.compute(logits[row], labels[row]) for row in texts])

    def per_text_metric(self, logits: Tensor, labels: Tensor) -> Tensor | None:
        """(N,) per-text scores whose mean is the primary metric, or None where it is not a mean over texts."""
        return None

    def correct(self, logits: Tensor, labels: Tensor) -> Tensor:
        """(B,) bool: whether each row's answer is right (the `oracle` rule reads it)."""
        raise NotImplementedError(f"task {self.name!r} has no per-text notion of a correct answer")

    def allows(self, rule: str) -> bool:
        return rule not in self.refused_rules

    # ----- answers -----------------------------------------------------------------------------
    @abstractmethod
    def probabilities(self, logits: Tensor) -> Tensor:
        """(N, K) float probabilities (the value itself where the task has no classes)."""

    @abstractmethod
    def predictions(self, logits: Tensor) -> list:
        """Predicted label per row of (N, K) logits: a class id, a list of class ids, or a value."""

    @abstractmethod
    def label_of(self, predicted: Any, label_names: list[str]) -> str | list[str] | float:
        """What a user sees for one prediction: a class name, a list of names, or the value."""

    def probability_of(self, predicted: Any, probabilities: Tensor) -> float | None:
        """The probability of one prediction given its row of `probabilities` (K,); None where the answer is not
        one class."""
        return None

    # ----- training ----------------------------------------------------------------------------
    @abstractmethod
    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Training loss of one exit's (B, K) logits, averaged over the batch."""

    @abstractmethod
    def distill_loss(self, student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
        """Self-distillation loss of one exit's (B, K) logits towards the final exit's (B, K) logits."""

    # ----- exit-rule signals -------------------------------------------------------------------
    @abstractmethod
    def rule_distribution(self, logits: Tensor) -> Tensor:
        """What a rule carries from one exit to the next, per row, in float32 (log-probabilities or values)."""

    @abstractmethod
    def change(self, previous: Tensor, current: Tensor, kind: str) -> Tensor:
        """(B,) how far `current` moved from `previous` (both from `rule_distribution`) under divergence `kind`."""

    def uncertainty(self, log_probs: Tensor) -> Tensor:
        """(B,) normalised entropy in [0, 1] of one exit's `rule_distribution`."""
        raise NotImplementedError(f"task {self.name!r} has no class probabilities")

    def confidence(self, log_probs: Tensor) -> Tensor:
        """(B,) the largest probability of one exit's `rule_distribution`."""
        raise NotImplementedError(f"task {self.name!r} has no class probabilities")


# ----- metrics ---------------------------------------------------------------------------------
# scikit-learn takes a second to import, so each metric imports it when it is first computed.
def _numpy(tensor: Tensor) -> Any:
    return tensor.detach().cpu().numpy()


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    from sklearn.metrics import accuracy_score

    return 100.0 * float(accuracy_score(_numpy(labels.long()), _numpy(logits.float().argmax(-1))))


def _macro_f1(logits: Tensor, labels: Tensor) -> float:
    """Mean F1 over the classes that occur among the labels or the predictions."""
    from sklearn.metrics import f1_score

    return 100.0 * float(f1_score(_numpy(labels.long()), _numpy(logits.float().argmax(-1)), average="macro"))


def _micro_f1(logits: Tensor, labels: Tensor) -> float:
    from sklearn.metrics import f1_score

    return 100.0 * float(f1_score(_numpy(labels > 0.5), _numpy(logits.float() > 0), average="micro", zero_division=0.0))


def _exact_match(logits: Tensor, labels: Tensor) -> float:
    from sklearn.metrics import accuracy_score  # on label sets: the share of texts with every label right

    return 100.0 * float(accuracy_score(_numpy(labels > 0.5), _numpy(logits.float() > 0)))


def _pearson(logits: Tensor, labels: Tensor) -> float:
    """Pearson correlation x 100; 0 where either side is constant. Written out: scikit-learn has none, and
    SciPy's is NaN for a constant side (an untrained exit), which would break model selection."""
    x, y = logits.float().squeeze(-1), labels.float()
    x, y = x - x.mean(), y - y.mean()
    return 100.0 * float((x * y).sum() / (x.norm() * y.norm()).clamp(min=1e-12))


def _mse(logits: Tensor, labels: Tensor) -> float:
    from sklearn.metrics import mean_squared_error

    return float(mean_squared_error(_numpy(labels.float()), _numpy(logits.float().squeeze(-1))))


# ----- the task types ------------------------------------------------------------------------
class SingleLabel(Task):
    """One class per text: softmax over K classes, cross-entropy, accuracy."""

    name = "single_label_classification"
    metrics = (Metric("accuracy", _accuracy), Metric("macro_f1", _macro_f1))

    def per_text_metric(self, logits: Tensor, labels: Tensor) -> Tensor:
        return 100.0 * self.correct(logits, labels).float()

    def resampled_metric(self, logits: Tensor, labels: Tensor, texts: Tensor) -> Tensor:
        return self.per_text_metric(logits, labels)[texts].mean(-1)

    def correct(self, logits: Tensor, labels: Tensor) -> Tensor:
        return logits.argmax(-1) == labels.to(logits.device).long()

    def probabilities(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits.float(), dim=-1)

    def predictions(self, logits: Tensor) -> list:
        return self.probabilities(logits).argmax(-1).tolist()

    def label_of(self, predicted: Any, label_names: list[str]) -> str:
        return label_names[predicted]

    def probability_of(self, predicted: Any, probabilities: Tensor) -> float:
        return float(probabilities[predicted])

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return nn.functional.cross_entropy(logits, labels.long())

    def distill_loss(self, student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
        """`T^2 * KL(softmax(teacher / T) || softmax(student / T))`, averaged over the batch."""
        t = temperature
        kl = nn.functional.kl_div(
            nn.functional.log_softmax(student / t, dim=-1),
            nn.functional.log_softmax(teacher / t, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        return t * t * kl

    def rule_distribution(self, logits: Tensor) -> Tensor:
        return softmax_log_probs(logits)  # (B, K)

    def change(self, previous: Tensor, current: Tensor, kind: str) -> Tensor:
        return divergence(previous, current, kind)

    def uncertainty(self, log_probs: Tensor) -> Tensor:
        return normalized_entropy(log_probs)

    def confidence(self, log_probs: Tensor) -> Tensor:
        return log_probs.exp().amax(-1)


class MultiLabel(Task):
    """Any number of classes per text: an independent sigmoid per class, binary cross-entropy, micro-F1."""

    name = "multi_label_classification"
    metrics = (Metric("micro_f1", _micro_f1), Metric("exact_match", _exact_match))
    multi_label = True
    refused_rules = {"gate": _SINGLE_LABEL_ONLY, "oracle": _SINGLE_LABEL_ONLY}

    def resampled_metric(self, logits: Tensor, labels: Tensor, texts: Tensor) -> Tensor:
        # Micro-F1 sums true and false positives and negatives over texts, so a resample sums per-text counts:
        # the same numbers as `_micro_f1` on each resample, without a scikit-learn call per resample.
        predicted, truth = logits.float() > 0, labels > 0.5  # (N, K)
        counts = torch.stack(
            [(predicted & truth).sum(-1), (predicted & ~truth).sum(-1), (~predicted & truth).sum(-1)], -1
        ).double()  # (N, 3): tp, fp, fn
        tp, fp, fn = counts[texts].sum(1).unbind(-1)  # (B,) each
        return 100.0 * (2 * tp / (2 * tp + fp + fn).clamp(min=1))

    def probabilities(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits.float())

    def predictions(self, logits: Tensor) -> list:
        return [torch.nonzero(row > 0.5).flatten().tolist() for row in self.probabilities(logits)]

    def label_of(self, predicted: Any, label_names: list[str]) -> list[str]:
        return [label_names[i] for i in predicted]

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return nn.functional.binary_cross_entropy_with_logits(logits, labels.float())

    def distill_loss(self, student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
        """`T^2 *` the per-label binary KL between `sigmoid(teacher / T)` and `sigmoid(student / T)`, averaged
        over batch and labels (as the task's BCE)."""
        t = temperature
        target = torch.sigmoid(teacher / t)
        cross = nn.functional.binary_cross_entropy_with_logits(student / t, target)
        entropy = nn.functional.binary_cross_entropy_with_logits(teacher / t, target)
        return t * t * (cross - entropy)

    def rule_distribution(self, logits: Tensor) -> Tensor:
        return sigmoid_log_probs(logits)  # (B, K, 2): a binary distribution per label

    def change(self, previous: Tensor, current: Tensor, kind: str) -> Tensor:
        if kind == "argmax":  # PABEE: any label switched on or off
            return (current.argmax(-1) != previous.argmax(-1)).any(-1).float()
        return divergence(previous, current, kind).sum(-1)  # summed over labels

    def uncertainty(self, log_probs: Tensor) -> Tensor:
        return normalized_entropy(log_probs).amax(-1)  # the least sure label

    def confidence(self, log_probs: Tensor) -> Tensor:
        return log_probs.exp().amax(-1).amin(-1)  # the least sure label


class Regression(Task):
    """One value per text: the single logit is the prediction, mean squared error, Pearson correlation."""

    name = "regression"
    metrics = (Metric("pearson", _pearson), Metric("mse", _mse, higher_is_better=False))
    has_classes = False
    _NO_PROBABILITIES = "needs class probabilities; for regression use `dge` or `patience`"
    refused_rules = {
        "entropy": _NO_PROBABILITIES,
        "maxprob": _NO_PROBABILITIES,
        "pcee": _NO_PROBABILITIES,
        "gate": _SINGLE_LABEL_ONLY,
        "oracle": _SINGLE_LABEL_ONLY,
    }
    divergences = (None,)  # consecutive values are compared by their distance whatever the divergence

    def probabilities(self, logits: Tensor) -> Tensor:
        return logits.float()[:, :1]  # (N, 1): the value

    def predictions(self, logits: Tensor) -> list:
        return logits.float().squeeze(-1).tolist()

    def label_of(self, predicted: Any, label_names: list[str]) -> float:
        return float(predicted)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return nn.functional.mse_loss(logits.squeeze(-1), labels.float())

    def distill_loss(self, student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
        """MSE to the teacher's prediction (no temperature: there is no distribution to soften)."""
        return nn.functional.mse_loss(student, teacher)

    def rule_distribution(self, logits: Tensor) -> Tensor:
        return logits.float().squeeze(-1)  # (B,)

    def change(self, previous: Tensor, current: Tensor, kind: str) -> Tensor:
        return (current - previous).abs()


TASK_TYPES: dict[str, Task] = {task.name: task for task in (SingleLabel(), MultiLabel(), Regression())}
TASKS = tuple(TASK_TYPES)


def get_task(problem_type: str) -> Task:
    """The task type stored in a config's `problem_type`."""
    if problem_type not in TASK_TYPES:
        raise ValueError(f"problem_type {problem_type!r} is not one of {list(TASKS)}")
    return TASK_TYPES[problem_type]
