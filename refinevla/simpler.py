"""SimplerEnv backend: paper-scale closed-loop evaluation on the SimplerEnv WidowX and Google Robot tasks.

    records = run_simpler(policy_factory, SimplerConfig(tasks=WIDOWX_TASKS), "data/run/evaluate/simpler")
    results_table(records)   # the paper's table shape, Wilson 95% intervals

The record format and the policy interface are those of the robosuite harness (``refinevla.evaluate``): one
JSON line per episode in ``episodes.jsonl`` (``task, seed, success, steps, wall_s, error, policy_s`` plus the
SimplerEnv extras ``setting``, ``variant``, ``partial_success``), appended as each episode ends; a re-run
skips recorded episodes, and an exception inside one episode is recorded and the run goes on. ``make_task``
also serves ``refinevla.evaluate``'s backend contract (``backend="simpler"``), with that harness's
stop-at-first-success loop.

Two simulators sit behind one loop (``SimplerConfig.backend``):

- ``"simpler_env"``: SimplerEnv (simpler-env/SimplerEnv @ 4ab7178, ManiSkill2_real2sim @ ef7a4d4), all paper
  tasks, both settings. Needs an NVIDIA GPU with Vulkan; not on PyPI (see ``SIMPLER_ENV_INSTALL``).
  ``env_mode="scripts"`` (default) rebuilds the episode grid of SimplerEnv's own evaluation scripts
  (``scripts/*.sh`` -> ``simpler_env/main_inference.py`` -> ``evaluation/maniskill2_evaluator.py``) with
  ``simpler_env.utils.env.env_builder.build_maniskill2_env``; ``env_mode="prepackaged"`` uses
  ``simpler_env.make(task_name)`` (visual matching only; the env samples robot pose / URDF per seed).
- ``"maniskill3"``: ManiSkill3's ports of the four WidowX tasks (``*-v1``, obs mode ``rgb+segmentation``,
  5 Hz), which can run on a CPU with a software Vulkan (see ``MANISKILL3_INSTALL``).

Neither simulator is imported at ``import refinevla.simpler``; a missing one raises
``SimulatorNotInstalledError`` (an ``ImportError``) with install steps at the point of use.

Conventions (schema action -> simulator action, see ``ActionConverter``): our action is
``[dx, dy, dz, droll, dpitch, dyaw, gripper]`` with gripper in [0, 1], 1 = open, already unnormalised by the
model's tokenizer. SimplerEnv takes ``[dxyz (m), axis-angle (rad), gripper]``: rpy -> axis-angle as
``transforms3d.euler.euler2axangle`` (static xyz axes); WidowX gripper ``2 * (open > 0.5) - 1`` (+1 open,
absolute); Google Robot gripper is relative (+1 close, -1 open) and "sticky" (repeated N steps), as the
Octo / OpenVLA / SpatialVLA adapters do.
"""
from __future__ import annotations

import inspect
import itertools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .schema import ACTION_DIM, STATE_DIM

# --------------------------------------------------------------------------------------------------------
# Missing simulator: a clear error at the point of use
# --------------------------------------------------------------------------------------------------------

SIMPLER_ENV_INSTALL = """\
SimplerEnv is not installed here: {reason}
It is not on PyPI and needs an NVIDIA GPU with a working Vulkan driver (SAPIEN 2.2). On a GPU machine
(Python 3.10 or 3.11):

    git clone https://github.com/simpler-env/SimplerEnv --recurse-submodules
    cd SimplerEnv
    pip install numpy==1.24.4              # numpy<2, otherwise the pinocchio IK fails
    pip install -e ManiSkill2_real2sim
    pip install -e .

Check the GPU's Vulkan first (`vulkaninfo | head`; 'ErrorInitializationFailed' means the NVIDIA Vulkan ICD
or libnvidia-gl is missing: https://github.com/simpler-env/SimplerEnv/issues/114). Without a GPU, the four
WidowX tasks run on a CPU through ManiSkill3 instead: SimplerConfig(backend="maniskill3").
See book/simplerenv.md."""

MANISKILL3_INSTALL = """\
ManiSkill3 is not installed here: {reason}
Install it into its own virtualenv, CPU torch first (an unpinned install pulls a CUDA torch):

    pip install torch --index-url https://download.pytorch.org/whl/cpu
    pip install "mani-skill>=3.0.1"
    python -m mani_skill.utils.download_asset bridge_v2_real2sim -y
    python -m mani_skill.utils.download_asset widowx250s -y

Rendering needs Vulkan: a GPU driver, or on a CPU Mesa's lavapipe from Mesa 25 on (Debian 12:
`apt-get install -t bookworm-backports mesa-vulkan-drivers libvulkan1`). The assets come from a model hub,
so the machine needs internet once. See book/simplerenv.md."""


class SimulatorNotInstalledError(ImportError):
    """The simulator package a backend needs cannot be imported; the message says how to install it."""


def require_simpler_env():
    """Import and return ``simpler_env``, or raise SimulatorNotInstalledError with the install steps."""
    try:
        import simpler_env  # noqa: F401  (imports mani_skill2_real2sim.envs, which registers the envs)
        from simpler_env.utils.env import env_builder  # noqa: F401
    except Exception as exc:  # ImportError, or a SAPIEN/Vulkan failure while importing
        raise SimulatorNotInstalledError(SIMPLER_ENV_INSTALL.format(reason=f"{type(exc).__name__}: {exc}")) from exc
    return simpler_env


def require_maniskill3():
    """Import ``mani_skill.envs`` (registers the Bridge digital twins) or raise SimulatorNotInstalledError."""
    try:
        import mani_skill.envs  # noqa: F401
    except Exception as exc:
        raise SimulatorNotInstalledError(MANISKILL3_INSTALL.format(reason=f"{type(exc).__name__}: {exc}")) from exc
    import mani_skill
    return mani_skill


# --------------------------------------------------------------------------------------------------------
# Robots and tasks (one table)
# --------------------------------------------------------------------------------------------------------

#: Per robot: controller (simpler_env/utils/env/env_builder.py get_robot_control_mode), rates (README: Google
#: 3 Hz, Bridge 5 Hz; scripts --sim-freq 513 / 500), the policy camera
#: (simpler_env/utils/env/observation_utils.py) and the gripper convention of the controller.
ROBOTS: dict[str, dict[str, Any]] = {
    "widowx": {
        "control_mode": "arm_pd_ee_target_delta_pose_align2_gripper_pd_joint_pos",
        "control_freq": 5,
        "sim_freq": 500,
        "camera": "3rd_view_camera",
        "gripper": "absolute: +1 open, -1 close",
    },
    "google_robot": {
        "control_mode": "arm_pd_ee_delta_pose_align_interpolate_by_planner"
                        "_gripper_pd_joint_target_delta_pos_interpolate_by_planner",
        "control_freq": 3,
        "sim_freq": 513,
        "camera": "overhead_camera",
        "gripper": "relative: +1 close, -1 open (sticky)",
    },
}

