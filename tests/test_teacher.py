"""The rationale schema, the privileged-state teacher, faithfulness and the offline annotate stage.

    .venv/bin/pytest tests/test_teacher.py -q
"""
import json

import datasets
import numpy as np
import pytest
import yaml
from PIL import Image

from refinevla.schema import RATIONALE_COLUMNS, RATIONALE_PARTS
from refinevla.teacher import (AnnotateConfig, Rationale, agreement_rate, annotate, check_faithfulness,
                               describe_offset, examples, key_frame_sources, parse_rationale_text,
                               privileged_rationale, render_rationale)

EEF = [0.0, 0.0, 0.90]


def state(xyz=EEF, opening=1.0):
    return [*xyz, 0.0, 0.0, 0.0, 0.0, opening]


def objects_json(*records):
    return json.dumps([{"name": n, "role": r, "pos": list(p)} for n, r, p in records])


CUBE = objects_json(("red_cube", "target", (0.0, 0.04, 0.81)))  # 4 cm left of, 9 cm below the gripper


def make_demos(episodes=2, steps=5, image="array", objects=CUBE, size=8, seed=0):
    """Schema rows with a unique instruction per row; `image` stored as "array" (nested uint8 lists),
    "array3d" (datasets.Array3D) or "pil" (datasets.Image())."""
    rng = np.random.default_rng(seed)
    phases = ["approach", "descend", "grasp", "lift", "lift", "lift"]
    rows = [dict(episode_index=ep, step_index=st, task="lift", instruction=f"lift the red cube ep{ep} st{st}",
                 image=rng.integers(0, 256, (size, size, 3), dtype=np.uint8), state=state(),
                 action=[0.1, -0.2, 0.3, 0.0, 0.0, 0.0, 1.0], objects=objects, phase=phases[st % len(phases)])
            for ep in range(episodes) for st in range(steps)]
    ds = datasets.Dataset.from_list(rows)
    if image == "pil":
        ds = datasets.Dataset.from_list([{**r, "image": Image.fromarray(r["image"])} for r in rows],
                                        features=datasets.Features({**ds.features, "image": datasets.Image()}))
    if image == "array3d":
        ds = ds.cast_column("image", datasets.Array3D((size, size, 3), "uint8"))
    return ds


# -- schema and text


def test_rationale_fields_follow_schema_and_render_round_trips():
    r = Rationale(observation="a b", situation_analysis="c", spatial_reasoning="d  e", task_planning="f")
    assert tuple(Rationale.model_fields) == RATIONALE_PARTS
    text = render_rationale(r)
    assert text == "OBSERVATION: a b SITUATION: c SPATIAL: d e PLAN: f"
    assert render_rationale(r.model_dump_json()) == render_rationale(r.model_dump()) == text
    assert parse_rationale_text(text).spatial_reasoning == "d e"
    assert parse_rationale_text("OBSERVATION: a PLAN: b") is None


# -- the privileged teacher


def test_describe_offset_uses_robosuite_frame_words():
    assert describe_offset("red cube", [0.0, 0.04, -0.09]) == \
        "the red cube is 4 cm left of and 9 cm below the gripper"
    assert describe_offset("plate", [0.12, -0.03, 0.004]) == \
        "the plate is 12 cm ahead of and 3 cm right of the gripper"
    assert describe_offset("cube", [-0.05, 0.0, 0.02]) == "the cube is 5 cm behind and 2 cm above the gripper"
    assert describe_offset("cube", [0.003, -0.002, 0.0]) == "the cube is at the gripper"
    assert describe_offset("cube", [2.0, 0.0, 0.0]) == "the cube is 99 cm ahead of the gripper"  # small integers


def test_privileged_names_target_and_direction():
    r = privileged_rationale(state(), CUBE)
    assert r.spatial_reasoning == "the red cube is 4 cm left of and 9 cm below the gripper"
    assert r.observation == "the red cube and an open gripper"
    assert r.situation_analysis == "10 cm from the red cube"
    assert r.task_planning == "move above the red cube"
    # holding (closing gripper at the target): the spatial part is about the goal
    objs = objects_json(("carrot", "target", (0.3, 0.0, 0.89)), ("plate", "goal", (0.42, -0.05, 0.80)))
    r = privileged_rationale(state((0.3, 0.0, 0.9), 0.0), objs)
    assert r.spatial_reasoning == "the plate is 12 cm ahead of and 5 cm right of and 10 cm below the gripper"
    assert r.situation_analysis == "holding the carrot" and r.task_planning == "move the carrot to the plate"


