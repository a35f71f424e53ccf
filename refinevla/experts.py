"""Scripted experts: pick-and-place state machines driven by privileged object positions.

Each expert implements the Policy protocol of ``refinevla.policy`` (``reset(instruction)``, ``act(obs)``) and reads
only ``obs["objects"]`` (world positions with roles target / goal) and ``obs["state"]`` (the end-effector). Every
action is a P-control step on a position error, with zero rotation, and a gripper command in the schema convention
(1 = open). After each ``act`` the attribute ``phase`` names the phase that produced the action, so the data stage
can record it and the teacher can write the task-planning part of a rationale from it.

One state machine serves all three tasks; a task only changes the heights and whether there is a place to go:

    approach -> descend -> grasp -> lift [-> move -> place -> release -> retreat]

A grasp that slips (the target drifts away from the gripper while carrying it) sends the machine back to approach.

Measured (robosuite 1.5.2, 64 px, held-out seeds 10_000-10_024, through ``refinevla.evaluate``): 25/25 on each of
lift (~30 steps), stack (~58 steps) and pick_place_can (~119 steps).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .schema import ACTION_DIM

OPEN, CLOSED = 1.0, 0.0
#: a Panda gripper opening (1 = open) below which the fingers hold a 4-5 cm cube: the experts lift then, the teacher
#: says "holding" then (both read the same observable condition)
GRASPED_OPENING = 0.66


@dataclass(frozen=True)
class ExpertConfig:
    """Heights in metres, relative to the object the phase is about unless marked absolute."""

    hover: float = 0.08  # approach this far above the target
    grasp_dz: float = 0.0  # grasp height relative to the target's body position
    grasp_steps: int = 8  # steps the gripper is closed before lifting (when grasp_opening is None)
    #: lift as soon as the gripper opening falls below this (it has closed on the object): a condition the policy can
    #: see in its state, where a step count is a hidden timer no memoryless policy can follow; None = grasp_steps
    grasp_opening: float | None = None
    lift_z: float = 1.0  # absolute carry height (table top is at ~0.8 m)
    place_dz: float | None = None  # release height of the target above the goal; None = a lift-only task
    release_steps: int = 6  # steps the gripper is opened before retreating
    gain: float = 20.0  # action = clip(gain * error_in_metres, -1, 1); the OSC maps 1 -> 5 cm
    tol: float = 0.01  # position tolerance that ends approach / descend / move / place
    slip: float = 0.04  # target farther than this from the gripper while carrying = lost grasp
    phase_timeout: int = 60  # steps after which a phase gives up waiting and moves on


EXPERT_CONFIGS: dict[str, ExpertConfig] = {
    "lift": ExpertConfig(lift_z=0.95, grasp_opening=GRASPED_OPENING),
    # the lift expert on whichever cube the instruction names (a 4 cm cube leaves an opening of 0.5, a 5 cm one 0.62)
    "pick_cube": ExpertConfig(lift_z=0.95, grasp_opening=GRASPED_OPENING),
    # cubeA (half size 2 cm) released with its centre 5.5 cm above cubeB's centre (half size 2.5 cm)
    "stack": ExpertConfig(lift_z=0.93, place_dz=0.055, grasp_opening=GRASPED_OPENING),
    # the can's body origin is 6 cm above its bottom and the bin walls top out at 0.90 m: carry it at 1.0 m, then
    # lower it to 6 cm above the goal marker (its bottom then inside the compartment) and let go
    "pick_place_can": ExpertConfig(lift_z=1.0, place_dz=0.06),
}


def _find(objects: list[dict], role: str) -> np.ndarray | None:
    """Position of the first object with ``role`` (or None)."""
    for o in objects:
        if o["role"] == role:
            return np.asarray(o["pos"], dtype=np.float64)
    return None


class ScriptedExpert:
    """approach -> descend -> grasp -> lift [-> move -> place -> release -> retreat], P-control on position."""

    def __init__(self, config: ExpertConfig, seed: int = 0):
        self.cfg = config
        self.rng = np.random.default_rng(seed)  # unused by the deterministic script; kept for noisy variants
        self.reset("")

    def reset(self, instruction: str) -> None:
        self.instruction = instruction
        self.phase = "approach"
        self._steps_in_phase = 0

    def _go(self, phase: str) -> None:
        self.phase, self._steps_in_phase = phase, 0

    def _action(self, error: np.ndarray, gripper: float) -> np.ndarray:
        a = np.zeros(ACTION_DIM, np.float32)
        a[:3] = np.clip(self.cfg.gain * error, -1.0, 1.0)
        a[6] = gripper
        return a

    def act(self, obs: dict) -> np.ndarray:
        """One action from the privileged state; updates ``phase`` to the phase of this action."""
        cfg = self.cfg
        eef = np.asarray(obs["state"][:3], dtype=np.float64)
        self._opening = float(obs["state"][7])
        target = _find(obs["objects"], "target")
        goal = _find(obs["objects"], "goal")
        if target is None or (goal is None and self.cfg.place_dz is not None):
            raise ValueError(f"scripted expert needs privileged objects with a target (and goal) role, got "
                             f"{[o.get('role') for o in obs.get('objects', [])]}")
        self._transition(eef, target, goal)
        self._steps_in_phase += 1
        p = self.phase
        if p == "approach":
            return self._action(target + [0, 0, cfg.hover] - eef, OPEN)
        if p == "descend":
            return self._action(target + [0, 0, cfg.grasp_dz] - eef, OPEN)
        if p == "grasp":
            return self._action(target + [0, 0, cfg.grasp_dz] - eef, CLOSED)
        if p == "lift":
            return self._action(np.array([*target[:2], cfg.lift_z]) - eef, CLOSED)
        if p == "move":  # steer the held object (not the hand) over the goal, at carry height
            return self._action(np.array([*(goal[:2] - target[:2]), cfg.lift_z - eef[2]]), CLOSED)
        if p == "place":
            return self._action(goal + [0, 0, cfg.place_dz] - target, CLOSED)
        if p == "release":
            return self._action(np.zeros(3), OPEN)
        # retreat: straight up, open
        return self._action(np.array([0.0, 0.0, cfg.lift_z + 0.05 - eef[2]]), OPEN)

    def _transition(self, eef: np.ndarray, target: np.ndarray, goal: np.ndarray | None) -> None:
        """Advance the phase when its condition holds (or it timed out); fall back to approach on a lost grasp."""
        cfg, p, n = self.cfg, self.phase, self._steps_in_phase
        timeout = n >= cfg.phase_timeout
        carrying = p in ("lift", "move", "place")
        if carrying and np.linalg.norm(target - eef) > cfg.slip:
            self._go("approach")
        elif p == "approach":
            err = target + [0, 0, cfg.hover] - eef
            if (np.linalg.norm(err[:2]) < cfg.tol and abs(err[2]) < 2 * cfg.tol) or timeout:
                self._go("descend")
        elif p == "descend":
            if np.linalg.norm(target + [0, 0, cfg.grasp_dz] - eef) < cfg.tol or timeout:
                self._go("grasp")
        elif p == "grasp":
            closed = self._opening < cfg.grasp_opening if cfg.grasp_opening is not None else n >= cfg.grasp_steps
            if closed or timeout:
                self._go("lift")
        elif p == "lift":
            if cfg.place_dz is not None and eef[2] > cfg.lift_z - 2 * cfg.tol:
                self._go("move")
        elif p == "move":  # a carried object sways: 2 x tol is close enough, place corrects the rest
            if np.linalg.norm(goal[:2] - target[:2]) < 2 * cfg.tol or timeout:
                self._go("place")
        elif p == "place":
            if np.linalg.norm(goal + [0, 0, cfg.place_dz] - target) < cfg.tol or timeout:
                self._go("release")
        elif p == "release":
            if n >= cfg.release_steps:
                self._go("retreat")


def make_expert(task: str, seed: int = 0) -> ScriptedExpert:
    """The scripted expert for ``task`` (a key of ``refinevla.sim.TASKS``)."""
    if task not in EXPERT_CONFIGS:
        raise ValueError(f"no scripted expert for task {task!r}; known tasks: {sorted(EXPERT_CONFIGS)}")
    return ScriptedExpert(EXPERT_CONFIGS[task], seed=seed)


class ExpertPolicy:
    """The scripted expert of whichever task the instruction names: one Policy object for every task.

    The evaluation harness builds one policy per worker and gives it episodes of several tasks; this dispatches on
    ``reset(instruction)`` to the right task's state machine.
    """

    def __init__(self, seed: int = 0):
        from .sim import TASKS

        self.by_instruction = {}  # lift and pick_cube share "pick up the red cube" and the expert config
        for task, spec in TASKS.items():
            if task in EXPERT_CONFIGS:
                for _, instruction in spec.choices or ((spec.target, spec.instruction),):
                    self.by_instruction.setdefault(instruction, task)
        self.seed = seed
        self.expert: ScriptedExpert | None = None

    def reset(self, instruction: str) -> None:
        if instruction not in self.by_instruction:
            raise ValueError(f"no scripted expert for instruction {instruction!r}; known: {sorted(self.by_instruction)}")
        self.expert = make_expert(self.by_instruction[instruction], seed=self.seed)
        self.expert.reset(instruction)

    def act(self, obs: dict) -> np.ndarray:
        return self.expert.act(obs)

    @property
    def phase(self) -> str:
        return self.expert.phase if self.expert is not None else ""
