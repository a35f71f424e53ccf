"""SimplerEnv / ManiSkill3 adapter logic, tested WITHOUT a simulator.

SimplerEnv needs a GPU with Vulkan and ManiSkill3's Bridge assets come from a model hub, so neither runs on
these machines. What is tested here: the action and observation conversions, the task table, the missing-
package error, and the episode loop (records, resume, error capture) against small stand-in env classes
defined below. What a real simulator run adds (rendering, physics, the envs' own success checks) is not.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import types

import numpy as np
import pytest

from refinevla import simpler as S
from refinevla.policy import ZeroPolicy


# ----------------------------------------------------------------------------------------------- helpers
from test_geometry import rx as _rx, ry as _ry, rz as _rz  # noqa: E402  the elementary rotations, written once


def _rodrigues(rotvec):
    """Axis-angle -> matrix, independent of the module's quaternion code."""
    theta = float(np.linalg.norm(rotvec))
    if theta < 1e-12:
        return np.eye(3)
    k = np.asarray(rotvec) / theta
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(theta) * kx + (1 - math.cos(theta)) * kx @ kx


# --------------------------------------------------------------------------------- euler -> axis-angle
@pytest.mark.parametrize("rpy, expected", [
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    ((0.3, 0.0, 0.0), (0.3, 0.0, 0.0)),
    ((0.0, -0.2, 0.0), (0.0, -0.2, 0.0)),
    ((0.0, 0.0, 0.4), (0.0, 0.0, 0.4)),
    ((math.pi, 0.0, 0.0), (math.pi, 0.0, 0.0)),
    # Rz(90) Rx(90) maps x->y, y->z, z->x: 120 degrees about (1, 1, 1)
    ((math.pi / 2, 0.0, math.pi / 2), tuple(np.ones(3) / math.sqrt(3) * 2 * math.pi / 3)),
])
def test_adapter_without_simulator_euler_to_axis_angle_known_rotations(rpy, expected):
    np.testing.assert_allclose(S.euler_to_axis_angle(rpy), expected, atol=1e-9)


def test_adapter_without_simulator_euler_to_axis_angle_matches_static_xyz_matrices():
    rng = np.random.default_rng(0)
    for rpy in rng.uniform(-1.2, 1.2, size=(50, 3)):
        expected = _rz(rpy[2]) @ _ry(rpy[1]) @ _rx(rpy[0])  # transforms3d "sxyz"
        rotvec = S.euler_to_axis_angle(rpy)
        np.testing.assert_allclose(_rodrigues(rotvec), expected, atol=1e-9)
        assert np.linalg.norm(rotvec) <= math.pi + 1e-12
        np.testing.assert_allclose(S.quat_to_matrix(S.euler_to_quat(*rpy)), expected, atol=1e-9)
        np.testing.assert_allclose(S.matrix_to_euler(expected), rpy, atol=1e-9)


def test_adapter_without_simulator_euler_to_axis_angle_matches_scipy():
    Rotation = pytest.importorskip("scipy.spatial.transform").Rotation
    rng = np.random.default_rng(1)
    for rpy in rng.uniform(-0.5, 0.5, size=(50, 3)):  # policy-sized deltas
        np.testing.assert_allclose(S.euler_to_axis_angle(rpy), Rotation.from_euler("xyz", rpy).as_rotvec(),
                                   atol=1e-9)


def test_adapter_without_simulator_robot_init_quat_is_yaw_times_center():
    # evaluation/argparse.py: Pose(q=euler2quat(0, 0, yaw)) * Pose(q=[0, 0, 0, 1]) (wxyz)
    np.testing.assert_allclose(S.robot_init_quat(0.0), [0, 0, 0, 1], atol=1e-12)
    yaw = -0.09
    expected = _rz(yaw) @ _rz(math.pi)  # [0, 0, 0, 1] is a half turn about z
    np.testing.assert_allclose(S.quat_to_matrix(S.robot_init_quat(yaw)), expected, atol=1e-12)


# ------------------------------------------------------------------------------------------- gripper
@pytest.mark.parametrize("open_amount, expected", [(1.0, 1.0), (0.51, 1.0), (0.5, -1.0), (0.2, -1.0), (0.0, -1.0)])
def test_adapter_without_simulator_widowx_gripper_binarised(open_amount, expected):
    assert S.widowx_gripper(open_amount) == expected


