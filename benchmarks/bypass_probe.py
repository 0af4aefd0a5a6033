"""Where a bypass should sit, and what a block should share, probed on a frozen encoder.

    python benchmarks/bypass_probe.py        # a few minutes on 2 CPU cores; writes benchmarks/BYPASS-PROBE.md

The encoder (MiniLM-L6) stays frozen: every layer's hidden states of the training sample and of the validation
split are computed once, then only the exits (and their bypass adapters) are trained on them, for each design
and seed. With nothing shared being trained, this isolates what an adapter adds to the exits it feeds:
- `none`: plain exits;
- `pooled, block b`: one adapter per block of b layers on the pooled vector (the paper's bypass, v1);
- `tokens, block b`: one adapter per block on every token before pooling (v2);
- `attention`: plain exits, each pooling the tokens by its own learned weights instead of the mean
  (`attention_pooling`), and `attention + tokens, block 2`: that on top of v2's adapters;
- `tokens, block 2, width w`: v2's adapters with a bottleneck of w instead of the default 32 (`bypass_dim`);
- `tokens + hint, block 2`: v2's adapters, each intermediate exit also pulling its pooled vector towards the
  last layer's (mean squared error, weight 1): feature distillation, the other half of self-distillation;
- `tokens + distillation, block 2`: v2's adapters, each intermediate exit's loss mixed with distillation from the
  final exit as in `bb2_distill` (weight 0.5, temperature 2), and `tokens + distillation from the next exit`: the
  same with the next deeper exit as each exit's teacher (a teacher closer to the student's capacity).
The damper acts on the shared layers, and distillation on them too when they train, so this probe judges
only what distillation does to the exits and adapters, and cannot judge the damper;
`benchmarks/run.py --plan v2` (the ablation) does, with the encoder trained.

Every number is a validation accuracy (rotten-tomatoes validation split); no test text is read.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from badge import MultiExitModel  # noqa: E402
from badge.data import load_named_dataset, sample  # noqa: E402
from badge.encoders import minilm_l6_dir  # noqa: E402
from badge.training import DISTILL_OPTIONS  # noqa: E402

WIDTH = 32  # MultiExitConfig's default bypass_dim
# (where, block size, adapter width)
DESIGNS = [("none", None, WIDTH)] + [(where, b, WIDTH) for where in ("pooled", "tokens") for b in (1, 2, 3)]
DESIGNS += [("attention", None, WIDTH), ("attention + tokens", 2, WIDTH)]  # each exit's own learned token weights
DESIGNS += [("tokens", 2, width) for width in (64, 128)]  # a wider bottleneck
DESIGNS += [("tokens + hint", 2, WIDTH)]  # feature distillation towards the last layer's pooled vector
DESIGNS += [("tokens + distillation", 2, WIDTH), ("tokens + distillation from the next exit", 2, WIDTH)]


def states(model: MultiExitModel, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's hidden states (N, L, T, d) and the attention mask (N, T), encoder frozen."""
    encoded = model.tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    out = []
    with torch.no_grad():  # not inference_mode: the adapters train on these tensors
        for start in tqdm(range(0, len(texts), 64), desc="encoding", leave=False):
            ids = encoded["input_ids"][start : start + 64]
            mask = encoded["attention_mask"][start : start + 64]
            types = encoded.get("token_type_ids")
            hidden = model.embed(ids, types[start : start + 64] if types is not None else None)
            attention = model.attention_inputs(hidden, mask)
            layers = []
            for layer in range(1, model.num_layers + 1):
                hidden = model.run_layer(layer, hidden, attention)
                layers.append(hidden)
            out.append(torch.stack(layers, 1))
    return torch.cat(out), encoded["attention_mask"]


