"""Open-loop checks on held-out frames, read before any closed-loop comparison.

A reasoning policy acts on the rationale it writes: if it cannot write the teacher's rationale for frames it never
trained on, its closed-loop result says little about reasoning. ``rationale_accuracy`` decodes the rationale of
held-out frames greedily and compares it, part by part, with the teacher's:

    table = rationale_accuracy("data/default/train/refinevla/seed0/model", heldout_frames, n=40)

The gate (``gate``) passes when the spatial part, the one that carries what the action needs (where the named object
is relative to the gripper), names the right object with every axis within 1 cm on at least ``min_spatial`` of the
frames.

The open-loop action errors (``open_loop_errors``, ``open_loop_table``) score the action a model decodes on a frame
against the expert's, after the model's own rationale and after the teacher's; the attention stage computes them
over its frames (attention/frames.csv).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .schema import RATIONALE_PARTS


def _parts(text: str) -> dict:
    from .teacher import parse_rationale_text

    parsed = parse_rationale_text(text)
    return {p: (getattr(parsed, p) if parsed else None) for p in RATIONALE_PARTS}


def rationale_accuracy(model_dir, frames, n: int = 40, seed: int = 0) -> pd.DataFrame:
    """Per held-out frame: the model's greedy rationale, the teacher's, and whether each part matches exactly."""
    from .policy import load_policy
    from .teacher.privileged import parse_offset

    policy = load_policy(model_dir, reasoning=True)
    pick = np.random.default_rng(seed).choice(len(frames), size=min(n, len(frames)), replace=False)
    rows = []
    for i in sorted(int(i) for i in pick):
        row = frames[i]
        text, _ = policy.predict(np.asarray(row["image"]), row["instruction"], row["state"], reasoning=True)
        # the teacher's text as the model's tokenizer writes it back (lower case, labels split): compared like for like
        reference = policy.tok.decode_text(policy.tok.text_ids(row["rationale_text"]))
        mine, teacher = _parts(text), _parts(reference)
        rec = {"frame": i, "model": text, "teacher": reference, "well_formed": mine["observation"] is not None}
        rec.update({p: mine[p] is not None and mine[p] == teacher[p] for p in RATIONALE_PARTS})
        rec["all_parts"] = all(rec[p] for p in RATIONALE_PARTS)
        a, b = parse_offset(mine["spatial_reasoning"]), parse_offset(teacher["spatial_reasoning"])
        rec["spatial_within_1cm"] = a is not None and b is not None and bool(np.abs(a - b).max() <= 1) \
            and mine["spatial_reasoning"].split(" is ")[0] == teacher["spatial_reasoning"].split(" is ")[0]
        rows.append(rec)
    return pd.DataFrame(rows)


def accuracy_summary(per_frame: pd.DataFrame) -> pd.Series:
    """Share of held-out frames with a well-formed rationale, each part right, and all parts right."""
    cols = ["well_formed", *RATIONALE_PARTS, "spatial_within_1cm", "all_parts"]
    return per_frame[cols].mean().rename("share of held-out frames")


def gate(per_frame: pd.DataFrame, min_spatial: float = 0.5) -> tuple[bool, str]:
    """(passed, sentence): is the rationale good enough for a closed-loop comparison to say something about it?"""
    share = float(per_frame["spatial_within_1cm"].mean()) if len(per_frame) else 0.0
    ok = share >= min_spatial
    return ok, (f"The spatial part of the rationale names the right cube with every axis within 1 cm on "
                f"{100 * share:.0f}% of {len(per_frame)} held-out frames "
                + ("(gate passed: at least " if ok else "(gate NOT passed: below ")
                + f"{100 * min_spatial:.0f}%); "
                + ("the closed-loop comparison tests a policy that can write its rationale." if ok else
                   "the closed-loop result of the reasoning arm says little about reasoning."))


# ------------------------------------------------------------------------------------ open-loop action errors
def action_errors(tok, action_ids, expert_action, prefix: str = "") -> dict:
    """How far a decoded action is from the expert's, in bins: the mean |bin difference| over the six arm
    dimensions, and whether the gripper command agrees (open vs close)."""
    expert = np.asarray(expert_action, np.float32)
    diff = np.abs(tok.ids_to_bins(action_ids)[:6] - tok.ids_to_bins(tok.action_to_ids(expert))[:6])  # first action
    gripper = tok.ids_to_actions(list(action_ids))[0, 6] > 0.5  # the first action of a chunk
    return {f"{prefix}arm_bin_error": float(diff.mean()),
            f"{prefix}gripper_agrees": bool(gripper == (float(expert_action[6]) > 0.5))}


def teacher_forced_errors(model, tok, frame: dict, max_rationale_tokens: int) -> dict:
    """The action a reasoning model takes after the *teacher's* rationale instead of its own, scored against
    the expert: it separates what the action head learned from what the model's own rationale costs."""
    from .policy import VLAPolicy

    forced = tok.text_ids(frame["rationale_text"])
    policy = VLAPolicy(model, tok, reasoning=True, max_rationale_tokens=max_rationale_tokens)
    _, action_ids = policy.generate_ids(frame["image"], frame["instruction"], frame["state"], rationale_ids=forced)
    return action_errors(tok, action_ids, frame["action"], prefix="teacher_rationale_")




def open_loop_table(per_frame) -> "pd.DataFrame":
    """Per model and task, the open-loop action errors of frames.csv: mean arm bin error and gripper agreement
    with the model's own rationale (or none), and, for reasoning models, after the teacher's rationale."""
    import pandas as pd

    cols = [c for c in ("arm_bin_error", "gripper_agrees", "teacher_rationale_arm_bin_error",
                        "teacher_rationale_gripper_agrees") if c in per_frame]
    if not cols:
        return pd.DataFrame()
    as_float = lambda v: v.replace({"": np.nan, "True": 1.0, "False": 0.0}).astype(float)  # also as read with
    frames = per_frame.assign(**{c: as_float(per_frame[c]) for c in cols})  # keep_default_na=False
    frames = pd.concat([frames, frames.assign(task="(all)")])
    grouped = frames.groupby(["model", "task"], sort=True)
    return pd.concat([grouped.size().rename("n_frames"), grouped[cols].mean().round(3)], axis=1)


def open_loop_errors(model, tok, frame: dict, action_ids, reasoning: bool, max_rationale_tokens: int) -> dict:
    """The frame's open-loop columns: the decoded action's errors (``action_errors``), and for a reasoning model
    with a teacher rationale, the errors after that rationale (``teacher_forced_errors``)."""
    errors = action_errors(tok, action_ids, frame["action"])
    if reasoning and frame.get("rationale_text"):
        errors.update(teacher_forced_errors(model, tok, frame, max_rationale_tokens))
    return errors
