"""Exit rules: one registry, chosen by name, each a pure function of the exits' logits so far.

A rule is applied exit by exit. At each exit it gets the logits of that exit for the rows still
running and a small per-row state (counters, the previous exit's log-probabilities) and returns
which rows leave now plus the new state. The same step serves the layer-by-layer engine and the
offline simulation over stored logits (`simulate`), so sweeps and deployment agree exactly.

Rules: `dge` (divergence between consecutive exits, with patience), `gate` (a learned gate over
confidence and divergence, see `badge.gate`), `entropy`, `maxprob`, `patience` (PABEE), `pcee`,
`static:k`, `full` (never early) and `oracle` (needs labels).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from badge.distributions import DIVERGENCES
from badge.gate import check_gate, gate_step
from badge.tasks import Task, get_task

Tensor = torch.Tensor
State = dict[str, Tensor]


class PolicyError(ValueError):
    """An exit policy with an unknown rule or a parameter out of range."""


# ----- rule steps ----------------------------------------------------------------------------
# A step maps (logits (B, K), state, position, labels) -> (exit_now (B,) bool, new state).
Step = Callable[[Tensor, State, int, Tensor | None], tuple[Tensor, State]]


def _counter_step(signal: Callable[[Tensor, State], tuple[Tensor, State]], patience: int) -> Step:
    """Exit once `signal` (B,) bool has held for `patience` consecutive exits."""

    def step(logits: Tensor, state: State, position: int, labels: Tensor | None = None) -> tuple[Tensor, State]:
        hit, state = signal(logits, state)
        if patience == 1:  # no counter needed; saves a few tensor ops per exit at batch size 1
            return hit, state
        count = state.get("count", torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))
        count = torch.where(hit, count + 1, torch.zeros_like(count))
        state = {**state, "count": count}
        return count >= patience, state

    return step


def _divergence_signal(task: Task, tau: float, kind: str) -> Callable[[Tensor, State], tuple[Tensor, State]]:
    """True where the current exit barely moved from the previous one (never at the first exit)."""

    def signal(logits: Tensor, state: State) -> tuple[Tensor, State]:
        current = task.rule_distribution(logits)
        previous = state.get("previous")
        if previous is None:
            hit = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        else:
            hit = task.change(previous, current, kind) < tau
        return hit, {**state, "previous": current}

    return signal


def _confidence_signal(task: Task, tau: float, kind: str) -> Callable[[Tensor, State], tuple[Tensor, State]]:
    """True where the current exit alone is confident: low entropy or high max-probability."""

    def signal(logits: Tensor, state: State) -> tuple[Tensor, State]:
        log_probs = task.rule_distribution(logits)
        if kind == "entropy":
            return task.uncertainty(log_probs) < tau, state
        return task.confidence(log_probs) > tau, state

    return signal


# ----- the registry --------------------------------------------------------------------------
@dataclass(frozen=True)
class RuleSpec:
    """A registered rule: how to build its step, its parameters, and the threshold grid for sweeps."""

    name: str
    description: str
    build: Callable[..., Step]
    params: tuple[str, ...]
    sweep: dict[str, tuple[float, ...]] = field(default_factory=dict)
    needs_labels: bool = False


def _build_dge(task: Task, num_layers: int, tau: float = 0.01, patience: int = 1, divergence: str = "jsd", **_: Any):
    return _counter_step(_divergence_signal(task, tau, divergence), patience)


def _build_entropy(task: Task, num_layers: int, tau: float = 0.3, **_: Any):
    return _counter_step(_confidence_signal(task, tau, "entropy"), 1)


def _build_maxprob(task: Task, num_layers: int, tau: float = 0.9, **_: Any):
    return _counter_step(_confidence_signal(task, tau, "maxprob"), 1)


def _build_patience(task: Task, num_layers: int, patience: int = 2, tau: float = 0.5, **_: Any):
    # PABEE: the argmax (a label set for multi-label, the value within tau for regression) stays the same.
    return _counter_step(_divergence_signal(task, tau, "argmax"), patience)


def _build_pcee(task: Task, num_layers: int, tau: float = 0.3, patience: int = 2, **_: Any):
    return _counter_step(_confidence_signal(task, tau, "entropy"), patience)


def _build_gate(
    task: Task,
    num_layers: int,
    tau: float = 0.9,
    gate: dict[str, Any] | None = None,
    layers: tuple[int, ...] = (),
    **_: Any,
):
    if gate is None:
        raise PolicyError("the gate rule needs a fitted gate: badge calibrate --rule gate fits one")
    if layers and len(gate["bias"]) != len(layers) - 1:
        raise PolicyError(f"the gate was fitted for {len(gate['bias']) + 1} exits; this model has {len(layers)}")
    return gate_step(gate, tau)


def _build_static(task: Task, num_layers: int, k: int = 1, layers: tuple[int, ...] = (), **_: Any):
    def step(logits: Tensor, state: State, position: int, labels: Tensor | None = None) -> tuple[Tensor, State]:
        layer = layers[position] if layers else position + 1
        return torch.full((logits.shape[0],), layer >= k, dtype=torch.bool, device=logits.device), state

    return step


def _build_full(task: Task, num_layers: int, **_: Any):
    def step(logits: Tensor, state: State, position: int, labels: Tensor | None = None) -> tuple[Tensor, State]:
        return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device), state

    return step


def _build_oracle(task: Task, num_layers: int, **_: Any):
    def step(logits: Tensor, state: State, position: int, labels: Tensor | None = None) -> tuple[Tensor, State]:
        if labels is None:
            raise PolicyError("the oracle rule needs labels: it is for analysis, not deployment")
        return task.correct(logits, labels), state

    return step


_GRID_SMALL = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)  # xjsd needs the top
# Grids run to thresholds at which nearly every text leaves, so a rule's reach is the rule's, not the grid's.
_GRID_ENTROPY = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 1.0)
RULES: dict[str, RuleSpec] = {
    spec.name: spec
    for spec in (
        RuleSpec(
            "dge",
            "divergence between consecutive exits below tau for `patience` exits (BADGE)",
            _build_dge,
            ("tau", "patience", "divergence"),
            {"tau": _GRID_SMALL, "patience": (1, 2)},
        ),
        RuleSpec("entropy", "normalised entropy below tau (DeeBERT)", _build_entropy, ("tau",), {"tau": _GRID_ENTROPY}),
        RuleSpec(
            "maxprob",
            "largest probability above tau",
            _build_maxprob,
            ("tau",),
            {"tau": (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)},
        ),
        RuleSpec(
            "patience",
            "argmax unchanged for `patience` exits (PABEE)",
            _build_patience,
            ("patience",),
            {"patience": (1, 2, 3, 4, 5, 6, 8, 10)},
        ),
        RuleSpec(
            "pcee",
            "normalised entropy below tau for `patience` exits (PCEE-BERT)",
            _build_pcee,
            ("tau", "patience"),
            {"tau": _GRID_ENTROPY, "patience": (2,)},
        ),
        RuleSpec(
            "gate",
            "learned agreement gate over confidence and divergence features; can leave at the first exit (BADGE v2)",
            _build_gate,
            ("tau", "gate"),
            {"tau": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)},
        ),
        RuleSpec("static", "always leave at layer k (`static:k`)", _build_static, ("k",), {"k": tuple(range(1, 25))}),
        RuleSpec("full", "never leave early: every layer runs", _build_full, ()),
        RuleSpec("oracle", "shallowest correct exit (needs labels; an upper bound)", _build_oracle, (), {}, True),
    )
}


def names() -> list[str]:
    """Names of the registered exit rules."""
    return list(RULES)


# ----- policies ------------------------------------------------------------------------------
@dataclass
class ExitPolicy:
    """A rule name with its parameters; what a model folder stores in `exit_policy.json`.

    `rule` may carry its parameter inline, as `static:3`.
    """

    rule: str = "dge"
    tau: float | None = None
    patience: int | None = None
    divergence: str | None = None
    k: int | None = None
    gate: dict[str, Any] | None = None  # the fitted gate of rule `gate` (see badge.gate)

    def __post_init__(self) -> None:
        if ":" in self.rule:
            base, _, value = self.rule.partition(":")
            if base != "static":
                raise PolicyError(f"rule {self.rule!r}: only `static:k` takes an inline parameter")
            try:
                self.k = int(value)
            except ValueError as error:
                raise PolicyError(f"rule {self.rule!r}: k must be an integer layer, as in static:3") from error
            self.rule = base
        if self.rule not in RULES:
            raise PolicyError(f"unknown exit rule {self.rule!r}; expected one of {names()}")
        for key, kinds, expected in (("tau", (int, float), "a number"), ("patience", (int,), "an integer"),
                                     ("k", (int,), "an integer layer")):  # fmt: skip
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
                raise PolicyError(f"{key} {value!r} must be {expected}")
        spec = RULES[self.rule]
        given = {key for key in ("tau", "patience", "divergence", "k", "gate") if getattr(self, key) is not None}
        unused = given - set(spec.params) - ({"tau"} if self.rule == "patience" else set())
        if unused:
            raise PolicyError(f"rule {self.rule!r} takes {list(spec.params) or 'no parameters'}, not {sorted(unused)}")
        if self.tau is not None and not (math.isfinite(self.tau) and self.tau >= 0):
            raise PolicyError(f"tau {self.tau} must be a finite number >= 0")
        if self.rule in ("entropy", "maxprob", "pcee") and self.tau is not None and self.tau > 1:
            raise PolicyError(f"tau {self.tau} for rule {self.rule!r} must lie in [0, 1]")
        if self.patience is not None and self.patience < 1:
            raise PolicyError(f"patience {self.patience} must be an integer >= 1")
        if self.k is not None and self.k < 1:
            raise PolicyError(f"static layer k {self.k} must be >= 1")
        if self.rule == "static" and self.k is None:
            raise PolicyError("rule 'static' needs k, as in static:3")
        if self.divergence is not None and self.divergence not in DIVERGENCES:
            raise PolicyError(f"divergence {self.divergence!r} is not one of {list(DIVERGENCES)}")
        if self.rule == "gate" and self.tau is not None and not 0 <= self.tau <= 1:
            raise PolicyError(f"tau {self.tau} for rule 'gate' is a probability: it must lie in [0, 1]")
        if self.gate is not None:
            try:
                check_gate(self.gate)
            except ValueError as error:
                raise PolicyError(str(error)) from error

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> ExitPolicy:
        unknown = set(settings) - {"rule", "tau", "patience", "divergence", "k", "gate"}
        if unknown:
            raise PolicyError(f"exit policy has unknown keys {sorted(unknown)}")
        return cls(**settings)

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @property
    def needs_labels(self) -> bool:
        return RULES[self.rule].needs_labels

    def build(self, task: str, exit_layers: list[int]) -> Step:
        """The rule's step function for a model of task type `task` (a `problem_type`) with these (1-based) exit
        layers; PolicyError where the task cannot run the rule."""
        task_type = get_task(task)
        if not task_type.allows(self.rule):
            raise PolicyError(f"rule {self.rule!r} {task_type.refused_rules[self.rule]}")
        if self.k is not None and self.k > exit_layers[-1]:
            raise PolicyError(f"static layer k {self.k} is beyond this model's {exit_layers[-1]} layers")
        params = {key: value for key, value in self.to_dict().items() if key != "rule"}
        return RULES[self.rule].build(task_type, exit_layers[-1], layers=tuple(exit_layers), **params)

    def exits_consulted(self, exit_layers: list[int]) -> list[int]:
        """The exit layers whose logits this policy reads; an engine may skip the other exits.

        `full` reads only the final exit and `static:k` only the first exit at or after layer k;
        every other rule reads them all.
        """
        last = exit_layers[-1]
        if self.rule == "full":
            return [last]
        if self.rule == "static":
            return sorted({next((layer for layer in exit_layers if layer >= self.k), last), last})
        return list(exit_layers)

    def __str__(self) -> str:
        shown = {**self.to_dict(), **({"gate": f"<{len(self.gate['bias'])} exits>"} if self.gate else {})}
        params = ", ".join(f"{key}={value}" for key, value in shown.items() if key != "rule")
        return f"{self.rule}({params})"


def select_rows(state: State, keep: Tensor) -> State:
    """Keep only the rows `keep` (bool (B,) or indices) of every tensor in a rule state."""
    return {key: value[keep] for key, value in state.items()}


def simulate(
    exit_logits: Tensor, policy: ExitPolicy, task: str, exit_layers: list[int], labels: Tensor | None = None
) -> Tensor:
    """Replay a policy over stored logits of every exit.

    Args:
        exit_logits: (N, E, K) logits of all E exits for N samples.
        policy: the exit policy.
        task: the model's problem type.
        exit_layers: the E 1-based layers of the exits.
        labels: (N,) labels, needed by the oracle only.
    Returns:
        (N,) long tensor: the position (0..E-1) of the exit each sample leaves at.
    """
    step = policy.build(task, exit_layers)
    n, num_exits = exit_logits.shape[:2]
    chosen = torch.full((n,), num_exits - 1, dtype=torch.long)
    running = torch.ones(n, dtype=torch.bool)
    state: State = {}
    for position in range(num_exits - 1):
        leave, state = step(exit_logits[:, position], state, position, labels)
        newly = leave & running
        chosen[newly] = position
        running &= ~leave
    return chosen
