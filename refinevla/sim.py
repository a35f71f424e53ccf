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

from .geometry import matrix_to_euler
from .schema import ACTION_DIM, SPLITS, STATE_DIM


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
    #: (target object, instruction) alternatives: the episode seed picks one (seed % len), so the instruction
    #: selects the target among the other objects; empty = always ``target`` / ``instruction``
    choices: tuple = ()
    success: str = "env"  # "env": the environment's own test; "lifted": the target 4 cm above the table
    #: "sides": the first two objects on opposite sides of the table centre (y = +-6 cm, +-2 cm of jitter in x and
    #: y), which one on the left drawn from the seed; "" = the environment's own placement
    layout: str = ""
    #: plain names of the task's objects (robosuite name -> words the instruction and the teacher use)
    names: tuple = ()

    def choice(self, seed: int) -> tuple[str, str]:
        """(target object, instruction) of the episode with this seed."""
        return self.choices[int(seed) % len(self.choices)] if self.choices else (self.target, self.instruction)


#: Horizons are about 2-4x the scripted expert's episode length (lift ~30, stack ~60, pick_place_can ~120 steps),
#: room for a hesitant learned policy without paying for hopeless episodes.
TASKS: dict[str, TaskSpec] = {
    "lift": TaskSpec("Lift", "pick up the red cube", max_steps=120, target="cube", names=(("cube", "red cube"),)),
    # Stack's two cubes (red 4 cm, green 5 cm) on opposite sides of the table, 12 cm apart (+-2 cm): the instruction
    # names the one to lift, the other is a distractor. Seeds cycle through the four cases: even seeds ask for the red
    # cube, odd ones for the green; (seed // 2) % 2 says which cube is on the robot's left
    "pick_cube": TaskSpec("Stack", "pick up the red cube", max_steps=80, target="cubeA", success="lifted",
                          choices=(("cubeA", "pick up the red cube"), ("cubeB", "pick up the green cube")),
                          layout="sides", names=(("cubeA", "red cube"), ("cubeB", "green cube"))),
    "stack": TaskSpec("Stack", "stack the red cube on the green cube", max_steps=200, target="cubeA", goal="cubeB",
                      names=(("cubeA", "red cube"), ("cubeB", "green cube"))),
    # single-object PickPlace: the can starts in the left bin; its compartment in the right bin is the one nearest
    # the camera on the right, marked by the VisualCan marker (success: the can inside it, gripper moved away)
    "pick_place_can": TaskSpec("PickPlaceCan", "put the can in the front right compartment of the right bin",
                               max_steps=250, target="Can", goal="VisualCan"),
}

#: the policy camera: the wrist camera sees the cubes large and centred on the gripper at every step (the agentview
#: camera, ~1.5 cm per pixel at 64 px, leaves the policy 2-3 cm off at the grasp)
CAMERA = "robot0_eye_in_hand"
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


