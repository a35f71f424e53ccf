"""Pre-trained VLA bases run by their own remote code (refinevla.bases), on a SpatialVLA STAND-IN.

    .venv/bin/pytest tests/test_bases.py -q

The real bases (IPEC-COMMUNITY/spatialvla-4b-224-pt, openvla/openvla-7b) cannot be downloaded here. The stand-in
(tests/standins/spatialvla, written out by tests/standins/build.py) is a tiny random model with SpatialVLA's
remote-code interface, loaded exactly as the real one (``AutoModel`` / ``AutoProcessor``, ``trust_remote_code``);
peft, bitsandbytes 4-bit, transformers and the training loop are real. OpenVLA's action codec is checked on arrays.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "standins"))
from build import STATS, UNNORM_KEY, build_spatialvla  # noqa: E402

from conftest import synthetic_dataset  # noqa: E402
from refinevla import bases  # noqa: E402
from refinevla.bases import RemoteBase, RemotePolicy, RemoteVLA  # noqa: E402
from refinevla.sequences import ACTION, PREFIX, REASON  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return build_spatialvla(tmp_path_factory.mktemp("spatialvla"))


@pytest.fixture(scope="module")
def loaded(standin):
    model, processor = bases.load_remote(standin, "spatialvla")
    return model, processor, RemoteBase("spatialvla", processor, model.config)


def _model_cfg(standin, **kw):
    from refinevla.config import ModelConfig

    args = dict(base="spatialvla", checkpoint=str(standin), quantization="4bit", tune_top_k_layers=1, lora_r=4,
                lora_alpha=8, action_chunk=4)
    return ModelConfig(**{**args, **kw})


def _train_cfg(**kw):
    from refinevla.config import TrainConfig

    args = dict(arm="refinevla", use_rationale=True, lambda_reason=0.5, steps=3, batch_size=4, lr=5e-3,
                warmup_steps=1, log_every=1, checkpoint_every=100, threads=1, cache_frozen=False)
    return TrainConfig(**{**args, **kw})


def _chunk(seed=0):
    rng = np.random.default_rng(seed)
    low, high = np.asarray(STATS["action"]["q01"]), np.asarray(STATS["action"]["q99"])
    chunk = rng.uniform(low, high, (4, 7))
    chunk[:, 6] = [1, 1, 0, 0]
    return chunk


# ------------------------------------------------------------------------------------------ loading
def test_standin_loads_through_the_adapter(standin, loaded, tmp_path):
    model, processor, base = loaded
    assert bases.detect_kind(standin) == "spatialvla"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "paligemma"}))
    assert bases.detect_kind(tmp_path) == "paligemma"
    assert type(model).__name__ == "SpatialVLAForConditionalGeneration"
    assert type(processor).__name__ == "SpatialVLAProcessor"
    assert (base.action_chunk, base.tokens_per_action, base.n_action_tokens) == (4, 3, 12)
    assert base.unnorm_key == UNNORM_KEY and base.stats["q99"] == STATS["action"]["q99"]
    assert base.action_ids[0] == model.config.action_token_begin_idx and base.action_ids[-1] == len(processor.tokenizer) - 1


def test_unknown_unnorm_key_is_refused_in_one_line(loaded):
    model, processor, _ = loaded
    with pytest.raises(ValueError, match=r"model.unnorm_key='nope/1.0'.*bridge_orig/1.0.0"):
        RemoteBase("spatialvla", processor, model.config, "nope/1.0")


# ------------------------------------------------------------------------------------ sequences
def test_targets_are_the_bases_own_action_tokens(loaded):
    """Our prompt and action target equal what SpatialVLA's processor builds for its own training (suffix_actions)."""
    model, processor, base = loaded
    chunk = _chunk()
    own = processor(images=[np.zeros((32, 32, 3), np.uint8)], text="pick up the red cube", unnorm_key=UNNORM_KEY,
                    suffix_actions=bases.normalize(chunk, base.stats), return_tensors="pt")
    ids = own["input_ids"][0].tolist()
    n_prompt = int((own["token_type_ids"][0] == 0).sum())
    assert base.prompt_ids("pick up the red cube") == ids[:n_prompt]
    assert base.action_to_ids(chunk) == ids[n_prompt:-1]  # their suffix ends with <eos>
    at = processor.action_tokenizer
    act = np.asarray(base.action_to_ids(chunk)).reshape(4, 3)
    assert (act[:, 0] <= at.translation_tokenizer.token_end_idx).all()
    assert (act[:, 1] >= at.rotation_tokenizer.token_start_idx).all() and (act[:, 2] > at.rotation_tokenizer.token_end_idx).all()
    decoded = base.ids_to_actions(act.reshape(-1))
    assert decoded.shape == (4, 7) and decoded.dtype == np.float32
    assert (decoded[:, 6] == chunk[:, 6]).all()  # the gripper is not normalised and decodes exactly
    low, high = np.asarray(STATS["action"]["q01"]), np.asarray(STATS["action"]["q99"])
    assert ((decoded[:, :6] >= low[:6] - 1e-6) & (decoded[:, :6] <= high[:6] + 1e-6)).all()
    np.testing.assert_allclose(decoded, processor.decode_actions(torch.as_tensor(act.reshape(1, -1)), UNNORM_KEY)["actions"],
                               rtol=1e-6)


