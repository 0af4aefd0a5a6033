"""Dynamic int8 quantisation of the transformer layers, for both runtimes.

Weights of the encoder's linear layers are stored as int8; activations are quantised on the fly per
batch. The exit heads and bypasses stay in float32: they run on one pooled vector per row, so int8
would save nothing there, and float keeps the exit rule's decisions close to the float model's.
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

QUANTIZATION_MODES = ("int8",)


def check_mode(quantize: str | None) -> None:
    """Raise ValueError unless `quantize` is None or one of `QUANTIZATION_MODES`."""
    if quantize is not None and quantize not in QUANTIZATION_MODES:
        raise ValueError(f"quantize {quantize!r} is not one of {list(QUANTIZATION_MODES)} (or None for float32)")


def quantize_torch(model: MultiExitModel) -> MultiExitModel:
    """A copy of `model` whose encoder linear layers are dynamically quantised to int8 (CPU inference only).

    Uses `torch.ao.quantization.quantize_dynamic`, deprecated in torch 2.13 in favour of torchao but
    still shipped; the copy (in eval mode) runs in `EarlyExitEngine` like any model. The original is unchanged.
    """
    encoder_linears = {
        name: default_dynamic_qconfig
        for name, module in model.named_modules()
        if name.startswith("encoder.") and isinstance(module, nn.Linear)
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor")
        quantized = torch_quantize_dynamic(model, encoder_linears, dtype=torch.qint8, inplace=False)
    quantized.tokenizer = model.tokenizer
    return quantized


def quantize_onnx(source: Path, target: Path) -> None:
    """Write a dynamically int8-quantised copy of the ONNX graph `source` (its MatMul and Gemm weights) to `target`.

    Needs ONNX Runtime (`badge[onnx]`), imported here so that torch int8 works without it."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as onnx_quantize_dynamic

    # ONNX Runtime advises its shape-inference pre-processing on every call; on these graphs it adds
    # seconds per layer and changes no node, so the advice is filtered out rather than followed.
    advice = _DropLogMessage("pre-processing before quantization")
    root = logging.getLogger()
    root.addFilter(advice)
    try:
        onnx_quantize_dynamic(source, target, op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8)
    finally:
        root.removeFilter(advice)


class _DropLogMessage(logging.Filter):
    """Drops log records whose message contains `text`."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()
