"""The privileged-state teacher: a fixed template filled from the current simulator state (offline, free).

Object positions relative to the gripper and its opening; no expert phase or timer. Deterministic, faithful by
construction, and short (a fixed vocabulary of ~40 words, the object names and integers 1..99; 30-45 words) so
that a tiny word-level model can learn to write it on a CPU.

Direction words follow robosuite's world frame (checked in robosuite 1.5.2: ``lift.py`` puts the robot base at
x = -0.16 - table_length / 2 = -0.56 m, the table at the origin, and ``table_arena.xml`` puts the frontview
camera at x = 1.6 m looking back at the robot): +x points from the robot base across the table ("ahead of"),
+y is the robot's left ("left of"), +z is up ("above"). Left and right are the robot's: the agentview and
frontview cameras look back at the robot, so the robot's left is on the right of their pictures.
"""
from __future__ import annotations

import re

import numpy as np
from tqdm import tqdm

from ..experts import GRASPED_OPENING
from ..schema import require_columns
from .faithfulness import check_faithfulness, summarise_faithfulness
from .frames import hash_inputs, load_objects, object_name, read_rows
from .rationale import Annotation, Rationale

#: Version of the privileged teacher's sentence template; bump it when a sentence changes.
TEMPLATE_VERSION = "privileged-v2"  # v2: the current state only (no expert phase)
AXIS_WORDS = (("ahead of", "behind"), ("left of", "right of"), ("above", "below"))  # (+, -) per x, y, z
MAX_CM = 99  # distances are small integers: the tiny model's vocabulary holds 0..99
HOLD_DISTANCE_M = 0.03  # the target counts as held when the gripper has closed on it and it is this close
CLOSED_OPENING = 0.8     # an opening below this is a closing (or closed) gripper
AT_DISTANCE_M = 0.015    # the gripper is "at" an object this close to it
ABOVE_XY_M = 0.015       # ... and "above" it when this close horizontally


def offset_words(offset_m) -> list[str]:
    """Each axis moved by at least 1 cm, in words: [+0.00, 0.04, -0.09] -> ["4 cm left of", "9 cm below"]."""
    words = []
    for axis, d in enumerate(offset_m):
        cm = int(round(abs(float(d)) * 100))
        if cm >= 1:
            words.append(f"{min(cm, MAX_CM)} cm {AXIS_WORDS[axis][0 if d > 0 else 1]}")
    return words


def describe_offset(name: str, offset_m) -> str:
    """"the red cube is 4 cm left of and 9 cm below the gripper" (offset = object - gripper, metres)."""
    words = offset_words(offset_m)
    return f"the {name} is {' and '.join(words)} the gripper" if words else f"the {name} is at the gripper"


_AXIS = {word: (axis, sign) for axis, pair in enumerate(AXIS_WORDS) for word, sign in zip(pair, (1, -1))}
_PHRASE = re.compile(r"(\d+) cm (" + "|".join(re.escape(w) for w in _AXIS) + ")")


def parse_offset(text: str | None) -> np.ndarray | None:
    """The offset in whole cm per axis (x, y, z) a sentence of ``describe_offset``'s grammar states: "the red cube is
    4 cm left of and 9 cm below the gripper" -> [0, 4, -9]; "... is at the gripper" -> zeros; None when it states
    neither (an empty or malformed answer). The one reader of that grammar: the grounding probe's answers and the
    spatial part of a rationale."""
    if not text:
        return None
    found = _PHRASE.findall(text)
    if not found:
        return np.zeros(3) if "at the gripper" in text else None
    cm = np.zeros(3)
    for value, word in found:
        axis, sign = _AXIS[word]
        cm[axis] = sign * int(value)
    return cm


def gripper_words(opening: float) -> str:
    """Gripper opening in [0, 1] (1 = open) in words."""
    return "an open gripper" if opening >= 0.7 else "a closed gripper" if opening <= 0.3 else "a half open gripper"