SETTINGS = ("visual_matching", "variant_aggregation")

# Visual-matching robot/scene recolors averaged over (scripts/rt1_*_visual_matching.sh urdf_version_arr).
_URDF_VM = {
    "urdf=None": {"urdf_version": None},
    "urdf=tabletop_1": {"urdf_version": "recolor_tabletop_visual_matching_1"},
    "urdf=tabletop_2": {"urdf_version": "recolor_tabletop_visual_matching_2"},
    "urdf=cabinet_1": {"urdf_version": "recolor_cabinet_visual_matching_1"},
}
# Coke-can orientations (scripts/rt1_pick_coke_can_*.sh coke_can_options_arr; names as in
# tools/calc_metrics_evaluation_videos.py coke_can_orientation_map_dict).
_COKE_CAN = {
    "can=horizontal": {"lr_switch": True},
    "can=vertical": {"laid_vertically": True},
    "can=standing": {"upright": True},
}
# The six drawer envs (scripts/rt1_drawer_*.sh env_names); "open/close drawer" averages all six.
_DRAWERS = {
    f"drawer={verb}_{level}": {"env_id": f"{verb.capitalize()}{level.capitalize()}DrawerCustomInScene-v0"}
    for verb in ("open", "close") for level in ("top", "middle", "bottom")
}
# Visual-matching drawer robot poses, each with its own real overlay (scripts/rt1_drawer_visual_matching.sh
# A0..C2): (x, y, yaw, overlay image).
_DRAWER_VM_POSES = [
    (0.644, -0.179, -0.03, "open_drawer_a0.png"), (0.765, -0.182, -0.02, "open_drawer_a1.png"),
    (0.889, -0.203, -0.06, "open_drawer_a2.png"), (0.652, 0.009, 0.0, "open_drawer_b0.png"),
    (0.752, 0.009, 0.0, "open_drawer_b1.png"), (0.851, 0.035, 0.0, "open_drawer_b2.png"),
    (0.665, 0.224, 0.0, "open_drawer_c0.png"), (0.765, 0.222, -0.025, "open_drawer_c1.png"),
    (0.865, 0.222, -0.025, "open_drawer_c2.png"),
]


def _grid(lo: float, hi: float, n: int) -> list[float]:
    """The scripts' ``[min, max, num]`` ranges (evaluation/argparse.py parse_range_tuple: np.linspace)."""
    return [float(v) for v in np.linspace(lo, hi, int(n))]


def _product(*factors: dict[str, dict]) -> dict[str, dict]:
    """Cross named kwargs dicts: {"a": {..}} x {"b": {..}} -> {"a|b": {..merged..}}."""
    out = {}
    for combo in itertools.product(*(f.items() for f in factors)):
        name = "|".join(k for k, _ in combo)
        merged: dict = {}
        for _, kw in combo:
            merged.update(kw)
        out[name] = merged
    return out


_BRIDGE_TABLE = {  # scripts/rt1x_bridge.sh, scripts/octo_bridge.sh (first block)
    "scene_name": "bridge_table_1_v1", "robot_model": "widowx", "overlay": "bridge_real_eval_1.png",
    "robot_poses": [(0.147, 0.028, 0.0, None)], "objects": ("episode", 24),
    "variants": {"base": {}}, "episodes": 24,
}

