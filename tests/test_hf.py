"""At home in transformers: Auto classes, `pipeline("text-classification")`, the early-exit pipeline, Hub ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_reviews
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer, pipeline

from badge import EarlyExitEngine, ExitPolicy, MultiExitConfig, MultiExitModel
from badge.loading import CheckpointError

TEXTS = [text for text, _ in make_reviews(12, seed=5)]


@pytest.fixture(scope="module")
def saved_model(tiny_encoder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = MultiExitModel.from_encoder(tiny_encoder, label_names=["negative", "positive"], pooling="mean").eval()
    # The stored policy lets the more confident half of the texts leave at the first exit.
    with torch.no_grad():
        first = torch.softmax(model(**model.tokenizer(TEXTS, padding=True, return_tensors="pt")).exit_logits[0], -1)
    model.config.exit_policy = {"rule": "maxprob", "tau": float(first.max(dim=-1).values.median())}
    folder = tmp_path_factory.mktemp("saved") / "model"
    model.save_pretrained(folder)
    return folder


def encoded(folder: Path) -> dict[str, torch.Tensor]:
    return dict(AutoTokenizer.from_pretrained(folder)(TEXTS, padding=True, return_tensors="pt"))


def test_auto_classes_load_a_saved_model_with_identical_logits(saved_model: Path) -> None:
    reference = MultiExitModel.from_pretrained(saved_model).eval()
    inputs = encoded(saved_model)
    with torch.no_grad():
        expected = reference(**inputs)
    assert isinstance(AutoConfig.from_pretrained(saved_model), MultiExitConfig)
    for auto in (AutoModel, AutoModelForSequenceClassification):
        loaded = auto.from_pretrained(saved_model).eval()
        assert isinstance(loaded, MultiExitModel)
        with torch.no_grad():
            out = loaded(**inputs)
        assert torch.equal(out.logits, expected.logits)
        for ours, theirs in zip(out.exit_logits, expected.exit_logits, strict=True):
            assert torch.equal(ours, theirs)
    # `logits` is the final exit, as a Hugging Face sequence classifier returns it.
    assert torch.equal(expected.logits, expected.exit_logits[-1])


def test_text_classification_pipeline_answers_with_the_final_exit(saved_model: Path) -> None:
    classify = pipeline("text-classification", model=str(saved_model))
    answers = classify(TEXTS)
    model = MultiExitModel.from_pretrained(saved_model).eval()
    with torch.no_grad():
        probs = torch.softmax(model(**encoded(saved_model)).logits, dim=-1)
    for answer, row in zip(answers, probs, strict=True):
        assert answer["label"] == model.label_names[int(row.argmax())]
        assert answer["score"] == pytest.approx(float(row.max()), abs=1e-6)


def test_early_exit_pipeline_answers_like_the_engine_with_the_exit_layer(saved_model: Path) -> None:
    classify = pipeline("early-exit-classification", model=str(saved_model))
    engine = EarlyExitEngine(MultiExitModel.from_pretrained(saved_model))
    expected = engine.classify(TEXTS)
    for batch_size in (1, 4):
        answers = classify(TEXTS, batch_size=batch_size)
        assert [a["label"] for a in answers] == [engine.model.label_names[i] for i in expected.labels]
        assert [a["exit_layer"] for a in answers] == expected.exit_layers.tolist()
        assert [a["score"] for a in answers] == pytest.approx(expected.probs.max(dim=-1).values.tolist(), abs=1e-5)
    assert len(set(expected.exit_layers.tolist())) > 1  # the texts really leave at different layers
    # A policy per call overrides the stored one, as the engine's does.
    first = classify(TEXTS, policy=ExitPolicy("static", k=1))
    assert [a["exit_layer"] for a in first] == [1] * len(TEXTS)
    ranked = classify(TEXTS[0], top_k=None)  # every label, best first, each with the text's exit layer
    assert [a["score"] for a in ranked] == pytest.approx(sorted(expected.probs[0].tolist(), reverse=True), abs=1e-5)
    assert [a["exit_layer"] for a in ranked] == [int(expected.exit_layers[0])] * 2


def test_from_pretrained_takes_the_ordinary_keyword_arguments(saved_model: Path) -> None:
    model = MultiExitModel.from_pretrained(saved_model, dtype=torch.bfloat16, revision="main")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.tokenizer is not None and model.config.exit_policy["rule"] == "maxprob"


def test_a_hub_id_goes_to_the_hub_and_fails_clearly_when_it_cannot_be_fetched(saved_model: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot be loaded from the Hugging Face Hub"):
        MultiExitModel.from_pretrained("badge-tests/no-such-model", local_files_only=True)
    with pytest.raises(CheckpointError, match="cannot be loaded from the Hugging Face Hub"):
        offline = {"local_files_only": True}
        MultiExitModel.from_encoder("badge-tests/no-such-encoder", num_labels=2, load_options=offline)
    with pytest.raises(ValueError, match="safetensors weights only"):
        MultiExitModel.from_pretrained(saved_model, use_safetensors=False)