def test_adapter_without_simulator_sticky_gripper_sequence():
    sticky = S.StickyGripper(num_repeat=3)
    opens = [1, 1, 0, 0, 0, 0, 1, 1]
    # close (+1) held 3 steps from the trigger, then idle, then open (-1) held
    assert [sticky(o) for o in opens] == [0, 0, 1, 1, 1, 0, -1, -1]
    sticky.reset()
    assert sticky(0.0) == 0  # first step after reset: no previous value, no command


def test_adapter_without_simulator_sticky_gripper_default_repeat_is_15():
    sticky = S.StickyGripper()
    out = [sticky(o) for o in [1.0, 0.0] + [0.0] * 20]
    assert out[1:16] == [1.0] * 15 and out[16:] == [0.0] * 6


def test_adapter_without_simulator_sticky_gripper_on_trigger_catches_slow_close():
    slow_close = [1.0, 0.6, 0.2, 0.2]
    every = S.StickyGripper(num_repeat=2, update="every_step")
    assert [every(o) for o in slow_close] == [0.0, pytest.approx(0.4), pytest.approx(0.4), 0.0]
    on_trigger = S.StickyGripper(num_repeat=2, update="on_trigger")  # SpatialVLA's adapter
    assert [on_trigger(o) for o in slow_close] == [0.0, pytest.approx(0.4), pytest.approx(0.8), pytest.approx(0.8)]


def test_adapter_without_simulator_action_converter_per_robot():
    a = np.array([0.01, -0.02, 0.03, 0.0, 0.0, 0.1, 0.0], np.float32)
    w = S.ActionConverter("widowx")(a)
    np.testing.assert_allclose(w, [0.01, -0.02, 0.03, 0, 0, 0.1, -1.0], atol=1e-7)
    g = S.ActionConverter("google_robot")
    assert g(np.r_[a[:6], 1.0])[6] == 0.0  # first step: no relative command
    assert g(a)[6] == 1.0  # open 1 -> 0: close (+1 on the Google robot)
    with pytest.raises(ValueError):
        S.ActionConverter("widowx")(np.zeros(6))
    with pytest.raises(ValueError):
        S.ActionConverter("widowx")(np.full(7, np.nan))


# ------------------------------------------------------------------------------------------- observations
def _fake_obs(h=48, w=64, batched=False):
    third = np.full((h, w, 3), 30, np.uint8)
    overhead = np.full((h, w, 3), 200, np.uint8)
    if batched:
        return {"sensor_data": {"3rd_view_camera": {"rgb": third[None]}}}
    return {"image": {"3rd_view_camera": {"rgb": third, "depth": np.zeros((h, w, 1))},
                      "overhead_camera": {"rgb": overhead}}}


def test_adapter_without_simulator_image_selection_per_robot():
    obs = _fake_obs()
    assert S.select_camera_image(obs, "widowx").mean() == 30
    assert S.select_camera_image(obs, "google_robot").mean() == 200
    img = S.select_camera_image(_fake_obs(batched=True), "widowx", backend="maniskill3")
    assert img.shape == (48, 64, 3) and img.dtype == np.uint8 and img.mean() == 30
    small = S.resize_image(S.select_camera_image(obs, "widowx"), 16)
    assert small.shape == (16, 16, 3) and small.dtype == np.uint8 and small.mean() == 30
    assert S.resize_image(obs["image"]["overhead_camera"]["rgb"], (24, 32)).shape == (24, 32, 3)


