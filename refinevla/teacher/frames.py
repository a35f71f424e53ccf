"""The rows the teachers read: which frames are key frames, what their inputs hash to, and reading them fast.

A key frame is one whose rationale is written; every other row carries the rationale of the key frame before it
(`key_frame_sources`). Images come back as uint8 HxWx3 arrays whichever way the dataset stores them.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np


def key_frame_sources(demos, cfg) -> list[int]:
    """For each row, the row index of the frame whose rationale it carries (itself for a key frame): every
    `cfg.stride`-th frame of each segment (episode, or expert phase within it with `cfg.segment_by_phase`)
    counting from its first frame."""
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
