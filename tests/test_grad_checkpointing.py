"""Gradient checkpointing (``train.gradient_checkpointing``): same numbers, activations really recomputed.

    .venv/bin/pytest tests/test_grad_checkpointing.py -q

Checkpointing must not change what is computed: one step on the ``micro`` model gives the same loss and the
same LoRA gradients with and without it, on the fp32 and on the 4-bit base. That it is active is seen from the
decoder's MLPs: under checkpointing a layer's forward runs again in the backward pass. One CPU thread.
"""
import numpy as np
import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaMLP

from refinevla import train
from refinevla.config import ConfigError, resolve
from refinevla.model import ModelConfig, add_lora, build_tiny_vla, load_base
from refinevla.train import TrainConfig, joint_loss, read_metrics, to_batch

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base_dir(tok, tmp_path_factory):
    """A random micro model + tokenizer saved as a base folder (what pretrain_base writes)."""
    out = tmp_path_factory.mktemp("base")
    build_tiny_vla("micro", tok.vocab_size, tok.image_id, tok.pad_id, seed=1).save_pretrained(
        out, safe_serialization=True)
    tok.save(out)
    return out


@pytest.fixture
def mlp_calls(monkeypatch):
    """Counts GemmaMLP.forward calls per module (forward hooks do not fire in the recompute; forward does)."""
    calls = {}
    original = GemmaMLP.forward

    def counting(self, *args, **kwargs):
        calls[id(self)] = calls.get(id(self), 0) + 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GemmaMLP, "forward", counting)
    return calls


def _one_step(base_dir, data, quantization, checkpointing, calls):
    model = load_base(base_dir, quantization)
    torch.manual_seed(0)
    model = add_lora(model, ModelConfig(size="micro", quantization=quantization, tune_top_k_layers=1),
                     gradient_checkpointing=checkpointing)
    with torch.no_grad():  # lora_B starts at zero, which would leave lora_A without gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.train()
    layers = model.get_base_model().model.language_model.layers
    batch = to_batch(data, np.arange(8), 32, "cpu")
    part = batch.pop("part")
    calls.clear()
    loss = joint_loss(model(**batch, use_cache=False).logits, batch["input_ids"], part, 0.5)[0]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    per_layer = [calls.get(id(layer.mlp), 0) for layer in layers]
    base = model.get_base_model()
    on = base.is_activation_checkpointing if hasattr(base, "is_activation_checkpointing") \
        else base.is_gradient_checkpointing
    return loss.item(), grads, per_layer, on


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_same_loss_and_lora_gradients_and_the_top_layer_is_recomputed(base_dir, data, mlp_calls, quantization):
    loss0, grads0, calls0, on0 = _one_step(base_dir, data, quantization, False, mlp_calls)
    loss1, grads1, calls1, on1 = _one_step(base_dir, data, quantization, True, mlp_calls)
    assert not on0 and on1
    assert calls0 == [1, 1]
    # the LoRA layer (top) runs again in backward; the frozen layer below has nothing to back-propagate (its input
    # needs no gradient: the input-embedding hook of reentrant checkpointing is not installed) and is not re-run
    assert calls1 == [1, 2]
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    assert grads0.keys() == grads1.keys() and any("lora_A" in n for n in grads0) and any("lora_B" in n for n in grads0)
    assert all(g.abs().sum() > 0 for g in grads0.values())  # non-trivial gradients are compared
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-7, msg=name)


def _run_stage(stage, ds, base_dir, checkpointing, out):
    cfg = TrainConfig(arm="pretrain" if stage == "pretrain" else "refinevla", use_rationale=stage != "pretrain",
                      steps=2, batch_size=8, lr=1e-2, warmup_steps=0, log_every=1, checkpoint_every=1000,
                      threads=1, gradient_checkpointing=checkpointing, cache_frozen=False)
    if stage == "pretrain":
        model_dir = train.pretrain_base(ds, ModelConfig(size="micro"), cfg, out)
    else:  # 4-bit base, LoRA on the top layer, trained policy-head rows (untied: nothing below the top layer trains)
        model_dir = train.finetune(ds, base_dir, ModelConfig(size="micro", tune_top_k_layers=1), cfg, out)
    from safetensors.torch import load_file

    weights = load_file(str(next(model_dir.glob("*.safetensors"))))
    return read_metrics(out)[["loss", "l_action", "l_reason"]].to_numpy(), weights


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_train_config_switches_it_on_and_training_is_unchanged(ds, base_dir, mlp_calls, tmp_path, stage):
    metrics0, weights0 = _run_stage(stage, ds, base_dir, False, tmp_path / "off")
    calls_off = sum(mlp_calls.values())
    mlp_calls.clear()
    metrics1, weights1 = _run_stage(stage, ds, base_dir, True, tmp_path / "on")
    calls_on = sum(mlp_calls.values())
    assert calls_off == 2 * 2  # 2 steps x 2 decoder layers
    if stage == "pretrain":
        assert calls_on == 2 * calls_off  # every layer back-propagates here, so every layer is recomputed
    else:
        assert calls_on == calls_off + 2  # only the top layer trains: only it is recomputed (2 steps)
    np.testing.assert_allclose(metrics1, metrics0, rtol=1e-5)
    assert weights0.keys() == weights1.keys()
    for name in weights0:
        torch.testing.assert_close(weights1[name], weights0[name], rtol=1e-4, atol=1e-6, msg=name)


def test_config_key_and_alias():
    cfg = resolve("smoke")
    assert not any(getattr(cfg, s).gradient_checkpointing for s in ("pretrain", "baseline", "refinevla"))
    cfg = resolve("smoke", gradient_checkpointing=True)
    assert all(getattr(cfg, s).gradient_checkpointing for s in ("pretrain", "baseline", "refinevla"))
    cfg = resolve("smoke", {"pretrain.gradient_checkpointing": "true"})  # from the command line: a string
    assert cfg.pretrain.gradient_checkpointing is True and cfg.baseline.gradient_checkpointing is False
    with pytest.raises(ConfigError, match="refinevla.gradient_checkpointing"):  # one compared arm alone is refused
        resolve("smoke", {"refinevla.gradient_checkpointing": "true"})
