"""Attention maps and the attention-on-target score: arithmetic on hand-made tensors and masks, then the
extraction on a 4-bit + LoRA tiny model and the whole stage on a two-task toy dataset."""
import math

import numpy as np
import pytest

from refinevla import attention as A


def one_hot_attention(n_layers, heads, length, rows, col):
    """Causal uniform attention everywhere except ``rows``, which put all their mass on key ``col``."""
    att = np.tril(np.ones((length, length)))
    att /= att.sum(-1, keepdims=True)
    att[rows] = 0.0
    att[rows, col] = 1.0
    return np.broadcast_to(att, (n_layers, heads, length, length)).copy()


# ------------------------------------------------------------------------------------ aggregation
def test_query_positions_predict_the_chosen_tokens():
    # prompt of 10 tokens, 3 rationale tokens at 10..12, marker at 13, action bins at 14..20
    assert A.query_positions(10, 3, "action") == [13, 14, 15, 16, 17, 18, 19]
    assert A.query_positions(10, 3, "rationale") == [9, 10, 11]
    assert A.query_positions(10, 0, "action") == list(range(10, 17))
    assert A.query_positions(10, 0, "rationale") == []


def test_all_mass_on_one_patch_peaks_there():
    n_image, length = 16, 16 + 6 + 8
    queries = A.query_positions(22, 0, "action")
    att = one_hot_attention(2, 3, length, queries, col=6)
    vec, mass = A.image_attention(att, queries, n_image, layer=-1, aggregation="mean_heads")
    grid = A.to_grid(vec)
    assert grid.shape == (4, 4) and mass == pytest.approx(1.0)
    assert np.unravel_index(grid.argmax(), grid.shape) == (1, 2)  # row-major: patch 6 = row 1, column 2
    assert grid[1, 2] == pytest.approx(1.0) and grid.sum() == pytest.approx(1.0)
    up = A.upsample(grid, (32, 32), mode="nearest")
    assert up.shape == (32, 32) and up[8:16, 16:24].min() == pytest.approx(1.0) and up.sum() == pytest.approx(64)


def test_mean_over_heads_and_layer_choice():
    n_image, length = 4, 8
    att = np.zeros((2, 2, length, length))
    att[..., 0] = 1.0                       # every row on patch 0 ...
    att[1, 0, 6] = 0.0
    att[1, 0, 6, 3] = 1.0                   # ... except head 0 of layer 1 at query 6: patch 3
    vec, _ = A.image_attention(att, [6], n_image, layer=-1)
    np.testing.assert_allclose(vec, [0.5, 0, 0, 0.5])
    vec0, _ = A.image_attention(att, [6], n_image, layer=0)
    np.testing.assert_allclose(vec0, [1, 0, 0, 0])
    with pytest.raises(ValueError, match="decoder has 2 layers"):
        A.image_attention(att, [6], n_image, layer=2)


def test_image_mass_and_normalisation():
    att = np.zeros((1, 1, 6, 6))
    att[0, 0, :, 0], att[0, 0, :, 1], att[0, 0, :, 5] = 0.1, 0.3, 0.6  # 0.4 on the 4 patches, 0.6 on text
    vec, mass = A.image_attention(att, [5], 4)
    assert mass == pytest.approx(0.4)
    np.testing.assert_allclose(vec, [0.25, 0.75, 0, 0])
    vec, mass = A.image_attention(att, [], 4)
    assert np.isnan(vec).all() and math.isnan(mass)


def test_rollout_by_hand():
    # two heads averaging to [[1, 0], [.5, .5]]; then a layer sending token 1 entirely to token 0
    layer0 = np.array([[[1, 0], [1, 0]], [[1, 0], [0, 1]]], float)
    layer1 = np.array([[[1, 0], [1, 0]]], float).repeat(2, 0)
    r = A.rollout([layer0, layer1], layer=-1, residual=0.5)
    # A0' = .5 [[1,0],[.5,.5]] + .5 I = [[1,0],[.25,.75]]; A1' = [[1,0],[.5,.5]]; R = A1' A0'
    np.testing.assert_allclose(r, [[1, 0], [0.625, 0.375]])
    np.testing.assert_allclose(A.rollout([layer0, layer1], layer=0), [[1, 0], [0.25, 0.75]])
    np.testing.assert_allclose(r.sum(-1), 1.0)


