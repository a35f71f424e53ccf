"""Closed-loop evaluation: run a policy on every (task, split, seed) episode, record each one, summarise with intervals.

    records = evaluate(policy_factory, EvaluateConfig(tasks=("lift",), episodes_per_task=20), "data/run/evaluate/x")

Output folder:
    episodes.jsonl   one JSON line per finished episode, appended and flushed as each one ends:
                     {"task", "split", "seed", "success", "steps", "wall_s", "error", "policy_s"}
                     (``error`` is null, or the message of the exception that ended the episode; a record written
                     before splits existed has no "split" and counts as "in_distribution")
    summary.csv      per-task success rate, n, Wilson 95% interval, plus an "average" row, for the first split of
                     ``splits``; every other split gets its own summary_<split>.csv
    strips/<task>.png  a few evenly spaced frames of the first episode of each task (strips/<task>_<split>.png for
                     a split other than in_distribution), for the book

A re-run with the same folder skips the episodes already in ``episodes.jsonl``, so a killed evaluation resumes.

Splits: "in_distribution" episodes use seeds ``base_seed + i``, "variant" episodes (scenes the training data never
showed, built by the backend's ``make_task(..., split="variant")``) use ``variant_base_seed + i``; an explicit
``seeds`` list serves both.

Execution: episodes run in ``workers`` processes started with the 'spawn' method (torch is not fork-safe); each
worker calls ``policy_factory()`` once, so it must be picklable (a top-level function or a functools.partial of
one). Each worker steps ``envs_per_worker`` environments in lockstep: every live slot's observation goes to the
policy in ONE call (``policy.act_batch(obs_list, slots)``, see ``refinevla.policy``), an episode ends at success or
at its horizon and its slot takes the next episode of the worker's queue (a contiguous chunk of the episodes,
queued task by task so that each slot reuses its environment). A policy without ``act_batch`` / ``reset_slot``
gets one instance per slot (``policy_factory()`` again: fine for the scripted or random policies). With
``envs_per_worker == 1`` episodes run one by one through :func:`run_episode`, as before. Both paths give the same
records except timings; in lockstep ``policy_s`` is the policy's time per call shared equally among the slots of
the call, and ``wall_s`` is the episode's own reset and step time plus that share.

Backends: a backend is a module exposing ``TASKS`` (the known task names) and ``make_task(task, image_size=...,
segmentation=...)`` (and, when it accepts them, ``camera=`` and ``split=``) returning an environment with
``reset(seed) -> obs``, ``step(action) -> (obs, success)``, ``max_steps`` and ``close()``. ``refinevla.sim``
(robosuite) is the default.
"""
from __future__ import annotations

import importlib
import inspect
import json
import math
import multiprocessing as mp
import os
import queue as queue_mod
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

#: backend name -> module implementing the backend contract above
BACKENDS = {"robosuite": "refinevla.sim", "simpler": "refinevla.simpler"}

RECORD_KEYS = ("task", "split", "seed", "success", "steps", "wall_s", "error")
IN_DISTRIBUTION, VARIANT = "in_distribution", "variant"
SPLITS = (IN_DISTRIBUTION, VARIANT)


@dataclass
class EvaluateConfig:
    """What to evaluate. In-distribution seeds start at ``base_seed`` (10_000: disjoint from the data stage's
    seeds, which start at 0), variant seeds at ``variant_base_seed``, unless an explicit ``seeds`` list is given;
    every task uses the same seed list."""

    tasks: tuple[str, ...] = ("pick_cube",)
    episodes_per_task: int = 20
    base_seed: int = 10_000
    seeds: list[int] | None = None  # explicit seeds; overrides base_seed / variant_base_seed / episodes_per_task
    splits: tuple[str, ...] = (IN_DISTRIBUTION,)  # in_distribution and/or variant
    variant_base_seed: int = 20_000
    max_steps: int | None = None  # None = each task's own horizon
    workers: int = 1
    envs_per_worker: int = 4  # environments each worker steps in lockstep (1 = one episode at a time)
    image_size: int = 64
    camera: str = "robot0_eye_in_hand"  # the policy camera (backends whose make_task takes ``camera``)
    strip_frames: int = 4  # frames in the strip of each task's first episode; 0 = no strips
    backend: str = "robosuite"
    retry_errors: bool = False  # on resume, run again the episodes that ended in an error
    progress: bool = True  # tqdm bar over episodes
    reasoning: bool = True  # a VLA trained with rationales writes one before acting (False: acts directly)
    rationale_frames: int = 40  # held-out frames on which a reasoning model's rationale is checked first

    def seed_list(self, split: str = IN_DISTRIBUTION) -> list[int]:
        """The fixed, ordered seeds every task is evaluated on in ``split``."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known splits: {list(SPLITS)}")
        if self.seeds is not None:
            return [int(s) for s in self.seeds]
        base = self.base_seed if split == IN_DISTRIBUTION else self.variant_base_seed
        return [base + i for i in range(self.episodes_per_task)]


def backend_module(name: str):
    """The module implementing backend ``name``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known backends: {sorted(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])


