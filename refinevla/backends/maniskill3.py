"""ManiSkill3's ports of SimplerEnv's four WidowX (Bridge) tasks behind the SimplerEnv backend, used as
SimplerEnv's maniskill3 branch does (``simpler_env/real2sim_eval_maniskill3.py``): batched arrays, num_envs = 1,
``obs_mode="rgb+segmentation"``, 5 Hz. They can run on a CPU with a software Vulkan (``MANISKILL3_INSTALL``).
Their observations carry no end-effector pose (``simpler_tasks.has_state``).
"""
from __future__ import annotations

import numpy as np

from . import SimulatorNotInstalledError
from .simpler_convert import to_numpy
from .simpler_env import call
from .simpler_tasks import EpisodeSpec

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


def require_maniskill3():
    """Import ``mani_skill.envs`` (registers the Bridge digital twins) or raise SimulatorNotInstalledError."""
    try:
        import mani_skill.envs  # noqa: F401
    except Exception as exc:
        raise SimulatorNotInstalledError(MANISKILL3_INSTALL.format(reason=f"{type(exc).__name__}: {exc}")) from exc
    import mani_skill
    return mani_skill


def _first(x):
    a = to_numpy(x).reshape(-1)
    return a[0].item() if a.size else None


class ManiSkill3Sim:
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
        instruction = call(env, "get_language_instruction")  # a list, one per parallel env
        if not isinstance(instruction, str):
            instruction = instruction[0]
        return obs, str(instruction)

    def step(self, env, action: np.ndarray):
        obs, _reward, terminated, truncated, info = env.step(action.astype(np.float32))
        success = info.get("success", terminated) if isinstance(info, dict) else terminated
        return obs, bool(_first(success)), bool(np.any(to_numpy(truncated))), info

    @staticmethod
    def partial_success(info: dict):
        if isinstance(info, dict) and "is_src_obj_grasped" in info:
            return bool(_first(info["is_src_obj_grasped"]))
        return None

