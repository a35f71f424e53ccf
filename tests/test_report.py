"""Report helpers and figures the book calls: the benchmark tables read the committed benchmarks/results/*.json;
the overview's tables, the success and training figures, episode videos and teacher examples on hand-made inputs.

`pytest tests/test_report.py -q`
"""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from refinevla import figures, report
from refinevla import benchmark_tables

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_tables_show_each_result_with_its_target(tmp_path):
    results = benchmark_tables.read_results(ROOT)
    tables = {name: (table, note) for name, table, note in benchmark_tables.tables(results)}
    assert set(tables) == {p.stem for p in (ROOT / "benchmarks" / "results").glob("*.json")}
    table, note = tables["annotate_throughput"]
    assert list(table["concurrency"][:4]) == [1, 4, 16, 64] and "target ratio >= 0.8" in note
    assert (table["ratio to ideal"].round(2) == (table["requests/s"] / table["ideal/s"]).round(2)).all()
    table, note = tables["train_memory_speed"]
    assert {"fp32_peak_mb", "nf4_peak_mb", "peak_ratio"} <= set(table.columns) and "0.4 x fp32" in note

    # a benchmark the report does not know is still shown, flattened
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "new_one.json").write_text(json.dumps({"a": {"b": 3}, "when": "now"}))
    [(name, table, note)] = benchmark_tables.tables(benchmark_tables.read_results(tmp_path))
    assert name == "new_one" and table.loc["a.b", "value"] == 3 and "now" in note


# ------------------------------------------------------------------------------ pages and figures

def success_frame():
    from refinevla.stats import wilson

    rows = []
    for arm, split, k, n in [("baseline", "in_distribution", 6, 50), ("baseline", "variant", 0, 50),
                             ("refinevla", "in_distribution", 50, 50), ("refinevla", "variant", 3, 50),
                             ("base", "in_distribution", 5, 25)]:
        lo, hi = wilson(k, n)
        rows.append(dict(arm=arm, split=split, successes=k, n=n, rate=k / n, ci_low=lo, ci_high=hi, train_seeds=2))
    return pd.DataFrame(rows)


def paired_frame():
    return pd.DataFrame([dict(arm="refinevla", split="in_distribution", n_pairs=50, ref_rate=0.12, arm_rate=1.0,
                              diff=0.88, diff_low=0.78, diff_high=0.96, b=0, c=44, p_value=1e-13, verdict="better"),
                         dict(arm="refinevla", split="variant", n_pairs=50, ref_rate=0.0, arm_rate=0.06, diff=0.06,
                              diff_low=0.0, diff_high=0.14, b=0, c=3, p_value=0.25,
                              verdict="no resolvable difference")])


def test_headline_table_reads_rates_intervals_and_paired_differences():
    table = report.headline_table(success_frame(), paired_frame())
    assert list(table.columns.get_level_values(0).unique()) == ["in distribution", "variant"]
    row = table.loc[report.ARM_LABELS["refinevla"]]
    assert row[("in distribution", "success [95% interval]")] == "100% [93, 100] (50/50)"
    assert row[("variant", "minus baseline [95% interval], p")] == "+6 [+0, +14], p = 0.25"
    assert table.loc[report.ARM_LABELS["baseline"]][("variant", "minus baseline [95% interval], p")] == "(reference)"
    assert table.loc[report.ARM_LABELS["base"]][("variant", "success [95% interval]")] == ""  # did not run


def test_resolution_table_from_the_episode_counts():
    from refinevla.stats import detectable_difference

    table = report.resolution_table(success_frame())
    assert table.loc[report.ARM_LABELS["baseline"], "episodes per split"] == 50
    assert table.loc[report.ARM_LABELS["base"], "detectable difference (points)"] == (
        f"{100 * detectable_difference(25):.0f}")
    tiny = report.resolution_table(success_frame().assign(n=2))
    assert set(tiny["detectable difference (points)"]) == {"over 100: none"}


