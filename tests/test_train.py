"""Sequences, the joint loss, overfitting, resume, atomic checkpoints, NaN handling (refinevla.train).

    .venv/bin/pytest tests/test_train.py -q

Everything runs on the ``micro`` preset with one CPU thread (two threads on a shared, busy 2-core machine
are several times slower, not faster). Models that several tests share are built once per module.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import synthetic_dataset
from refinevla import train
from refinevla.model import ModelConfig, add_lora, build_tiny_vla, load_base
from refinevla.tokens import VLATokenizer
from refinevla.train import (ACTION, IGNORE, PREFIX, REASON, TrainConfig, build_sequence, encode_dataset,
                             joint_loss, read_metrics, train_loop)

torch.set_num_threads(1)
N_IMAGE = 16  # micro: 32 px / patch 8


@pytest.fixture(scope="module")
def base_dir(ds, tmp_path_factory):
    """A pre-trained micro base (action-only, like the real pipeline's stage 1)."""
    cfg = TrainConfig(arm="pretrain", use_rationale=False, steps=30, batch_size=8, lr=3e-3, warmup_steps=3,
                      log_every=10, threads=1)
    return train.pretrain_base(ds, ModelConfig(size="micro"), cfg, tmp_path_factory.mktemp("pretrain"))


# -------------------------------------------------------------------------------------- sequences
def test_sequence_layout_with_rationale(tok, ds):
    row = ds[0]
    ids, tt, part = build_sequence(tok, row["instruction"], row["state"], row["action"], N_IMAGE,
                                   row["rationale_text"])
    prompt = tok.prompt_ids(row["instruction"], np.asarray(row["state"]), N_IMAGE)
    reason = tok.text_ids(row["rationale_text"])
    n = len(prompt)
    assert len(ids) == len(tt) == len(part) == n + len(reason) + 1 + 7
    assert ids[:n] == prompt and tt[:n] == [0] * n and part[:n] == [PREFIX] * n
    assert ids[n:n + len(reason)] == reason and part[n:n + len(reason)] == [REASON] * len(reason)
    assert ids[n + len(reason)] == tok.marker_id and part[n + len(reason)] == REASON  # learns when to stop
    assert ids[-7:] == tok.action_to_ids(np.asarray(row["action"])) and part[-7:] == [ACTION] * 7
    assert tt[n:] == [1] * (len(ids) - n)  # every target token is suffix (causal)
    assert set(ids[-7:]) <= set(tok.action_ids.tolist())


def test_sequence_layout_baseline_has_no_rationale(tok, ds):
    row = ds[0]
    ids, tt, part = build_sequence(tok, row["instruction"], row["state"], row["action"], N_IMAGE, None)
    n = len(tok.prompt_ids(row["instruction"], np.asarray(row["state"]), N_IMAGE))
    assert len(ids) == n + 8
    assert ids[n] == tok.marker_id and ids[n + 1:] == tok.action_to_ids(np.asarray(row["action"]))
    assert tt == [0] * n + [1] * 8
    assert REASON not in part and part[-7:] == [ACTION] * 7
    assert part[n] == PREFIX  # the forced marker carries no loss


def test_rationale_is_cut_to_max_tokens(tok, ds):
    row = ds[0]
    ids, _, part = build_sequence(tok, row["instruction"], row["state"], row["action"], N_IMAGE,
                                  row["rationale_text"], max_rationale_tokens=3)
    assert part.count(REASON) == 3 + 1  # 3 rationale tokens + the marker


def test_encode_dataset_pads_and_marks_parts(tok, ds, data):
    n, length = data["input_ids"].shape
    assert n == len(ds) and data["images"].shape == (n, 32, 32, 3) and data["images"].dtype == np.uint8
    for k in ("token_type_ids", "part", "attention_mask"):
        assert data[k].shape == (n, length)
    for i in range(n):
        valid = data["attention_mask"][i].astype(bool)
        ids, tt, part = (data[k][i][valid] for k in ("input_ids", "token_type_ids", "part"))
        assert valid[:valid.sum()].all() and not valid[valid.sum():].any()  # right padding
        assert (data["input_ids"][i][~valid] == tok.pad_id).all() and (data["part"][i][~valid] == PREFIX).all()
        first_target = int(np.argmax(tt))
        assert (tt[:first_target] == 0).all() and (tt[first_target:] == 1).all()
        assert (part[:first_target] == PREFIX).all() and (part[first_target:] != PREFIX).all()
        assert (part[-7:] == ACTION).all() and (part[first_target:-7] == REASON).all()
        assert ids[-8] == tok.marker_id


def test_encode_baseline_has_no_reason_part(tok, ds):
    base = encode_dataset(ds.remove_columns(["rationale_text"]), tok, N_IMAGE, use_rationale=False)
    assert not (base["part"] == REASON).any()
    assert ((base["part"] == ACTION).sum(1) == 7).all()
    assert ((base["token_type_ids"] * base["attention_mask"]).sum(1) == 8).all()  # marker + 7 actions


@pytest.mark.parametrize("column,use_rationale", [("rationale_text", True), ("action", False),
                                                  ("instruction", True), ("image", False)])
def test_missing_column_is_a_clear_error(tok, ds, column, use_rationale):
    with pytest.raises(ValueError, match=column):
        encode_dataset(ds.remove_columns([column]), tok, N_IMAGE, use_rationale=use_rationale)


# ------------------------------------------------------------------------------------------ losses
def _hand_made():
    """One row: 3 prefix tokens, 3 rationale tokens (the last one the marker), 2 action tokens; vocab 5."""
    input_ids = torch.tensor([[0, 1, 2, 3, 4, 3, 1, 2]])
    part = torch.tensor([[PREFIX, PREFIX, PREFIX, REASON, REASON, REASON, ACTION, ACTION]])
    torch.manual_seed(0)
    logits = torch.randn(1, 8, 5, dtype=torch.float64)
    return logits, input_ids, part


def _ce(logits, input_ids, t):
    """Cross-entropy of the prediction at position t for the token at t + 1."""
    return -torch.log_softmax(logits[0, t], -1)[input_ids[0, t + 1]]


def test_loss_terms_match_a_hand_computation():
    logits, ids, part = _hand_made()
    total, l_action, l_reason = joint_loss(logits, ids, part, lambda_reason=0.5)
    want_action = (_ce(logits, ids, 5) + _ce(logits, ids, 6)) / 2  # targets at 6, 7
    want_reason = (_ce(logits, ids, 2) + _ce(logits, ids, 3) + _ce(logits, ids, 4)) / 3  # targets at 3, 4, 5
    torch.testing.assert_close(l_action, want_action.float())
    torch.testing.assert_close(l_reason, want_reason.float())
    torch.testing.assert_close(total, (want_action + 0.5 * want_reason).float())


def test_lambda_zero_is_exactly_the_action_loss():
    logits, ids, part = _hand_made()
    total, l_action, l_reason = joint_loss(logits, ids, part, lambda_reason=0.0)
    assert l_reason > 0  # rationale tokens are present
    assert torch.equal(total, l_action)


def test_action_and_reasoning_losses_use_disjoint_positions():
    logits, ids, part = _hand_made()
    _, a0, r0 = joint_loss(logits, ids, part, 1.0)
    for t in range(7):  # perturb the prediction at one position at a time
        bumped = logits.clone()
        bumped[0, t] += torch.tensor([3.0, -2.0, 1.0, 0.5, -1.0], dtype=torch.float64)
        _, a, r = joint_loss(bumped, ids, part, 1.0)
        target_part = int(part[0, t + 1])
        assert (a != a0) == (target_part == ACTION), t
        assert (r != r0) == (target_part == REASON), t
    # the last position predicts nothing
    bumped = logits.clone()
    bumped[0, 7] += 5
    assert all(torch.equal(x, y) for x, y in zip(joint_loss(bumped, ids, part, 1.0), (a0 + r0, a0, r0)))


def test_perfect_logits_give_zero_loss():
    _, ids, part = _hand_made()
    logits = torch.full((1, 8, 5), -1e4)
    logits[0, torch.arange(7), ids[0, 1:]] = 1e4
    assert all(float(x) == 0.0 for x in joint_loss(logits, ids, part, 0.5))
    assert IGNORE == -100


# ------------------------------------------------------------------------------------- overfitting
def test_overfits_a_tiny_batch(tok, ds, tmp_path):
    small = encode_dataset(ds.select([0, 7, 14, 21]), tok, N_IMAGE, use_rationale=True)
    model = build_tiny_vla("micro", tok.vocab_size, tok.image_id, tok.pad_id, seed=0)
    cfg = TrainConfig(steps=40, batch_size=4, lr=3e-3, warmup_steps=3, log_every=1, checkpoint_every=1000,
                      threads=1)
    train_loop(model, small, cfg, tmp_path)
    m = read_metrics(tmp_path)
    assert len(m) == 40
    first, last = m.iloc[:3].mean(), m.iloc[-3:].mean()
    assert last.l_action < 0.5 * first.l_action, (first.l_action, last.l_action)
    assert last.l_reason < 0.5 * first.l_reason, (first.l_reason, last.l_reason)


def test_lora_finetune_learns_the_rationale(ds, base_dir, tmp_path):
    """The fine-tune (4-bit base, LoRA on the top layer) must be able to lower L_reasoning on a toy set with
    two fixed rationales. On the tiny scale the base never produced text, and the (tied) output embeddings of
    the rationale words are frozen: with LoRA alone L_reasoning stays near log(vocab). The paper updates "the
    upper transformer layers and the policy head"."""
    cfg = TrainConfig(arm="refinevla", steps=40, batch_size=8, lr=1e-2, warmup_steps=3, log_every=1,
                      checkpoint_every=1000, threads=1)
    train.finetune(ds, base_dir, ModelConfig(size="micro", tune_top_k_layers=1), cfg, tmp_path)
    m = read_metrics(tmp_path)
    first, last = m.iloc[:3].mean(), m.iloc[-3:].mean()
    assert last.l_reason < 0.6 * first.l_reason, (first.l_reason, last.l_reason)


# ------------------------------------------------------------------------------------------ resume
def _lora_model(base_dir, k=1, quantization="none", seed=0):
    model = load_base(base_dir, quantization)
    torch.manual_seed(seed)
    return add_lora(model, ModelConfig(size="micro", quantization=quantization, tune_top_k_layers=k))



RESUME = dict(steps=10, batch_size=4, lr=3e-3, warmup_steps=2, checkpoint_every=4, log_every=1, threads=1)


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    different = [n for n in a if not torch.equal(a[n], b[n])]
    assert not different, different[:5]


@pytest.fixture(scope="module")
def uninterrupted(base_dir, data, tmp_path_factory):
    model = _lora_model(base_dir, 1, "4bit")
    start = _trainable(model)
    train_loop(model, data, TrainConfig(**RESUME), tmp_path_factory.mktemp("uninterrupted"))
    end = _trainable(model)
    assert any(not torch.equal(start[n], end[n]) for n in start)
    return end


@pytest.mark.parametrize("stop_after", [4, 6])
def test_resume_is_equivalent_to_an_uninterrupted_run(base_dir, data, uninterrupted, tmp_path, stop_after):
    cfg = TrainConfig(**RESUME)
    train_loop(_lora_model(base_dir, 1, "4bit"), data, cfg, tmp_path, stop_after=stop_after)
    assert (tmp_path / "ckpt" / "latest").read_text() == "ckpt-0000004"
    resumed = _lora_model(base_dir, 1, "4bit", seed=123)  # a fresh process would re-initialise LoRA
    train_loop(resumed, data, cfg, tmp_path)
    _assert_same(_trainable(resumed), uninterrupted)
    assert (tmp_path / "ckpt" / "latest").read_text() == "ckpt-0000010"
    # the last checkpoint and the one before it (a fallback if the last one is unreadable; train.save_checkpoint)
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("ckpt-*")) == ["ckpt-0000008", "ckpt-0000010"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), steps  # the steps logged after the checkpoint are not repeated


