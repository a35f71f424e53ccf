"""Closed-loop evaluation: run a policy on every (task, seed) episode, record each episode, summarise with intervals.

    records = evaluate(policy_factory, EvaluateConfig(tasks=("lift",), episodes_per_task=20), "data/run/evaluate/x")

Output folder:
    episodes.jsonl   one JSON line per finished episode, appended and flushed as each one ends:
                     {"task", "seed", "success", "steps", "wall_s", "error", "policy_s"}
                     (``error`` is null, or the message of the exception that ended the episode)
    summary.csv      per-task success rate, n, Wilson 95% interval, plus an "average" row
    strips/<task>.png  a few evenly spaced frames of the first episode of each task (for the book)

A re-run with the same folder skips the episodes already in ``episodes.jsonl``, so a killed evaluation resumes.
Episodes run in ``workers`` processes started with the 'spawn' method (torch is not fork-safe); each worker calls
``policy_factory()`` once, so it must be picklable (a top-level function or a functools.partial of one).

Backends: a backend is a module exposing ``TASKS`` (the known task names) and ``make_task(task, image_size=...,
segmentation=...)`` returning an environment with ``reset(seed) -> obs``, ``step(action) -> (obs, success)``,
``max_steps`` and ``close()``. ``refinevla.sim`` (robosuite) is the default.
"""
from __future__ import annotations

import importlib
import json
import math
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

#: backend name -> module implementing the backend contract above
BACKENDS = {"robosuite": "refinevla.sim", "simpler": "refinevla.simpler"}

RECORD_KEYS = ("task", "seed", "success", "steps", "wall_s", "error")


@dataclass
class EvaluateConfig:
    """What to evaluate. Seeds start at ``base_seed`` (10_000: disjoint from the data stage's seeds, which start
    at 0) unless an explicit ``seeds`` list is given; every task uses the same seed list."""

    tasks: tuple[str, ...] = ("lift", "stack", "pick_place_can")
    episodes_per_task: int = 20
    base_seed: int = 10_000
    seeds: list[int] | None = None  # explicit seeds; overrides base_seed / episodes_per_task
    max_steps: int | None = None  # None = each task's own horizon
    workers: int = 1
    image_size: int = 64
    strip_frames: int = 4  # frames in the strip of each task's first episode; 0 = no strips
    backend: str = "robosuite"
    retry_errors: bool = False  # on resume, run again the episodes that ended in an error
    progress: bool = True  # tqdm bar over episodes
    reasoning: bool = True  # a VLA trained with rationales writes one before acting (False: acts directly)
    reason_every: int = 1  # re-write the rationale every N steps, reuse it in between (CPU cost of reasoning)
    teacher_rationale: bool = False  # also run ReFineVLA after the privileged teacher's rationale (an oracle)

    def seed_list(self) -> list[int]:
        """The fixed, ordered seeds every task is evaluated on."""
        if self.seeds is not None:
            return [int(s) for s in self.seeds]
        return [self.base_seed + i for i in range(self.episodes_per_task)]


def backend_module(name: str):
    """The module implementing backend ``name``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known backends: {sorted(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])


def validate(cfg: EvaluateConfig) -> list[tuple[str, int]]:
    """Check the config and return the (task, seed) episode list; a ValueError names what is wrong."""
    if not cfg.tasks:
        raise ValueError("EvaluateConfig.tasks is empty: name at least one task")
    seeds = cfg.seed_list()
    if not seeds:
        raise ValueError("the seed list is empty: set episodes_per_task > 0 or pass non-empty seeds")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"duplicate seeds in {seeds}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 or None, got {cfg.max_steps}")
    if cfg.workers < 1:
        raise ValueError(f"workers must be >= 1, got {cfg.workers}")
    known = backend_module(cfg.backend).TASKS
    unknown = [t for t in cfg.tasks if t not in known]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown} for backend {cfg.backend!r}; known tasks: {sorted(known)}")
    return [(task, seed) for task in cfg.tasks for seed in seeds]


# -----------------------------------------------------------------------------
# one episode


def run_episode(env, policy, seed: int, max_steps: int, keep_frames: bool = False) -> tuple[dict, list]:
    """Run one closed-loop episode until success or ``max_steps``; never raises.

    Returns the record (without task) and, when ``keep_frames``, the list of images seen (for the strip).
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
        error, success = f"{type(e).__name__}: {e}", False
    record = {
        "seed": int(seed),
        "success": bool(success),
        "steps": int(steps),
        "wall_s": round(time.perf_counter() - t0, 4),
        "error": error,
        "policy_s": round(policy_s, 4),
    }
    return record, frames


