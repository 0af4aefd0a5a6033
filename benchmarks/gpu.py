"""Wall-clock speedup of the early-exit engine over the plain Hugging Face model on a GPU, per batch size.

    badge train --encoder minilm-l6 --dataset rotten-tomatoes --output runs/minilm --device cuda
    badge calibrate runs/minilm/best --dataset rotten-tomatoes --rule entropy --max-drop 1.0 --device cuda
    badge train --encoder mpnet-base --dataset rotten-tomatoes --output runs/mpnet --device cuda
    badge calibrate runs/mpnet/best --dataset rotten-tomatoes --rule entropy --max-drop 1.0 --device cuda
    python benchmarks/gpu.py runs/minilm/best runs/mpnet/best --dataset rotten-tomatoes --split test

For every model and batch size (default 1, 32, 256) the same examples run through the plain model (the
encoder's own forward over all layers, then the final classifier) and through `EarlyExitEngine` with the
model's stored exit policy, alternating, `--repeats` times, with the device synchronised before each clock
read; the speedup is the median of the per-repeat ratios. Both sides use the same attention
implementation (SDPA wherever transformers offers it for the family; the table says which) and the same
`--dtype`. `--device cpu` runs the same measurement on the CPU (used to check the script itself).
Writes a Markdown table (default benchmarks/GPU.md) and prints it.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
import transformers

from badge import EarlyExitEngine, ExitPolicy, MultiExitModel
from badge.data import load_file, load_named_dataset
from badge.device import place, resolve_device
from badge.logits import encode_padded
from badge.timing import time_policy


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dirs", type=Path, nargs="+", help="trained BADGE models (e.g. MiniLM-L6 and MPNet-12)")
    parser.add_argument("--dataset", default="rotten-tomatoes")
    parser.add_argument("--split", default="test")
    parser.add_argument("--data", type=Path, default=None, help="a labelled file instead of --dataset")
    parser.add_argument("--samples", type=int, default=1024, help="examples timed (a seeded sample)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=None, help="tokens per text (default: the model's)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the timed sample")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the dataset split")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/GPU.md"))
    args = parser.parse_args()

    device = resolve_device(args.device)
    rows = []
    for model_dir in args.model_dirs:
        model = place(MultiExitModel.from_pretrained(model_dir), device, args.dtype).eval()
        policy = ExitPolicy.from_dict(model.config.exit_policy)
        if args.data is not None:
            dataset, source = load_file(args.data, label_names=model.label_names), str(args.data)
        else:
            dataset = load_named_dataset(args.dataset, split_seed=args.split_seed, quiet=True)[args.split]
            source = f"{args.dataset} {args.split}"
        max_length = model.max_length(args.max_length)
        inputs, labels = encode_padded(dataset, model.tokenizer, max_length)
        sample = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed))[: args.samples]
        inputs = {key: value[sample] for key, value in inputs.items()}
        labels = labels[sample]
        full = EarlyExitEngine(model, ExitPolicy("full"), batch_size=64).run(**inputs)
        early = EarlyExitEngine(model, policy, batch_size=64).run(**inputs)
        accuracy_full = 100 * (torch.tensor(full.labels) == labels).float().mean().item()
        accuracy_early = 100 * (torch.tensor(early.labels) == labels).float().mean().item()
        layer_speedup = model.num_layers / early.exit_layers.float().mean().item()
        attention = model.encoder.config._attn_implementation
        layers = "padding-free" if model.encoder_family.packable else f"padded, {attention}"
        for batch_size in args.batch_sizes:
            timing = time_policy(model, policy, inputs, batch_size, repeats=args.repeats)
            print(f"{model_dir} batch {batch_size}: plain {timing.plain_s:.4f}s engine {timing.engine_s:.4f}s")
            rows.append(
                f"| {model_dir} ({model.family}, {model.num_layers} layers) | {attention} / {layers} | {batch_size} "
                f"| {timing.plain_s * 1000:.1f} | {timing.engine_s * 1000:.1f} | {timing.speedup:.2f}x "
                f"| {layer_speedup:.2f}x | {accuracy_full:.2f} -> {accuracy_early:.2f} | `{policy}` |"
            )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    lines = [
        f"# Early exit on {device.type}: wall-clock speedup over the plain Hugging Face model",
        "",
        f"{len(labels)} examples of {source} (seed {args.seed}), max length {max_length}, weights in "
        f"{args.dtype}. Device: {device_name(device)}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}. Speedup = median over {args.repeats} repeats of (plain time / engine "
        "time) on the same inputs, device synchronised before each clock read.",
        "",
        "| model | attention (plain / engine layers) | batch | plain HF (ms) | early exit (ms) | wall-clock speedup "
        "| layer speedup | accuracy full -> early | policy |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
