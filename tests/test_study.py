"""The study's guarantees: same seed -> same adapters and data order whatever ran before, the ECoT-Lite layouts,
action chunks, averaged held-out losses, and evaluation seeds / scenes disjoint from every training seed.

    .venv/bin/pytest tests/test_study.py -q
"""
import json

import numpy as np
import pytest
import torch

from conftest import synthetic_dataset
from refinevla import train
from refinevla.config import resolve
from refinevla.model import ModelConfig
from refinevla.train import ACTION, PREFIX, REASON, TrainConfig, build_sequence, encode_dataset

torch.set_num_threads(1)
N_IMAGE = 16


@pytest.fixture(scope="module")
def base_dir(ds, tmp_path_factory):
    cfg = TrainConfig(arm="pretrain", use_rationale=False, steps=10, batch_size=8, lr=3e-3, warmup_steps=2,
                      log_every=5, threads=1)
    return train.pretrain_base(ds, ModelConfig(size="micro"), cfg, tmp_path_factory.mktemp("pretrain"))


def _adapters(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "adapter_model.safetensors"))


def _finetune(ds, base_dir, out, seed=0, steps=1, **kw):
    cfg = TrainConfig(arm="refinevla", steps=steps, batch_size=4, lr=1e-3, warmup_steps=1, log_every=1,
                      checkpoint_every=100, threads=1, seed=seed, **kw)
    return train.finetune(ds, base_dir, ModelConfig(size="micro", tune_top_k_layers=1, quantization="none"), cfg,
                          out, heldout_every=0)


def test_same_seed_same_adapters_whatever_ran_before(ds, base_dir, tmp_path):
    a = _adapters(_finetune(ds, base_dir, tmp_path / "a"))
    torch.rand(1000)  # another stage consumed the global generator in between (e.g. pre-training in one process)
    np.random.rand(10)
    b = _adapters(_finetune(ds, base_dir, tmp_path / "b"))
    c = _adapters(_finetune(ds, base_dir, tmp_path / "c", seed=1))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert any(not torch.equal(a[k], c[k]) for k in a if "lora_A" in k), "another seed must start elsewhere"


def test_variants_see_the_same_frames_in_the_same_order():
    runs = [[train.batch_indices(s, 100, 8, seed=3) for s in range(30)] for _ in range(2)]
    assert all(np.array_equal(x, y) for x, y in zip(*runs))
    dropped = [train.batch_indices(s, 100, 8, seed=3, dropout=0.5) for s in range(30)]
    assert all(np.array_equal(x % 100, y) for x, y in zip(dropped, runs[0]))  # same frames, some without rationale
    share = np.mean(np.concatenate(dropped) >= 100)
    assert 0.35 < share < 0.65


def test_rationale_after_the_action_layout(tok, ds):
    row = ds[0]
    ids, tt, part = build_sequence(tok, row["instruction"], row["state"], row["action"], N_IMAGE,
                                   row["rationale_text"], position="after")
    n_prompt = len(tok.prompt_ids(row["instruction"], np.asarray(row["state"]), N_IMAGE))
    reason = tok.text_ids(row["rationale_text"])
    assert ids[n_prompt] == tok.marker_id and part[n_prompt] == PREFIX
    assert ids[n_prompt + 1:n_prompt + 8] == tok.action_to_ids(np.asarray(row["action"]))
    assert part[n_prompt + 1:n_prompt + 8] == [ACTION] * 7 and ids[n_prompt + 8:] == reason
    assert part[n_prompt + 8:] == [REASON] * len(reason) and tt[n_prompt:] == [1] * (len(ids) - n_prompt)


def test_action_chunks_follow_the_episode_and_repeat_its_last_action():
    ds = synthetic_dataset(n_episodes=2, steps=3)
    chunks = train.action_chunks(ds, 3)
    actions = np.asarray(ds["action"], np.float32)
    np.testing.assert_array_equal(chunks[0], actions[0:3])
    np.testing.assert_array_equal(chunks[1], actions[[1, 2, 2]])  # never crosses into the next episode
    np.testing.assert_array_equal(chunks[3], actions[3:6])


def test_chunked_sequences_hold_seven_tokens_per_action(ds):
    from refinevla.tokens import VLATokenizer

    tok = VLATokenizer.train_tiny(train._texts_for_tokenizer(ds), *train._stats_from(ds), action_chunk=3)
    data = encode_dataset(ds, tok, N_IMAGE, use_rationale=True)
    assert ((data["part"] == ACTION).sum(1) == 21).all()
    chunk = train.action_chunks(ds, 3)[0]
    back = tok.ids_to_actions(tok.action_to_ids(chunk))
    assert back.shape == (3, 7)
    np.testing.assert_array_equal(back, tok.action_stats.decode(tok.action_stats.encode(chunk)))


