"""The frozen-part cache (refinevla.frozen): the cached path computes what the full forward computes.

    .venv/bin/pytest tests/test_frozen.py -q

Under selective transfer the hidden states entering the first trainable decoder layer never change, so a
training step may start from them (``upper_logits``) instead of re-running the vision tower and the lower layers.
Checked on the ``micro`` model (2 decoder layers), fp32 and 4-bit (nf4) bases, K = 1 (cut at layer 1) and
K = all (cut at 0: the cache is the decoder input embeddings), with rows with and without rationale tokens and of
different lengths (right padding): the logits at every position (padding included), the three joint losses and
the gradient of every trainable parameter (LoRA and the trained head rows) agree within TOL (on this machine
they are bitwise equal); after training from the cache the cache is still exact. The head is untied from the
input embeddings (``model.add_lora``): an optimizer step changes the trained head rows and leaves the input
embeddings, and so the cached states, unchanged. One CPU thread; a few seconds.
"""
import numpy as np
import pytest
import torch

from refinevla import frozen, train
from refinevla.model import ModelConfig, add_lora, build_tiny_vla, load_base
from refinevla.train import PREFIX, REASON, encode_dataset, joint_loss, to_batch

torch.set_num_threads(1)
N_IMAGE, SIZE = 16, 32  # micro: 32 px / patch 8
TOL = dict(rtol=1e-5, atol=1e-6)  # cached vs full forward (measured: 0, bitwise equal, fp32 and nf4)
ROWS = np.array([0, 1, 2, 4, 5, 9])  # mixed data: rows 0 and 9 without rationale, the others of 4 lengths


