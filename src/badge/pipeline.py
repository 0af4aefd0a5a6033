"""The early-exit text-classification pipeline, registered with transformers as `early-exit-classification`.

    import badge
    from transformers import pipeline

    classify = pipeline("early-exit-classification", model="runs/quickstart/best")
    classify(["a gorgeous, witty film", "flat and lifeless"])
    # [{'label': 'positive', 'score': 0.98, 'exit_layer': 2}, {'label': 'negative', 'score': 0.95, 'exit_layer': 3}]

It answers as `pipeline("text-classification")` does (label and score, `top_k`, `function_to_apply`,
`batch_size`, `device`), plus the layer each text left after. The texts run through `EarlyExitEngine`
with the model's stored exit policy, or the `policy` given at construction or per call.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoModelForSequenceClassification
from transformers.pipelines import PIPELINE_REGISTRY, TextClassificationPipeline

from badge.engine import EarlyExitEngine
from badge.rules import ExitPolicy

TASK = "early-exit-classification"


class EarlyExitClassificationPipeline(TextClassificationPipeline):
    """`TextClassificationPipeline` whose forward pass is the early-exit engine; each answer adds `exit_layer`."""

    def _sanitize_parameters(self, policy: ExitPolicy | dict | None = None, **kwargs: Any):
        preprocess, forward, postprocess = super()._sanitize_parameters(**kwargs)
        if policy is not None:
            forward = {**forward, "policy": policy if isinstance(policy, ExitPolicy) else ExitPolicy.from_dict(policy)}
        return preprocess, forward, postprocess

    def _forward(self, model_inputs: dict[str, Any], policy: ExitPolicy | None = None) -> dict[str, Any]:
        engine = EarlyExitEngine(self.model, policy, batch_size=max(1, len(model_inputs["input_ids"])))
        out = engine.run(model_inputs["input_ids"], model_inputs["attention_mask"], model_inputs.get("token_type_ids"))
        return {"logits": out.logits, "exit_layer": out.exit_layers}  # (b, K), (b,)

    def postprocess(self, model_outputs: dict[str, Any], **kwargs: Any):
        answer = super().postprocess(model_outputs, **kwargs)
        exit_layer = int(model_outputs["exit_layer"][0])
        if isinstance(answer, dict):
            return {**answer, "exit_layer": exit_layer}
        return [{**item, "exit_layer": exit_layer} for item in answer]


PIPELINE_REGISTRY.register_pipeline(
    TASK,
    pipeline_class=EarlyExitClassificationPipeline,
    pt_model=AutoModelForSequenceClassification,
    type="text",
)
