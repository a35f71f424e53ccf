"""Damaged files are found before they are trusted: what a finished stage wrote, and a check of it.

A stage's marker (refinevla/markers.py) lists every file the stage wrote, with its size and sha256
(``manifest``); before a stage is called up to date, reused, or read as another stage's input, ``damage`` checks
them: a missing file, another size or another content is named in one line. Files over ``HASH_MAX_BYTES`` are not
hashed; they get the format's own check instead (``format_problem``: the safetensors header against the file's
length, an Arrow stream or file read to its end, JSON parsed), which is also the whole check of markers written
before manifests existed. Hashing runs once per file and process while its size and modification time stay the
same (``_digest``), so a stage checked several times in one run is read once.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

MARKER = "_done.json"
#: bookkeeping files of a stage folder that are not its outputs
NOT_OUTPUTS = (MARKER, "_key", "_reused_from")
HASH_MAX_BYTES = 1 << 30
_CHUNK = 1 << 20
_digests: dict[tuple, str] = {}


class DamagedFileError(RuntimeError):
    """A file a stage wrote no longer holds what it wrote; the message is one line naming the file and the fix."""


# ------------------------------------------------------------------------------------------------ listing
def stage_files(stage_dir: Path) -> list[Path]:
    """The outputs of a stage folder: every file under it, less bookkeeping, temporary (dot) files and the
    folders of nested stages (a subfolder with its own marker)."""
    stage_dir = Path(stage_dir)
    out = []
    for root, dirs, files in os.walk(stage_dir):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (here / d / MARKER).exists())
        out += [here / f for f in sorted(files) if f not in NOT_OUTPUTS and not f.startswith(".")]
    return out


def _digest(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _digests:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(_CHUNK), b""):
                h.update(block)
        _digests[key] = h.hexdigest()
    return _digests[key]


def manifest(stage_dir: Path) -> dict[str, dict]:
    """{path relative to the stage folder: {"bytes", "sha256"}} of every output (no sha256 over HASH_MAX_BYTES)."""
    stage_dir = Path(stage_dir)
    files = {}
    for path in stage_files(stage_dir):
        size = path.stat().st_size
        entry = {"bytes": size}
        if size <= HASH_MAX_BYTES:
            entry["sha256"] = _digest(path)
        files[path.relative_to(stage_dir).as_posix()] = entry
    return files


# ------------------------------------------------------------------------------------------------- checks
def format_problem(path: Path) -> str | None:
    """What is wrong with a file by its format's own check (None: fine, or a format without a check)."""
    path = Path(path)
    checks = {".safetensors": _safetensors_problem, ".arrow": _arrow_problem, ".json": _json_problem,
              ".jsonl": _jsonl_problem}
    check = checks.get(path.suffix)
    if check is None:
        return None
    try:
        return check(path)
    except Exception as e:  # noqa: BLE001  any failure to read it is the problem
        return f"unreadable {path.suffix[1:]} ({type(e).__name__}: {' '.join(str(e).split())[:160]})"


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"safetensors file of {size} bytes has no header"
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            return f"safetensors header says {n} header bytes, the file has {size}"
        header = json.loads(fh.read(n))
    ends = [t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"]
    expected = 8 + n + max(ends, default=0)
    return None if expected == size else f"safetensors header describes {expected} bytes, the file has {size}"


def _arrow_problem(path: Path) -> str | None:
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        if source.read(6) == b"ARROW1":  # the file format (a footer); datasets writes the stream format
            source.seek(0)
            pa.ipc.open_file(source).read_all()
        else:
            source.seek(0)
            pa.ipc.open_stream(source).read_all()
    return None


def _json_problem(path: Path) -> str | None:
    json.loads(path.read_bytes())
    return None


def _jsonl_problem(path: Path) -> str | None:
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        return "its last line is cut short"
    for number, line in enumerate(data.splitlines(), 1):
        try:
            json.loads(line)
        except ValueError:
            return f"line {number} is not valid JSON"
    return None


def damage(stage_dir: Path, marker: dict) -> list[tuple[Path, str]]:
    """[(file, what is wrong)] for every damaged output of a finished stage ([] when whole). With a manifest in the
    marker: every listed file must be there with its size and sha256; without one (older markers): the format
    checks of every output."""
    stage_dir = Path(stage_dir)
    files = marker.get("files")
    if files is None:
        return [(path, problem) for path in stage_files(stage_dir) if (problem := format_problem(path))]
    found = []
    for rel, entry in files.items():
        path = stage_dir / rel
        if not path.is_file():
            found.append((path, "missing"))
            continue
        size = path.stat().st_size
        if size != entry["bytes"]:
            detail = format_problem(path)
            found.append((path, f"{size} bytes, {entry['bytes']} when written" + (f": {detail}" if detail else "")))
        elif "sha256" in entry and _digest(path) != entry["sha256"]:
            detail = format_problem(path)
            found.append((path, "content changed since it was written (sha256)" + (f": {detail}" if detail else "")))
        elif "sha256" not in entry and (problem := format_problem(path)):
            found.append((path, problem))
    return found


def describe(found: list[tuple[Path, str]]) -> str:
    """One line: the first damaged file, what is wrong with it, and how many more there are."""
    (path, problem), more = found[0], len(found) - 1
    return f"{path} is damaged ({problem})" + (f", and {more} more file(s) of it" if more else "")


def set_aside(stage_dir: Path, found: list[tuple[Path, str]]) -> list[Path]:
    """Before a damaged stage re-runs: each damaged file is moved to ``<stage>/.damaged/<its path>`` (kept, never
    read again: the stage writes it anew; a hidden folder, so no output), except record files (.jsonl), whose
    whole lines the re-run resumes from. Returns the new paths."""
    stage_dir, kept = Path(stage_dir), []
    for path, problem in found:
        if path.suffix == ".jsonl" or not path.exists():
            continue
        target = stage_dir / ".damaged" / path.relative_to(stage_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        kept.append(target)
    return kept