def validate(cfg: EvaluateConfig) -> list[tuple[str, str, int]]:
    """Check the config and return the (task, split, seed) episode list, task by task; a ValueError names what is
    wrong."""
    if not cfg.tasks:
        raise ValueError("EvaluateConfig.tasks is empty: name at least one task")
    splits = tuple(cfg.splits)
    if not splits:
        raise ValueError("EvaluateConfig.splits is empty: name at least one of " + ", ".join(SPLITS))
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or len(set(splits)) != len(splits):
        raise ValueError(f"bad splits {list(splits)}: each of {list(SPLITS)} at most once")
    seeds = {split: cfg.seed_list(split) for split in splits}
    for split, s in seeds.items():
        if not s:
            raise ValueError("the seed list is empty: set episodes_per_task > 0 or pass non-empty seeds")
        if len(set(s)) != len(s):
            raise ValueError(f"duplicate seeds in {s} ({split})")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 or None, got {cfg.max_steps}")
    if cfg.workers < 1:
        raise ValueError(f"workers must be >= 1, got {cfg.workers}")
    if cfg.envs_per_worker < 1:
        raise ValueError(f"envs_per_worker must be >= 1, got {cfg.envs_per_worker}")
    known = backend_module(cfg.backend).TASKS
    unknown = [t for t in cfg.tasks if t not in known]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown} for backend {cfg.backend!r}; known tasks: {sorted(known)}")
    return [(task, split, seed) for task in cfg.tasks for split in splits for seed in seeds[split]]


def record_key(record: dict) -> tuple[str, str, int]:
    """(task, split, seed) of a record (one written before splits existed is in_distribution)."""
    return record["task"], record.get("split") or IN_DISTRIBUTION, int(record["seed"])


# -----------------------------------------------------------------------------
# one episode


def run_episode(env, policy, seed: int, max_steps: int, keep_frames: bool = False) -> tuple[dict, list]:
    """Run one closed-loop episode until success or ``max_steps``; never raises.

    Returns the record (without task and split) and, when ``keep_frames``, the list of images seen (for the strip).
    An exception from the policy or the environment ends the episode with ``error`` set and success False.
    """
    t0 = time.perf_counter()
    policy_s, steps, success, error, frames = 0.0, 0, False, None, []
    try:
        obs = env.reset(seed)
        policy.reset(obs["instruction"])
        for steps in range(1, max_steps + 1):
            if keep_frames:
                frames.append(obs["image"])
            t1 = time.perf_counter()
            action = policy.act(obs)
            policy_s += time.perf_counter() - t1
            obs, success = env.step(action)
            if success:
                break
        if keep_frames:
            frames.append(obs["image"])
    except Exception as e:  # noqa: BLE001 - one bad episode must not end the run
        error, success = _error(e), False
    record = {
        "seed": int(seed),
        "success": bool(success),
        "steps": int(steps),
        "wall_s": round(time.perf_counter() - t0, 4),
        "error": error,
        "policy_s": round(policy_s, 4),
    }
    return record, frames


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


# -----------------------------------------------------------------------------
# workers: each holds one policy (or one per slot) and one environment per slot


_WORKER: dict = {}


def _init_worker(policy_factory, cfg: EvaluateConfig, threads: int | None = None, results=None) -> None:
    """Build this worker's policy once (each worker loads its own model).

    In a pool, ``threads`` caps the math libraries' threads so that workers x threads fits the cores (a model that
    grabs every core in every worker runs slower than one worker). ``results``: the queue a lockstep worker puts
    each finished record on.
    """
    if threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(threads)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
    _WORKER.clear()
    _WORKER.update(policy=policy_factory(), factory=policy_factory, cfg=cfg, envs={}, slot_policies={},
                   backend=backend_module(cfg.backend), results=results)