def _assert_complete(ckpt_root: Path, step: int):
    name = (ckpt_root / "latest").read_text().strip()
    assert name == f"ckpt-{step:07d}"
    folder = ckpt_root / name
    assert {p.name for p in folder.iterdir()} == {"trainable.safetensors", "optimizer.pt", "rng.safetensors",
                                                  "state.json"}
    assert json.loads((folder / "state.json").read_text())["step"] == step


def test_stale_tmp_checkpoint_is_ignored(base_dir, data, uninterrupted, tmp_path):
    stale = tmp_path / "ckpt" / ".tmp-ckpt-0000999"
    stale.mkdir(parents=True)
    (stale / "trainable.safetensors").write_bytes(b"half-written garbage")
    (stale / "state.json").write_text('{"step": 999}')
    cfg = TrainConfig(**RESUME)
    train_loop(_lora_model(base_dir, 1, "4bit"), data, cfg, tmp_path, stop_after=6)
    _assert_complete(tmp_path / "ckpt", 4)
    resumed = _lora_model(base_dir, 1, "4bit")
    train_loop(resumed, data, cfg, tmp_path)
    _assert_complete(tmp_path / "ckpt", 10)
    _assert_same(_trainable(resumed), uninterrupted)


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(base_dir, data, uninterrupted, tmp_path,
                                                                 monkeypatch):
    real_save = torch.save

    def crash_at_step_8(obj, f, *a, **kw):
        if ".tmp-ckpt-0000008" in str(f):
            raise KeyboardInterrupt("killed while writing")
        return real_save(obj, f, *a, **kw)

    cfg = TrainConfig(**RESUME)
    with monkeypatch.context() as mp:
        mp.setattr(torch, "save", crash_at_step_8)
        with pytest.raises(KeyboardInterrupt):
            train_loop(_lora_model(base_dir, 1, "4bit"), data, cfg, tmp_path)
    _assert_complete(tmp_path / "ckpt", 4)
    assert (tmp_path / "ckpt" / ".tmp-ckpt-0000008").exists()  # the half-written one is left behind, unused
    resumed = _lora_model(base_dir, 1, "4bit")
    train_loop(resumed, data, cfg, tmp_path)
    _assert_complete(tmp_path / "ckpt", 10)
    _assert_same(_trainable(resumed), uninterrupted)


