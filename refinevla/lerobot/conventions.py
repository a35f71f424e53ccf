"""Each known LeRobot dataset's conventions, written down once, and their map to ``refinevla.schema``.

A :class:`Conventions` says where the policy camera, state and action are, how the state encodes the
orientation, which way round the grippers go, the control rate and the pinned v2.x hub revision. The map
(:func:`to_schema_state`, :func:`to_schema_action`) gives the schema's state float32[8] = xyz, roll, pitch,
yaw, pad, gripper in [0, 1] (1 = open) and action float32[7] = 6 deltas + gripper in [0, 1] (1 = open).

Sources (public; each field of ``BRIDGE`` and ``FRACTAL`` names the one that confirms it):

[any4lerobot]  The converter the IPEC-COMMUNITY re-hosts were made with (its README lists the
               IPEC-COMMUNITY/OpenX collection). It applies OpenVLA's Open X-Embodiment standardisation
               transforms before writing, at https://github.com/Tavish9/any4lerobot/blob/
               69373154e763b5c9204241d2d67e0195be439e29/openx2lerobot/ :
               ``oxe_utils/configs.py`` (per-dataset state keys, encodings, control rates),
               ``openx_rlds.py`` (the state / action names it writes to meta/info.json),
               ``oxe_utils/transforms.py`` (``bridge_orig_dataset_transform``, ``rt1_dataset_transform``),
               ``oxe_utils/transform_utils.py`` (``binarize_gripper_actions``, ``rel2abs_gripper_actions``).
[open-pi-zero] The SimplerEnv adapters of a policy trained on both datasets, which rebuild each dataset's state
               from the simulator: https://github.com/allenzren/open-pi-zero/blob/
               c3df7fb062175c16f69d7ca4ce042958ea238fb7/src/agent/env_adapter/simpler.py (lines 167-220).
[simplerenv]   https://github.com/simpler-env/SimplerEnv (README: control rates; ``simpler_env/policies/rt1/
               rt1_model.py`` lines 189-192 send RT-1's ``rotation_delta`` as an axis-angle vector).
[tfds]         https://www.tensorflow.org/datasets/catalog/bridge (``episode_metadata/has_language``).
[hub]          The dataset pages: https://huggingface.co/datasets/IPEC-COMMUNITY/bridge_orig_lerobot and
               https://huggingface.co/datasets/IPEC-COMMUNITY/fractal20220817_data_lerobot .
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..geometry import quat_to_euler
from ..schema import ACTION_DIM, STATE_DIM


class LeRobotFormatError(ValueError):
    """A LeRobot source is missing, unreachable or not in the layout this reader expects."""


STATE_LAYOUTS = ("xyz_rpy_pad_gripper", "xyz_quat_gripper", "none")


@dataclass(frozen=True)
class Conventions:
    """How one dataset's fields map to the row schema (read by :func:`to_schema_state` / ``_action``).

    Fields name ``meta/info.json`` keys. ``sources`` says, per field, which public source confirms it.
    ``hub_id`` and ``revision``: the hub repository these conventions were checked for and the v2.x commit
    read from it when no ``revision`` is passed (a fork under another id has its own commits, so it is read at
    ``main`` unless pinned).
    """

    name: str
    camera: str | None                 # features key of the policy camera; None: the first camera in info.json
    state_key: str = "observation.state"
    state_layout: str = "xyz_rpy_pad_gripper"   # one of STATE_LAYOUTS
    quat_order: str = "xyzw"           # for "xyz_quat_gripper": order of the 4 quaternion numbers
    state_gripper_range: tuple[float, float] = (0.0, 1.0)
    state_gripper_open: str = "high"   # "high": the top of the range is open; "low": the bottom is open
    action_key: str = "action"
    action_rotation: str = "delta_rpy"  # what action[3:6] holds (documentation; passed through unchanged)
    action_gripper_range: tuple[float, float] = (0.0, 1.0)
    action_gripper_open: str = "high"
    fps: float | None = None           # control rate in Hz; None: info.json "fps"
    robot: str = ""
    instruction: str = "task_index -> meta/tasks.jsonl"
    hub_id: str | None = None
    revision: str | None = None
    sources: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.state_layout not in STATE_LAYOUTS:
            raise LeRobotFormatError(f"state_layout {self.state_layout!r} is not one of {STATE_LAYOUTS}")
        for name in ("state_gripper_open", "action_gripper_open"):
            if getattr(self, name) not in ("high", "low"):
                raise LeRobotFormatError(f"{name} must be 'high' or 'low', got {getattr(self, name)!r}")
        if self.quat_order not in ("xyzw", "wxyz"):
            raise LeRobotFormatError(f"quat_order must be 'xyzw' or 'wxyz', got {self.quat_order!r}")


# The pinned revisions: commits at which the hub pages show each re-host's meta/ folder (written as LeRobot v2.0,
# per-episode files). That every episode file is present at these commits could not be checked from the machines
# this project is built on; a missing file's error names the pin and revision='main' (refinevla/lerobot/hub.py).
# https://huggingface.co/datasets/IPEC-COMMUNITY/bridge_orig_lerobot/commits/94d33e023aa85acdc178fcf9b87774a7dda519ec/meta
# https://huggingface.co/datasets/IPEC-COMMUNITY/fractal20220817_data_lerobot/blob/0acd41760c1a52f60b3af53b0fbc70dfe357a6f1/meta/episodes.jsonl
BRIDGE = Conventions(
    name="bridge_orig_lerobot",
    camera="observation.images.image_0",
    state_layout="xyz_rpy_pad_gripper",
    action_rotation="delta_rpy: state[t+1, 3:6] - state[t, 3:6] (rad), Euler roll/pitch/yaw",
    fps=5.0,
    robot="widowx",
    hub_id="IPEC-COMMUNITY/bridge_orig_lerobot",
    revision="94d33e023aa85acdc178fcf9b87774a7dda519ec",
    sources={
        "camera": "[any4lerobot] configs.py bridge_orig: primary image_0 -> observation.images.image_0",
        "state_layout": "[any4lerobot] configs.py bridge_orig: POS_EULER from EEF_state + gripper_state; "
                        "openx_rlds.py names x,y,z,roll,pitch,yaw,pad,gripper",
        "state_gripper": "[any4lerobot] transforms.py bridge_orig_dataset_transform keeps Bridge's own state[:, -1] "
                         "as gripper_state; [open-pi-zero] the Bridge adapter feeds it the gripper *openness* "
                         "(simpler.py line 172): [0, 1], 1 = open",
        "action": "[any4lerobot] transforms.py bridge_orig_dataset_transform drops step 0, binarises the gripper "
                  "(transform_utils.py binarize_gripper_actions: 1 = open, 0 = close) and relabels xyz/rpy as "
                  "state[t+1] - state[t] (relabel_bridge_actions)",
        "fps": "[any4lerobot] configs.py control_frequency 5; [simplerenv] Bridge at 5 Hz",
        "instruction": "[any4lerobot] the language instruction -> task_index -> meta/tasks.jsonl; [tfds] Bridge has "
                       "episodes without language (has_language): load_lerobot skips empty ones by default",
        "revision": "[hub] a commit with meta/info.json codebase_version v2.0",
    },
)

FRACTAL = Conventions(
    name="fractal20220817_data_lerobot",
    camera="observation.images.image",
    state_layout="xyz_quat_gripper",
    quat_order="xyzw",
    state_gripper_open="low",          # the source field is RT-1's `gripper_closed`: 1 = closed
    action_rotation="rotation_delta: named roll/pitch/yaw; SimplerEnv's RT-1 adapter sends it as axis-angle",
    fps=3.0,
    robot="google_robot",
    hub_id="IPEC-COMMUNITY/fractal20220817_data_lerobot",
    revision="0acd41760c1a52f60b3af53b0fbc70dfe357a6f1",
    sources={
        "camera": "[any4lerobot] configs.py fractal20220817_data: primary image -> observation.images.image",
        "state_layout": "[any4lerobot] configs.py: POS_QUAT from base_pose_tool_reached + gripper_closed; "
                        "openx_rlds.py names x,y,z,rx,ry,rz,rw,gripper",
        "quat_order": "[open-pi-zero] the Fractal adapter converts SimplerEnv's wxyz quaternion 'to xyzw used in "
                      "fractal' (simpler.py lines 205-206); [any4lerobot] names rx,ry,rz,rw (scalar last)",
        "state_gripper": "[any4lerobot] rt1_dataset_transform leaves RT-1's gripper_closed unchanged; [open-pi-zero] "
                         "the Fractal adapter feeds 1 - width as 'gripper_closedness' (simpler.py lines 207-212): "
                         "1 = closed, so it is inverted here",
        "action": "[any4lerobot] transforms.py rt1_dataset_transform: world_vector, rotation_delta, and "
                  "rel2abs_gripper_actions (transform_utils.py: absolute, 1 = open, 0 = close)",
        "action_rotation": "[any4lerobot] openx_rlds.py names roll,pitch,yaw; [simplerenv] rt1_model.py treats "
                           "rotation_delta as axis-angle; passed through unchanged",
        "fps": "[any4lerobot] configs.py control_frequency 3; [simplerenv] Google Robot at 3 Hz",
        "instruction": "[any4lerobot] rt1_dataset_transform: natural_language_instruction -> task_index",
        "revision": "[hub] a commit with meta/ (codebase_version v2.0)",
    },
)

KNOWN_CONVENTIONS = {c.name: c for c in (BRIDGE, FRACTAL)}

_EULER_NAMES = ["x", "y", "z", "roll", "pitch", "yaw", "pad", "gripper"]
_QUAT_NAMES = ["x", "y", "z", "rx", "ry", "rz", "rw", "gripper"]


def feature_names(feature: dict) -> list[str]:
    """The per-dimension names of an info.json feature (``names`` is a list or ``{"motors": [...]}``)."""
    names = feature.get("names")
    if isinstance(names, dict):
        names = next(iter(names.values()), None)
    return [str(n) for n in names] if isinstance(names, list) else []


def generic_conventions(info: dict, name: str = "generic", camera: str | None = None, **overrides) -> Conventions:
    """Conventions for a dataset we have no record of, read from its info.json (overridable by keyword).

    The state layout is taken from the state feature's names (the any4lerobot naming: x,y,z,roll,pitch,yaw,
    pad,gripper or x,y,z,rx,ry,rz,rw,gripper); anything else needs ``state_layout=`` ("none" fills zeros).
    Gripper ranges default to [0, 1] with 1 = open (the OXE standardised convention): pass
    ``action_gripper_range=(-1, 1)``, ``action_gripper_open="low"`` etc. for other datasets.
    """
    features = info.get("features", {})
    if "state_layout" not in overrides:
        names = feature_names(features.get(overrides.get("state_key", "observation.state"), {}))
        if names == _EULER_NAMES:
            overrides["state_layout"] = "xyz_rpy_pad_gripper"
        elif names == _QUAT_NAMES:
            overrides["state_layout"] = "xyz_quat_gripper"
        else:
            raise LeRobotFormatError(
                f"dataset {name!r}: cannot tell the state layout from meta/info.json features"
                f"['observation.state'].names = {names or None}; pass conventions=generic_conventions(info, "
                f"state_layout=...) with one of {STATE_LAYOUTS}")
    sources = {"all": "generic fallback read from meta/info.json names: check a few frames "
                      "(gripper_agreement() warns when the two grippers disagree)"}
    return Conventions(name=name, camera=camera, robot=str(info.get("robot_type", "")), sources=sources,
                       **overrides)


def known_conventions(label: str, conventions=None) -> Conventions | None:
    """An explicit Conventions or known name, else the known dataset ``label`` names, else None (generic)."""
    if isinstance(conventions, Conventions):
        return conventions
    if isinstance(conventions, str):
        if conventions not in KNOWN_CONVENTIONS:
            raise LeRobotFormatError(f"unknown conventions {conventions!r}; known: {sorted(KNOWN_CONVENTIONS)}")
        return KNOWN_CONVENTIONS[conventions]
    if conventions is not None:
        raise LeRobotFormatError(f"conventions must be a Conventions, a known name or None, got {conventions!r}")
    base = label.rstrip("/").split("/")[-1]
    for known in KNOWN_CONVENTIONS.values():
        if base == known.name or base.startswith(known.name.removesuffix("_lerobot")):
            return known
    return None


def quat_to_rpy(quat: np.ndarray, order: str = "xyzw") -> np.ndarray:
    """Quaternions (N, 4), scalar last by default -> roll, pitch, yaw (N, 3) in rad (``refinevla.geometry``)."""
    return quat_to_euler(quat, order=order)


def _unit_gripper(values: np.ndarray, value_range, open_side: str) -> np.ndarray:
    """Map a gripper value to [0, 1] with 1 = open (the schema's convention)."""
    lo, hi = value_range
    unit = (np.asarray(values, np.float64) - lo) / (hi - lo)
    return np.clip(unit if open_side == "high" else 1.0 - unit, 0.0, 1.0)


def to_schema_state(state: np.ndarray, conv: Conventions) -> np.ndarray:
    """Source state rows (N, D) -> schema state (N, 8): xyz, roll, pitch, yaw, pad=0, gripper in [0, 1]."""
    state = np.asarray(state, np.float64)
    out = np.zeros((len(state), STATE_DIM), np.float64)
    if conv.state_layout == "none":
        return out.astype(np.float32)
    need = 8
    if state.ndim != 2 or state.shape[1] < need:
        raise LeRobotFormatError(
            f"{conv.name}: {conv.state_key} has shape {state.shape[1:]}, layout {conv.state_layout} needs {need}")
    out[:, 0:3] = state[:, 0:3]
    if conv.state_layout == "xyz_rpy_pad_gripper":
        out[:, 3:6] = state[:, 3:6]
    else:
        out[:, 3:6] = quat_to_rpy(state[:, 3:7], conv.quat_order)
    out[:, 7] = _unit_gripper(state[:, 7], conv.state_gripper_range, conv.state_gripper_open)
    return out.astype(np.float32)


def to_schema_action(action: np.ndarray, conv: Conventions) -> np.ndarray:
    """Source action rows (N, 7) -> schema action (N, 7): 6 deltas passed through, gripper to [0, 1], 1 = open."""
    action = np.asarray(action, np.float64)
    if action.ndim != 2 or action.shape[1] != ACTION_DIM:
        raise LeRobotFormatError(f"{conv.name}: {conv.action_key} has shape {action.shape[1:]}, expected (7,)")
    out = action.copy()
    out[:, 6] = _unit_gripper(action[:, 6], conv.action_gripper_range, conv.action_gripper_open)
    return out.astype(np.float32)