#: task -> env, robot, max steps, settings. A setting lists the robot poses (x, y, yaw, overlay), the object
#: placements (``("episode", n)`` = obj_init_options.episode_id in range(n); ``("xy", xs, ys)`` = a grid of
#: obj_init_options.init_xy), and its variants as kwargs dicts (``env_id`` / ``scene_name`` override the
#: setting's, which override the task's; every other key is an additional env-build kwarg, as the scripts'
#: ``--additional-env-build-kwargs``).
#: ``episodes`` is the setting's total (variants x poses x placements), checked by the tests.
TASKS: dict[str, dict[str, Any]] = {
    "widowx_spoon_on_towel": {
        "label": "Put spoon on towel", "robot": "widowx", "max_steps": 60,
        "env_id": "PutSpoonOnTableClothInScene-v0", "ms3_env_id": "PutSpoonOnTableClothInScene-v1",
        "simpler_names": ("widowx_spoon_on_towel",),
        "settings": {"visual_matching": dict(_BRIDGE_TABLE)},
    },
    "widowx_carrot_on_plate": {
        "label": "Put carrot on plate", "robot": "widowx", "max_steps": 60,
        "env_id": "PutCarrotOnPlateInScene-v0", "ms3_env_id": "PutCarrotOnPlateInScene-v1",
        "simpler_names": ("widowx_carrot_on_plate",),
        "settings": {"visual_matching": dict(_BRIDGE_TABLE)},
    },
    "widowx_stack_cube": {
        "label": "Stack green block on yellow block", "robot": "widowx", "max_steps": 60,
        "env_id": "StackGreenCubeOnYellowCubeBakedTexInScene-v0",
        "ms3_env_id": "StackGreenCubeOnYellowCubeBakedTexInScene-v1",
        "simpler_names": ("widowx_stack_cube",),
        "settings": {"visual_matching": dict(_BRIDGE_TABLE)},
    },
    "widowx_put_eggplant_in_basket": {  # scripts/rt1x_bridge.sh (sink block)
        "label": "Put eggplant in basket", "robot": "widowx", "max_steps": 120,
        "env_id": "PutEggplantInBasketScene-v0", "ms3_env_id": "PutEggplantInBasketScene-v1",
        "simpler_names": ("widowx_put_eggplant_in_basket",),
        "settings": {"visual_matching": {
            "scene_name": "bridge_table_1_v2", "robot_model": "widowx_sink_camera_setup",
            "overlay": "bridge_sink.png", "robot_poses": [(0.127, 0.06, 0.0, None)], "objects": ("episode", 24),
            "variants": {"base": {}}, "episodes": 24,
        }},
    },
    "google_robot_pick_coke_can": {
        "label": "Pick coke can", "robot": "google_robot", "max_steps": 80,
        "env_id": "GraspSingleOpenedCokeCanInScene-v0",
        "simpler_names": ("google_robot_pick_coke_can",),
        "settings": {
            "visual_matching": {  # scripts/rt1_pick_coke_can_visual_matching.sh
                "scene_name": "google_pick_coke_can_1_v4", "robot_model": "google_robot_static",
                "overlay": "google_coke_can_real_eval_1.png", "robot_poses": [(0.35, 0.20, 0.0, None)],
                "objects": ("xy", _grid(-0.35, -0.12, 5), _grid(-0.02, 0.42, 5)),
                "variants": _product(_URDF_VM, _COKE_CAN), "episodes": 4 * 3 * 25,
            },
            "variant_aggregation": {  # scripts/rt1_pick_coke_can_variant_agg.sh; the two camera variants are
                # left out, as in tools/calc_metrics_evaluation_videos.py (camera_variants commented out)
                "scene_name": "google_pick_coke_can_1_v4", "robot_model": "google_robot_static", "overlay": None,
                "robot_poses": [(0.35, 0.20, 0.0, None)],
                "objects": ("xy", _grid(-0.35, -0.12, 5), _grid(-0.02, 0.42, 5)),
                "variants": _product({
                    "base": {},
                    "table=cabinet1": {"scene_name": "Baked_sc1_staging_objaverse_cabinet1_h870"},
                    "table=cabinet2": {"scene_name": "Baked_sc1_staging_objaverse_cabinet2_h870"},
                    "distractors": {"env_id": "GraspSingleOpenedCokeCanDistractorInScene-v0"},
                    "distractors=more": {"env_id": "GraspSingleOpenedCokeCanDistractorInScene-v0",
                                         "distractor_config": "more"},
                    "background=alt1": {"scene_name": "google_pick_coke_can_1_v4_alt_background"},
                    "background=alt2": {"scene_name": "google_pick_coke_can_1_v4_alt_background_2"},
                    "light=darker": {"slightly_darker_lighting": True},
                    "light=brighter": {"slightly_brighter_lighting": True},
                }, _COKE_CAN),
                "episodes": 9 * 3 * 25,
            },
        },
    },
    "google_robot_move_near": {
        "label": "Move near", "robot": "google_robot", "max_steps": 80,
        "env_id": "MoveNearGoogleBakedTexInScene-v0",  # the paper scripts use v0 (simpler_env.make: v1)
        "simpler_names": ("google_robot_move_near_v0",),
        "settings": {
            "visual_matching": {  # scripts/rt1_move_near_visual_matching.sh
                "scene_name": "google_pick_coke_can_1_v4", "robot_model": "google_robot_static",
                "overlay": "google_move_near_real_eval_1.png", "robot_poses": [(0.35, 0.21, -0.09, None)],
                "objects": ("episode", 60), "variants": dict(_URDF_VM), "episodes": 4 * 60,
            },
            "variant_aggregation": {  # scripts/rt1_move_near_variant_agg.sh (camera variants left out, as above)
                "env_id": "MoveNearGoogleInScene-v0", "scene_name": "google_pick_coke_can_1_v4",
                "robot_model": "google_robot_static", "overlay": None,
                "robot_poses": [(0.35, 0.21, -0.09, None)], "objects": ("episode", 60),
                "variants": {
                    "base": {},
                    "no_distractor": {"no_distractor": True},
                    "background=alt1": {"scene_name": "google_pick_coke_can_1_v4_alt_background"},
                    "background=alt2": {"scene_name": "google_pick_coke_can_1_v4_alt_background_2"},
                    "light=darker": {"slightly_darker_lighting": True},
                    "light=brighter": {"slightly_brighter_lighting": True},
                    "table=cabinet1": {"scene_name": "Baked_sc1_staging_objaverse_cabinet1_h870"},
                    "table=cabinet2": {"scene_name": "Baked_sc1_staging_objaverse_cabinet2_h870"},
                },
                "episodes": 8 * 60,
            },
        },
    },
    "google_robot_open_close_drawer": {
        "label": "Open/close drawer", "robot": "google_robot", "max_steps": 113,
        "env_id": "OpenTopDrawerCustomInScene-v0",  # every variant names its own drawer env
        "simpler_names": ("google_robot_open_drawer", "google_robot_close_drawer"),
        "settings": {
            "visual_matching": {  # scripts/rt1_drawer_visual_matching.sh (--enable-raytracing -> shader_dir=rt)
                "scene_name": "dummy_drawer", "robot_model": "google_robot_static", "overlay": None,
                "robot_poses": _DRAWER_VM_POSES, "objects": ("xy", [0.0], [0.0]),
                "variants": {name: {**kw, "shader_dir": "rt", "station_name": "mk_station_recolor",
                                    "light_mode": "simple", "disable_bad_material": True}
                             for name, kw in _product(_URDF_VM, _DRAWERS).items()},
                "episodes": 4 * 6 * 9,
            },
            "variant_aggregation": {  # scripts/rt1_drawer_variant_agg.sh
                "scene_name": "frl_apartment_stage_simple", "robot_model": "google_robot_static", "overlay": None,
                "robot_poses": [(x, y, 0.0, None) for x in _grid(0.65, 0.85, 3) for y in _grid(-0.2, 0.2, 3)],
                "objects": ("xy", [0.0], [0.0]),
                "variants": _product({
                    "base": {"shader_dir": "rt"},
                    "background=bedroom": {"shader_dir": "rt", "scene_name": "modern_bedroom_no_roof"},
                    "background=office": {"shader_dir": "rt", "scene_name": "modern_office_no_roof"},
                    "light=brighter": {"shader_dir": "rt", "light_mode": "brighter"},
                    "light=darker": {"shader_dir": "rt", "light_mode": "darker"},
                    "cabinet=mk_station2": {"shader_dir": "rt", "station_name": "mk_station2"},
                    "cabinet=mk_station3": {"shader_dir": "rt", "station_name": "mk_station3"},
                }, _DRAWERS),
                "episodes": 7 * 6 * 9,
            },
        },
    },
}
WIDOWX_TASKS = tuple(t for t, spec in TASKS.items() if spec["robot"] == "widowx")
GOOGLE_TASKS = tuple(t for t, spec in TASKS.items() if spec["robot"] == "google_robot")


# --------------------------------------------------------------------------------------------------------
# Rotations (numpy only; conventions of transforms3d's default static "sxyz" axes)
# --------------------------------------------------------------------------------------------------------

def _axis_quat(axis: int, angle: float) -> np.ndarray:
    q = np.zeros(4)
    q[0] = math.cos(angle / 2)
    q[1 + axis] = math.sin(angle / 2)
    return q


