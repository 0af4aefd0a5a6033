"""Training a multi-exit model: joint / BB / self-distillation / two-stage / single-exit schemes, with `accelerate`.

The same loop runs on one CPU, one GPU, or several processes (`torchrun` or `accelerate launch`,
gloo on CPU). After every epoch each exit is evaluated on the validation split; the best model is
kept in `OUTPUT/best`, and a resumable checkpoint (weights, optimizer, schedule, random state and loop
position; see `badge.checkpoints`) is written atomically to `OUTPUT/checkpoint` every `save_steps` and at
each epoch end.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, gather_object, set_seed
from rich.console import Console
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from badge.checkpoints import (
    BEST,
    CHECKPOINT,
    STATE_FILE,
    check_run_folder,
    data_fingerprint,
    load_optimizer,
    load_rng_state,
    load_scheduler,
    open_checkpoint,
    rng_state,
    tidy_run_folder,
    write_checkpoint,
)
from badge.data import TextDataset, make_loader
from badge.device import DTYPES, resolve_device
from badge.logits import collect_exit_logits
from badge.metrics import exit_table, per_exit_metrics
from badge.modeling import MultiExitModel
from badge.tasks import get_task

SCHEMES = {
    "bb": "joint training of all exits through block-wise bypasses and the gradient damper (v1)",
    "joint": "plain joint training of all exits (no bypass, no damper)",
    "two_stage": "fine-tune the final exit, then freeze the backbone and train the other exits (DeeBERT)",
    "single_exit": "ordinary fine-tune of the final classifier only (a reference, not a multi-exit model)",
    "distill": "joint training, intermediate exits also distilled from the final exit (no bypass, no damper)",
    "bb_distill": "bb (v1 bypasses) with the intermediate exits distilled from the final exit",
    "bb2": "joint training through v2 bypasses: adapters on tokens, damper rising with depth",
    "bb2_distill": "bb2 with the intermediate exits distilled from the final exit",
}
# What `badge train` and the quickstart use: the best measured in benchmarks/RESULTS.md. Over plain joint
# training its mean accuracy over exits was +0.90 [+0.21, +1.50] on rotten-tomatoes, +1.12 [+0.77, +1.48]
# on tweet-sentiment and +0.34 [+0.17, +0.54] on reuters-r8 (3 seeds each), final exit within 0.3
# of joint; v1 `bb` was 0.84 below joint.
DEFAULT_SCHEME = "bb2_distill"
# Self-distillation settings the *_distill schemes start from (any can be overridden per run).
DISTILL_OPTIONS: dict[str, Any] = {"distill_weight": 0.5, "distill_temperature": 2.0}
BB2_OPTIONS: dict[str, Any] = {"use_bypass": True, "bypass_input": "tokens", "gamma_schedule": "depth"}
MIXED_PRECISION = {"float32": "no", "float16": "fp16", "bfloat16": "bf16"}  # accelerate's names for --dtype


@dataclass
class TrainingArguments:
    """Settings of one training run (all saved in `trainer_state.json`)."""

    output_dir: str
    scheme: str = DEFAULT_SCHEME
    epochs: float = 2.0
    batch_size: int = 16
    eval_batch_size: int = 64
    encoder_lr: float = 5e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_length: int = 128
    seed: int = 0
    save_steps: int = 200
    resume: bool = False
    overwrite: bool = False
    max_steps: int | None = None
    device: str = "auto"  # cpu, cuda or auto (CUDA where available)
    dtype: str = "float32"  # float16 / bfloat16: mixed-precision training (weights stay float32)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {list(DTYPES)}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme {self.scheme!r} is not one of {list(SCHEMES)}")
        if self.epochs <= 0:
            raise ValueError(f"epochs {self.epochs} must be > 0")
        for name, least in (("batch_size", 1), ("eval_batch_size", 1), ("save_steps", 1), ("max_length", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} {value!r} must be an integer >= {least}")
        for name in ("encoder_lr", "head_lr", "weight_decay", "warmup_ratio"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} {value} must be a finite number >= 0")
        if not math.isfinite(self.epochs):
            raise ValueError(f"epochs {self.epochs} must be a finite number > 0")


@dataclass
class TrainingResult:
    """What a run produced: the best model's folder and every epoch's per-exit validation metrics."""

    best_dir: Path
    best_metric: float
    history: list[dict[str, Any]] = field(default_factory=list)


def scheme_model_options(scheme: str) -> dict[str, Any]:
    """`MultiExitConfig` options a scheme implies (plain joint and two-stage have no bypass nor damper).

    `bb` keeps the v1 defaults of `MultiExitConfig` (pooled bypass, constant damper, no distillation).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme {scheme!r} is not one of {list(SCHEMES)}")
    if scheme in ("bb", "bb_distill"):
        options: dict[str, Any] = {"use_bypass": True}
    elif scheme in ("bb2", "bb2_distill"):
        options = dict(BB2_OPTIONS)
    else:
        options = {"use_bypass": False, "gamma": 1.0}
    if scheme.endswith("distill"):
        options.update(DISTILL_OPTIONS)
    return options