def privileged_rationale(state, objects, where: str = "row") -> Rationale:
    """Write the rationale of one frame from what the frame shows: the objects' positions relative to the gripper and
    the gripper's opening (schema `state`, `objects`); raise naming the field when `objects` is empty.

    Only the current state is read (no expert phase, timer or plan), so the same function describes any state a
    policy reaches in closed loop, and a rationale written at step t is true at step t. The situation and the plan
    follow from the geometry: far -> move above the target; above it -> descend; at it -> close; holding it ->
    lift it (or move it to the goal); closed and empty -> open. The instruction is not read: the target's role
    (the object the instruction names) says it all."""
    objects = load_objects(objects, where)
    if not objects:
        raise ValueError(f"{where}: the privileged teacher needs privileged object poses, but field 'objects' "
                         "is empty (e.g. LeRobot data); use teacher='http' for such data")
    target = next((o for o in objects if o["role"] == "target"), objects[0])
    goal = next((o for o in objects if o["role"] == "goal"), None)
    eef, opening = np.asarray(state, np.float64)[:3], float(state[7])
    offset = lambda o: np.asarray(o["pos"], np.float64) - eef
    t, g = object_name(target), object_name(goal) if goal else ""
    to_target = offset(target)
    closing, near = opening < CLOSED_OPENING, np.linalg.norm(to_target) < HOLD_DISTANCE_M
    held = opening < GRASPED_OPENING and near  # the condition on which the scripted experts lift

    shown = ([target] + ([goal] if goal else []) + [o for o in objects if o["role"] == "other"])[:2]
    observation = " and ".join([f"the {object_name(o)}" for o in shown] + [gripper_words(opening)])
    if held:
        situation, plan = f"holding the {t}", f"move the {t} to the {g}" if goal else f"lift the {t}"
    elif closing and near:
        situation, plan = f"closing on the {t}", "close the gripper"
    elif closing:
        situation, plan = "the gripper is closed and empty", "open the gripper"
    elif np.linalg.norm(to_target) < AT_DISTANCE_M:
        situation, plan = f"at the {t}", "close the gripper"
    elif np.linalg.norm(to_target[:2]) < ABOVE_XY_M and to_target[2] < 0:
        situation, plan = f"above the {t}", f"descend to the {t}"
    else:
        cm = min(MAX_CM, int(round(np.linalg.norm(to_target) * 100)))
        situation, plan = f"{cm} cm from the {t}", f"move above the {t}"
    spatial = describe_offset(g if held and goal else t, offset(goal if held and goal else target))
    return Rationale(observation=observation, situation_analysis=situation,
                     spatial_reasoning=spatial, task_planning=plan)


def run_privileged(demos, keys: list[int]) -> tuple[dict[int, Annotation], dict]:
    """Annotate the key frames from simulator state; the summary carries the faithfulness self-check."""
    require_columns(demos.column_names, ("objects",), where="demos (the privileged teacher reads 'objects')")
    cols = ["episode_index", "step_index", "state", "objects"]
    out, checks = {}, []
    for i, row in tqdm(read_rows(demos, keys, cols, 256), total=len(keys), desc="annotate (privileged)",
                       mininterval=0.5):
        where = f"row {i} (episode {row['episode_index']}, step {row['step_index']})"
        r = privileged_rationale(row["state"], row["objects"], where)
        h = hash_inputs("privileged", TEMPLATE_VERSION, np.asarray(row["state"], np.float32),
                        load_objects(row["objects"]))
        out[i] = Annotation(r, "privileged", "privileged-state", TEMPLATE_VERSION, h)
        checks.append(check_faithfulness(r, row["objects"], row["state"]))
    summary = {"teacher": "privileged", "requests_sent": 0, "cost_usd": 0.0, "failed": 0,
               "faithfulness": summarise_faithfulness(checks)}
    return out, summary
