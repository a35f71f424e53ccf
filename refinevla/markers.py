"""Stage bookkeeping: completion markers, stage keys that cover config *and* code, reuse of finished stages
across run folders, and which process writes what under ``accelerate launch``.

A stage folder is finished when its ``_done.json`` holds the stage's key. The key hashes

1. the config sections the stage reads;
2. the markers of its input stages, so a stage re-runs when anything upstream re-ran;
3. the code it runs (``code_hash``): the source of every ``refinevla`` module its entry modules (``code`` in its
   declaration, refinevla.stages) import, followed through every relative import (``from .x import``,
   ``from . import x``, including imports inside functions, so the set is a superset of what runs), and the
   installed versions of the distributions the stage depends on (its ``dists``: torch, transformers, peft,
   robosuite, ...). Editing ``train.py`` re-runs the pre-training and
   the fine-tunes and what depends on them, not the demonstrations; upgrading robosuite re-runs the demonstrations
   and the evaluations.

A marker also lists every file the stage wrote, with its size and sha256 (refinevla.integrity): ``ready`` calls a
stage up to date only when they are whole (else it names the damaged file in one line, moves it to
``<stage>/.damaged/`` and re-runs the stage), and ``require_current`` refuses a damaged input in one line.

Not hashed: the orchestration and configuration modules (``ORCHESTRATION``: pipeline, markers, stages, cli, config,
book, report). What they hand a stage is its config, which the key covers; editing them re-runs nothing. Nor are the
Python version, CUDA, the GPU, or data files outside the package; ``refinevla <stage> --force STAGE`` re-runs a
stage whatever its marker says.

Reuse: a key names no run folder, so a stage finished in ``data/A/<stage>`` is the stage ``data/B/<stage>`` needs
when their keys match; ``reuse`` copies it (hard links for files of 1 MiB and more, which every stage writes
through a temporary file and a rename, never in place) and writes ``_reused_from``. ``--run lambda025 -p
lambda_reason 0.25`` thus recomputes only the ReFineVLA fine-tunes and what depends on them.

Several processes (``accelerate launch``): only the main process (RANK 0) writes markers, config.yaml and stage
outputs; the others wait for the marker (``wait_for_marker``, a file poll: no collective timeout however long the
main process works) and, before a training stage they take part in, for the main process to have decided whether
to run it and to have prepared its folder (``sync`` / ``barrier``: torch.distributed.barrier once accelerate's
PartialState has set up the process group; a file wait for ``_key`` when there is no group). Every atomic write
uses a temporary name unique to the process. Multi-node runs need a shared file system for ``data/``.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

from .config import config_hash
from .integrity import DamagedFileError, damage, describe, manifest, set_aside
from . import stages

PACKAGE = Path(__file__).parent
MARKER = "_done.json"
REUSED = "_reused_from"
LINK_MIN_BYTES = 1 << 20
#: the partial outputs a training stage resumes from when its key is unchanged (``start_stage``)
RESUMED_TRAINING = ("ckpt", "metrics.jsonl")
ORCHESTRATION = ("pipeline", "markers", "stages", "cli", "config", "book", "report", "__init__")


class StaleInputError(RuntimeError):
    """A stage's input was made under another config (or not at all); the message is one line with the fix."""


# --------------------------------------------------------------------------------------------- code hashes
def stage_code() -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """stage -> (entry modules of refinevla, distributions whose installed version the stage's results depend on),
    as each stage declares them (refinevla.stages)."""
    return {stage.name: (stage.code, stage.dists) for stage in stages.STAGES}


_parsed: dict[tuple, list[str]] = {}


