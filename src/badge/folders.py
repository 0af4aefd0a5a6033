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
