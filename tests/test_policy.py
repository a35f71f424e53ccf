"""The VLA policy: greedy decoding with a KV cache, action-bin restriction, loading saved fine-tunes.

    .venv/bin/pytest tests/test_policy.py -q
"""
import copy
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import synthetic_dataset
from refinevla import train
from refinevla.model import ModelConfig, image_size, num_image_tokens, preprocess_images
from refinevla.policy import Policy, VLAPolicy, load_policy, load_vla
from refinevla.tokens import BinStats, VLATokenizer
from refinevla.train import TrainConfig
from vla_stubs import MarkerAt

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained(ds, tmp_path_factory):
    """A micro base, a ReFineVLA fine-tune (rationale, 4-bit base) and a baseline fine-tune of it."""
    root = tmp_path_factory.mktemp("policy")
    base = train.pretrain_base(ds, ModelConfig(size="micro"),
                               TrainConfig(arm="pretrain", use_rationale=False, steps=30, batch_size=8,
                                           lr=3e-3, warmup_steps=3, log_every=10, threads=1), root / "pretrain")
    common = dict(steps=15, batch_size=8, lr=1e-2, warmup_steps=2, log_every=5, threads=1)
    refine = train.finetune(ds, base, ModelConfig(size="micro", tune_top_k_layers=1),
                            TrainConfig(arm="refinevla", **common), root / "refinevla")
    baseline = train.finetune(ds, base, ModelConfig(size="micro", tune_top_k_layers=1),
                              TrainConfig(arm="baseline", use_rationale=False, lambda_reason=0.0, **common),
                              root / "baseline")
    return SimpleNamespace(base=base, refine=refine, baseline=baseline)


@pytest.fixture(scope="module")
def policy(trained):
    return load_policy(trained.refine, threads=1)


def _obs(ds, i=0):
    row = ds[i]
    return np.asarray(row["image"]), row["instruction"], np.asarray(row["state"], np.float32)


def _decode(policy, image, instruction, state, reasoning, forced_rationale=None):
    """(rationale text, action, rationale ids) of the policy's own greedy decoder (chunk 1: one action)."""
    out = policy._decode(image, instruction, state, reasoning, forced_rationale)
    assert out[1].shape == (1, 7)
    return out[0], out[1][0], list(out[2])


def _is_bin_centre(tok, action):
    return np.array_equal(action, tok.action_stats.decode(tok.action_stats.encode(action)))


# ------------------------------------------------------------------------------------- predictions
def test_predict_returns_a_rationale_and_a_binned_action(policy, ds):
    assert policy.reasoning  # trained with rationales: reasoning on by default
    text, action = policy.predict(*_obs(ds))
    assert isinstance(text, str)
    assert isinstance(action, np.ndarray) and action.dtype == np.float32 and action.shape == (7,)
    assert np.all(np.isfinite(action)) and _is_bin_centre(policy.tok, action)


def test_predict_without_reasoning_writes_no_rationale(policy, ds):
    text, action = policy.predict(*_obs(ds), reasoning=False)
    assert text == ""
    assert action.shape == (7,) and _is_bin_centre(policy.tok, action)


def _reference_decode(policy, image, instruction, state, reasoning, forced_rationale=None):
    """Greedy decoding with a full forward pass per token (no cache), token_type 0 on the prompt and 1 on
    every generated token, the same masks as the policy: what the cached decoder must reproduce."""
    tok, model = policy.tok, policy.model
    prompt = tok.prompt_ids(instruction, state, num_image_tokens(model))
    pixels = preprocess_images(image, image_size(model))
    seq = list(prompt)

    def last_logits():
        tt = torch.tensor([[0] * len(prompt) + [1] * (len(seq) - len(prompt))])
        with torch.no_grad():
            return model(input_ids=torch.tensor([seq]), pixel_values=pixels, token_type_ids=tt).logits[0, -1]

    rationale = list(forced_rationale or [])
    seq += rationale
    if reasoning and forced_rationale is None:
        while len(rationale) < policy.max_rationale_tokens:
            nxt = int(torch.argmax(last_logits() + policy.text_mask))
            if nxt == tok.marker_id:
                break
            rationale.append(nxt)
            seq.append(nxt)
    seq.append(tok.marker_id)
    actions = []
    for _ in range(7):
        nxt = int(torch.argmax(last_logits() + policy.action_mask))
        actions.append(nxt)
        seq.append(nxt)
    return rationale, actions


