"""Early exiting inside one ONNX graph: the pieces of an export joined by `If` nodes, one session call per batch.

Run piece by piece (`OnnxMultiExitModel`), every layer and every exit is a session call with numpy
copies in between, and the exit rule runs in Python: at batch size 1 that overhead costs as much as
the layers. Here the pieces of an export and the exit rule (exported from `badge.rules`, so both
engines apply the same code) are copied into one graph:

    embeddings -> layer 1 -> exit 1 -> rule -> rows that leave write their logits and exit layer
                                             -> If (any row left): keep the others, cut padding no
                                                   row still needs, then layer 2 -> exit 2 -> ...

Each `If` branch nests the rest of the model, so layers after the last row's exit never run. A
batch of any size works: rows leave one by one as in `EarlyExitEngine` (the batch shrinks instead
of being refilled from later inputs), and answers equal those of the engines piece by piece. A
batch of one row runs a leaner graph of its own: each exit's `If` answers or runs the next layer.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper
from torch import nn

from badge.rules import ExitPolicy, Step

_EXPORTER_REGISTRY_LOG = logging.getLogger("torch.onnx._internal.exporter._registration")


# ----- the exit rule as graphs -----------------------------------------------------------------
class _RuleStep(nn.Module):
    """One exit's rule step: logits (B, K) and the rule's state -> leave (B,) bool and the new state."""

    def __init__(self, step: Step, position: int, state_in: list[str], state_out: list[str]) -> None:
        super().__init__()
        self.step, self.position, self.state_in, self.state_out = step, position, state_in, state_out

    def forward(self, logits: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        leave, new_state = self.step(logits, dict(zip(self.state_in, state, strict=True)), self.position, None)
        return (leave, *(new_state[key] for key in self.state_out))


def rule_graphs(
    policy: ExitPolicy, task: str, exit_layers: list[int], num_labels: int, opset: int
) -> dict[int, tuple[onnx.ModelProto, list[str]]]:
    """The policy's step at every consulted intermediate exit, exported as an ONNX graph.

    Each graph reads `logits` (B, K) and the state keys the previous exit wrote (inputs `state.KEY`)
    and writes `leave` (B,) bool and the new state (outputs `next.KEY`). Returns
    {layer: (graph, the state keys it writes)}.
    """
    key = (str(policy), task, tuple(exit_layers), num_labels, opset)
    if key not in _RULE_GRAPHS:  # exporting takes about a second per exit: once per process is enough
        _RULE_GRAPHS[key] = _export_rule_graphs(policy, task, exit_layers, num_labels, opset)
    return _RULE_GRAPHS[key]


_RULE_GRAPHS: dict[tuple, dict[int, tuple[onnx.ModelProto, list[str]]]] = {}


def _export_rule_graphs(
    policy: ExitPolicy, task: str, exit_layers: list[int], num_labels: int, opset: int
) -> dict[int, tuple[onnx.ModelProto, list[str]]]:
    step = policy.build(task, exit_layers)
    consulted = policy.exits_consulted(exit_layers)
    positions = {layer: position for position, layer in enumerate(exit_layers)}
    logits = torch.randn(2, num_labels)  # two rows, so the batch axis stays symbolic
    state: dict[str, torch.Tensor] = {}
    graphs = {}
    for layer in consulted[:-1]:  # the last exit answers every row still running: no rule there
        state_in = sorted(state)
        _, new_state = step(logits, state, positions[layer], None)
        state_out = sorted(new_state)
        module = _RuleStep(step, positions[layer], state_in, state_out)
        inputs = (logits, *(state[key] for key in state_in))
        names = ["logits", *(f"state.{key}" for key in state_in)]
        graphs[layer] = (
            _export(module, inputs, names, ["leave", *(f"next.{key}" for key in state_out)], opset),
            state_out,
        )
        state = new_state
    return graphs


def _export(
    module: nn.Module, inputs: tuple[torch.Tensor, ...], input_names: list[str], output_names: list[str], opset: int
) -> onnx.ModelProto:
    """Export `module(logits, *state)` with a dynamic batch axis (axis 0 of every input)."""
    batch = torch.export.Dim.DYNAMIC
    dynamic = ({0: batch}, tuple({0: batch} for _ in inputs[1:])) if len(inputs) > 1 else ({0: batch},)
    registry_level = _EXPORTER_REGISTRY_LOG.level
    _EXPORTER_REGISTRY_LOG.setLevel(logging.ERROR)  # "torchvision is not installed": no vision op is exported
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*axis name.*will not be used")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            program = torch.onnx.export(
                module.eval(),
                inputs,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic,
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
    finally:
        _EXPORTER_REGISTRY_LOG.setLevel(registry_level)
    return program.model_proto


# ----- joining graphs --------------------------------------------------------------------------
class _Graph:
    """Nodes and initializers of one (sub)graph under construction."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def add(self, op: str, inputs: list[str], output: str, **attributes) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def constant(self, name: str, values: list[int]) -> str:
        self.initializers.append(helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
        return name

    def inline(self, piece: onnx.GraphProto, prefix: str, inputs: dict[str, str]) -> dict[str, str]:
        """Copy `piece` in, every name prefixed, its inputs read from outer names; returns {output: new name}.

        `inputs` maps the piece's input names to names in this graph; names the piece does not
        read (the exporter drops unused inputs) are ignored.
        """

        def rename(value: str) -> str:
            return inputs.get(value, prefix + value) if value else value

        for node in piece.node:
            if any(
                attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                for attribute in node.attribute
            ):
                raise ValueError(f"piece node {node.name} holds a subgraph: the pieces are expected to be flat")
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = prefix + node.name
            copy.input[:] = [rename(value) for value in node.input]
            copy.output[:] = [rename(value) for value in node.output]
            self.nodes.append(copy)
        for initializer in piece.initializer:
            copy = onnx.TensorProto()
            copy.CopyFrom(initializer)
            copy.name = prefix + initializer.name
            self.initializers.append(copy)
        return {output.name: rename(output.name) for output in piece.output}

    def proto(
        self, name: str, outputs: list[onnx.ValueInfoProto], inputs: list[onnx.ValueInfoProto] = ()
    ) -> onnx.GraphProto:
        return helper.make_graph(self.nodes, name, list(inputs), outputs, self.initializers)


class EarlyExitGraphBuilder:
    """Writes the one-graph early-exit model from the pieces of an export and the rule graphs.

    Args:
        embeddings, layers, exits: the export's graphs (`exits` keyed by layer, only those consulted).
        rules: {layer: (rule graph, state keys it writes)} from `rule_graphs`.
        num_labels: K.
    """

    def __init__(
        self,
        embeddings: onnx.ModelProto,
        layers: list[onnx.ModelProto],
        exits: dict[int, onnx.ModelProto],
        rules: dict[int, tuple[onnx.ModelProto, list[str]]],
        num_labels: int,
    ) -> None:
        self.embeddings, self.layers, self.exits, self.rules = embeddings, layers, exits, rules
        self.num_labels = num_labels

    def build(self, single_row: bool = False) -> onnx.ModelProto:
        """The model: inputs input_ids, attention_mask [, token_type_ids] (B, T) -> logits (B, K), exit_layer (B,).

        single_row: a graph for B = 1 only. With one row there is nothing to scatter, keep or trim:
        each exit's `If` either answers or runs the next layer, which saves a score of small nodes
        per exit (at batch size 1 they cost about a quarter of a MiniLM layer each).
        """
        top = _Graph()
        embedding_inputs = [value.name for value in self.embeddings.graph.input]
        hidden = top.inline(self.embeddings.graph, "embed.", {name: name for name in embedding_inputs})["hidden"]
        if single_row:
            self._single_row_layer(top, 1, hidden, "attention_mask", {}, ("logits", "exit_layer"))
        else:
            self._batch_start(top, hidden)
        return self._model(top, embedding_inputs)

    def _batch_start(self, top: _Graph, hidden: str) -> None:
        """The answers of a batch start empty; layer 1 onwards fill them row by row."""
        batch = top.add("Shape", ["input_ids"], "batch", start=0, end=1)  # (1,)
        zero, one = top.constant("zero", [0]), top.constant("one", [1])
        rows = top.add(
            "Range",
            [
                top.add("Squeeze", [zero], "zero_scalar"),
                top.add("Squeeze", [batch], "batch_scalar"),
                top.add("Squeeze", [one], "one_scalar"),
            ],
            "rows",
        )
        width = top.constant("num_labels", [self.num_labels])
        no_logits = top.add(
            "ConstantOfShape",
            [top.add("Concat", [batch, width], "logits_shape", axis=0)],
            "no_logits",
            value=helper.make_tensor("", TensorProto.FLOAT, [1], [0.0]),
        )
        no_layers = top.add(
            "ConstantOfShape", [batch], "no_layers", value=helper.make_tensor("", TensorProto.INT64, [1], [0])
        )
        self._layer(top, 1, hidden, "attention_mask", rows, {}, no_logits, no_layers, ("logits", "exit_layer"))

    def _model(self, top: _Graph, embedding_inputs: list[str]) -> onnx.ModelProto:
        """The finished graph `top` as a model with the inputs, outputs and opsets of its pieces."""
        inputs = [
            helper.make_tensor_value_info(value.name, TensorProto.INT64, ["batch", "sequence"])
            for value in self.embeddings.graph.input
        ]
        if "attention_mask" not in embedding_inputs:
            inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]))
        outputs = [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", self.num_labels]),
            helper.make_tensor_value_info("exit_layer", TensorProto.INT64, ["batch"]),
        ]
        graph = top.proto("early_exit", outputs, inputs)
        opsets = {}
        for piece in [self.embeddings, *self.layers, *self.exits.values(), *(rule for rule, _ in self.rules.values())]:
            for entry in piece.opset_import:
                opsets[entry.domain] = max(opsets.get(entry.domain, 0), entry.version)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
        model.ir_version = max(piece.ir_version for piece in [self.embeddings, *self.layers])
        return model

    def _layer(
        self,
        graph: _Graph,
        layer: int,
        hidden: str,
        mask: str,
        rows: str,
        state: dict[str, str],
        out_logits: str,
        out_layers: str,
        targets: tuple[str, str],
    ) -> None:
        """Emit layer `layer` onwards into `graph`, writing the final answers to the names `targets`.

        hidden (b, T, d), mask (b, T), rows (b,): the rows still running and their positions in the
        batch; state: the rule's state per row; out_logits (B, K), out_layers (B,): answers so far.
        """
        hidden = graph.inline(
            self.layers[layer - 1].graph, f"layer{layer}.", {"hidden": hidden, "attention_mask": mask}
        )["layer_output"]
        if layer not in self.exits:
            self._layer(graph, layer + 1, hidden, mask, rows, state, out_logits, out_layers, targets)
            return
        logits = graph.inline(self.exits[layer].graph, f"exit{layer}.", {"hidden": hidden, "attention_mask": mask})[
            "logits"
        ]
        tag = f"at{layer}."
        if layer not in self.rules:  # the last exit answers every row still running
            self._answer(graph, tag, rows, logits, layer, out_logits, out_layers, targets)
            return
        rule, state_out = self.rules[layer]
        wired = {"logits": logits, **{f"state.{key}": name for key, name in state.items()}}
        written = graph.inline(rule.graph, f"rule{layer}.", wired)
        leave = written["leave"]
        leaving = graph.add(
            "Unsqueeze",
            [graph.add("Compress", [rows, leave], tag + "leaving", axis=0), graph.constant(tag + "axis1", [1])],
            tag + "leaving_index",
        )
        out_logits = graph.add(
            "ScatterND",
            [out_logits, leaving, graph.add("Compress", [logits, leave], tag + "leaving_logits", axis=0)],
            tag + "logits",
        )
        here = graph.add(
            "Expand",
            [
                graph.constant(tag + "layer", [layer]),
                graph.add("Shape", [leaving], tag + "leaving_shape", start=0, end=1),
            ],
            tag + "leaving_layers",
        )
        out_layers = graph.add("ScatterND", [out_layers, leaving, here], tag + "layers")
        keep = graph.add("Not", [leave], tag + "keep")
        running = graph.add(
            "ReduceSum",
            [graph.add("Cast", [keep], tag + "keep_int", to=TensorProto.INT64)],
            tag + "running",
            keepdims=0,
        )
        anyone = graph.add("Greater", [running, graph.constant(tag + "none", [0])], tag + "anyone")

        done = _Graph()  # no row left: the answers are complete
        done_targets = (tag + "done_logits", tag + "done_layers")
        done.add("Identity", [out_logits], done_targets[0])
        done.add("Identity", [out_layers], done_targets[1])

        more = _Graph()  # the rows that stay run on, without the padding no one of them needs
        kept = {
            name: more.add("Compress", [value, keep], tag + "kept_" + name, axis=0)
            for name, value in (("hidden", hidden), ("mask", mask), ("rows", rows))
        }
        kept_state = {
            key: more.add("Compress", [written[f"next.{key}"], keep], f"{tag}kept_state.{key}", axis=0)
            for key in state_out
        }
        lengths = more.add(
            "ReduceSum", [kept["mask"], more.constant(tag + "axis1_more", [1])], tag + "lengths", keepdims=0
        )
        longest = more.add("ReduceMax", [lengths], tag + "longest", keepdims=1)  # (1,)
        start = more.constant(tag + "start", [0])
        trimmed_hidden = more.add(
            "Slice", [kept["hidden"], start, longest, more.constant(tag + "axis1_h", [1])], tag + "trimmed_hidden"
        )
        trimmed_mask = more.add(
            "Slice", [kept["mask"], start, longest, more.constant(tag + "axis1_m", [1])], tag + "trimmed_mask"
        )
        more_targets = (tag + "more_logits", tag + "more_layers")
        self._layer(
            more,
            layer + 1,
            trimmed_hidden,
            trimmed_mask,
            kept["rows"],
            kept_state,
            out_logits,
            out_layers,
            more_targets,
        )

        graph.nodes.append(
            helper.make_node(
                "If",
                [anyone],
                list(targets),
                name=tag + "if",
                then_branch=more.proto(f"after_{layer}", _answer_outputs(more_targets, self.num_labels)),
                else_branch=done.proto(f"done_{layer}", _answer_outputs(done_targets, self.num_labels)),
            )
        )

    def _single_row_layer(
        self, graph: _Graph, layer: int, hidden: str, mask: str, state: dict[str, str], targets: tuple[str, str]
    ) -> None:
        """Emit layer `layer` onwards for one row: hidden (1, T, d), mask (1, T); answers written to `targets`."""
        hidden = graph.inline(
            self.layers[layer - 1].graph, f"layer{layer}.", {"hidden": hidden, "attention_mask": mask}
        )["layer_output"]
        if layer not in self.exits:
            self._single_row_layer(graph, layer + 1, hidden, mask, state, targets)
            return
        logits = graph.inline(self.exits[layer].graph, f"exit{layer}.", {"hidden": hidden, "attention_mask": mask})[
            "logits"
        ]
        tag = f"at{layer}."
        if layer not in self.rules:  # the last exit answers the row
            graph.add("Identity", [logits], targets[0])
            graph.add("Identity", [graph.constant(tag + "layer", [layer])], targets[1])
            return
        rule, state_out = self.rules[layer]
        wired = {"logits": logits, **{f"state.{key}": name for key, name in state.items()}}
        written = graph.inline(rule.graph, f"rule{layer}.", wired)

        leave = _Graph()  # the row leaves here
        leave_targets = (tag + "leave_logits", tag + "leave_layers")
        leave.add("Identity", [logits], leave_targets[0])
        leave.add("Identity", [leave.constant(tag + "layer", [layer])], leave_targets[1])

        stay = _Graph()  # the row runs on
        stay_targets = (tag + "stay_logits", tag + "stay_layers")
        next_state = {key: written[f"next.{key}"] for key in state_out}
        self._single_row_layer(stay, layer + 1, hidden, mask, next_state, stay_targets)

        graph.nodes.append(
            helper.make_node(
                "If",
                [written["leave"]],  # (1,) bool: one element, as `If` requires
                list(targets),
                name=tag + "if",
                then_branch=leave.proto(f"leave_{layer}", _answer_outputs(leave_targets, self.num_labels)),
                else_branch=stay.proto(f"after_{layer}", _answer_outputs(stay_targets, self.num_labels)),
            )
        )

    @staticmethod
    def _answer(
        graph: _Graph,
        tag: str,
        rows: str,
        logits: str,
        layer: int,
        out_logits: str,
        out_layers: str,
        targets: tuple[str, str],
    ) -> None:
        """Write every running row's logits and exit layer into the answers, as `targets`."""
        index = graph.add("Unsqueeze", [rows, graph.constant(tag + "axis1", [1])], tag + "index")
        graph.add("ScatterND", [out_logits, index, logits], targets[0])
        here = graph.add(
            "Expand",
            [graph.constant(tag + "layer", [layer]), graph.add("Shape", [rows], tag + "rows_shape")],
            tag + "layers_here",
        )
        graph.add("ScatterND", [out_layers, index, here], targets[1])


