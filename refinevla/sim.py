"""robosuite tasks behind one small wrapper that speaks the row schema of ``refinevla.schema``.

``make_task("lift")`` builds a Panda + OSC_POSE (delta, base frame) robosuite environment at 20 Hz and returns a
:class:`SimTask` whose observations are plain dicts: an upright agentview ``image``, the 8-D ``state``, the
``instruction``, privileged ``objects`` and the target's segmentation ``target_mask``. Actions go in and come out in
the schema convention (gripper 1 = open); :func:`to_robosuite_action` / :func:`from_robosuite_action` are the one
place where the gripper sign is converted.

We render the camera ourselves (``use_camera_obs=False``) so that one step costs one physics step plus one RGB render
(plus one segmentation render when masks are asked for), and nothing else.
"""
from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # offscreen rendering without a display; must precede robosuite import

from dataclasses import dataclass

import numpy as np

from .schema import ACTION_DIM, STATE_DIM


# -----------------------------------------------------------------------------
# the task table


@dataclass(frozen=True)
class TaskSpec:
    """What the harness and the experts need to know about one robosuite task."""

    env_name: str  # robosuite environment class name
    instruction: str  # the language instruction given to the policy
    max_steps: int  # evaluation horizon (control steps at 20 Hz)
    target: str  # robosuite object name of the object the task is about (attention masks use it)
    goal: str | None = None  # object name of the place it must go, if any
    env_kwargs: tuple = ()  # extra robosuite constructor arguments, as (key, value) pairs


#: Horizons are about 2-4x the scripted expert's episode length (lift ~30, stack ~60, pick_place_can ~120 steps),
#: room for a hesitant learned policy without paying for hopeless episodes.
TASKS: dict[str, TaskSpec] = {
    "lift": TaskSpec("Lift", "pick up the red cube", max_steps=120, target="cube"),
    "stack": TaskSpec("Stack", "stack the red cube on the green cube", max_steps=200, target="cubeA", goal="cubeB"),
    # single-object PickPlace: the can starts in the left bin; its compartment in the right bin is the one nearest
    # the camera on the right, marked by the VisualCan marker (success: the can inside it, gripper moved away)
    "pick_place_can": TaskSpec("PickPlaceCan", "put the can in the front right compartment of the right bin",
                               max_steps=250, target="Can", goal="VisualCan"),
}

CAMERA = "agentview"
CONTROL_FREQ = 20
_MJOBJ_GEOM = 5  # mujoco.mjtObj.mjOBJ_GEOM (a constant, to keep mujoco out of import time)


