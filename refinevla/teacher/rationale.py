"""The paper's four-part rationale: its schema, its single-line text form and where an annotation came from.

The bottom of the teacher package: every teacher writes a `Rationale`, the training target is its rendered text,
and a policy's generated text is parsed back with `parse_rationale_text`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from ..schema import RATIONALE_PARTS

#: Labels of the four parts in the single-line training target, in RATIONALE_PARTS order.
PART_LABELS = {"observation": "OBSERVATION:", "situation_analysis": "SITUATION:",
               "spatial_reasoning": "SPATIAL:", "task_planning": "PLAN:"}
MAX_PART_CHARS = 300  # a teacher that writes an essay per part is asked to repair it


def part(description: str):
    return Field(min_length=1, max_length=MAX_PART_CHARS, description=description)


class Rationale(BaseModel):
    """The paper's four-part rationale. Field names are schema.RATIONALE_PARTS (checked below)."""
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    observation: str = part("what is in the scene")
    situation_analysis: str = part("where the task stands")
    spatial_reasoning: str = part("where the object is relative to the gripper")
    task_planning: str = part("the next sub-goal")


assert tuple(Rationale.model_fields) == RATIONALE_PARTS, "Rationale fields must follow schema.RATIONALE_PARTS"


@dataclass
class Annotation:
    """One key frame's rationale and where it came from (the columns the annotate stage adds)."""
    rationale: Rationale
    teacher: str
    teacher_model: str
    prompt_version: str
    input_hash: str


def as_rationale(r) -> Rationale:
    """Accept a Rationale, a dict of the four parts or its JSON string (the dataset's `rationale` column)."""
    if isinstance(r, Rationale):
        return r
    if isinstance(r, str):
        return Rationale.model_validate_json(r)
    return Rationale.model_validate(r)


def render_rationale(r, parts=RATIONALE_PARTS) -> str:
    """The single-line training target: "OBSERVATION: ... SITUATION: ... SPATIAL: ... PLAN: ..." (``parts``: a subset
    of the four, in their order, e.g. for the ablation that drops one part)."""
    r = as_rationale(r)
    return " ".join(f"{PART_LABELS[p]} {' '.join(getattr(r, p).split())}" for p in RATIONALE_PARTS if p in parts)


def parse_rationale_text(text: str) -> Rationale | None:
    """Inverse of render_rationale (e.g. for a policy's generated text); None when a label is missing."""
    # labels in any case and with the colon split off, as a word-level tokenizer gives them back ("observation :")
    labels = {p: re.escape(PART_LABELS[p][:-1]) + r"\s*:" for p in RATIONALE_PARTS}
    pattern = r"\s*".join(f"{labels[p]}(?P<{p}>.*?)" for p in RATIONALE_PARTS) + r"\s*$"
    m = re.match(r"\s*" + pattern, text, flags=re.S | re.I)
    if m is None:
        return None
    try:
        return Rationale(**{p: m.group(p).strip() for p in RATIONALE_PARTS})
    except ValueError:
        return None
