"""Stage `annotate`: an expert teacher writes a four-part rationale for every (key) frame of the demos.

ReFineVLA's first stage asks a teacher (the paper: Gemini 2.0 Flash) for a structured chain of thought per
trajectory frame: observation, situation analysis, spatial reasoning, task planning. Two teachers here:

- ``privileged`` (default, offline): a fixed template filled from the current simulator state (object positions
  relative to the gripper and its opening; no expert phase or timer). Deterministic, free, faithful by
  construction, and short (a fixed vocabulary of ~40 words, the object names and integers 1..99; 30-45 words) so
  that a tiny word-level model can learn to write it on a CPU.
- ``http``: any OpenAI-compatible chat endpoint (OpenAI, Gemini's compatibility endpoint, vLLM, Ollama),
  with a cache, retries, bounded concurrency and cost accounting; see ``refinevla.teacher_http``.

Direction words follow robosuite's world frame (checked in robosuite 1.5.2: ``lift.py`` puts the robot base at
x = -0.16 - table_length / 2 = -0.56 m, the table at the origin, and ``table_arena.xml`` puts the frontview
camera at x = 1.6 m looking back at the robot): +x points from the robot base across the table ("ahead of"),
+y is the robot's left ("left of"), +z is up ("above"). Left and right are the robot's: the agentview and
frontview cameras look back at the robot, so the robot's left is on the right of their pictures.

    annotate(demos, AnnotateConfig(), "data/run/annotate")              # privileged, offline
    annotate(demos, AnnotateConfig(teacher="http", model="gemini-2.0-flash",
             base_url="https://generativelanguage.googleapis.com/v1beta/openai/",
             api_key_env="GEMINI_API_KEY", stride=10, dry_run=True), out_dir)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from .experts import GRASPED_OPENING
from .schema import RATIONALE_PARTS, require_columns

# -----------------------------------------------------------------------------
# The rationale and its text form

#: Version of the privileged teacher's sentence template; bump it when a sentence changes.
TEMPLATE_VERSION = "privileged-v2"  # v2: the current state only (no expert phase)
#: Labels of the four parts in the single-line training target, in RATIONALE_PARTS order.
PART_LABELS = {"observation": "OBSERVATION:", "situation_analysis": "SITUATION:",
               "spatial_reasoning": "SPATIAL:", "task_planning": "PLAN:"}
MAX_PART_CHARS = 300  # a teacher that writes an essay per part gets one repair request, then fails


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


# -----------------------------------------------------------------------------
# Objects and directions in the robosuite world frame (see the module docstring)

AXIS_WORDS = (("ahead of", "behind"), ("left of", "right of"), ("above", "below"))  # (+, -) per x, y, z
MAX_CM = 99  # distances are small integers: the tiny model's vocabulary holds 0..99


def load_objects(value, where: str = "row") -> list[dict]:
    """Parse the `objects` column (a JSON string or a list) and check each record has name, role and pos."""
    objects = json.loads(value) if isinstance(value, str) else list(value or [])
    for o in objects:
        if not isinstance(o, dict) or not {"name", "role", "pos"} <= set(o) or len(o["pos"]) != 3:
            raise ValueError(f"{where}: each entry of field 'objects' needs name, role and pos[3]; got {o!r}")
    return objects


def object_name(o: dict) -> str:
    """The object's name in plain words ("red_cube" -> "red cube")."""
    return " ".join(str(o["name"]).replace("_", " ").lower().split())


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


# -----------------------------------------------------------------------------
# The privileged-state teacher

HOLD_DISTANCE_M = 0.03  # the target counts as held when the gripper has closed on it and it is this close
CLOSED_OPENING = 0.8     # an opening below this is a closing (or closed) gripper
AT_DISTANCE_M = 0.015    # the gripper is "at" an object this close to it
ABOVE_XY_M = 0.015       # ... and "above" it when this close horizontally


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


# -----------------------------------------------------------------------------
# Faithfulness: does a rationale name the right target and the right directions?

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


def summarize_faithfulness(checks: list[dict]) -> dict:
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
    return summarize_faithfulness(checks)


