"""Which episodes and frames to read, and one episode's rows: parquet columns, decoded video frames, schema.

:func:`read_episode` fetches only the files of one episode (its parquet and its camera's video) and decodes
only the frames kept.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

from .conventions import Conventions, LeRobotFormatError, to_schema_action, to_schema_state
from .hub import LeRobotMeta, episode_path


def select_episodes(spec, meta: LeRobotMeta, seed: int = 0, require_instruction: bool = True) -> list[int]:
    """Resolve an episode spec to sorted episode indices.

    ``spec``: None or "all" (every episode; refused for hub sources unless "all" is explicit), an int ``n``
    (the first n), "a:b" or ``range(a, b)`` (indices a..b-1), "sample:n" (n drawn with ``seed``), "i,j,k" or
    a list of indices. With ``require_instruction``, episodes whose instruction is empty are skipped (a
    count of n skips them and takes the next ones), with a warning when an explicit index is skipped.
    """
    known = sorted(meta.episodes)
    eligible = [i for i in known if not require_instruction or meta.instruction(i)]
    if spec is None and meta.files.is_hub:
        raise LeRobotFormatError(
            f"{meta.files.label} has {len(known)} episodes on the hub: pass episodes= (e.g. '0:10', 'sample:20',"
            f" 5) to fetch a subset, or episodes='all' to download them all")
    if isinstance(spec, str):
        spec = spec.strip()
        if spec == "all":
            spec = None
        elif spec.startswith("sample:"):
            n = int(spec.split(":", 1)[1])
            if n > len(eligible):
                raise LeRobotFormatError(f"{meta.files.label}: sample:{n} asks for more than the "
                                         f"{len(eligible)} eligible episodes")
            rng = np.random.default_rng(seed)
            return sorted(int(i) for i in rng.choice(eligible, size=n, replace=False))
        elif ":" in spec:
            a, b = spec.split(":", 1)
            spec = range(int(a or 0), int(b) if b else (known[-1] + 1 if known else 0))
        else:
            spec = [int(s) for s in spec.split(",") if s.strip()]
    if spec is None:
        return eligible
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        if spec > len(eligible):
            raise LeRobotFormatError(f"{meta.files.label}: asked for {spec} episodes, it has {len(eligible)} "
                                     f"eligible (of {len(known)})")
        return eligible[:int(spec)]
    wanted = [int(i) for i in spec]
    bad = [i for i in wanted if i not in meta.episodes]
    if bad:
        lo, hi = (known[0], known[-1]) if known else (0, -1)
        raise LeRobotFormatError(f"{meta.files.label}: episode index(es) {bad[:5]} out of range: the dataset has "
                                 f"{len(known)} episodes ({lo}..{hi}) in meta/episodes.jsonl")
    keep = set(eligible)
    skipped = [i for i in wanted if i not in keep]
    if skipped:
        warnings.warn(f"{meta.files.label}: skipping {len(skipped)} episode(s) with an empty instruction "
                      f"{skipped[:5]} (require_instruction=False keeps them)", stacklevel=3)
    return sorted(set(i for i in wanted if i in keep))


def frame_indices(length: int, stride: int = 1, frames_per_episode: int | None = None) -> np.ndarray:
    """Positions kept in an episode of ``length`` frames: every ``stride``-th, or one per segment.

    ``frames_per_episode=n`` splits the episode into n equal segments and keeps the middle frame of each
    (all frames when n >= length), so short and long episodes contribute the same number of rows.
    """
    if frames_per_episode is not None:
        n = int(frames_per_episode)
        if n < 1:
            raise LeRobotFormatError(f"frames_per_episode must be >= 1, got {n}")
        if n >= length:
            return np.arange(length)
        return np.floor((np.arange(n) + 0.5) * length / n).astype(int)
    if int(stride) < 1:
        raise LeRobotFormatError(f"stride must be >= 1, got {stride}")
    return np.arange(0, length, int(stride))


# ----------------------------------------------------------------------------------------------------------
# One episode: parquet rows and video frames

def _column(table, name: str, path: Path) -> np.ndarray:
    """A parquet column as numpy; list columns become (N, D) float arrays."""
    import pyarrow as pa

    if name not in table.column_names:
        raise LeRobotFormatError(f"{path}: no column {name!r}; it has {table.column_names}")
    col = table.column(name).combine_chunks()
    if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) or pa.types.is_large_list(col.type):
        flat = col.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(len(col), -1) if len(col) else flat.reshape(0, 0)
    return col.to_numpy(zero_copy_only=False)


def read_episode_table(path: Path, columns: list[str]) -> dict:
    """Columns of one episode parquet as numpy arrays (missing optional columns are left out)."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise LeRobotFormatError(f"{path}: cannot read parquet: {e}") from e
    return {c: _column(table, c, path) for c in columns if c in table.column_names} | {"_n": table.num_rows,
                                                                                      "_table": table}


