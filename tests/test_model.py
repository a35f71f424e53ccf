"""The tiny PaliGemma: size presets, the prefix-LM mask, LoRA on the top K layers, the 4-bit base.

    .venv/bin/pytest tests/test_model.py -q
"""
import numpy as np
import pytest
import torch

from conftest import synthetic_dataset
from refinevla import train
from refinevla.model import (SIZES, ModelConfig, add_lora, build_tiny_vla, load_base, num_image_tokens,
                             parameter_counts, preprocess_images)
from refinevla.tokens import VLATokenizer
from refinevla.train import TrainConfig, encode_dataset, train_loop

torch.set_num_threads(1)
N_IMAGE = 16  # micro: 32 px / patch 8


@pytest.fixture(scope="module")
def random_model(tok):
    return build_tiny_vla("micro", tok.vocab_size, tok.image_id, tok.pad_id, seed=1).eval()


@pytest.fixture(scope="module")
def base_dir(random_model, tmp_path_factory):
    """The random micro model saved as a base folder (safetensors), as pretrain_base writes it."""
    out = tmp_path_factory.mktemp("base")
    random_model.save_pretrained(out, safe_serialization=True)
    return out


# ----------------------------------------------------------------------------------------- presets
def _count_on_meta(size, vocab=533):
    with torch.device("meta"):
        model = build_tiny_vla(size, vocab, image_token_id=5)
    return sum(p.numel() for p in model.parameters())


def test_size_presets(random_model):
    assert num_image_tokens(random_model) == N_IMAGE
    assert parameter_counts(random_model)["total"] < 1_000_000
    assert random_model.config.text_config.num_hidden_layers == SIZES["micro"]["text_layers"] == 2
    assert 1_000_000 < _count_on_meta("tiny") < 5_000_000
    assert _count_on_meta("bench50m") >= 50_000_000  # the 4-bit memory benchmark's model


def test_bad_model_config_is_a_clear_error(tok):
    with pytest.raises(ValueError, match="size"):
        ModelConfig(size="huge")
    with pytest.raises(ValueError, match="huge"):
        build_tiny_vla("huge", tok.vocab_size, tok.image_id)
    with pytest.raises(ValueError, match="tune_top_k_layers"):
        ModelConfig(size="micro", tune_top_k_layers=0)
    with pytest.raises(ValueError, match="quantization"):
        ModelConfig(size="micro", quantization="3bit")


def test_preprocess_keeps_orientation_and_channels():
    img = np.zeros((64, 64, 3), np.uint8)
    img[:8, :, 0] = 255  # a red band along the top rows
    x = preprocess_images(img, 32)
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 - 1e-6 and x.max() <= 1 + 1e-6
    assert x[0, 0, :3].mean() > 0.9 and x[0, 0, -3:].mean() < -0.9  # top stays top
    assert x[0, 1:].max() < -0.9  # red stays in channel 0
    batch = preprocess_images(np.stack([img, 255 - img]), 64)
    assert batch.shape == (2, 3, 64, 64)
    torch.testing.assert_close(batch[0], torch.as_tensor(img).permute(2, 0, 1).float() / 127.5 - 1)


def test_saved_base_reloads_identically(random_model, base_dir, data):
    again = load_base(base_dir, "none").eval()
    batch = train.to_batch(data, np.arange(3), 32, "cpu")
    batch.pop("part")
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, random_model(**batch).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------- prefix-LM mask
def _logits(model, data, row, input_ids=None, token_type=None):
    length = int(data["attention_mask"][row].sum())
    batch = train.to_batch(data, np.array([row]), 32, "cpu")
    if input_ids is not None:
        batch["input_ids"] = torch.as_tensor(input_ids[None, :length])
    if token_type is not None:
        batch["token_type_ids"] = torch.as_tensor(token_type[None, :length])
    batch.pop("part")
    with torch.no_grad():
        return model(**batch).logits[0]


