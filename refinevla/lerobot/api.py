"""The public API: :func:`load_lerobot`, :func:`inspect_lerobot`, :func:`provenance`, and action statistics.

A loaded dataset carries its load record (source, resolved commit, conventions, camera, episodes, the files
fetched, the dataset-wide action statistics) in ``ds.info.description``, so it survives a save and reload.
"""
from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np

from ..schema import ACTION_DIM, LEROBOT_COLUMNS, row_features
from .conventions import Conventions, LeRobotFormatError, feature_names, generic_conventions, known_conventions
from .hub import LeRobotFiles, LeRobotMeta, is_hub_id, read_jsonl, read_meta
from .reader import read_episode, select_episodes


def _open(source, revision=None, token=None, endpoint=None, cache_dir=None, conventions=None):
    """Files, meta and conventions of a source; a known hub dataset without ``revision`` is read at its pin."""
    known = known_conventions(str(source), conventions)
    pinned = (revision is None and known is not None and known.revision is not None and is_hub_id(source)
              and str(source) == known.hub_id)
    files = LeRobotFiles(source, revision=known.revision if pinned else revision, token=token, endpoint=endpoint,
                         cache_dir=cache_dir, pinned=pinned)
    meta = read_meta(files)
    return meta, known or generic_conventions(meta.info, name=files.label.rstrip("/").split("/")[-1])


def _pick_camera(meta: LeRobotMeta, conv: Conventions, camera: str | None) -> str:
    cameras = meta.cameras
    if not cameras:
        raise LeRobotFormatError(f"{meta.files.label}: meta/info.json features have no video or image camera")
    camera = camera or conv.camera or cameras[0]
    if camera not in cameras:
        raise LeRobotFormatError(f"{meta.files.label}: camera {camera!r} not in meta/info.json features; "
                                 f"the dataset has {cameras}")
    return camera


def inspect_lerobot(source, revision=None, conventions=None, token=None, endpoint=None, cache_dir=None) -> dict:
    """What a dataset holds (reads ``meta/`` only): version, counts, cameras, fps and the conventions used."""
    meta, conv = _open(source, revision, token, endpoint, cache_dir, conventions)
    lengths = [int(r.get("length", 0)) for r in meta.episodes.values()]
    return {
        "source": meta.files.label, "revision": meta.files.commit or meta.files.revision,
        "codebase_version": meta.info.get("codebase_version"), "robot_type": meta.info.get("robot_type"),
        "fps": meta.fps, "episodes": len(meta.episodes), "frames": int(sum(lengths)), "tasks": len(meta.tasks),
        "cameras": meta.cameras, "state_names": feature_names(meta.info["features"].get(conv.state_key, {})),
        "action_names": feature_names(meta.info["features"].get(conv.action_key, {})),
        "empty_instruction_episodes": sum(1 for i in meta.episodes if not meta.instruction(i)),
        "has_stats": meta.stats is not None, "conventions": dataclasses.asdict(conv),
    }


