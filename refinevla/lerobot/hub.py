"""A dataset's files and its ``meta/`` folder: a local folder, or a hub dataset fetched one file at a time.

The LeRobotDataset v2.x layout read here::

    meta/info.json                 codebase_version, fps, chunks_size, data_path / video_path templates, features
    meta/episodes.jsonl            {"episode_index", "tasks", "length"} per episode
    meta/tasks.jsonl               {"task_index", "task"} per task (the language instruction)
    meta/stats.json                optional dataset statistics (mean/std/min/max, sometimes q01/q99)
    meta/episodes_stats.jsonl      optional per-episode statistics (v2.1)
    data/chunk-XXX/episode_XXXXXX.parquet               one row per frame
    videos/chunk-XXX/<camera key>/episode_XXXXXX.mp4    one video per camera per episode
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .conventions import LeRobotFormatError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_HUB_HELP = ("If the dataset is private or gated, set a token (environment variable HF_TOKEN, or token=...); "
             "if this machine cannot reach the hub, set HF_ENDPOINT to a mirror or download the episodes "
             "elsewhere and pass the local folder instead.")


def is_hub_id(source) -> bool:
    """True when ``source`` names a hub dataset ("owner/name") rather than an existing local path."""
    text = str(source)
    return (not Path(text).expanduser().exists() and _HUB_ID.fullmatch(text) is not None
            and not text.startswith((".", "/", "~")))


class LeRobotFiles:
    """Where a dataset's files come from: a local folder, or a hub dataset fetched one file at a time.

    On the hub, the first file fetched resolves ``revision`` (a branch, tag or commit) to a commit hash and
    every later file is fetched at that commit, so one load never mixes two versions of the dataset.
    ``pinned``: the revision is the dataset's default pin (:attr:`Conventions.revision`), named in errors.
    ``fetched`` lists the repository paths downloaded (or found in the cache) in order.
    """

    def __init__(self, source, revision=None, token=None, endpoint=None, cache_dir=None, pinned=False):
        self.label = str(source)
        self.root, self.repo_id = None, None
        path = Path(source).expanduser()
        if path.is_dir():
            self.root = path
        elif path.exists():
            raise LeRobotFormatError(f"{path} is a file; expected a LeRobot dataset folder (with meta/info.json)")
        elif is_hub_id(source):
            self.repo_id = str(source)
        else:
            raise LeRobotFormatError(
                f"{source!r} is neither an existing folder nor a hub dataset id like 'owner/name'")
        self.revision, self.pinned = revision, pinned
        self.commit = revision if revision and _COMMIT.fullmatch(revision) else None
        self.token, self.endpoint, self.cache_dir = token, endpoint, cache_dir
        self.fetched: list[str] = []

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None

    def get(self, relpath: str, required: bool = True, what: str = "") -> Path | None:
        """Local path of ``relpath`` (fetched from the hub if needed); None if absent and not required."""
        if self.root is not None:
            path = self.root / relpath
            if path.is_file():
                return path
            if required:
                raise LeRobotFormatError(f"{self.root}: {relpath} does not exist{what}")
            return None
        return self._download(relpath, required, what)

    def _download(self, relpath, required, what):
        from huggingface_hub import errors as hub_errors
        from huggingface_hub import hf_hub_download

        revision = self.commit or self.revision
        pin = " (the dataset's pinned v2.x default; revision='main' reads the newest)" if self.pinned else ""
        where = f"hub dataset {self.repo_id!r} (revision {revision or 'main'}{pin})"
        try:
            path = hf_hub_download(self.repo_id, relpath, repo_type="dataset", revision=revision,
                                   token=self.token, endpoint=self.endpoint, cache_dir=self.cache_dir)
        except hub_errors.RevisionNotFoundError as e:
            raise LeRobotFormatError(f"{where}: revision not found. {_HUB_HELP}") from e
        except hub_errors.RepositoryNotFoundError as e:   # also GatedRepoError
            raise LeRobotFormatError(f"{where} does not exist or is not accessible (and there is no local folder "
                                     f"{self.repo_id!r}). {_HUB_HELP}") from e
        except hub_errors.RemoteEntryNotFoundError as e:
            if required:
                raise LeRobotFormatError(f"{where}: {relpath} does not exist{what}") from e
            return None
        except hub_errors.LocalEntryNotFoundError as e:   # network down / endpoint unreachable, not cached
            raise LeRobotFormatError(f"{where}: cannot fetch {relpath} (hub unreachable?). {_HUB_HELP}") from e
        except hub_errors.HfHubHTTPError as e:
            raise LeRobotFormatError(f"{where}: fetching {relpath} failed: {e}. {_HUB_HELP}") from e
        self.fetched.append(relpath)
        if self.commit is None:
            self.commit = _commit_from_cache_path(path)
        return Path(path)


def _commit_from_cache_path(path: str) -> str | None:
    """The commit hash in a hub cache path ``.../snapshots/<commit>/<file>`` (None if not there)."""
    parts = Path(path).parts
    if "snapshots" in parts:
        candidate = parts[parts.index("snapshots") + 1]
        if _COMMIT.fullmatch(candidate):
            return candidate
    return None


# ----------------------------------------------------------------------------------------------------------
# meta/

@dataclass
class LeRobotMeta:
    """The parsed ``meta/`` folder of one dataset."""

    files: LeRobotFiles
    info: dict
    episodes: dict          # episode_index -> {"episode_index", "tasks", "length"}
    tasks: dict             # task_index -> task string
    stats: dict | None      # meta/stats.json, if present

    @property
    def fps(self) -> float:
        return float(self.info["fps"])

    @property
    def cameras(self) -> list[str]:
        return camera_keys(self.info)

    def instruction(self, episode_index: int) -> str:
        """The episode's language instruction from meta/episodes.jsonl ("" when it has none)."""
        tasks = self.episodes[episode_index].get("tasks") or [""]
        return str(tasks[0]).strip()