@pytest.mark.parametrize("reasoning,forced", [(False, False), (True, False), (True, True)])
def test_cached_decoding_matches_full_forward_decoding(policy, ds, reasoning, forced):
    """The KV cache, the positions and the prefix/suffix mask at inference agree with training's layout
    (forced: the rationale is the training one, fed as ``act`` does when it reuses a rationale, so that a long
    cached suffix is exercised whatever the model writes itself)."""
    for i in (0, 9):
        image, instruction, state = _obs(ds, i)
        given = policy.tok.text_ids(ds[i]["rationale_text"]) if forced else None
        text, action, ids = _decode(policy, image, instruction, state, reasoning, given)
        want_rationale, want_actions = _reference_decode(policy, image, instruction, state, reasoning, given)
        assert ids == want_rationale
        assert text == policy.tok.decode_text(want_rationale)
        np.testing.assert_array_equal(action, policy.tok.ids_to_action(want_actions))


def test_cached_logits_equal_one_full_forward(policy, ds):
    """Every logit vector the cached decoder reads equals the one a single teacher-forced forward pass (the
    training layout) gives at the same position: cache, positions and mask, not just the argmax."""
    image, instruction, state = _obs(ds, 3)
    given = policy.tok.text_ids(ds[3]["rationale_text"])
    seen = []
    handle = policy.model.register_forward_hook(
        lambda mod, args, kwargs, out: seen.append((kwargs["input_ids"].shape[1], out.logits[0, -1].clone())),
        with_kwargs=True)
    try:
        policy._decode(image, instruction, state, True, given)
    finally:
        handle.remove()
    action_ids = policy.tok.action_to_ids(_decode(policy, image, instruction, state, True, given)[1])
    prompt = policy.tok.prompt_ids(instruction, state, num_image_tokens(policy.model))
    seq = prompt + given + [policy.tok.marker_id] + action_ids
    tt = torch.tensor([[0] * len(prompt) + [1] * (len(seq) - len(prompt))])
    with torch.no_grad():
        full = policy.model(input_ids=torch.tensor([seq]), token_type_ids=tt,
                            pixel_values=preprocess_images(image, image_size(policy.model))).logits[0]
    # a reused rationale goes in one pass with the prompt and ACTION:, then one call per action token
    assert [n for n, _ in seen] == [len(prompt) + len(given) + 1, 1, 1, 1, 1, 1, 1]
    position = np.cumsum([n for n, _ in seen]) - 1
    for (n, logits), p in zip(seen, position):
        torch.testing.assert_close(logits, full[p], rtol=1e-4, atol=1e-4)


def test_tokens_fed_after_the_marker_are_action_bins(policy, ds):
    fed = []
    handle = policy.model.register_forward_pre_hook(
        lambda mod, args, kwargs: fed.append(kwargs["input_ids"][0].tolist()), with_kwargs=True)
    try:
        policy.predict(*_obs(ds), reasoning=True)
    finally:
        handle.remove()
    flat = [t for chunk in fed[1:] for t in chunk]  # fed[0] is the prompt
    marker = flat.index(policy.tok.marker_id)
    after = flat[marker + 1:]
    assert len(after) == 6  # the 7th action token is never fed back
    assert set(after) <= set(policy.tok.action_ids.tolist())
    banned = set(policy.tok.action_ids.tolist()) | set(policy.tok.state_ids.tolist()) | {
        policy.tok.image_id, policy.tok.pad_id, policy.tok.bos_id}
    assert not set(flat[:marker]) & banned


