"""The data stage against real robosuite: schema, resume, clear errors. `pytest tests/test_data.py -q`"""
import json

import numpy as np
import pytest

from refinevla.config import DataConfig
from refinevla.data import data_seeds, generate_demos, load_dataset_dir
from refinevla.schema import BASE_COLUMNS, OPTIONAL_COLUMNS, ROW_COLUMNS, row_features


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    out = tmp_path_factory.mktemp("demos")
    cfg = DataConfig(tasks=["lift"], episodes_per_task=2, image_size=32, workers=1)
    return cfg, out, generate_demos(cfg, out)


def test_rows_follow_the_schema(demos):
    cfg, out, ds = demos
    for col in BASE_COLUMNS + OPTIONAL_COLUMNS:
        assert col in ds.column_names
    assert ds.features == row_features() and list(ds.features) == list(ROW_COLUMNS)  # one definition, schema.py
    row = ds[0]
    assert np.asarray(row["image"]).shape == (32, 32, 3)
    assert len(row["state"]) == 8 and len(row["action"]) == 7
    assert 0.0 <= row["action"][6] <= 1.0  # gripper: 1 = open, 0 = close
    objects = json.loads(row["objects"])
    assert any(o["role"] == "target" for o in objects)
    assert row["instruction"] and row["phase"]
    assert sorted(set(ds["episode_index"])) == [0, 1]
    steps = [s for s, e in zip(ds["step_index"], ds["episode_index"]) if e == 0]
    assert steps == list(range(len(steps)))


def test_expert_demos_close_the_gripper_and_lift(demos):
    _, out, ds = demos
    stats = json.loads((out / "stats.json").read_text())
    assert stats["tasks"]["lift"]["expert_success_rate"] == 1.0
    grip = np.asarray(ds["action"])[:, 6]
    assert grip.min() == 0.0 and grip.max() == 1.0  # it opens, then closes on the cube


def test_resume_reuses_recorded_episodes(demos, capsys):
    cfg, out, ds = demos
    again = generate_demos(cfg, out)
    assert "2 already recorded" in capsys.readouterr().out
    assert len(again) == len(ds)
    assert load_dataset_dir(out / "dataset").num_rows == len(ds)


def test_missing_dataset_and_columns_errors(tmp_path, demos):
    with pytest.raises(FileNotFoundError, match="no dataset here"):
        load_dataset_dir(tmp_path / "nothing")
    _, out, _ = demos
    with pytest.raises(ValueError, match="rationale_text"):
        load_dataset_dir(out / "dataset", required=("image", "rationale_text"))


def test_row_features_name_unknown_columns():
    assert list(row_features(("image", "state"))) == ["image", "state"]
    with pytest.raises(ValueError, match=r"unknown column\(s\) \['rationale'\]"):
        row_features(("image", "rationale"))


def test_data_seeds_are_disjoint_from_evaluation_seeds():
    from refinevla.evaluate import EvaluateConfig

    seeds = data_seeds(0, 1000)
    assert max(seeds) < EvaluateConfig().base_seed
    with pytest.raises(ValueError):
        data_seeds(0, 1001)


def test_a_save_killed_between_its_renames_loses_nothing(tmp_path):
    """save_dataset swaps a new dataset in with two renames; a kill between them leaves the previous dataset
    beside the path, and load_dataset_dir puts it back instead of reporting it missing."""
    import os

    import datasets

    from refinevla.data import load_dataset_dir, save_dataset

    path = tmp_path / "dataset"
    save_dataset(datasets.Dataset.from_dict({"x": [1, 2]}), path)
    save_dataset(datasets.Dataset.from_dict({"x": [3, 4, 5]}), path)  # a second save replaces the first
    assert datasets.load_from_disk(str(path))["x"] == [3, 4, 5]
    assert [p.name for p in tmp_path.iterdir()] == ["dataset"]  # no temporary folder left behind
    os.replace(path, tmp_path / ".dataset.old-123")  # the state a kill between the two renames leaves
    ds = load_dataset_dir(path, required=["x"])
    assert ds["x"] == [3, 4, 5]