def decode_frames(path: Path, timestamps: np.ndarray, fps: float) -> list[np.ndarray]:
    """RGB frames (H, W, 3) uint8 of ``path`` at ``timestamps`` (s); decoding stops after the last one.

    A frame matches a timestamp when both round to the same frame number at ``fps``: this tolerates the
    small pts jitter of encoders. Frames not asked for are decoded (inter-frame codecs need them) but never
    converted to RGB, which is most of the cost.
    """
    import av

    wanted = {int(round(float(t) * fps)): k for k, t in enumerate(timestamps)}
    out: list = [None] * len(timestamps)
    last = max(wanted) if wanted else -1
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            for n, frame in enumerate(container.decode(stream)):
                t = frame.time if frame.time is not None else n / fps
                index = int(round(t * fps))
                if index in wanted and out[wanted[index]] is None:
                    out[wanted[index]] = frame.to_ndarray(format="rgb24")
                if index >= last:
                    break
    except (av.error.FFmpegError, IndexError) as e:
        raise LeRobotFormatError(f"{path}: cannot decode video: {e}") from e
    missing = [float(timestamps[k]) for k, f in enumerate(out) if f is None]
    if missing:
        raise LeRobotFormatError(f"{path}: no frame at t = {missing[:5]} s (fps {fps}); video shorter than parquet?")
    return out


def _decode_parquet_images(column, rows: np.ndarray, path: Path) -> list[np.ndarray]:
    """Frames of a camera stored in the parquet itself (feature dtype "image": {"bytes", "path"} structs)."""
    from PIL import Image

    out = []
    for k in rows:
        cell = column[int(k)].as_py()
        data = cell.get("bytes") if isinstance(cell, dict) else None
        if not data:
            raise LeRobotFormatError(f"{path}: image cell {int(k)} has no bytes")
        out.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    return out


def _png(frame: np.ndarray, image_size) -> dict:
    """Encode a frame as PNG bytes (what datasets.Image() stores), resized first if asked."""
    from PIL import Image

    img = Image.fromarray(frame)
    if image_size is not None:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        img = img.resize((int(w), int(h)), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def read_episode(meta: LeRobotMeta, conv: Conventions, episode_index: int, camera: str,
                 stride: int = 1, frames_per_episode: int | None = None, image_size=None) -> dict:
    """The kept frames of one episode as schema columns (lists), fetching only this episode's files."""
    files, info = meta.files, meta.info
    rel = episode_path(info, "data_path", episode_index)
    parquet = files.get(rel, what=f" (meta/info.json data_path {info['data_path']!r}, episode {episode_index})")
    cols = read_episode_table(parquet, [conv.state_key, conv.action_key, "timestamp", "frame_index", "task_index"])
    n = cols["_n"]
    if conv.action_key not in cols:
        raise LeRobotFormatError(f"{parquet}: no column {conv.action_key!r}")
    keep = frame_indices(n, stride, frames_per_episode)
    frame_index = cols.get("frame_index", np.arange(n)).astype(np.int64)
    timestamps = cols["timestamp"] if "timestamp" in cols else frame_index / meta.fps

    if info["features"][camera].get("dtype") == "video":
        vrel = episode_path(info, "video_path", episode_index, video_key=camera)
        video = files.get(vrel, what=f" (meta/info.json video_path {info.get('video_path')!r}, camera {camera})")
        frames = decode_frames(video, timestamps[keep], meta.fps)
    else:
        frames = _decode_parquet_images(cols["_table"].column(camera), keep, parquet)

    if conv.state_layout != "none" and conv.state_key not in cols:
        raise LeRobotFormatError(f"{parquet}: no column {conv.state_key!r} (state_layout {conv.state_layout})")
    state = to_schema_state(cols.get(conv.state_key, np.zeros((n, 0)))[keep], conv)
    action = to_schema_action(cols[conv.action_key][keep], conv)
    if "task_index" in cols:
        instructions = [meta.tasks.get(int(t), "").strip() for t in cols["task_index"][keep]]
    else:
        instructions = [meta.instruction(episode_index)] * len(keep)
    return {
        "episode_index": [int(episode_index)] * len(keep),
        "step_index": frame_index[keep].tolist(),
        "task": [conv.name] * len(keep),
        "instruction": instructions,
        "image": [_png(f, image_size) for f in frames],
        "state": state.tolist(),
        "action": action.tolist(),
        "objects": ["[]"] * len(keep),
        "phase": [""] * len(keep),
    }