def has_state(task: str, backend: str | None = None) -> bool:
    """Every robosuite task observes the real end-effector pose and the measured gripper opening."""
    return True


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

    def __init__(self, task: str, image_size: int = 64, segmentation: bool = True, camera: str = CAMERA,
                 split: str = "in_distribution"):
        import logging

        import robosuite

        logging.getLogger("robosuite_logs").setLevel(logging.WARNING)  # one INFO line per env build otherwise
        self.name = task
        self.spec = task_spec(task)
        self.image_size = int(image_size)
        self.segmentation = bool(segmentation)
        self.camera = camera
        self.split = split
        self.target, self.instruction = self.spec.choice(0)
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
        self._target_geoms = self._geoms_of(self.target)
        self._layouts = self._side_samplers() if self.spec.layout == "sides" else []
        self._scenes = None
        if split != "in_distribution":
            from .scenes import SceneVariants

            self._scenes = SceneVariants(self, camera)
        self.steps = 0
        self.scene: dict = {}

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

    def _side_samplers(self) -> list:
        """Two placements of the task's first two objects: the first on the robot's left and the second on its right,
        and the other way round (robosuite's own samplers, one per object, each in its own range)."""
        from robosuite.utils.placement_samplers import SequentialCompositeSampler, UniformRandomSampler

        objects = list(self.env.model.mujoco_objects)[:2]
        layouts = []
        for signs in ((1, -1), (-1, 1)):
            composite = SequentialCompositeSampler(name="ObjectSampler")
            for obj, sign in zip(objects, signs):
                composite.append_sampler(UniformRandomSampler(
                    name=f"{obj.name}Sampler", mujoco_objects=obj, x_range=[-0.02, 0.02],
                    y_range=sorted([sign * 0.04, sign * 0.08]), rotation=0.0, ensure_object_boundary_in_range=False,
                    ensure_valid_placement=True, reference_pos=self.env.table_offset, z_offset=0.01))
            layouts.append(composite)
        return layouts

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
        if self._layouts:
            self.env.placement_initializer = self._layouts[(int(seed) // 2) % len(self._layouts)]
        self._reseed(seed)
        target, self.instruction = self.spec.choice(seed)
        if target != self.target:
            self.target, self._target_geoms = target, self._geoms_of(target)
        self.env.reset()
        if self._scenes is not None:  # the variant split: textures, lighting and camera drawn from the seed
            self.scene = self._scenes.apply(self.split, seed)
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
        """The environment's own success test, or for "lifted" tasks: the target 4 cm above the table top."""
        if self.spec.success == "lifted":
            z = self.env.sim.data.body_xpos[self._object_bodies[self.target]][2]
            return bool(z > self.env.model.mujoco_arena.table_offset[2] + 0.04)
        return bool(self.env._check_success())

    def close(self) -> None:
        self.env.close()

    # --- observations

    def render(self, segmentation: bool = False) -> np.ndarray:
        """The policy camera, upright: RGB uint8 HxWx3, or when ``segmentation`` HxW int geom ids (-1: no geom)."""
        n = self.image_size
        # several tasks in one process (an evaluation worker's split x task envs) each own a GL context: draw through
        # this one, not whichever was made current last
        self.env.sim._render_context_offscreen.gl_ctx.make_current()
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
        s[3:6] = matrix_to_euler(data.site_xmat[site])  # R = Rz(yaw) Ry(pitch) Rx(roll)
        s[7] = opening
        return s

    def objects(self) -> list[dict]:
        """Privileged object records: name (the task's plain name for it, else robosuite's), role (target / goal /
        other) and world position (m). Visual-only markers count as objects (PickPlace's goal is one); objects parked
        outside the scene are left out."""
        records, plain = [], dict(self.spec.names)
        for name, body in self._object_bodies.items():
            role = "target" if name == self.target else "goal" if name == self.spec.goal else "other"
            pos = self.env.sim.data.body_xpos[body]
            if pos[2] > 5.0:
                continue  # robosuite parks the unused objects of single-object mode at (10, 10, 10)
            records.append({"name": plain.get(name, name), "role": role, "pos": [float(x) for x in pos]})
        return records

    def observe(self) -> dict:
        """The observation dict every policy reads (``objects`` is privileged: only scripted experts use it)."""
        obs = {
            "image": self.render(),
            "state": self.state(),
            "instruction": self.instruction,
            "objects": self.objects(),
        }
        if self.segmentation:
            obs["target_mask"] = self.target_mask()
        return obs


def make_task(task: str, image_size: int = 64, segmentation: bool = True, camera: str = CAMERA,
              split: str = "in_distribution") -> SimTask:
    """Build the wrapped robosuite task ``task`` (one of ``TASKS``); ``split`` "variant" draws each episode's scene
    (textures, lighting, camera) from its seed (``refinevla.scenes``), "in_distribution" keeps the default scene."""
    task_spec(task)  # fail fast, before robosuite is imported
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known splits: {list(SPLITS)}")
    return SimTask(task, image_size=image_size, segmentation=segmentation, camera=camera or CAMERA, split=split)


def split_examples(ecfg, n: int = 3) -> tuple[list, list]:
    """The first frame of the first ``n`` evaluation episodes of each split of an EvaluateConfig, as the policy sees
    them, with a title each (split, seed, instruction); prints what each split changes."""
    from .scenes import describe_split

    images, titles = [], []
    for split in ecfg.splits:
        env = make_task(ecfg.tasks[0], image_size=ecfg.image_size, segmentation=False, camera=ecfg.camera, split=split)
        for seed in ecfg.seed_list(split)[:n]:
            obs = env.reset(seed)
            images.append(obs["image"])
            titles.append(f"{split.replace('_', ' ')}, seed {seed}\n{obs['instruction']}")
        env.close()
        print(f"{split}: {describe_split(split)}")
    return images, titles
