"""The LeRobot reader against a tiny dataset written in LeRobotDataset v2.x layout (tests/lerobot_fixture.py).

Frames are solid colours that encode (episode, frame), so each decoded row can be checked against what was
written within codec tolerance. The hub path runs against a local HTTP server that answers like the hub's
``resolve`` endpoint, and the tests assert which files were requested.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import socket
import sys
import warnings
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from lerobot_fixture import COMMIT, frame_colour, serve_hub, write_lerobot_fixture  # noqa: E402

from refinevla import schema  # noqa: E402
from refinevla.lerobot import (  # noqa: E402
    BRIDGE, FRACTAL, KNOWN_CONVENTIONS, LeRobotFormatError, action_stats, frame_indices, generic_conventions,
    gripper_agreement, inspect_lerobot, load_lerobot, provenance, quat_to_rpy,
)
from refinevla.lerobot import conventions as conventions_module  # noqa: E402

COLOUR_TOLERANCE = 8  # max per-channel difference of a decoded solid colour (yuv420p, crf 10)


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    return write_lerobot_fixture(tmp_path_factory.mktemp("bridge"), "bridge", stats="quantiles")


@pytest.fixture(scope="module")
def fractal(tmp_path_factory):
    return write_lerobot_fixture(tmp_path_factory.mktemp("fractal"), "fractal", stats="plain")


def mean_colour(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), np.float64).reshape(-1, 3).mean(0)


def assert_colour(image, expected):
    diff = np.abs(mean_colour(image) - np.asarray(expected))
    assert diff.max() <= COLOUR_TOLERANCE, (mean_colour(image), expected)


def rows_of(ds):
    return [ds[i] for i in range(len(ds))]


def copy_fixture(fx, dest: Path) -> Path:
    return Path(shutil.copytree(fx.root, dest / fx.root.name))


def edit_info(root: Path, **changes) -> None:
    info = json.loads((root / "meta/info.json").read_text())
    (root / "meta/info.json").write_text(json.dumps(info | changes))


# ------------------------------------------------------------------------------------------------------------
# Reading back what was written

def test_rows_match_what_was_written(bridge):
    ds = load_lerobot(bridge.root)
    assert set(ds.column_names) == set(schema.BASE_COLUMNS) | {"objects", "phase"}
    schema.require_columns(ds.column_names)
    assert len(ds) == sum(bridge.lengths)
    for row in rows_of(ds):
        ep, t = row["episode_index"], row["step_index"]
        assert_colour(row["image"], frame_colour(ep, t))
        assert row["image"].size == (64, 64)
        np.testing.assert_allclose(row["state"], bridge.state[ep][t], atol=1e-6)   # Bridge: identity
        np.testing.assert_allclose(row["action"], bridge.action[ep][t], atol=1e-6)
        assert row["instruction"] == bridge.tasks[ep]
        assert row["task"] == "bridge_orig_lerobot"
        assert (row["objects"], row["phase"]) == ("[]", "")
    assert ds.features == schema.row_features(schema.LEROBOT_COLUMNS)   # the one definition of the row types
    record = provenance(ds)
    assert record["camera"] == "observation.images.image_0" and record["fps"] == 5.0
    assert record["conventions"] == "bridge_orig_lerobot"


def test_episode_ranges_counts_samples_and_strides(bridge):
    def picked(ds):
        return sorted({(r["episode_index"], r["step_index"]) for r in rows_of(ds)})

    ds = load_lerobot(bridge.root, episodes="1:3", stride=3)
    assert picked(ds) == [(1, 0), (1, 3), (1, 6), (2, 0), (2, 3), (2, 6), (2, 9)]
    for row in rows_of(ds):
        assert_colour(row["image"], frame_colour(row["episode_index"], row["step_index"]))
    assert {r["episode_index"] for r in rows_of(load_lerobot(bridge.root, episodes=2, stride=8))} == {0, 1}
    assert {r["episode_index"] for r in rows_of(load_lerobot(bridge.root, episodes=[2], stride=8))} == {2}
    assert {r["episode_index"] for r in rows_of(load_lerobot(bridge.root, episodes=range(0, 2), stride=8))} == {0, 1}
    a = provenance(load_lerobot(bridge.root, episodes="sample:2", seed=3, stride=8))["episodes"]
    b = provenance(load_lerobot(bridge.root, episodes="sample:2", seed=3, stride=8))["episodes"]
    assert a == b and len(a) == 2 and set(a) <= {0, 1, 2}
    ds = load_lerobot(bridge.root, episodes=[2], frames_per_episode=3)   # length 12 -> segment middles
    assert [r["step_index"] for r in rows_of(ds)] == [2, 6, 10]
    assert list(frame_indices(5, frames_per_episode=9)) == [0, 1, 2, 3, 4]


def test_other_camera_and_resize(bridge):
    ds = load_lerobot(bridge.root, episodes=[1], camera="observation.images.image_1", image_size=32, stride=4)
    for row in rows_of(ds):
        assert row["image"].size == (32, 32)
        assert_colour(row["image"], frame_colour(1, row["step_index"], camera=1))


def test_fractal_conventions_map_to_schema(fractal):
    ds = load_lerobot(fractal.root)
    assert provenance(ds)["camera"] == "observation.images.image" and provenance(ds)["fps"] == 3.0
    for row in rows_of(ds):
        ep, t = row["episode_index"], row["step_index"]
        assert row["image"].size == (80, 64)                      # (width, height): not squared
        assert_colour(row["image"], frame_colour(ep, t))
        state = np.asarray(row["state"])
        np.testing.assert_allclose(state[:3], fractal.state[ep][t, :3], atol=1e-6)
        np.testing.assert_allclose(state[3:6], fractal.rpy[ep][t], atol=1e-5)   # quaternion -> rpy
        assert state[6] == 0.0
        assert state[7] == pytest.approx(1.0 - fractal.state[ep][t, 7])         # gripper_closed -> open
        np.testing.assert_allclose(row["action"], fractal.action[ep][t], atol=1e-6)
    assert gripper_agreement(ds) > 0.5


def test_cameras_stored_as_parquet_images(tmp_path):
    fx = write_lerobot_fixture(tmp_path, "fractal", lengths=(4, 5), video=False)
    ds = load_lerobot(fx.root, stride=2)
    assert [(r["episode_index"], r["step_index"]) for r in rows_of(ds)] == [(0, 0), (0, 2), (1, 0), (1, 2), (1, 4)]
    for row in rows_of(ds):
        assert np.array_equal(np.asarray(row["image"])[0, 0], frame_colour(row["episode_index"], row["step_index"]))


def test_quat_to_rpy_known_values():
    half = np.sqrt(0.5)
    rpy = quat_to_rpy(np.array([[0, 0, 0, 1.0], [half, 0, 0, half], [0, 0, half, half]]))
    np.testing.assert_allclose(rpy, [[0, 0, 0], [np.pi / 2, 0, 0], [0, 0, np.pi / 2]], atol=1e-9)
    c, s = np.cos(np.pi / 8), np.sin(np.pi / 8)
    wxyz = quat_to_rpy(np.array([[c, 0, s, 0]]), order="wxyz")   # 45 deg about y, scalar first
    np.testing.assert_allclose(wxyz, [[0, np.pi / 4, 0]], atol=1e-9)


def test_inverted_gripper_convention_warns(fractal):
    wrong = dataclasses.replace(FRACTAL, state_gripper_open="high")
    with pytest.warns(UserWarning, match="anti-correlate"):
        load_lerobot(fractal.root, stride=2, conventions=wrong)


def test_inspect_reads_meta_only(fractal):
    summary = inspect_lerobot(fractal.root)
    assert summary["episodes"] == 3 and summary["frames"] == sum(fractal.lengths)
    assert summary["cameras"] == ["observation.images.image"] and summary["fps"] == 3.0
    assert summary["conventions"]["state_layout"] == "xyz_quat_gripper"


def test_empty_instructions_are_skipped(tmp_path):
    fx = write_lerobot_fixture(tmp_path, "fractal", lengths=(4, 4, 4), tasks=["pick coke can", "", "open drawer"])
    assert provenance(load_lerobot(fx.root, episodes=2, stride=4))["episodes"] == [0, 2]
    with pytest.warns(UserWarning, match="empty instruction"):
        assert provenance(load_lerobot(fx.root, episodes="0:3", stride=4))["episodes"] == [0, 2]
    assert provenance(load_lerobot(fx.root, stride=4, require_instruction=False))["episodes"] == [0, 1, 2]


# ------------------------------------------------------------------------------------------------------------
# Statistics

def test_action_stats_from_stats_json(bridge, tmp_path):
    ds = load_lerobot(bridge.root, episodes=[0], stride=5)
    ds.save_to_disk(str(tmp_path / "saved"))                 # the load record survives a save and reload
    reloaded = datasets.load_from_disk(str(tmp_path / "saved"))
    for stats in (action_stats(ds), action_stats(reloaded)):   # dataset-wide, not this subset
        assert stats["source"] == "meta/stats.json"
        for key in ("q01", "q99", "mean", "std"):
            np.testing.assert_allclose(stats[key], bridge.stats[key], atol=1e-6)
    assert provenance(reloaded)["episodes"] == [0]


def test_action_stats_computed_on_subset(fractal):
    ds = load_lerobot(fractal.root, episodes=[0, 2])        # stats.json has no q01/q99
    stats = action_stats(ds)
    actions = np.concatenate([fractal.action[0], fractal.action[2]]).astype(np.float64)
    assert stats["source"] == f"computed on {len(actions)} rows" and stats["n"] == len(actions)
    np.testing.assert_allclose(stats["q01"], np.quantile(actions, 0.01, axis=0), atol=1e-6)
    np.testing.assert_allclose(stats["q99"], np.quantile(actions, 0.99, axis=0), atol=1e-6)
    np.testing.assert_allclose(stats["mean"], actions.mean(0), atol=1e-6)
    np.testing.assert_allclose(stats["std"], actions.std(0), atol=1e-6)
    from_rows = action_stats([{"action": a} for a in actions])
    np.testing.assert_allclose(from_rows["q99"], stats["q99"], atol=1e-6)


def test_action_stats_from_episodes_stats_jsonl(tmp_path):
    fx = write_lerobot_fixture(tmp_path, "fractal", lengths=(5, 7, 9), stats="episodes")
    stats = action_stats(load_lerobot(fx.root, episodes=[1], stride=3))
    assert stats["source"].startswith("meta/episodes_stats.jsonl")
    everything = np.concatenate([fx.action[i] for i in range(3)]).astype(np.float64)
    np.testing.assert_allclose(stats["mean"], everything.mean(0), atol=1e-6)   # pooled exactly
    np.testing.assert_allclose(stats["std"], everything.std(0), atol=1e-6)


def test_stats_follow_a_gripper_remap(tmp_path):
    """A generic dataset with a [-1, 1], 1 = close gripper: rows and stats both map to [0, 1], 1 = open."""
    fx = write_lerobot_fixture(tmp_path, "bridge", lengths=(6, 6), name="widowx_custom_lerobot")
    stats = json.loads((fx.root / "meta/stats.json").read_text())
    for key in ("q01", "q99", "mean", "min", "max"):
        stats["action"][key][6] = 1 - 2 * stats["action"][key][6]      # 1 = open -> 1 = close, in [-1, 1]
    stats["action"]["q01"][6], stats["action"]["q99"][6] = stats["action"]["q99"][6], stats["action"]["q01"][6]
    stats["action"]["std"][6] *= 2
    (fx.root / "meta/stats.json").write_text(json.dumps(stats))
    info = json.loads((fx.root / "meta/info.json").read_text())
    conv = generic_conventions(info, name="widowx_custom", camera="observation.images.image_1",
                               action_gripper_range=(-1.0, 1.0), action_gripper_open="low")
    for ep in range(2):   # rewrite the gripper column in the same convention
        path = fx.root / f"data/chunk-000/episode_{ep:06d}.parquet"
        table = pq.read_table(path).to_pydict()
        table["action"] = [a[:6] + [1 - 2 * a[6]] for a in table["action"]]
        pq.write_table(pa.table(table), path)
    ds = load_lerobot(fx.root, conventions=conv)
    np.testing.assert_allclose(np.asarray(ds.with_format("numpy")["action"])[:, 6],
                               np.concatenate([fx.action[0][:, 6], fx.action[1][:, 6]]), atol=1e-6)
    got = action_stats(ds)
    for key in ("q01", "q99", "mean", "std"):
        np.testing.assert_allclose(got[key], fx.stats[key], atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Clear errors

def test_missing_info_json(tmp_path):
    with pytest.raises(LeRobotFormatError, match="meta/info.json"):
        load_lerobot(tmp_path)


def test_unknown_camera_lists_cameras(bridge):
    with pytest.raises(LeRobotFormatError, match="observation.images.image_0.*observation.images.image_1"):
        load_lerobot(bridge.root, camera="observation.images.wrist")


def test_template_that_matches_no_file(fractal, tmp_path):
    root = copy_fixture(fractal, tmp_path)
    edit_info(root, data_path="data/chunk-{episode_chunk:03d}/ep_{episode_index:06d}.parquet")
    with pytest.raises(LeRobotFormatError, match=r"ep_000000.parquet.*data_path"):
        load_lerobot(root)
    edit_info(root, data_path="data/{chunk}/episode_{episode_index:06d}.parquet")
    with pytest.raises(LeRobotFormatError, match="cannot be filled"):
        load_lerobot(root)


def test_episode_out_of_range(fractal):
    with pytest.raises(LeRobotFormatError, match=r"\[7\] out of range.*3 episodes \(0..2\)"):
        load_lerobot(fractal.root, episodes=[7])
    with pytest.raises(LeRobotFormatError, match="asked for 5 episodes"):
        load_lerobot(fractal.root, episodes=5)


def test_other_malformed_inputs(fractal, tmp_path):
    root = copy_fixture(fractal, tmp_path)
    edit_info(root, codebase_version="v3.0")
    with pytest.raises(LeRobotFormatError, match=r"meta/info.json codebase_version is v3.0.*v2.x") as error:
        load_lerobot(root)
    assert "\n" not in str(error.value)
    with pytest.raises(LeRobotFormatError, match="neither an existing folder nor a hub dataset id"):
        load_lerobot(str(tmp_path / "missing" / "dataset"))
    with pytest.raises(LeRobotFormatError, match="stride or frames_per_episode"):
        load_lerobot(fractal.root, stride=2, frames_per_episode=3)


# ------------------------------------------------------------------------------------------------------------
# The hub path, against a local server that speaks the hub's resolve endpoint

def test_hub_fetches_only_the_requested_episode(bridge, tmp_path):
    repo = "test-org/bridge_orig_lerobot"
    with serve_hub({repo: bridge.root}) as (url, log):
        ds = load_lerobot(repo, episodes=[2], stride=4, endpoint=url, cache_dir=tmp_path / "hub")
    requested = {filename for _, _, _, filename in log}
    episode_files = {"data/chunk-001/episode_000002.parquet",
                     "videos/chunk-001/observation.images.image_0/episode_000002.mp4"}
    meta_files = {"meta/info.json", "meta/episodes.jsonl", "meta/tasks.jsonl", "meta/stats.json"}
    assert requested == meta_files | episode_files
    assert {f for method, _, _, f in log if method == "GET"} == meta_files | episode_files
    # the first file resolves "main" to a commit; every later file is fetched at that commit
    assert {rev for _, _, rev, f in log if f == "meta/info.json"} == {"main"}
    assert {rev for _, _, rev, f in log if f != "meta/info.json"} == {COMMIT}
    record = provenance(ds)
    assert record["revision"] == COMMIT and record["repo_id"] == repo
    assert set(record["fetched"]) == meta_files | episode_files
    local = load_lerobot(bridge.root, episodes=[2], stride=4)
    assert [r["step_index"] for r in rows_of(ds)] == [r["step_index"] for r in rows_of(local)] == [0, 4, 8]
    for hub_row, local_row in zip(rows_of(ds), rows_of(local)):
        assert np.array_equal(np.asarray(hub_row["image"]), np.asarray(local_row["image"]))
        assert hub_row["action"] == local_row["action"] and hub_row["instruction"] == local_row["instruction"]


def test_hub_sample_is_seeded_and_needs_an_episode_spec(fractal, tmp_path):
    repo = "test-org/fractal20220817_data_lerobot"
    with serve_hub({repo: fractal.root}) as (url, log):
        with pytest.raises(LeRobotFormatError, match="pass episodes="):
            load_lerobot(repo, endpoint=url, cache_dir=tmp_path / "hub")
        ds = load_lerobot(repo, episodes="sample:1", seed=0, stride=9, endpoint=url, cache_dir=tmp_path / "hub")
    (chosen,) = provenance(ds)["episodes"]
    parquets = {f for _, _, _, f in log if f.endswith(".parquet")}
    assert parquets == {f"data/chunk-{chosen // 2:03d}/episode_{chosen:06d}.parquet"}


def test_hub_errors_say_what_to_do(bridge, tmp_path, monkeypatch):
    with serve_hub({"test-org/bridge_orig_lerobot": bridge.root}) as (url, _):
        with pytest.raises(LeRobotFormatError, match="does not exist or is not accessible.*HF_TOKEN"):
            load_lerobot("test-org/nothing_here", episodes=[0], endpoint=url, cache_dir=tmp_path / "a")
        with pytest.raises(LeRobotFormatError, match="revision not found"):
            load_lerobot("test-org/bridge_orig_lerobot", episodes=[0], revision="v9", endpoint=url,
                         cache_dir=tmp_path / "b")
    with socket.socket() as s:                      # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    import huggingface_hub.utils._http as hub_http
    monkeypatch.setattr(hub_http.time, "sleep", lambda seconds: None)   # skip the client's retry backoff
    with pytest.raises(LeRobotFormatError, match="unreachable.*HF_TOKEN.*local folder"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_lerobot("test-org/bridge_orig_lerobot", episodes=[0], endpoint=closed, cache_dir=tmp_path / "c")


# ------------------------------------------------------------------------------------------------------------
# Conventions: sources and pinned revisions

def test_every_convention_cites_a_public_source_and_none_is_assumed():
    """Each field of BRIDGE / FRACTAL names a source tag listed, with its URL, in the module docstring."""
    doc = conventions_module.__doc__
    listed = dict(re.findall(r"^\[([\w-]+)\]\s+(.*?)(?=\n\[|\Z)", doc, flags=re.S | re.M))
    assert {"any4lerobot", "open-pi-zero", "simplerenv", "hub"} <= set(listed)
    assert all("https://" in text for text in listed.values())
    for conv in KNOWN_CONVENTIONS.values():
        assert {"camera", "state_layout", "state_gripper", "action", "fps", "instruction", "revision"} <= set(
            conv.sources)
        for field_name, text in conv.sources.items():
            assert "assumed" not in text, (conv.name, field_name)
            tags = re.findall(r"\[([a-z][\w-]{2,})\]", text)      # [any4lerobot], not state[t]
            assert tags and set(tags) <= set(listed), (conv.name, field_name, tags)
    # what the converters confirm: Fractal xyzw quaternion and a closedness state gripper; Bridge openness
    assert (FRACTAL.quat_order, FRACTAL.state_gripper_open, BRIDGE.state_gripper_open) == ("xyzw", "low", "high")
    assert (FRACTAL.action_gripper_open, BRIDGE.action_gripper_open) == ("high", "high")


def test_known_datasets_pin_a_commit_of_their_own_hub_id():
    for conv in (BRIDGE, FRACTAL):
        assert re.fullmatch(r"[0-9a-f]{40}", conv.revision), conv.revision
        assert conv.hub_id == f"IPEC-COMMUNITY/{conv.name}"


def test_hub_reads_a_known_dataset_at_its_pinned_commit(bridge, tmp_path):
    with serve_hub({BRIDGE.hub_id: bridge.root}, commit=BRIDGE.revision) as (url, log):
        ds = load_lerobot(BRIDGE.hub_id, episodes=[1], stride=4, endpoint=url, cache_dir=tmp_path / "a")
        assert {rev for _, _, rev, _ in log} == {BRIDGE.revision}          # never "main"
        record = provenance(ds)
        assert record["revision"] == BRIDGE.revision and record["revision_pinned"] is True
        assert inspect_lerobot(BRIDGE.hub_id, endpoint=url, cache_dir=tmp_path / "a")["revision"] == BRIDGE.revision
        log.clear()
        ds = load_lerobot(BRIDGE.hub_id, episodes=[1], stride=4, revision="main", endpoint=url,
                          cache_dir=tmp_path / "b")                         # an explicit revision wins
        assert {rev for _, _, rev, f in log if f == "meta/info.json"} == {"main"}
        assert provenance(ds)["revision_pinned"] is False


def test_hub_errors_name_the_pin_and_refuse_v3(bridge, fractal, tmp_path):
    root = copy_fixture(bridge, tmp_path)
    (root / "data/chunk-000/episode_000001.parquet").unlink()
    with serve_hub({BRIDGE.hub_id: root}, commit=BRIDGE.revision) as (url, _):
        with pytest.raises(LeRobotFormatError, match=r"episode_000001.parquet does not exist") as error:
            load_lerobot(BRIDGE.hub_id, episodes=[1], endpoint=url, cache_dir=tmp_path / "a")
    assert f"revision {BRIDGE.revision} (the dataset's pinned v2.x default; revision='main'" in str(error.value)
    v3 = copy_fixture(fractal, tmp_path / "v3")
    edit_info(v3, codebase_version="v3.0")
    with serve_hub({FRACTAL.hub_id: v3}, commit=FRACTAL.revision) as (url, _):
        with pytest.raises(LeRobotFormatError, match=rf"at revision {FRACTAL.revision}: meta/info.json "
                                                      r"codebase_version is v3.0.*pass revision= a v2.x") as error:
            load_lerobot(FRACTAL.hub_id, episodes=[0], revision="main", endpoint=url, cache_dir=tmp_path / "b")
    assert "\n" not in str(error.value)


def test_package_modules_import_one_way():
    """conventions <- hub <- reader <- api: each module imports only the ones before it (function level too)."""
    import ast

    import refinevla.lerobot as package

    order = ["conventions", "hub", "reader", "api"]
    folder = Path(package.__file__).parent
    assert sorted(p.stem for p in folder.glob("*.py")) == sorted(order + ["__init__"])
    for position, name in enumerate(order):
        tree = ast.parse((folder / f"{name}.py").read_text())
        siblings = {node.module for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
        assert siblings <= set(order[:position]), (name, siblings)
        assert len((folder / f"{name}.py").read_text().splitlines()) <= 300, name
