"""Early exiting on ONNX Runtime: export a multi-exit model as one graph per piece, run them layer by layer.

`export_onnx` writes a folder a person can read:

    manifest.json            pieces, layers, exits, labels, task, exit policy, pooling, opset, quantisation
    embeddings.onnx          input_ids (B, T) [, token_type_ids (B, T)]  -> hidden (B, T, d)
    layer_1.onnx ...         hidden (B, T, d), attention_mask (B, T)      -> layer_output (B, T, d)
    exit_1.onnx ...          hidden (B, T, d), attention_mask (B, T)      -> logits (B, K)   (bypass included)
    tokenizer files

Batch and sequence axes are dynamic, and each layer graph builds its attention mask from the 2-D
padding mask itself, so the engine can drop rows and trim padding between layers exactly as the
PyTorch engine does. `OnnxEarlyExitEngine` runs the pieces joined into one graph with the exit rule
inside (`badge.onnx_graph`, one session call per batch), or, with `graph="layers"`, drives one
session per piece as `EarlyExitEngine` drives torch modules: same rules, same outputs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from badge.engine import EarlyExitEngine, EngineOutput, check_right_padded, predictions_from_logits
from badge.exit_model import AttentionInputs, ExitModel
from badge.folders import TOKENIZER_FILES, load_tokenizer, save_folder
from badge.modeling import MultiExitModel
from badge.onnx_graph import EarlyExitGraph
from badge.quantize import check_mode, quantize_onnx
from badge.rules import ExitPolicy

MANIFEST_FILE = "manifest.json"
FORMAT = "badge-onnx"  # the `format` key of a manifest
OPSET = 20
ENGINES = ("auto", "torch", "onnx")
GRAPH_MODES = ("auto", "one", "layers")
_EXPORTER_REGISTRY_LOG = logging.getLogger("torch.onnx._internal.exporter._registration")


# ----- the folder's description --------------------------------------------------------------
@dataclass
class Manifest:
    """What `manifest.json` holds; `problem_type`, `num_labels` and `exit_policy` as on a model's config."""

    family: str
    num_layers: int
    exit_layers: list[int]
    labels: list[str]
    task: str
    exit_policy: dict[str, Any]
    pooling: str
    opset: int
    quantized: str | None
    files: dict[str, Any]
    heads_kept: dict[str, list[int]] | None = None
    format: str = FORMAT

    @property
    def problem_type(self) -> str:
        return self.task

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        """Read `folder/manifest.json`, with a clear error if the folder is not an export of this version."""
        path = folder / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {MANIFEST_FILE}: expected a folder written by export_onnx")
        settings = json.loads(path.read_text())
        fields = {spec.name for spec in dataclasses.fields(cls)}
        required = {spec.name for spec in dataclasses.fields(cls) if spec.default is dataclasses.MISSING}
        if settings.get("format", FORMAT) != FORMAT or not required <= set(settings):
            raise ValueError(
                f"{path} is not a {FORMAT} manifest: expected the keys {sorted(required)}, found {sorted(settings)}"
            )
        return cls(**{key: value for key, value in settings.items() if key in fields})