@pytest.mark.parametrize("which", ["last action token", "a rationale token"])
def test_later_target_tokens_do_not_leak_into_earlier_logits(random_model, data, tok, which):
    """The costliest known bug: with token_type_ids as built, target tokens are causal (zeros there let them see the future)."""
    row = 0
    ids = data["input_ids"][row].copy()
    first = int(np.argmax(data["token_type_ids"][row]))
    length = int(data["attention_mask"][row].sum())
    j = length - 1 if which == "last action token" else first + 3
    changed = ids.copy()
    changed[j] = tok.action_ids[0] if changed[j] != tok.action_ids[0] else tok.action_ids[1]

    ref = _logits(random_model, data, row)
    out = _logits(random_model, data, row, input_ids=changed)
    torch.testing.assert_close(out[:j], ref[:j], rtol=0, atol=1e-5)  # prefix and earlier targets unchanged
    assert (out[j:] - ref[j:]).abs().max() > 1e-3  # the change itself is visible from j on

    # the bug this guards against: all-zero token_type_ids make the targets one bidirectional prefix
    zeros = np.zeros_like(data["token_type_ids"][row])
    ref0 = _logits(random_model, data, row, token_type=zeros)
    out0 = _logits(random_model, data, row, input_ids=changed, token_type=zeros)
    assert (out0[first:j] - ref0[first:j]).abs().max() > 1e-3


def test_prefix_is_bidirectional(random_model, data, tok):
    """Image and prompt tokens see each other both ways (PaliGemma's prefix), so a late prompt token changes
    the representation of an early one."""
    row = 0
    first = int(np.argmax(data["token_type_ids"][row]))
    changed = data["input_ids"][row].copy()
    changed[first - 2] = tok.state_ids[0] if changed[first - 2] != tok.state_ids[0] else tok.state_ids[1]
    ref, out = _logits(random_model, data, row), _logits(random_model, data, row, input_ids=changed)
    assert (out[N_IMAGE:first - 2] - ref[N_IMAGE:first - 2]).abs().max() > 1e-4


# ------------------------------------------------------------------------------ LoRA placement / 4-bit
def _lora_model(base_dir, k=1, quantization="none", seed=0):
    model = load_base(base_dir, quantization)
    torch.manual_seed(seed)
    return add_lora(model, ModelConfig(size="micro", quantization=quantization, tune_top_k_layers=k))


@pytest.mark.parametrize("k,layers", [(1, [1]), (2, [0, 1])])
def test_lora_only_on_the_top_k_layers(base_dir, k, layers):
    from refinevla.model import lora_layer_indices, parameter_counts

    model = _lora_model(base_dir, k)
    assert lora_layer_indices(model) == layers
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if "lora_" in n and ("vision_tower" in n or "multi_modal_projector" in n)]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # every target projection of every chosen layer is adapted, nothing else
    per_layer = {i: {n.split(f"layers.{i}.")[1].split(".lora_")[0] for n in trainable if f"layers.{i}." in n}
                 for i in layers}
    for i in layers:
        assert {p.split(".")[-1] for p in per_layer[i]} == set(ModelConfig().lora_targets)
    counts = parameter_counts(model)
    assert counts["trainable"] == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def test_too_many_layers_is_a_clear_error(base_dir):
    with pytest.raises(ValueError, match="tune_top_k_layers=3.*2 decoder layers"):  # the config refuses it
        _lora_model(base_dir, 3)
    cfg = ModelConfig(size="micro", checkpoint=str(base_dir))  # a checkpoint: only the model knows its depth
    cfg.tune_top_k_layers = 3
    with pytest.raises(ValueError, match="tune_top_k_layers=3.*2 layers"):
        add_lora(load_base(base_dir), cfg)