def quat_multiply(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    """Hamilton product of two wxyz quaternions (the rotation b, then a)."""
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b
    return np.array([
        w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
        w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
        w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
        w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
    ])


def euler_to_quat(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """wxyz quaternion of R = Rz(yaw) Ry(pitch) Rx(roll) (transforms3d euler2quat, axes "sxyz")."""
    return quat_multiply(_axis_quat(2, yaw), quat_multiply(_axis_quat(1, pitch), _axis_quat(0, roll)))


def euler_to_axis_angle(rpy: Sequence[float]) -> np.ndarray:
    """roll, pitch, yaw (rad, static xyz) -> axis * angle (3,), angle in [0, pi].

    Same rotation as ``transforms3d.euler.euler2axangle`` (which SimplerEnv's adapters call); for the
    small deltas a policy emits the two vectors are identical (transforms3d does not fold angles above pi,
    which only differs for rotations larger than pi, and then describes the same rotation).
    """
    q = euler_to_quat(float(rpy[0]), float(rpy[1]), float(rpy[2]))
    if q[0] < 0:
        q = -q
    v = q[1:]
    s = float(np.linalg.norm(v))
    if s < 1e-12:
        return 2.0 * v  # first order; exactly zero for the identity
    angle = 2.0 * math.atan2(s, q[0])
    return v / s * angle


def quat_to_matrix(q: Sequence[float]) -> np.ndarray:
    """wxyz quaternion (need not be unit) -> 3x3 rotation matrix."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def matrix_to_euler(m: np.ndarray) -> np.ndarray:
    """3x3 rotation -> (roll, pitch, yaw) with R = Rz(yaw) Ry(pitch) Rx(roll) (transforms3d mat2euler)."""
    m = np.asarray(m, dtype=np.float64)
    cy = math.hypot(m[0, 0], m[1, 0])
    if cy > 1e-9:
        return np.array([math.atan2(m[2, 1], m[2, 2]), math.atan2(-m[2, 0], cy), math.atan2(m[1, 0], m[0, 0])])
    return np.array([math.atan2(-m[1, 2], m[1, 1]), math.atan2(-m[2, 0], cy), 0.0])  # gimbal lock


def robot_init_quat(yaw: float) -> np.ndarray:
    """The scripts' robot start orientation: ``Pose(q=euler2quat(0, 0, yaw)) * Pose(q=[0, 0, 0, 1])``
    (evaluation/argparse.py with ``--robot-init-rot-quat-center 0 0 0 1``), wxyz."""
    return quat_multiply(euler_to_quat(0.0, 0.0, yaw), [0.0, 0.0, 0.0, 1.0])


# --------------------------------------------------------------------------------------------------------
# Actions: schema action -> SimplerEnv 7-D action
# --------------------------------------------------------------------------------------------------------

def widowx_gripper(open_amount: float) -> float:
    """Schema gripper (1 = open) -> WidowX absolute gripper target: +1 open, -1 close (binarised at 0.5)."""
    return 2.0 * float(float(open_amount) > 0.5) - 1.0


class StickyGripper:
    """Google Robot gripper: relative command ``previous_open - current_open`` (+1 close, -1 open); once
    its magnitude exceeds 0.5 the command is held for ``num_repeat`` steps (the trigger step included).

    ``update="every_step"`` is the Octo / OpenVLA adapters' rule (simpler_env/policies/octo/octo_model.py,
    SimplerEnv-OpenVLA policies/openvla/openvla_model.py: repeat 15); ``update="on_trigger"`` is the
    SpatialVLA adapter's ("fix a bug in the SIMPLER code": the previous value only moves when a command
    triggers; it uses repeat 10).
    """

    def __init__(self, num_repeat: int = 15, update: str = "every_step"):
        if update not in ("every_step", "on_trigger"):
            raise ValueError(f"update must be 'every_step' or 'on_trigger', got {update!r}")
        self.num_repeat = int(num_repeat)
        self.update = update
        self.reset()

    def reset(self) -> None:
        self.previous: float | None = None
        self.active = False
        self.count = 0
        self.held = 0.0

    def __call__(self, open_amount: float) -> float:
        current = float(open_amount)
        if self.previous is None:
            relative = 0.0
            self.previous = current
        else:
            relative = self.previous - current
            if self.update == "every_step":
                self.previous = current
        if abs(relative) > 0.5 and not self.active:
            self.active = True
            self.held = relative
            if self.update == "on_trigger":
                self.previous = current
        if self.active:
            self.count += 1
            relative = self.held
        if self.count == self.num_repeat:
            self.active, self.count, self.held = False, 0, 0.0
        return float(relative)


class ActionConverter:
    """Per-episode state (the sticky gripper) + the conversion; ``reset()`` at each episode start."""

    def __init__(self, robot: str, sticky_repeat: int = 15, sticky_update: str = "every_step",
                 action_scale: float = 1.0):
        if robot not in ROBOTS:
            raise ValueError(f"unknown robot {robot!r}; expected one of {sorted(ROBOTS)}")
        self.robot = robot
        self.action_scale = float(action_scale)
        self.sticky = StickyGripper(sticky_repeat, sticky_update) if robot == "google_robot" else None
        self.last_open = 1.0  # the last commanded schema gripper (1 = open); the state proxy, see state_from_obs

    def reset(self) -> None:
        self.last_open = 1.0
        if self.sticky is not None:
            self.sticky.reset()

    def __call__(self, action) -> np.ndarray:
        a = np.asarray(_to_numpy(action), dtype=np.float64).reshape(-1)
        if a.shape != (ACTION_DIM,):
            raise ValueError(f"policy action must have {ACTION_DIM} values, got shape {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"policy action is not finite: {a.tolist()}")
        self.last_open = float(np.clip(a[6], 0.0, 1.0))
        grip = self.sticky(a[6]) if self.sticky is not None else widowx_gripper(a[6])
        out = np.empty(7, dtype=np.float64)
        out[:3] = a[:3] * self.action_scale  # SimplerEnv's --action-scale (1.0 in every script)
        out[3:6] = euler_to_axis_angle(a[3:6]) * self.action_scale
        out[6] = grip
        return out


# --------------------------------------------------------------------------------------------------------
# Observations: simulator obs dict -> the Policy's obs dict
# --------------------------------------------------------------------------------------------------------

def _to_numpy(x):
    """torch tensor (any device) or array-like -> numpy, without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach()
    if hasattr(x, "cpu"):
        x = x.cpu()
    if hasattr(x, "numpy"):
        return x.numpy()
    return np.asarray(x)


def _unbatch(x) -> np.ndarray:
    """ManiSkill3 returns every array with a leading num_envs axis; keep env 0."""
    a = _to_numpy(x)
    return a[0] if a.ndim >= 1 and a.shape[:1] == (1,) else a


def select_camera_image(obs: dict, robot: str, backend: str = "simpler_env", camera: str | None = None) -> np.ndarray:
    """The policy camera's RGB image, uint8 HxWx3.

    SimplerEnv: ``obs["image"][camera]["rgb"]`` with camera ``overhead_camera`` (Google Robot) or
    ``3rd_view_camera`` (WidowX), the rule of simpler_env.utils.env.observation_utils
    .get_image_from_maniskill2_obs_dict. ManiSkill3: ``obs["sensor_data"][camera]["rgb"]`` with a leading
    env axis (get_image_from_maniskill3_obs_dict on SimplerEnv's maniskill3 branch).
    """
    camera = camera or ROBOTS[robot]["camera"]
    root = obs["sensor_data"] if backend == "maniskill3" else obs["image"]
    img = _to_numpy(root[camera]["rgb"])
    if img.ndim == 4:
        img = img[0]
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img[..., :3])