def test_rollout_through_identity_layers_equals_the_single_layer_map():
    rng = np.random.default_rng(0)
    n_image, length, heads = 9, 15, 2
    eye = np.broadcast_to(np.eye(length), (heads, length, length))
    middle = np.tril(rng.random((heads, length, length)))
    middle /= middle.sum(-1, keepdims=True)
    att = np.stack([eye, middle, eye])
    queries = [11, 12, 13]
    want, _ = A.image_attention(att, queries, n_image, layer=1, aggregation="mean_heads")
    got, _ = A.image_attention(att, queries, n_image, layer=-1, aggregation="rollout")
    np.testing.assert_allclose(got, want, atol=1e-12)


# ------------------------------------------------------------------------------------------ score
def square_mask(size=8, rows=slice(0, 2), cols=slice(0, 2)):
    m = np.zeros((size, size), np.uint8)
    m[rows, cols] = 255
    return m


def test_score_arithmetic_on_hand_made_masks():
    mask = square_mask()                     # 8x8 frame, 4x4 patch grid: the mask is exactly patch (0, 0)
    np.testing.assert_allclose(A.mask_coverage(mask, 4), np.pad([[1.0]], ((0, 3), (0, 3))))
    inside = np.zeros((4, 4))
    inside[0, 0] = 1
    s = A.target_score(inside, mask)
    assert s["reason"] == "" and s["share"] == 1.0 and s["mask_share"] == 1 / 16 and s["lift"] == 16.0
    outside = np.zeros((4, 4))
    outside[3, 3] = 1
    assert A.target_score(outside, mask)["share"] == 0.0 and A.target_score(outside, mask)["lift"] == 0.0
    uniform = np.full((4, 4), 1 / 16)
    assert A.target_score(uniform, mask)["lift"] == pytest.approx(1.0)
    half = square_mask(rows=slice(0, 1))     # covers half of patch (0, 0)
    assert A.target_score(inside, half)["share"] == pytest.approx(0.5)
    assert A.target_score(inside, half)["lift"] == pytest.approx(16.0)  # 0.5 / (0.5 / 16)
    split = np.zeros((4, 4))
    split[0, 0], split[2, 2] = 0.25, 0.75
    assert A.target_score(split, mask)["share"] == pytest.approx(0.25)
    full = np.full((8, 8), 255, np.uint8)
    assert A.target_score(split, full)["lift"] == pytest.approx(1.0)


def test_empty_or_missing_mask_is_undefined():
    uniform = np.full((4, 4), 1 / 16)
    s = A.target_score(uniform, np.zeros((8, 8), np.uint8))
    assert math.isnan(s["share"]) and math.isnan(s["lift"]) and "not visible" in s["reason"]
    s = A.target_score(uniform, None)
    assert math.isnan(s["lift"]) and "no target mask" in s["reason"]
    s = A.target_score(uniform, square_mask(rows=slice(0, 1), cols=slice(0, 1)), min_mask_pixels=2)
    assert math.isnan(s["lift"]) and "1 mask pixels" in s["reason"]
    s = A.target_score(np.full((4, 4), np.nan), square_mask())
    assert math.isnan(s["lift"]) and "no attention map" in s["reason"]


def test_summary_table_counts_undefined_and_uses_t_intervals():
    recs = [dict(model="m", task="t", frame_index=i, share=s, lift=s * 4, mask_share=0.25, image_mass=0.5,
                 reason="") for i, s in enumerate([0.4, 0.5, 0.6])]
    recs.append(dict(model="m", task="t", frame_index=3, share=np.nan, lift=np.nan, mask_share=np.nan,
                     image_mass=0.5, reason="target not visible (occluded or out of view: 0 mask pixels)"))
    table = A.summarise(recs)
    assert list(table.columns) == A.TABLE_COLUMNS and len(table) == 1
    row = table.iloc[0]
    assert row["n_frames"] == 4 and row["n_undefined"] == 1 and row["share"] == pytest.approx(0.5)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t_{0.975, 2} * s / sqrt(n)
    assert row["share_ci_low"] == pytest.approx(0.5 - half) and row["share_ci_high"] == pytest.approx(0.5 + half)
    assert row["lift"] == pytest.approx(2.0) and row["lift_ci_high"] == pytest.approx(2.0 + 4 * half)
    clipped = A.summarise([dict(r, share=r["share"] - 0.3) for r in recs]).iloc[0]
    assert clipped["share_ci_low"] == 0.0  # a share interval never leaves [0, 1]
    assert "target not visible (1)" in row["undefined_reasons"]
    other = [dict(r, model="n", lift=r["lift"] + 1) for r in recs]
    paired = A.paired_difference(recs + other, reference="m")
    assert paired.iloc[0]["n_pairs"] == 3 and paired.iloc[0]["diff"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------ frame choice
def masked_dataset(steps=3):
    """Two tasks of two episodes; task "b"'s second episode never shows the target (empty masks)."""
    import datasets
    from conftest import synthetic_rows

    rows = synthetic_rows(n_episodes=4, steps=steps)
    for r in rows:
        e = r["episode_index"]
        r["task"] = "a" if e < 2 else "b"
        r["instruction"] = "pick up the red cube" if e < 2 else "pick up the green cube"
        m = np.zeros((32, 32), np.uint8)
        if e != 3:
            m[8:16, 16:24] = 255
        r["target_mask"] = m
    ds = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0]})
    return ds.cast_column("image", datasets.Image()).cast_column("target_mask", datasets.Image())


