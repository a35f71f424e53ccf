"""The evaluation harness: records, resume, error capture, metrics, tables, bad input.

Most tests run on a tiny fake backend defined in this module (the harness's backend contract: ``TASKS`` and
``make_task``), so they take milliseconds; one test runs the real robosuite backend in two spawned workers.
"""
import functools
import json
import sys

import numpy as np
import pandas as pd
import pytest

from refinevla import evaluate as ev
from refinevla.evaluate import EvaluateConfig, compare_table, evaluate, summarise, wilson_interval
from refinevla.policy import ZeroPolicy

# -----------------------------------------------------------------------------
# a fake backend: "good" succeeds on step 3 for even seeds; "broken" raises inside step()

TASKS = {"good": "do the good thing", "broken": "do the broken thing"}
RESETS = []  # (task, seed) of every env.reset, to count what a re-run really executes


class FakeEnv:
    max_steps = 5

    def __init__(self, task, image_size):
        self.task, self.n = task, image_size

    def _obs(self):
        return {"image": np.full((self.n, self.n, 3), self.t * 40, np.uint8), "state": np.zeros(8, np.float32),
                "instruction": TASKS[self.task], "seed": self.seed}

    def reset(self, seed):
        RESETS.append((self.task, seed))
        self.seed, self.t = seed, 0
        return self._obs()

    def step(self, action):
        assert np.asarray(action).shape == (7,)
        if self.task == "broken":
            raise RuntimeError("simulator exploded")
        self.t += 1
        return self._obs(), self.seed % 2 == 0 and self.t >= 3

    def close(self):
        pass


def make_task(task, image_size=64, segmentation=True):
    return FakeEnv(task, image_size)


class RaisingPolicy(ZeroPolicy):
    """Raises on one seed (read from the fake observation)."""

    def __init__(self, bad_seed):
        self.bad_seed = bad_seed

    def act(self, obs):
        if obs["seed"] == self.bad_seed:
            raise ValueError("policy broke on purpose")
        return super().act(obs)


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(ev.BACKENDS, "fake", __name__)
    assert sys.modules[__name__].TASKS is TASKS
    RESETS.clear()
    return functools.partial(EvaluateConfig, backend="fake", image_size=8, progress=False)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# -----------------------------------------------------------------------------
# harness behaviour (fake backend)


def test_records_summary_and_strip(fake, tmp_path):
    df = evaluate(ZeroPolicy, fake(tasks=("good",), episodes_per_task=4), tmp_path)
    lines = _lines(tmp_path / "episodes.jsonl")
    assert len(lines) == len(df) == 4
    assert set(ev.RECORD_KEYS) <= set(lines[0])
    assert [r["seed"] for r in lines] == [10_000, 10_001, 10_002, 10_003]
    assert [r["success"] for r in lines] == [True, False, True, False]
    assert [r["steps"] for r in lines] == [3, 5, 3, 5]
    assert all(r["error"] is None for r in lines)
    summary = pd.read_csv(tmp_path / "summary.csv", index_col="task")
    assert list(summary.index) == ["good", "average"]
    assert summary.loc["good", "success_rate"] == 0.5 and summary.loc["good", "n"] == 4
    assert (tmp_path / "strips" / "good.png").exists()


def test_resume_skips_finished_episodes(fake, tmp_path):
    evaluate(ZeroPolicy, fake(tasks=("good",), episodes_per_task=3), tmp_path)
    assert len(RESETS) == 3
    RESETS.clear()
    df = evaluate(ZeroPolicy, fake(tasks=("good",), episodes_per_task=5), tmp_path)
    assert RESETS == [("good", 10_003), ("good", 10_004)]  # only the two new episodes ran
    assert len(_lines(tmp_path / "episodes.jsonl")) == 5 and len(df) == 5
    RESETS.clear()
    evaluate(ZeroPolicy, fake(tasks=("good",), episodes_per_task=5), tmp_path)
    assert RESETS == []


def test_torn_last_line_is_run_again(fake, tmp_path):
    evaluate(ZeroPolicy, fake(tasks=("good",), episodes_per_task=2), tmp_path)
    path = tmp_path / "episodes.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][:10])  # a kill in the middle of a write
    RESETS.clear()
    df = evaluate(ZeroPolicy, fake(tasks=("good",), episodes_per_task=2), tmp_path)
    assert RESETS == [("good", 10_001)] and len(df) == 2
    assert [r["seed"] for r in _lines(path)] == [10_000, 10_001]  # the file is whole again