@pytest.mark.parametrize("xyz, opening, situation, plan", [
    ((0.05, 0.04, 0.95), 1.0, "15 cm from the red cube", "move above the red cube"),
    ((0.0, 0.045, 0.88), 1.0, "above the red cube", "descend to the red cube"),
    ((0.0, 0.04, 0.815), 1.0, "at the red cube", "close the gripper"),
    ((0.0, 0.04, 0.815), 0.6, "holding the red cube", "lift the red cube"),   # closed on it: the experts lift
    ((0.0, 0.04, 0.815), 0.75, "closing on the red cube", "close the gripper"),
    ((0.0, 0.2, 0.9), 0.1, "the gripper is closed and empty", "open the gripper"),
])
def test_privileged_situation_and_plan_follow_the_current_state_only(xyz, opening, situation, plan):
    r = privileged_rationale(state(xyz, opening), CUBE)
    assert (r.situation_analysis, r.task_planning) == (situation, plan)


def test_privileged_is_deterministic_and_short():
    rng = np.random.default_rng(1)
    two = objects_json(("red_cube", "target", (0.1, -0.1, 0.83)), ("green_cube", "other", (0.0, 0.1, 0.83)))
    lengths = []
    for _ in range(200):
        s = state(rng.uniform([-0.2, -0.2, 0.8], [0.2, 0.2, 1.1]), float(rng.random()))
        for objs in (CUBE, two):
            a, b = (render_rationale(privileged_rationale(s, objs)) for _ in range(2))
            assert a == b
            lengths.append(len(a.split()))
    assert 25 <= min(lengths) and max(lengths) <= 45, (min(lengths), max(lengths))  # words, labels included


def test_privileged_without_objects_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="'objects'.*teacher='http'"):
        privileged_rationale(state(), "[]")
    with pytest.raises(ValueError, match="'objects'"):
        annotate(make_demos(objects="[]"), AnnotateConfig(), tmp_path / "out")
    with pytest.raises(ValueError, match="objects"):
        annotate(make_demos().remove_columns("objects"), AnnotateConfig(), tmp_path / "out")


# -- faithfulness


def test_faithfulness_on_hand_made_rationales():
    def check(spatial, observation="i see the red cube"):
        r = dict(observation=observation, situation_analysis="s", spatial_reasoning=spatial, task_planning="p")
        return check_faithfulness(r, CUBE, state())

    assert check("the red cube is 4 cm left of and 9 cm below the gripper")["agrees"]
    assert check("The cube is slightly to the left and below the gripper.")["agrees"]  # head-noun alias
    assert not check("the red cube is 4 cm right of the gripper")["direction_agrees"]
    assert not check("the red cube is above the gripper")["agrees"]
    assert not check("the red cube is at the gripper")["agrees"]  # it is 9 cm away
    assert not check("it is to the left")["direction_agrees"]  # no object named: nothing to check
    block = check("the block is left of the gripper", observation="i see a block")
    assert not block["target_named"] and not block["agrees"]  # a synonym is not recognised (documented)
    miss = check("the towel is left of the gripper", observation="i see a towel")
    assert not miss["target_named"] and not miss["agrees"]
    # an axis within the tolerance is not judged
    near = objects_json(("red_cube", "target", (0.01, 0.04, 0.90)))
    r = dict(observation="red cube", situation_analysis="s", spatial_reasoning="the red cube is behind and left",
             task_planning="p")
    assert check_faithfulness(r, near, state())["agrees"]


def test_faithfulness_picks_the_clause_subject_among_two_cubes():
    objs = objects_json(("green_cube", "target", (0.0, -0.1, 0.9)), ("yellow_cube", "goal", (0.0, 0.1, 0.9)))
    base = dict(observation="the green cube", situation_analysis="s", task_planning="p")
    ok = {**base, "spatial_reasoning": "the green cube is right of the gripper; the yellow cube is left of it"}
    bad = {**base, "spatial_reasoning": "the green cube is left of the gripper"}
    assert check_faithfulness(ok, objs, state())["agrees"]
    assert not check_faithfulness(bad, objs, state())["agrees"]


# -- key frames


