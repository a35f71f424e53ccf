"""Pure-numpy conversions between the project's schema and SimplerEnv / ManiSkill3 (no simulator imported).

Actions (``ActionConverter``): our action is ``[dx, dy, dz, droll, dpitch, dyaw, gripper]`` with gripper in
[0, 1], 1 = open, already unnormalised by the model's tokenizer. SimplerEnv takes ``[dxyz (m), axis-angle (rad),
gripper]``: rpy -> axis-angle as ``transforms3d.euler.euler2axangle`` (static xyz axes); WidowX gripper
``2 * (open > 0.5) - 1`` (+1 open, absolute); Google Robot gripper is relative (+1 close, -1 open) and "sticky"
(repeated N steps), as the Octo / OpenVLA / SpatialVLA adapters do.

Observations (``policy_obs``): the policy camera's image, the schema state (``state_from_obs``: where it comes
from is in ``state_source``; its gripper entry is the last *commanded* opening, never a measurement, except
with the allenzren/ManiSkill2_real2sim fork's ``eef_pos``), the instruction.
"""
from __future__ import annotations

import numpy as np

from ..geometry import euler_to_axis_angle, matrix_to_euler, quat_to_matrix
from ..schema import ACTION_DIM, STATE_DIM
from .simpler_tasks import ROBOTS

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
        a = np.asarray(to_numpy(action), dtype=np.float64).reshape(-1)
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

def to_numpy(x):
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
    a = to_numpy(x)
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
    img = to_numpy(root[camera]["rgb"])
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
      the allenzren/ManiSkill2_real2sim fork adds (https://github.com/allenzren/ManiSkill2_real2sim; its
      ``get_proprioception`` sets the opening to ``1 - get_gripper_closedness()``, a measurement); the
      DelinQu/SimplerEnv-OpenVLA fork pins it for state input;
    - ``"tcp_pose"``: ``obs["extra"]["tcp_pose"]`` expressed in ``obs["agent"]["base_pose"]`` (upstream
      ManiSkill2_real2sim gives both for the pick / move-near / put-on tasks, not for the drawers); the
      gripper entry is then the last *commanded* opening (the obs has no normalised gripper width);
      ``"tcp_pose_world"`` when there is no base pose (world frame, not the base frame);
    - ``"none"``: zeros (the drawer tasks upstream, ManiSkill3's Bridge twins). The policy obs carries
      ``state_available=False``, and the harness refuses a state-conditioned policy on these tasks
      (``simpler_tasks.has_state``, ``refinevla.backends.check_state``).
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


