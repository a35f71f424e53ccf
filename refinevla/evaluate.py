"""Closed-loop evaluation: run a policy on every (task, split, seed) episode, record each one, summarise with intervals.

    records = evaluate(policy_factory, EvaluateConfig(tasks=("lift",), episodes_per_task=20), "data/run/evaluate/x")

Output folder:
    episodes.jsonl   one JSON line per finished episode, appended and flushed as each one ends (``refinevla.records``)
    summary.csv      per-task success rate, n, Wilson 95% interval, plus an "average" row, for the first split of
                     ``splits``; every other split gets its own summary_<split>.csv
    strips/<task>.png  a few evenly spaced frames of the first episode of each task (strips/<task>_<split>.png for
                     a split other than in_distribution), for the book
    videos/<task>_<split>_<success|failure>.gif  the first success and the first failure of each task and split
                     (where they exist; ``videos``), with the step, the outcome and the policy's rationale as caption

A re-run with the same folder skips the episodes already in ``episodes.jsonl``, so a killed evaluation resumes.

Splits: "in_distribution" episodes use seeds ``base_seed + i``, "variant" episodes (scenes the training data never
showed, built by the backend's ``make_task(..., split="variant")``) use ``variant_base_seed + i``; an explicit
``seeds`` list serves both.

Execution (``refinevla.rollout``): episodes run in ``workers`` processes started with the 'spawn' method (torch is
not fork-safe); each worker calls ``policy_factory()`` once, so it must be picklable (a top-level function or a
functools.partial of one). Each worker steps ``envs_per_worker`` environments in lockstep, one policy call per
control step; with ``envs_per_worker == 1`` episodes run one by one. Both give the same records except timings.
A :class:`WorkerPool` keeps the workers, their environments and their last model from one call to the next.

Backends (``refinevla.backends``): ``robosuite`` (``refinevla.sim``) is the default; ``simpler_env`` (alias
``simpler``) and ``maniskill3`` run SimplerEnv's own protocol (``refinevla.backends.simpler.run``) with the run
config's ``simpler_*`` settings, through the same episode loop and record writer.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pandas as pd

from . import rollout
from .backends import BACKENDS, PROTOCOL_BACKENDS, backend_module  # noqa: F401  (BACKENDS: the registry)
from .config import IN_DISTRIBUTION, SPLITS, VARIANT, EvaluateConfig  # noqa: F401 - defined with the run config
from .records import RECORD_KEYS, EpisodeLog, compare_table, read_records, record_key, summarise  # noqa: F401
from .rollout import run_episode, video_path  # noqa: F401  (re-exported: the one episode loop)

__all__ = ["EvaluateConfig", "evaluate", "WorkerPool", "episode_jobs", "strip_path", "video_path", "run_episode", "read_records",
           "summarise", "compare_table", "RECORD_KEYS", "BACKENDS", "backend_module", "SPLITS",
           "IN_DISTRIBUTION", "VARIANT"]


def episode_jobs(cfg: EvaluateConfig) -> list[tuple[str, str, int]]:
    """Check the config and return the (task, split, seed) episode list, task by task; a ValueError names what is
    wrong. For a protocol backend (SimplerEnv), the (task, setting, seed) keys of its episode plan."""
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
    module = backend_module(cfg.backend)
    unknown = [t for t in cfg.tasks if t not in module.TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown} for backend {cfg.backend!r}; known tasks: {sorted(module.TASKS)}")
    if cfg.backend in PROTOCOL_BACKENDS:
        plan = module.episode_plan(module.SimplerConfig.from_evaluate(cfg))
        return [(s.task, s.setting, s.seed) for s in plan]
    return [(task, split, seed) for task in cfg.tasks for split in splits for seed in seeds[split]]


def strip_path(out_dir, task: str, split: str = IN_DISTRIBUTION) -> str:
    """Where the strip of (task, split)'s first episode goes."""
    name = task if split == IN_DISTRIBUTION else f"{task}_{split}"
    return str(Path(out_dir) / "strips" / f"{name}.png")