def resize_image(img: np.ndarray, size) -> np.ndarray:
    """Resize to ``size`` (int = square, or (H, W)); None keeps the image. Area averaging (PIL BOX), as the
    OpenVLA / SpatialVLA adapters' ``cv2.resize(..., INTER_AREA)``."""
    if size is None:
        return img
    h, w = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    if img.shape[:2] == (h, w):
        return img
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BOX))


#: Bridge's top-down end-effector frame: SimplerEnv's WidowX EE rotation R maps to the Bridge dataset's
#: rpy as mat2euler(R @ BRIDGE_DEFAULT_ROT.T) (open-pi-zero's SimplerEnv adapter, used by the
#: SimplerEnv-OpenVLA fork's pi0 policies; from bridge_data_robot widowx_controller.py).
BRIDGE_DEFAULT_ROT = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])


def _pose_matrix(pose7) -> np.ndarray:
    """[x, y, z, qw, qx, qy, qz] (ManiSkill vectorize_pose) -> 4x4."""
    p = np.asarray(pose7, dtype=np.float64).reshape(-1)
    t = np.eye(4)
    t[:3, :3] = quat_to_matrix(p[3:7])
    t[:3, 3] = p[:3]
    return t


def state_from_obs(obs: dict, robot: str, last_open: float = 1.0) -> tuple[np.ndarray, str]:
    """Schema state float32[8] (EE xyz, roll, pitch, yaw, 0, gripper opening) and where it came from.

    In order of preference:
    - ``"eef_pos"``: ``obs["agent"]["eef_pos"]`` = [xyz, quat wxyz, opening] in the robot base frame, which
      the allenzren/ManiSkill2_real2sim fork adds (the SimplerEnv-OpenVLA fork uses it for state input);
    - ``"tcp_pose"``: ``obs["extra"]["tcp_pose"]`` expressed in ``obs["agent"]["base_pose"]`` (upstream
      ManiSkill2_real2sim gives both for the pick / move-near / put-on tasks, not for the drawers); the
      gripper entry is then the last *commanded* opening (the obs has no normalised gripper width);
      ``"tcp_pose_world"`` when there is no base pose (world frame, not the base frame);
    - ``"none"``: zeros (the drawer tasks upstream, ManiSkill3's Bridge twins). The policy obs carries
      ``state_available=False`` so a state-conditioned model can tell.
    For the WidowX the rotation is mapped to Bridge's top-down frame (``BRIDGE_DEFAULT_ROT``); the Google
    Robot's is kept as is.
    """
    agent, extra = obs.get("agent") or {}, obs.get("extra") or {}
    state = np.zeros(STATE_DIM, dtype=np.float32)
    if "eef_pos" in agent:
        e = _unbatch(agent["eef_pos"]).astype(np.float64).reshape(-1)
        pose, opening, source = _pose_matrix(e[:7]), float(e[7]), "eef_pos"
    elif "tcp_pose" in extra:
        pose, opening, source = _pose_matrix(_unbatch(extra["tcp_pose"])), float(last_open), "tcp_pose_world"
        if "base_pose" in agent:
            pose, source = np.linalg.inv(_pose_matrix(_unbatch(agent["base_pose"]))) @ pose, "tcp_pose"
    else:
        return state, "none"
    rot = pose[:3, :3] @ BRIDGE_DEFAULT_ROT.T if robot == "widowx" else pose[:3, :3]
    state[:3] = pose[:3, 3]
    state[3:6] = matrix_to_euler(rot)
    state[7] = opening
    return state, source


def policy_obs(obs: dict, instruction: str, robot: str, backend: str = "simpler_env", image_size=None,
               last_open: float = 1.0) -> dict:
    """The obs dict a ``refinevla.policy.Policy`` reads: image, state, instruction (+ state flags)."""
    state, source = state_from_obs(obs, robot, last_open)
    return {
        "image": resize_image(select_camera_image(obs, robot, backend), image_size),
        "state": state,
        "instruction": instruction,
        "state_available": source != "none",
        "state_source": source,
    }


# --------------------------------------------------------------------------------------------------------
# The episode plan
# --------------------------------------------------------------------------------------------------------

@dataclass
class EpisodeSpec:
    """One episode: what to build, how to reset it, and the record keys (task, setting, variant, seed)."""

    task: str
    setting: str
    variant: str
    seed: int  # the episode's index within (task, setting, variant)
    robot: str
    env_id: str
    max_steps: int
    build_kwargs: dict = field(default_factory=dict)
    reset_options: dict = field(default_factory=dict)
    reset_seed: int | None = None

    @property
    def key(self) -> tuple:
        return (self.task, self.setting, self.variant, int(self.seed))


def _object_placements(objects) -> list[dict]:
    kind = objects[0]
    if kind == "episode":
        return [{"episode_id": i} for i in range(int(objects[1]))]
    if kind == "xy":
        return [{"init_xy": [x, y]} for x in objects[1] for y in objects[2]]
    raise ValueError(f"unknown object placement {objects!r}")


def _script_episodes(task: str, setting: str) -> list[EpisodeSpec]:
    """The grid of maniskill2_evaluator: per variant, robot poses (outer) x object placements (inner)."""
    t = TASKS[task]
    s = t["settings"][setting]
    robot = ROBOTS[t["robot"]]
    out = []
    for vname, vkw in s["variants"].items():
        extra = dict(vkw)
        env_id = extra.pop("env_id", s.get("env_id", t["env_id"]))
        scene = extra.pop("scene_name", s["scene_name"])
        seed = 0
        for x, y, yaw, pose_overlay in s["robot_poses"]:
            overlay = pose_overlay or s.get("overlay")
            for obj in _object_placements(s["objects"]):
                build = dict(extra)
                build.update(
                    obs_mode="rgbd", robot=s["robot_model"], sim_freq=robot["sim_freq"],
                    control_mode=robot["control_mode"], control_freq=robot["control_freq"],
                    max_episode_steps=t["max_steps"], scene_name=scene, camera_cfgs={"add_segmentation": True},
                    rgb_overlay_path=f"real_inpainting/{overlay}" if overlay else None,
                )
                reset = {"robot_init_options": {"init_xy": [x, y], "init_rot_quat": robot_init_quat(yaw).tolist()},
                         "obj_init_options": obj}
                out.append(EpisodeSpec(task, setting, vname, seed, t["robot"], env_id, t["max_steps"], build, reset))
                seed += 1
    return out


def _subsample(specs: list[EpisodeSpec], k: int | None) -> list[EpisodeSpec]:
    """At most k episodes per variant, evenly spaced over the grid (None = all)."""
    if k is None:
        return specs
    by_variant: dict[str, list[EpisodeSpec]] = {}
    for s in specs:
        by_variant.setdefault(s.variant, []).append(s)
    out = []
    for group in by_variant.values():
        idx = sorted(set(np.linspace(0, len(group) - 1, min(k, len(group))).round().astype(int).tolist()))
        out.extend(group[i] for i in idx)
    return out


