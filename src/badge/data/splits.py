"""Train / validation / test splits: subsets, samples, grouped splits, `load_splits`, training-data overlap."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from badge.data.dataset import DataError, TextDataset
from badge.data.files import _show
from badge.data.labelled import load_file
from badge.data.named import DATASETS, load_named_dataset, normalize_text


def subset(dataset: TextDataset, indices: Sequence[int], source: str | None = None, **origin: Any) -> TextDataset:
    """The rows `indices` of `dataset` (in that order); `origin` entries are added to the dataset's origin."""
    return TextDataset(
        texts=[dataset.texts[i] for i in indices],
        text_pairs=[dataset.text_pairs[i] for i in indices] if dataset.text_pairs is not None else None,
        labels=[dataset.labels[i] for i in indices] if dataset.labels else [],
        label_names=dataset.label_names,
        source=source or dataset.source,
        origin={**(dataset.origin or {}), **origin} if dataset.origin is not None or origin else None,
    )


def sample(dataset: TextDataset, limit: int | None, seed: int) -> TextDataset:
    """A seeded sample of `limit` rows in file order (the whole dataset when it is no larger)."""
    if limit is None or limit >= len(dataset):
        return dataset
    return subset(dataset, sorted(random.Random(seed).sample(range(len(dataset)), limit)))


def _carve(dataset: TextDataset, fraction: float, seed: int) -> tuple[TextDataset, TextDataset]:
    """Split `dataset` into (rest, validation) with a shuffle seeded by the split seed; both keep the file's order."""
    n_validation = max(1, round(len(dataset) * fraction))
    if not 0 < fraction < 1 or n_validation >= len(dataset):
        raise DataError(
            f"cannot carve a validation fraction of {fraction} from the {len(dataset)} examples of "
            f"{dataset.source}; give a validation file or a fraction between 0 and 1"
        )
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    return (
        subset(dataset, sorted(order[n_validation:]), part="rest", split_seed=seed),
        subset(
            dataset,
            sorted(order[:n_validation]),
            f"{dataset.source} (validation part)",
            part="validation",
            split_seed=seed,
        ),
    )


def load_splits(
    train: str | Path | None,
    validation: str | Path | None = None,
    test: str | Path | None = None,
    *,
    dataset: str | None = None,
    validation_fraction: float = 0.1,
    split_seed: int = 0,
    **load_file_kwargs: Any,
) -> dict[str, TextDataset]:
    """Load {"train", "validation", "test" (if given)} from files, or the named `dataset`.

    Validation and test use the label names of train (a label train lacks is a `DataError`). Without a
    validation file, `validation_fraction` of train is held out with a shuffle seeded by `split_seed`
    (never by a training seed, so that every run on the same data holds out the same rows).
    `load_file_kwargs` go to `load_file`.
    """
    if dataset is not None:
        if train is not None or validation is not None or test is not None:
            raise DataError(f"give either the dataset {_show(dataset)} or files, not both")
        return load_named_dataset(dataset, split_seed=split_seed)
    if train is None:
        raise DataError(f"give a train file or a dataset name (one of {_show(sorted(DATASETS))})")
    splits = {"train": load_file(train, **load_file_kwargs)}
    same_labels = {**load_file_kwargs, "label_names": splits["train"].label_names}
    if validation is None:
        splits["train"], splits["validation"] = _carve(splits["train"], validation_fraction, split_seed)
    else:
        splits["validation"] = load_file(validation, **same_labels)
    if test is not None:
        splits["test"] = load_file(test, **same_labels)
    return splits


def training_overlap(training_data: dict[str, Any] | None, evaluated: TextDataset) -> str | None:
    """Why scoring a model on `evaluated` would reuse its training texts, or None when it would not.

    `training_data` is what training recorded (`MultiExitConfig.training_data`). A split of the named
    dataset the model was trained on is checked text by text against that training split (the same split
    seed and another split is disjoint by construction); a file is refused when it is the training file.
    Models saved without the record are not checked.
    """
    train = (training_data or {}).get("train") or {}
    origin = evaluated.origin or {}
    if "dataset" in train and origin.get("dataset") == train["dataset"]:
        if origin.get("split_seed") == train["split_seed"] and origin.get("split") != "train":
            return None
        trained = load_named_dataset(train["dataset"], split_seed=train["split_seed"], quiet=True)["train"]
        seen = {normalize_text(text) for text in trained.texts}
        shared = sum(normalize_text(text) in seen for text in evaluated.texts)
        if shared:
            return (
                f"{shared} of the {len(evaluated)} texts of {evaluated.source} (split seed {origin.get('split_seed')}) "
                f"are in this model's training data ({train['dataset']} train, split seed {train['split_seed']}); "
                f"score it on another split with --split-seed {train['split_seed']}"
            )
    if "sha256" in train and origin.get("sha256") == train["sha256"]:
        carved_apart = origin.get("part") == "validation" and origin.get("split_seed") == train.get("split_seed")
        if train.get("part") == "rest" and carved_apart:
            return None
        return f"{evaluated.source} holds this model's training data ({train['path']}); score it on held-out texts"
    return None
