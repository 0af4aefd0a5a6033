"""Shared fixtures: a tiny random BERT encoder on disk, with a word-level vocabulary, and tiny data."""

from __future__ import annotations

import csv
import random
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
