"""benchmarks/grounding.py: the counterfactual pairs and their answers, and a run at the smallest size (a few real
robosuite frames, the released base read out, a micro model trained a few steps) whose result file the book reads.

`pytest tests/test_grounding_benchmark.py -q` (~1 min)
"""
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
RELEASE = ROOT / "models" / "tiny-base"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("grounding_benchmark", ROOT / "benchmarks" / "grounding.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def frame(red_y: float, green_y: float, pixels=(50, 50)) -> dict:
    """A frame with the gripper at the origin and the cubes 5 cm ahead, ``*_y`` metres to the left (+) / right."""
    state = np.zeros(8, np.float32)
    return dict(image=np.zeros((8, 8, 3), np.uint8), state=state, seed=1,
                objects=[dict(name="red cube", pos=[0.05, red_y, 0.0], pixels=pixels[0]),
                         dict(name="green cube", pos=[0.05, green_y, 0.0], pixels=pixels[1])])


def test_a_frame_is_asked_about_both_cubes_and_the_answers_follow_the_question(bench):
    red, green = bench.pair_rows(frame(0.06, -0.04), index=0)  # red on the left, green on the right
    assert (red["name"], green["name"]) == ("red cube", "green cube") and red["image"] is green["image"]
    assert red["prompt"] == "where is the red cube" and green["prompt"] == "where is the green cube"
    assert red["answer"] == "the red cube is 5 cm ahead of and 6 cm left of the gripper"
    # the task: the side of the named cube; a pair whose cubes lie on different sides gets different answers
    assert [bench.answer_word(r, "task") for r in (red, green)] == ["left", "right"]
    # controls: the colour named (text only) differs in every pair; the red cube's side (image only) never does
    assert [bench.answer_word(r, "text_only") for r in (red, green)] == ["red", "green"]
    assert [bench.answer_word(r, "vision_only") for r in (red, green)] == ["left", "left"]

    same = bench.pair_rows(frame(-0.03, -0.15), index=1, prompt="instruction")  # both on the right
    assert [r["prompt"] for r in same] == ["pick up the red cube", "pick up the green cube"]
    assert [bench.answer_word(r, "task") for r in same] == ["right", "right"]
    assert [bench.answer_word(r, "vision_only") for r in same] == ["right", "right"]
    with pytest.raises(ValueError, match="unknown question"):
        bench.answer_word(red, "size")


def test_frames_that_cannot_be_asked_about_both_cubes_are_left_out(bench):
    assert bench.pair_rows(frame(0.06, -0.04, pixels=(50, 2)), 0) == []   # the green cube out of view
    assert bench.pair_rows(frame(0.004, -0.04), 0) == []                 # the red cube < 1 cm to a side
    assert bench.side_of([0.0, 0.012, 0.0]) == "left" and bench.side_of([0.0, -0.02, 0.0]) == "right"


@pytest.mark.skipif(not (RELEASE / "model.safetensors").exists(), reason="the released base is not here")
def test_a_state_swap_takes_only_the_named_dims_from_another_frame_and_moves_pairs_together(bench):
    rows = []
    for f in range(5):
        state = np.arange(8, dtype=np.float32) + 10 * f  # frame f's state: 10f, 10f + 1, ...
        rows += [dict(state=state, frame=f, name=n) for n in ("red cube", "green cube")]
    swapped = bench.swap_state(rows, bench.STATE_SWAPS["orientation"])
    donors = []
    for r, s in zip(rows, swapped):
        assert s["frame"] == r["frame"] and s["name"] == r["name"]  # the same pixels and question
        assert np.array_equal(s["state"][[0, 1, 2, 6, 7]], r["state"][[0, 1, 2, 6, 7]])
        donor = int(s["state"][3] // 10)
        assert donor != r["frame"] and np.array_equal(s["state"][3:6], rows[2 * donor]["state"][3:6])
        donors.append(donor)
    assert donors[0::2] == donors[1::2] and sorted(donors[0::2]) == list(range(5))  # a derangement of the frames
    assert np.array_equal(rows[0]["state"], np.arange(8))  # the input rows are left as they were
    assert [s["state"].tolist() for s in bench.swap_state(rows, ())] == [r["state"].tolist() for r in rows]


def test_a_micro_run_writes_the_result_file_the_book_reads(bench, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # model folders are found from the repository, whatever the working directory
    out = tmp_path / "grounding.json"
    bench.main(["--size", "micro", "--frames", "3", "--heldout-frames", "3", "--steps", "2", "--eval-every", "1",
                "--train-from", "scratch", "--questions", "task,vision_only", "--out", str(out),
                "--checkpoint", "models/tiny-base", "--checkpoint", "models/tiny-vla"])
    r = json.loads(out.read_text())
    assert r["benchmark"] == "grounding" and r["settings"]["steps"] == 2 and r["machine"]["cpus"] >= 1
    assert {"torch", "transformers"} <= set(r["versions"]) and r["wall_s"] > 0
    held = r["frames"]["heldout"]
    assert held["usable"] == 3 and held["rows"] == 6 and held["seeds"][0] == bench.HELDOUT_SEED_OFFSET
    assert r["frames"]["training"]["seeds"][0] == bench.TRAIN_SEED_OFFSET

    read, other = r["readout"]
    [paired] = r["paired"]  # the second release against the first, on the same six questions
    assert (paired["reference"], paired["checkpoint"], paired["n"]) == ("models/tiny-base", "models/tiny-vla", 6)
    assert paired["c"] - paired["b"] == round(6 * (other["side_accuracy"] - read["side_accuracy"]))
    assert 0 <= paired["p_value"] <= 1 and "side_right" not in read
    assert read["checkpoint"].endswith("tiny-base") and read["questions"] == 6 and read["frames"] == 3
    shares = [read[k] for k in ("answered", "side_accuracy", "within_1cm", "exact", "pair_side_consistency",
                                "pair_within_1cm")]
    shares += [v[k] for part in ("by_colour", "by_side", "by_distance") for v in read[part].values()
               for k in ("side_accuracy", "within_1cm") if not math.isnan(v[k])]
    assert all(0 <= x <= 1 for x in shares)
    assert list(read["by_distance"]) == list(bench.DISTANCE_BINS)  # every question in exactly one bin
    assert sum(v["n"] for v in read["by_distance"].values()) == read["questions"]
    assert len(read["mae_cm"]) == 3 and read["spread"] > 0
    swaps = read["state_swaps"]  # the same rows asked with another frame's state: does the model read its state?
    assert list(swaps) == ["true", *bench.STATE_SWAPS] and swaps["true"]["side_accuracy"] == read["side_accuracy"]
    assert all(0 <= v["side_accuracy"] <= 1 and 0 <= v.get("changed", 0) <= 1 for v in swaps.values())
    probe = read["feature_probe"]  # the image features' own linear readout, fitted on the training frames
    assert probe["train_frames"] == 3 and 0 <= probe["side_accuracy"] <= 1
    assert sum(v["n"] for v in probe["by_distance"].values()) == read["questions"]

    ceiling = r["ceiling"]  # no model: the side from the cubes' true pixel positions (and the arm's orientation)
    assert list(ceiling["fits"]) == list(bench.CEILING_INPUTS) and ceiling["train_frames"] == 3
    for fit in ceiling["fits"].values():
        assert 0 <= fit["side_accuracy"] <= 1 and sum(v["n"] for v in fit["by_distance"].values()) == 6
    assert 0 <= ceiling["outside_any"] <= 1 and set(ceiling["outside_token_range"]) == {"roll", "pitch", "yaw"}

    assert [(t["init"], t["question"]) for t in r["train"]] == [("scratch", "task"), ("scratch", "vision_only")]
    for t in r["train"]:
        assert [c["step"] for c in t["curve"]] == [0, 1, 2] and t["steps"] == 2
        assert all(0 <= c["accuracy"] <= 1 and 0 <= c["pairs_right"] <= 1 and c["spread"] > 0 for c in t["curve"])
        assert t["accuracy"] == t["curve"][-1]["accuracy"] and t["step_s"] > 0

    from refinevla import benchmark_tables

    [(name, table, note)] = benchmark_tables.tables({"grounding": r})
    assert name == "grounding" and len(table) == 7
    assert list(table["mode"]) == ["readout"] * 2 + ["train"] * 2 + ["ceiling"] * 3
    shown = table.loc[table["mode"] == "readout", "accuracy by distance to the side"].iloc[0]
    assert [part.split(":")[0] for part in shown.split(", ")] == [b for b, v in read["by_distance"].items() if v["n"]]
    assert "held-out" in note and "models/tiny-vla alone right on" in note


def test_the_ceiling_finds_the_side_when_it_needs_the_orientation_as_well_as_the_pixels(bench):
    """Synthetic rows whose side depends on the pixel column and the roll together (as a turned wrist camera makes
    it): the pixel alone cannot fit it, the pixel with the true orientation can, and the orientation clipped to a
    state-token range that misses it loses it again."""
    from refinevla.tokens import BinStats

    rng = np.random.default_rng(0)

    def rows(n):
        out = []
        for _ in range(n):
            u, roll = rng.uniform(0.3, 0.7), rng.normal(0.0, 0.1)
            state = np.zeros(8, np.float32)
            state[3] = roll
            y = (0.5 - u) * 0.2 + roll * 0.3  # metres to the left of the gripper: the camera's turn moves the cube
            y = np.sign(y) * max(abs(y), 0.011)  # at least 1 cm to a side, as every asked row is
            out.append(dict(pixel_uv=(u, 0.5), state=state, side="left" if y > 0 else "right",
                            offset_m=np.array([0.05, y, 0.0])))
        return out

    train, held = rows(400), rows(200)
    # a roll range the rows never reach (as the demonstrations' range misses the perturbed arm): every roll clips to bin 0
    tight = BinStats(low=[-1.0] * 3 + [0.25, -1.0, -1.0, -0.5, 0.0], high=[1.0] * 3 + [0.35, 1.0, 1.0, 0.5, 1.0])
    c = bench.geometric_ceiling(train, held, tight)
    fits = {k: v["side_accuracy"] for k, v in c["fits"].items()}
    assert fits["pixel+orientation"] >= 0.97 and fits["pixel"] <= 0.85, fits
    assert fits["pixel+orientation tokens"] <= fits["pixel"] + 0.05, fits  # the clipped roll says almost nothing
    assert c["outside_token_range"]["roll"] > 0.8 and c["outside_any"] > 0.8
