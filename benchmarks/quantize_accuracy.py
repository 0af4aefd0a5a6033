"""What dynamic int8 costs in accuracy, and what it buys in time: `int8` against `int8-mixed` (`badge.quantize`).

    python benchmarks/quantize_accuracy.py   # ~17 min on 2 CPU cores; writes benchmarks/QUANTIZE.md

Reads the default scheme's trained models of `python benchmarks/run.py --plan v2` from the cache (MiniLM-L6 on every
dataset, MPNet-12 on rotten-tomatoes); a run whose weights are no longer cached is named and left out. Each model is
run on its whole test split in float32 and in each int8 mode, on the same inputs:
- every exit's accuracy, and the final exit's difference to float32 with a paired bootstrap 95 % interval over the
  test texts (and the seeds, where a dataset has several cached);
- how often the final exit gives the float model's class;
- the time of the full-depth model (every layer, final exit) per mode over the same length-sorted batches of 32,
  as a ratio to float32 timed in the same repeat (modes alternating), median over the repeats.
The float32 logits are checked against the ones the plan stored, so each row is the model the plan measured.
"""

from __future__ import annotations

import argparse
import fnmatch
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import exit_scores, paired_difference, per_text  # noqa: E402
from training_runs import MAX_LENGTH, PLANS, load_run, machine, models_dir, plan_runs  # noqa: E402

from badge import MultiExitModel  # noqa: E402
from badge.checkpoints import BEST  # noqa: E402
from badge.comparison import BOOTSTRAP_RESAMPLES  # noqa: E402
from badge.data import load_named_dataset, sample  # noqa: E402
from badge.logits import encode_padded, length_sorted_batches, plain_forward, split_logits  # noqa: E402
from badge.quantize import QUANTIZATION_MODES, quantize_torch  # noqa: E402
from badge.training import DEFAULT_SCHEME  # noqa: E402

MODES = ("float32", *QUANTIZATION_MODES)


def variants(model: MultiExitModel) -> dict[str, MultiExitModel]:
    return {"float32": model} | {mode: quantize_torch(model, mode) for mode in QUANTIZATION_MODES}


def time_ratios(models: dict[str, MultiExitModel], batches: list[dict], repeats: int) -> dict[str, float]:
    """Per mode: median over repeats of (float32 time / mode time), every mode timed in each repeat."""
    ratios: dict[str, list[float]] = {mode: [] for mode in models}
    for _ in range(repeats):
        seconds = {}
        for mode, network in models.items():  # alternating within the repeat
            started = time.perf_counter()
            for batch in batches:
                plain_forward(network, batch)
            seconds[mode] = time.perf_counter() - started
        for mode in models:
            ratios[mode].append(seconds["float32"] / seconds[mode])
    return {mode: statistics.median(values) for mode, values in ratios.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", default="v2")
    parser.add_argument("--timed-texts", type=int, default=512, help="test texts timed per model")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="*", help="only the runs whose name matches this pattern")
    parser.add_argument("--output", type=Path, default=HERE / "QUANTIZE.md")
    args = parser.parse_args()
    started = time.perf_counter()
    plan = PLANS[args.plan]
    runs = [r for r in plan_runs(plan) if r.scheme == DEFAULT_SCHEME and fnmatch.fnmatch(r.name, args.only)]
    cached = [r for r in runs if (models_dir(args.plan, r.name) / BEST).is_dir()]
    missing = [r.name for r in runs if r not in cached]
    print(f"{len(cached)} cached models; left out (weights not cached): {', '.join(missing) or 'none'}")
    scores: dict[tuple[str, str], dict[str, list]] = {}
    rows, timing = [], []
    for run in tqdm(cached, desc="models"):
        model = MultiExitModel.from_pretrained(models_dir(args.plan, run.name) / BEST).eval()
        test = load_named_dataset(run.dataset, split_seed=0, quiet=True)["test"]  # the whole split, as the plan stored
        stored = load_run(HERE / "runs", run)["test"]
        networks = variants(model)
        key = (run.dataset, run.backbone)
        group = scores.setdefault(key, {mode: [] for mode in MODES})
        float_final = None
        for mode, network in networks.items():
            with torch.inference_mode():
                logits, _, _ = split_logits(network, test, MAX_LENGTH[run.dataset], batch_size=64)
            if mode == "float32":
                if not torch.allclose(logits.exit_logits, stored.exit_logits, atol=1e-3):
                    raise SystemExit(f"{run.name}: the cached model does not give the plan's stored test logits")
                float_final = logits.exit_logits[:, -1].argmax(-1)
            per_exit = exit_scores(logits)  # (E, N) correct or not
            group[mode].append(per_text(per_exit[-1]))
            agreement = 100 * float((logits.exit_logits[:, -1].argmax(-1) == float_final).float().mean())
            rows.append((run.name, mode, [float(e.mean()) for e in per_exit], agreement))
        encoded, _ = encode_padded(sample(test, args.timed_texts, 0), model.tokenizer, MAX_LENGTH[run.dataset])
        ratios = time_ratios(networks, length_sorted_batches(encoded, 32), args.repeats)
        timing.append((run.name, ratios))
    lines = [
        "# Dynamic int8 on the benchmark's models: accuracy and time (test split)",
        "",
        f"`python benchmarks/quantize_accuracy.py` on {machine()}, {time.perf_counter() - started:.0f} s. "
        f"Models: the `{DEFAULT_SCHEME}` runs of `benchmarks/run.py --plan {args.plan}` still cached"
        + (f" (left out: {', '.join(missing)})" if missing else "")
        + ".",
        "",
        __doc__.split("\n\n")[2].strip(),
        "",
        "`int8`: every linear layer of the encoder in int8. `int8-mixed`: every one but each layer's FFN output "
        "projection, which stays float32.",
        "",
        "## Final exit against float32 (accuracy points, mean over the cached seeds)",
        "",
        "| dataset | backbone | seeds | float32 | " + " | ".join(f"{m} | {m} - float32" for m in MODES[1:]) + " |",
        "|---|---|---|---|" + "---|---|" * (len(MODES) - 1),
    ]
    for (dataset, backbone), group in scores.items():
        base = group["float32"]
        cells = []
        for mode in MODES[1:]:
            diff, low, high = paired_difference(group[mode], base, BOOTSTRAP_RESAMPLES)
            cells.append(
                f"{statistics.mean(s.metric for s in group[mode]):.2f} | {diff:+.2f} [{low:+.2f}, {high:+.2f}]"
            )
        lines.append(
            f"| {dataset} | {backbone} | {len(base)} | {statistics.mean(s.metric for s in base):.2f} | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        "## Every exit, per model",
        "",
        "| run | mode | exits 1..L | final exit agrees with float32 |",
        "|---|---|---|---|",
    ]
    for name, mode, per_exit, agreement in rows:
        lines.append(f"| {name} | {mode} | {' '.join(f'{a:.1f}' for a in per_exit)} | {agreement:.1f} % |")
    lines += [
        "",
        f"## Time of the full-depth model, float32 / mode ({args.timed_texts} test texts, batches of 32, median of "
        f"{args.repeats} repeats)",
        "",
        "| run | " + " | ".join(MODES[1:]) + " |",
        "|---|" + "---|" * (len(MODES) - 1),
    ]
    for name, ratios in timing:
        lines.append(f"| {name} | " + " | ".join(f"{ratios[m]:.2f}x" for m in MODES[1:]) + " |")
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
