"""ONNX export and the ONNX Runtime engine: the same exits, labels and probabilities as PyTorch; int8 keeps policy."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as Int8Linear
from transformers import BertConfig

from badge import EarlyExitEngine, ExitPolicy, MultiExitConfig, MultiExitModel
from badge.exit_model import ExitModel
from badge.gate import fit_gate
from badge.onnx_engine import OnnxEarlyExitEngine, OnnxMultiExitModel, export_onnx, load_engine
from badge.pruning import prune_heads
from badge.quantize import quantize_onnx, quantize_torch
from badge.training import DEFAULT_SCHEME, scheme_model_options

POLICY = {"rule": "dge", "tau": 0.05}


def spread_exits(model: MultiExitModel) -> MultiExitModel:
    """Random exits answer alike everywhere; wider weights make rules fire at different layers."""
    with torch.no_grad():
        for head in model.exits.values():
            head.out.weight.normal_(std=2.0)
        for bypass in model.bypasses.values():
            bypass.up.weight.normal_(std=0.5)
    return model.eval()


@pytest.fixture(scope="module")
def model(tiny_encoder) -> MultiExitModel:
    """4 layers, exits after 1, 3 and 4 (layer 2 has none), mean pooling, a stored `dge` policy."""
    torch.manual_seed(0)
    built = MultiExitModel.from_encoder(
        tiny_encoder, label_names=["negative", "neutral", "positive"], exit_layers=[1, 3], pooling="mean"
    )
    built.config.exit_policy = dict(POLICY)
    return spread_exits(built)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "export")


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """40 rows of 3 to 23 tokens, right-padded to 24."""
    torch.manual_seed(1)
    lengths = torch.randint(3, 24, (40,))
    mask = (torch.arange(24)[None, :] < lengths[:, None]).long()
    return torch.randint(5, 30, (40, 24)) * mask, mask


def test_every_exit_of_the_export_gives_the_pytorch_logits(model, exported, inputs) -> None:
    ids, mask = inputs
    with torch.no_grad():
        expected = model(ids, mask).exit_logits
    graphs = OnnxMultiExitModel(exported)
    hidden = graphs.embed(ids)
    attention = graphs.attention_inputs(hidden, mask)
    logits = []
    for layer in range(1, graphs.num_layers + 1):
        hidden = graphs.run_layer(layer, hidden, attention)
        if layer in graphs.exit_layers:
            logits.append(graphs.exit_logits(layer, hidden, mask))
    assert graphs.exit_layers == model.exit_layers == [1, 3, 4]
    for layer, onnx_logits, torch_logits in zip(graphs.exit_layers, logits, expected, strict=True):
        torch.testing.assert_close(onnx_logits, torch_logits, atol=1e-4, rtol=1e-4, msg=f"exit {layer}")


POLICIES = [
    ExitPolicy("dge", tau=0.05),
    ExitPolicy("dge", tau=0.05, patience=2, divergence="kl"),
    ExitPolicy("entropy", tau=0.9),
    ExitPolicy("patience", patience=1),
    ExitPolicy("static:2"),
    None,
]


@pytest.fixture(scope="module")
def onnx_engines(exported):
    """One engine per (policy, graph mode), built once: the one graph exports the rule when it is built."""
    built = {}

    def get(policy: ExitPolicy | None, graph: str) -> OnnxEarlyExitEngine:
        key = (str(policy), graph)
        if key not in built:
            built[key] = OnnxEarlyExitEngine(exported, policy, graph=graph)
        return built[key]

    return get


def gate_policy(model: MultiExitModel, inputs: tuple[torch.Tensor, torch.Tensor]) -> ExitPolicy:
    """The agreement gate, fitted on the model's own exit logits (no labels needed)."""
    with torch.no_grad():
        logits = torch.stack(model(*inputs).exit_logits, dim=1)  # (N, E, K)
    return ExitPolicy("gate", tau=0.5, gate=fit_gate(logits))