def test_rationale_is_target_text_before_the_action_tokens(loaded):
    _, _, base = loaded
    chunk, text = _chunk(), "observation : the cube is left . plan : move left then grasp"
    ids, types, part = base.build_sequence("pick up the red cube", chunk, text)
    prompt, reason, actions = base.prompt_ids("pick up the red cube"), base.text_ids(text), base.action_to_ids(chunk)
    n, r = len(prompt), len(reason)
    assert ids == prompt + reason + actions and len(actions) == 12
    assert types == [0] * n + [1] * (r + 12)
    assert part == [PREFIX] * n + [REASON] * r + [ACTION] * 12
    ids_after, _, part_after = base.build_sequence("pick up the red cube", chunk, text, position="after")
    assert ids_after == prompt + actions + reason and part_after[n:n + 12] == [ACTION] * 12
    baseline, _, part_base = base.build_sequence("pick up the red cube", chunk, None)
    assert baseline == prompt + actions and REASON not in part_base


def test_targets_are_causal_through_the_wrapper(loaded):
    """The wrapper passes labels so the remote code builds its prefix-LM mask: a later target token cannot change an
    earlier target's logits. Without labels SpatialVLA's first pass is bidirectional (the leak the wrapper avoids)."""
    model, _, base = loaded
    vla = RemoteVLA(model, base).eval()
    ids, types, _ = base.build_sequence("pick up the red cube", _chunk(), "the cube is left . plan : move left")
    t, tt = torch.as_tensor([ids, ids]), torch.as_tensor([types, types])
    t[1, -1] = int(base.action_ids[5])  # change the last target token of row 1
    pixels = torch.zeros(2, 3, 32, 32)
    with torch.no_grad():
        logits = vla(input_ids=t, pixel_values=pixels, attention_mask=torch.ones_like(t), token_type_ids=tt).logits
        torch.testing.assert_close(logits[0, :-1], logits[1, :-1])
        raw = model(**{k: v for k, v in base.model_inputs(t, pixels, torch.ones_like(t), tt).items() if k != "labels"})
    assert not torch.allclose(raw.logits[0, :-1], raw.logits[1, :-1])


# --------------------------------------------------------------------------------------- training
def test_finetune_step_splits_the_loss_and_trains_only_top_k_lora_and_head(standin, tmp_path):
    from refinevla import train
    from refinevla.model import add_lora, lora_layer_indices

    ds = synthetic_dataset(size=32)
    mcfg = _model_cfg(standin)
    model, layout = bases.load_for_finetune(standin, mcfg, np.asarray(ds["action"]))
    data = layout.encode_dataset(ds, True, chunks=train.action_chunks(ds, 4), texts=list(ds["rationale_text"]))
    assert data["input_ids"].shape[0] == len(ds) and data["images"].shape == (len(ds), 32, 32, 3)
    head_ids = np.unique(np.concatenate([data["input_ids"][data["part"] != PREFIX], layout.action_ids]))
    vla = RemoteVLA(add_lora(model, mcfg, trainable_token_ids=head_ids.tolist()), layout)
    trainable = [n for n, p in vla.named_parameters() if p.requires_grad]
    assert lora_layer_indices(vla) == [2]  # the top 1 of 3 language layers
    assert all(("layers.2." in n and "lora_" in n) or "lm_head" in n for n in trainable), trainable
    before = {n: p.detach().float().clone() for n, p in vla.named_parameters()}
    last = train.train_loop(vla, data, _train_cfg(steps=2), tmp_path / "run")
    assert last["l_action"] > 0 and last["l_reason"] > 0
    assert last["loss"] == pytest.approx(last["l_action"] + 0.5 * last["l_reason"], rel=1e-5)
    changed = {n for n, p in vla.named_parameters() if not torch.equal(p.detach().float(), before[n])}
    assert changed and changed <= set(trainable)
    assert any("lm_head" in n for n in changed) and any("lora_B" in n for n in changed)
    # the adapter saved and loaded again (base in 4-bit, head untied, LoRA + head rows) computes the same logits
    out = tmp_path / "model"
    vla.save_pretrained(out)
    layout.save(out)
    (out / "vla.json").write_text(json.dumps({"kind": "adapter", "base": str(standin), "quantization": "4bit"}))
    loaded, _ = bases.load_finetuned_remote(out)
    batch = train.to_batch(data, np.arange(3), 32, "cpu")
    batch.pop("part")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**batch).logits, vla.eval()(**batch).logits, rtol=1e-4, atol=1e-4)


