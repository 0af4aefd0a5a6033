"""Does a learned exit predictor that reads the exit's hidden vector beat the agreement gate? Validation only.

    python benchmarks/rule_dev_hidden.py   # needs the trained models in $BADGE_CACHE; writes RULE-DEV-HIDDEN.md

Learned exit predictors (BERxiT's learning-to-exit and its successors) read the hidden state, not only the exit's
output distribution. This script gives the gate (`badge.gate`) that extra input and measures it the way
`rule_dev.py` measures its variants: on validation halves (fit on one half, read each rule's best mix of settings
at exactly the target speedup on the other, both ways, three random cuts), as the variant minus the better of
entropy and max-prob, in accuracy points. The target stays "this exit already gives the final exit's class", so
no labels are used to fit.

It needs each `bb2_distill` run's trained model, which `benchmarks/run.py` leaves in
`$BADGE_CACHE/benchmark-models/v2/<run>/best` (only the logits are committed). Runs whose model is not in the
cache are skipped and named. The vector every exit reads (its pooled input, after the bypass) is computed once per
model on the validation split and kept beside the model as `exit_inputs_validation.safetensors`; the exit logits
computed with it must equal the committed ones, so the texts line up.

Variants:
- `gate`: as shipped (confidence, divergences from the previous exits, agreement streak);
- `+hidden`: plus the exit's whole input vector (standardised; strong L2, C = 0.003);
- `+hidden PCA k`: plus its first k principal components (fitted on the fitting half; C = 1).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from rule_dev import (  # noqa: E402
    SPEEDUPS,
    TAUS,
    baseline_curves,
    curve,
    cuts,
    features,
    first_exit,
    gap_to_best,
    shipped_gate_settings,
)
from training_runs import DEFAULT_SCHEME, MAX_LENGTH, PLANS, finished, load_run, models_dir, plan_runs  # noqa: E402

from badge import MultiExitModel  # noqa: E402
from badge.checkpoints import BEST  # noqa: E402
from badge.data import load_named_dataset, sample  # noqa: E402
from badge.logits import split_logits  # noqa: E402

VARIANTS = {"gate": None, "+hidden": (None, 0.003), "+hidden PCA 4": (4, 1.0), "+hidden PCA 16": (16, 1.0)}
INPUTS_FILE = "exit_inputs_validation.safetensors"


def exit_inputs(model_dir: Path, dataset: str, stored_logits: torch.Tensor) -> torch.Tensor:
    """(N, E, d) the vector each exit reads, on the validation split, computed once and kept beside the model."""
    path = model_dir / INPUTS_FILE
    if not path.is_file():
        model = MultiExitModel.from_pretrained(model_dir / BEST).eval()
        captured: dict[int, list[torch.Tensor]] = {}
        for layer in model.exit_layers:
            model.exits[str(layer)].register_forward_pre_hook(
                lambda _, inputs, layer=layer: captured.setdefault(layer, []).append(inputs[0].detach())
            )
        validation = sample(load_named_dataset(dataset, split_seed=0, quiet=True)["validation"], None, 0)
        logits, _, _ = split_logits(model, validation, MAX_LENGTH[dataset], batch_size=64)
        hidden = torch.stack([torch.cat(captured[layer]) for layer in model.exit_layers], 1)
        save_file({"hidden": hidden.contiguous(), "logits": logits.exit_logits.contiguous()}, path)
    tensors = load_file(path)
    if not torch.allclose(tensors["logits"], stored_logits, atol=1e-4):
        raise SystemExit(f"{model_dir}: its exit logits differ from the committed run's; it is not the same model")
    return tensors["hidden"]


def scores(fit_logits, fit_hidden, eval_logits, eval_hidden, components: int | None, c: float) -> torch.Tensor:
    """(N_eval, E - 1) probability that each exit agrees with the final exit, from one logistic model per exit
    fitted on the other half on the gate's features and the exit's input vector (or its first principal
    components)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    final = fit_logits[:, -1].argmax(-1)
    out = []
    gate_columns = zip(features(fit_logits, ""), features(eval_logits, ""), strict=True)
    for position, (fit_base, eval_base) in enumerate(gate_columns):
        fit_vec, eval_vec = fit_hidden[:, position].double().numpy(), eval_hidden[:, position].double().numpy()
        if components is not None:
            pca = PCA(components, random_state=0).fit(fit_vec)
            fit_vec, eval_vec = pca.transform(fit_vec), pca.transform(eval_vec)
        x = torch.cat([fit_base.double(), torch.from_numpy(fit_vec)], 1).numpy()
        x_eval = torch.cat([eval_base.double(), torch.from_numpy(eval_vec)], 1).numpy()
        target = (fit_logits[:, position].argmax(-1) == final).numpy()
        if target.all() or not target.any():
            out.append(torch.full((len(x_eval),), float(target.all())))
            continue
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000)).fit(x, target)
        out.append(torch.from_numpy(model.predict_proba(x_eval)[:, 1]).float())
    return torch.stack(out, -1)