@pytest.mark.parametrize("graph", ["one", "layers"])
@pytest.mark.parametrize("policy", [*POLICIES, "gate"], ids=str)
@pytest.mark.parametrize("batch_size", [1, 16])
def test_onnx_engine_answers_as_the_pytorch_engine(model, onnx_engines, inputs, policy, batch_size, graph) -> None:
    ids, mask = inputs
    if policy == "gate":
        policy = gate_policy(model, inputs)
    expected_engine = EarlyExitEngine(model, policy, batch_size=batch_size)
    onnx_engine = onnx_engines(policy, graph)
    onnx_engine.batch_size = batch_size
    onnx_engine.layers_run = onnx_engine.exits_run = 0
    expected = expected_engine.run(ids, mask)
    answered = onnx_engine.run(ids, mask)
    assert answered.labels == expected.labels
    assert torch.equal(answered.exit_layers, expected.exit_layers)
    torch.testing.assert_close(answered.probs, expected.probs, atol=1e-4, rtol=0)
    assert onnx_engine.layers_run == expected_engine.layers_run
    assert onnx_engine.exits_run == expected_engine.exits_run


def test_graph_mode_is_checked_and_oracle_runs_layer_by_layer(exported) -> None:
    with pytest.raises(ValueError, match="graph 'single' is not one of"):
        OnnxEarlyExitEngine(exported, graph="single")
    assert OnnxEarlyExitEngine(exported, ExitPolicy("oracle")).graph == "layers"  # the rule reads labels
    with pytest.raises(ValueError, match="needs labels"):
        OnnxEarlyExitEngine(exported, ExitPolicy("oracle"), graph="one")


def test_export_folder_describes_itself_and_classifies_text(model, exported) -> None:
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["num_layers"] == 4 and manifest["exit_layers"] == [1, 3, 4]
    assert manifest["labels"] == ["negative", "neutral", "positive"]
    assert manifest["exit_policy"] == POLICY and manifest["pooling"] == "mean" and manifest["quantized"] is None
    for name in [manifest["files"]["embeddings"], *manifest["files"]["layers"], *manifest["files"]["exits"].values()]:
        onnx.checker.check_model(str(exported / name))
    texts = ["a good film", "the plot was dull and the acting was very poor", "fun"]
    expected = EarlyExitEngine(model).classify(texts)
    answered = load_engine(exported).classify(texts)
    assert answered.labels == expected.labels
    assert torch.equal(answered.exit_layers, expected.exit_layers)
    assert isinstance(OnnxMultiExitModel(exported), ExitModel)  # what the engine drives, as the PyTorch model is


def test_load_engine_picks_the_runtime_from_the_folder(model, exported, tmp_path) -> None:
    model.save_pretrained(tmp_path / "saved")
    assert type(load_engine(tmp_path / "saved")) is EarlyExitEngine
    assert isinstance(load_engine(exported, engine="onnx", batch_size=4), OnnxEarlyExitEngine)
    with pytest.raises(ValueError, match="is not an ONNX export"):
        load_engine(tmp_path / "saved", engine="onnx")
    with pytest.raises(ValueError, match="is an ONNX export"):
        load_engine(exported, engine="torch")
    with pytest.raises(ValueError, match="'tensorrt' is not one of"):
        load_engine(exported, engine="tensorrt")


def test_pruned_int8_export_keeps_the_exit_policy_and_stays_close(inputs, tmp_path) -> None:
    torch.manual_seed(0)
    backbone = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=80
    )
    model = MultiExitModel(MultiExitConfig(backbone=backbone.to_dict(), num_labels=2, exit_policy=POLICY))
    prune_heads(spread_exits(model), 0.25)
    folder = export_onnx(model, tmp_path / "int8", quantize="int8")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["quantized"] == "int8" and manifest["heads_kept"] == model.config.heads_kept
    layer_ops = {node.op_type for node in onnx.load(str(folder / "layer_1.onnx")).graph.node}
    assert "MatMulInteger" in layer_ops  # int8 weights, activations quantised per batch
    engine = load_engine(folder, batch_size=1)
    assert engine.policy == ExitPolicy(**POLICY) and engine.graph == "one"
    ids, mask = inputs
    answered = engine.run(ids, mask)
    expected = EarlyExitEngine(model).run(ids, mask)
    assert (torch.tensor(answered.labels) == torch.tensor(expected.labels)).float().mean() >= 0.9
    assert (answered.probs - expected.probs).abs().max() < 0.05
    # Activations are quantised per call over the whole batch: row by row, the one graph and the
    # pieces run one by one see the same tensors, so they answer alike.
    by_pieces = OnnxEarlyExitEngine(folder, batch_size=1, graph="layers").run(ids, mask)
    assert answered.labels == by_pieces.labels
    assert torch.equal(answered.exit_layers, by_pieces.exit_layers)
    torch.testing.assert_close(answered.probs, by_pieces.probs, atol=1e-4, rtol=0)