def test_crash_between_rename_and_pointer_update_resumes(base_dir, data, uninterrupted, tmp_path, monkeypatch):
    """Killed after ckpt-8 was renamed into place but before ``latest`` moved to it: ``latest`` still names
    ckpt-4, so the resumed run replays steps 5-8 and must be able to write ckpt-8 again."""
    from refinevla import checkpoints
    real_write = checkpoints._atomic_write

    def crash_on_step_8(path, text):
        if text == "ckpt-0000008":
            raise KeyboardInterrupt("killed before the pointer moved")
        return real_write(path, text)

    cfg = TrainConfig(**RESUME)
    with monkeypatch.context() as mp:
        mp.setattr(checkpoints, "_atomic_write", crash_on_step_8)
        with pytest.raises(KeyboardInterrupt):
            train_loop(_lora_model(base_dir, 1, "4bit"), data, cfg, tmp_path)
    _assert_complete(tmp_path / "ckpt", 4)
    resumed = _lora_model(base_dir, 1, "4bit")
    train_loop(resumed, data, cfg, tmp_path)
    _assert_complete(tmp_path / "ckpt", 10)
    _assert_same(_trainable(resumed), uninterrupted)


# ----------------------------------------------------------------------------------- NaN / inf loss
def _saved_weights(ckpt_root: Path):
    from safetensors.torch import load_file

    return load_file(str(ckpt_root / (ckpt_root / "latest").read_text().strip() / "trainable.safetensors"))