def test_key_frames_stride_and_segments():
    ds = make_demos(episodes=2, steps=6)
    assert key_frame_sources(ds, AnnotateConfig(stride=1)) == list(range(12))
    assert key_frame_sources(ds, AnnotateConfig(stride=4)) == [0, 0, 0, 0, 4, 4, 6, 6, 6, 6, 10, 10]
    # phases approach, descend, grasp, lift x3 -> one rationale per segment with stride 0
    assert key_frame_sources(ds, AnnotateConfig(stride=0, segment_by_phase=True))[:6] == [0, 1, 2, 3, 3, 3]
    shuffled = ds.select([5, 3, 0, 1, 2, 4])  # rows need not be sorted
    assert key_frame_sources(shuffled, AnnotateConfig(stride=2)) == [5, 4, 2, 2, 4, 5]  # steps 4 2 0 0 2 4
    with pytest.raises(ValueError, match=r"duplicate \(episode_index, step_index\) = \(0, 0\)"):
        key_frame_sources(datasets.concatenate_datasets([ds, ds.select([0])]), AnnotateConfig())


# -- the stage, offline


@pytest.mark.parametrize("image", ["array", "array3d", "pil"])
def test_annotate_privileged_writes_dataset_cost_and_config(tmp_path, image):
    demos = make_demos(image=image)
    out = annotate(demos, AnnotateConfig(stride=2, data_root=str(tmp_path / "data")), tmp_path / "out")
    assert set(RATIONALE_COLUMNS + ("rationale_source_step",)) <= set(out.column_names)
    assert set(demos.column_names) <= set(out.column_names) and len(out) == len(demos)
    assert out["rationale_source_step"][:5] == [0, 0, 2, 2, 4]
    assert out["rationale_text"][1] == out["rationale_text"][0] and out["input_hash"][1] == out["input_hash"][0]
    assert json.loads(out["rationale"][0])["spatial_reasoning"].startswith("the red cube is 4 cm left of")
    saved = datasets.load_from_disk(str(tmp_path / "out" / "dataset"))
    assert saved["rationale_text"] == out["rationale_text"]
    cost = json.loads((tmp_path / "out" / "cost.json").read_text())
    assert cost["requests_sent"] == 0 and cost["key_frames"] == 6 and cost["faithfulness"]["agreement_rate"] == 1.0
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["stride"] == 2
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []  # no temporary left
    # deterministic: a second run gives the same columns
    again = annotate(demos, AnnotateConfig(stride=2, data_root=str(tmp_path / "data")), tmp_path / "out")
    assert again["rationale"] == out["rationale"] and again["input_hash"] == out["input_hash"]
    assert agreement_rate(out)["agreement_rate"] == 1.0 and agreement_rate(out)["checked"] == 6
    ex = examples(out, 2)
    assert len(ex) == 2 and ex[0]["rationale_text"].startswith("OBSERVATION:") and "instruction" in ex[0]


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="AnnotateConfig.teacher"):
        annotate(make_demos(), AnnotateConfig(teacher="gemini"), tmp_path / "out")
    with pytest.raises(ValueError, match="AnnotateConfig.concurrency"):
        AnnotateConfig(concurrency=0).validate()
    with pytest.raises(ValueError, match="instruction"):
        annotate(make_demos().remove_columns("instruction"), AnnotateConfig(), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # a rejected input writes nothing


# -- the package's structure


LAYERS = ["rationale", "frames", "cache", "faithfulness", "privileged", "request", "cost", "online", "batch", "remote",
          "annotate"]  # bottom to top: a module imports only modules before it


def test_the_teacher_package_imports_one_way_and_never_inside_functions():
    import ast
    import subprocess
    import sys
    from pathlib import Path

    import refinevla.teacher as package
    folder = Path(package.__file__).parent
    assert sorted(p.stem for p in folder.glob("*.py")) == sorted(LAYERS + ["__init__"])
    for name in LAYERS:
        tree = ast.parse((folder / f"{name}.py").read_text())
        top = set(tree.body)
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            assert node in top, f"teacher/{name}.py line {node.lineno}: a package import inside a function"
            if node.level == 1:
                used = [node.module] if node.module else [a.name for a in node.names]
                for other in used:
                    assert LAYERS.index(other) < LAYERS.index(name), f"teacher/{name}.py imports {other} (above it)"
    # importing the package (what every other module does) loads neither torch nor the openai client
    code = "import sys, refinevla.teacher; print(sorted({'torch', 'openai'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=folder.parents[1]).stdout.strip() == "[]"