# -----------------------------------------------------------------------------
# workers: each holds one policy and one environment per task it has seen

_WORKER: dict = {}


def _init_worker(policy_factory, cfg: EvaluateConfig, threads: int | None = None) -> None:
    """Build this worker's policy once (each worker loads its own model).

    In a pool, ``threads`` caps the math libraries' threads so that workers x threads fits the cores (a model that
    grabs every core in every worker runs slower than one worker).
    """
    if threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(threads)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
    _WORKER.clear()
    _WORKER.update(policy=policy_factory(), cfg=cfg, envs={}, backend=backend_module(cfg.backend))


def _worker_env(task: str):
    envs = _WORKER["envs"]
    if task not in envs:
        envs[task] = _WORKER["backend"].make_task(task, image_size=_WORKER["cfg"].image_size, segmentation=False)
    return envs[task]


def _close_worker_envs() -> None:
    for env in _WORKER.get("envs", {}).values():
        try:
            env.close()
        except Exception:  # noqa: BLE001 - closing is best effort
            pass
    _WORKER.get("envs", {}).clear()


def _run_job(task: str, seed: int, strip_path: str | None) -> dict:
    """Run one episode in this worker; build the env lazily; an env that fails to build is an episode error."""
    cfg = _WORKER["cfg"]
    try:
        env = _worker_env(task)
    except Exception as e:  # noqa: BLE001
        return {"task": task, "seed": int(seed), "success": False, "steps": 0, "wall_s": 0.0,
                "error": f"{type(e).__name__}: {e}", "policy_s": 0.0}
    max_steps = cfg.max_steps or env.max_steps
    record, frames = run_episode(env, _WORKER["policy"], seed, max_steps, keep_frames=strip_path is not None)
    if record["error"] is not None:  # the env may be in a broken state: rebuild it for the next episode
        _WORKER["envs"].pop(task, None)
    if strip_path is not None and frames:
        save_strip(frames, strip_path, cfg.strip_frames)
    return {"task": task, **record}


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
    """Run every (task, seed) episode of ``cfg`` not yet in ``out_dir/episodes.jsonl``; return all records.

    ``policy_factory()`` is called once per worker process (or once here when ``workers == 1``).
    Also writes ``summary.csv`` and, for each task's first seed, ``strips/<task>.png``.
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
    done = {(r["task"], int(r["seed"])) for r in records}
    wanted = set(jobs)
    first_seed = cfg.seed_list()[0]
    todo = [
        (task, seed, str(out_dir / "strips" / f"{task}.png") if cfg.strip_frames and seed == first_seed else None)
        for task, seed in jobs
        if (task, seed) not in done
    ]
    with open(path, "a") as fh, _progress(cfg, total=len(jobs), initial=len(jobs) - len(todo)) as bar:
        for record in _run_jobs(policy_factory, cfg, todo):
            _append(fh, record)
            records.append(record)
            bar.update(1)
    records = [r for r in records if (r["task"], int(r["seed"])) in wanted]
    df = pd.DataFrame(records, columns=list(RECORD_KEYS) + ["policy_s"])
    summarise(records, tasks=cfg.tasks).to_csv(out_dir / "summary.csv")
    return df


def _run_jobs(policy_factory, cfg: EvaluateConfig, todo: list):
    """Yield finished records: in this process for one worker, else in a pool of spawned processes."""
    if not todo:
        return
    if cfg.workers == 1:
        _init_worker(policy_factory, cfg)
        try:
            for job in todo:
                yield _run_job(*job)
        finally:
            _close_worker_envs()
            _WORKER.clear()  # drop the policy (a model can be large)
        return
    # jobs are queued task by task, so each worker builds each task's environment once and then reuses it
    workers = min(cfg.workers, len(todo))
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(policy_factory, cfg, threads)) as pool:
        futures = [pool.submit(_run_job, *job) for job in todo]
        for fut in as_completed(futures):
            yield fut.result()


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


def summarise(records, tasks=None) -> pd.DataFrame:
    """One row per task (in ``tasks`` order, else first-seen order) and an "average" row.

    Columns: success_rate, successes, n, ci_low, ci_high (Wilson 95%), errors. The average row is the mean of the
    per-task rates (how the paper's tables average); its interval is Wilson's on the pooled counts.
    """
    df = pd.DataFrame(list(records), columns=list(RECORD_KEYS))
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
