"""Each shallow exit against a model of the same depth fine-tuned alone.

    python benchmarks/solo_depth.py                 # about 50 min on 2 idle CPU cores; writes SOLO-DEPTH.md
    python benchmarks/solo_depth.py --report-only   # the report from the runs already stored

Exit k of a multi-exit model sees the first k layers of the encoder, shared with every deeper exit. A model of depth
k fine-tuned alone (MiniLM-L6 cut to its first k layers, one classifier on top, the plan's recipe: 6,000 training
texts, 3 epochs, batch 16, the same seeds) is what a user who wanted a k-layer classifier would train instead.
Comparing exit k of `joint` and of the default scheme with it shows whether sharing layers with deeper exits costs a
shallow exit anything against that standalone model, and whether a scheme's gain at exit k is more than the depth
alone gives.

Every run is cached (`~/.cache/badge/benchmark-models/depth/`) and resumes after an interruption; its logits are
stored under `benchmarks/runs-depth/` like the plan's runs. The multi-exit runs are read from `benchmarks/runs/`
(`python benchmarks/run.py --plan v2`). Every number is on the test split of rotten-tomatoes; the intervals are
paired bootstrap 95 % over test texts and seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import exit_scores, paired_difference, per_text  # noqa: E402
from training_runs import (  # noqa: E402
    MAX_LENGTH,
    PLANS,
    finished,
    load_run,
    machine,
    models_dir,
    plan_runs,
    store_run,
    train_cached,
)

from badge import MultiExitModel  # noqa: E402
from badge.checkpoints import BEST  # noqa: E402
from badge.comparison import SplitLogits  # noqa: E402
from badge.data import load_named_dataset, sample  # noqa: E402
from badge.encoders import minilm_l6_dir  # noqa: E402
from badge.report import fmt_difference  # noqa: E402
from badge.training import DEFAULT_SCHEME  # noqa: E402

DATASET = "rotten-tomatoes"
PLAN = PLANS["v2"]
SECONDS_PER_LAYER = 170.0  # one encoder layer of a 6,000-text, 3-epoch run on 2 idle cores, evaluation included


def run_name(depth: int, seed: int) -> str:
    return f"{DATASET}-minilm-L{depth}-s{seed}"


def solo_logits(runs_dir: Path, depth: int, seed: int) -> Path:
    """The stored logits of a solo run; their presence marks the run finished."""
    return runs_dir / run_name(depth, seed) / "logits.safetensors"


def cut_encoder(depth: int, into: Path, source: Path | None = None) -> Path:
    """A folder holding the encoder `source` (default MiniLM-L6) with only its first `depth` layers: the config says
    so, the weights and tokenizer are links to the source's files (transformers loads the first `depth` layers and
    skips the rest). The source folder is only read."""
    source = Path(source) if source is not None else minilm_l6_dir()
    config = json.loads((source / "config.json").read_text())
    if not 1 <= depth <= config["num_hidden_layers"]:
        raise ValueError(
            f"depth {depth} must lie in 1..{config['num_hidden_layers']}, the layers of the encoder in {source}"
        )
    into.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name != "config.json" and not (into / item.name).exists():
            (into / item.name).symlink_to(item)
    config["num_hidden_layers"] = depth
    (into / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return into


def train_depth(depth: int, seed: int, runs_dir: Path) -> None:
    """Fine-tune the `depth`-layer cut alone (resuming its checkpoint), then store its validation and test logits."""
    name = run_name(depth, seed)
    models = models_dir("depth", name)
    splits = load_named_dataset(DATASET, split_seed=0, quiet=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        train_cached(
            models,
            cut_encoder(depth, Path(scratch) / "encoder"),
            splits["train"].label_names,
            "single_exit",
            {},
            sample(splits["train"], PLAN["train_samples"], seed),
            splits["validation"],
            PLAN["epochs"],
            MAX_LENGTH[DATASET],
            seed,
        )
    model = MultiExitModel.from_pretrained(models / BEST).eval()
    record = {
        "dataset": DATASET,
        "depth": depth,
        "seed": seed,
        "train_samples": PLAN["train_samples"],
        "epochs": PLAN["epochs"],
        "train_seconds": round(time.perf_counter() - started, 1),
        "machine": machine(),
    }
    # only the model's own classifier, at layer `depth`: the exits below it were never trained
    store_run(runs_dir / name, model, splits, MAX_LENGTH[DATASET], None, record, final_only=True)


def solo_scores(runs_dir: Path, depth: int, seeds: list[int]) -> list[torch.Tensor] | None:
    """Per seed, the (N,) test correctness of the `depth`-layer model, or None if a seed is missing."""
    out = []
    for seed in seeds:
        path = solo_logits(runs_dir, depth, seed)
        if not path.is_file():
            return None
        tensors = load_file(path)
        split = SplitLogits(tensors["test_logits"], tensors["test_labels"], [depth], "single_label_classification")
        out.append(exit_scores(split)[0])
    return out


def multi_exit_scores(plan_dir: Path, scheme: str) -> dict[int, torch.Tensor]:
    """seed -> (E, N) test correctness of every exit of the plan's `scheme` run on the dataset."""
    runs = [r for r in plan_runs(PLAN) if r.dataset == DATASET and r.backbone == "minilm" and r.scheme == scheme]
    return {r.seed: exit_scores(load_run(plan_dir, r)["test"]) for r in runs if finished(plan_dir, r)}


