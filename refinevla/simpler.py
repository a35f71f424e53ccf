"""The SimplerEnv backend's public names in one place (``from refinevla.simpler import run_simpler, ...``).

The code lives in ``refinevla.backends``: ``simpler`` (config, environment wrapper, run, results table),
``simpler_tasks`` (task table, episode plan), ``simpler_convert`` (action / observation conversions),
``simpler_env`` and ``maniskill3`` (the two simulators); rotations in ``refinevla.geometry``.
"""
from __future__ import annotations

from .backends import SimulatorNotInstalledError, StateUnavailableError
from .backends.maniskill3 import MANISKILL3_INSTALL, require_maniskill3
from .backends.simpler import (RECORD_KEYS, SimplerConfig, SimplerTask, make_task, results_table, run,
                               run_simpler)
from .backends.simpler_convert import (BRIDGE_DEFAULT_ROT, ActionConverter, StickyGripper, policy_obs,
                                       resize_image, select_camera_image, state_from_obs, widowx_gripper)
from .backends.simpler_env import SIMPLER_ENV_INSTALL, require_simpler_env
from .backends.simpler_tasks import (GOOGLE_TASKS, MS3_GRIDS, ROBOTS, SETTINGS, TASKS, WIDOWX_TASKS, EpisodeSpec,
                                     episode_plan, has_state, ms3_episode_id, ms3_grid_cell, robot_init_quat)
from .geometry import euler_to_axis_angle, euler_to_quat, matrix_to_euler, quat_multiply, quat_to_matrix
from .records import read_records as load_records
from .stats import wilson
from .rollout import run_episode

__all__ = [
    "SimulatorNotInstalledError", "StateUnavailableError", "require_simpler_env", "require_maniskill3",
    "SIMPLER_ENV_INSTALL", "MANISKILL3_INSTALL", "ROBOTS", "TASKS", "SETTINGS", "WIDOWX_TASKS", "GOOGLE_TASKS",
    "MS3_GRIDS", "ms3_episode_id", "ms3_grid_cell", "has_state", "euler_to_quat", "euler_to_axis_angle",
    "quat_to_matrix", "matrix_to_euler", "quat_multiply", "robot_init_quat", "widowx_gripper", "StickyGripper",
    "ActionConverter", "BRIDGE_DEFAULT_ROT", "select_camera_image", "resize_image", "state_from_obs", "policy_obs",
    "EpisodeSpec", "episode_plan", "SimplerConfig", "SimplerTask", "make_task", "RECORD_KEYS", "run_episode",
    "run_simpler", "run", "load_records", "wilson", "results_table",
]
