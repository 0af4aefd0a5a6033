"""Dynamic int8 quantisation of the transformer layers, for both runtimes.

Weights of the encoder's linear layers are stored as int8; activations are quantised on the fly per
batch. The exit heads and bypasses stay in float32: they run on one pooled vector per row, so int8
would save nothing there, and float keeps the exit rule's decisions close to the float model's.

Two modes:
- `int8`: every linear layer of the encoder. The fastest, and the lossiest: the input of each layer's FFN
  output projection (the GELU activations) has a few channels tens of times larger than the rest, and one
  int8 scale per batch for that whole tensor rounds the other channels away (Bondarenko et al., 2021,
  "Understanding and overcoming the challenges of efficient transformer quantization").
- `int8-mixed`: every linear layer except those FFN output projections, which stay float32. It keeps about
  two thirds of the layer's matrix work in int8 and most of the accuracy (`benchmarks/QUANTIZE.md`).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.ao.quantization import default_dynamic_qconfig
from torch.ao.quantization import quantize_dynamic as torch_quantize_dynamic

from badge.modeling import MultiExitModel

QUANTIZATION_MODES = ("int8", "int8-mixed")


def check_mode(quantize: str | None) -> None:
    """Raise ValueError unless `quantize` is None or one of `QUANTIZATION_MODES`."""
    if quantize is not None and quantize not in QUANTIZATION_MODES:
        raise ValueError(f"quantize {quantize!r} is not one of {list(QUANTIZATION_MODES)} (or None for float32)")


def stays_float(mode: str, in_features: int, out_features: int) -> bool:
    """Whether a linear layer of the encoder with these sizes keeps float32 weights under `mode`.

    The FFN output projection is the one linear layer of a transformer layer that narrows its input
    (intermediate size to hidden size): queries, keys, values and the attention output map the hidden size
    (or less, after head pruning) to at most the hidden size, and the FFN input projection widens it.
    """
    check_mode(mode)
    return mode == "int8-mixed" and in_features > out_features


def quantize_torch(model: MultiExitModel, mode: str = "int8") -> MultiExitModel:
    """A copy of `model` whose encoder linear layers are dynamically quantised to int8 (CPU inference only),
    all of them (`int8`) or all but the FFN output projections (`int8-mixed`).

    Uses `torch.ao.quantization.quantize_dynamic`, deprecated in torch 2.13 in favour of torchao but
    still shipped; the copy (in eval mode) runs in `EarlyExitEngine` like any model. The original is unchanged.
    """
    encoder_linears = {
        name: default_dynamic_qconfig
        for name, module in model.named_modules()
        if name.startswith("encoder.")
        and isinstance(module, nn.Linear)
        and not stays_float(mode, module.in_features, module.out_features)
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor")
        quantized = torch_quantize_dynamic(model, encoder_linears, dtype=torch.qint8, inplace=False)
    quantized.tokenizer = model.tokenizer
    return quantized


def quantize_onnx(source: Path, target: Path, mode: str = "int8") -> None:
    """Write a dynamically int8-quantised copy of the ONNX graph `source` (its MatMul and Gemm weights, less the
    FFN output projections under `int8-mixed`) to `target`.

    Needs ONNX Runtime (`badge[onnx]`), imported here so that torch int8 works without it."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as onnx_quantize_dynamic

    kept = _float_nodes(source, mode)
    # ONNX Runtime advises its shape-inference pre-processing on every call; on these graphs it adds
    # seconds per layer and changes no node, so the advice is filtered out rather than followed.
    advice = _DropLogMessage("pre-processing before quantization")
    root = logging.getLogger()
    root.addFilter(advice)
    try:
        onnx_quantize_dynamic(
            source,
            target,
            op_types_to_quantize=["MatMul", "Gemm"],
            weight_type=QuantType.QInt8,
            nodes_to_exclude=kept,
        )
    finally:
        root.removeFilter(advice)


def _float_nodes(source: Path, mode: str) -> list[str]:
    """Names of the MatMul/Gemm nodes of `source` whose constant weight stays float under `mode`."""
    check_mode(mode)
    if mode == "int8":
        return []
    import onnx

    graph = onnx.load(str(source)).graph
    weights = {tensor.name: tuple(tensor.dims) for tensor in graph.initializer}
    kept = []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in weights:
            continue
        shape = weights[node.input[1]]
        if len(shape) != 2:
            continue
        transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute)
        in_features, out_features = (shape[1], shape[0]) if transposed else shape
        if stays_float(mode, in_features, out_features):
            kept.append(node.name)
    return kept


class _DropLogMessage(logging.Filter):
    """Drops log records whose message contains `text`."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()