def compare(split, hidden: torch.Tensor) -> dict[str, dict[float, float]]:
    """Every variant minus the better of entropy and max-prob in accuracy, per speedup, averaged over cuts."""
    sums: dict[str, dict[float, list[float]]] = {v: {} for v in VARIANTS}
    layers = split.exit_layers
    for fit, held in cuts(len(split)):  # rule_dev.py's cuts
        logits, labels = split.exit_logits[held], split.labels[held]
        baselines = baseline_curves(split, held)
        for variant, setting in VARIANTS.items():
            if setting is None:
                positions = shipped_gate_settings(split, fit, held)
            else:
                p = scores(split.exit_logits[fit], hidden[fit], logits, hidden[held], *setting)
                positions = [first_exit(p > t) for t in TAUS]
            points = curve(logits, labels, layers, positions)
            for speedup in SPEEDUPS:
                gap = gap_to_best(points, baselines, layers[-1] / speedup)
                if gap is not None:
                    sums[variant].setdefault(speedup, []).append(gap)
    return {v: {s: sum(x) / len(x) for s, x in cells.items()} for v, cells in sums.items()}


def main() -> None:
    runs = [r for r in plan_runs(PLANS["v2"]) if r.scheme == DEFAULT_SCHEME and finished(HERE / "runs", r)]
    present = [r for r in runs if (models_dir("v2", r.name) / BEST).is_dir()]
    missing = [r.name for r in runs if r not in present]
    if not present:
        raise SystemExit(
            f"none of the {len(runs)} finished {DEFAULT_SCHEME} runs has its model in {models_dir('v2', '')}"
        )
    results = {}
    for run in present:
        print(f"{run.name} ...", flush=True)
        validation = load_run(HERE / "runs", run)["validation"]
        hidden = exit_inputs(models_dir("v2", run.name), run.dataset, validation.exit_logits)
        results[run.name] = compare(validation, hidden)
    lines = [
        "# A learned exit predictor that reads the hidden vector, on validation halves",
        "",
        f"`python benchmarks/rule_dev_hidden.py` over {len(present)} `{DEFAULT_SCHEME}` runs whose model was in the "
        f"cache (left out: {', '.join(missing) or 'none'}). The cell is the variant minus the better of entropy and "
        "max-prob, in validation accuracy points, mean over cuts; see the script's docstring for the method.",
        "",
        "| run | variant | " + " | ".join(f"@{s:g}x" for s in SPEEDUPS) + " |",
        "|---|---|" + "---|" * len(SPEEDUPS),
    ]
    for variant in VARIANTS:
        cells = []
        for speedup in SPEEDUPS:
            values = [r[variant][speedup] for r in results.values() if speedup in r[variant]]
            cells.append(f"{sum(values) / len(values):+.2f}" if values else "-")
        lines.append(f"| mean over runs | {variant} | " + " | ".join(cells) + " |")
    for name, result in results.items():
        for variant in VARIANTS:
            cells = [f"{result[variant][s]:+.2f}" if s in result[variant] else "-" for s in SPEEDUPS]
            lines.append(f"| {name} | {variant} | " + " | ".join(cells) + " |")
    (HERE / "RULE-DEV-HIDDEN.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