def _make_env(task: str, split: str):
    """The backend's environment for (task, split): ``camera`` is passed when its make_task names it, ``split``
    when it names it or the split is not in_distribution (a backend without splits then fails the episode)."""
    cfg, backend = _WORKER["cfg"], _WORKER["backend"]
    params = inspect.signature(backend.make_task).parameters
    kwargs = dict(image_size=cfg.image_size, segmentation=False)
    if "camera" in params:
        kwargs["camera"] = cfg.camera
    if "split" in params or split != IN_DISTRIBUTION:
        kwargs["split"] = split
    return backend.make_task(task, **kwargs)


def _slot_env(slot: int, task: str, split: str):
    """Slot ``slot``'s environment for (task, split), built lazily; a slot keeps one environment (jobs come task
    by task), so moving on to another (task, split) closes the previous one."""
    envs = _WORKER["envs"]
    key, held = (task, split), envs.get(slot)
    if held is not None and held[0] == key:
        return held[1]
    if held is not None:
        _close(envs.pop(slot)[1])
    env = _make_env(task, split)
    envs[slot] = (key, env)
    return env


def _drop_env(slot: int) -> None:
    """Forget the slot's environment (it may be broken after an error): the next episode builds a fresh one."""
    held = _WORKER["envs"].pop(slot, None)
    if held is not None:
        _close(held[1])


def _close(env) -> None:
    try:
        env.close()
    except Exception:  # noqa: BLE001 - closing is best effort
        pass


def _close_worker_envs() -> None:
    for _, env in _WORKER.get("envs", {}).values():
        _close(env)
    _WORKER.get("envs", {}).clear()


def _env_error_record(task: str, split: str, seed: int, e: BaseException) -> dict:
    return {"task": task, "split": split, "seed": int(seed), "success": False, "steps": 0, "wall_s": 0.0,
            "error": _error(e), "policy_s": 0.0}


def _run_job(task: str, split: str, seed: int, strip_path: str | None) -> dict:
    """Run one episode in this worker (the serial path); an env that fails to build is an episode error."""
    cfg = _WORKER["cfg"]
    try:
        env = _slot_env(0, task, split)
    except Exception as e:  # noqa: BLE001
        return _env_error_record(task, split, seed, e)
    max_steps = cfg.max_steps or env.max_steps
    record, frames = run_episode(env, _WORKER["policy"], seed, max_steps, keep_frames=strip_path is not None)
    if record["error"] is not None:  # the env may be in a broken state: rebuild it for the next episode
        _drop_env(0)
    if strip_path is not None and frames:
        save_strip(frames, strip_path, cfg.strip_frames)
    return {"task": task, "split": split, **record}


# -----------------------------------------------------------------------------
# lockstep: N environments per worker, one policy call per control step


class _Episode:
    """One episode in flight in a slot."""

    __slots__ = ("task", "split", "seed", "strip", "env", "obs", "steps", "max_steps", "success", "error",
                 "wall_s", "policy_s", "frames")

    def __init__(self, task, split, seed, strip):
        self.task, self.split, self.seed, self.strip = task, split, int(seed), strip
        self.env = self.obs = self.error = None
        self.steps, self.max_steps, self.success = 0, 0, False
        self.wall_s = self.policy_s = 0.0
        self.frames = [] if strip is not None else None

    def record(self) -> dict:
        return {"task": self.task, "split": self.split, "seed": self.seed, "success": bool(self.success),
                "steps": int(self.steps), "wall_s": round(self.wall_s, 4), "error": self.error,
                "policy_s": round(self.policy_s, 4)}


def _slot_policy(slot: int):
    """The policy instance acting for ``slot`` when the policy is not batched (slot 0: the worker's own)."""
    if slot == 0:
        return _WORKER["policy"]
    pols = _WORKER["slot_policies"]
    if slot not in pols:
        pols[slot] = _WORKER["factory"]()
    return pols[slot]


def _is_batched(policy) -> bool:
    return callable(getattr(policy, "act_batch", None)) and callable(getattr(policy, "reset_slot", None))