@pytest.mark.parametrize("poison", ["inf lr", "nan in the frozen base"])
def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(base_dir, data, tmp_path,
                                                                                     poison):
    cfg = TrainConfig(**RESUME)
    train_loop(_lora_model(base_dir, 1, "4bit"), data, cfg, tmp_path, stop_after=4)
    good = _saved_weights(tmp_path / "ckpt")
    model = _lora_model(base_dir, 1, "4bit")
    if poison == "inf lr":
        cfg = TrainConfig(**{**RESUME, "lr": float("inf")})
        message = r"non-finite .*step \d+.*last good checkpoint"
    else:  # the loss itself is NaN at the first resumed step
        norm = dict(model.named_parameters())["base_model.model.model.language_model.norm.weight"]
        with torch.no_grad():
            norm[0] = float("nan")
        message = r"non-finite loss at step 4 .*last good checkpoint"
    with pytest.raises(FloatingPointError, match=message):
        train_loop(model, data, cfg, tmp_path)
    _assert_complete(tmp_path / "ckpt", 4)
    kept = _saved_weights(tmp_path / "ckpt")
    _assert_same(kept, good)
    assert all(torch.isfinite(v).all() for v in kept.values())


def test_checkpoint_never_holds_non_finite_weights(base_dir, data, tmp_path):
    """A step whose loss was finite can still leave NaN weights (an inf lr here; an overflowing gradient in
    practice): with a checkpoint after every step, the checkpoint kept must not be the poisoned one."""
    every = {**RESUME, "checkpoint_every": 1}
    train_loop(_lora_model(base_dir, 1, "4bit"), data, TrainConfig(**every), tmp_path, stop_after=2)
    with pytest.raises(FloatingPointError):
        train_loop(_lora_model(base_dir, 1, "4bit"), data, TrainConfig(**{**every, "lr": float("inf")}), tmp_path)
    kept = _saved_weights(tmp_path / "ckpt")
    assert all(torch.isfinite(v).all() for v in kept.values()), (tmp_path / "ckpt" / "latest").read_text()