def _module_file(name: str, package_dir: Path) -> Path | None:
    """refinevla.a.b -> <package_dir>/a/b/__init__.py or <package_dir>/a/b.py, in Python's order (a package wins
    over a module of the same name); None: not a module here."""
    parts = name.split(".")[1:]
    if not parts:
        return package_dir / "__init__.py"
    base = package_dir.joinpath(*parts)
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _imports(path: Path, name: str, package_dir: Path) -> list[str]:
    """The refinevla modules ``path`` (module ``name``) imports, anywhere in its body."""
    stat = path.stat()
    cache_key = (str(path), stat.st_mtime_ns, stat.st_size)
    if cache_key not in _parsed:
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = []
        for node in ast.walk(ast.parse(path.read_bytes())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                elif node.module and node.module.split(".")[0] == "refinevla":
                    target = node.module
                else:
                    continue
                found.append(target)
                found += [f"{target}.{alias.name}" for alias in node.names]  # `from . import x`: x may be a module
            elif isinstance(node, ast.Import):
                found += [a.name for a in node.names if a.name.split(".")[0] == "refinevla"]
        _parsed[cache_key] = found
    return _parsed[cache_key]


def code_files(stage: str, package_dir: Path = PACKAGE) -> list[Path]:
    """The package source files a stage's key covers (its entry modules and everything they import)."""
    skip = {f"refinevla.{m}" for m in ORCHESTRATION} - {"refinevla.__init__"} | {"refinevla"}
    todo = [f"refinevla.{m}" for m in stage_code()[stage][0]]
    seen, files = set(), {}
    while todo:
        name = todo.pop()
        if name in seen or name in skip:
            continue
        seen.add(name)
        path = _module_file(name, package_dir)
        if path is None:
            continue
        files[name] = path
        todo += _imports(path, name, package_dir)
    return [files[n] for n in sorted(files)]


def installed_versions(dists) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in dists:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def pinned_code_hashes() -> dict[str, str]:
    """This process's code hashes, for the worker processes it starts (``pin_code_hashes``), so that one run
    labels every output with the code as it was when the run started."""
    return {stage: code_hash(stage) for stage in stage_code()}


def pin_code_hashes(hashes: dict[str, str]) -> None:
    _PINNED.update(hashes)


_PINNED: dict[str, str] = {}


def code_hash(stage: str, package_dir: Path = PACKAGE) -> str:
    """Hash of the sources ``code_files(stage)`` (path relative to the package, bytes) and the versions of the
    stage's distributions; computed once per process (the code a process runs is the code it started with, even
    if the files are edited meanwhile; ``_code_hash.cache_clear()`` forgets it), or the hash pinned by the process
    that started this one."""
    if package_dir == PACKAGE and stage in _PINNED:
        return _PINNED[stage]
    return _code_hash(stage, package_dir)


@functools.lru_cache(maxsize=None)
def _code_hash(stage: str, package_dir: Path = PACKAGE) -> str:
    h = hashlib.sha256()
    for path in code_files(stage, package_dir):
        h.update(str(path.relative_to(package_dir)).encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(json.dumps(installed_versions(stage_code()[stage][1]), sort_keys=True).encode())
    return h.hexdigest()[:16]


# -------------------------------------------------------------------------------------------------- markers
def read_marker(stage_dir: Path) -> dict | None:
    path = Path(stage_dir) / MARKER
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except json.JSONDecodeError:
        return None  # never written whole by this code (atomic); treated as not finished


def stage_key(section_cfgs, inputs=(), code: str | None = None) -> str:
    """Hash of a stage's config sections, its input stages' markers and (``code``: a stage's name) its code."""
    upstream = [(read_marker(d) or {}).get("hash", "missing") for d in inputs]
    extra = [f"code:{code}:{code_hash(code)}"] if code else []
    return config_hash(*section_cfgs, *upstream, *extra)


def is_done(stage_dir: Path, key: str) -> bool:
    marker = read_marker(stage_dir)
    return marker is not None and marker.get("hash") == key


def atomic_write(path: Path, text: str) -> None:
    """Write a file whole or not at all; the temporary name is unique to the process (several may race)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def mark_done(stage_dir: Path, key: str, cfg, started: float, **extra) -> None:
    """Save the run config beside the outputs, then the marker (atomically, last). Main process only."""
    import yaml

    if not is_main():
        return
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(stage_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    marker = dict(hash=key, started=round(started, 3), finished=time.strftime("%Y-%m-%d %H:%M:%S"),
                  wall_s=round(time.time() - started, 1), **extra, files=manifest(stage_dir))
    atomic_write(stage_dir / MARKER, json.dumps(marker, indent=1))


def clear_marker(stage_dir: Path) -> None:
    if is_main():
        (Path(stage_dir) / MARKER).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- stage start
def ready(run_dir: Path, out: Path, key: str, forced: bool, what: str) -> bool:
    """Whether ``out`` holds the finished stage: up to date, or (main process) copied from another run folder
    where the same stage finished under the same key."""
    if forced:
        return False
    if is_done(out, key):
        found = damage(out, read_marker(out))
        if not found:
            print(f"{what}: up to date in {out}")
            return True
        print(f"{what}: {describe(found)}; re-running {what} (damaged files kept in {Path(out) / '.damaged'})",
              flush=True)
        if is_main():  # nothing is deleted: the stage re-runs (and resumes) over its folder
            clear_marker(out)
            set_aside(out, found)
    source = reuse(out, key, run_dir)
    if source is not None:
        print(f"{what}: reused from {source} (same key {key})")
        return True
    return False


def others_wait(out: Path, key: str, forced: bool, entered: float) -> bool:
    """A stage the main process runs alone: the other processes wait for its marker (True for them)."""
    if is_main():
        return False
    wait_for_marker(out, key, not_before=entered - 60 if forced else None)
    return True


def start_stage(out: Path, key: str, partial=RESUMED_TRAINING, fresh: bool = False,
                collective: bool = False) -> None:
    """Before (re)starting a stage (main process; in a ``collective`` stage, one every process takes part in, the
    others wait for it at ``barrier``): its partial outputs (checkpoints and metrics of a training stage, the
    episodes of an evaluation) are resumed only if they were written under the same key (config + inputs + code);
    those of another key are deleted, never resumed.
    ``fresh`` (a forced stage): nothing is resumed; a stage without ``partial`` outputs is emptied whole."""
    out = Path(out)
    if is_main():
        unshare(out)  # a copy of another run's stage, or files linked to one, is never written into
        clear_marker(out)
        if fresh and not partial:
            shutil.rmtree(out, ignore_errors=True)
        if fresh or _stale_checkpoint(out, key):
            for name in partial:
                path = out / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "_key", key)
    if collective:
        barrier(out, key)


class StageRun:
    """The bookkeeping every stage folder shares, for one call of a stage (``forced``: re-run whatever the markers
    say): ``done`` (up to date, copied from another run, or left to the main process), then ``writing`` (start the
    folder, run the body, write the marker last)."""

    def __init__(self, cfg, forced: bool = False):
        self.cfg, self.forced, self.entered = cfg, forced, time.time()

    def done(self, out: Path, key: str, what: str, collective: bool = False) -> bool:
        """Whether this process need not run the stage in ``out``: it is up to date or was copied from another run
        folder; or, in a stage the main process runs alone, this process waited for the main one's marker. In a
        ``collective`` stage (one every process trains in) all processes decide alike."""
        found = ready(self.cfg.run_dir, out, key, self.forced, what)
        if not collective:
            return found or others_wait(out, key, self.forced, self.entered)
        sync()  # every process decides alike (the main one may have copied the stage from another run)
        return found or (not is_main() and not self.forced and is_done(out, key))

    @contextlib.contextmanager
    def writing(self, out: Path, key: str, partial=(), collective: bool = False):
        """Start (or resume) the stage in ``out`` (start_stage), run the body, then write its marker with
        the entries the body put into the dict it is given; in a ``collective`` stage the other processes then wait
        for the main one (which saves the model after the last step)."""
        start_stage(out, key, partial=partial, fresh=self.forced, collective=collective)
        started, extra = time.time(), {}
        yield extra
        mark_done(out, key, self.cfg, started, **extra)
        if collective:
            others_wait(out, key, self.forced, self.entered)


def _stale_checkpoint(out: Path, key: str) -> bool:
    key_file = out / "_key"
    return not key_file.exists() or key_file.read_text().strip() != key


# ------------------------------------------------------------------------------------------- input checks
def require_current(cfg, stage_dir: Path, expected: str, what: str, fix: str, sections=()) -> dict:
    """``stage_dir``'s marker, if it holds the key the current config expects and its files are whole; else a
    one-line StaleInputError naming up to three config keys that differ from the config.yaml saved beside it, or
    a DamagedFileError naming the damaged file, and the fix."""
    marker = read_marker(stage_dir)
    if marker is not None and marker.get("hash") == expected:
        found = damage(stage_dir, marker)
        if found:
            raise DamagedFileError(f"{what}: {describe(found)}; {fix}")
        return marker
    if marker is None:
        state = "is not finished"
    else:
        state = f"was made under key {marker.get('hash')}, the current config gives {expected}"
        diff = _config_diff(cfg, Path(stage_dir) / "config.yaml", sections)
        state += f" ({'; '.join(diff)})" if diff else ""
    raise StaleInputError(f"{what}: {stage_dir} {state}; {fix}")


def _config_diff(cfg, saved: Path, sections=()) -> list[str]:
    import yaml

    if not saved.exists():
        return []
    there, here = yaml.safe_load(saved.read_text()) or {}, cfg.to_dict()
    out = []
    for section in sections or [s for s in here if isinstance(here[s], dict)]:
        a, b = there.get(section) or {}, here.get(section) or {}
        out += [f"{section}.{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in b if a.get(k) != b.get(k)]
    return out[:3]


# ---------------------------------------------------------------------------------------------------- reuse
def _link_or_copy(src: str, dst: str) -> None:
    if os.path.getsize(src) >= LINK_MIN_BYTES and not src.endswith(".jsonl"):
        try:
            os.link(src, dst)
            return
        except OSError:  # another file system, or links not allowed
            pass
    shutil.copy2(src, dst)


def find_finished(out: Path, key: str, run_dir: Path) -> Path | None:
    """The same stage folder of another run under the same root, finished under ``key``."""
    out, run_dir = Path(out), Path(run_dir)
    rel = out.relative_to(run_dir)
    if not run_dir.parent.is_dir():
        return None
    for other in sorted(run_dir.parent.iterdir()):
        if other == run_dir or other.name.startswith(("_", ".")) or not other.is_dir():
            continue
        candidate = other / rel
        if is_done(candidate, key) and not candidate.is_symlink():
            found = damage(candidate, read_marker(candidate))
            if not found:
                return candidate
            print(f"not reused: {describe(found)}", flush=True)
    return None


def reuse(out: Path, key: str, run_dir: Path) -> Path | None:
    """Copy a finished stage with this key from another run folder into ``out`` (main process only); returns the
    source, or None when there is none. Whatever ``out`` held is replaced."""
    source = find_finished(out, key, run_dir)
    if source is None or not is_main():
        return None
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.reuse")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, copy_function=_link_or_copy, symlinks=True)
    (tmp / REUSED).write_text(str(source) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return source


def unshare(out: Path) -> None:
    """Before a stage re-runs in ``out``: a folder copied from another run is removed whole (nothing in it is a
    partial result of this run), and any file still hard-linked elsewhere is replaced by a private copy, so that
    no write here can reach another run folder."""
    out = Path(out)
    if (out / REUSED).exists():
        shutil.rmtree(out)
        return
    if not out.is_dir():
        return
    for path in out.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_nlink > 1:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.own")
            shutil.copy2(path, tmp)
            os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ several processes
def rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main() -> bool:
    """The process that writes (RANK 0; the only one outside ``accelerate launch`` / torchrun)."""
    return rank() == 0


def _process_group() -> bool:
    """Whether a torch.distributed group is (or, under accelerate launch, can be) set up."""
    if world_size() <= 1:
        return False
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    if dist.is_available() and dist.is_initialized():
        return True
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        from accelerate import PartialState

        PartialState()  # sets up the process group from accelerate launch's environment
        return dist.is_initialized()
    return False


def wait_until(check, what: str, timeout_s: float | None = None, poll_s: float = 0.5):
    start = time.time()
    while True:
        value = check()
        if value:
            return value
        if timeout_s is not None and time.time() - start > timeout_s:
            raise TimeoutError(f"rank {rank()}: gave up after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def wait_for_marker(out: Path, key: str, not_before: float | None = None, timeout_s: float | None = None) -> dict:
    """Non-main processes: wait until the main process has finished ``out`` under ``key`` (a stage started no
    earlier than ``not_before`` when it was forced to re-run)."""
    def finished():
        m = read_marker(out)
        ok = m is not None and m.get("hash") == key and (not_before is None or m.get("started", 0) >= not_before)
        return m if ok else None
    return wait_until(finished, f"{out}/{MARKER} with key {key}", timeout_s)


def sync() -> None:
    """All processes meet here when a process group exists (``accelerate launch``); a no-op otherwise."""
    if _process_group():
        import torch.distributed as dist

        dist.barrier()


def barrier(out: Path, key: str, timeout_s: float | None = None) -> None:
    """All processes of a training stage: return once the main process has prepared ``out`` for ``key``."""
    if world_size() <= 1:
        return
    if _process_group():
        sync()
    elif not is_main():
        key_file = Path(out) / "_key"
        wait_until(lambda: key_file.exists() and key_file.read_text().strip() == key, f"{key_file} = {key}",
                   timeout_s)


# ------------------------------------------------------------------------------------------------- times
def stage_times(run_dir) -> "pd.DataFrame":  # noqa: F821
    """Wall time of every stage of the run (from its marker), in pipeline order; a stage copied from another run
    folder is listed with "(reused)" and left out of both totals."""
    import pandas as pd

    rows = []
    for marker in sorted(Path(run_dir).rglob("_done.json"), key=lambda p: p.stat().st_mtime):
        m = json.loads(marker.read_text())
        reused = (marker.parent / REUSED).exists()
        rows.append(dict(stage=str(marker.parent.relative_to(Path(run_dir))) + (" (reused)" if reused else ""),
                         wall_s=m.get("wall_s"), finished=m.get("finished"), reused=reused))
    table = pd.DataFrame(rows, columns=["stage", "wall_s", "finished", "reused"])
    own = table[~table["reused"].astype(bool)]
    table = table.drop(columns="reused")
    if own.empty:
        return table
    ends = pd.to_datetime(own["finished"])
    first_start = (ends - pd.to_timedelta(own["wall_s"], unit="s")).min()
    summary = [dict(stage="sum of the stages (fine-tunes run side by side, so this counts them twice)",
                    wall_s=round(own["wall_s"].sum(), 1), finished=""),
               dict(stage="wall clock, first stage start to last stage end",
                    wall_s=round((ends.max() - first_start).total_seconds(), 1), finished="")]
    return pd.concat([table, pd.DataFrame(summary)], ignore_index=True)