def probe(design, seed, train, validation, label_names, epochs: int, lr: float) -> list[float]:
    """Validation accuracy of every exit after training the exits (and adapters) of one design."""
    where, block, width = design
    options = {"use_bypass": block is not None, "bypass_dim": width}
    if block is not None:
        options["block_size"] = block
    if "tokens" in where:
        options["bypass_input"] = "tokens"
    if where.startswith("attention"):
        options["attention_pooling"] = True
    if "distillation" in where:
        options.update(DISTILL_OPTIONS)
    torch.manual_seed(seed)
    model = MultiExitModel.from_encoder(minilm_l6_dir(), label_names=label_names, gamma=1.0, **options)
    for parameter in model.encoder.parameters():
        parameter.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=lr)
    (x, mask, y), (xv, mask_v, yv) = train, validation
    generator = torch.Generator().manual_seed(seed)
    pooled: list[torch.Tensor] = []  # each exit head's input while training, for the hint
    hooks = [
        model.exits[str(layer)].register_forward_pre_hook(lambda _, args: pooled.append(args[0]))
        for layer in (model.intermediate_layers if where.endswith("hint") else [])
    ]
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(32):
            weights = model.pool_weights(mask[batch])
            pooled.clear()
            logits = [
                model.exit_logits(layer, x[batch, i], mask[batch], weights) for i, layer in enumerate(model.exit_layers)
            ]
            if where.endswith("next exit"):
                alpha = model.config.distill_weight
                loss = model.task_loss(logits[-1], y[batch]) + sum(
                    (1 - alpha) * model.task_loss(z, y[batch]) + alpha * model.distill_loss(z, teacher.detach())
                    for z, teacher in zip(logits[:-1], logits[1:], strict=True)
                )
            else:  # the task loss, mixed with distillation from the final exit where the config says so
                loss = sum(model.exit_losses(logits, y[batch]))
            if pooled:
                last = torch.bmm(weights, x[batch, -1]).squeeze(1)  # the last layer's pooled vector (frozen)
                loss = loss + sum(torch.nn.functional.mse_loss(vector, last) for vector in pooled)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for hook in hooks:
        hook.remove()
    model.eval()
    with torch.no_grad():
        weights = model.pool_weights(mask_v)
        return [
            100 * (model.exit_logits(layer, xv[:, i], mask_v, weights).argmax(-1) == yv).float().mean().item()
            for i, layer in enumerate(model.exit_layers)
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    started = time.perf_counter()
    splits = load_named_dataset("rotten-tomatoes", split_seed=0, quiet=True)
    train_data = sample(splits["train"], args.train_samples, 0)
    model = MultiExitModel.from_encoder(minilm_l6_dir(), label_names=splits["train"].label_names).eval()
    print(
        f"{len(DESIGNS)} designs x {args.seeds} seeds; encoding {len(train_data)} + {len(splits['validation'])} texts"
    )
    x, mask = states(model, train_data.texts, 64)
    xv, mask_v = states(model, splits["validation"].texts, 64)
    train = (x, mask, torch.tensor(train_data.labels))
    validation = (xv, mask_v, torch.tensor(splits["validation"].labels))
    results = {}
    for design in tqdm(DESIGNS, desc="designs"):
        results[design] = [
            probe(design, seed, train, validation, train_data.label_names, args.epochs, args.lr)
            for seed in range(args.seeds)
        ]
    layers = model.num_layers
    lines = [
        "# Bypass designs on a frozen MiniLM-L6 (rotten-tomatoes validation accuracy)",
        "",
        f"`python benchmarks/bypass_probe.py` ({args.train_samples} training texts, {args.epochs} epochs, "
        f"AdamW lr {args.lr}, {args.seeds} seeds, {time.perf_counter() - started:.0f} s).",
        "",
        __doc__.split("\n\n")[2].strip(),
        "",
        "Mean over seeds; `shallow` is the mean of exits 1-3, `+/-` the spread (standard deviation) of that mean "
        "over seeds; `vs none` is the difference in `shallow` to plain exits.",
        "",
        "| design | " + " | ".join(f"exit {i}" for i in range(1, layers + 1)) + " | shallow | vs none |",
        "|---|" + "---|" * (layers + 2),
    ]
    base = statistics.mean(statistics.mean(r[:3]) for r in results[("none", None, WIDTH)])
    for design, runs in results.items():
        name = design[0] if design[1] is None else f"{design[0]}, block {design[1]}"
        name += "" if design[2] == WIDTH else f", width {design[2]}"
        per_exit = [statistics.mean(r[i] for r in runs) for i in range(layers)]
        shallow = [statistics.mean(r[:3]) for r in runs]
        spread = statistics.stdev(shallow) if len(shallow) > 1 else 0.0
        lines.append(
            f"| {name} | "
            + " | ".join(f"{a:.1f}" for a in per_exit)
            + f" | {statistics.mean(shallow):.2f} +/- {spread:.2f} | {statistics.mean(shallow) - base:+.2f} |"
        )
    (HERE / "BYPASS-PROBE.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