def _run_lockstep(jobs):
    """Yield the record of each of ``jobs`` (task, split, seed, strip_path) as its episode ends, stepping
    ``envs_per_worker`` environments in lockstep with one policy call per control step. Never raises for an
    episode's error (it is recorded, as in :func:`run_episode`)."""
    cfg = _WORKER["cfg"]
    policy = _WORKER["policy"]
    batched = _is_batched(policy)
    pending = deque(jobs)
    slots: list[_Episode | None] = [None] * cfg.envs_per_worker
    finished: list[dict] = []

    def finish(i: int) -> None:
        ep = slots[i]
        slots[i] = None
        if ep.error is not None:
            ep.success = False
            _drop_env(i)  # the env may be in a broken state: rebuild it for the next episode
        elif ep.frames is not None:
            ep.frames.append(ep.obs["image"])
        if ep.frames:
            save_strip(ep.frames, ep.strip, cfg.strip_frames)
        finished.append(ep.record())

    def start(i: int) -> None:
        """Put the next episode that starts without error into slot i (or leave it empty)."""
        while pending:
            ep = _Episode(*pending.popleft())
            try:
                ep.env = _slot_env(i, ep.task, ep.split)
            except Exception as e:  # noqa: BLE001 - an env that fails to build is an episode error
                finished.append(_env_error_record(ep.task, ep.split, ep.seed, e))
                continue
            t0 = time.perf_counter()
            try:
                ep.max_steps = cfg.max_steps or ep.env.max_steps
                ep.obs = ep.env.reset(ep.seed)
                if batched:
                    policy.reset_slot(i, ep.obs["instruction"])
                else:
                    _slot_policy(i).reset(ep.obs["instruction"])
            except Exception as e:  # noqa: BLE001
                ep.error = _error(e)
            ep.wall_s += time.perf_counter() - t0
            slots[i] = ep
            if ep.error is not None:
                finish(i)
                continue
            return

    for i in range(len(slots)):
        start(i)
    yield from finished
    finished.clear()
    while any(ep is not None for ep in slots):
        live = [i for i, ep in enumerate(slots) if ep is not None]
        for i in live:
            ep = slots[i]
            ep.steps += 1
            if ep.frames is not None:
                ep.frames.append(ep.obs["image"])
        actions = _act(policy, batched, [slots[i].obs for i in live], live)
        for i, (action, error, share) in zip(live, actions):
            ep = slots[i]
            ep.policy_s += share
            ep.wall_s += share
            if error is not None:
                ep.error = error
                finish(i)
                continue
            t0 = time.perf_counter()
            try:
                ep.obs, ep.success = ep.env.step(action)
            except Exception as e:  # noqa: BLE001
                ep.error = _error(e)
            ep.wall_s += time.perf_counter() - t0
            if ep.error is not None or ep.success or ep.steps >= ep.max_steps:
                finish(i)
        for i in live:
            if slots[i] is None:
                start(i)
        yield from finished
        finished.clear()


def _act(policy, batched: bool, obs_list: list[dict], live: list[int]) -> list[tuple]:
    """(action, error, policy seconds) per live slot: one act_batch call for a batched policy (if it raises, each
    slot is asked alone so that the error lands on the episode that caused it), else each slot's own policy."""
    out = []
    if batched:
        t0 = time.perf_counter()
        try:
            actions = policy.act_batch(obs_list, live)
            share = (time.perf_counter() - t0) / len(live)
            return [(a, None, share) for a in actions]
        except Exception:  # noqa: BLE001 - find the slot(s) it was
            pass
        for obs, i in zip(obs_list, live):
            t0 = time.perf_counter()
            try:
                out.append((policy.act_batch([obs], [i])[0], None, time.perf_counter() - t0))
            except Exception as e:  # noqa: BLE001
                out.append((None, _error(e), time.perf_counter() - t0))
        return out
    for obs, i in zip(obs_list, live):
        t0 = time.perf_counter()
        try:
            out.append((_slot_policy(i).act(obs), None, time.perf_counter() - t0))
        except Exception as e:  # noqa: BLE001
            out.append((None, _error(e), time.perf_counter() - t0))
    return out


def _run_chunk(jobs) -> int:
    """A pool worker's share: run ``jobs`` in lockstep, putting each record on the results queue as its episode
    ends (so that the parent writes it at once); returns how many it put."""
    results, n = _WORKER["results"], 0
    for record in _run_lockstep(jobs):
        results.put(record)
        n += 1
    return n