def test_select_frames_is_seeded_and_prefers_visible_targets():
    ds = masked_dataset()
    chosen = A.select_frames(ds, frames_per_task=3, seed=0)
    assert chosen == A.select_frames(ds, frames_per_task=3, seed=0)
    tasks, episodes = ds["task"], ds["episode_index"]
    assert [tasks[i] for i in chosen].count("a") == 3 and [tasks[i] for i in chosen].count("b") == 3
    assert all(episodes[i] != 3 for i in chosen)  # task b has exactly 3 visible rows (episode 2)
    a_eps = {episodes[i] for i in chosen if tasks[i] == "a"}
    assert a_eps == {0, 1}                          # spread over episodes before a second frame of one
    more = A.select_frames(ds, frames_per_task=4, seed=0)
    assert sum(episodes[i] == 3 for i in more) == 1  # the fourth "b" frame can only be an empty-mask one


def test_plot_attention_raw_frame_beside_overlays_with_colorbar_and_mask():
    """Each row: the raw frame, one upsampled overlay per model, the target outlined, a colorbar; an undefined map
    is labelled, not drawn."""
    import matplotlib.pyplot as plt

    from refinevla import figures

    frames = [np.zeros((32, 32, 3), np.uint8)] * 2
    grid = np.zeros((4, 4))
    grid[1, 1] = 1.0
    fig = figures.plot_attention(frames, {"baseline": [grid, grid], "refinevla": [grid, np.full((4, 4), np.nan)]},
                                 ["pick up the cube", "lift it"],
                                 masks=[square_mask(32, slice(8, 16), slice(8, 16)), None], scale=4)
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes[:3]] == ["camera frame", "baseline", "ReFineVLA"]
    assert axes[0].get_ylabel() == "pick up the cube"
    overlay = axes[1].get_images()[1].get_array()
    assert overlay.shape == (128, 128)                       # upsampled to 4x the 32-px frame
    peak = np.unravel_index(np.nanargmax(overlay), overlay.shape)
    assert 32 <= peak[0] < 64 and 32 <= peak[1] < 64          # the patch (1, 1) of a 4 x 4 grid
    assert axes[3].get_ylabel().startswith("attention")      # the row's colorbar
    assert len(axes[0].collections) == 1 and len(axes[4].collections) == 0   # mask outline only where one exists
    assert any(t.get_text() == "undefined" for t in axes[6].texts)
    plt.close(fig)