class PushyModel(torch.nn.Module):
    """A stand-in model whose logits always prefer tokens a decoder must refuse: a state bin first, then the
    image token, then a text word; among action bins it prefers ``best_bin``; ACTION: comes after
    ``marker_after`` rationale tokens (or never)."""

    def __init__(self, tok, best_bin=200, marker_after=None):
        super().__init__()
        self.tok, self.marker_after = tok, marker_after
        v = tok.vocab_size
        self.head = torch.nn.Linear(4, v)
        self.config = SimpleNamespace(vision_config=SimpleNamespace(image_size=32, patch_size=8))
        base = torch.zeros(v)
        base[tok.state_ids[3]] = 50.0
        base[tok.image_id] = 40.0
        self.word = tok.text_ids("cube")[0]
        base[self.word] = 30.0
        base[tok.action_ids] = 1.0
        base[tok.action_ids[best_bin]] = 20.0
        base[tok.marker_id] = -10.0
        self.base, self.calls = base, 0

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, cache=None, use_cache=True, pixel_values=None, token_type_ids=None, **kwargs):
        if pixel_values is not None:
            self.calls = 0
            self.decodes = getattr(self, "decodes", 0) + 1
        logits = self.base.clone()
        if self.marker_after is not None and self.calls == self.marker_after:
            logits[self.tok.marker_id] = 100.0
        self.calls += 1
        return SimpleNamespace(logits=logits.expand(*input_ids.shape, -1))


def test_decoding_is_restricted_even_when_the_model_prefers_other_tokens(tok, ds):
    pol = VLAPolicy(PushyModel(tok, best_bin=200), tok, reasoning=True, max_rationale_tokens=5)
    text, action, ids = _decode(pol, *_obs(ds), True)
    assert ids == [tok.text_ids("cube")[0]] * 5  # never a bin, the image or the pad token; capped at 5
    assert text == "cube cube cube cube cube"
    np.testing.assert_array_equal(action, tok.action_stats.decode(np.full(7, 200)))


def test_rationale_stops_at_the_marker(tok, ds):
    pol = VLAPolicy(PushyModel(tok, best_bin=7, marker_after=3), tok, reasoning=True)
    text, action, ids = _decode(pol, *_obs(ds), True)
    assert text == "cube cube cube"
    np.testing.assert_array_equal(action, tok.action_stats.decode(np.full(7, 7)))


def test_act_follows_the_policy_protocol_and_rewrites_the_rationale_at_every_decode(tok, ds):
    pol = VLAPolicy(PushyModel(tok, marker_after=2), tok, reasoning=True)
    assert isinstance(pol, Policy)
    image, instruction, state = _obs(ds)
    pol.reset(instruction)
    for step in range(4):
        action = pol.act({"image": image, "state": state})
        assert action.dtype == np.float32 and action.shape == (7,)
        assert pol.last_rationale == "cube cube"
    assert pol.step == 4 and pol.model.decodes == 4  # chunk 1: one decode (rationale + action) per step


def _chunked(tok, chunk):
    """The tokenizer with ``action_chunk`` set (a copy: the module's tokenizer stays at one action)."""
    tok = copy.copy(tok)
    tok.action_chunk = chunk
    return tok


def test_a_chunk_is_executed_before_decoding_again(policy, ds):
    """With action_chunk = 3 a decode writes 21 action tokens; the next two steps pop the queued actions without
    calling the model; the fourth decodes again (rationale first)."""
    pol = VLAPolicy(policy.model, _chunked(policy.tok, 3), reasoning=True, max_rationale_tokens=12)
    first_passes = []
    handle = pol.model.register_forward_pre_hook(
        lambda mod, args, kwargs: first_passes.append(1) if kwargs.get("pixel_values") is not None else None,
        with_kwargs=True)
    image, instruction, state = _obs(ds)
    try:
        rationale, action_ids = pol.generate_ids(image, instruction, state)
        assert len(action_ids) == 21 and set(action_ids) <= set(pol.tok.action_ids.tolist())
        chunk = pol.ids_to_actions(action_ids)
        assert chunk.shape == (3, 7) and chunk.dtype == np.float32
        text, predicted = pol.predict(image, instruction, state)
        np.testing.assert_array_equal(predicted, chunk)
        first_passes.clear()
        pol.reset(instruction)
        actions = [pol.act({"image": image, "state": state, "instruction": instruction}) for _ in range(7)]
    finally:
        handle.remove()
    assert len(first_passes) == 3  # steps 0, 3 and 6
    np.testing.assert_array_equal(np.stack(actions[:3]), chunk)
    np.testing.assert_array_equal(np.stack(actions[3:6]), chunk)  # same observation: same chunk
    assert pol.slots[0].decodes == 3 and len(pol.slots[0].queue) == 2