# -----------------------------------------------------------------------------
# records on disk


def read_records(path) -> list[dict]:
    """Episode records of an ``episodes.jsonl`` (missing file = none; a torn last line is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill: that episode runs again
    return records


def _append(fh, record: dict) -> None:
    fh.write(json.dumps(record) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def evaluate(policy_factory, cfg: EvaluateConfig, out_dir) -> pd.DataFrame:
    """Run every (task, split, seed) episode of ``cfg`` not yet in ``out_dir/episodes.jsonl``; return all records
    of ``cfg``'s episodes, in episode order (the file holds them in the order they ended).

    ``policy_factory()`` is called once per worker process (or once here when ``workers == 1``), and once more per
    extra slot for a policy that cannot act in batch. Also writes ``summary.csv`` (``summary_<split>.csv`` for a
    second split) and, for each task's first seed, ``strips/<task>.png``.
    """
    jobs = validate(cfg)
    out_dir = Path(out_dir)
    (out_dir / "strips").mkdir(parents=True, exist_ok=True)
    path = out_dir / "episodes.jsonl"
    records = read_records(path)
    if cfg.retry_errors:
        records = [r for r in records if r.get("error") is None]
    if cfg.retry_errors or _is_torn(path):
        _rewrite(path, records)  # keep only whole records, so that appended lines start on a fresh line
    done = {record_key(r) for r in records}
    order = {job: k for k, job in enumerate(jobs)}
    first_seed = {split: cfg.seed_list(split)[0] for split in cfg.splits}
    todo = [(task, split, seed, strip_path(out_dir, task, split) if cfg.strip_frames and seed == first_seed[split]
             else None)
            for task, split, seed in jobs if (task, split, seed) not in done]
    with open(path, "a") as fh, _progress(cfg, total=len(jobs), initial=len(jobs) - len(todo)) as bar:
        for record in _run_jobs(policy_factory, cfg, todo):
            _append(fh, record)
            records.append(record)
            bar.update(1)
    records = sorted((dict(r, split=record_key(r)[1]) for r in records if record_key(r) in order),
                     key=lambda r: order[record_key(r)])
    df = pd.DataFrame(records, columns=list(RECORD_KEYS) + ["policy_s"])
    for k, split in enumerate(cfg.splits):
        name = "summary.csv" if k == 0 else f"summary_{split}.csv"
        summarise(records, tasks=cfg.tasks, split=split).to_csv(out_dir / name)
    return df


def strip_path(out_dir, task: str, split: str = IN_DISTRIBUTION) -> str:
    """Where the strip of (task, split)'s first episode goes."""
    name = task if split == IN_DISTRIBUTION else f"{task}_{split}"
    return str(Path(out_dir) / "strips" / f"{name}.png")


def _run_jobs(policy_factory, cfg: EvaluateConfig, todo: list):
    """Yield finished records: in this process for one worker, else in a pool of spawned processes."""
    if not todo:
        return
    if cfg.workers == 1:
        _init_worker(policy_factory, cfg)
        try:
            if cfg.envs_per_worker == 1:
                for job in todo:
                    yield _run_job(*job)
            else:
                yield from _run_lockstep(todo)
        finally:
            _close_worker_envs()
            _WORKER.clear()  # drop the policy (a model can be large)
        return
    workers = min(cfg.workers, len(todo))
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = mp.get_context("spawn")
    if cfg.envs_per_worker == 1:  # one future per episode; queued task by task, so each worker reuses its envs
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(policy_factory, cfg, threads)) as pool:
            futures = [pool.submit(_run_job, *job) for job in todo]
            for fut in as_completed(futures):
                yield fut.result()
        return
    # lockstep: each worker gets one contiguous chunk of the episodes and sends each record back as it ends
    results = ctx.Queue()
    chunks = [list(c) for c in np.array_split(np.arange(len(todo)), workers)]
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(policy_factory, cfg, threads, results)) as pool:
        futures = {pool.submit(_run_chunk, [todo[k] for k in chunk]) for chunk in chunks if chunk}
        expected, received, failure = 0, 0, None
        while futures or received < expected:
            try:
                record = results.get(timeout=0.1)
            except queue_mod.Empty:
                for fut in [f for f in futures if f.done()]:
                    futures.discard(fut)
                    try:
                        expected += fut.result()
                    except Exception as e:  # noqa: BLE001 - a worker died: finish draining the others first
                        failure = failure or e
                if failure is not None and not futures:
                    break
                continue
            received += 1
            yield record
    if failure is not None:
        raise failure