def test_tidy_prints_integers_as_integers_and_rounds_the_rest():
    df = pd.DataFrame({"n": [2.0, 3.0], "x": [0.123456, np.nan], "share": [0.5, 1.0], "t": ["a", "b"]})
    out = report.tidy(df, percent=["share"])
    assert list(out["n"]) == [2, 3] and out["x"].iloc[0] == 0.123 and out["x"].iloc[1] == ""
    assert list(out["share"]) == ["50%", "100%"] and list(out["t"]) == ["a", "b"]
    assert "2.0" not in out.to_html()


def test_success_points_keep_their_interval_visible_at_0_and_100_percent():
    import matplotlib.pyplot as plt

    fig = figures.plot_success(success_frame())
    ax_in, ax_var = fig.axes
    assert [t.get_text() for t in ax_in.get_yticklabels()] == ["baseline", "ReFineVLA", "base"]

    def interval(ax, y):  # the thick bar of row y
        bars = [ln for ln in ax.get_lines() if ln.get_linewidth() == 5 and ln.get_ydata()[0] == y]
        return bars[0].get_xdata()
    lo, hi = interval(ax_var, 0)                       # baseline, variant: 0/50
    assert lo == 0 and hi > 5                          # the upper bound shows at 0%
    lo, hi = interval(ax_in, 1)                        # ReFineVLA, in distribution: 50/50
    assert hi == 100 and lo < 95
    assert any(t.get_text() == "0/50" for t in ax_var.texts)
    plt.close(fig)


def test_training_curves_mark_where_the_fine_tunes_start():
    import matplotlib.pyplot as plt

    rows = [dict(arm="pretrain", seed=-1, step=s, l_action=2.0 / s, l_reason=0.0, heldout_l_action=np.nan)
            for s in (10, 20, 30)]
    for arm, seed in [("baseline", 0), ("baseline", 1), ("refinevla", 0)]:
        rows += [dict(arm=arm, seed=seed, step=s, l_action=0.5, l_reason=1.0 if arm == "refinevla" else 0.0,
                      heldout_l_action=np.nan) for s in (5, 10)]
    fig = figures.plot_training_curves(pd.DataFrame(rows))
    pre, fine, reason = fig.axes
    assert pre.get_yscale() == fine.get_yscale() == "linear"
    assert any(ln.get_xdata()[0] == 30 and ln.get_linestyle() == ":" for ln in pre.get_lines())   # the start step
    starts = [ln for ln in fine.get_lines() if ln.get_marker() == "*"]
    assert len(starts) == 1 and starts[0].get_ydata()[0] == pytest.approx(2.0 / 30)
    styles = {ln.get_label(): ln.get_linestyle() for ln in fine.get_lines() if "seed" in ln.get_label()}
    assert styles["baseline, seed 0"] != styles["baseline, seed 1"]
    assert [ln.get_label() for ln in reason.get_lines()] == ["ReFineVLA, seed 0"]
    plt.close(fig)