def test_adapter_without_simulator_state_from_obs_sources():
    # allenzren fork: eef_pos in the base frame; WidowX rotation mapped to Bridge's top-down frame
    q_down = np.array([math.cos(math.pi / 4), 0, math.sin(math.pi / 4), 0])  # R = Ry(90) = BRIDGE_DEFAULT_ROT
    np.testing.assert_allclose(S.quat_to_matrix(q_down), S.BRIDGE_DEFAULT_ROT, atol=1e-12)
    obs = {"agent": {"eef_pos": np.r_[0.3, 0.1, 0.2, q_down, 0.7]}}
    state, src = S.state_from_obs(obs, "widowx")
    assert src == "eef_pos"
    np.testing.assert_allclose(state, [0.3, 0.1, 0.2, 0, 0, 0, 0, 0.7], atol=1e-6)
    # upstream: tcp_pose (world) in base_pose; gripper = last commanded opening
    obs = {"agent": {"base_pose": np.r_[1.0, 0.0, 0.0, 1, 0, 0, 0]},
           "extra": {"tcp_pose": np.r_[1.5, 0.2, 0.3, 1, 0, 0, 0]}}
    state, src = S.state_from_obs(obs, "google_robot", last_open=0.0)
    assert src == "tcp_pose"
    np.testing.assert_allclose(state, [0.5, 0.2, 0.3, 0, 0, 0, 0, 0.0], atol=1e-6)
    # nothing available: zeros and a flag
    pobs = S.policy_obs(_fake_obs(), "open the drawer", "google_robot", image_size=8)
    assert pobs["state_available"] is False and pobs["state_source"] == "none"
    assert pobs["state"].dtype == np.float32 and not pobs["state"].any()
    assert pobs["image"].shape == (8, 8, 3) and pobs["instruction"] == "open the drawer"


# ------------------------------------------------------------------------------------------- task table
def test_adapter_without_simulator_task_table_complete():
    assert set(S.WIDOWX_TASKS) == {"widowx_spoon_on_towel", "widowx_carrot_on_plate", "widowx_stack_cube",
                                   "widowx_put_eggplant_in_basket"}
    assert set(S.GOOGLE_TASKS) == {"google_robot_pick_coke_can", "google_robot_move_near",
                                   "google_robot_open_close_drawer"}
    env_ids = {t: S.TASKS[t]["env_id"] for t in S.WIDOWX_TASKS}
    assert env_ids == {"widowx_spoon_on_towel": "PutSpoonOnTableClothInScene-v0",
                       "widowx_carrot_on_plate": "PutCarrotOnPlateInScene-v0",
                       "widowx_stack_cube": "StackGreenCubeOnYellowCubeBakedTexInScene-v0",
                       "widowx_put_eggplant_in_basket": "PutEggplantInBasketScene-v0"}
    assert {S.TASKS[t]["ms3_env_id"] for t in S.WIDOWX_TASKS} == {
        "PutCarrotOnPlateInScene-v1", "PutSpoonOnTableClothInScene-v1",
        "StackGreenCubeOnYellowCubeBakedTexInScene-v1", "PutEggplantInBasketScene-v1"}
    max_steps = {t: S.TASKS[t]["max_steps"] for t in S.TASKS}
    assert max_steps == {"widowx_spoon_on_towel": 60, "widowx_carrot_on_plate": 60, "widowx_stack_cube": 60,
                         "widowx_put_eggplant_in_basket": 120, "google_robot_pick_coke_can": 80,
                         "google_robot_move_near": 80, "google_robot_open_close_drawer": 113}
    for t in S.WIDOWX_TASKS:  # SimplerEnv has no variant aggregation for the WidowX
        assert set(S.TASKS[t]["settings"]) == {"visual_matching"}
    for t in S.GOOGLE_TASKS:
        assert set(S.TASKS[t]["settings"]) == set(S.SETTINGS)
    assert S.ROBOTS["widowx"]["control_freq"] == 5 and S.ROBOTS["google_robot"]["control_freq"] == 3


def _per_variant(task, setting):
    counts = {}
    for spec in S.episode_plan(S.SimplerConfig(tasks=(task,), settings=(setting,))):
        counts[spec.variant] = counts.get(spec.variant, 0) + 1
    return counts