def test_policy_error_is_recorded_and_run_goes_on(fake, tmp_path):
    factory = functools.partial(RaisingPolicy, bad_seed=10_001)
    df = evaluate(factory, fake(tasks=("good",), episodes_per_task=3), tmp_path)
    bad = df[df.seed == 10_001].iloc[0]
    assert not bad.success and "policy broke on purpose" in bad.error
    assert df[df.seed != 10_001].error.isna().all() and len(df) == 3
    assert summarise(df.to_dict("records")).loc["good", "errors"] == 1


def test_env_error_is_recorded(fake, tmp_path):
    df = evaluate(ZeroPolicy, fake(tasks=("broken", "good"), episodes_per_task=2), tmp_path)
    assert len(df) == 4
    assert df[df.task == "broken"].error.str.contains("simulator exploded").all()
    assert df[df.task == "good"].error.isna().all()


def test_retry_errors_reruns_only_failed_episodes(fake, tmp_path):
    evaluate(functools.partial(RaisingPolicy, bad_seed=10_000), fake(tasks=("good",), episodes_per_task=2), tmp_path)
    RESETS.clear()
    df = evaluate(ZeroPolicy, fake(tasks=("good",), episodes_per_task=2, retry_errors=True), tmp_path)
    assert RESETS == [("good", 10_000)] and df.error.isna().all()
    assert len(_lines(tmp_path / "episodes.jsonl")) == 2


def test_max_steps_override(fake, tmp_path):
    df = evaluate(ZeroPolicy, fake(tasks=("good",), seeds=[1], max_steps=2), tmp_path)
    assert df.steps.tolist() == [2]


# -----------------------------------------------------------------------------
# bad input


def test_unknown_task_and_empty_seeds_raise(fake, tmp_path):
    with pytest.raises(ValueError, match="unknown task.*good"):
        evaluate(ZeroPolicy, fake(tasks=("juggle",)), tmp_path)
    with pytest.raises(ValueError, match="seed list is empty"):
        evaluate(ZeroPolicy, fake(tasks=("good",), seeds=[]), tmp_path)
    with pytest.raises(ValueError, match="seed list is empty"):
        evaluate(ZeroPolicy, fake(tasks=("good",), episodes_per_task=0), tmp_path)
    with pytest.raises(ValueError, match="unknown backend"):
        evaluate(ZeroPolicy, EvaluateConfig(backend="gazebo"), tmp_path)
    with pytest.raises(ValueError, match="unknown task"):
        ev.validate(EvaluateConfig(tasks=("juggle",)))  # the real robosuite table


# -----------------------------------------------------------------------------
# metrics and tables


def test_wilson_interval_known_values():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(23, 40) == pytest.approx((0.4219, 0.7149), abs=1e-4)  # shared README: 42-72%


def _records(task, k, n):
    return [{"task": task, "seed": i, "success": i < k, "steps": 1, "wall_s": 0.1, "error": None} for i in range(n)]


def test_summarise_shape_and_average():
    s = summarise(_records("lift", 8, 10) + _records("stack", 2, 10))
    assert list(s.index) == ["lift", "stack", "average"]
    assert {"success_rate", "n", "ci_low", "ci_high", "successes", "errors"} <= set(s.columns)
    assert s.loc["average", "success_rate"] == pytest.approx(0.5) and s.loc["average", "n"] == 20
    assert s.loc["lift", "ci_low"] < 0.8 < s.loc["lift", "ci_high"]


def test_compare_table_one_column_per_model():
    a = summarise(_records("lift", 8, 10) + _records("stack", 2, 10))
    b = summarise(_records("lift", 9, 10))
    table = compare_table({"baseline": a, "refinevla": b})
    assert list(table.columns) == ["baseline", "refinevla"]
    assert list(table.index) == ["lift", "stack", "average"]
    assert table.loc["lift", "refinevla"] == pytest.approx(0.9) and np.isnan(table.loc["stack", "refinevla"])
    text = compare_table({"baseline": a}, ci=True)
    assert text.loc["lift", "baseline"].startswith("80.0% [")
    with pytest.raises(ValueError):
        compare_table({})


# -----------------------------------------------------------------------------
# the real backend, in spawned workers


@pytest.mark.slow
def test_robosuite_backend_in_two_spawned_workers(tmp_path):
    pytest.importorskip("robosuite")
    cfg = EvaluateConfig(tasks=("lift",), episodes_per_task=2, max_steps=5, workers=2, progress=False)
    df = evaluate(ZeroPolicy, cfg, tmp_path)
    assert len(df) == 2 and df.error.isna().all() and (df.steps == 5).all() and not df.success.any()
    assert (tmp_path / "strips" / "lift.png").exists()
