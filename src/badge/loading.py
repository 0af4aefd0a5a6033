"""Reading saved models and encoders: folder checks, config.json, the stored exit policy, Hub options.

Every failure a user can cause (a missing or broken file, a Hub id that cannot be fetched, a config or
policy with a wrong value) becomes a `CheckpointError` naming the file and what was expected.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PretrainedConfig
from transformers.utils import cached_file

from badge.config import MultiExitConfig
from badge.folders import TOKENIZER_FILES, load_tokenizer, refuse_shipped_code
from badge.rules import ExitPolicy

EXIT_POLICY_FILE = "exit_policy.json"
# Keyword arguments of `from_pretrained` that say where files come from (a folder or the Hugging Face Hub).
HUB_OPTIONS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "proxies", "subfolder")


class CheckpointError(ValueError):
    """A model folder that is missing files or holds unreadable weights."""


def check_encoder_folder(folder: Path) -> None:
    """Raise `CheckpointError` unless local `folder` holds a plain encoder's config and safetensors weights
    (and asks to run no code shipped with it)."""
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json: expected a Hugging Face encoder folder")
    if not (folder / "model.safetensors").is_file():
        raise CheckpointError(f"{folder} has no model.safetensors: only safetensors weights are loaded")
    refuse_shipped_code(folder)


def check_model_folder(folder: Path) -> None:
    """Raise `CheckpointError` unless local `folder` holds a saved model's config and safetensors weights
    (and asks to run no code shipped with it)."""
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder} is not a saved BADGE model: {name} is missing")
    refuse_shipped_code(folder)


def read_model_config(
    source: str | os.PathLike, hub: dict[str, Any], config: PretrainedConfig | str | os.PathLike | None
) -> MultiExitConfig:
    """The `MultiExitConfig` of a saved model (folder or Hub id), with its stored exit policy.

    `config` is one already at hand, or where to read one (None: the model's own config.json). Raises
    `CheckpointError` naming the file when it cannot be read or holds another kind of model.
    """
    if config is None and os.path.isdir(source):
        config = read_config(Path(source) / hub.get("subfolder", ""))  # names a wrong type or range in the file
    if not isinstance(config, PretrainedConfig):
        try:
            config = MultiExitConfig.from_pretrained(config or source, **hub)
        except (OSError, ValueError) as error:
            raise CheckpointError(unreadable(source, error, "config.json")) from error
    if not isinstance(config, MultiExitConfig):
        raise CheckpointError(
            f"{source} holds a {type(config).__name__} ({config.model_type!r}), not a BADGE model "
            f"({MultiExitConfig.model_type!r}): build one with MultiExitModel.from_encoder"
        )
    config.exit_policy = stored_exit_policy(source, hub, config)
    return config


def read_tokenizer(source: str | os.PathLike, hub: dict[str, Any], vocab_size: int, required: bool) -> Any:
    """The tokenizer saved with a model or encoder (folder or Hub id), never running code shipped with it.

    Where the files include no tokenizer, None, or with `required` the error `load_tokenizer` (folder) or
    transformers (Hub) raises. `vocab_size` (the model's embedding rows) is checked against a folder's tokenizer.
    """
    if os.path.isdir(source):
        folder = Path(source) / hub.get("subfolder", "")
        if required or any((folder / name).is_file() for name in TOKENIZER_FILES):
            return load_tokenizer(folder, vocab_size)
        return None
    if required or optional_file(source, "tokenizer_config.json", hub) is not None:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False, **hub)
    return None


def stored_exit_policy(source: str | os.PathLike, hub: dict[str, Any], config: MultiExitConfig) -> dict[str, Any]:
    """The exit policy stored with a saved model (a folder or Hub id); its one home is `exit_policy.json`.

    `config.json` does not hold it (`MultiExitConfig.to_json_string`). Folders written by earlier versions
    also carry a copy there, which the file always overrode: they load as before, with a warning when the
    two disagree (saving the model again drops the stale copy). A folder without `exit_policy.json` keeps
    the policy its config.json holds, else `config.exit_policy`. Raises `CheckpointError` naming the file
    when the policy is not valid JSON or not a valid policy.
    """
    policy_file = optional_file(source, EXIT_POLICY_FILE, hub)
    config_file = optional_file(source, "config.json", hub)
    settings = json.loads(config_file.read_text()) if config_file is not None else {}
    copy = settings.get("exit_policy") if isinstance(settings, dict) else None
    if policy_file is None:
        policy = copy if copy is not None else config.exit_policy
        check_exit_policy(policy, config_file or Path(source) / "config.json")
        return policy
    try:
        policy = json.loads(policy_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{policy_file} is not valid JSON: {error}") from error
    check_exit_policy(policy, policy_file)
    if copy is not None and copy != policy:
        warnings.warn(
            f"{config_file} holds exit policy {copy}, a copy that earlier versions wrote; {policy_file} holds "
            f"{policy}, which is used: exit_policy.json is where the policy lives (save the model again to drop "
            "the stale copy)",
            stacklevel=3,
        )
    return policy


def read_config(path: Path) -> MultiExitConfig:
    """The `MultiExitConfig` in `path/config.json`; `CheckpointError` naming the file when a value has the wrong
    type or range (a string for `num_labels`, a list for `id2label` ...)."""
    try:
        config = MultiExitConfig.from_pretrained(path)
        config.backbone_config()
        names = [config.id2label[i] for i in range(config.num_labels)]
    except Exception as error:  # a config is user data: any failure to read it is the file's fault
        raise CheckpointError(
            f"{path}/config.json cannot be read as a BADGE model config ({type(error).__name__}: {error}); "
            "expected the file `save_pretrained` wrote"
        ) from error
    if not all(isinstance(name, str) for name in names):
        raise CheckpointError(f"{path}/config.json: label names {names} must be strings")
    return config


def check_exit_policy(policy: Any, where: Path) -> None:
    """Raise `CheckpointError` naming `where` unless `policy` is a valid exit policy (`ExitPolicy.from_dict`)."""
    example = '{"rule": "entropy", "tau": 0.3}'
    if not isinstance(policy, dict):
        raise CheckpointError(f"exit policy {policy!r} in {where} is not an object; expected one like {example}")
    try:
        ExitPolicy.from_dict(policy)
    except (ValueError, TypeError) as error:
        raise CheckpointError(
            f"exit policy {policy} in {where} is not valid: {error}; expected one like {example}"
        ) from error


def hub_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The `from_pretrained` keyword arguments that say where files come from (see `HUB_OPTIONS`)."""
    return {key: kwargs[key] for key in HUB_OPTIONS if kwargs.get(key) is not None}


def check_exists(source: str | os.PathLike) -> None:
    """Refuse a path that names a local folder (absolute, relative with ./, or deeper than `namespace/name`)
    but does not exist, rather than asking the Hub for it."""
    text = str(source)
    local = os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1
    if local and not os.path.exists(os.path.expanduser(text)):
        raise CheckpointError(
            f"{text} does not exist: expected a model folder or a Hugging Face Hub id (namespace/name)"
        )


def optional_file(source: str | os.PathLike, filename: str, hub: dict[str, Any]) -> Path | None:
    """Path of `filename` in a model folder or Hub repository (downloaded if need be), None where it has none."""
    found = cached_file(
        str(source),
        filename,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub,
    )
    return Path(found) if found else None


def unreadable(source: str | os.PathLike, error: Exception, filename: str | None = None) -> str:
    """The message for a model that cannot be read: a broken local file, or a Hub id that cannot be fetched."""
    if os.path.isdir(source):
        return f"{Path(source) / filename if filename else source} cannot be loaded: {error}"
    return (
        f"{source} is not a local folder and cannot be loaded from the Hugging Face Hub "
        f"(a typo in the path, no network, or a private repository without a token?): {error}"
    )


def declared_pooling(path: str | os.PathLike, hub: dict[str, Any] | None = None) -> str:
    """Pooling a sentence-transformers checkpoint (folder or Hub id) declares in `1_Pooling/config.json`, else `cls`."""
    pooling_file = optional_file(path, "1_Pooling/config.json", hub or {})
    if pooling_file is not None:
        declared = json.loads(pooling_file.read_text())
        if declared.get("pooling_mode_mean_tokens"):
            return "mean"
    return "cls"
