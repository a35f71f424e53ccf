"""SimplerEnv (ManiSkill2_real2sim) behind the SimplerEnv backend: build, reset and step its environments the way
its evaluation scripts do (``simpler_env/main_inference.py`` -> ``evaluation/maniskill2_evaluator.py``).

SimplerEnv (simpler-env/SimplerEnv @ 4ab7178, ManiSkill2_real2sim @ ef7a4d4) runs all paper tasks in both
settings. It needs an NVIDIA GPU with Vulkan and is not on PyPI (``SIMPLER_ENV_INSTALL``); it is imported only
when an environment is built.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import SimulatorNotInstalledError
from .simpler_tasks import EpisodeSpec

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


def require_simpler_env():
    """Import and return ``simpler_env``, or raise SimulatorNotInstalledError with the install steps."""
    try:
        import simpler_env  # noqa: F401  (imports mani_skill2_real2sim.envs, which registers the envs)
        from simpler_env.utils.env import env_builder  # noqa: F401
    except Exception as exc:  # ImportError, or a SAPIEN/Vulkan failure while importing
        raise SimulatorNotInstalledError(SIMPLER_ENV_INSTALL.format(reason=f"{type(exc).__name__}: {exc}")) from exc
    return simpler_env


def call(env, method: str):
    """Call an env method through gym wrappers (env.unwrapped holds the task's own methods)."""
    fn = getattr(env, method, None) or getattr(getattr(env, "unwrapped", None), method)
    return fn()


class SimplerEnvSim:
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
        return obs, str(call(env, "get_language_instruction"))

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