def test_zero_command_decodes_to_exactly_zero(ds):
    stats = train._stats_from(ds)[0]
    assert stats.n_bins % 2 == 1
    zero = np.zeros(7)
    back = stats.decode(stats.encode(zero))
    assert np.all(back[:6] == 0.0), back


def test_dropout_data_holds_a_copy_without_rationale(tok, ds):
    data = encode_dataset(ds, tok, N_IMAGE, use_rationale=True, with_dropped=True)
    n = data["n_rows"]
    assert len(data["input_ids"]) == 2 * n
    assert (data["part"][:n] == REASON).any(1).all() and not (data["part"][n:] == REASON).any()


def test_heldout_loss_averages_the_whole_heldout_set(ds, base_dir, tmp_path):
    model_dir = _finetune(ds, base_dir, tmp_path / "h", steps=2, eval_every=1)
    lines = [json.loads(x) for x in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    assert all("heldout_l_action" not in x for x in lines)  # heldout_every=0: nothing held out, nothing scored
    from refinevla.model import load_base

    model = load_base(base_dir)
    tok = train.load_tokenizer_for(base_dir)
    data = encode_dataset(ds, tok, N_IMAGE, use_rationale=False)
    whole = train.heldout_loss(model, data, batch_size=len(ds), device="cpu")["heldout_l_action"]
    batched = train.heldout_loss(model, data, batch_size=5, device="cpu")["heldout_l_action"]
    assert abs(whole - batched) < 1e-5  # token-weighted: the batch size does not change the average
    assert model_dir.exists()


def test_split_heldout_holds_out_whole_episodes(ds):
    kept, held = train.split_heldout(ds, 2)
    assert set(kept["episode_index"]).isdisjoint(held["episode_index"])
    assert len(kept) + len(held) == len(ds)


@pytest.mark.parametrize("preset", ["smoke", "default"])
def test_no_evaluation_seed_appears_in_training(preset):
    from refinevla.data import PRETRAIN_SEED_OFFSET, data_seeds

    cfg = resolve(preset)
    fine = {s for t in cfg.data.tasks for s in data_seeds(cfg.data.seed, cfg.data.episodes_per_task)}
    pre = {s for n in cfg.data.pretrain_mix.values() for s in data_seeds(cfg.data.seed, n, PRETRAIN_SEED_OFFSET)}
    evaluation = {split: set(cfg.evaluate.seed_list(split)) for split in cfg.evaluate.splits}
    assert fine.isdisjoint(pre)
    for seeds in evaluation.values():
        assert seeds.isdisjoint(fine) and seeds.isdisjoint(pre)
    assert set(cfg.evaluate.splits) == {"in_distribution", "variant"}
    assert evaluation["in_distribution"].isdisjoint(evaluation["variant"])


def test_data_seed_cannot_reach_the_evaluation_range():
    from refinevla.data import data_seeds

    with pytest.raises(ValueError, match="data.seed"):
        data_seeds(10, 5)


def test_extra_arms_change_only_their_keys():
    from refinevla.pipeline import arm_configs, trained_arms

    cfg = resolve("default")
    base_t, base_m = arm_configs(cfg, "refinevla", 0)
    drop_t, drop_m = arm_configs(cfg, "dropout", 0)
    assert drop_t.rationale_dropout == 0.5 and not drop_t.reasons_at_inference and base_t.reasons_at_inference
    assert {k: v for k, v in vars(drop_t).items() if k not in ("rationale_dropout", "arm")} == \
           {k: v for k, v in vars(base_t).items() if k not in ("rationale_dropout", "arm")}
    assert ("baseline", 1) in trained_arms(cfg) and ("dropout", 1) not in trained_arms(cfg)


def test_the_rationale_gate_reads_the_tokenizers_text_and_a_1cm_tolerance():
    import pandas as pd

    from refinevla.diagnostics import gate
    from refinevla.teacher.privileged import parse_offset as spatial_offset
    from refinevla.teacher import parse_rationale_text

    written = ("observation : the red cube and an open gripper situation : 9 cm from the red cube spatial : the red "
               "cube is 4 cm left of and 8 cm below the gripper plan : move above the red cube")
    parsed = parse_rationale_text(written)  # as a word-level tokenizer gives it back: lower case, ':' split off
    assert parsed is not None and parsed.task_planning == "move above the red cube"
    assert list(spatial_offset(parsed.spatial_reasoning)) == [0, 4, -8]
    assert list(spatial_offset("the red cube is at the gripper")) == [0, 0, 0] and spatial_offset("nothing") is None
    assert gate(pd.DataFrame({"spatial_within_1cm": [True, True, False]}))[0]
    assert not gate(pd.DataFrame({"spatial_within_1cm": [True, False, False]}))[0]