# -----------------------------------------------------------------------------
# Configuration

@dataclass
class AnnotateConfig:
    """Everything the annotate stage reads. The API key itself never appears here: only the *name* of the
    environment variable that holds it (`api_key_env`), so configs and caches can be shared and committed."""
    teacher: str = "privileged"         # "privileged" (offline, from simulator state) | "http"
    base_url: str | None = None         # OpenAI-compatible endpoint; None = api.openai.com
    model: str = "gpt-4o-mini"          # the HTTP teacher's model name
    api_key_env: str = "OPENAI_API_KEY"  # name of the environment variable holding the key
    temperature: float = 0.0
    max_tokens: int = 300
    concurrency: int = 8                # HTTP requests in flight at most
    max_attempts: int = 5               # requests per item at most, retries and the repair included
    timeout_s: float = 60.0             # per request
    backoff_s: float = 1.0              # first retry wait without Retry-After; doubles per attempt
    max_wait_s: float = 60.0            # cap on any single wait, Retry-After included
    stride: int = 1                     # annotate every k-th frame of a segment; 0 = its first frame only
    segment_by_phase: bool = False      # a segment is an expert phase (else the whole episode)
    json_schema: bool = True            # server supports response_format json_schema (else parse + repair)
    data_root: str = "data"
    cache_path: str = "cache/teacher.sqlite"  # relative to data_root unless absolute
    dry_run: bool = False               # print requests, tokens and cost, send nothing
    prices: dict = field(default_factory=dict)  # model -> [$ per 1M input, $ per 1M output], overrides
    # The provider's Batch API instead of online requests (paper scale: teacher_batch.py)
    batch: bool = False                 # send the misses as JSONL batch files (OpenAI, Gemini's endpoint)
    batch_window: str = "24h"           # completion window asked of the provider
    batch_max_requests: int = 50000     # lines per batch file (OpenAI's limit)
    batch_max_mb: float = 190.0         # MB per batch file (OpenAI's limit is 200)
    batch_poll_s: float = 60.0          # seconds between status checks
    batch_timeout_s: float = 0.0        # stop waiting after this long (0 = until done); a re-run collects
    batch_discount: float = 0.5         # batch price / online price (OpenAI and Gemini: half)

    def validate(self) -> None:
        """Raise naming the field when a value cannot work."""
        if self.teacher not in ("privileged", "http"):
            raise ValueError(f"AnnotateConfig.teacher must be 'privileged' or 'http', got {self.teacher!r}")
        for name in ("concurrency", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"AnnotateConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.stride < 0:
            raise ValueError(f"AnnotateConfig.stride must be >= 0, got {self.stride}")
        if self.batch_max_requests < 1 or self.batch_max_mb <= 0:
            raise ValueError("AnnotateConfig.batch_max_requests and batch_max_mb must be > 0, got "
                             f"{self.batch_max_requests} and {self.batch_max_mb}")
        if self.batch_poll_s < 0 or self.batch_timeout_s < 0:
            raise ValueError("AnnotateConfig.batch_poll_s and batch_timeout_s must be >= 0, got "
                             f"{self.batch_poll_s} and {self.batch_timeout_s}")
        if not 0 < self.batch_discount <= 1:
            raise ValueError(f"AnnotateConfig.batch_discount must be in (0, 1], got {self.batch_discount}")

    def resolved_cache_path(self) -> Path:
        return Path(self.data_root) / self.cache_path


# -----------------------------------------------------------------------------
# Which frames are annotated, and what their inputs hash to

def key_frame_sources(demos, cfg: AnnotateConfig) -> list[int]:
    """For each row, the row index of the frame whose rationale it carries (itself for a key frame): every
    `stride`-th frame of each segment (episode, or expert phase within it) counting from its first frame."""
    have = [c for c in ("episode_index", "step_index", "phase") if c in demos.column_names]
    cols = demos.select_columns(have)[:]
    ep, st = cols["episode_index"], cols["step_index"]
    phase = cols.get("phase") or [""] * len(ep)
    source, key, k, prev = [0] * len(ep), 0, 0, None
    for i in sorted(range(len(ep)), key=lambda i: (ep[i], st[i])):
        if prev is not None and (ep[i], st[i]) == (ep[prev], st[prev]):
            raise ValueError(f"demos: duplicate (episode_index, step_index) = ({ep[i]}, {st[i]})")
        new_segment = prev is None or ep[i] != ep[prev] or (cfg.segment_by_phase and phase[i] != phase[prev])
        k = 0 if new_segment else k + 1
        if k == 0 or (cfg.stride and k % cfg.stride == 0):
            key = i
        source[i], prev = key, i
    return source


def hash_inputs(*parts) -> str:
    """sha256 over the parts (arrays by dtype, shape and bytes; everything else as canonical JSON)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(f"{p.dtype}{p.shape}".encode())
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\x1f")
    return h.hexdigest()


def read_rows(ds, indices: list[int], columns: list[str], batch_size: int = 64):
    """Yield (index, row dict) for `indices`, read in batches; `image` comes back as uint8 HxWx3 whether it is
    stored as datasets.Image() (PIL) or as an array column (read from Arrow directly: datasets' python and
    numpy formatters take ~5-100 ms per 64 px image stored as nested lists)."""
    columns = [c for c in columns if c in ds.column_names]
    plain = [c for c in columns if c != "image"]
    others = ds.select_columns(plain) if plain else None
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        batch = others[idx] if others is not None else {}
        images = read_images(ds, idx) if "image" in columns else None
        for j, i in enumerate(idx):
            row = {c: v[j] for c, v in batch.items()}
            if images is not None:
                row["image"] = images[j]
            yield i, row


def read_images(ds, idx: list[int]) -> list[np.ndarray]:
    """The `image` of rows idx as uint8 HxWx3 arrays (see read_rows)."""
    import datasets
    import pyarrow as pa
    if isinstance(ds.features["image"], datasets.Image):
        return [to_uint8_image(im) for im in ds.select_columns(["image"])[idx]["image"]]
    col = ds.select_columns(["image"]).with_format("arrow")[idx]["image"].combine_chunks()
    col = col.storage if isinstance(col, pa.ExtensionArray) else col
    flat, is_list = col, (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
    while any(test(flat.type) for test in is_list):
        flat = flat.flatten()
    shape = to_uint8_image(col[0].as_py()).shape
    if len(flat) == len(idx) * int(np.prod(shape)) and flat.null_count == 0:  # one shape for all: reshape
        return list(flat.to_numpy(zero_copy_only=False).astype(np.uint8, copy=False).reshape(len(idx), *shape))
    return [to_uint8_image(x.as_py()) for x in col]


def to_uint8_image(image) -> np.ndarray:
    """A PIL image (datasets.Image feature) or a uint8 array / nested list -> uint8 HxWx3."""
    if hasattr(image, "convert"):
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"field 'image' must be HxWx3, got shape {array.shape}")
    return array.astype(np.uint8, copy=False)


# -----------------------------------------------------------------------------
# Running a teacher over the demos

@dataclass
class Annotation:
    """One key frame's rationale and where it came from (the columns the annotate stage adds)."""
    rationale: Rationale
    teacher: str
    teacher_model: str
    prompt_version: str
    input_hash: str


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
               "faithfulness": summarize_faithfulness(checks)}
    return out, summary