def episode_plan(cfg: "SimplerConfig") -> list[EpisodeSpec]:
    """Every episode the config asks for, in run order."""
    if cfg.backend not in ("simpler_env", "maniskill3"):
        raise ValueError(f"backend must be 'simpler_env' or 'maniskill3', got {cfg.backend!r}")
    if cfg.env_mode not in ("scripts", "prepackaged"):
        raise ValueError(f"env_mode must be 'scripts' or 'prepackaged', got {cfg.env_mode!r}")
    tasks = cfg.tasks or (WIDOWX_TASKS if cfg.backend == "maniskill3" else tuple(TASKS))
    plan: list[EpisodeSpec] = []
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
        t = TASKS[task]
        if cfg.backend == "maniskill3":
            if "ms3_env_id" not in t:
                raise ValueError(f"{task} has no ManiSkill3 port (only the four WidowX tasks do)")
            n = cfg.episodes or t["settings"]["visual_matching"]["episodes"]
            # SimplerEnv maniskill3 branch real2sim_eval_maniskill3.py: reset(seed=s, options={"episode_id": s})
            plan += [EpisodeSpec(task, "visual_matching", "maniskill3", i, t["robot"], t["ms3_env_id"],
                                 t["max_steps"], {}, {"episode_id": i}, cfg.seed + i) for i in range(n)]
            continue
        for setting in cfg.settings:
            if setting not in SETTINGS:
                raise ValueError(f"unknown setting {setting!r}; expected one of {SETTINGS}")
            if setting not in t["settings"]:
                continue  # WidowX has visual matching only (no variant aggregation in SimplerEnv)
            if cfg.env_mode == "prepackaged":
                if setting != "visual_matching":
                    continue
                names = t["simpler_names"]
                n = cfg.episodes or t["settings"][setting]["episodes"] // len(names)
                plan += [EpisodeSpec(task, setting, f"prepackaged:{name}", i, t["robot"], name, t["max_steps"],
                                     {"prepackaged": True}, {}, cfg.seed + i) for name in names for i in range(n)]
            else:
                plan += _subsample(_script_episodes(task, setting), cfg.episodes)
    return plan


# --------------------------------------------------------------------------------------------------------
# Backends: build / reset / step one simulator
# --------------------------------------------------------------------------------------------------------

def _first(x):
    a = _to_numpy(x).reshape(-1)
    return a[0].item() if a.size else None


def _call(env, method: str):
    """Call an env method through gym wrappers (env.unwrapped holds the task's own methods)."""
    fn = getattr(env, method, None) or getattr(getattr(env, "unwrapped", None), method)
    return fn()


def _close(env) -> None:
    try:
        env.close()
    except Exception:
        pass


class _SimplerEnvBackend:
    """SimplerEnv (ManiSkill2_real2sim) envs, built and reset as maniskill2_evaluator.py does."""

    name = "simpler_env"

    def __init__(self, cfg: "SimplerConfig"):
        self.cfg = cfg

    def make(self, spec: EpisodeSpec):
        simpler_env = require_simpler_env()
        if spec.build_kwargs.get("prepackaged"):
            # No kwargs on purpose: simpler_env.make writes its kwargs into the module-level ENVIRONMENT_MAP,
            # so an override would leak into every later make() of that task.
            return simpler_env.make(spec.env_id)
        from simpler_env.utils.env.env_builder import build_maniskill2_env

        kw = dict(spec.build_kwargs)
        if kw.get("rgb_overlay_path"):
            kw["rgb_overlay_path"] = str(Path(self._asset_dir()) / kw["rgb_overlay_path"])
        return build_maniskill2_env(spec.env_id, **kw)

    def _asset_dir(self) -> str:
        if self.cfg.asset_dir:
            return self.cfg.asset_dir
        from mani_skill2_real2sim import ASSET_DIR  # ManiSkill2_real2sim/data, or $MS2_REAL2SIM_ASSET_DIR

        return str(ASSET_DIR)

    def reset(self, env, spec: EpisodeSpec):
        options = json.loads(json.dumps(spec.reset_options))  # a fresh copy: envs edit their options
        for sub in options.values():
            for k in ("init_xy", "init_rot_quat"):
                if k in sub:
                    sub[k] = np.asarray(sub[k], dtype=np.float64)
        obs, _ = env.reset(seed=spec.reset_seed, options=options or None)
        return obs, str(_call(env, "get_language_instruction"))

    def step(self, env, action: np.ndarray):
        obs, _reward, done, truncated, info = env.step(action)
        return obs, bool(done), bool(truncated), info

    @staticmethod
    def partial_success(info: dict):
        stats = (info or {}).get("episode_stats") or {}
        for key in ("is_src_obj_grasped", "grasped"):  # Bridge put-on tasks / coke can
            if key in stats:
                return bool(stats[key])
        return None


class _ManiSkill3Backend:
    """ManiSkill3's Bridge digital twins, used as SimplerEnv's maniskill3 branch does
    (simpler_env/real2sim_eval_maniskill3.py): batched arrays with num_envs = 1."""

    name = "maniskill3"

    def __init__(self, cfg: "SimplerConfig"):
        self.cfg = cfg

    def make(self, spec: EpisodeSpec):
        require_maniskill3()
        import gymnasium as gym

        return gym.make(spec.env_id, obs_mode="rgb+segmentation", num_envs=1,
                        sim_backend=self.cfg.ms3_sim_backend, render_backend=self.cfg.ms3_render_backend,
                        sensor_configs={"shader_pack": "default"})

    def reset(self, env, spec: EpisodeSpec):
        obs, _ = env.reset(seed=spec.reset_seed, options=dict(spec.reset_options))
        instruction = _call(env, "get_language_instruction")  # a list, one per parallel env
        if not isinstance(instruction, str):
            instruction = instruction[0]
        return obs, str(instruction)

    def step(self, env, action: np.ndarray):
        obs, _reward, terminated, truncated, info = env.step(action.astype(np.float32))
        success = info.get("success", terminated) if isinstance(info, dict) else terminated
        return obs, bool(_first(success)), bool(np.any(_to_numpy(truncated))), info

    @staticmethod
    def partial_success(info: dict):
        if isinstance(info, dict) and "is_src_obj_grasped" in info:
            return bool(_first(info["is_src_obj_grasped"]))
        return None


# --------------------------------------------------------------------------------------------------------
# Config and the env wrapper (also the refinevla.evaluate backend contract)
# --------------------------------------------------------------------------------------------------------