def _observations(ds):
    """Observations with prompts of different lengths (three instructions) and different images and states."""
    instructions = ["pick up the red cube", "stack the red cube on the green cube", "cube"]
    return [{"image": np.asarray(ds[i]["image"]), "state": np.asarray(ds[i]["state"], np.float32),
             "instruction": instructions[k % 3]} for k, i in enumerate((0, 5, 9, 13, 20))]


@pytest.mark.parametrize("reasoning", [False, True])
def test_act_batch_equals_the_unbatched_decode_token_for_token(policy, ds, reasoning):
    pol = VLAPolicy(policy.model, policy.tok, reasoning=reasoning, max_rationale_tokens=20)
    obs = _observations(ds)
    slots = [4, 0, 7, 2, 1]
    for s, o in zip(slots, obs):
        pol.reset_slot(s, o["instruction"])
    actions = pol.act_batch(obs, slots)
    for s, o, action in zip(slots, obs, actions):
        text, want, rationale, action_ids = pol._decode(o["image"], o["instruction"], o["state"], reasoning, None)
        assert pol.slots[s].rationale_ids == rationale and pol.slots[s].last_rationale == text
        np.testing.assert_array_equal(action, want[0])
        assert bool(rationale) == reasoning


@pytest.mark.parametrize("marker", [False, True], ids=["capped", "marker"])
def test_batched_decode_with_rows_that_stop_at_different_steps(policy, ds, marker):
    """One batch mixing rows that write their rationale (to the cap, or to ACTION: after a number of tokens that
    differs per row), rows with forced rationales of different lengths and rows that act at once: each row's
    tokens equal its own unbatched decode (rows leave the batch at different steps; prompts have different
    lengths, so the left padding differs per row)."""
    model = MarkerAt(policy.model, policy.tok.marker_id) if marker else policy.model
    pol = VLAPolicy(model, _chunked(policy.tok, 2), reasoning=True, max_rationale_tokens=16)
    given = pol.tok.text_ids(ds[3]["rationale_text"])
    obs = _observations(ds)
    modes = [(True, None), (True, given[:3]), (False, None), (True, given), (True, None), (True, None)]
    obs.append(obs[2])  # three writing rows (0, 4, 5) with three prompt lengths
    items = [(o["image"], o["instruction"], o["state"], r, f) for o, (r, f) in zip(obs, modes)]
    batched = pol._decode_many(items)
    for item, (rationale, action_ids) in zip(items, batched):
        _, _, want_rationale, want_actions = pol._decode(*item)
        assert rationale == (list(item[4]) if item[4] is not None else want_rationale)
        assert rationale == want_rationale and action_ids == want_actions and len(action_ids) == 14
    written = {len(batched[k][0]) for k in (0, 4, 5)}
    assert written == {16} if not marker else len(written) == 3 and max(written) < 16


# ------------------------------------------------------------------------------------------ loading
def test_load_policy_reads_variant_defaults(trained, ds):
    meta = json.loads((trained.refine / "vla.json").read_text())
    assert meta["kind"] == "adapter" and meta["quantization"] == "4bit" and meta["use_rationale"]
    baseline = load_policy(trained.baseline, threads=1)
    assert not baseline.reasoning
    text, action = baseline.predict(*_obs(ds))
    assert text == "" and _is_bin_centre(baseline.tok, action)
    base = load_policy(trained.base, threads=1)
    assert not base.reasoning and base.predict(*_obs(ds))[1].shape == (7,)


def test_saved_model_carries_the_base_statistics(trained):
    base_tok, ft_tok = VLATokenizer.load(trained.base), VLATokenizer.load(trained.refine)
    assert ft_tok.action_stats == base_tok.action_stats and ft_tok.state_stats == base_tok.state_stats
    assert isinstance(ft_tok.action_stats, BinStats)