# ---------------------------------------------------------------------------- a 4-bit + LoRA tiny model
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A micro base (3 steps) and two 4-bit + LoRA fine-tunes of it (2 steps each): refinevla and baseline."""
    import torch
    from conftest import synthetic_dataset

    from refinevla.model import ModelConfig
    from refinevla.train import TrainConfig, finetune, pretrain_base

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("attention_models")
    ds = synthetic_dataset()
    common = dict(batch_size=4, lr=3e-3, warmup_steps=1, log_every=10, threads=1)
    base = pretrain_base(ds, ModelConfig(size="micro"),
                         TrainConfig(arm="pretrain", use_rationale=False, steps=3, **common), root / "pretrain")
    ft = ModelConfig(size="micro", tune_top_k_layers=1, quantization="4bit")
    refine = finetune(ds, base, ft, TrainConfig(arm="refinevla", steps=2, **common), root / "refinevla")
    baseline = finetune(ds, base, ft, TrainConfig(arm="baseline", use_rationale=False, lambda_reason=0.0,
                                                  steps=2, **common), root / "baseline")
    return dict(base=base, refinevla=refine, baseline=baseline)


def test_extraction_on_4bit_lora_model(tiny_models):
    import torch

    from refinevla.model import num_image_tokens
    from refinevla.policy import load_vla

    model, tok, meta = load_vla(tiny_models["refinevla"])
    assert type(model).__name__ == "PeftModel"
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    row = masked_dataset()[0]
    image, state = np.asarray(row["image"]), np.asarray(row["state"])
    n_image = num_image_tokens(model)
    g = math.isqrt(n_image)

    rationale, action = A.decode_frame(model, tok, image, row["instruction"], state, reasoning=True,
                                       max_rationale_tokens=8)
    assert len(rationale) <= 8 and len(action) == 7 and all(t in set(tok.action_ids.tolist()) for t in action)
    att, n_prompt = A.forward_attentions(model, tok, image, row["instruction"], state, rationale, action)
    n_target = len(rationale) + 1 + 7
    assert att.shape == (model.config.text_config.num_hidden_layers, model.config.text_config.num_attention_heads,
                         n_prompt + n_target, n_prompt + n_target)
    np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-5)
    # the training mask: a target position never sees a later one; the prefix is bidirectional
    target = slice(n_prompt, n_prompt + n_target)
    assert np.triu(att[:, :, target, target], k=1).max() == 0.0
    assert att[:, :, 0, n_prompt - 1].max() > 0.0

    # the query rows are the ones that predict the action: teacher-forced argmax over the bins = the decoded bins
    prompt = tok.prompt_ids(row["instruction"], state, n_image)
    from refinevla.model import image_size, preprocess_images
    ids = prompt + rationale + [tok.marker_id] + action
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), pixel_values=preprocess_images(image, image_size(model)),
                       token_type_ids=torch.tensor([[0] * len(prompt) + [1] * n_target])).logits[0]
    queries = A.query_positions(n_prompt, len(rationale), "action")
    bins = torch.as_tensor(tok.action_ids)
    assert [int(bins[logits[q, bins].argmax()]) for q in queries] == action

    for aggregation in A.AGGREGATIONS:
        for query in A.QUERIES:
            cfg = A.AttentionConfig(aggregation=aggregation, query=query, max_rationale_tokens=8)
            res = A.frame_attention(model, tok, image, row["instruction"], state, cfg, reasoning=True)
            assert res["map"].shape == (g, g)
            if res["n_queries"]:
                assert res["map"].sum() == pytest.approx(1.0) and (res["map"] >= 0).all()
                assert 0 < res["image_mass"] <= 1 + 1e-6
    # a model that writes no rationale has nothing to read for query="rationale": an undefined map, not a number
    res = A.frame_attention(model, tok, image, row["instruction"], state, A.AttentionConfig(query="rationale"),
                            reasoning=False)
    assert res["n_queries"] == 0 and np.isnan(res["map"]).all() and res["map"].shape == (g, g)
    assert "no attention map" in A.target_score(res["map"], row["target_mask"])["reason"]


def test_run_attention_stage(tiny_models, tmp_path):
    import pandas as pd

    ds = masked_dataset()
    cfg = A.AttentionConfig(frames_per_task=4, seed=0, max_rationale_tokens=8, overlay_frames=3, threads=1)
    models = {"baseline": tiny_models["baseline"], "refinevla": tiny_models["refinevla"]}
    table = A.score_models(models, ds, cfg, tmp_path)
    assert list(table.columns) == A.TABLE_COLUMNS
    assert set(table["task"]) == {"a", "b", "(all)"} and set(table["model"]) == set(models)
    b = table[(table["task"] == "b")]
    assert (b["n_frames"] == 4).all() and (b["n_undefined"] == 1).all()   # the empty-mask frame
    assert (table[table["task"] == "a"]["n_undefined"] == 0).all()
    assert table["share"].between(0, 1).all() and (table["lift"] > 0).all()
    for name in ("maps.npz", "scores.csv", "frames.csv", "paired.csv", "overlays.png", "scores.png"):
        assert (tmp_path / name).exists(), name
    saved = A.load_maps(tmp_path / "maps.npz")
    assert list(saved["maps"]) == ["baseline", "refinevla"]
    assert saved["maps"]["refinevla"].shape == (8, 4, 4)
    # the rationale tokens' maps, from the same pass: defined only for the model that writes a rationale
    assert np.isnan(saved["rationale_maps"]["baseline"]).all()
    wrote = np.isfinite(saved["rationale_maps"]["refinevla"]).all(axis=(1, 2))
    assert wrote.any()
    np.testing.assert_allclose(saved["rationale_maps"]["refinevla"][wrote].sum(axis=(1, 2)), 1.0, atol=1e-5)
    assert list(saved["frame_index"]) == A.select_frames(ds, 4, 0)
    frames = pd.read_csv(tmp_path / "frames.csv", keep_default_na=False)
    undefined = frames[frames["reason"] != ""]
    assert len(undefined) == 2 and undefined["episode_index"].eq(3).all()
    assert pd.read_csv(tmp_path / "scores.csv").shape == table.shape
    pd.testing.assert_frame_equal(A.summarise(pd.read_csv(tmp_path / "frames.csv")), table)


def test_the_book_draws_action_and_rationale_maps_from_the_stage_outputs(tiny_models, tmp_path):
    """report.attention_views reads a run's attention/ and annotate/dataset back into plot_attention's inputs:
    the action tokens' maps of both models, the rationale tokens' maps of the model that wrote one."""
    import matplotlib.pyplot as plt

    from refinevla import figures, report

    ds = masked_dataset()
    ds.save_to_disk(str(tmp_path / "annotate" / "dataset"))
    cfg = A.AttentionConfig(frames_per_task=2, seed=0, max_rationale_tokens=8, overlay_frames=2, threads=1,
                            open_loop=False)
    A.score_models({"baseline": tiny_models["baseline"], "refinevla": tiny_models["refinevla"]}, ds, cfg,
                    tmp_path / "attention")
    views = report.attention_views(tmp_path, n=3)
    assert list(views) == ["action", "rationale"]
    frames, maps, titles, masks, notes = views["action"]
    assert len(frames) == 3 and frames[0].shape[2] == 3 and list(maps) == ["baseline", "refinevla"]
    assert maps["refinevla"].shape == (3, 4, 4) and notes["baseline"][0].startswith("share ")
    assert list(views["rationale"][1]) == ["refinevla"]
    fig = figures.plot_attention(*views["rationale"], title="rationale tokens")
    assert [ax.get_title() for ax in fig.axes[:2]] == ["camera frame", "ReFineVLA"]
    plt.close(fig)


def test_open_loop_action_errors(tiny_models, tmp_path):
    """frames.csv scores each decoded action against the expert's; the ReFineVLA model also after the
    teacher's rationale, which must be what it is actually conditioned on (a different rationale can change
    the action; the same one gives the same action as the policy)."""
    import pandas as pd

    from refinevla import diagnostics as D
    from refinevla.policy import VLAPolicy, load_vla

    model, tok, _ = load_vla(tiny_models["refinevla"])
    expert = np.array([0.8, 0.1, -0.5, 0, 0, 0, 1.0], np.float32)
    exact = D.action_errors(tok, tok.action_to_ids(expert), expert)
    assert exact == {"arm_bin_error": 0.0, "gripper_agrees": True}
    off = tok.ids_to_bins(tok.action_to_ids(expert))
    off[0] -= 6  # 0.8 sits near the top of the symmetric range
    off[6] = 0  # close instead of open
    moved = D.action_errors(tok, [int(tok.action_ids[b]) for b in off], expert, prefix="x_")
    assert moved == {"x_arm_bin_error": 1.0, "x_gripper_agrees": False}

    row = masked_dataset()[0]
    frame = dict(image=np.asarray(row["image"]), instruction=row["instruction"], state=np.asarray(row["state"]),
                 action=row["action"], rationale_text=row["rationale_text"])
    forced = D.teacher_forced_errors(model, tok, frame, max_rationale_tokens=8)
    policy = VLAPolicy(model, tok, reasoning=True, max_rationale_tokens=8)
    _, ids = policy.generate_ids(frame["image"], frame["instruction"], frame["state"],
                                 rationale_ids=tok.text_ids(row["rationale_text"]))
    assert forced == D.action_errors(tok, ids, row["action"], prefix="teacher_rationale_")

    cfg = A.AttentionConfig(frames_per_task=2, seed=0, max_rationale_tokens=8, overlay_frames=2, threads=1)
    A.score_models({"baseline": tiny_models["baseline"], "refinevla": tiny_models["refinevla"]},
                    masked_dataset(), cfg, tmp_path)
    frames = pd.read_csv(tmp_path / "frames.csv")
    assert frames["arm_bin_error"].between(0, 255).all() and frames["gripper_agrees"].isin([True, False]).all()
    assert frames.loc[frames["model"] == "baseline", "teacher_rationale_arm_bin_error"].isna().all()
    assert frames.loc[frames["model"] == "refinevla", "teacher_rationale_arm_bin_error"].notna().all()
    table = D.open_loop_table(frames)
    assert table.loc[("refinevla", "(all)"), "n_frames"] == 4
    assert table.loc[("baseline", "(all)"), "arm_bin_error"] == pytest.approx(
        frames.loc[frames["model"] == "baseline", "arm_bin_error"].mean(), abs=1e-3)