def read_json(path: Path, files: LeRobotFiles):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LeRobotFormatError(f"{files.label}: {path.name} is not valid JSON: {e}") from e


def read_jsonl(path: Path, files: LeRobotFiles) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise LeRobotFormatError(f"{files.label}: {path.name} line {n} is not valid JSON: {e}") from e
    return rows


def camera_keys(info: dict) -> list[str]:
    """Feature keys stored as video or image (the cameras), in info.json order."""
    return [k for k, f in info.get("features", {}).items() if f.get("dtype") in ("video", "image")]


def check_version(info: dict, label: str, revision: str | None = None) -> None:
    """Refuse anything but LeRobotDataset v2.x, in one line naming the file, the value and what to do."""
    version = str(info.get("codebase_version", ""))
    if not version.startswith("v2"):
        at = f" at revision {revision}" if revision else ""
        raise LeRobotFormatError(
            f"{label}{at}: meta/info.json codebase_version is {version or 'missing'}; this reader handles v2.x "
            f"(per-episode parquet and mp4 files): pass revision= a v2.x commit or tag of the dataset, or convert "
            f"it with LeRobot's v30_to_v21 script.")


def read_meta(files: LeRobotFiles) -> LeRobotMeta:
    """Read and check ``meta/``: info.json (version, required keys), episodes.jsonl, tasks.jsonl, stats.json."""
    info = read_json(files.get("meta/info.json", what=" (not a LeRobotDataset v2.x folder?)"), files)
    check_version(info, files.label, files.commit or files.revision)
    missing = [k for k in ("fps", "chunks_size", "data_path", "features") if k not in info]
    if missing:
        raise LeRobotFormatError(f"{files.label}: meta/info.json lacks key(s) {missing}")
    episodes = {int(r["episode_index"]): r for r in read_jsonl(files.get("meta/episodes.jsonl"), files)}
    tasks = {int(r["task_index"]): str(r["task"]) for r in read_jsonl(files.get("meta/tasks.jsonl"), files)}
    stats_path = files.get("meta/stats.json", required=False)
    stats = read_json(stats_path, files) if stats_path else None
    return LeRobotMeta(files=files, info=info, episodes=episodes, tasks=tasks, stats=stats)


def episode_path(info: dict, template_key: str, episode_index: int, video_key: str | None = None) -> str:
    """Fill info.json's ``data_path`` or ``video_path`` template for one episode."""
    template = info.get(template_key)
    if not template:
        raise LeRobotFormatError(f"meta/info.json has no {template_key!r} template")
    chunk = episode_index // int(info["chunks_size"])
    try:
        return template.format(episode_chunk=chunk, episode_index=episode_index, video_key=video_key)
    except (KeyError, IndexError, ValueError) as e:
        raise LeRobotFormatError(f"meta/info.json {template_key} template {template!r} cannot be filled: {e}") from e