def stage_exit_weights(model: MultiExitModel, scheme: str, stage: int) -> torch.Tensor:
    """Per-exit loss weights for a scheme's stage: all exits, the final one only, or the others only."""
    weights = model.default_exit_weights()
    final_only = torch.zeros_like(weights)
    final_only[-1] = 1.0
    if scheme == "single_exit" or (scheme == "two_stage" and stage == 1):
        return final_only
    if scheme == "two_stage":
        others = weights.clone()
        others[-1] = 0.0
        return others / others.sum() if others.sum() > 0 else final_only
    return weights


def _param_groups(model: MultiExitModel, args: TrainingArguments, stage: int) -> list[dict[str, Any]]:
    heads = {id(p) for p in model.exit_parameters()}
    encoder = [p for p in model.parameters() if id(p) not in heads]
    if args.scheme == "two_stage" and stage == 2:
        last = str(model.num_layers)  # the final exit (its head and, with attention pooling, its token scores)
        final_parameters = list(model.exits[last].parameters())
        if last in model.poolers:
            final_parameters += list(model.poolers[last].parameters())
        final = {id(p) for p in final_parameters}
        for p in encoder + final_parameters:
            p.requires_grad_(False)
        return [{"params": [p for p in model.exit_parameters() if id(p) not in final], "lr": args.head_lr}]
    return [
        {"params": encoder, "lr": args.encoder_lr},
        {"params": model.exit_parameters(), "lr": args.head_lr},
    ]


class TrainingDiverged(ValueError):
    """The loss stopped being a finite number; training stopped before the bad weights were saved."""