def _is_torn(path: Path) -> bool:
    """True when the file's last line was cut short (no final newline), e.g. by a kill mid-write."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) != b"\n"


def _rewrite(path: Path, records: list[dict]) -> None:
    with open(path, "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")


def _progress(cfg: EvaluateConfig, total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="episodes", unit="ep", disable=not cfg.progress)


# -----------------------------------------------------------------------------
# strips


def save_strip(frames: list, path, n: int = 4, min_height: int = 128) -> None:
    """Save ``n`` evenly spaced frames (first and last included) side by side as one PNG, upscaled to be legible."""
    from PIL import Image

    idx = np.unique(np.linspace(0, len(frames) - 1, max(1, n)).round().astype(int))
    picked = [np.asarray(frames[i], dtype=np.uint8) for i in idx]
    h, w = picked[0].shape[:2]
    gap = 2
    strip = np.full((h, len(picked) * (w + gap) - gap, 3), 255, np.uint8)
    for k, img in enumerate(picked):
        strip[:, k * (w + gap): k * (w + gap) + w] = img
    scale = max(1, math.ceil(min_height / h))
    image = Image.fromarray(strip).resize((strip.shape[1] * scale, h * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


# -----------------------------------------------------------------------------
# metrics


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (sound at k = 0 or k = n, unlike the normal one)."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarise(records, tasks=None, split: str | None = None) -> pd.DataFrame:
    """One row per task (in ``tasks`` order, else first-seen order) and an "average" row.

    Columns: success_rate, successes, n, ci_low, ci_high (Wilson 95%), errors. The average row is the mean of the
    per-task rates (how the paper's tables average); its interval is Wilson's on the pooled counts.
    ``split``: only the records of this split (a record without "split" is in_distribution); None: all records.
    """
    records = list(records)
    if split is not None:
        records = [r for r in records if (r.get("split") or IN_DISTRIBUTION) == split]
    df = pd.DataFrame(records, columns=list(RECORD_KEYS))
    if tasks is None:
        tasks = list(dict.fromkeys(df["task"]))
    rows = {}
    for task in tasks:
        sub = df[df["task"] == task]
        k, n = int(sub["success"].astype(bool).sum()), len(sub)
        rows[task] = _row(k, n, k / n if n else float("nan"), int(sub["error"].notna().sum()))
    per_task = pd.DataFrame.from_dict(rows, orient="index")
    k, n = int(per_task["successes"].sum()) if rows else 0, int(per_task["n"].sum()) if rows else 0
    mean_rate = float(per_task["success_rate"].mean()) if rows else float("nan")
    rows["average"] = _row(k, n, mean_rate, int(per_task["errors"].sum()) if rows else 0)
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "task"
    return out


def _row(k: int, n: int, rate: float, errors: int) -> dict:
    lo, hi = wilson_interval(k, n)
    return {"success_rate": rate, "successes": k, "n": n, "ci_low": lo, "ci_high": hi, "errors": errors}


def compare_table(summaries: dict, ci: bool = False) -> pd.DataFrame:
    """The paper's table shape: one row per task (+ average), one column per model.

    ``summaries`` maps a model name to its :func:`summarise` frame. Cells are success rates in [0, 1], or with
    ``ci`` strings such as ``"57.5% [42.2, 71.5]"``. A task a model was not evaluated on is NaN / "".
    """
    if not summaries:
        raise ValueError("compare_table needs at least one model summary")
    tasks = list(dict.fromkeys(t for s in summaries.values() for t in s.index if t != "average")) + ["average"]
    table = pd.DataFrame(index=pd.Index(tasks, name="task"))
    for model, s in summaries.items():
        if ci:
            table[model] = [_cell(s.loc[t]) if t in s.index else "" for t in tasks]
        else:
            table[model] = [float(s.loc[t, "success_rate"]) if t in s.index else float("nan") for t in tasks]
    return table


def _cell(row) -> str:
    return f"{100 * row['success_rate']:.1f}% [{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]"
