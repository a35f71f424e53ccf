"""SimplerEnv settings chosen from the policy's base (SimplerEnv cannot run here: stand-in envs and the SpatialVLA
stand-in, tests/standins/).

    .venv/bin/pytest tests/test_paper_simpler.py -q

Upstream's SpatialVLA adapter (simpler_env/policies/spatialvla/spatialvla_model.py) runs Google Robot with a sticky
gripper held 10 steps whose previous value moves only on a trigger, and un-normalises with
``fractal20220817_data/0.1.0``; on WidowX with ``bridge_orig/1.0.0``. The run config's values override.
"""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "standins"))
from build import FRACTAL_KEY, FRACTAL_STATS, STATS, UNNORM_KEY, build_spatialvla  # noqa: E402
from test_simpler_adapter import StandInSimplerEnv, ZeroPolicy  # noqa: E402

from refinevla.backends import simpler as S  # noqa: E402
from refinevla.config import EvaluateConfig  # noqa: E402

GOOGLE = "google_robot_pick_coke_can"


def test_google_robot_gripper_follows_the_base_unless_set():
    cfg = S.SimplerConfig.from_evaluate(EvaluateConfig(backend="simpler", tasks=[GOOGLE]))
    assert (cfg.sticky_repeat, cfg.sticky_update) == (None, None)  # left at the defaults: the base's own
    assert cfg.gripper("spatialvla") == (10, "on_trigger")
    assert cfg.gripper("openvla") == cfg.gripper(None) == (15, "every_step")  # Octo / OpenVLA adapters
    set_ = S.SimplerConfig.from_evaluate(EvaluateConfig(backend="simpler", tasks=[GOOGLE], simpler_sticky_repeat=12))
    assert set_.gripper("spatialvla") == (12, "on_trigger") and set_.gripper(None) == (12, "every_step")
    set_ = S.SimplerConfig.from_evaluate(EvaluateConfig(backend="simpler", tasks=[GOOGLE],
                                                        simpler_sticky_update="on_trigger", simpler_sticky_repeat=10))
    assert set_.gripper("openvla") == (10, "on_trigger")
    # a value equal to the field's default (15, every_step) reads as unset: the config cannot tell them apart
    # until evaluate.simpler_sticky_* default to none (refinevla/sections.py); SimplerConfig(...) itself can
    assert S.SimplerConfig(sticky_repeat=15, sticky_update="every_step").gripper("spatialvla") == (15, "every_step")


class SpatialVLALike(ZeroPolicy):
    """A policy on a SpatialVLA base, as RemotePolicy presents itself to the loop."""

    base_kind = "spatialvla"

    def __init__(self):
        super().__init__()
        self.robots = []

    def select_robot(self, robot):
        self.robots.append(robot)
        return {"google_robot": FRACTAL_KEY, "widowx": UNNORM_KEY}[robot]


def test_the_loop_gives_a_spatialvla_policy_its_google_robot_settings(tmp_path, monkeypatch, capsys):
    made = []

    class Recording(S.ActionConverter):
        def __init__(self, robot, repeat, update, scale):
            made.append((robot, repeat, update))
            super().__init__(robot, repeat, update, scale)

    monkeypatch.setattr(S, "ActionConverter", Recording)
    policy = SpatialVLALike()
    cfg = S.SimplerConfig(tasks=(GOOGLE, "widowx_carrot_on_plate"), settings=("visual_matching",), episodes=1)
    S.run_simpler(policy, cfg, tmp_path / "a", make_env=StandInSimplerEnv)
    assert ("google_robot", 10, "on_trigger") in made and set(policy.robots) == {"google_robot", "widowx"}
    said = capsys.readouterr().out
    assert said.count("simpler: google_robot with a spatialvla base: sticky gripper 10 steps, on_trigger, "
                      f"unnorm key {FRACTAL_KEY}") == 1
    made.clear()
    cfg = S.SimplerConfig(tasks=(GOOGLE,), settings=("visual_matching",), episodes=1, sticky_repeat=15,
                          sticky_update="every_step")
    S.run_simpler(policy, cfg, tmp_path / "b", make_env=StandInSimplerEnv)
    assert made and all(m == ("google_robot", 15, "every_step") for m in made)  # the run's values win
    made.clear()
    S.run_simpler(ZeroPolicy(), S.SimplerConfig(tasks=(GOOGLE,), settings=("visual_matching",), episodes=1),
                  tmp_path / "c", make_env=StandInSimplerEnv)
    assert made and all(m == ("google_robot", 15, "every_step") for m in made)  # any other policy


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return build_spatialvla(tmp_path_factory.mktemp("spatialvla"))


def test_a_spatialvla_base_takes_each_robots_statistics_unless_a_key_is_set(standin):
    from refinevla.policy import load_policy

    policy = load_policy(standin, reasoning=False)  # unnorm_key '' (the paper preset's)
    assert policy.base_kind == "spatialvla" and policy.base.unnorm_key == UNNORM_KEY
    assert policy.select_robot("google_robot") == FRACTAL_KEY
    assert policy.base.stats["q99"] == FRACTAL_STATS["action"]["q99"]
    _, actions = policy.predict(np.full((32, 32, 3), 90, np.uint8), "pick coke can")
    low, high = np.asarray(FRACTAL_STATS["action"]["q01"]), np.asarray(FRACTAL_STATS["action"]["q99"])
    assert ((actions[:, :6] >= low[:6] - 1e-6) & (actions[:, :6] <= high[:6] + 1e-6)).all()
    assert np.abs(actions[:, :6]).max() <= np.abs(high[:6]).max()
    assert policy.select_robot("widowx") == UNNORM_KEY and policy.base.stats["q99"] == STATS["action"]["q99"]
    fixed = load_policy(standin, reasoning=False, unnorm_key=UNNORM_KEY)  # a set key: every robot
    assert fixed.select_robot("google_robot") == UNNORM_KEY