def _answer_outputs(names: tuple[str, str], num_labels: int) -> list[onnx.ValueInfoProto]:
    return [
        helper.make_tensor_value_info(names[0], TensorProto.FLOAT, ["batch", num_labels]),
        helper.make_tensor_value_info(names[1], TensorProto.INT64, ["batch"]),
    ]


def load_pieces(
    folder: Path, files: dict, layers_wanted: list[int]
) -> tuple[onnx.ModelProto, list[onnx.ModelProto], dict[int, onnx.ModelProto]]:
    """The export's embeddings, layer and (wanted) exit graphs, read from `folder`."""
    embeddings = onnx.load(folder / files["embeddings"])
    layers = [onnx.load(folder / name) for name in files["layers"]]
    exits = {layer: onnx.load(folder / files["exits"][str(layer)]) for layer in layers_wanted}
    return embeddings, layers, exits


class EarlyExitGraph:
    """ONNX Runtime sessions that run an export with early exits for one policy, one session call per batch.

    A batch of one row runs a graph built for one row (`EarlyExitGraphBuilder.build(single_row=True)`),
    larger batches the general graph; both give the same answers. Each session opens on first use, the
    one for `batch_size` rows at once.

    Args:
        folder: a folder written by `export_onnx`; `files`, `task`, `exit_layers`, `num_labels`, `opset`
            as in its manifest.
        policy: the exit policy baked into the graph (rules that need labels cannot run here).
        num_threads: ONNX Runtime intra-op threads (None = ONNX Runtime's default).
        batch_size: the rows per call expected most: its session is opened here.
    """

    def __init__(
        self,
        folder: Path,
        files: dict,
        task: str,
        exit_layers: list[int],
        num_labels: int,
        opset: int,
        policy: ExitPolicy,
        num_threads: int | None = None,
        batch_size: int = 32,
    ) -> None:
        if policy.needs_labels:
            raise ValueError(f"policy {policy} needs labels: run it layer by layer (graph='layers')")
        self.consulted = policy.exits_consulted(exit_layers)
        rules = rule_graphs(policy, task, exit_layers, num_labels, opset)
        embeddings, layers, exits = load_pieces(folder, files, self.consulted)
        self.builder = EarlyExitGraphBuilder(embeddings, layers, exits, rules, num_labels)
        self.options = ort.SessionOptions()
        self.options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.options.inter_op_num_threads = 1
        # Busy-waiting threads (ONNX Runtime's default) would take the cores from whatever runs between calls.
        self.options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if num_threads is not None:
            self.options.intra_op_num_threads = num_threads
        self.sessions: dict[bool, ort.InferenceSession] = {}  # single_row -> session
        self.input_names = {value.name for value in self.session(single_row=batch_size == 1).get_inputs()}

    def session(self, single_row: bool) -> ort.InferenceSession:
        """The session of the single-row graph or of the general one, opened on first use."""
        if single_row not in self.sessions:
            model = self.builder.build(single_row=single_row)
            self.sessions[single_row] = ort.InferenceSession(
                model.SerializeToString(), self.options, providers=["CPUExecutionProvider"]
            )
        return self.sessions[single_row]

    def run_arrays(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Logits (B, K) and exit layers (B,) for one right-padded int64 batch (B, T), as numpy arrays."""
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self.input_names:
            feed["token_type_ids"] = token_type_ids if token_type_ids is not None else np.zeros_like(input_ids)
        logits, layers = self.session(single_row=input_ids.shape[0] == 1).run(None, feed)
        return logits, layers

    def run(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, K) and exit layers (B,) for one right-padded batch (B, T)."""
        types = token_type_ids.long().numpy() if token_type_ids is not None else None
        logits, layers = self.run_arrays(input_ids.long().numpy(), attention_mask.long().numpy(), types)
        return torch.from_numpy(logits), torch.from_numpy(layers)