def test_loaded_adapter_reproduces_the_trained_model(trained, ds):
    """The adapter folder + base reload to the same weights: loading twice gives identical predictions, and
    they differ from the base's (the adapter was applied)."""
    model, tok, meta = load_vla(trained.refine)
    again, _, _ = load_vla(trained.refine)
    base, _, _ = load_vla(trained.base)
    batch = train.to_batch(train.encode_dataset(ds.select([0]), tok, num_image_tokens(model), True),
                           np.array([0]), 32, "cpu")
    batch.pop("part")
    with torch.no_grad():
        a, b, c = (m(**batch).logits for m in (model.eval(), again.eval(), base.eval()))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-4


def test_load_policy_refuses_a_folder_without_vla_json(trained, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(trained.refine, broken)
    (broken / "vla.json").unlink()
    with pytest.raises(FileNotFoundError, match="vla.json"):
        load_policy(broken)
    with pytest.raises(FileNotFoundError, match="vla.json"):
        load_policy(tmp_path / "does-not-exist")


def test_dequantized_inference_matches_the_4bit_model(trained):
    """On a CPU the 4-bit base is dequantized once for inference: the same logits as the 4-bit layers."""
    import bitsandbytes as bnb
    import torch

    from refinevla.model import dequantize_for_inference
    from refinevla.policy import load_vla
    from refinevla.train import build_sequence

    model_dir = trained.refine
    q, tok, _ = load_vla(model_dir, dequantize_on_cpu=False)
    d, _, _ = load_vla(model_dir)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in q.modules())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in d.modules())
    assert dequantize_for_inference(d) == 0
    ds = synthetic_dataset()
    row = ds[0]
    ids, tt, _ = build_sequence(tok, row["instruction"], row["state"], row["action"], 16)
    px = preprocess_images(np.asarray(row["image"]), 32)
    with torch.no_grad():
        a = q(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([tt]), pixel_values=px).logits
        b = d(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([tt]), pixel_values=px).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_teacher_rationale_policy_acts_after_the_privileged_rationale(trained, ds):
    """The oracle: the ReFineVLA model acts after the privileged teacher's rationale for the current simulator
    state (no shadow expert), exactly as if that rationale were its own; batched like the VLA."""
    from refinevla.policy import TeacherRationalePolicy
    from refinevla.teacher import privileged_rationale, render_rationale

    oracle = load_policy(trained.refine, threads=1, teacher_rationale=True)
    assert isinstance(oracle, TeacherRationalePolicy) and isinstance(oracle, Policy)
    assert not hasattr(oracle, "shadow")
    image, _, _ = _obs(ds)
    state = np.array([0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0], np.float32)  # open gripper, 18 cm above the cube
    objects = [{"name": "cube", "role": "target", "pos": [0.06, -0.02, 0.82]}]
    obs = {"image": image, "state": state, "instruction": "pick up the red cube", "objects": objects}
    oracle.reset("pick up the red cube")
    action = oracle.act(obs)
    expected = render_rationale(privileged_rationale(state, objects))
    assert oracle.last_rationale == expected and "cube" in expected
    _, ids = oracle.vla.generate_ids(image, "pick up the red cube", state,
                                     rationale_ids=oracle.vla.tok.text_ids(expected))
    np.testing.assert_array_equal(action, oracle.vla.tok.ids_to_action(ids))
    # batched: each slot acts after the rationale of its own state
    state2 = state.copy()
    state2[2] = 0.84
    obs2 = dict(obs, state=state2)
    for s in (3, 5):
        oracle.reset_slot(s, "pick up the red cube")
    a3, a5 = oracle.act_batch([obs, obs2], [3, 5])
    np.testing.assert_array_equal(a3, action)
    assert oracle.slot_rationale[5] == render_rationale(privileged_rationale(state2, objects))
    _, ids2 = oracle.vla.generate_ids(image, "pick up the red cube", state2,
                                      rationale_ids=oracle.vla.tok.text_ids(oracle.slot_rationale[5]))
    np.testing.assert_array_equal(a5, oracle.vla.tok.ids_to_action(ids2))
    with pytest.raises(ValueError, match="objects"):
        oracle.act({"image": image, "state": state, "instruction": "pick up the red cube"})