def test_gradient_checkpointing_changes_no_number_on_the_remote_base(standin):
    from refinevla import train
    from refinevla.model import add_lora

    ds = synthetic_dataset(size=32)
    mcfg = _model_cfg(standin, quantization="none", tune_top_k_layers=2)
    results = []
    for checkpointing in (False, True):
        model, layout = bases.load_for_finetune(standin, mcfg, np.asarray(ds["action"]))
        data = layout.encode_dataset(ds, True, chunks=train.action_chunks(ds, 4), texts=list(ds["rationale_text"]))
        torch.manual_seed(0)
        vla = RemoteVLA(add_lora(model, mcfg, trainable_token_ids=layout.action_ids.tolist(),
                                 gradient_checkpointing=checkpointing), layout).train()
        batch = train.to_batch(data, np.arange(4), 32, "cpu")
        part = batch.pop("part")
        loss = train.joint_loss(vla(**batch).logits, batch["input_ids"], part, 0.5)[0]
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in vla.named_parameters() if "lora_A" in n}))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=1e-5, atol=1e-7)


def test_finetune_saves_and_the_policy_acts_in_chunks_of_4(standin, tmp_path):
    from refinevla import train
    from refinevla.policy import load_policy

    ds = synthetic_dataset(size=32)
    out = train.finetune(ds, standin, _model_cfg(standin, unnorm_key="toy/1.0"), _train_cfg(), tmp_path / "ft",
                         heldout_every=0)
    meta = json.loads((out / "vla.json").read_text())
    saved = RemoteBase.read(out)
    assert meta["base_kind"] == "spatialvla" and meta["reasons_at_inference"] and (out / "adapter_config.json").exists()
    assert saved["unnorm_key"] == "toy/1.0"  # not among the base's statistics: fit on the data
    np.testing.assert_allclose(saved["stats"]["q99"][:6], np.quantile(np.asarray(ds["action"]), 0.99, 0)[:6])
    policy = load_policy(out, max_rationale_tokens=5)
    assert isinstance(policy, RemotePolicy) and policy.reasoning
    row = ds[0]
    text, actions = policy.predict(np.asarray(row["image"]), row["instruction"])
    assert isinstance(text, str) and actions.shape == (4, 7) and actions.dtype == np.float32
    low, high = np.asarray(saved["stats"]["q01"]), np.asarray(saved["stats"]["q99"])
    assert ((actions[:, :6] >= low[:6] - 1e-5) & (actions[:, :6] <= high[:6] + 1e-5)).all()
    assert set(np.unique(actions[:, 6])) <= {0.0, 1.0}
    obs = dict(image=np.asarray(row["image"]), state=np.asarray(row["state"]), instruction=row["instruction"])
    policy.reset(row["instruction"])
    steps = [policy.act(obs) for _ in range(5)]
    assert all(a.shape == (7,) for a in steps) and policy.slots[0]["decodes"] == 2  # one decode per 4 steps
    from refinevla.backends import uses_state
    from refinevla.rollout import current_rationale

    assert current_rationale(policy, 0) == policy.slots[0]["last_rationale"] and not uses_state(policy)


def test_zero_shot_base_acts_first_row_of_the_paper_table(standin):
    from refinevla.policy import load_policy

    policy = load_policy(standin, reasoning=False)
    assert isinstance(policy, RemotePolicy) and not policy.reasoning
    image = np.full((32, 32, 3), 90, np.uint8)
    rationale, ids = policy.decode(image, "pick up the red cube", reasoning=False)
    assert rationale == [] and len(ids) == 12
    text, actions = policy.predict(image, "pick up the red cube")
    assert text == "" and actions.shape == (4, 7)
    np.testing.assert_allclose(actions, policy.base.ids_to_actions(ids))
    low, high = np.asarray(STATS["action"]["q01"]), np.asarray(STATS["action"]["q99"])
    assert ((actions[:, :6] >= low[:6] - 1e-6) & (actions[:, :6] <= high[:6] + 1e-6)).all()
    with pytest.raises(ValueError, match="teacher_rationale"):
        load_policy(standin, teacher_rationale=True)