@pytest.fixture(scope="module")
def base_dir(tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    build_tiny_vla("micro", tok.vocab_size, tok.image_id, tok.pad_id, seed=1).save_pretrained(
        out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def mixed(ds, tok):
    """Every third row without rationale (baseline layout), the others with rationales of different lengths."""
    def cut(row, i):
        words = row["rationale_text"].split()
        return {"rationale_text": "" if i % 3 == 0 else " ".join(words[:3 + i % 9])}

    return encode_dataset(ds.map(cut, with_indices=True), tok, N_IMAGE, use_rationale=True)


@pytest.fixture(scope="module")
def baseline(ds, tok):
    return encode_dataset(ds.remove_columns(["rationale_text"]), tok, N_IMAGE, use_rationale=False)


def _head_ids(data, tok):
    return np.unique(np.concatenate([data["input_ids"][data["part"] != PREFIX], tok.action_ids, [tok.marker_id]]))


def _model(base_dir, data, tok, quantization="none", k=1, seed=0):
    """LoRA on the top k layers + trained head rows, as train.finetune builds it, with non-zero LoRA B and
    perturbed head rows (at their initial values some gradients would be zero and prove little)."""
    model = load_base(base_dir, quantization)
    torch.manual_seed(seed)
    model = add_lora(model, ModelConfig(size="micro", quantization=quantization, tune_top_k_layers=k),
                     trainable_token_ids=_head_ids(data, tok).tolist())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "trainable_tokens" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.train()


def _repacked_4bit_layers(model) -> int:
    """bitsandbytes' CPU 4-bit layers repack their weights (another kernel, other numbers) on their first
    eval-mode call without gradients, on CPUs with AVX512-BF16; building the cache must not trigger it."""
    import bitsandbytes as bnb

    return sum(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
               for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


def _trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _full(model, data, idx, lam=0.5):
    batch = to_batch(data, idx, SIZE, "cpu")
    part = batch.pop("part")
    logits = model(**batch, use_cache=False).logits
    return logits, joint_loss(logits, batch["input_ids"], part, lam)


def _cached(model, data, cache, idx, lam=0.5):
    batch = frozen.cached_batch(data, cache, idx, "cpu")
    logits = frozen.upper_logits(model, batch.pop("hidden_states"), batch)
    return logits, joint_loss(logits, batch["input_ids"], batch["part"], lam)


def _grads(model, loss):
    names, params = zip(*_trainable(model))
    return dict(zip(names, torch.autograd.grad(loss, params)))


# --------------------------------------------------------------------------------------------- the cut
def test_cut_is_the_lowest_trainable_layer_and_nothing_below_may_train(base_dir, mixed, tok):
    assert frozen.cut_layer(_model(base_dir, mixed, tok, k=1)) == 1
    assert frozen.cut_layer(_model(base_dir, mixed, tok, k=2)) == 0
    model = _model(base_dir, mixed, tok, k=1)
    model.get_input_embeddings().weight.requires_grad_(True)  # what the tied head used to imply
    with pytest.raises(ValueError, match="below the decoder layers"):
        frozen.cut_layer(model)
    model = _model(base_dir, mixed, tok, k=1)
    next(model.get_base_model().model.vision_tower.parameters()).requires_grad_(True)
    with pytest.raises(ValueError, match="vision_tower"):
        frozen.cut_layer(model)


# -------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("quantization", ["none", "4bit"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("which", ["mixed", "baseline"])
def test_cached_path_equals_the_full_forward(base_dir, tok, mixed, baseline, quantization, k, which):
    data, lam = (mixed, 0.5) if which == "mixed" else (baseline, 0.0)
    lengths = data["attention_mask"][ROWS].sum(1)
    has_reason = (data["part"][ROWS] == REASON).any(1)
    if which == "mixed":  # the batch is right-padded and mixes both layouts
        assert len(set(lengths)) >= 3 and has_reason.any() and not has_reason.all()
    else:
        assert not has_reason.any()
    model = _model(base_dir, data, tok, quantization, k)
    assert frozen.cut_layer(model) == 2 - k
    logits, losses = _full(model, data, ROWS, lam)  # the reference first: what an uncached run computes
    want = _grads(model, losses[0])
    cache = frozen.build_cache(model, data, batch_size=4)
    assert cache.shape == (*data["input_ids"].shape, 64) and cache.dtype == np.float32
    assert _repacked_4bit_layers(model) == 0

    got_logits, got_losses = _cached(model, data, cache, ROWS, lam)
    assert got_logits.shape == logits.shape == (len(ROWS), lengths.max(), tok.vocab_size)
    torch.testing.assert_close(got_logits, logits, **TOL)  # every position, padding included
    for a, b in zip(got_losses, losses):
        torch.testing.assert_close(a, b, **TOL)
    got = _grads(model, got_losses[0])
    assert want.keys() == got.keys() and any("trainable_tokens" in n for n in want)
    assert all(want[n].abs().max() > 0 for n in want if "lora_" in n or "trainable_tokens" in n)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=name)

    # the per-batch route (lower_hidden_states on the trimmed batch) gives the same logits
    batch = to_batch(data, ROWS, SIZE, "cpu")
    lower = frozen.lower_hidden_states(model, batch)
    assert lower["cut"] == 2 - k and not lower["hidden_states"].requires_grad
    torch.testing.assert_close(frozen.upper_logits(model, lower, batch), logits, **TOL)


def test_upper_part_runs_only_the_layers_from_the_cut(base_dir, mixed, tok):
    model = _model(base_dir, mixed, tok, "4bit", k=1)
    inner = model.get_base_model().model
    layers = list(inner.language_model.layers)
    calls = {}
    hooks = [m.register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
             for name, m in [("vision", inner.vision_tower), ("layer0", layers[0]), ("layer1", layers[1]),
                             ("embed", inner.language_model.embed_tokens)]]
    cache = frozen.build_cache(model, mixed, batch_size=8)
    assert calls == {"vision": 3, "layer0": 3, "embed": 3}  # 24 rows / 8: the lower part only, layer 1 never
    calls.clear()
    batch = frozen.cached_batch(mixed, cache, ROWS, "cpu")
    frozen.upper_logits(model, batch.pop("hidden_states"), batch).sum().backward()
    assert calls == {"layer1": 1}
    assert list(inner.language_model.layers) == layers  # the skipped layers are put back
    for h in hooks:
        h.remove()
    # the cut matters: states entering layer 0, fed in at layer 1, give other logits
    at0 = frozen.lower_hidden_states(model, to_batch(mixed, ROWS, SIZE, "cpu"), cut=0)["hidden_states"]
    with torch.no_grad():
        wrong = frozen.upper_logits(model, at0, batch)
        right = frozen.upper_logits(model, at0, batch, cut=0)
        assert (wrong - right).abs().max() > 1e-2
    with pytest.raises(ValueError, match="do not match the batch"):
        frozen.upper_logits(model, at0[:, :-1], batch)


def test_float16_cache_is_close_but_not_exact(base_dir, mixed, tok):
    """float16 halves the cache; the logits then differ by ~1e-3 (measured 6e-4 .. 9e-4 here)."""
    model = _model(base_dir, mixed, tok, "4bit", k=1)
    cache = frozen.build_cache(model, mixed, batch_size=8)
    half = frozen.build_cache(model, mixed, batch_size=8, dtype=np.float16)
    assert half.dtype == np.float16
    with torch.no_grad():
        exact, _ = _cached(model, mixed, cache, ROWS)
        approx, _ = _cached(model, mixed, half, ROWS)
    assert 0 < (exact - approx).abs().max() < 5e-3


def test_cache_can_be_written_to_a_memory_mapped_file(base_dir, mixed, tok, tmp_path):
    model = _model(base_dir, mixed, tok, k=1)
    path = tmp_path / "cache.npy"
    mapped = frozen.build_cache(model, mixed, batch_size=5, out_path=path)
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(np.load(path, mmap_mode="r"), frozen.build_cache(model, mixed, batch_size=24))


# ------------------------------------------------------------------------------ the untied policy head
def test_optimizer_step_moves_head_rows_not_input_embeddings(base_dir, mixed, tok):
    model = _model(base_dir, mixed, tok, "4bit", k=1)
    base = model.get_base_model()
    assert base.lm_head.weight is not base.get_input_embeddings().weight
    assert not base.config.tie_word_embeddings
    trainable = [n for n, _ in _trainable(model)]
    assert all("lora_" in n or "lm_head.token_adapter" in n for n in trainable), trainable
    ids = _head_ids(mixed, tok)
    others = np.setdiff1d(np.arange(tok.vocab_size), ids)
    embed_before = model.get_input_embeddings().weight.detach().clone()
    probe = torch.randn(3, 64)
    with torch.no_grad():
        head_before = model.get_output_embeddings()(probe)
    lower_before = frozen.lower_hidden_states(model, to_batch(mixed, ROWS, SIZE, "cpu"))["hidden_states"]

    optimizer = torch.optim.AdamW([p for _, p in _trainable(model)], lr=1e-2)
    _full(model, mixed, ROWS)[1][0].backward()
    optimizer.step()

    assert torch.equal(model.get_input_embeddings().weight, embed_before)
    assert torch.equal(frozen.lower_hidden_states(model, to_batch(mixed, ROWS, SIZE, "cpu"))["hidden_states"],
                       lower_before)
    with torch.no_grad():
        head_after = model.get_output_embeddings()(probe)
    assert (head_after[:, ids] - head_before[:, ids]).abs().min() > 0  # every trained row moved
    assert torch.equal(head_after[:, others], head_before[:, others])


def test_training_from_the_cache_equals_training_from_the_full_forward(base_dir, mixed, tok):
    """Three AdamW steps each way from the same start end at the same weights, and the cache built before
    training still gives the full forward's logits afterwards."""
    full, cached = _model(base_dir, mixed, tok, "4bit", k=1), _model(base_dir, mixed, tok, "4bit", k=1)
    cache = frozen.build_cache(cached, mixed, batch_size=8)
    for model, route in ((full, "full"), (cached, "cached")):
        optimizer = torch.optim.AdamW([p for _, p in _trainable(model)], lr=1e-2)
        for step in range(3):
            idx = train.batch_indices(step, len(mixed["input_ids"]), 8, seed=0)
            loss = (_full(model, mixed, idx) if route == "full" else _cached(model, mixed, cache, idx))[1][0]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    assert _repacked_4bit_layers(full) == _repacked_4bit_layers(cached) == 0
    a, b = dict(_trainable(full)), dict(_trainable(cached))
    assert any(not torch.equal(a[n], p) for n, p in _trainable(_model(base_dir, mixed, tok, "4bit", k=1)))
    for name in a:
        torch.testing.assert_close(b[name], a[name], **TOL, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(_cached(cached, mixed, cache, ROWS)[0], _full(cached, mixed, ROWS)[0], **TOL)


def test_dropout_below_the_cut_is_rejected(base_dir, mixed, tok):
    model = _model(base_dir, mixed, tok, k=1)
    batch = to_batch(mixed, ROWS, SIZE, "cpu")
    config = model.get_base_model().config
    config.text_config.attention_dropout = 0.1  # layer 0 (below the cut) would drop attention weights
    with pytest.raises(ValueError, match="dropout below the cut"):
        frozen.lower_hidden_states(model, batch)
    frozen.lower_hidden_states(model, batch, cut=0)  # nothing of the decoder below cut 0
    config.text_config.attention_dropout = 0.0
    config.vision_config.attention_dropout = 0.1
    with pytest.raises(ValueError, match="vision_config"):
        frozen.lower_hidden_states(model, batch, cut=0)
