"""The SimplerEnv task table and episode plan: which environments, robot poses, object placements and variants
the paper's evaluation runs, as SimplerEnv's own evaluation scripts define them (no simulator imported here).

    plan = episode_plan(SimplerConfig(tasks=("widowx_carrot_on_plate",)))   # 24 EpisodeSpecs

Sources: simpler-env/SimplerEnv @ 4ab7178 (``scripts/*.sh``, ``simpler_env/__init__.py``,
``tools/calc_metrics_evaluation_videos.py``) and its submodule ManiSkill2_real2sim @ ef7a4d4; for the
ManiSkill3 ports, haosulab/ManiSkill ``mani_skill/envs/tasks/digital_twins/bridge_dataset_eval/``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..geometry import euler_to_quat, quat_multiply


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

#: Tasks whose observation carries no end-effector pose upstream: ManiSkill2_real2sim's drawer envs give no
#: ``extra.tcp_pose`` (``state_from_obs`` then returns zeros, source "none"), and the ManiSkill3 Bridge ports
#: (``obs_mode="rgb+segmentation"``) none at all. The allenzren/ManiSkill2_real2sim fork, which the
#: DelinQu/SimplerEnv-OpenVLA fork pins "to support state input", adds ``agent.eef_pos`` to every env.
NO_STATE = {"simpler_env": ("google_robot_open_close_drawer",), "maniskill3": WIDOWX_TASKS}


def has_state(task: str, backend: str = "simpler_env") -> bool:
    """Whether ``task`` on ``backend`` ("simpler_env", its alias "simpler", or "maniskill3") observes a real
    end-effector pose. Upstream the gripper entry of the state is the last commanded opening, not a measurement;
    the allenzren fork's ``eef_pos`` measures it (``1 - get_gripper_closedness()``; see
    ``simpler_convert.state_from_obs``)."""
    return task not in NO_STATE.get("simpler_env" if backend == "simpler" else backend, ())


#: ManiSkill3 Bridge ports: per task, (object positions, object orientations, the orientations the paper's
#: grid uses). The env reads ``episode_id`` as position ``(id % (P * Q)) // Q`` and orientation ``id % Q``
#: (``BaseBridgeEnv._initialize_episode``, mani_skill/envs/tasks/digital_twins/bridge_dataset_eval/base_env.py).
#: Carrot and spoon (12 x 2) and stack (24 x 1) cover their whole grid with ids 0-23; the eggplant has 8 positions
#: x 8 orientations (put_on_in_scene.py; the first three are -45, 0 and +45 degrees, SimplerEnv's three yaws), so
#: ids 0-23 would put it on only 3 of the 8 positions.
MS3_GRIDS = {
    "widowx_spoon_on_towel": (12, 2, (0, 1)),
    "widowx_carrot_on_plate": (12, 2, (0, 1)),
    "widowx_stack_cube": (24, 1, (0,)),
    "widowx_put_eggplant_in_basket": (8, 8, (0, 1, 2)),
}


def ms3_episode_id(task: str, i: int) -> int:
    """The ManiSkill3 ``episode_id`` of the task's i-th episode. Where the paper's grid uses every orientation
    (carrot, spoon, stack) this is ``i`` (mod the grid), as SimplerEnv's maniskill3 branch resets; for the eggplant
    the positions vary fastest, then the three orientations, so that any first n episodes spread over the 8
    positions and 24 episodes cover 8 positions x 3 orientations once."""
    n_pos, n_quat, quats = MS3_GRIDS[task]
    if len(quats) == n_quat:  # every orientation is used: the env's own order covers the grid
        return int(i) % (n_pos * n_quat)
    pos, quat = int(i) % n_pos, quats[(int(i) // n_pos) % len(quats)]
    return pos * n_quat + quat


def ms3_grid_cell(task: str, episode_id: int) -> tuple[int, int]:
    """(position, orientation) index the env places the object at for ``episode_id`` (the env's own rule)."""
    n_pos, n_quat, _ = MS3_GRIDS[task]
    return (int(episode_id) % (n_pos * n_quat)) // n_quat, int(episode_id) % n_quat


def robot_init_quat(yaw: float) -> np.ndarray:
    """The scripts' robot start orientation: ``Pose(q=euler2quat(0, 0, yaw)) * Pose(q=[0, 0, 0, 1])``
    (evaluation/argparse.py with ``--robot-init-rot-quat-center 0 0 0 1``), wxyz."""
    return quat_multiply(euler_to_quat(0.0, 0.0, yaw), [0.0, 0.0, 0.0, 1.0])


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
            # SimplerEnv maniskill3 branch real2sim_eval_maniskill3.py: reset(seed=s, options={"episode_id": id})
            plan += [EpisodeSpec(task, "visual_matching", "maniskill3", i, t["robot"], t["ms3_env_id"],
                                 t["max_steps"], {}, {"episode_id": ms3_episode_id(task, i)}, cfg.seed + i)
                     for i in range(n)]
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


