"""Run folders and resumable checkpoints: what `OUTPUT/checkpoint` holds, how it is written and read back.

A checkpoint is one folder, replaced atomically (staged beside it, then renamed):

    model/                          the model as `save_pretrained` writes it (safetensors)
    optimizer.safetensors           the optimizer's tensors (AdamW moments); hyper-parameters in optimizer_groups.json
    scheduler.json                  the learning-rate scheduler's state (its position in the schedule)
    rng_state_<process>.safetensors each process's random state (torch CPU and CUDA; Python's `random` in metadata)
    trainer_state.json              the loop position, best score, history, settings and data fingerprints

Why not accelerate's `save_state` / `load_state` (measured on accelerate 1.15.0): `save_state` writes the
optimizer, the scheduler and the random states with `torch.save` whatever `safe_serialization` says
(checkpointing.py:121, :128, :178: `optimizer.bin`, `scheduler.bin`, `random_states_0.pkl` are pickle archives),
and `load_state` reads them back with `torch.load` (checkpointing.py:255, :263, :294, through utils/other.py:483).
`--resume` takes a folder from the user, and we never unpickle a user's file, not even with torch's restricted
`weights_only` unpickler. It also swallows any error reading the random states (checkpointing.py:317-318), so a
damaged file would silently resume with other random numbers. So the same state is kept here in safetensors
and JSON, and a file that cannot be read stops the resume with a message naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from badge.folders import ordinary_mode, replace_directory
from badge.modeling import MultiExitModel

if TYPE_CHECKING:
    from badge.data import TextDataset

CHECKPOINT = "checkpoint"
BEST = "best"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_GROUPS_FILE = "optimizer_groups.json"
SCHEDULER_FILE = "scheduler.json"


class RunFolderError(ValueError):
    """A run folder that does not fit the request (a run already there, or no checkpoint to resume)."""


# ----- the run folder --------------------------------------------------------------------------
def check_run_folder(output_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run in a folder that holds one, unless told to `resume` it or `overwrite` it.

    Raises `RunFolderError` naming the folder, what it holds and the two options.
    """
    output = Path(output_dir)
    if resume and overwrite:
        raise RunFolderError("give --resume (continue the run) or --overwrite (start over), not both")
    if output.exists() and not output.is_dir():
        raise RunFolderError(f"--output {output} is a file; expected a run folder")
    held = [name for name in (BEST, CHECKPOINT) if (output / name).exists()]
    if held and not (resume or overwrite):
        raise RunFolderError(
            f"--output {output} already holds a run ({', '.join(name + '/' for name in held)}); "
            "pass --resume to continue it or --overwrite to replace it"
        )


def tidy_run_folder(output: Path) -> None:
    """Undo what a kill while checkpointing leaves: a complete `.checkpoint.old` becomes the checkpoint again
    when the checkpoint is missing; unfinished `.checkpoint.*` staging folders (ours by name) are removed."""
    checkpoint, old = output / CHECKPOINT, output / f".{CHECKPOINT}.old"
    if not checkpoint.exists() and (old / STATE_FILE).is_file() and (old / "model").is_dir():
        os.replace(old, checkpoint)  # killed between the two renames of `replace_directory`
    for debris in output.glob(f".{CHECKPOINT}.*"):
        if debris.is_dir():
            shutil.rmtree(debris, ignore_errors=True)


# ----- what a resumed run must share with its checkpoint ---------------------------------------------
# Training settings: each changes which examples come next or the schedule.
RESUME_SETTINGS = (
    "scheme",
    "epochs",
    "batch_size",
    "encoder_lr",
    "head_lr",
    "weight_decay",
    "warmup_ratio",
    "max_length",
    "seed",
    "max_steps",
)
# Model settings (the encoder is compared as a whole).
RESUME_MODEL_SETTINGS = (
    "num_labels",
    "id2label",
    "problem_type",
    "exit_layers",
    "use_bypass",
    "bypass_dim",
    "block_size",
    "gamma",
    "pooling",
    "loss_weights",
)
_VOLATILE_BACKBONE_KEYS = ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype")


def data_fingerprint(dataset: TextDataset) -> str:
    """sha256 of a dataset's texts, pairs and labels, in order: two runs see the same examples iff it matches."""
    digest = hashlib.sha256()
    for text, pair, label in zip(
        dataset.texts, dataset.text_pairs or [None] * len(dataset), dataset.labels or [None] * len(dataset), strict=True
    ):
        digest.update(json.dumps([text, pair, label]).encode())
    return digest.hexdigest()


def resume_mismatches(
    loop_state: dict[str, Any], saved: MultiExitModel, model: MultiExitModel, settings: dict[str, Any], run: dict
) -> list[str]:
    """What differs between a checkpoint (its loop state and model) and the run asked to resume it.

    `settings` are this run's training arguments as a dict; `run` holds its `processes` and `data`
    fingerprints. Returns one line per difference.
    """
    before = loop_state.get("args", {})
    found = [
        f"{name} {before[name]!r} (this run: {settings[name]!r})"
        for name in RESUME_SETTINGS
        if name in before and before[name] != settings[name]
    ]
    for key, value in run.items():
        if key in loop_state and loop_state[key] != value:
            what = "processes" if key == "processes" else "training and validation data (file, sample or split)"
            found.append(what if key == "data" else f"{what} {loop_state[key]!r} (this run: {value!r})")

    def backbone(config: Any) -> dict:  # as config.json holds it (JSON keys are strings)
        kept = {k: v for k, v in config.backbone.items() if k not in _VOLATILE_BACKBONE_KEYS}
        return json.loads(json.dumps(kept, default=str))

    if backbone(saved.config) != backbone(model.config):
        shown = {k: backbone(saved.config).get(k) for k in ("model_type", "hidden_size", "num_hidden_layers")}
        found.append(f"encoder {shown} (this run's encoder differs)")
    for name in RESUME_MODEL_SETTINGS:
        old, new = (json.loads(json.dumps(getattr(c.config, name, None), default=str)) for c in (saved, model))
        if old != new:
            found.append(f"{name} {old!r} (this run: {new!r})")
    return found