def add_rationale_columns(demos, sources: list[int], notes: dict[int, Annotation]):
    """The demos plus the annotate columns; a non-key row carries its key frame's rationale and hash."""
    steps = demos.select_columns(["step_index"])[:]["step_index"]
    columns = {
        "rationale": [notes[s].rationale.model_dump_json() for s in sources],
        "rationale_text": [render_rationale(notes[s].rationale) for s in sources],
        "teacher": [notes[s].teacher for s in sources],
        "teacher_model": [notes[s].teacher_model for s in sources],
        "prompt_version": [notes[s].prompt_version for s in sources],
        "input_hash": [notes[s].input_hash for s in sources],
        "rationale_source_step": [int(steps[s]) for s in sources],
    }
    for name, values in columns.items():
        if name in demos.column_names:
            demos = demos.remove_columns(name)
        demos = demos.add_column(name, values)
    return demos


def save_dataset_atomically(ds, path: Path) -> None:
    """save_to_disk into a temporary sibling, then rename: a killed run never leaves a half dataset at `path`."""
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp-{os.getpid()}"), path.with_name(f".{path.name}.old-{os.getpid()}")
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    ds.save_to_disk(str(tmp))
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    """Write via a temporary file and a rename (never half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def annotate(demos, cfg: AnnotateConfig, out_dir):
    """Annotate `demos` (a datasets.Dataset of schema rows) and write `out_dir/dataset`, `cost.json` and
    `config.yaml`; return the annotated dataset. A dry run prints (and writes `cost_estimate.json`) what the
    HTTP run would send and cost, and returns None. If items still fail after all attempts, no dataset is
    saved (cost.json and config.yaml are): a RuntimeError says how many, and a re-run asks only for them (the
    successes are cached)."""
    cfg.validate()
    require_columns(demos.column_names, where="demos")
    out_dir = Path(out_dir)
    sources = key_frame_sources(demos, cfg)
    keys = sorted(set(sources))
    if cfg.dry_run:
        if cfg.teacher == "http":
            from . import teacher_http  # imported only here: the offline path needs no openai client
            estimate = teacher_http.estimate(demos, keys, cfg)
        else:
            estimate = {"teacher": "privileged", "rows": len(sources), "key_frames": len(keys),
                        "requests": 0, "cost_usd": 0.0}
        print(format_estimate(estimate))
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "cost_estimate.json", estimate)
        return None
    if cfg.teacher == "http":
        from . import teacher_http
        notes, summary = teacher_http.run(demos, keys, cfg)
    else:
        notes, summary = run_privileged(demos, keys)
    summary.update(rows=len(sources), key_frames=len(keys), stride=cfg.stride,
                   segment_by_phase=cfg.segment_by_phase)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "cost.json", summary)
    write_text(out_dir / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    if summary["failed"]:
        raise RuntimeError(
            f"annotate: {summary['failed']} of {len(keys)} key frames failed after up to {cfg.max_attempts} "
            f"attempts (reasons in {out_dir / 'cost.json'}, e.g. {summary['failures'][0]['error']!r}); the "
            f"{len(notes)} successes are cached in {cfg.resolved_cache_path()}: "
            "re-run to retry only the failed ones")
    annotated = add_rationale_columns(demos, sources, notes)
    save_dataset_atomically(annotated, out_dir / "dataset")
    return annotated


def format_estimate(e: dict) -> str:
    """The dry run's printout."""
    if e["teacher"] != "http":
        return f"dry run (privileged teacher): {e['rows']} rows, {e['key_frames']} key frames, no requests, $0"
    cost = "cost unknown (no price for this model: pass AnnotateConfig.prices)" if e["cost_usd"] is None else \
        f"cost ~${e['cost_usd']:.4f} (at most ${e['cost_usd_max']:.4f} if every answer used max_tokens)"
    how = f" in {e['batch_files']} Batch API file(s), batch price" if e.get("mode") == "batch" else ""
    return (f"dry run ({e['model']}): {e['rows']} rows, {e['key_frames']} key frames, {e['cached']} cached -> "
            f"{e['requests']} requests{how}, ~{e['input_tokens']:,} input + ~{e['output_tokens']:,} output "
            f"tokens, {cost}")


def examples(ds, n: int = 3) -> list[dict]:
    """A few key frames (spread evenly over the dataset) with their instruction and rendered rationale."""
    cols = ds.select_columns(["episode_index", "step_index", "instruction", "rationale_text", "teacher",
                              "rationale_source_step"])[:]
    keys = [i for i, (s, src) in enumerate(zip(cols["step_index"], cols["rationale_source_step"])) if s == src]
    picked = [keys[int(j)] for j in np.linspace(0, len(keys) - 1, min(n, len(keys)))] if keys else []
    return [{k: cols[k][i] for k in ("episode_index", "step_index", "instruction", "rationale_text", "teacher")}
            for i in picked]