def test_quantize_torch_makes_an_int8_copy_that_early_exits(model, inputs) -> None:
    quantized = quantize_torch(model)
    encoder_linears = [
        module
        for name, module in quantized.named_modules()
        if name.startswith("encoder.") and isinstance(module, (nn.Linear, Int8Linear))
    ]
    assert len(encoder_linears) == 4 * 6 and all(isinstance(module, Int8Linear) for module in encoder_linears)
    assert isinstance(quantized.exits["4"].out, nn.Linear)  # exits stay float
    assert isinstance(model.encoder.encoder.layer[0].attention.self.query, nn.Linear)  # the original is untouched
    ids, mask = inputs
    answered = EarlyExitEngine(quantized, batch_size=16).run(ids, mask)
    expected = EarlyExitEngine(model, batch_size=16).run(ids, mask)
    assert (torch.tensor(answered.labels) == torch.tensor(expected.labels)).float().mean() >= 0.9
    assert (answered.probs - expected.probs).abs().max() < 0.05


def test_int8_mixed_keeps_only_each_ffn_output_projection_float(model, inputs) -> None:
    quantized = quantize_torch(model, "int8-mixed")
    linears = {
        name: module
        for name, module in quantized.named_modules()
        if name.startswith("encoder.") and isinstance(module, (nn.Linear, Int8Linear))
    }
    kept = sorted(name for name, module in linears.items() if not isinstance(module, Int8Linear))
    assert kept == [f"encoder.encoder.layer.{i}.output.dense" for i in range(4)]  # the FFN down-projections
    assert len(linears) - len(kept) == 5 * 4
    ids, mask = inputs
    answered = EarlyExitEngine(quantized, batch_size=16).run(ids, mask)
    expected = EarlyExitEngine(model, batch_size=16).run(ids, mask)
    assert (answered.probs - expected.probs).abs().max() < 0.05


def outlier_model(tiny_encoder) -> MultiExitModel:
    """A tiny model with one FFN activation channel per layer 60 times larger than the rest (and its output weights
    60 times smaller, so the float model is unchanged in kind): the outliers real encoders have there."""
    torch.manual_seed(3)
    built = MultiExitModel.from_encoder(tiny_encoder, label_names=["a", "b", "c"], pooling="mean")
    with torch.no_grad():
        for layer in built.encoder.encoder.layer:
            layer.intermediate.dense.weight[0] *= 60
            layer.intermediate.dense.bias[0] = 60.0
            layer.output.dense.weight[:, 0] /= 60
    return spread_exits(built)


def test_int8_mixed_survives_ffn_outliers_that_int8_rounds_away(tiny_encoder, inputs) -> None:
    built = outlier_model(tiny_encoder)
    ids, mask = inputs
    with torch.no_grad():
        reference = built(input_ids=ids, attention_mask=mask).logits

        def error(network: MultiExitModel) -> float:
            return float((network(input_ids=ids, attention_mask=mask).logits - reference).abs().mean())

        full, mixed = error(quantize_torch(built, "int8")), error(quantize_torch(built, "int8-mixed"))
    assert mixed < full / 3, (mixed, full)