def open_checkpoint(
    checkpoint: Path, model: MultiExitModel, settings: dict[str, Any], run: dict[str, Any]
) -> dict[str, Any]:
    """Load a checkpoint's weights into `model` and return its loop state, after checking it fits this run.

    Raises `FileNotFoundError` when there is no checkpoint and `RunFolderError` naming every setting that
    differs (see `resume_mismatches`).
    """
    if not (checkpoint / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume: no checkpoint in {checkpoint} to resume from")
    loop_state = _read_json(checkpoint / STATE_FILE)
    saved = MultiExitModel.from_pretrained(checkpoint / "model")
    mismatches = resume_mismatches(loop_state, saved, model, settings, run)
    if mismatches:
        raise RunFolderError(
            f"--resume: the checkpoint in {checkpoint} was written with "
            + "; ".join(mismatches)
            + ". Resume with the checkpoint's settings, or start over with --overwrite"
        )
    model.load_state_dict(saved.state_dict())
    return loop_state


# ----- optimizer, scheduler and random state, without pickle ----------------------------------------
def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Write optimizer state as safetensors (tensors) plus JSON (hyper-parameters): nothing pickled."""
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": value.detach().cpu().contiguous()
        for index, slots in state["state"].items()
        for name, value in slots.items()
        if isinstance(value, torch.Tensor)
    }
    save_file(tensors, folder / OPTIMIZER_FILE)
    (folder / OPTIMIZER_GROUPS_FILE).write_text(json.dumps(state["param_groups"]))


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Restore what `save_optimizer` wrote."""
    tensors = _read_safetensors(folder / OPTIMIZER_FILE)
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    groups = _read_json(folder / OPTIMIZER_GROUPS_FILE)
    optimizer.load_state_dict({"state": slots, "param_groups": groups})


def load_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler, folder: Path, steps_done: int) -> None:
    """Restore the scheduler's state from `scheduler.json`, or, for a checkpoint written before that file
    existed, place it `steps_done` steps into its schedule (the learning rate itself comes with the optimizer)."""
    if (folder / SCHEDULER_FILE).is_file():
        state = _read_json(folder / SCHEDULER_FILE)
    else:
        state = {**scheduler.state_dict(), "last_epoch": steps_done, "_step_count": steps_done + 1}
    scheduler.load_state_dict(state)


def rng_state() -> dict[str, Any]:
    """This process's random state: torch's (CPU and every CUDA device; dropout draws from it) and Python's
    `random`. Returns {"tensors": name -> tensor, "metadata": {"python": JSON text}}."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    return {"tensors": tensors, "metadata": {"python": json.dumps(random.getstate())}}


def save_rng_states(states: list[dict[str, Any]], folder: Path) -> None:
    """Write each process's `rng_state()` (indexed by process) to `rng_state_<process>.safetensors`."""
    for process, state in enumerate(states):
        save_file(state["tensors"], folder / f"rng_state_{process}.safetensors", metadata=state["metadata"])


def load_rng_state(folder: Path, process: int) -> bool:
    """Restore this process's random state from the checkpoint; False when the checkpoint holds none
    (written before it kept random states)."""
    path = folder / f"rng_state_{process}.safetensors"
    if not path.is_file():
        return False
    tensors = _read_safetensors(path)
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata()
        version, python_state, gauss = json.loads(metadata["python"])
        random.setstate((version, tuple(python_state), gauss))
        torch.set_rng_state(tensors["torch"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise RunFolderError(
            f"--resume: {path} is not a random state this version wrote ({error}); start over with --overwrite"
        ) from error
    for device in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        if f"cuda.{device}" in tensors:  # a run moved from CPU to GPU keeps fresh CUDA states
            torch.cuda.set_rng_state(tensors[f"cuda.{device}"], device)
    return True


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunFolderError(f"--resume: {path} cannot be read ({error}); start over with --overwrite") from error


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise RunFolderError(f"--resume: {path} cannot be read ({error}); start over with --overwrite") from error


# ----- writing a checkpoint ----------------------------------------------------------------------
def write_checkpoint(
    target: Path,
    model: MultiExitModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rng_states: list[dict[str, Any]],
    loop_state: dict[str, Any],
) -> None:
    """Write everything a resume needs into a staging folder beside `target`, then swap it in: a reader (or a
    kill) never sees a half-written checkpoint. `rng_states` holds every process's `rng_state()`."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(ordinary_mode(directory=True))  # mkdtemp makes it 0700
    try:
        model.save_pretrained(staging / "model")
        save_optimizer(optimizer, staging)
        (staging / SCHEDULER_FILE).write_text(json.dumps(scheduler.state_dict()))
        save_rng_states(rng_states, staging)
        (staging / STATE_FILE).write_text(json.dumps(loop_state, indent=2))
        replace_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