def evaluate(policy_factory, cfg: EvaluateConfig, out_dir, pool: WorkerPool | None = None) -> pd.DataFrame:
    """Run every (task, split, seed) episode of ``cfg`` not yet in ``out_dir/episodes.jsonl``; return all records
    of ``cfg``'s episodes, in episode order (the file holds them in the order they ended).

    ``policy_factory()`` is called once per worker process (or once here when ``workers == 1``), and once more per
    extra slot for a policy that cannot act in batch. Also writes ``summary.csv`` (``summary_<split>.csv`` for a
    second split), for each task's first seed ``strips/<task>.png``, and the videos. A protocol backend
    (``simpler_env``, ``maniskill3``) runs SimplerEnv's protocol instead and returns its records. ``pool``: a
    :class:`WorkerPool` made for ``cfg`` whose workers run the episodes (they outlive this call).
    """
    jobs = episode_jobs(cfg)
    if pool is not None and pool.cfg != cfg:
        raise ValueError("evaluate: the WorkerPool was made for another EvaluateConfig")
    if cfg.backend in PROTOCOL_BACKENDS:
        return backend_module(cfg.backend).run(policy_factory, cfg, out_dir)
    out_dir = Path(out_dir)
    (out_dir / "strips").mkdir(parents=True, exist_ok=True)
    log = EpisodeLog(out_dir / "episodes.jsonl", record_key, cfg.retry_errors)
    first_seed = {split: cfg.seed_list(split)[0] for split in cfg.splits}
    videos = str(out_dir / "videos") if getattr(cfg, "videos", False) else None
    todo = [(task, split, seed, strip_path(out_dir, task, split) if cfg.strip_frames and seed == first_seed[split]
             else None, videos)
            for task, split, seed in log.todo(jobs)]
    with _progress(cfg, total=len(jobs), initial=len(jobs) - len(todo)) as bar:
        for _ in log.append(_run_jobs(policy_factory, cfg, todo, pool)):
            bar.update(1)
    records = [dict(r, split=record_key(r)[1]) for r in log.in_order(jobs)]
    df = pd.DataFrame(records, columns=list(RECORD_KEYS) + ["policy_s"])
    for k, split in enumerate(cfg.splits):
        name = "summary.csv" if k == 0 else f"summary_{split}.csv"
        summarise(records, tasks=cfg.tasks, split=split).to_csv(out_dir / name)
    return df


def _run_jobs(policy_factory, cfg: EvaluateConfig, todo: list, pool: WorkerPool | None = None):
    """Yield finished records: in ``pool`` when given, in this process for one worker, else in a pool of spawned
    processes made for this call."""
    if not todo:
        return
    if pool is not None:
        yield from pool.run(policy_factory, todo)
        return
    if cfg.workers == 1:
        rollout.init_worker(policy_factory, cfg)
        try:
            if cfg.envs_per_worker == 1:
                for job in todo:
                    yield rollout.run_job(*job)
            else:
                yield from rollout.run_lockstep(todo)
        finally:
            rollout.close_worker()
        return
    workers = min(cfg.workers, len(todo))
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = mp.get_context("spawn")
    if cfg.envs_per_worker == 1:  # one future per episode; queued task by task, so each worker reuses its envs
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=rollout.init_worker,
                                 initargs=(policy_factory, cfg, threads)) as pool:
            futures = [pool.submit(rollout.run_job, *job) for job in todo]
            for fut in as_completed(futures):
                yield fut.result()
        return
    # lockstep: each worker gets one contiguous chunk of the episodes and sends each record back as it ends
    results = ctx.Queue()
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=rollout.init_worker,
                             initargs=(policy_factory, cfg, threads, results)) as pool:
        yield from _drain({pool.submit(rollout.run_chunk, chunk) for chunk in _chunks(todo, workers) if chunk},
                          results)


def _chunks(todo: list, n: int) -> list[list]:
    """``todo`` cut into ``n`` contiguous chunks (split by split: a worker keeps its environments)."""
    return [[todo[k] for k in c] for c in np.array_split(np.arange(len(todo)), n)]


def _drain(futures: set, results):
    """Yield the records the workers put on ``results`` until every future is done and its count received; a
    worker's failure is raised after the others are drained."""
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


class WorkerPool:
    """Evaluation workers that outlive one :func:`evaluate` call, for a run that evaluates one model after another:

        with WorkerPool(cfg) as pool:
            for name, factory in models.items():
                evaluate(factory, cfg, out / name, pool=pool)

    ``cfg.workers`` spawned processes, each behind its own one-process executor, so that the k-th chunk of every
    call goes to the same process: it builds its environments once (~1.2 s each at 64 px) and loads each model
    once, instead of a new pool per model (~15 s to start, plus the environments). Records are the same.
    """

    def __init__(self, cfg: EvaluateConfig):
        if cfg.backend in PROTOCOL_BACKENDS:
            raise ValueError(f"WorkerPool runs the episode harness; backend {cfg.backend!r} runs its own protocol")
        self.cfg = cfg
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        threads = max(1, (os.cpu_count() or 1) // cfg.workers)
        self.executors = [ProcessPoolExecutor(1, mp_context=ctx, initializer=rollout.init_worker,
                                              initargs=(None, cfg, threads, self.results))
                          for _ in range(cfg.workers)]

    def run(self, policy_factory, todo: list):
        """Yield the records of ``todo``'s episodes, chunk k on worker k, with ``policy_factory``'s policy."""
        chunks = _chunks(todo, len(self.executors))
        yield from _drain({ex.submit(rollout.run_chunk, chunk, policy_factory)
                           for ex, chunk in zip(self.executors, chunks) if chunk}, self.results)

    def stats(self) -> list[dict]:
        """Per worker: its process id and how many environments it has built."""
        return [ex.submit(rollout.worker_stats).result() for ex in self.executors]

    def close(self) -> None:
        for ex in self.executors:
            ex.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _progress(cfg: EvaluateConfig, total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="episodes", unit="ep", disable=not cfg.progress)
