"""Devices and precisions: the engine's device-agnostic path answers as before; CUDA runs where it exists."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, MPNetConfig
from transformers.masking_utils import create_bidirectional_mask

from badge import EarlyExitEngine, ExitPolicy, MultiExitConfig, MultiExitModel
from badge.device import resolve_device, resolve_dtype
from badge.rules import simulate

SMALL = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 80}
BACKBONES = {"bert": BertConfig(num_hidden_layers=4, **SMALL), "mpnet": MPNetConfig(num_hidden_layers=3, **SMALL)}


def make_model(family: str) -> MultiExitModel:
    torch.manual_seed(0)
    model = MultiExitModel(MultiExitConfig(backbone=BACKBONES[family].to_dict(), num_labels=3)).eval()
    with torch.no_grad():  # spread the random exits so that rules fire at different layers
        for head in model.exits.values():
            head.out.weight.normal_(std=2.0)
    return model


def make_inputs(rows: int = 48, width: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    lengths = torch.randint(3, width + 1, (rows,))
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return torch.randint(5, 80, (rows, width)) * mask, mask


@pytest.mark.parametrize("family", sorted(BACKBONES))
def test_masks_prepared_from_host_lengths_equal_the_hugging_face_masks(family: str) -> None:
    model = make_model(family)
    ids, mask = make_inputs(4, 9)
    hidden = model.embed(ids)
    for rows in (mask, torch.ones_like(mask)):  # padded, and no padding at all
        ours = model.attention_inputs(hidden, rows, lengths=rows.sum(dim=1))
        theirs = create_bidirectional_mask(config=model.encoder.config, inputs_embeds=hidden, attention_mask=rows)
        assert (ours.mask is None) == (theirs is None)
        if theirs is not None:
            assert torch.equal(ours.mask, theirs)


@pytest.mark.parametrize("family", sorted(BACKBONES))
@pytest.mark.parametrize("policy", [ExitPolicy("dge", tau=0.05), ExitPolicy("patience", patience=1)], ids=str)
def test_engine_on_the_cpu_device_answers_as_replaying_every_exit(family: str, policy: ExitPolicy) -> None:
    model = make_model(family)
    ids, mask = make_inputs()
    with torch.no_grad():
        exit_logits = torch.stack(model(ids, mask).exit_logits, dim=1)  # (N, E, K)
    positions = simulate(exit_logits, policy, model.config.problem_type, model.exit_layers)  # (N,)
    expected_layers = torch.tensor(model.exit_layers)[positions]
    for device in ("cpu", "auto", torch.device("cpu")):
        out = EarlyExitEngine(model, policy, batch_size=8, device=device).run(ids, mask)
        assert out.exit_layers.tolist() == expected_layers.tolist()
        chosen = exit_logits[torch.arange(len(ids)), positions]
        torch.testing.assert_close(out.logits, chosen, rtol=1e-4, atol=1e-5)
    assert len(set(expected_layers.tolist())) > 1


def test_bfloat16_engine_runs_in_bfloat16_and_stays_close_to_float32() -> None:
    ids, mask = make_inputs()
    full = ExitPolicy("full")
    reference = EarlyExitEngine(make_model("bert"), full, batch_size=8).run(ids, mask)
    engine = EarlyExitEngine(make_model("bert"), full, batch_size=8, dtype="bfloat16")
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    out = engine.run(ids, mask)
    assert out.logits.dtype == torch.float32  # answers come back in float32 whatever the weights
    torch.testing.assert_close(out.probs, reference.probs, atol=0.05, rtol=0)


def test_bad_device_and_dtype_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'tpu' is not one of"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="'float8' is not one of"):
        resolve_dtype("float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", sorted(BACKBONES))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_engine_on_cuda_answers_as_on_the_cpu(family: str, dtype: str) -> None:
    ids, mask = make_inputs()
    policy = ExitPolicy("dge", tau=0.05)
    on_cpu = EarlyExitEngine(make_model(family), policy, batch_size=8).run(ids, mask)
    engine = EarlyExitEngine(make_model(family), policy, batch_size=8, device="cuda", dtype=dtype)
    assert engine.device.type == "cuda"
    on_gpu = engine.run(ids, mask)  # CPU inputs: each batch is copied to the device
    agree = (on_gpu.exit_layers == on_cpu.exit_layers).float().mean().item()
    assert agree >= (1.0 if dtype == "float32" else 0.9)  # half precision may move a borderline row
    same_exit = on_gpu.exit_layers == on_cpu.exit_layers
    torch.testing.assert_close(on_gpu.probs[same_exit], on_cpu.probs[same_exit], atol=2e-2, rtol=0)
    # Inputs already on the GPU give the same answers.
    again = engine.run(ids.cuda(), mask.cuda())
    assert again.exit_layers.tolist() == on_gpu.exit_layers.tolist()