def load_lerobot(source, episodes=None, stride: int = 1, revision: str | None = None, camera: str | None = None,
                 image_size=None, *, frames_per_episode: int | None = None, seed: int = 0, conventions=None,
                 require_instruction: bool = True, token=None, endpoint=None, cache_dir=None):
    """Load episodes of a LeRobotDataset v2.x as a ``datasets.Dataset`` in the row schema.

    Args:
        source: a local dataset folder, or a hub dataset id such as "IPEC-COMMUNITY/bridge_orig_lerobot".
        episodes: which episodes (see :func:`select_episodes`): None/"all", n, "a:b", range, "sample:n", list.
        stride: keep every ``stride``-th frame of each episode.
        revision: hub branch, tag or commit. None: a known dataset read from its own hub id (``BRIDGE``,
            ``FRACTAL``) is read at its pinned v2.x commit (``Conventions.revision``), anything else at "main".
            The commit actually read is in :func:`provenance`.
        camera: info.json camera key; default: the dataset's policy camera from its conventions.
        image_size: None keeps the native size; an int (square) or (height, width) resizes.
        frames_per_episode: instead of ``stride``, keep the middle frame of n equal segments per episode.
        seed: seed of the "sample:n" episode draw.
        conventions: a :class:`Conventions`, a known dataset name, or None (chosen from the dataset name).
        require_instruction: skip episodes whose instruction is empty.
        token, endpoint, cache_dir: passed to ``huggingface_hub.hf_hub_download`` (HF_TOKEN, HF_ENDPOINT).

    Columns: schema.BASE_COLUMNS (``image`` a datasets.Image, PIL on access) plus ``objects`` ("[]") and
    ``phase`` (""). ``episode_index`` and ``step_index`` are the dataset's own indices (frame_index), so a row
    traces back to its source; ``task`` is the dataset name and ``instruction`` the language task.
    """
    import datasets

    if frames_per_episode is not None and int(stride) != 1:
        raise LeRobotFormatError("pass either stride or frames_per_episode, not both")
    meta, conv = _open(source, revision, token, endpoint, cache_dir, conventions)
    camera = _pick_camera(meta, conv, camera)
    chosen = select_episodes(episodes, meta, seed=seed, require_instruction=require_instruction)
    if not chosen:
        raise LeRobotFormatError(f"{meta.files.label}: no episodes selected by episodes={episodes!r}")
    columns = {name: [] for name in LEROBOT_COLUMNS}
    for index in chosen:
        part = read_episode(meta, conv, index, camera, stride, frames_per_episode, image_size)
        for name in columns:
            columns[name].extend(part[name])
    record = {
        "source": meta.files.label, "repo_id": meta.files.repo_id,
        "revision": meta.files.commit or meta.files.revision, "revision_pinned": meta.files.pinned,
        "conventions": conv.name, "camera": camera, "fps": conv.fps or meta.fps,
        "episodes": chosen, "stride": int(stride), "frames_per_episode": frames_per_episode,
        "image_size": image_size, "dataset_action_stats": _dataset_stats(meta, conv),
        "fetched": list(meta.files.fetched),
    }
    features = row_features(LEROBOT_COLUMNS)
    info = datasets.DatasetInfo(description=json.dumps(record), features=features)
    ds = datasets.Dataset.from_dict(columns, features=features, info=info)
    _warn_if_gripper_disagrees(ds, conv)
    return ds


def provenance(ds) -> dict:
    """The load record :func:`load_lerobot` stored in ``ds.info.description`` ({} for other datasets)."""
    try:
        record = json.loads(ds.info.description or "{}")
    except (json.JSONDecodeError, AttributeError):
        return {}
    return record if isinstance(record, dict) else {}


# ----------------------------------------------------------------------------------------------------------
# Statistics

def _stats_from(block: dict) -> dict | None:
    """q01/q99/mean/std from one stats.json feature block, or None if a quantile is missing."""
    if not isinstance(block, dict) or not all(k in block for k in ("q01", "q99", "mean", "std")):
        return None
    return {k: np.asarray(block[k], np.float64).reshape(-1) for k in ("q01", "q99", "mean", "std")}


def _pool_episode_stats(rows: list[dict], key: str) -> dict | None:
    """Pool per-episode stats (meta/episodes_stats.jsonl): mean and std exactly; q01/q99 approximately.

    The quantiles of a union are not a function of per-episode quantiles: we take their count-weighted mean
    and say so in the source string.
    """
    blocks = [r.get("stats", {}).get(key) for r in rows]
    if not blocks or any(_stats_from(b) is None or "count" not in b for b in blocks):
        return None
    counts = np.array([float(np.asarray(b["count"]).reshape(-1)[0]) for b in blocks])
    w = counts / counts.sum()
    mean = np.array([np.asarray(b["mean"], np.float64) for b in blocks])
    std = np.array([np.asarray(b["std"], np.float64) for b in blocks])
    pooled_mean = (w[:, None] * mean).sum(0)
    pooled_var = (w[:, None] * (std ** 2 + mean ** 2)).sum(0) - pooled_mean ** 2
    q01 = (w[:, None] * np.array([np.asarray(b["q01"], np.float64) for b in blocks])).sum(0)
    q99 = (w[:, None] * np.array([np.asarray(b["q99"], np.float64) for b in blocks])).sum(0)
    return {"q01": q01, "q99": q99, "mean": pooled_mean, "std": np.sqrt(np.maximum(pooled_var, 0.0))}


