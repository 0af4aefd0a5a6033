"""Request and response bodies of the HTTP API (pydantic models): what `/v1/classify` and `/v1/model` accept
and return, as `/openapi.json` shows them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from badge.rules import ExitPolicy, PolicyError, names

MAX_PATIENCE = 1024  # far above any model's exits; larger numbers would overflow the engine's counters


class PolicySettings(BaseModel):
    """An exit policy in a request; checked by `ExitPolicy` (unknown rule, parameter out of range)."""

    model_config = ConfigDict(extra="forbid")

    rule: str = Field(description=f"exit rule, one of {[name for name in names() if name != 'oracle']}")
    tau: float | None = Field(default=None, strict=True, allow_inf_nan=False, description="threshold of the rule")
    patience: int | None = Field(
        default=None, strict=True, le=MAX_PATIENCE, description="exits the signal must hold for"
    )
    divergence: str | None = Field(default=None, description="divergence of rule `dge`: jsd, kl, rkl, skl, xjsd")
    k: int | None = Field(default=None, strict=True, description="the layer of rule `static`")
    _policy: ExitPolicy = PrivateAttr()

    @model_validator(mode="after")
    def _build_policy(self) -> PolicySettings:
        try:
            self._policy = ExitPolicy(**self.model_dump())
        except PolicyError as error:
            raise ValueError(str(error)) from error
        return self

    @property
    def policy(self) -> ExitPolicy:
        return self._policy


class ClassifyRequest(BaseModel):
    """Texts to classify, optional second texts of each pair, and an optional exit policy override."""

    model_config = ConfigDict(extra="forbid")

    texts: str | list[str] = Field(description="one text or a list of texts")
    text_pairs: str | list[str] | None = Field(default=None, description="second texts, one per text")
    policy: PolicySettings | None = Field(default=None, description="exit policy for this request")


class Prediction(BaseModel):
    """The answer for one text.

    Single-label: `label` is the class name, `label_id` its index. Multi-label: lists of both.
    Regression: `label` is the predicted value, `label_id` is null. `probabilities` are those of the
    exit that answered (null for regression); `exit_layer` is the 1-based layer it left after.
    """

    label: str | list[str] | float
    label_id: int | list[int] | None
    probabilities: dict[str, float] | None
    exit_layer: int


class ClassifyResponse(BaseModel):
    """One prediction per text, in request order, and the exit policy that produced them."""

    results: list[Prediction]
    policy: str
    policy_settings: dict[str, Any]


class ModelInfo(BaseModel):
    """What the server runs and which exit rules a request may choose."""

    labels: list[str]
    task: str
    num_layers: int
    exit_layers: list[int]
    default_policy: str
    default_policy_settings: dict[str, Any]
    policy_fixed: bool
    rules: list[str]
    max_texts: int
    max_chars: int
    max_queue: int