@dataclass
class SimplerConfig:
    backend: str = "simpler_env"  # "simpler_env" | "maniskill3"
    tasks: tuple[str, ...] | None = None  # None = all paper tasks (maniskill3: the four WidowX tasks)
    settings: tuple[str, ...] = SETTINGS
    env_mode: str = "scripts"  # "scripts" (the evaluation scripts' grid) | "prepackaged" (simpler_env.make)
    episodes: int | None = None  # None = the paper's counts; k = at most k per variant (evenly spaced)
    image_size: Any = None  # policy input size (int or (H, W)); None = policy.image_size if set, else native
    sticky_repeat: int = 15  # Google Robot sticky gripper (Octo/OpenVLA 15; SpatialVLA 10)
    sticky_update: str = "every_step"  # "every_step" (Octo/OpenVLA) | "on_trigger" (SpatialVLA)
    action_scale: float = 1.0
    stop_on_success: bool = False  # SimplerEnv runs every episode to max steps and scores the last step
    reuse_env: bool = False  # the scripts build a fresh env per episode (same RNG start, seed 2022); True is
    # faster (https://github.com/simpler-env/SimplerEnv/issues/83) but shifts the env's episode RNG
    retry_errors: bool = False  # on resume, re-run episodes whose record has an error
    seed: int = 0  # maniskill3 / prepackaged: reset seed of episode i is seed + i
    asset_dir: str | None = None  # SimplerEnv data dir (real_inpainting/...); None = mani_skill2_real2sim's
    ms3_sim_backend: str = "cpu"
    ms3_render_backend: str = "cpu"  # "cpu" = lavapipe software Vulkan; "gpu" on a GPU machine


class SimplerTask:
    """One simulator behind the project's env contract: ``reset(seed) -> obs``, ``step(action) ->
    (obs, success)``, ``max_steps``, ``close()`` (what ``refinevla.evaluate`` expects of a backend), plus
    ``reset_spec(spec)`` for a planned episode and, after each step, ``truncated`` and ``partial_success``.

    Observations are the Policy's obs dicts (``policy_obs``); actions are schema actions, converted per robot
    by an ``ActionConverter`` that is reset with every episode. The env is built lazily per episode spec and
    rebuilt for every episode unless ``cfg.reuse_env`` (then only when the build kwargs change).
    """

    def __init__(self, cfg: SimplerConfig, plan: list[EpisodeSpec] | None = None, image_size=None,
                 make_env: Callable[[EpisodeSpec], Any] | None = None):
        self.cfg = cfg
        self.backend = (_ManiSkill3Backend if cfg.backend == "maniskill3" else _SimplerEnvBackend)(cfg)
        self.plan = plan if plan is not None else episode_plan(cfg)  # (validates cfg)
        self.image_size = image_size if image_size is not None else cfg.image_size
        self._make = make_env or self.backend.make
        self.env, self._env_key, self.spec = None, None, None
        self.truncated, self.partial_success, self.info = False, None, {}

    @property
    def max_steps(self) -> int:
        return (self.spec or self.plan[0]).max_steps

    def reset(self, seed: int) -> dict:
        """Episode ``seed % len(plan)`` of the plan (the evaluate.py contract: integer seeds)."""
        return self.reset_spec(self.plan[int(seed) % len(self.plan)])

    def reset_spec(self, spec: EpisodeSpec) -> dict:
        self.truncated, self.partial_success, self.info = False, None, {}
        key = (spec.env_id, json.dumps(spec.build_kwargs, sort_keys=True, default=str))
        if self.env is None or not self.cfg.reuse_env or key != self._env_key:
            self.close()
            self.env, self._env_key = self._make(spec), key
        self.spec = spec
        self.converter = ActionConverter(spec.robot, self.cfg.sticky_repeat, self.cfg.sticky_update,
                                         self.cfg.action_scale)
        raw, self.instruction = self.backend.reset(self.env, spec)
        return self._obs(raw)

    def step(self, action) -> tuple[dict, bool]:
        raw, success, self.truncated, self.info = self.backend.step(self.env, self.converter(action))
        self.partial_success = self.backend.partial_success(self.info)
        return self._obs(raw), success

    def _obs(self, raw: dict) -> dict:
        return policy_obs(raw, self.instruction, self.spec.robot, self.backend.name, self.image_size,
                          self.converter.last_open)

    def close(self) -> None:
        if self.env is not None:
            _close(self.env)
        self.env, self._env_key = None, None


def make_task(task: str, image_size=None, segmentation: bool = False, setting: str = "visual_matching",
              **cfg_overrides) -> SimplerTask:
    """The ``refinevla.evaluate`` backend entry point: a SimplerTask over one (task, setting); integer
    seeds pick episodes of its grid (``seed % n``). ``segmentation`` is accepted for the contract and unused.

    Note that ``evaluate.run_episode`` stops at the first success, while SimplerEnv runs to max steps and
    scores the last step; for the paper's protocol (and the setting / variant / grasp columns) use
    ``run_simpler``.
    """
    make_env = cfg_overrides.pop("make_env", None)
    cfg = SimplerConfig(tasks=(task,), settings=(setting,), **cfg_overrides)
    plan = episode_plan(cfg)
    if not plan:
        raise ValueError(f"{task} has no {setting!r} episodes for backend {cfg.backend!r}")
    if make_env is None:
        (require_maniskill3 if cfg.backend == "maniskill3" else require_simpler_env)()
    return SimplerTask(cfg, plan, image_size=image_size, make_env=make_env)


# --------------------------------------------------------------------------------------------------------
# The run: episodes.jsonl, resume, error capture
# --------------------------------------------------------------------------------------------------------

RECORD_KEYS = ("task", "seed", "success", "steps", "wall_s", "error", "policy_s",
               "setting", "variant", "partial_success")


def load_records(path) -> list[dict]:
    """Records from an episodes.jsonl (missing file = none; a torn last line from a killed run is skipped):
    ``refinevla.evaluate.read_records``, so both harnesses read their files alike."""
    from .evaluate import read_records

    return read_records(path)


def _record_key(rec: dict) -> tuple:
    return (rec.get("task"), rec.get("setting"), rec.get("variant"), int(rec.get("seed", -1)))


