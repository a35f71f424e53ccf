"""Faithfulness: does a rationale name the right target and state directions that agree with privileged state?

Directions follow robosuite's world frame (see refinevla/teacher/privileged.py): +x ahead of the robot base, +y the
robot's left, +z up.
"""
from __future__ import annotations

import re

import numpy as np

from ..schema import RATIONALE_PARTS, require_columns
from .frames import load_objects, object_name
from .rationale import as_rationale

TOLERANCE_M = 0.02  # an axis closer than this is not judged (the direction is ambiguous)
DIRECTION_PATTERNS = {  # phrase -> (axis, sign) in the robosuite frame; whole words only
    r"ahead|in front|forward|farther from the robot": (0, 1), r"behind|closer to the robot": (0, -1),
    r"left": (1, 1), r"right": (1, -1), r"above|higher": (2, 1), r"below|beneath|under": (2, -1),
}


def name_patterns(objects: list[dict]) -> list[tuple[str, dict]]:
    """Regexes that name each object: its full name, and its last word ("cube" for "red cube") when no
    other object shares that word. Longest first, so "yellow cube" wins over "cube"."""
    heads = [object_name(o).split()[-1] for o in objects]
    out = []
    for o, head in zip(objects, heads):
        for alias in {object_name(o)} | ({head} if heads.count(head) == 1 else set()):
            out.append((rf"\b{re.escape(alias)}\b", o))
    return sorted(out, key=lambda po: -len(po[0]))


def check_faithfulness(rationale, objects, state) -> dict:
    """Compare a rationale with privileged state: is the true target named (any part), and does every clause
    of the spatial part that names a known object state directions that agree with that object's offset
    from the gripper (axes within TOLERANCE_M are not judged; "at the gripper" needs every axis within it)?
    A heuristic on plain words: a teacher that says "block" for "cube" counts as not naming it."""
    r, objects = as_rationale(rationale), load_objects(objects)
    eef = np.asarray(state, np.float64)[:3]
    names = name_patterns(objects)
    text = " ".join(getattr(r, p) for p in RATIONALE_PARTS).lower()
    target = next((o for o in objects if o["role"] == "target"), None)
    target_named = any(o is target and re.search(p, text) for p, o in names)
    clauses, consistent = 0, True
    for clause in re.split(r"[.;\n]|, and |, but ", r.spatial_reasoning.lower()):
        hits = [(m.start(), o) for p, o in names for m in [re.search(p, clause)] if m]
        if not hits:
            continue
        d = np.asarray(min(hits, key=lambda h: h[0])[1]["pos"], np.float64) - eef  # the clause's subject
        said = [ax_sign for pat, ax_sign in DIRECTION_PATTERNS.items() if re.search(rf"\b(?:{pat})\b", clause)]
        if said:
            clauses += 1
            consistent &= all(abs(d[ax]) < TOLERANCE_M or np.sign(d[ax]) == s for ax, s in said)
        elif re.search(r"\bat the gripper\b|\bin the gripper\b", clause):
            clauses += 1
            consistent &= bool(np.all(np.abs(d) < TOLERANCE_M))
    direction_agrees = clauses > 0 and consistent
    return {"target_named": bool(target_named), "direction_agrees": bool(direction_agrees),
            "agrees": bool(target_named and direction_agrees)}


def summarise_faithfulness(checks: list[dict]) -> dict:
    """Rates over a list of check_faithfulness results (None when nothing was checked)."""
    n = len(checks)
    rate = lambda k: (sum(c[k] for c in checks) / n) if n else None
    return {"checked": n, "agreement_rate": rate("agrees"), "target_named_rate": rate("target_named"),
            "direction_rate": rate("direction_agrees")}


def agreement_rate(ds) -> dict:
    """Faithfulness of an annotated dataset's key frames (rows whose rationale was written for them)."""
    require_columns(ds.column_names, ("rationale", "objects", "state", "step_index", "rationale_source_step"),
                    where="annotated dataset")
    cols = ds.select_columns(["rationale", "objects", "state", "step_index", "rationale_source_step"])[:]
    checks = [check_faithfulness(r, o, s) for r, o, s, st, src in zip(*cols.values())
              if st == src and load_objects(o)]
    return summarise_faithfulness(checks)