def _to_schema_stats(stats: dict, conv: Conventions) -> dict:
    """Map source action stats to the schema's gripper convention (an affine map on dimension 6)."""
    lo, hi = conv.action_gripper_range
    a = 1.0 / (hi - lo) * (1.0 if conv.action_gripper_open == "high" else -1.0)
    b = -lo / (hi - lo) if a > 0 else hi / (hi - lo)
    out = {k: v.copy() for k, v in stats.items()}
    q01, q99 = a * stats["q01"][6] + b, a * stats["q99"][6] + b
    out["q01"][6], out["q99"][6] = min(q01, q99), max(q01, q99)
    out["mean"][6] = a * stats["mean"][6] + b
    out["std"][6] = abs(a) * stats["std"][6]
    return out


def _dataset_stats(meta: LeRobotMeta, conv: Conventions) -> dict | None:
    """Whole-dataset action stats in schema convention, from stats.json or episodes_stats.jsonl, else None."""
    stats, source = None, None
    if meta.stats is not None:
        stats, source = _stats_from(meta.stats.get(conv.action_key)), "meta/stats.json"
    if stats is None and not meta.files.is_hub:   # on the hub it can be ~100 MB for Bridge: not fetched
        path = meta.files.get("meta/episodes_stats.jsonl", required=False)
        if path is not None:
            stats = _pool_episode_stats(read_jsonl(path, meta.files), conv.action_key)
            source = "meta/episodes_stats.jsonl (mean/std pooled exactly; q01/q99 count-weighted mean)"
    if stats is None or len(stats["q01"]) != ACTION_DIM:
        return None
    stats = _to_schema_stats(stats, conv)
    return {k: v.tolist() for k, v in stats.items()} | {"source": source}


def action_stats(data) -> dict:
    """Action normalisation statistics: q01, q99 (1st/99th percentiles), mean, std (float32[7] each).

    ``data`` is a dataset from :func:`load_lerobot` (its dataset-wide meta/stats.json or episodes_stats.jsonl
    statistics are used when they hold q01 and q99), or any rows: a datasets.Dataset / list of dicts with an
    ``action`` column, or an (N, 7) array; those are computed on the rows given. ``source`` says which.
    """
    record = provenance(data) if hasattr(data, "info") else {}
    stored = record.get("dataset_action_stats")
    if stored:
        out = {k: np.asarray(stored[k], np.float32) for k in ("q01", "q99", "mean", "std")}
        return out | {"source": stored["source"], "n": None}
    if hasattr(data, "column_names"):
        actions = np.asarray(data.with_format("numpy")["action"], np.float64)
    elif isinstance(data, (list, tuple)) and data and isinstance(data[0], dict):
        actions = np.asarray([r["action"] for r in data], np.float64)
    else:
        actions = np.asarray(data, np.float64)
    if actions.ndim != 2 or len(actions) == 0:
        raise ValueError(f"action_stats needs (N, D) actions with N > 0, got shape {actions.shape}")
    q01, q99 = np.quantile(actions, [0.01, 0.99], axis=0)
    return {"q01": q01.astype(np.float32), "q99": q99.astype(np.float32),
            "mean": actions.mean(0).astype(np.float32), "std": actions.std(0).astype(np.float32),
            "source": f"computed on {len(actions)} rows", "n": len(actions)}


def gripper_agreement(ds) -> float | None:
    """Correlation of state gripper and action gripper over the rows (None if either is constant).

    Both are 1 = open in the schema, so on real demonstrations this is clearly positive; a negative value
    means one of the two gripper conventions is wrong for this dataset.
    """
    arr = ds.with_format("numpy")
    state, action = np.asarray(arr["state"])[:, 7], np.asarray(arr["action"])[:, 6]
    if len(state) < 10 or state.std() < 1e-6 or action.std() < 1e-6:
        return None
    return float(np.corrcoef(state, action)[0, 1])


def _warn_if_gripper_disagrees(ds, conv: Conventions) -> None:
    agreement = gripper_agreement(ds)
    if agreement is not None and agreement < 0:
        flipped = "high" if conv.state_gripper_open == "low" else "low"
        warnings.warn(
            f"{conv.name}: state gripper and action gripper anti-correlate ({agreement:.2f}) on the loaded rows: "
            f"the state gripper convention is probably inverted. Check a few frames, then pass conventions="
            f"dataclasses.replace(conv, state_gripper_open={flipped!r}).", stacklevel=3)