def test_4bit_base_holds_linear4bit_and_only_lora_weights_change(base_dir, data, tmp_path):
    import bitsandbytes as bnb

    model = _lora_model(base_dir, 1, "4bit")
    q4 = [n for n, mod in model.named_modules() if isinstance(mod, bnb.nn.Linear4bit)]
    assert any("language_model.layers.0.mlp" in n for n in q4) and any("layers.1.self_attn.q_proj" in n for n in q4)
    assert any(p.dtype == torch.uint8 for p in model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_loop(model, data, TrainConfig(steps=2, batch_size=4, lr=1e-2, warmup_steps=0, checkpoint_every=1000,
                                        log_every=1, threads=1), tmp_path)
    after = model.state_dict()
    assert set(after) == set(before)
    lora = [k for k in before if "lora_" in k]
    frozen = [k for k in before if "lora_" not in k]
    assert lora and frozen
    assert all(not torch.equal(before[k], after[k]) for k in lora if "lora_B" in k)
    assert all(torch.equal(before[k], after[k]) for k in frozen), \
        [k for k in frozen if not torch.equal(before[k], after[k])][:5]



def test_8bit_base_holds_linear8bitlt_and_trains_on_cpu(base_dir, data, tmp_path):
    """quantization: 8bit (bitsandbytes LLM.int8) is the same path as 4-bit: quantised frozen base, LoRA trains."""
    import bitsandbytes as bnb

    model = _lora_model(base_dir, 1, "8bit")
    q8 = [n for n, mod in model.named_modules() if isinstance(mod, bnb.nn.Linear8bitLt)]
    assert any("language_model.layers.0.mlp" in n for n in q8) and any(p.dtype == torch.int8 for p in model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_B" in k}
    train_loop(model, data, TrainConfig(steps=2, batch_size=4, lr=1e-2, warmup_steps=0, checkpoint_every=1000,
                                        log_every=1, threads=1), tmp_path)
    metrics = train.read_metrics(tmp_path)
    assert len(metrics) == 2 and np.isfinite(metrics["loss"]).all()
    assert before and all(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ------------------------------------------------------------------------ untied head / saved fine-tunes
def _head_ids(data, tok):
    return np.unique(np.concatenate([data["input_ids"][data["part"] != train.PREFIX], tok.action_ids,
                                     [tok.marker_id]])).tolist()


def _perturbed(model):
    """As after training: non-zero LoRA B, head rows away from their initial values."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "trainable_tokens" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_add_lora_trains_head_rows_on_an_untied_head(base_dir, data, tok):
    model = load_base(base_dir, "none")
    assert model.lm_head.weight is model.get_input_embeddings().weight  # PaliGemma ties them
    model = add_lora(model, ModelConfig(size="micro", tune_top_k_layers=1), trainable_token_ids=_head_ids(data, tok))
    base = model.get_base_model()
    assert base.lm_head.weight is not base.get_input_embeddings().weight
    torch.testing.assert_close(base.lm_head.weight, base.get_input_embeddings().weight, rtol=0, atol=0)  # a copy
    assert not base.config.tie_word_embeddings and not base.config.text_config.tie_word_embeddings
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert trainable == ["base_model.model.lm_head.token_adapter.trainable_tokens_delta.default"]
    assert not any(p.requires_grad for p in base.get_input_embeddings().parameters())
    assert dict(model.named_parameters())[trainable[0]].shape == (len(_head_ids(data, tok)), 64)


def test_resize_embeddings_is_deterministic(base_dir, tok):
    from refinevla.model import resize_embeddings

    grown = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = load_base(base_dir, "none")
        old = model.get_input_embeddings().weight.detach().clone()
        assert resize_embeddings(model, tok.vocab_size + 4) and not resize_embeddings(model, tok.vocab_size)
        w = model.get_input_embeddings().weight.detach()
        assert w.shape[0] == tok.vocab_size + 4 and model.lm_head.weight is model.get_input_embeddings().weight
        torch.testing.assert_close(w[:tok.vocab_size], old, rtol=0, atol=0)
        torch.testing.assert_close(w[tok.vocab_size:], old.mean(0).expand(4, -1), rtol=0, atol=1e-7)
        grown.append(w.clone())
    torch.testing.assert_close(grown[0], grown[1], rtol=0, atol=0)


@pytest.fixture(scope="module")
def small_base_dir(tok, tmp_path_factory):
    """A base whose vocabulary is 3 tokens short of the tokenizer's: the fine-tune grows it (real checkpoints
    get the ACTION: marker added)."""
    out = tmp_path_factory.mktemp("small-base")
    build_tiny_vla("micro", tok.vocab_size - 3, tok.image_id, tok.pad_id, seed=2).save_pretrained(
        out, safe_serialization=True)
    return out


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_saved_finetune_loads_back_with_the_same_logits(small_base_dir, data, tok, tmp_path, quantization):
    """What train.finetune saves (adapter + tokenizer) and load_finetuned rebuilds: same logits (measured: equal)."""
    from refinevla.model import load_finetuned, resize_embeddings

    model = load_base(small_base_dir, quantization)
    assert resize_embeddings(model, tok.vocab_size)
    model = _perturbed(add_lora(model, ModelConfig(size="micro", quantization=quantization, tune_top_k_layers=1),
                                trainable_token_ids=_head_ids(data, tok)))
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save(tmp_path)
    again = load_finetuned(small_base_dir, tmp_path, quantization, "eager")
    base = again.get_base_model()
    assert base.get_input_embeddings().weight.shape[0] == tok.vocab_size
    assert base.lm_head.weight is not base.get_input_embeddings().weight
    batch = train.to_batch(data, np.arange(6), 32, "cpu")
    batch.pop("part")
    with torch.no_grad():
        want = model(**batch).logits
        torch.testing.assert_close(again(**batch).logits, want, rtol=0, atol=1e-6)
        # the trained head rows matter: without the adapter the logits differ
        with again.disable_adapter():
            assert (again(**batch).logits - want).abs().max() > 1e-2


def test_adapter_trained_on_the_tied_head_still_loads(base_dir, data, tok, tmp_path):
    """Adapters saved before the untying (trainable tokens on the tied input embeddings) load as trained."""
    from peft import LoraConfig, get_peft_model

    from refinevla.model import load_finetuned

    model = load_base(base_dir, "none")
    torch.manual_seed(0)
    model = _perturbed(get_peft_model(model, LoraConfig(
        r=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers",
        exclude_modules=r".*(vision_tower|multi_modal_projector).*",
        trainable_token_indices={"embed_tokens": _head_ids(data, tok)})))
    model.save_pretrained(tmp_path, safe_serialization=True)
    again = load_finetuned(base_dir, tmp_path, "none", "eager", vocab_size=tok.vocab_size)
    batch = train.to_batch(data, np.arange(4), 32, "cpu")
    batch.pop("part")
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits, rtol=0, atol=1e-6)


def test_eval_forward_does_not_switch_4bit_layers_to_a_kernel_without_backward(base_dir, data):
    """bitsandbytes would repack the 4-bit weights on an eval-mode forward without gradients (CPUs with
    AVX512-BF16) and then back-propagate wrongly through them; load_base keeps the training kernel."""
    import bitsandbytes as bnb

    def grads(model):
        model.train()
        batch = train.to_batch(data, np.arange(6), 32, "cpu")
        part = batch.pop("part")
        loss = train.joint_loss(model(**batch, use_cache=False).logits, batch["input_ids"], part, 0.5)[0]
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.autograd.grad(loss, params)

    fresh, evaluated = (_perturbed(_lora_model(base_dir, 2, "4bit")) for _ in range(2))
    evaluated.eval()
    with torch.no_grad():  # e.g. train.heldout_loss in the middle of training
        batch = train.to_batch(data, np.arange(6), 32, "cpu")
        batch.pop("part")
        evaluated(**batch)
    layers = [m for m in evaluated.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    for a, b in zip(grads(fresh), grads(evaluated)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
