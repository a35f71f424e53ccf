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

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_tables_show_each_result_with_its_target(tmp_path):
    results = report.benchmark_results(ROOT)
    tables = {name: (table, note) for name, table, note in report.benchmark_tables(results)}
    assert set(tables) == {p.stem for p in (ROOT / "benchmarks" / "results").glob("*.json")}
    table, note = tables["annotate_throughput"]
    assert list(table["concurrency"][:4]) == [1, 4, 16, 64] and "target ratio >= 0.8" in note
    assert (table["ratio to ideal"].round(2) == (table["requests/s"] / table["ideal/s"]).round(2)).all()
    table, note = tables["train_memory_speed"]
    assert {"fp32_peak_mb", "nf4_peak_mb", "peak_ratio"} <= set(table.columns) and "0.4 x fp32" in note

    # a benchmark the report does not know is still shown, flattened
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "new_one.json").write_text(json.dumps({"a": {"b": 3}, "when": "now"}))
    [(name, table, note)] = report.benchmark_tables(report.benchmark_results(tmp_path))
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