def test_adapter_without_simulator_episode_counts_as_in_simplerenv_scripts():
    for task in S.TASKS:
        for setting, s in S.TASKS[task]["settings"].items():
            plan = S.episode_plan(S.SimplerConfig(tasks=(task,), settings=(setting,)))
            assert len(plan) == s["episodes"], (task, setting)
            assert len({spec.key for spec in plan}) == len(plan)  # record keys are unique
    for task in S.WIDOWX_TASKS:  # 24 per task (--obj-episode-range 0 24)
        assert _per_variant(task, "visual_matching") == {"base": 24}
    # coke can: 5 x 5 grid per orientation = 75 per variant; 4 URDFs (visual matching), 9 variants (aggregation)
    for setting, n_variants in (("visual_matching", 4), ("variant_aggregation", 9)):
        counts = _per_variant("google_robot_pick_coke_can", setting)
        assert set(counts.values()) == {25} and len(counts) == n_variants * 3
    # move near: 60 per variant; 4 URDFs / 8 variants (camera variants excluded, as the metric script does)
    assert set(_per_variant("google_robot_move_near", "visual_matching").values()) == {60}
    assert len(_per_variant("google_robot_move_near", "variant_aggregation")) == 8
    # drawers: 9 robot poses x 3 drawers = 27 per open / close per variant
    for setting, n_variants in (("visual_matching", 4), ("variant_aggregation", 7)):
        counts = _per_variant("google_robot_open_close_drawer", setting)
        assert set(counts.values()) == {9} and len(counts) == n_variants * 6
        opens = sum(v for k, v in counts.items() if "drawer=open" in k)
        assert opens == 27 * n_variants
    move_near = S.episode_plan(S.SimplerConfig(tasks=("google_robot_move_near",)))
    assert {(s.setting, s.env_id) for s in move_near} == {("visual_matching", "MoveNearGoogleBakedTexInScene-v0"),
                                                          ("variant_aggregation", "MoveNearGoogleInScene-v0")}
    coke_va = S.episode_plan(S.SimplerConfig(tasks=("google_robot_pick_coke_can",), settings=("variant_aggregation",)))
    assert sum(s.env_id == "GraspSingleOpenedCokeCanDistractorInScene-v0" for s in coke_va) == 2 * 75
    assert all(s.build_kwargs["rgb_overlay_path"] is None for s in coke_va)  # no overlay in variant aggregation
    vm = S.episode_plan(S.SimplerConfig(tasks=("google_robot_open_close_drawer",), settings=("visual_matching",)))
    assert all(s.build_kwargs["shader_dir"] == "rt" for s in vm)
    assert len({s.build_kwargs["rgb_overlay_path"] for s in vm}) == 9  # one real overlay per robot pose
    ms3 = S.episode_plan(S.SimplerConfig(backend="maniskill3"))
    assert len(ms3) == 4 * 24 and {s.env_id for s in ms3} == {S.TASKS[t]["ms3_env_id"] for t in S.WIDOWX_TASKS}
    smoke = S.episode_plan(S.SimplerConfig(tasks=("google_robot_move_near",), episodes=2))
    assert len(smoke) == 2 * 12