def report(runs_dir: Path, plan_dir: Path, depths: list[int], seeds: list[int], resamples: int) -> str:
    schemes = {s: multi_exit_scores(plan_dir, s) for s in (DEFAULT_SCHEME, "joint", "single_exit")}
    common = [s for s in seeds if all(s in per_seed for per_seed in schemes.values())]
    lines = [
        "# Shallow exits against models of their depth fine-tuned alone",
        "",
        f"`python benchmarks/solo_depth.py` on {machine()}. MiniLM-L6 on {DATASET}, test split, seeds {common}; "
        f"every model trained with the plan's recipe ({PLAN['train_samples']} training texts, {PLAN['epochs']:g} "
        "epochs, batch 16). `solo k` is MiniLM-L6 cut to its first k layers and fine-tuned alone; exit k of "
        f"`{DEFAULT_SCHEME}` and `joint` are the plan's runs (`benchmarks/runs/`). Differences: mean over seeds, "
        "paired bootstrap 95 % over test texts and seeds; bold where the interval excludes 0. Depth 6 alone is the "
        "plan's `single_exit` run.",
        "",
        f"| depth k | solo k | joint exit k | {DEFAULT_SCHEME} exit k | joint - solo | {DEFAULT_SCHEME} - solo |",
        "|---|---|---|---|---|---|",
    ]
    for depth in [*depths, 6]:
        if depth == 6:  # the full depth alone is the plan's single-exit run
            solo = [schemes["single_exit"][s][-1] for s in common]
        else:
            solo = solo_scores(runs_dir, depth, common)
        if not solo or not common:
            continue
        solo_s = [per_text(v) for v in solo]
        joint = [per_text(schemes["joint"][s][depth - 1]) for s in common]
        default = [per_text(schemes[DEFAULT_SCHEME][s][depth - 1]) for s in common]
        d_joint = paired_difference(joint, solo_s, resamples)
        d_default = paired_difference(default, solo_s, resamples)
        mean = statistics.mean
        lines.append(
            f"| {depth} | {mean(s.metric for s in solo_s):.2f} | {mean(s.metric for s in joint):.2f} | "
            f"{mean(s.metric for s in default):.2f} | {fmt_difference(d_joint)} | {fmt_difference(d_default)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3], help="encoder depths to fine-tune alone")
    parser.add_argument("--seeds", type=int, nargs="+", default=PLAN["seeds"])
    parser.add_argument("--runs-dir", type=Path, default=HERE / "runs-depth", help="where solo runs' logits go")
    parser.add_argument("--plan-runs-dir", type=Path, default=HERE / "runs", help="the plan's stored runs")
    parser.add_argument("--out", type=Path, default=HERE / "SOLO-DEPTH.md")
    parser.add_argument("--report-only", action="store_true", help="write the report from stored runs only")
    args = parser.parse_args()
    bad = [d for d in args.depths if not 1 <= d <= 5]
    if bad:
        parser.error(f"--depths {bad}: a solo depth lies in 1..5 (depth 6 is the plan's single-exit run)")
    if not args.report_only:
        todo = [(d, s) for s in args.seeds for d in args.depths if not solo_logits(args.runs_dir, d, s).is_file()]
        hours = sum(d for d, _ in todo) * SECONDS_PER_LAYER / 3600
        print(f"{len(todo)} solo runs to train, about {hours:.1f} h on 2 idle CPU cores", flush=True)
        for depth, seed in todo:
            print(f"training {run_name(depth, seed)}", flush=True)
            train_depth(depth, seed, args.runs_dir)
    text = report(args.runs_dir, args.plan_runs_dir, args.depths, args.seeds, PLAN["resamples"])
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
