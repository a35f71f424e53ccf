"""The row schema shared by both scales (robosuite demos and LeRobot datasets).

Every stage after `data` reads rows with these columns, so the teacher, fine-tuning, attention and book
stages take either source without a branch.

Conventions (one place, cited by the book):
- ``image``: the policy camera, RGB uint8, upright (row 0 is the top of the picture).
- ``state``: float32[8] = end-effector xyz (m, world frame), roll, pitch, yaw (rad), pad (0), gripper
  opening in [0, 1] (1 = fully open). The layout follows BridgeData V2's 8-D state.
- ``action``: float32[7] = dx, dy, dz, droll, dpitch, dyaw (the backend's own delta units: robosuite's
  OSC controller input in [-1, 1], metres / radians for Bridge), gripper in [0, 1] (1 = open, 0 = close,
  the Bridge / OpenVLA convention). Each simulator backend converts to and from its own gripper sign.
- ``objects``: JSON list of privileged object records ``{"name", "role", "pos": [x, y, z]}`` with role in
  {"target", "goal", "other"} (empty list when the source has no privileged state).
- ``phase``: the scripted expert's phase at this step ("approach", "descend", "grasp", "lift", "move",
  "place", "release", ...) or "" when unknown.
- ``target_mask``: uint8 HxW, 255 where the target object is visible in ``image`` (robosuite segmentation),
  absent/None when the source has no segmentation.
- ``seed``: the simulator seed of a robosuite episode (absent for LeRobot rows).

The ``datasets.Features`` of these columns are defined once, in :func:`row_features`.
"""
from __future__ import annotations

STATE_DIM = 8
#: the state's angles (radians): the end effector's roll, pitch, yaw (state = eef xyz, roll, pitch, yaw, 0, gripper)
STATE_ANGLES = (3, 4, 5)
ACTION_DIM = 7

#: Columns every source must provide.
BASE_COLUMNS = ("episode_index", "step_index", "task", "instruction", "image", "state", "action")
#: Columns a source provides when it knows them (privileged simulator state).
OPTIONAL_COLUMNS = ("objects", "phase", "target_mask")
#: Columns added by the annotate stage.
RATIONALE_COLUMNS = ("rationale", "rationale_text", "teacher", "teacher_model", "prompt_version", "input_hash")
#: Evaluation splits: the training scenes, and variant scenes (textures, lighting, camera) never seen in training.
IN_DISTRIBUTION, VARIANT = "in_distribution", "variant"
SPLITS = (IN_DISTRIBUTION, VARIANT)
#: Data seeds 0..MAX_DATA_SEED give the demonstrations [seed*1000, seed*1000 + n), n <= EPISODES_PER_SEED:
#: disjoint from the evaluation seeds (10_000 and up) and the pre-training mixture (refinevla.data's seed table).
MAX_DATA_SEED, EPISODES_PER_SEED = 9, 1000
#: The four parts of a ReFineVLA rationale, in the order they are written.
RATIONALE_PARTS = ("observation", "situation_analysis", "spatial_reasoning", "task_planning")
#: Columns of the data stage's rows, in order: the robosuite demos have them all (``seed``: the episode's
#: simulator seed); the LeRobot reader writes ``LEROBOT_COLUMNS``.
ROW_COLUMNS = BASE_COLUMNS + OPTIONAL_COLUMNS + ("seed",)
LEROBOT_COLUMNS = BASE_COLUMNS + ("objects", "phase")


def row_features(columns=ROW_COLUMNS):
    """The ``datasets.Features`` of the data stage's rows, for ``columns`` (a subset of ROW_COLUMNS, in order).

    ``image`` and ``target_mask`` are ``datasets.Image`` (PIL on access), ``state`` and ``action`` float32
    sequences (STATE_DIM and ACTION_DIM long), ``objects`` a JSON string. Every writer of rows uses this, so
    both sources store the same types.
    """
    import datasets

    value, image = datasets.Value, datasets.Image
    every = {
        "episode_index": value("int64"), "step_index": value("int64"),
        "task": value("string"), "instruction": value("string"),
        "image": image(), "state": datasets.Sequence(value("float32")),
        "action": datasets.Sequence(value("float32")),
        "objects": value("string"), "phase": value("string"), "target_mask": image(), "seed": value("int64"),
    }
    unknown = [c for c in columns if c not in every]
    if unknown:
        raise ValueError(f"row_features: unknown column(s) {unknown}; the row columns are {list(ROW_COLUMNS)}")
    return datasets.Features({c: every[c] for c in columns})


def missing_columns(column_names, required=BASE_COLUMNS) -> list[str]:
    """Names in ``required`` that ``column_names`` lacks (for clear errors at stage boundaries)."""
    have = set(column_names)
    return [c for c in required if c not in have]


def require_columns(column_names, required=BASE_COLUMNS, where: str = "dataset") -> None:
    """Raise a ValueError naming the missing columns and where they were expected."""
    missing = missing_columns(column_names, required)
    if missing:
        raise ValueError(f"{where} lacks required column(s) {missing}; it has {sorted(column_names)}")