# ----- export --------------------------------------------------------------------------------
class _Embeddings(nn.Module):
    """input_ids (B, T) and token_type_ids (B, T) -> hidden (B, T, d)."""

    def __init__(self, model: MultiExitModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.embed(input_ids, token_type_ids)


class _Layer(nn.Module):
    """hidden (B, T, d) and the 2-D padding mask (B, T) -> hidden (B, T, d) after one transformer layer."""

    def __init__(self, model: MultiExitModel, layer: int) -> None:
        super().__init__()
        self.model = model
        self.layer = layer

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        attention = self.model.attention_inputs(hidden, attention_mask)  # traced into the graph
        return self.model.run_layer(self.layer, hidden, attention)


class _Exit(nn.Module):
    """hidden (B, T, d) and the padding mask (B, T) -> logits (B, K) of one exit, bypass included."""

    def __init__(self, model: MultiExitModel, layer: int) -> None:
        super().__init__()
        self.model = model
        self.layer = layer

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.exit_logits(self.layer, hidden, attention_mask)


def _export_graph(module: nn.Module, inputs: dict[str, torch.Tensor], output_name: str, path: Path) -> None:
    """Export `module(**inputs)` to `path` with the dynamo exporter, batch and sequence axes dynamic."""
    batch, sequence = torch.export.Dim.DYNAMIC, torch.export.Dim.DYNAMIC
    dynamic = {name: {0: batch, 1: sequence} for name in inputs}
    # The exporter repeats, for every graph, notices that concern neither these graphs nor the user.
    registry_level = _EXPORTER_REGISTRY_LOG.level
    _EXPORTER_REGISTRY_LOG.setLevel(logging.ERROR)  # "torchvision is not installed": no vision op is exported
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*axis name.*will not be used")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            torch.onnx.export(
                module.eval(),
                (),
                path,
                kwargs=inputs,
                input_names=list(inputs),
                output_names=[output_name],
                dynamic_shapes=dynamic,
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    finally:
        _EXPORTER_REGISTRY_LOG.setLevel(registry_level)


def _example_inputs(model: MultiExitModel) -> dict[str, torch.Tensor]:
    """Tracing inputs: two rows of eight tokens, the second padded, so no axis is specialised to 1."""
    input_ids = torch.ones(2, 8, dtype=torch.long)  # the values do not matter to the trace
    attention_mask = torch.ones(2, 8, dtype=torch.long)
    attention_mask[1, 5:] = 0
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if model.encoder_family.token_types:
        inputs["token_type_ids"] = torch.zeros_like(input_ids)
    return inputs


def export_onnx(model_or_dir: MultiExitModel | str | Path, out_dir: str | Path, quantize: str | None = None) -> Path:
    """Export a multi-exit model to a folder of ONNX graphs with `manifest.json` and the tokenizer.

    Args:
        model_or_dir: a `MultiExitModel` (switched to eval mode) or the folder of a saved one.
        out_dir: the folder to write: its export files are replaced one by one, other files kept; a model
            folder (the source included) is refused with `FolderError`.
        quantize: None (float32), `int8` or `int8-mixed` (dynamic int8 weights in the layer graphs, see
            `badge.quantize`; exits stay float).
    Returns:
        `out_dir` as a Path.
    """
    check_mode(quantize)
    model = model_or_dir if isinstance(model_or_dir, MultiExitModel) else MultiExitModel.from_pretrained(model_or_dir)
    model.eval()
    target = Path(out_dir)
    sources = [] if isinstance(model_or_dir, MultiExitModel) else [model_or_dir]

    def write(staging: Path) -> None:
        files = _export_pieces(model, staging, quantize)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(staging)
        manifest = Manifest(
            family=model.family,
            num_layers=model.num_layers,
            exit_layers=model.exit_layers,
            labels=model.label_names,
            task=model.config.problem_type,
            exit_policy=dict(model.config.exit_policy),
            pooling=model.config.pooling,
            opset=OPSET,
            quantized=quantize,
            files=files,
            heads_kept=model.config.heads_kept,
        )
        (staging / MANIFEST_FILE).write_text(json.dumps(asdict(manifest), indent=2) + "\n")

    save_folder(target, write, kind="onnx export", sources=sources)
    return target


@torch.no_grad()
def _export_pieces(model: MultiExitModel, folder: Path, quantize: str | None) -> dict[str, Any]:
    """Write every graph into `folder`; returns the `files` entry of the manifest."""
    inputs = _example_inputs(model)
    embed_inputs = {key: value for key, value in inputs.items() if key != "attention_mask"}
    _export_graph(_Embeddings(model), embed_inputs, "hidden", folder / "embeddings.onnx")
    hidden = model.embed(inputs["input_ids"], inputs.get("token_type_ids"))  # (2, 8, d)
    piece_inputs = {"hidden": hidden, "attention_mask": inputs["attention_mask"]}
    layers, exits = [], {}
    for layer in range(1, model.num_layers + 1):
        name = f"layer_{layer}.onnx"
        _export_graph(_Layer(model, layer), piece_inputs, "layer_output", folder / name)
        if quantize is not None:
            quantize_onnx(folder / name, folder / name, quantize)
        layers.append(name)
        if layer in model.exit_layers:
            exits[str(layer)] = f"exit_{layer}.onnx"
            _export_graph(_Exit(model, layer), piece_inputs, "logits", folder / exits[str(layer)])
    return {"embeddings": "embeddings.onnx", "layers": layers, "exits": exits}


# ----- inference -----------------------------------------------------------------------------
class OnnxMultiExitModel(ExitModel):
    """ONNX Runtime sessions of an exported model, implementing the `ExitModel` protocol as `MultiExitModel` does.

    `embed`, `attention_inputs`, `run_layer` and `exit_logits` take and return torch tensors, so
    `EarlyExitEngine` drives this object exactly as it drives the PyTorch model. Its `config` is the
    export's `Manifest`.

    Args:
        export_dir: a folder written by `export_onnx`.
        num_threads: ONNX Runtime intra-op threads per session (None = ONNX Runtime's default).
    """

    def __init__(self, export_dir: str | Path, num_threads: int | None = None) -> None:
        self.folder = Path(export_dir)
        self.config = Manifest.read(self.folder)
        self.options = ort.SessionOptions()
        self.options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.options.inter_op_num_threads = 1
        # One session per piece means a dozen thread pools. Spinning idle threads (ONNX Runtime's
        # default) then fight over the cores with the session that runs: 5x slower on 2 cores.
        self.options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if num_threads is not None:
            self.options.intra_op_num_threads = num_threads
        has_tokenizer = any((self.folder / name).is_file() for name in TOKENIZER_FILES)
        self.tokenizer = load_tokenizer(self.folder) if has_tokenizer else None

    # The sessions open on first use: where `EarlyExitGraph` runs the export, they are never needed.
    def _session(self, name: str) -> ort.InferenceSession:
        return ort.InferenceSession(self.folder / name, self.options, providers=["CPUExecutionProvider"])

    @cached_property
    def embeddings(self) -> ort.InferenceSession:
        return self._session(self.config.files["embeddings"])

    @cached_property
    def layers(self) -> list[ort.InferenceSession]:
        return [self._session(name) for name in self.config.files["layers"]]

    @cached_property
    def exits(self) -> dict[int, ort.InferenceSession]:
        return {int(layer): self._session(name) for layer, name in self.config.files["exits"].items()}

    @cached_property
    def embedding_inputs(self) -> set[str]:
        return {node.name for node in self.embeddings.get_inputs()}

    @cached_property
    def exit_inputs(self) -> dict[int, set[str]]:
        return {layer: {node.name for node in s.get_inputs()} for layer, s in self.exits.items()}

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def exit_layers(self) -> list[int]:
        return list(self.config.exit_layers)

    @property
    def label_names(self) -> list[str]:
        return list(self.config.labels)

    @property
    def device(self) -> torch.device:
        """ONNX Runtime sessions here run on the CPU, so the rows' tensors stay there."""
        return torch.device("cpu")

    def eval(self) -> OnnxMultiExitModel:
        """Inference graphs have no training mode; returns self (as `nn.Module.eval` does)."""
        return self

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embedding output (B, T, d)."""
        feed = {"input_ids": _numpy(input_ids, torch.long)}
        if "token_type_ids" in self.embedding_inputs:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            feed["token_type_ids"] = _numpy(types, torch.long)
        return torch.from_numpy(self.embeddings.run(None, feed)[0])

    def attention_inputs(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        packed: bool = False,
        lengths: torch.Tensor | None = None,
    ) -> AttentionInputs:
        """The layer graphs build their own masks: pass the padding mask (B, T) through (`packed`, `lengths` unused)."""
        return AttentionInputs(mask=attention_mask)

    def run_layer(self, layer: int, hidden: torch.Tensor, attention: AttentionInputs) -> torch.Tensor:
        """Apply 1-based layer `layer` to hidden states (B, T, d)."""
        feed = {"hidden": _numpy(hidden, torch.float32), "attention_mask": _numpy(attention.mask, torch.long)}
        return torch.from_numpy(self.layers[layer - 1].run(None, feed)[0])

    def exit_logits(
        self, layer: int, hidden: torch.Tensor, attention_mask: torch.Tensor, pool_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, K) of the exit after 1-based `layer` (the exit graph pools for itself: `pool_weights` unused)."""
        feed = {"hidden": _numpy(hidden, torch.float32), "attention_mask": _numpy(attention_mask, torch.long)}
        wanted = self.exit_inputs[layer]  # [CLS] pooling reads no mask: the exporter drops the input
        return torch.from_numpy(self.exits[layer].run(None, {k: v for k, v in feed.items() if k in wanted})[0])


def _numpy(tensor: torch.Tensor, dtype: torch.dtype) -> Any:
    """A contiguous numpy view of `tensor` in `dtype` (a copy only where needed)."""
    return tensor.to(dtype).contiguous().numpy()


class OnnxEarlyExitEngine(EarlyExitEngine):
    """`EarlyExitEngine` on ONNX Runtime: per-sample exits, rows dropped and padding trimmed as they leave.

    Two ways to run an export, with the same answers:
    `one`: one graph with the exit rule inside (`badge.onnx_graph`), one session call per batch;
    `layers`: a session call per layer and per exit, survivors pooled across batches as in
    `EarlyExitEngine`. `auto` picks `one` unless the policy needs labels (`oracle`).

    Args:
        export_dir: a folder written by `export_onnx`.
        policy: the exit policy; default the one stored in the manifest.
        batch_size: rows per batch.
        num_threads: ONNX Runtime intra-op threads per session (None = ONNX Runtime's default).
        sort_by_length: batch samples of similar length together (results are unchanged).
        graph: `auto`, `one` or `layers`.
    """

    def __init__(
        self,
        export_dir: str | Path,
        policy: ExitPolicy | None = None,
        batch_size: int = 32,
        num_threads: int | None = None,
        sort_by_length: bool = True,
        graph: str = "auto",
    ) -> None:
        if graph not in GRAPH_MODES:
            raise ValueError(f"graph {graph!r} is not one of {list(GRAPH_MODES)}")
        manifest = Manifest.read(Path(export_dir))
        chosen = policy if policy is not None else ExitPolicy.from_dict(manifest.exit_policy)
        if graph == "auto":
            graph = "layers" if chosen.needs_labels else "one"
        self.graph = graph
        model = OnnxMultiExitModel(export_dir, num_threads)
        super().__init__(model, chosen, batch_size, sort_by_length=sort_by_length)
        self.early_exit_graph = None
        if graph == "one":
            config = model.config
            self.early_exit_graph = EarlyExitGraph(
                model.folder,
                config.files,
                config.task,
                config.exit_layers,
                config.num_labels,
                config.opset,
                chosen,
                num_threads,
                batch_size,
            )
            self.consulted = np.array(self.early_exit_graph.consulted)  # (E,)

    @torch.inference_mode()
    def run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> EngineOutput:
        """As `EarlyExitEngine.run`; with `graph='one'`, each batch of `batch_size` rows is one session call."""
        if self.early_exit_graph is None:
            return super().run(input_ids, attention_mask, token_type_ids, labels)
        # The bookkeeping runs on numpy arrays: at batch size 1 a dozen small torch calls cost a tenth of the graph.
        arrays = {
            name: np.ascontiguousarray(value, dtype=np.int64)
            for name, value in (("ids", input_ids), ("mask", attention_mask), ("types", token_type_ids))
            if value is not None
        }
        mask = arrays["mask"]
        if (mask[:, 1:] > mask[:, :-1]).any():
            check_right_padded(attention_mask)  # raises, with the message every engine gives
        n = mask.shape[0]
        lengths = mask.sum(axis=1)  # (N,)

        def run_rows(rows: slice | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            width = int(lengths[rows].max())
            cut = {name: np.ascontiguousarray(value[rows, :width]) for name, value in arrays.items()}
            return self.early_exit_graph.run_arrays(cut["ids"], cut["mask"], cut.get("types"))

        if n <= self.batch_size:  # one call, no reordering: the common case of a server or a caller's batch
            logits, layers = run_rows(slice(None))
        else:
            order = np.argsort(lengths, kind="stable") if self.sort_by_length else np.arange(n)
            logits = np.zeros((n, self.model.config.num_labels), dtype=np.float32)
            layers = np.zeros(n, dtype=np.int64)
            for start in range(0, n, self.batch_size):
                rows = order[start : start + self.batch_size]
                logits[rows], layers[rows] = run_rows(rows)
        self.layers_run += int(layers.sum())
        self.exits_run += int((self.consulted[None, :] <= layers[:, None]).sum())
        out_logits, out_layers = torch.from_numpy(logits), torch.from_numpy(layers)
        predicted, probs = predictions_from_logits(out_logits, self.task)
        return EngineOutput(labels=predicted, probs=probs, exit_layers=out_layers, logits=out_logits)


def is_onnx_export(path: str | Path) -> bool:
    """Whether `path` is a folder written by `export_onnx`."""
    return (Path(path) / MANIFEST_FILE).is_file()


def load_engine(
    path: str | Path,
    engine: str = "auto",
    policy: ExitPolicy | None = None,
    batch_size: int = 32,
    num_threads: int | None = None,
) -> EarlyExitEngine:
    """An early-exit engine for a saved model folder or an ONNX export.

    Args:
        path: a folder saved by `MultiExitModel.save_pretrained` or written by `export_onnx`.
        engine: `torch`, `onnx`, or `auto` (ONNX when the folder holds `manifest.json`, else torch).
        policy: the exit policy; default the one stored with the model.
        batch_size: rows per batch.
        num_threads: intra-op threads (torch's or ONNX Runtime's; None = the runtime's default).
    Returns:
        An `EarlyExitEngine` (or `OnnxEarlyExitEngine`) with `run`, `classify` and `layers_run`.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not one of {list(ENGINES)}")
    onnx_folder = is_onnx_export(path)
    if engine == "auto":
        engine = "onnx" if onnx_folder else "torch"
    if engine == "onnx":
        if not onnx_folder:
            raise ValueError(f"{path} is not an ONNX export (no {MANIFEST_FILE}): run `badge export` first")
        return OnnxEarlyExitEngine(path, policy, batch_size, num_threads)
    if onnx_folder:
        raise ValueError(f"{path} is an ONNX export: load it with engine='onnx'")
    return EarlyExitEngine(MultiExitModel.from_pretrained(path), policy, batch_size, num_threads)
