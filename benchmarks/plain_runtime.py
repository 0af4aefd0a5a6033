"""The plain model on the runtimes a user compares us with: the Hugging Face forward, and one ONNX Runtime graph
(fp32 and `quantize_dynamic` int8) exported as a user would. The `plain` rows of `benchmarks/stack.py`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx
import onnxruntime
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from torch import nn

from badge import MultiExitModel
from badge.logits import plain_forward

Batch = dict[str, torch.Tensor]


def plain_answer(model: MultiExitModel) -> Callable[[Batch], tuple[torch.Tensor, None]]:
    def answer(batch: Batch) -> tuple[torch.Tensor, None]:
        return plain_forward(model, {key: value for key, value in batch.items() if key != "row"}), None

    return answer


class PlainClassifier(nn.Module):
    """The plain model as one module: the encoder's own forward over all layers, then the final classifier."""

    def __init__(self, model: MultiExitModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        types = {} if token_type_ids is None else {"token_type_ids": token_type_ids}  # MPNet takes none
        hidden = self.model.encoder(input_ids=input_ids, attention_mask=attention_mask, **types).last_hidden_state
        return self.model.exit_logits(self.model.num_layers, hidden, attention_mask)


def export_plain(model: MultiExitModel, folder: Path) -> tuple[Path, Path]:
    """The plain model exported as a user would: one `torch.onnx.export` graph, and its `quantize_dynamic` int8 copy."""
    folder.mkdir(parents=True, exist_ok=True)
    inputs = {"input_ids": torch.ones(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    inputs["attention_mask"][1, 5:] = 0
    if model.encoder_family.token_types:
        inputs["token_type_ids"] = torch.zeros(2, 8, dtype=torch.long)
    dynamic = {name: {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC} for name in inputs}
    float_path, int8_path = folder / "plain.onnx", folder / "plain-int8.onnx"
    with torch.no_grad():
        torch.onnx.export(
            PlainClassifier(model).eval(), (), float_path, kwargs=inputs, dynamic_shapes=dynamic, external_data=False
        )
    # The exporter's stored intermediate shapes trip the quantiser's own shape inference ("Inferred shape and
    # existing shape differ"); without them the quantiser infers every shape itself.
    graph = onnx.load(float_path)
    del graph.graph.value_info[:]
    onnx.save(graph, folder / "plain-no-shapes.onnx")
    quantize_dynamic(folder / "plain-no-shapes.onnx", int8_path, weight_type=QuantType.QInt8)
    return float_path, int8_path


def onnx_answer(path: Path, threads: int) -> Callable[[Batch], tuple[torch.Tensor, None]]:
    """A session on the plain graph `path`: ONNX Runtime's default options but the thread count and no spinning.

    Spinning (the default) keeps the session's threads busy-waiting after each call: on a machine with as many
    cores as threads, that steals the cores from whichever row runs next and slows the PyTorch rows several-fold.
    """
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = {node.name for node in session.get_inputs()}

    def answer(batch: Batch) -> tuple[torch.Tensor, None]:
        feed = {key: value.numpy() for key, value in batch.items() if key in names}
        return torch.from_numpy(session.run(None, feed)[0]), None

    return answer