def _write_line(fh, rec: dict) -> None:
    fh.write(json.dumps(rec) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def run_episode(task_env: SimplerTask, spec: EpisodeSpec, policy, cfg: SimplerConfig) -> dict:
    """Run one planned episode and return its record; never raises (an exception ends the episode and is
    recorded in ``error``, success False). Runs to the env's truncation (max steps) unless
    ``cfg.stop_on_success``; success is the env's flag at the last step, as maniskill2_evaluator.py scores it.
    """
    t0 = time.perf_counter()
    policy_s, steps, success, error = 0.0, 0, False, None
    try:
        obs = task_env.reset_spec(spec)
        policy.reset(obs["instruction"])
        while steps < spec.max_steps:
            t1 = time.perf_counter()
            action = policy.act(obs)
            policy_s += time.perf_counter() - t1
            obs, success = task_env.step(action)
            steps += 1
            if task_env.truncated or (cfg.stop_on_success and success):
                break
    except Exception as exc:  # one bad episode must not end the run (KeyboardInterrupt still does)
        error, success = f"{type(exc).__name__}: {exc}", False
        task_env.close()  # the env may be broken: the next episode builds a new one
    return {"task": spec.task, "seed": int(spec.seed), "success": bool(success), "steps": int(steps),
            "wall_s": round(time.perf_counter() - t0, 4), "error": error, "policy_s": round(policy_s, 4),
            "setting": spec.setting, "variant": spec.variant, "partial_success": task_env.partial_success}


def _policy_source(policy_factory) -> Callable[[str], Any]:
    """Policies per robot. A Policy instance serves every robot. A factory is called once per robot, with
    the robot name ("widowx" / "google_robot") when it takes an argument (so a model can pick its Bridge or
    Fractal statistics), else with none (the ``refinevla.evaluate`` convention)."""
    if not isinstance(policy_factory, type) and hasattr(policy_factory, "act") and hasattr(policy_factory, "reset"):
        return lambda robot: policy_factory
    try:
        inspect.signature(policy_factory).bind("robot")
        takes_robot = True
    except (TypeError, ValueError):
        takes_robot = False
    cache: dict[str, Any] = {}

    def get(robot: str):
        if robot not in cache:
            cache[robot] = policy_factory(robot) if takes_robot else policy_factory()
        return cache[robot]

    return get


def run_simpler(policy_factory, cfg: SimplerConfig | None = None, out_dir=".", *,
                make_env: Callable[[EpisodeSpec], Any] | None = None) -> list[dict]:
    """Run (or resume) the evaluation; append one record per episode to ``out_dir/episodes.jsonl``.

    ``policy_factory``: a Policy, or a factory (``f(robot)`` or ``f()``) called once per robot.
    ``make_env(spec)`` replaces the simulator's env constructor (tests, or a custom build); with it no
    simulator package is imported. Returns the plan's records (old and new) and writes ``summary.csv``
    (``results_table``). Records: ``RECORD_KEYS``.
    """
    cfg = cfg or SimplerConfig()
    plan = episode_plan(cfg)
    task_env = SimplerTask(cfg, plan, make_env=make_env)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "episodes.jsonl"
    records = load_records(path)
    if cfg.retry_errors:  # drop errored episodes from the file, so they run again
        records = [r for r in records if not r.get("error")]
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    done = {_record_key(r): r for r in records}
    todo = [s for s in plan if s.key not in done]
    if todo and make_env is None:  # fail before the loop, with the install steps, not once per episode
        (require_maniskill3 if cfg.backend == "maniskill3" else require_simpler_env)()
    get_policy = _policy_source(policy_factory)
    try:
        with path.open("a") as fh:
            for spec in todo:
                policy = get_policy(spec.robot)  # outside the episode: a policy that cannot load stops the run
                task_env.image_size = cfg.image_size if cfg.image_size is not None else getattr(
                    policy, "image_size", None)
                rec = run_episode(task_env, spec, policy, cfg)
                _write_line(fh, rec)
                done[spec.key] = rec
    finally:
        task_env.close()
    records = [done[s.key] for s in plan if s.key in done]
    results_table(records).to_csv(out / "summary.csv", index=False)
    return records


# --------------------------------------------------------------------------------------------------------
# Results: the paper's table shape with Wilson intervals
# --------------------------------------------------------------------------------------------------------

def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95% at z = 1.96; (0, 1) when n = 0): ``refinevla.evaluate``'s, imported here
    lazily so that both harnesses report the same interval."""
    from .evaluate import wilson_interval as _wilson

    return _wilson(successes, n, z)


def results_table(records: Iterable[dict]):
    """Aggregate episode records into the paper's table shape (a pandas DataFrame).

    One row per (robot, setting, task): episodes n, successes, success rate with a Wilson 95% interval,
    grasp (partial) success rate where the env reports it, errored episodes (counted as failures). Then an
    ``average`` row per (robot, setting): the mean of the task rates (the papers' "Average"), with the
    Wilson interval of the pooled episodes. SimplerEnv averages variants with equal episode counts, so
    the pooled rate of a task equals its mean over variants (tools/calc_metrics_evaluation_videos.py).
    WidowX has visual matching only; Google Robot has a row per task per setting.
    """
    import pandas as pd

    groups: dict[tuple, list[dict]] = {}
    for r in records:
        robot = TASKS.get(r["task"], {}).get("robot", "unknown")
        groups.setdefault((robot, r.get("setting", ""), r["task"]), []).append(r)
    order = {t: i for i, t in enumerate(TASKS)}
    rows = []
    for (robot, setting, task), recs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                                order.get(kv[0][2], 99))):
        n = len(recs)
        k = sum(bool(r.get("success")) for r in recs)
        partial = [bool(r["partial_success"]) for r in recs if r.get("partial_success") is not None]
        lo, hi = wilson_interval(k, n)
        rows.append({"robot": robot, "setting": setting, "task": task,
                     "label": TASKS.get(task, {}).get("label", task), "n": n, "successes": k,
                     "success": k / n, "ci_low": lo, "ci_high": hi,
                     "partial_success": (sum(partial) / len(partial)) if partial else float("nan"),
                     "errors": sum(bool(r.get("error")) for r in recs)})
    table = pd.DataFrame(rows, columns=["robot", "setting", "task", "label", "n", "successes", "success",
                                        "ci_low", "ci_high", "partial_success", "errors"])
    averages = []
    for (robot, setting), g in table.groupby(["robot", "setting"], sort=False):
        if len(g) < 2:
            continue
        n, k = int(g["n"].sum()), int(g["successes"].sum())
        lo, hi = wilson_interval(k, n)
        averages.append({"robot": robot, "setting": setting, "task": "average", "label": "Average", "n": n,
                         "successes": k, "success": float(g["success"].mean()), "ci_low": lo, "ci_high": hi,
                         "partial_success": float(g["partial_success"].mean()), "errors": int(g["errors"].sum())})
    if averages:
        table = pd.concat([table, pd.DataFrame(averages)], ignore_index=True)
        table = table.sort_values(["robot", "setting"], kind="stable").reset_index(drop=True)
    return table


__all__ = [
    "SimulatorNotInstalledError", "require_simpler_env", "require_maniskill3", "ROBOTS", "TASKS", "SETTINGS",
    "WIDOWX_TASKS", "GOOGLE_TASKS", "euler_to_quat", "euler_to_axis_angle", "quat_to_matrix", "matrix_to_euler",
    "quat_multiply", "robot_init_quat", "widowx_gripper", "StickyGripper", "ActionConverter",
    "select_camera_image", "resize_image", "state_from_obs", "policy_obs", "EpisodeSpec", "episode_plan",
    "SimplerConfig", "SimplerTask", "make_task", "RECORD_KEYS", "run_episode", "run_simpler", "load_records",
    "wilson_interval", "results_table",
]