# --------------------------------------------------------------------------------- OpenVLA, config
def test_openvla_codec_matches_its_action_tokenizer():
    """OpenVLA's ActionTokenizer / predict_action: digitize on linspace(-1, 1, 256), token = vocab - bin, decode
    to the bin centre of vocab - id - 1; BOUNDS_Q99 un-normalisation with the gripper unmasked."""
    rng = np.random.default_rng(0)
    norm = rng.uniform(-1, 1, (50, 7))
    ids = bases.openvla_action_ids(norm, 32000)
    assert ids.min() >= 32000 - 256 and ids.max() <= 31999
    assert np.abs(bases.openvla_normalized(ids, 32000) - norm).max() <= 2 / 255 + 1e-9
    stats = {"q01": [-1.0] * 6 + [0.0], "q99": [3.0] * 6 + [1.0], "mask": [True] * 6 + [False]}
    raw = rng.uniform(-1, 3, (5, 7))
    raw[:, 6] = [0, 1, 1, 0, 1]
    np.testing.assert_allclose(bases.unnormalize(bases.normalize(raw, stats), stats), raw, rtol=1e-5, atol=1e-6)


def test_openvla_layout_on_its_config_and_processor_fields():
    """OpenVLA's prompt, action tokens, fused-backbone pixels and patch-free logits, from the config and processor
    fields its remote code defines (a stand-in config / processor: OpenVLA's code needs timm and 15 GB of weights)."""
    from types import SimpleNamespace

    from build import build_tokenizer

    stats = {"q01": [-0.02] * 6 + [0.0], "q99": [0.02] * 6 + [1.0], "mask": [True] * 6 + [False]}
    config = SimpleNamespace(text_config=SimpleNamespace(vocab_size=32064), pad_to_multiple_of=64, n_action_bins=256,
                             image_sizes=[224, 224], norm_stats={"bridge_orig": {"action": stats}})
    means, stds = [(0.485, 0.456, 0.406), (0.5, 0.5, 0.5)], [(0.229, 0.224, 0.225), (0.5, 0.5, 0.5)]
    processor = SimpleNamespace(tokenizer=build_tokenizer(), image_processor=SimpleNamespace(means=means, stds=stds))
    base = RemoteBase("openvla", processor, config)
    assert (base.unnorm_key, base.action_chunk, base.n_action_tokens, base.image_size) == ("bridge_orig", 1, 7, 224)
    assert base.prompt_ids("Pick up the cube")[-1] == bases.OPENVLA_EMPTY
    action = np.array([0.01, -0.01, 0.0, 0.005, -0.02, 0.02, 1.0])
    ids = base.action_to_ids(action)
    assert len(ids) == 7 and all(31744 <= t < 32000 for t in ids)
    decoded = base.ids_to_actions(ids)[0]
    np.testing.assert_allclose(decoded[:6], action[:6], atol=0.04 / 255)  # within a bin of the q01..q99 range
    assert 0.99 < decoded[6] < 1.0  # the unmasked gripper decodes to the last bin centre, as predict_action does
    x = torch.linspace(-1, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    ids_t = torch.ones(2, 5, dtype=torch.long)
    inputs = base.model_inputs(ids_t, x, torch.ones_like(ids_t), torch.zeros_like(ids_t))
    assert inputs["pixel_values"].shape == (2, 6, 4, 4) and "token_type_ids" not in inputs
    torch.testing.assert_close(inputs["pixel_values"][:, 3:], x)  # SigLIP's 0.5 / 0.5 gives back [-1, 1]
    torch.testing.assert_close(inputs["pixel_values"][:, 0], ((x[:, 0] + 1) / 2 - 0.485) / 0.229)
    logits = torch.arange(2 * (5 + 3)).float().reshape(2, 8, 1)  # 3 image patches after <bos>
    kept = base.align_logits(logits, 5)
    assert kept.shape == (2, 5, 1) and kept[0, :, 0].tolist() == [0, 4, 5, 6, 7]


def test_model_config_base_field_and_paper_preset(standin):
    from refinevla import config
    from refinevla.fields import ConfigError

    with pytest.raises((ConfigError, ValueError), match=r"checkpoint='': expected a hub id"):
        config.ModelConfig(base="spatialvla")
    with pytest.raises((ConfigError, ValueError), match=r"base='octo'"):
        config.ModelConfig(base="octo", checkpoint="x")
    paper = config.resolve("paper").model
    assert (paper.base, paper.checkpoint, paper.action_chunk) == ("spatialvla", "IPEC-COMMUNITY/spatialvla-4b-224-pt", 4)
    assert paper.unnorm_key == ""  # per robot: Bridge on WidowX, Fractal on Google Robot (RemoteBase.select_robot)