# ------------------------------------------------------------------------------------------- missing package
def test_adapter_without_simulator_import_does_not_need_simulators():
    code = ("import sys, refinevla.simpler; "
            "assert not {'simpler_env', 'mani_skill', 'mani_skill2_real2sim', 'torch'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_adapter_without_simulator_missing_package_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "simpler_env", None)  # import simpler_env -> ImportError
    monkeypatch.setitem(sys.modules, "mani_skill", None)
    with pytest.raises(S.SimulatorNotInstalledError) as info:
        S.run_simpler(ZeroPolicy(), S.SimplerConfig(tasks=("widowx_carrot_on_plate",)), tmp_path)
    msg = str(info.value)
    assert isinstance(info.value, ImportError)
    for needle in ("git clone https://github.com/simpler-env/SimplerEnv --recurse-submodules",
                   "pip install -e ManiSkill2_real2sim", "pip install -e .", "numpy==1.24.4", "GPU", "Vulkan"):
        assert needle in msg
    assert not (tmp_path / "episodes.jsonl").exists()
    with pytest.raises(S.SimulatorNotInstalledError, match="mani-skill"):
        S.run_simpler(ZeroPolicy(), S.SimplerConfig(backend="maniskill3"), tmp_path)


# --------------------------------------------------------------------------- the loop, with stand-in envs
class StandInSimplerEnv:
    """A STAND-IN for a SimplerEnv (ManiSkill2) env: the simulator cannot run here. It follows the gym API
    the evaluator uses (reset(options) -> obs, info; step -> obs, reward, done, truncated, info) and marks
    success once the commanded gripper has closed for 3 steps; truncates at max_episode_steps."""

    robot_uid = "widowx"

    def __init__(self, spec, fail_step=None):
        self.spec, self.fail_step, self.closed = spec, fail_step, 0
        self.max_steps = spec.build_kwargs.get("max_episode_steps", spec.max_steps)
        self.actions, self.closed_calls = [], 0

    def _obs(self):
        return {"image": {"3rd_view_camera": {"rgb": np.zeros((32, 40, 3), np.uint8)},
                          "overhead_camera": {"rgb": np.ones((32, 40, 3), np.uint8)}},
                "agent": {"base_pose": np.r_[0.0, 0, 0, 1, 0, 0, 0]},
                "extra": {"tcp_pose": np.r_[0.1, 0.0, 0.2, 1, 0, 0, 0]}}

    def reset(self, seed=None, options=None):
        self.t, self.closed, self.options = 0, 0, options
        return self._obs(), {}

    def get_language_instruction(self):
        return "put carrot on plate"

    def step(self, action):
        self.t += 1
        if self.fail_step is not None and self.t == self.fail_step:
            raise RuntimeError("simulated physics blow-up")
        self.actions.append(np.asarray(action))
        self.closed = self.closed + 1 if action[6] < 0 else 0
        done = self.closed >= 3
        info = {"success": done, "episode_stats": {"is_src_obj_grasped": self.closed > 0}}
        return self._obs(), 0.0, done, self.t >= self.max_steps, info

    def close(self):
        self.closed_calls += 1


class ClosingPolicy:
    """Closes the gripper in its 1st, 3rd, ... episode and keeps it open otherwise; checks its obs."""

    image_size = 16

    def __init__(self):
        self.seen, self.episodes = [], 0

    def reset(self, instruction):
        self.episodes += 1
        self.close = self.episodes % 2 == 1

    def act(self, obs):
        assert obs["image"].shape == (16, 16, 3) and obs["state"].shape == (8,)
        assert obs["state_source"] == "tcp_pose" and obs["instruction"] == "put carrot on plate"
        self.seen.append(obs)
        a = np.zeros(7, np.float32)
        a[6] = 0.0 if self.close else 1.0
        return a


def test_adapter_without_simulator_episode_loop_records_resume_and_errors(tmp_path):
    built = []
    cfg = S.SimplerConfig(tasks=("widowx_carrot_on_plate",), episodes=4)
    seeds = [s.seed for s in S.episode_plan(cfg)]
    assert seeds == [0, 8, 15, 23]  # 4 of the 24 episode ids, evenly spaced

    def make_env(spec):
        env = StandInSimplerEnv(spec, fail_step=2 if spec.seed == seeds[1] else None)
        built.append(env)
        return env

    policy = ClosingPolicy()
    records = S.run_simpler(policy, cfg, tmp_path, make_env=make_env)

    lines = (tmp_path / "episodes.jsonl").read_text().splitlines()
    assert len(lines) == 4 and len(records) == 4 and len(built) == 4
    rec = [json.loads(line) for line in lines]
    assert [r["seed"] for r in rec] == seeds
    for r in rec:
        assert set(r) == set(S.RECORD_KEYS) == {"task", "seed", "success", "steps", "wall_s", "error", "policy_s",
                                                "setting", "variant", "partial_success"}
        assert r["task"] == "widowx_carrot_on_plate" and r["setting"] == "visual_matching"
        assert r["variant"] == "base" and r["wall_s"] >= 0
    # episode 0 closes -> success at the last step (runs to max steps, like SimplerEnv's evaluator)
    assert rec[0]["success"] is True and rec[0]["steps"] == 60 and rec[0]["partial_success"] is True
    assert rec[0]["error"] is None
    # the second episode raised inside step 2: recorded, and the run went on
    assert rec[1]["error"] == "RuntimeError: simulated physics blow-up" and rec[1]["success"] is False
    assert rec[2]["error"] is None and rec[2]["success"] is True
    assert rec[3]["success"] is False and rec[3]["partial_success"] is False and rec[3]["steps"] == 60
    assert all(env.closed_calls == 1 for env in built)  # a fresh env per episode, closed once
    # env got the schema -> SimplerEnv conversion: 7-D, WidowX gripper in {-1, +1}
    assert {float(a[6]) for a in built[0].actions} == {-1.0}
    assert {float(a[6]) for a in built[3].actions} == {1.0}
    # reset options carried the scripts' robot pose and the object episode id
    assert [env.options["obj_init_options"] for env in built] == [{"episode_id": i} for i in seeds]
    np.testing.assert_allclose(built[0].options["robot_init_options"]["init_xy"], [0.147, 0.028])

    # resume: nothing left to do, nothing rebuilt, file unchanged
    again = S.run_simpler(policy, cfg, tmp_path, make_env=make_env)
    assert len(built) == 4 and (tmp_path / "episodes.jsonl").read_text().splitlines() == lines
    assert [r["seed"] for r in again] == [r["seed"] for r in rec]
    # retry_errors re-runs only the errored episode
    S.run_simpler(policy, S.SimplerConfig(tasks=("widowx_carrot_on_plate",), episodes=4, retry_errors=True),
                  tmp_path, make_env=lambda spec: built.append(StandInSimplerEnv(spec)) or built[-1])
    assert len(built) == 5 and built[-1].spec.seed == rec[1]["seed"]
    assert (tmp_path / "summary.csv").exists()


def test_adapter_without_simulator_torn_last_line_is_ignored(tmp_path):
    path = tmp_path / "episodes.jsonl"
    path.write_text(json.dumps({"task": "t", "seed": 0, "setting": "s", "variant": "v"}) + "\n{\"task\": ")
    assert len(S.load_records(path)) == 1


class StandInManiSkill3Env:
    """A STAND-IN for a ManiSkill3 Bridge env (num_envs=1): batched arrays, a list of instructions through
    .unwrapped, info["success"] / info["is_src_obj_grasped"], reset(options={"episode_id"})."""

    def __init__(self, spec):
        self.unwrapped = self
        self.spec = spec

    def get_language_instruction(self):
        return ["put the spoon on the towel"]

    def reset(self, seed=None, options=None):
        self.t, self.seed_used, self.options = 0, seed, options
        return {"sensor_data": {"3rd_view_camera": {"rgb": np.zeros((1, 24, 24, 3), np.uint8)}}}, {}

    def step(self, action):
        assert action.shape == (7,) and action.dtype == np.float32
        self.t += 1
        obs = {"sensor_data": {"3rd_view_camera": {"rgb": np.zeros((1, 24, 24, 3), np.uint8)}}}
        info = {"success": np.array([self.t >= 5]), "is_src_obj_grasped": np.array([True])}
        return obs, np.zeros(1), np.array([self.t >= 5]), np.array([self.t >= 7]), info

    def close(self):
        pass


def test_adapter_without_simulator_maniskill3_loop(tmp_path):
    envs = []

    def make_env(spec):
        envs.append(StandInManiSkill3Env(spec))
        return envs[-1]

    cfg = S.SimplerConfig(backend="maniskill3", tasks=("widowx_spoon_on_towel",), episodes=2, seed=100,
                          stop_on_success=True)
    records = S.run_simpler(ZeroPolicy(), cfg, tmp_path, make_env=make_env)
    assert [r["success"] for r in records] == [True, True] and [r["steps"] for r in records] == [5, 5]
    assert [r["partial_success"] for r in records] == [True, True]
    assert [e.seed_used for e in envs] == [100, 101] and envs[1].options == {"episode_id": 1}
    assert {r["variant"] for r in records} == {"maniskill3"}


# ------------------------------------------------------------------------------------------- results table
def test_adapter_without_simulator_wilson_interval():
    lo, hi = S.wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = S.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(3.8416 / 13.8416, abs=1e-4)
    assert S.wilson(0, 0) == (0.0, 1.0)


def test_adapter_without_simulator_results_table_shape():
    def recs(task, setting, k, n, partial=None):
        return [{"task": task, "setting": setting, "seed": i, "success": i < k, "error": None, "variant": "base",
                 "partial_success": partial} for i in range(n)]

    records = (recs("widowx_spoon_on_towel", "visual_matching", 6, 24, True)
               + recs("widowx_carrot_on_plate", "visual_matching", 12, 24, False)
               + recs("google_robot_move_near", "visual_matching", 30, 60)
               + recs("google_robot_move_near", "variant_aggregation", 20, 60)
               + recs("google_robot_pick_coke_can", "variant_aggregation", 10, 75))
    table = S.results_table(records)
    widowx = table[table.robot == "widowx"]
    assert list(widowx.task) == ["widowx_spoon_on_towel", "widowx_carrot_on_plate", "average"]
    avg = widowx[widowx.task == "average"].iloc[0]
    assert avg.success == pytest.approx((0.25 + 0.5) / 2) and avg.n == 48
    assert widowx.iloc[0].partial_success == 1.0 and widowx.iloc[1].partial_success == 0.0
    google = table[table.robot == "google_robot"]
    assert set(zip(google.setting, google.task)) == {
        ("visual_matching", "google_robot_move_near"), ("variant_aggregation", "google_robot_move_near"),
        ("variant_aggregation", "google_robot_pick_coke_can"), ("variant_aggregation", "average")}
    row = google[(google.setting == "visual_matching")].iloc[0]
    assert (row.ci_low, row.ci_high) == pytest.approx(S.wilson(30, 60))


def test_adapter_without_simulator_policy_factory_conventions(tmp_path):
    calls = []

    def per_robot(robot):  # picks e.g. Bridge vs Fractal statistics
        calls.append(robot)
        return ZeroPolicy()

    def no_args():  # the refinevla.evaluate convention
        calls.append(None)
        return ZeroPolicy()

    cfg = S.SimplerConfig(tasks=("widowx_stack_cube", "widowx_spoon_on_towel"), episodes=1)
    S.run_simpler(per_robot, cfg, tmp_path / "a", make_env=StandInSimplerEnv)
    S.run_simpler(no_args, cfg, tmp_path / "b", make_env=StandInSimplerEnv)
    assert calls == ["widowx", None]  # once per robot, not per episode


def test_adapter_without_simulator_make_task_meets_evaluate_contract():
    evaluate = pytest.importorskip("refinevla.evaluate")
    task = S.make_task("widowx_carrot_on_plate", image_size=16, make_env=StandInSimplerEnv)
    assert "widowx_carrot_on_plate" in S.TASKS and task.max_steps == 60
    policy = ClosingPolicy()
    record, _ = evaluate.run_episode(task, policy, seed=24 + 3, max_steps=task.max_steps)  # seed % 24 = 3
    assert record["error"] is None and record["success"] is True and record["steps"] == 3  # stops at success
    assert task.spec.seed == 3 and task.env.options["obj_init_options"] == {"episode_id": 3}
    task.close()


# ------------------------------------------------------------------------------- ManiSkill3 eggplant grid
def test_adapter_without_simulator_maniskill3_eggplant_ids_cover_all_8_positions():
    """The env places the eggplant at position (id % 64) // 8 and orientation id % 8 (ManiSkill's
    BaseBridgeEnv._initialize_episode); ids 0-23 would use positions 0-2 only."""
    task = "widowx_put_eggplant_in_basket"
    assert {S.ms3_grid_cell(task, i)[0] for i in range(24)} == {0, 1, 2}  # the old identity mapping
    plan = S.episode_plan(S.SimplerConfig(backend="maniskill3", tasks=(task,)))
    cells = [S.ms3_grid_cell(task, spec.reset_options["episode_id"]) for spec in plan]
    assert len(plan) == 24 and len(set(cells)) == 24
    assert {p for p, _ in cells} == set(range(8)) and {q for _, q in cells} == {0, 1, 2}  # -45, 0, +45 degrees
    assert {p for p, _ in cells[:8]} == set(range(8))  # any first 8 episodes already span the 8 positions
    few = S.episode_plan(S.SimplerConfig(backend="maniskill3", tasks=(task,), episodes=4))
    assert len({S.ms3_grid_cell(task, s.reset_options["episode_id"])[0] for s in few}) == 4
    # the other three tasks: ids 0-23 already cover their whole grid, unchanged
    for other in ("widowx_spoon_on_towel", "widowx_carrot_on_plate", "widowx_stack_cube"):
        specs = S.episode_plan(S.SimplerConfig(backend="maniskill3", tasks=(other,)))
        ids = [s.reset_options["episode_id"] for s in specs]
        assert ids == list(range(24))
        n_pos, n_quat, _ = S.MS3_GRIDS[other]
        assert len({S.ms3_grid_cell(other, i) for i in ids}) == n_pos * n_quat == 24


# ------------------------------------------------------------------------------- state availability
class StateConditioned(ZeroPolicy):
    """A STAND-IN for a state-conditioned VLA (the real one needs a trained model): it declares uses_state."""

    uses_state = True


def test_adapter_without_simulator_backends_say_which_tasks_have_state():
    assert not S.has_state("google_robot_open_close_drawer", "simpler_env")
    assert S.has_state("google_robot_pick_coke_can", "simpler_env") and S.has_state("widowx_stack_cube", "simpler")
    assert not any(S.has_state(t, "maniskill3") for t in S.WIDOWX_TASKS)
    from refinevla import sim
    from refinevla.backends import uses_state

    assert sim.has_state("lift")
    assert uses_state(StateConditioned()) and not uses_state(ZeroPolicy())
    vla_like = types.SimpleNamespace(tok=types.SimpleNamespace(state_ids=[5, 6]))  # a VLA's prompt has state bins
    assert uses_state(vla_like) and uses_state(types.SimpleNamespace(vla=vla_like))  # the oracle wraps one


def test_adapter_without_simulator_state_conditioned_policy_is_refused_without_state(tmp_path):
    built = []
    cfg = S.SimplerConfig(backend="maniskill3", tasks=("widowx_spoon_on_towel",), episodes=2)
    with pytest.raises(S.StateUnavailableError, match="no end-effector state") as info:
        S.run_simpler(StateConditioned(), cfg, tmp_path, make_env=lambda spec: built.append(spec))
    assert "maniskill3" in str(info.value) and "\n" not in str(info.value)
    assert built == [] and (tmp_path / "episodes.jsonl").read_text() == ""  # refused before any episode
    # the same policy on a SimplerEnv task with state runs; a policy that ignores state runs anywhere
    S.run_simpler(StateConditioned(), S.SimplerConfig(tasks=("widowx_carrot_on_plate",), episodes=1),
                  tmp_path / "ok", make_env=StandInSimplerEnv)
    records = S.run_simpler(ZeroPolicy(), cfg, tmp_path / "zero", make_env=StandInManiSkill3Env)
    assert len(records) == 2 and all(r["error"] is None for r in records)


def test_adapter_without_simulator_run_config_reaches_every_setting(monkeypatch, tmp_path):
    """Every SimplerConfig field is set from the run's EvaluateConfig; evaluate() runs SimplerEnv's protocol for
    the simpler_env / maniskill3 backends (here it stops at the missing simulator, before writing a record)."""
    import dataclasses

    from refinevla import evaluate as ev
    from refinevla.config import EvaluateConfig

    changed = dict(simpler_settings=["visual_matching"], simpler_env_mode="prepackaged", simpler_sticky_repeat=10,
                   simpler_sticky_update="on_trigger", simpler_action_scale=0.5, simpler_stop_on_success=True,
                   simpler_reuse_env=True, simpler_seed=7, simpler_asset_dir="/data/simpler", ms3_sim_backend="gpu",
                   ms3_render_backend="gpu", retry_errors=True, image_size=224, episodes_per_task=3, videos=False)
    ecfg = EvaluateConfig(backend="simpler", tasks=["widowx_carrot_on_plate"], **changed)
    scfg = S.SimplerConfig.from_evaluate(ecfg)
    default = S.SimplerConfig()
    for f in dataclasses.fields(S.SimplerConfig):
        if f.name not in ("backend", "tasks", "videos"):
            assert getattr(scfg, f.name) != getattr(default, f.name), f.name  # every setting reached
    assert scfg.backend == "simpler_env" and scfg.tasks == ("widowx_carrot_on_plate",) and scfg.sticky_repeat == 10
    monkeypatch.setitem(sys.modules, "mani_skill", None)
    with pytest.raises(S.SimulatorNotInstalledError, match="mani-skill"):
        ev.evaluate(ZeroPolicy, EvaluateConfig(backend="maniskill3", tasks=["widowx_stack_cube"], progress=False),
                    tmp_path)
    assert not (tmp_path / "episodes.jsonl").exists() or not (tmp_path / "episodes.jsonl").read_text()