# ----- the loop ------------------------------------------------------------------------------
def train(
    model: MultiExitModel,
    train_data: TextDataset,
    validation_data: TextDataset,
    args: TrainingArguments,
    console: Console | None = None,
) -> TrainingResult:
    """Train `model` on `train_data`, evaluating every exit on `validation_data` after each epoch.

    Returns the best model's folder (`OUTPUT/best`, chosen on the validation metric: mean over exits
    for multi-exit schemes, final exit for `single_exit`) and the per-epoch history.
    """
    accelerator = Accelerator(
        cpu=resolve_device(args.device).type == "cpu",
        mixed_precision=MIXED_PRECISION[args.dtype],
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    console = console or Console(stderr=True)
    main = accelerator.is_main_process
    output = Path(args.output_dir)
    check_run_folder(output, args.resume, args.overwrite)
    if main:
        output.mkdir(parents=True, exist_ok=True)
        tidy_run_folder(output)
    accelerator.wait_for_everyone()
    checkpoint = output / CHECKPOINT
    run = {
        "processes": accelerator.num_processes,
        "data": {"train": data_fingerprint(train_data), "validation": data_fingerprint(validation_data)},
    }
    loop_state: dict[str, Any] = {
        "epoch": 0,
        "step_in_epoch": 0,
        "global_step": 0,
        "best": -math.inf,
        "history": [],
        "args": asdict(args),
        **run,
    }
    if args.resume:
        loop_state = open_checkpoint(checkpoint, model, asdict(args), run)
        loop_state.update(args=asdict(args), **run)  # settings that do not matter (save_steps) may change
        if main:
            console.print(
                f"resuming from {checkpoint} at epoch {loop_state['epoch'] + 1}, step {loop_state['global_step']}"
            )
    # Also the shuffle's seed: accelerate's seedable sampler takes torch's initial seed when the loader is prepared.
    set_seed(args.seed)
    # Saved with every checkpoint: later commands tokenise as training did and can refuse overlapping splits.
    model.config.max_seq_length = model.max_length(args.max_length)
    model.config.training_data = {"train": train_data.origin, "validation": validation_data.origin}
    tokenizer = model.tokenizer
    metric_name = get_task(model.config.problem_type).metric.name
    loader = accelerator.prepare(make_loader(train_data, tokenizer, args.max_length, args.batch_size, True, args.seed))
    eval_loader = accelerator.prepare(
        make_loader(validation_data, tokenizer, args.max_length, args.eval_batch_size, False)
    )
    # A resumed run's dropout goes on with the random numbers the interrupted run would have drawn next.
    if args.resume and not load_rng_state(checkpoint, accelerator.process_index):
        set_seed(args.seed + loop_state["global_step"])  # a checkpoint written before it kept the random state
    steps_per_epoch = len(loader)  # per process
    total_steps = math.ceil(args.epochs * steps_per_epoch)
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    stages = (1, 2) if args.scheme == "two_stage" else (1,)
    stage_steps = math.ceil(total_steps / len(stages))

    for stage in stages:
        stage_start = (stage - 1) * stage_steps
        stage_end = min(total_steps, stage * stage_steps)
        if loop_state["global_step"] >= stage_end:
            continue
        model.train()
        optimizer = torch.optim.AdamW(_param_groups(model, args, stage), weight_decay=args.weight_decay)
        warmup = max(1, int(args.warmup_ratio * (stage_end - stage_start)))

        done = loop_state["global_step"] - stage_start if args.resume and loop_state.get("stage", 1) == stage else 0

        def schedule(step: int, warmup: int = warmup, length: int = stage_end - stage_start) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (length - step) / max(1, length - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        if done:  # a resumed run picks the optimizer's moments and the schedule up where it stopped
            load_optimizer(optimizer, checkpoint)
            load_scheduler(scheduler, checkpoint, done)
        # The scheduler stays unprepared: it steps once per optimizer step whatever the process count.
        ddp_model, optimizer = accelerator.prepare(model, optimizer)
        weights = stage_exit_weights(model, args.scheme, stage).to(accelerator.device)
        progress = tqdm(
            total=stage_end - stage_start,
            initial=loop_state["global_step"] - stage_start,
            desc=f"training ({args.scheme}{', stage ' + str(stage) if len(stages) > 1 else ''})",
            disable=not main,
        )
        while loop_state["global_step"] < stage_end:
            epoch = loop_state["epoch"]
            loader.set_epoch(epoch)  # the shuffle order depends on seed and epoch only, so a resume replays it
            skip = loop_state["step_in_epoch"]
            batches = accelerator.skip_first_batches(loader, skip) if skip else loader
            ddp_model.train()
            for batch in batches:
                out = ddp_model(**batch, exit_weights=weights)
                _stop_if_diverged(accelerator, out.loss, loop_state, checkpoint, output)
                accelerator.backward(out.loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                loop_state["global_step"] += 1
                loop_state["step_in_epoch"] += 1
                loop_state["stage"] = stage
                progress.update(1)
                progress.set_postfix(loss=f"{out.loss.item():.4f}")
                if loop_state["global_step"] % args.save_steps == 0:
                    _checkpoint(accelerator, model, optimizer, scheduler, loop_state, checkpoint)
                if loop_state["global_step"] >= stage_end:
                    break
            if loop_state["step_in_epoch"] >= steps_per_epoch or loop_state["global_step"] >= total_steps:
                _end_of_epoch(accelerator, model, eval_loader, loop_state, args, output, metric_name, console)
                _checkpoint(accelerator, model, optimizer, scheduler, loop_state, checkpoint)
        progress.close()
    accelerator.wait_for_everyone()
    return TrainingResult(best_dir=output / BEST, best_metric=loop_state["best"], history=loop_state["history"])


def _stop_if_diverged(
    accelerator: Accelerator, loss: torch.Tensor, loop_state: dict, checkpoint: Path, output: Path
) -> None:
    """Raise `TrainingDiverged` (on every process) when any process's loss is NaN or infinite.

    Checked before the backward pass, so the weights that gave the loss are neither updated nor saved:
    the last checkpoint and `best` stay as they were.
    """
    losses = accelerator.gather(loss.detach().reshape(1))  # (processes,)
    if bool(torch.isfinite(losses).all()):
        return
    saved = checkpoint / STATE_FILE
    kept = (
        f"the last checkpoint ({checkpoint}, step {json.loads(saved.read_text())['global_step']})"
        if saved.is_file()
        else "no checkpoint (none was written yet)"
    )
    best = f"{output / BEST} is unchanged" if (output / BEST).is_dir() else f"no {BEST} model was saved"
    raise TrainingDiverged(
        f"the training loss became {losses[~torch.isfinite(losses)][0].item()} at step "
        f"{loop_state['global_step'] + 1} (epoch {loop_state['epoch'] + 1}); training stopped. Kept {kept}; {best}. "
        "Lower --encoder-lr / --head-lr and start over with --overwrite"
    )


def _checkpoint(
    accelerator: Accelerator, model: MultiExitModel, optimizer: Any, scheduler: Any, loop_state: dict, target: Path
) -> None:
    rng_states = gather_object([rng_state()])  # every process's, in process order: each drew its own dropout
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_checkpoint(target, accelerator.unwrap_model(model), optimizer, scheduler, rng_states, loop_state)
    accelerator.wait_for_everyone()


def _end_of_epoch(
    accelerator: Accelerator,
    model: MultiExitModel,
    eval_loader: DataLoader,
    loop_state: dict[str, Any],
    args: TrainingArguments,
    output: Path,
    metric_name: str,
    console: Console,
) -> None:
    logits, labels = collect_exit_logits(model, eval_loader, accelerator)
    metrics = per_exit_metrics(logits, labels, model.config.problem_type)
    mean = sum(m[metric_name] for m in metrics) / len(metrics)
    score = metrics[-1][metric_name] if args.scheme == "single_exit" else mean
    epoch = loop_state["epoch"] + 1
    loop_state["history"].append({"epoch": epoch, "exit_metrics": metrics, "mean": mean})
    loop_state["epoch"] = epoch
    loop_state["step_in_epoch"] = 0
    if accelerator.is_main_process:
        console.print(exit_table(model.exit_layers, metrics, title=f"validation after epoch {epoch}"))
        if score > loop_state["best"]:
            loop_state["best"] = score
            accelerator.unwrap_model(model).save_pretrained(output / BEST)
            console.print(f"new best {metric_name} {score:.2f}: saved {output / BEST}")
    loop_state["best"] = max(loop_state["best"], score)
    model.train()
