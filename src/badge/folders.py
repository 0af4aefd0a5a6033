"""The folders badge writes into: only the files it owns, each replaced atomically, nothing else touched.

A saved model or ONNX export is a plain folder a person may add to (a README, a `sweep/` report). Saving
writes the new files into a staging folder beside the target, then moves each one into place with
`os.replace` (atomic on one file system), removes only the files an earlier save of the same kind wrote
and this one did not (old weight shards, say), and leaves every other file where it was. Files come out
with the permissions of the user's umask, as any other program's would.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
)
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "exit_policy.json",
    *TOKENIZER_FILES,
)
EXPORT_FILES = ("manifest.json", "embeddings.onnx", "layer_*.onnx", "exit_*.onnx", *TOKENIZER_FILES)
MODEL_TYPE = "badge-multi-exit"  # `model_type` in a saved model's config.json
# The files a save of each kind owns.
OWNED = {"model": MODEL_FILES, "onnx export": EXPORT_FILES}
# Written last, so that a reader who finds it finds the files it describes.
DESCRIBING_FILES = ("config.json", "manifest.json")


class FolderError(ValueError):
    """A save that would overwrite something it does not own; the message names the folder and what it holds."""


def ordinary_mode(directory: bool = False) -> int:
    """Permission bits a new file (or folder) gets under the process umask: 0o644 / 0o755 under umask 022."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def folder_kind(path: Path) -> str | None:
    """What folder `path` holds: "model" (a saved BADGE model), "onnx export", "datasets folder",
    "Hugging Face checkpoint" (another config.json), or None (none of these, or no folder)."""
    if not path.is_dir():
        return None
    if (path / "manifest.json").is_file():
        return "onnx export"
    if any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
        return "datasets folder"
    config = path / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (ValueError, AttributeError, OSError):
            model_type = None
        return "model" if model_type == MODEL_TYPE else "Hugging Face checkpoint"
    return None


def _a(kind: str) -> str:
    return f"{'an' if kind[0].lower() in 'aeiou' else 'a'} {kind}"


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_target(target: Path, kind: str, sources: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse to write a `kind` folder at `target` when it is one of `sources`, a file, or a folder of another kind.

    Raises `FolderError` naming the folder, what it holds and what was expected.
    """
    for source in sources:
        if _same_folder(target, Path(source)) or Path(os.path.abspath(target)) == Path(os.path.abspath(source)):
            raise FolderError(f"{target} is the folder being read; write the {kind} into another folder")
    if target.exists() and not target.is_dir():
        raise FolderError(f"{target} is a file; expected a folder (new, or holding {_a(kind)}) to write into")
    found = folder_kind(target)
    if found is not None and found != kind:
        raise FolderError(f"{target} holds {_a(found)}; refusing to write {_a(kind)} over it (choose another folder)")


def save_folder(
    target: str | os.PathLike,
    write: Callable[[Path], None],
    kind: str,
    sources: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write a `kind` folder at `target`: `write(staging)` fills an empty staging folder, then each file moves in.

    Files this kind owns (`KINDS[kind]["owned"]`) that the new save did not write are removed; any other
    file or folder in `target` is kept. A kill leaves each file either old or new, never half-written.
    `kind` is "model" or "onnx export". Returns `target` as a Path. Raises `FolderError` (see `check_target`).
    """
    target = Path(target)
    check_target(target, kind, sources)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.saving-"
    for stale in target.parent.glob(prefix + "*"):  # left by a save that was killed: ours by name
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        write(staging)
        written = sorted(path.name for path in staging.iterdir())
        if not target.is_dir():
            target.mkdir()
            target.chmod(ordinary_mode(directory=True))
        file_mode = ordinary_mode()
        for name in sorted(written, key=lambda name: name in DESCRIBING_FILES):
            source = staging / name
            if source.is_dir():  # a save writes files only; a folder would replace a user's folder
                raise FolderError(f"saving a {kind} wrote a folder {name!r}; only files are moved into {target}")
            source.chmod(file_mode)
            os.replace(source, target / name)
        owned = OWNED[kind]
        for path in target.iterdir():
            if path.is_file() and path.name not in written and any(fnmatch.fnmatch(path.name, p) for p in owned):
                path.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def replace_directory(source: Path, target: Path) -> None:
    """Move the finished folder `source` to `target`, so a reader never sees a half-written `target`."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)


# Files from which a tokenizer's vocabulary can be read (a fast tokenizer's tokenizer.json, or a slow one's vocabulary).
VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


def load_tokenizer(path: str | os.PathLike, vocab_size: int | None = None) -> Any:
    """The tokenizer saved in folder `path`, never running code shipped in the folder (`trust_remote_code=False`).

    `vocab_size` (the model's embedding rows) is checked against the tokenizer. Raises `FolderError` naming the
    folder when no vocabulary file is there, when the tokenizer cannot be read, or when its vocabulary does
    not fit the model (a tokenizer that knows only its special tokens would map every word to [UNK]).
    """
    from transformers import AutoTokenizer

    folder = Path(path)
    refuse_shipped_code(folder)
    if not any((folder / name).is_file() for name in VOCABULARY_FILES):
        raise FolderError(
            f"{folder} has no tokenizer vocabulary: expected one of {list(VOCABULARY_FILES)} "
            "(copy the tokenizer files of the encoder the model was trained from)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise FolderError(f"the tokenizer files in {folder} cannot be read: {error}") from error
    size, special = len(tokenizer), len(set(tokenizer.all_special_ids))
    if size <= special:
        raise FolderError(
            f"the tokenizer in {folder} knows only {size} tokens, its special tokens: every word would become "
            "[UNK]; expected the vocabulary of the encoder the model was trained from"
        )
    if vocab_size is not None and size > vocab_size:
        raise FolderError(
            f"the tokenizer in {folder} has {size} tokens but the model embeds only {vocab_size}; "
            "expected the tokenizer of the encoder the model was trained from"
        )
    return tokenizer


def refuse_shipped_code(folder: Path) -> None:
    """Raise `FolderError` when config.json or tokenizer_config.json asks to run Python shipped with it (`auto_map`).

    Every load passes `trust_remote_code=False` as well; this check only gives the clearer message.
    """
    for name in ("config.json", "tokenizer_config.json"):
        try:
            settings = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # absent or unreadable: the load that needs it reports that
        if isinstance(settings, dict) and settings.get("auto_map"):
            raise FolderError(
                f"{folder / name} names code to run from the folder (auto_map {settings['auto_map']}); "
                "badge never runs code shipped with a model: remove auto_map to use the standard classes"
            )