def write_gif(path, colour):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [Image.new("RGB", (16, 16), colour), Image.new("RGB", (16, 16), (0, 0, 0))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def test_episode_videos_one_success_and_one_failure_per_split(tmp_path):
    assert report.episode_videos(tmp_path) == ""                      # no videos yet: the page still builds
    ev = tmp_path / "evaluate"
    write_gif(ev / "baseline" / "seed0" / "videos" / "pick_cube_in_distribution_success.gif", (255, 0, 0))
    write_gif(ev / "refinevla" / "seed0" / "videos" / "pick_cube_in_distribution_success.gif", (0, 255, 0))
    write_gif(ev / "refinevla" / "seed0" / "videos" / "pick_cube_in_distribution_failure.gif", (0, 0, 255))
    write_gif(ev / "base" / "videos" / "pick_cube_variant_failure.gif", (9, 9, 9))
    html = report.episode_videos(tmp_path)
    captions = [c.split("</figcaption>")[0] for c in html.split("<figcaption>")[1:]]
    assert captions == ["refinevla, seed0: in distribution, success", "refinevla, seed0: in distribution, failure",
                        "base: variant, failure"]
    assert html.count("data:image/gif;base64,") == 3


def test_teacher_examples_show_the_frame_and_the_four_parts():
    import datasets

    parts = {"observation": "two cubes", "situation_analysis": "gripper open", "spatial_reasoning": "2 cm left",
             "task_planning": "close <now>"}
    ds = datasets.Dataset.from_dict({
        "task": ["pick_cube"] * 3, "episode_index": [0, 0, 0], "step_index": [0, 1, 2],
        "rationale_source_step": [0, 0, 2], "instruction": ["pick up the red cube"] * 3,
        "image": [np.full((8, 8, 3), 100, np.uint8)] * 3, "rationale": [json.dumps(parts)] * 3,
        "rationale_text": ["x"] * 3}, features=datasets.Features({
            "task": datasets.Value("string"), "episode_index": datasets.Value("int64"),
            "step_index": datasets.Value("int64"), "rationale_source_step": datasets.Value("int64"),
            "instruction": datasets.Value("string"), "image": datasets.Image(), "rationale": datasets.Value("string"),
            "rationale_text": datasets.Value("string")}))
    html = report.teacher_examples(ds, n=5)
    assert html.count('class="rv-example"') == 2                       # the key frames only (steps 0 and 2)
    assert html.count("data:image/png;base64,") == 2 and 'width="24"' in html
    for label in ("observation", "situation analysis", "spatial reasoning", "task planning"):
        assert f"<dt>{label}</dt>" in html
    assert "close &lt;now&gt;" in html and "step 2" in html


def test_attention_table_formats_share_and_lift():
    scores = pd.DataFrame([dict(model="baseline", task="pick_cube", n_frames=8.0, n_undefined=1.0, share=0.0416,
                                share_ci_low=0.0223, share_ci_high=0.0608, lift=0.897, lift_ci_low=0.639,
                                lift_ci_high=1.155, mask_share=0.0484, image_mass=0.13, undefined_reasons="")])
    row = report.attention_table(scores).iloc[0]
    assert row["frames"] == 8 and row["share on target [95% interval]"] == "4.2% [2.2, 6.1]"
    assert row["lift [95% interval]"] == "0.90 [0.64, 1.16]" and row["target's share of the image"] == "4.8%"


def test_config_table_one_row_per_section():
    from refinevla import config

    cfg = config.resolve("smoke")
    table = report.config_table(cfg)
    assert {"data", "model", "refinevla", "evaluate"} <= set(table.index)
    assert "lambda_reason: " in table.loc["refinevla", "settings"]


# ------------------------------------------------------------------------------ the released base and the bar

def manifest_literal(side_b=0.97, within_b=0.96):
    """A trimmed manifest.json shaped like refinevla.release.write_release's (the numbers are made up)."""
    def probe(n, side_rows, side, within, exact, mae, answer):
        return dict(n=n, answered=1.0 if answer else 0.0, side_rows=side_rows, side_accuracy=side, within_1cm=within,
                    exact=exact, mae_cm=mae, examples=[dict(question="where is the red cube", answer=answer,
                                                            truth="the red cube is 4 cm left of and 9 cm below the gripper")])
    return {
        "name": "tiny-base", "kind": "refinevla tiny base", "architecture": "PaliGemma (micro)",
        "parameters": {"trainable": 233728, "total": 233728, "trainable_pct": 100.0},
        "recipe": {"preset_sections": {
            "data": {"pretrain_mix": {"pick_cube": 2, "lift": 1, "stack": 1}},
            "vlm": {"steps": 12, "batch_size": 32, "lr": 0.0002, "lambda_reason": 1.0},
            "pretrain": {"steps": 24, "batch_size": 16, "lr": 0.0002, "lambda_reason": 1.0},
            "grounding": {"frames": 30, "probe_frames": 10, "tasks": ["pick_cube", "lift", "stack"]}},
            "command": "make base"},
        "seeds": {"grounding_train": [40000, 40029], "grounding_probe": [45000, 45009],
                  "evaluation": [12000, 12001]},
        "data": {"grounding_rows": 46, "probe_rows": 100, "action_rows": 243, "stage_b_grounding_rows": 250},
        "probe": {"a": probe(100, 80, float("nan"), 0.0, 0.0, [float("nan")] * 3, ""),
                  "b": probe(100, 80, side_b, within_b, 0.5, [0.4, 0.6, 0.5],
                             "the red cube is 4 cm left of and 8 cm below the gripper")},
        "closed_loop": {"split": "in_distribution", "tasks": ["pick_cube"], "successes": 1, "episodes": 2,
                        "seeds": [12000, 12001], "ci95": [0.095, 0.905]},
        "timings_s": {"demonstrations_s": 23.3, "frames_s": 10.2, "stage_a_s": 180.0, "stage_b_s": 60.0,
                      "evaluate_s": 12.4, "total": 285.9},
        "losses": {"vlm": [{"step": 5, "loss": 6.552, "l_action": 0.0, "l_reason": 6.552},
                           {"step": 12, "loss": 6.5391, "l_action": 0.0, "l_reason": 6.5391, "heldout_l_action": 0.0,
                            "heldout_l_reason": 6.5177}],
                   "vla": [{"step": 5, "loss": 12.6591, "l_action": 6.1366, "l_reason": 6.5226},
                           {"step": 24, "loss": 12.6264, "l_action": 6.116, "l_reason": 6.5104, "heldout_l_action": 0.0,
                            "heldout_l_reason": 6.5031}]},
        "environment": {"python": "3.11.7", "torch": "2.13.0+cpu", "machine": "x86_64", "threads": 1},
        "created": "2026-12-06", "files": {}}


def grounding_csv(tmp_path, base_side=0.5, base_within=0.25):
    rows = [dict(model="base", questions=40, answered=1.0, side_rows=20, side_accuracy=base_side,
                 within_1cm=base_within, exact=0.1, mae_x_cm=1.5, mae_y_cm=2.0, mae_z_cm=np.nan,
                 example="where is the red cube -> the red cube is 4 cm left of the gripper"),
            dict(model="baseline seed 0", questions=40, answered=0.0, side_rows=0, side_accuracy=np.nan,
                 within_1cm=0.0, exact=0.0, mae_x_cm=np.nan, mae_y_cm=np.nan, mae_z_cm=np.nan,
                 example="where is the red cube -> "),
            dict(model="refinevla seed 0", questions=40, answered=1.0, side_rows=20, side_accuracy=1.0,
                 within_1cm=0.975, exact=0.9, mae_x_cm=0.1, mae_y_cm=0.1, mae_z_cm=0.2, example="x -> y")]
    (tmp_path / "attention").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(tmp_path / "attention" / "grounding.csv", index=False)
    return report.grounding_table(tmp_path)


def test_base_release_reads_a_release_folder_and_nothing_else(tmp_path):
    from types import SimpleNamespace

    cfg = lambda checkpoint: SimpleNamespace(model=SimpleNamespace(checkpoint=checkpoint))
    assert report.base_release(cfg("")) is None                           # the run pre-trains its own base
    assert report.base_release(cfg(str(tmp_path))) is None                # a folder without a manifest
    (tmp_path / "manifest.json").write_text(json.dumps(manifest_literal()))
    assert report.base_release(cfg(str(tmp_path)))["probe"]["b"]["within_1cm"] == 0.96
    (tmp_path / "manifest.json").write_text(json.dumps(dict(manifest_literal(), files={"model.safetensors": {
        "bytes": 1, "sha256": "0" * 64}})))
    from refinevla.release import ReleaseError
    with pytest.raises(ReleaseError, match="model.safetensors: missing"):  # verified, not just read
        report.base_release(cfg(str(tmp_path)))


def test_base_probe_table_one_row_per_stage():
    table = report.base_probe_table(manifest_literal())
    assert list(table.index) == ["after stage (a) VLM", "after stage (b) VLA"]
    b = table.loc["after stage (b) VLA"]
    assert b["questions"] == 100 and b["side accuracy"] == 0.97 and b["within 1 cm"] == 0.96
    assert [b["MAE x (cm)"], b["MAE y (cm)"], b["MAE z (cm)"]] == [0.4, 0.6, 0.5]
    assert "-> the red cube is 4 cm left of and 8 cm below" in b["example"]
    assert "(no answer)" in table.loc["after stage (a) VLM", "example"]
    shown = report.tidy(table, percent=["side accuracy", "within 1 cm"])
    assert shown.loc["after stage (a) VLM", "side accuracy"] == "" and shown.loc["after stage (b) VLA", "within 1 cm"] == "96%"


def test_base_recipe_table_two_stages_and_the_base_closed_loop():
    table = report.base_recipe_table(manifest_literal())
    assert list(table.index) == ["stage (a) VLM", "stage (b) VLA", "base closed loop, in distribution"]
    a, b, loop = (table.loc[k] for k in table.index)
    assert a["steps"] == 12 and a["batch"] == 32 and a["minutes"] == 3.0 and "46 grounding questions" in a["data"]
    assert "seeds 40000-40029" in a["data"] and "6.539" in a["result"]
    assert b["steps"] == 24 and b["batch"] == 16 and b["minutes"] == 1.0
    assert "243 action frames of 4 expert episodes (pick_cube 2, lift 1, stack 1) + 250" in b["data"]
    assert "action loss 6.116" in b["result"] and "grounding loss 6.510" in b["result"]
    assert loop["result"] == "1/2 successes (95% interval 10-90%)" and "seeds 12000-12001" in loop["data"]
    # a release evaluated on both splits: one closed-loop row each, and the probe in variant scenes
    both = dict(manifest_literal(), closed_loop_splits=[
        manifest_literal()["closed_loop"], dict(split="variant", tasks=["pick_cube"], successes=0, episodes=2,
                                                seeds=[22000, 22001], ci95=[0.0, 0.658])],
        probe_variant={"b": manifest_literal()["probe"]["b"]})
    table = report.base_recipe_table(both)
    assert list(table.index)[2:] == ["base closed loop, in distribution", "base closed loop, variant"]
    assert table.loc["base closed loop, variant", "result"].startswith("0/2") and \
        "seeds 22000-22001" in table.loc["base closed loop, variant", "data"]
    assert list(report.base_probe_table(both).index)[-1] == "after stage (b) VLA, variant scenes"


def test_grounding_table_reads_the_attention_stage_probe(tmp_path):
    assert report.grounding_table(tmp_path) is None                       # the stage has not run
    table = grounding_csv(tmp_path)
    assert list(table.index) == ["base", "baseline seed 0", "refinevla seed 0"]
    assert table.loc["refinevla seed 0", "within 1 cm"] == 0.975 and table.loc["base", "side questions"] == 20
    assert np.isnan(table.loc["baseline seed 0", "side accuracy"])
    assert table.loc["baseline seed 0", "example"] == "where is the red cube -> "  # an empty answer stays text
    assert table.loc["base", "example"].startswith("where is the red cube -> ")


def test_competence_table_switches_when_a_number_crosses_its_bar(tmp_path):
    success = success_frame()                      # baseline: 6/50 in distribution, 0/50 variant
    table = report.competence_table(success, manifest_literal())
    assert list(table["met"]) == ["yes", "yes", "no", "no"]
    value = "measured [95% interval] (count)"
    assert table.iloc[0][value].startswith("97% [") and table.iloc[0][value].endswith("(78/80)")
    assert table.iloc[1][value].endswith("(96/100)") and "manifest" in table.iloc[0]["source"]
    assert table.iloc[2][value] == "12% [6, 24] (6/50)"
    # the base just under the bar; the baseline competent: 30/50 in distribution, 20/50 variant
    from refinevla.stats import wilson
    good = success.copy()
    for split, k in (("in_distribution", 30), ("variant", 20)):
        at = (good["arm"] == "baseline") & (good["split"] == split)
        good.loc[at, ["successes", "rate"]] = [k, k / 50]
        good.loc[at, ["ci_low", "ci_high"]] = list(wilson(k, 50))
    table = report.competence_table(good, manifest_literal(within_b=0.94))
    assert list(table["met"]) == ["yes", "no", "yes", "yes"]
    near = report.competence_table(good, manifest_literal(within_b=0.947)).iloc[1]   # not "95%" beside "no"
    assert near["met"] == "no" and near[value].startswith("94.7% [")
    assert report.competence_table(good, manifest_literal(within_b=57 / 60))["met"].iloc[1] == "yes"  # on the bar
    assert list(report.competence_table(good, manifest_literal())["met"]) == ["yes"] * 4
    high = good.assign(rate=np.where((good["arm"] == "baseline") & (good["split"] == "variant"), 0.9, good["rate"]))
    assert report.competence_table(high, manifest_literal())["met"].iloc[3] == "no"   # a ceiling fails the band
    # no manifest: the base row of the attention stage's probe; nothing at all: not measured
    table = report.competence_table(good, None, grounding_csv(tmp_path))
    assert list(table["met"]) == ["no", "no", "yes", "yes"] and table.iloc[0]["source"].startswith("attention/")
    assert table.iloc[0][value].endswith("(10/20)") and table.iloc[1][value].endswith("(10/40)")
    table = report.competence_table(None, None, None)
    assert set(table["met"]) == {"not measured"}
    nan_side = manifest_literal(side_b=float("nan"))
    assert report.competence_table(good, nan_side)["met"].iloc[0] == "not measured"


def test_competence_sentence_names_what_failed_with_its_value(tmp_path):
    table = report.competence_table(success_frame(), manifest_literal(within_b=0.5))
    sentence = report.competence_sentence(table)
    gate, base = sentence.split(". The base's grounding bar ")
    assert gate.startswith("The competence gate (the fine-tuned baseline) is not met: ")
    assert "in distribution 12% [6, 24] (6/50) against >= 60%" in gate and "variant 0% [" in gate
    assert base.startswith("is not met: base: position within 1 cm, held-out frames 50% [") and "against >= 95%" in base
    assert "side of the named object" not in sentence                      # met rows are not listed as failures
    good = success_frame()
    good = good.assign(rate=np.where(good["arm"] == "baseline", 0.6, good["rate"]),
                       successes=np.where(good["arm"] == "baseline", 30, good["successes"]))
    sentence = report.competence_sentence(report.competence_table(good, manifest_literal()))
    assert sentence.startswith("The competence gate (the fine-tuned baseline) is met: ") and "(30/50)" in sentence
    assert "The base's grounding bar is met: " in sentence
    # the gate met, the base's bar missed: each said on its own (the default study's case)
    sentence = report.competence_sentence(report.competence_table(good, manifest_literal(within_b=0.42)))
    assert sentence.startswith("The competence gate (the fine-tuned baseline) is met: ")
    assert "The base's grounding bar is not met: base: position within 1 cm" in sentence
    sentence = report.competence_sentence(report.competence_table(good, None, None))
    assert sentence.startswith("The competence gate (the fine-tuned baseline) is met: ")
    assert "The base's grounding bar is not established: " in sentence


def test_base_losses_and_grounding_figures():
    import matplotlib.pyplot as plt

    fig = figures.plot_base_losses(manifest_literal())
    a, b = fig.axes
    assert [ln.get_label() for ln in a.get_lines()] == ["grounding loss", "grounding loss, held-out"]
    assert [ln.get_label() for ln in b.get_lines()] == ["L_action", "grounding loss", "grounding loss, held-out"]
    assert a.get_lines()[1].get_ydata()[0] == pytest.approx(6.5177)   # held-out dot at its step
    plt.close(fig)

    table = pd.DataFrame({"side accuracy": [0.5, np.nan, 1.0], "within 1 cm": [0.25, 0.0, 0.975]},
                         index=pd.Index(["base", "baseline seed 0", "refinevla seed 0"], name="model"))
    fig = figures.plot_grounding(table)
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert heights == pytest.approx([50, 0, 100, 25, 0, 97.5])
    assert [t.get_text() for t in ax.get_xticklabels()] == list(table.index)
    assert any(ln.get_ydata()[0] == 95 and ln.get_linestyle() == "--" for ln in ax.get_lines())
    assert "n/a" in [t.get_text() for t in ax.texts]
    plt.close(fig)


def test_training_curves_without_a_pretraining_run_show_the_fine_tunes_only(tmp_path):
    """A run that loads the released base has no train/pretrain: the curves and the figure still come."""
    import matplotlib.pyplot as plt

    for arm in ("baseline", "refinevla"):
        d = tmp_path / "train" / arm / "seed0"
        d.mkdir(parents=True)
        d.joinpath("metrics.jsonl").write_text("".join(json.dumps(dict(
            step=s, l_action=0.5, l_reason=1.0 if arm == "refinevla" else 0.0)) + "\n" for s in (5, 10)))
    curves = report.training_curves(tmp_path)
    assert set(curves["arm"]) == {"baseline", "refinevla"} and len(curves) == 4
    fig = figures.plot_training_curves(curves)
    fine, reason = fig.axes
    assert fine.get_title().startswith("fine-tunes: L_action") and not any(
        ln.get_marker() == "*" for ln in fine.get_lines())
    assert [ln.get_label() for ln in reason.get_lines()] == ["ReFineVLA, seed 0"]
    plt.close(fig)


def test_grounding_table_one_row_per_model_and_split(tmp_path):
    rows = [dict(model=m, split=s, questions=40, answered=1.0, side_rows=20, side_accuracy=acc, within_1cm=0.5,
                 exact=0.1, mae_x_cm=1.0, mae_y_cm=1.0, mae_z_cm=1.0, example="x -> y")
            for m, s, acc in [("base", "in_distribution", 0.9), ("base", "variant", 0.6)]]
    (tmp_path / "attention").mkdir()
    pd.DataFrame(rows).to_csv(tmp_path / "attention" / "grounding.csv", index=False)
    table = report.grounding_table(tmp_path)
    assert list(table.index) == ["base, in distribution", "base, variant"] and "split" not in table
    competence = report.competence_table(None, None, table)  # the base's bar reads the in-distribution row
    assert competence.iloc[0]["measured [95% interval] (count)"].startswith("90%")
    assert "row base, in distribution" in competence.iloc[0]["source"]


def test_a_continued_release_shows_its_parent_then_its_own_stage(tmp_path):
    """models/tiny-vla continues models/tiny-base: the book's tables show the parent's two stages (from the
    parent's card), then the continued stage as stage (c), and the bar reads the probe after stage (c)."""
    from types import SimpleNamespace

    parent, child = tmp_path / "tiny-base", tmp_path / "tiny-vla"
    parent.mkdir(), child.mkdir()
    (parent / "manifest.json").write_text(json.dumps(manifest_literal(side_b=0.93)))
    own = manifest_literal(side_b=0.91)
    own.update(name="tiny-vla", parent=f"{parent}@0123456789abcdef",
               probe_variant={"a": own["probe"]["b"] | {"side_accuracy": 0.6}, "b": own["probe"]["b"] | {
                   "side_accuracy": 0.87}})
    (child / "manifest.json").write_text(json.dumps(own))
    manifest = report.base_release(SimpleNamespace(model=SimpleNamespace(checkpoint=str(child))))
    assert manifest["parent_manifest"]["name"] == "tiny-base"
    probes = report.base_probe_table(manifest)["side accuracy"]
    assert probes.to_dict() == {"after stage (a) VLM": pytest.approx(float("nan"), nan_ok=True),
                                "after stage (b) VLA": 0.93, "after stage (b) VLA, variant scenes": 0.6,
                                "after stage (c) VLA, randomized scenes": 0.91,
                                "after stage (c) VLA, randomized scenes, variant scenes": 0.87}
    recipe = report.base_recipe_table(manifest)
    assert list(recipe.index) == ["tiny-base: stage (a) VLM", "tiny-base: stage (b) VLA",
                                  "tiny-base: base closed loop, in distribution",
                                  "tiny-vla: stage (c) VLA, randomized scenes",
                                  "tiny-vla: base closed loop, in distribution"]
    bar = report.competence_table(None, manifest)
    assert bar.iloc[0]["measured [95% interval] (count)"].startswith("91%")
    assert "stage (c)" in bar.iloc[0]["source"]