def test_onnx_int8_mixed_keeps_the_same_layers_float(exported, tmp_path) -> None:
    """A layer graph quantised as `badge export --quantize` does: only the FFN output projection stays float."""
    for mode, float_matmuls in (("int8", 0), ("int8-mixed", 1)):
        quantize_onnx(exported / "layer_1.onnx", tmp_path / f"{mode}.onnx", mode)
        graph = onnx.load(str(tmp_path / f"{mode}.onnx")).graph
        ops = [node.op_type for node in graph.node]
        assert ops.count("MatMulInteger") == 6 - float_matmuls
        weights = {tensor.name: tuple(tensor.dims) for tensor in graph.initializer}
        float_weights = [weights[n.input[1]] for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
        assert float_weights == [(64, 32)] * float_matmuls  # intermediate -> hidden


def test_unknown_quantisation_is_a_clear_error(model, tmp_path) -> None:
    with pytest.raises(ValueError, match="quantize 'int4' is not one of"):
        export_onnx(model, tmp_path / "x", quantize="int4")
    with pytest.raises(ValueError, match="quantize 'int8-all' is not one of"):
        quantize_torch(model, "int8-all")


@pytest.mark.parametrize("policy", [ExitPolicy("entropy", tau=0.9), ExitPolicy("dge", tau=0.05)], ids=str)
def test_a_single_row_runs_its_own_lean_graph_with_the_same_answers(exported, inputs, policy) -> None:
    engine = OnnxEarlyExitEngine(exported, policy, batch_size=1, graph="one")
    graph = engine.early_exit_graph
    ids, mask = inputs
    by_one = [graph.run(ids[row : row + 1], mask[row : row + 1]) for row in range(len(ids))]
    assert list(graph.sessions) == [True]  # a batch of one row never opened the general graph
    ops = {node.op_type for node in graph.builder.build(single_row=True).graph.node}
    assert "If" in ops and not ops & {"ScatterND", "Compress"}  # nothing to scatter or keep with one row
    general = graph.session(single_row=False)
    for row, (logits, layers) in enumerate(by_one):
        feed = {"input_ids": ids[row : row + 1].numpy(), "attention_mask": mask[row : row + 1].numpy()}
        feed["token_type_ids"] = torch.zeros_like(ids[row : row + 1]).numpy()
        expected_logits, expected_layers = general.run(None, {k: v for k, v in feed.items() if k in graph.input_names})
        assert layers.tolist() == expected_layers.tolist()
        torch.testing.assert_close(logits, torch.from_numpy(expected_logits), atol=1e-5, rtol=0)
    assert len({layers.item() for _, layers in by_one}) > 1  # the rows leave at different exits


@pytest.mark.parametrize(("graph", "attention_pooling"), [("one", False), ("layers", False), ("one", True)])
def test_the_default_v2_model_exports_and_answers_as_the_pytorch_engine(
    tiny_encoder, inputs, tmp_path, graph, attention_pooling
) -> None:
    """The default scheme's bypass adapter runs on every token before pooling (and, with attention pooling, each
    exit weighs the tokens itself): the export must carry both."""
    torch.manual_seed(0)
    options = scheme_model_options(DEFAULT_SCHEME)
    assert options["bypass_input"] == "tokens"
    v2 = spread_exits(
        MultiExitModel.from_encoder(
            tiny_encoder,
            label_names=["negative", "neutral", "positive"],
            exit_layers=[1, 3],
            attention_pooling=attention_pooling,
            **options,
        )
    )
    for pooler in v2.poolers.values():
        torch.nn.init.normal_(pooler.score.weight)
    policy = ExitPolicy(**POLICY)
    exported = export_onnx(v2, tmp_path / "export")
    onnx_engine = OnnxEarlyExitEngine(exported, policy, batch_size=16, graph=graph)
    expected = EarlyExitEngine(v2, policy, batch_size=16).run(*inputs)
    answered = onnx_engine.run(*inputs)
    assert answered.labels == expected.labels
    assert torch.equal(answered.exit_layers, expected.exit_layers)
    assert len(set(expected.exit_layers.tolist())) > 1, "the rule must send rows to different exits"
    torch.testing.assert_close(answered.probs, expected.probs, atol=1e-4, rtol=0)