def task_spec(task: str) -> TaskSpec:
    """The table entry for ``task``; a ValueError lists the known names otherwise."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {sorted(TASKS)}")
    return TASKS[task]


# -----------------------------------------------------------------------------
# conventions: gripper sign and orientation


def to_robosuite_action(action) -> np.ndarray:
    """Schema action (gripper in [0, 1], 1 = open) -> robosuite action (gripper in [-1, 1], -1 = open, +1 = close)."""
    a = np.asarray(action, dtype=np.float64).reshape(ACTION_DIM).copy()
    a[:6] = np.clip(a[:6], -1.0, 1.0)
    a[6] = 1.0 - 2.0 * float(np.clip(a[6], 0.0, 1.0))
    return a


def from_robosuite_action(action) -> np.ndarray:
    """robosuite action -> schema action: the inverse of :func:`to_robosuite_action` (for recording)."""
    a = np.asarray(action, dtype=np.float32).reshape(ACTION_DIM).copy()
    a[6] = (1.0 - float(np.clip(a[6], -1.0, 1.0))) / 2.0
    return a


def mat2rpy(R: np.ndarray) -> np.ndarray:
    """Roll, pitch, yaw (rad) of a rotation matrix, R = Rz(yaw) Ry(pitch) Rx(roll) (the Bridge convention)."""
    R = np.asarray(R).reshape(3, 3)
    roll = np.arctan2(R[2, 1], R[2, 2])
    pitch = -np.arcsin(np.clip(R[2, 0], -1.0, 1.0))
    yaw = np.arctan2(R[1, 0], R[0, 0])
    return np.array([roll, pitch, yaw])


# -----------------------------------------------------------------------------
# the wrapper


def make_controller_config() -> dict:
    """Panda's robosuite 1.5 composite config: BASIC with an OSC_POSE arm (delta input in [-1, 1] -> at most 5 cm and
    0.5 rad per step, in the robot base frame, whose axes are the world's in these tasks: the experts' world-frame
    position errors are valid deltas)."""
    from robosuite.controllers import load_composite_controller_config

    config = load_composite_controller_config(robot="Panda")
    arm = config["body_parts"]["right"]
    assert arm["type"] == "OSC_POSE" and arm["input_type"] == "delta", arm
    return config


class SimTask:
    """One robosuite task: reset(seed) -> obs, step(action) -> (obs, success), success(), close()."""

    def __init__(self, task: str, image_size: int = 64, segmentation: bool = True, camera: str = CAMERA):
        import logging

        import robosuite

        logging.getLogger("robosuite_logs").setLevel(logging.WARNING)  # one INFO line per env build otherwise
        self.name = task
        self.spec = task_spec(task)
        self.image_size = int(image_size)
        self.segmentation = bool(segmentation)
        self.camera = camera
        self.env = robosuite.make(
            self.spec.env_name,
            robots="Panda",
            controller_configs=make_controller_config(),
            has_renderer=False,
            has_offscreen_renderer=False,  # we build the offscreen context ourselves, cheaper (_make_renderer)
            use_camera_obs=False,  # we render the one camera ourselves, once per step
            use_object_obs=False,  # privileged poses are read straight from the sim
            reward_shaping=False,
            control_freq=CONTROL_FREQ,
            ignore_done=True,  # the harness owns the horizon
            hard_reset=False,  # reset the sim in place: much faster, and reseeding stays in our hands
            seed=0,
            **dict(self.spec.env_kwargs),
        )
        self.robot = self.env.robots[0]
        self._make_renderer()
        self._object_bodies = self._find_object_bodies()
        self._target_geoms = self._geoms_of(self.spec.target)
        self.steps = 0

    # --- setup helpers

    def _make_renderer(self) -> None:
        """An offscreen context that is cheap on a CPU (Mesa llvmpipe): a framebuffer the size of the image, no MSAA,
        no floor reflection, no sites. Measured at 64 px: ~66 ms -> ~17 ms per RGB frame, and the env builds ~1 s
        faster than with robosuite's own 640x480 4x-MSAA context; the picture barely changes."""
        import mujoco
        from robosuite.utils.binding_utils import MjRenderContextOffscreen

        n, m = self.image_size, self.env.sim.model._model
        m.vis.global_.offwidth = m.vis.global_.offheight = n
        m.vis.quality.offsamples = 0
        ctx = MjRenderContextOffscreen(self.env.sim, device_id=-1, max_width=n, max_height=n)
        ctx.vopt.geomgroup[0] = 0  # collision geoms hidden, visual geoms shown: robosuite's defaults
        ctx.vopt.geomgroup[1] = 1
        ctx.vopt.sitegroup[:] = 0  # sites are markers: invisible in RGB, but they would cover geoms in segmentation
        ctx.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0

    def _find_object_bodies(self) -> dict[str, int]:
        """Root body id of every task object (visual goal markers included), keyed by robosuite object name."""
        model = self.env.model
        objects = list(getattr(model, "mujoco_objects", []) or [])
        return {obj.name: self.env.sim.model.body_name2id(obj.root_body) for obj in objects}

    def _geoms_of(self, object_name: str) -> np.ndarray:
        """Geom ids of every geom in the body subtree of ``object_name`` (what segmentation reports for it)."""
        m = self.env.sim.model._model
        root = self._object_bodies[object_name]
        in_subtree = np.zeros(m.nbody, bool)
        for b in range(m.nbody):  # parents precede children in MuJoCo's body order
            in_subtree[b] = b == root or (b > 0 and in_subtree[m.body_parentid[b]])
        return np.flatnonzero(in_subtree[m.geom_bodyid])

    def _reseed(self, seed: int) -> None:
        """Point robosuite's rng (robot init noise) and every placement sampler at a fresh generator for ``seed``."""
        rng = np.random.default_rng(int(seed))
        self.env.rng = rng
        samplers = [self.env.placement_initializer]
        while samplers:
            s = samplers.pop()
            s.rng = rng
            samplers.extend(getattr(s, "samplers", {}).values())

    # --- the interface

    def reset(self, seed: int) -> dict:
        """Reset to the initial scene of ``seed`` (same seed -> same scene) and return the first observation."""
        self._reseed(seed)
        self.env.reset()
        self.steps = 0
        return self.observe()

    def step(self, action) -> tuple[dict, bool]:
        """Apply one schema action (float32[7]) for one control step; return the new observation and success."""
        self.env.step(to_robosuite_action(action))
        self.steps += 1
        return self.observe(), self.success()

    @property
    def max_steps(self) -> int:
        """The task's evaluation horizon (the harness may override it)."""
        return self.spec.max_steps

    def success(self) -> bool:
        """The environment's own success test."""
        return bool(self.env._check_success())

    def close(self) -> None:
        self.env.close()

    # --- observations

    def render(self, segmentation: bool = False) -> np.ndarray:
        """The policy camera, upright: RGB uint8 HxWx3, or when ``segmentation`` HxW int geom ids (-1: no geom)."""
        n = self.image_size
        out = self.env.sim.render(camera_name=self.camera, width=n, height=n, depth=False, segmentation=segmentation)
        out = out[::-1]  # MuJoCo's OpenGL buffer is bottom-up; row 0 must be the top of the picture
        if segmentation:  # channels: MuJoCo object type, object id
            out = np.where(out[..., 0] == _MJOBJ_GEOM, out[..., 1], -1)
        return np.ascontiguousarray(out)

    def pixel_of(self, pos) -> np.ndarray:
        """(row, col) in the upright image where world point ``pos`` projects (pinhole model of the camera)."""
        model, data = self.env.sim.model, self.env.sim.data
        cam = model.camera_name2id(self.camera)
        R = data.cam_xmat[cam].reshape(3, 3)  # columns: camera x (right), y (up), z (backwards) in world
        p = R.T @ (np.asarray(pos, dtype=np.float64) - data.cam_xpos[cam])
        n = self.image_size
        f = (n / 2) / np.tan(np.deg2rad(model.cam_fovy[cam]) / 2)
        return np.array([n / 2 - f * p[1] / -p[2], n / 2 + f * p[0] / -p[2]]) - 0.5

    def target_mask(self) -> np.ndarray:
        """uint8 HxW, 255 where a geom of the target object is the visible surface."""
        ids = self.render(segmentation=True)
        return np.where(np.isin(ids, self._target_geoms), 255, 0).astype(np.uint8)

    def state(self) -> np.ndarray:
        """float32[8]: eef xyz, eef roll/pitch/yaw, 0, gripper opening in [0, 1] (1 = open)."""
        data = self.env.sim.data
        site = self.robot.eef_site_id["right"]
        q = data.qpos[self.robot._ref_gripper_joint_pos_indexes["right"]]
        opening = np.clip((q[0] - q[1]) / 0.08, 0.0, 1.0)  # Panda fingers: [0, 0.04] and [-0.04, 0] metres
        s = np.zeros(STATE_DIM, np.float32)
        s[:3] = data.site_xpos[site]
        s[3:6] = mat2rpy(data.site_xmat[site])
        s[7] = opening
        return s

    def objects(self) -> list[dict]:
        """Privileged object records: name, role (target / goal / other) and world position (m). Visual-only
        markers count as objects (PickPlace's goal is one); objects parked outside the scene are left out."""
        records = []
        for name, body in self._object_bodies.items():
            role = "target" if name == self.spec.target else "goal" if name == self.spec.goal else "other"
            pos = self.env.sim.data.body_xpos[body]
            if pos[2] > 5.0:
                continue  # robosuite parks the unused objects of single-object mode at (10, 10, 10)
            records.append({"name": name, "role": role, "pos": [float(x) for x in pos]})
        return records

    def observe(self) -> dict:
        """The observation dict every policy reads (``objects`` is privileged: only scripted experts use it)."""
        obs = {
            "image": self.render(),
            "state": self.state(),
            "instruction": self.spec.instruction,
            "objects": self.objects(),
        }
        if self.segmentation:
            obs["target_mask"] = self.target_mask()
        return obs


def make_task(task: str, image_size: int = 64, segmentation: bool = True, camera: str = CAMERA) -> SimTask:
    """Build the wrapped robosuite task ``task`` (one of ``TASKS``)."""
    task_spec(task)  # fail fast, before robosuite is imported
    return SimTask(task, image_size=image_size, segmentation=segmentation, camera=camera)