def test_random_shift_moves_each_image_by_at_most_shift_pixels_and_is_seeded():
    """DrQ-style augmentation: every image is its original translated by (dy, dx) in [-s, s]^2, edges replicated;
    the same seed gives the same shifts (a resumed run sees the same batches)."""
    import numpy as np
    import torch

    from refinevla.train import random_shift

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    a = random_shift(x, 2, np.random.default_rng([0, 5]))
    assert torch.equal(a, random_shift(x, 2, np.random.default_rng([0, 5])))
    assert a.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    for i in range(2):
        windows = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.equal(a[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert len(windows) == 1
    shifted = {tuple(random_shift(x[:1], 2, np.random.default_rng([0, k]))[0, 0, 0, :3].tolist()) for k in range(20)}
    assert len(shifted) > 1  # the shift varies with the seed


def test_augmentation_needs_the_images_not_cached_features():
    from refinevla.config import ConfigError, resolve

    assert resolve("smoke", {"pretrain.augment_shift": 4}).pretrain.augment_shift == 4
    with pytest.raises(ConfigError, match="baseline.augment_shift"):
        resolve("smoke", {"baseline.augment_shift": 4})
    both = {f"{arm}.{key}": value for arm in ("baseline", "refinevla")
            for key, value in (("augment_shift", 4), ("cache_frozen", False))}  # the compared arms share them
    assert resolve("smoke", both).baseline.augment_shift == 4
