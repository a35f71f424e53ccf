"""Running episodes: the one episode loop (:func:`run_episode`), and the workers that step several environments in
lockstep with one policy call per control step.

    record, frames = run_episode(env, policy, seed=10_000, max_steps=80, keep_frames=True)

The environment contract (every backend): ``reset(seed) -> obs``, ``step(action) -> (obs, success)``,
``max_steps``, ``close()``; optionally ``stop_on_success`` (False: run to the horizon or the env's ``truncated``,
as SimplerEnv scores the last step) and ``record_extras()`` (the backend's own record columns).

Lockstep (``EvaluateConfig.envs_per_worker`` > 1): every live slot's observation goes to the policy in ONE call
(``policy.act_batch(obs_list, slots)``, see ``refinevla.policy``); an episode ends at success or at its horizon
and its slot takes the next episode of the worker's queue (queued task by task so that each slot reuses its
environment) on the next step where the others decode: with action chunks of ``policy.chunk`` actions, the slots
stay in phase and every decode is one batch of all live slots. A policy without ``act_batch`` / ``reset_slot`` gets one instance per slot. Lockstep and one-by-one
runs give the same records except timings; in lockstep ``policy_s`` is the policy's time per call shared equally
among the slots of the call, and ``wall_s`` is the episode's own reset and step time plus that share.

Pictures: a job may ask for the strip of its episode (``strip``) and for videos (``videos``: a folder); an
episode whose outcome has no GIF yet in that folder keeps its frames and the policy's rationale at each step, and
writes ``<task>_<split>_<success|failure>.gif`` when it ends (at most one success and one failure per task and
split; errored episodes write none).
"""
from __future__ import annotations

import inspect
import os
import sys
import time
from collections import deque
from pathlib import Path

from .backends import StateUnavailableError, backend_module, check_state
from .config import IN_DISTRIBUTION
from .media import save_episode_gif, save_strip
from .records import error_text


def video_path(video_dir, task: str, split: str, outcome: str) -> Path:
    """Where the GIF of (task, split)'s first episode with ``outcome`` ("success" / "failure") goes."""
    return Path(video_dir) / f"{task}_{split}_{outcome}.gif"


def wants_video(video_dir, task: str, split: str) -> bool:
    """True while (task, split) lacks its success or its failure GIF."""
    return video_dir is not None and not all(video_path(video_dir, task, split, o).exists()
                                             for o in ("success", "failure"))


def current_rationale(policy, slot: int = 0) -> str:
    """The rationale ``policy`` acted on in ``slot`` at its last step ("" for a policy that does not reason):
    ``policy.rationale(slot)`` when it has one, else the slot state of ``refinevla.policy``'s policies."""
    if callable(getattr(policy, "rationale", None)):
        return str(policy.rationale(slot) or "")
    per_slot = getattr(policy, "slot_rationale", None)  # TeacherRationalePolicy
    if isinstance(per_slot, dict):
        return str(per_slot.get(slot, "") or "")
    slots = getattr(policy, "slots", None)  # VLAPolicy
    if isinstance(slots, dict) and slot in slots:
        return str(getattr(slots[slot], "last_rationale", "") or "")
    return str(getattr(policy, "last_rationale", "") or "")


# -----------------------------------------------------------------------------
# one episode


def run_episode(env, policy, seed: int, max_steps: int, keep_frames: bool = False, rationales: list | None = None):
    """Run one closed-loop episode until success (unless ``env.stop_on_success`` is False), the env's
    ``truncated``, or ``max_steps``; never raises for the episode's own errors.

    Returns the record (without task and split, plus the env's ``record_extras()``) and, when ``keep_frames``, the
    images seen; ``rationales`` (a list) receives the rationale the policy acted on after each of them. An
    exception from the policy or the environment ends the episode with ``error`` set and success False.
    """
    t0 = time.perf_counter()
    stop = getattr(env, "stop_on_success", True)
    policy_s, steps, success, error, frames = 0.0, 0, False, None, []
    said = rationales if rationales is not None else []
    try:
        obs = env.reset(seed)
        policy.reset(obs["instruction"])
        for steps in range(1, max_steps + 1):
            if keep_frames:
                frames.append(obs["image"])
            t1 = time.perf_counter()
            action = policy.act(obs)
            policy_s += time.perf_counter() - t1
            if keep_frames:
                said.append(current_rationale(policy))
            obs, success = env.step(action)
            if (stop and success) or getattr(env, "truncated", False):
                break
        if keep_frames:
            frames.append(obs["image"])
            said.append(said[-1] if said else "")
    except Exception as e:  # noqa: BLE001 - one bad episode must not end the run
        error, success = error_text(e), False
    record = {
        "seed": int(seed),
        "success": bool(success),
        "steps": int(steps),
        "wall_s": round(time.perf_counter() - t0, 4),
        "error": error,
        "policy_s": round(policy_s, 4),
    }
    extras = getattr(env, "record_extras", None)
    if callable(extras):
        record.update(extras())
    return record, frames


def save_pictures(task: str, split: str, record: dict, frames: list, rationales: list, strip, strip_frames: int,
                  videos) -> None:
    """The strip of an episode (when asked) and its GIF (when its outcome has none yet); never for no frames."""
    if not frames:
        return
    if strip is not None:
        save_strip(frames, strip, strip_frames)
    if videos is not None and record["error"] is None:
        path = video_path(videos, task, split, "success" if record["success"] else "failure")
        if not path.exists():
            save_episode_gif(frames, rationales, path, outcome="success" if record["success"] else "failure")


# -----------------------------------------------------------------------------
# workers: each holds one policy (or one per slot) and one environment per slot


_WORKER: dict = {}


def init_worker(policy_factory, cfg, threads: int | None = None, results=None) -> None:
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
    _WORKER.update(policy=None, factory=None, cfg=cfg, envs={}, slot_policies={}, built=0,
                   backend=backend_module(cfg.backend), results=results)
    if policy_factory is not None:
        use_policy(policy_factory)


def use_policy(policy_factory) -> None:
    """Make ``policy_factory()`` this worker's policy, unless it already is (a pooled worker evaluates one model
    after another, ``refinevla.evaluate.WorkerPool``): the environments stay, the previous policy and its
    per-slot copies are dropped first."""
    if _WORKER.get("policy") is not None and _factory_id(policy_factory) == _factory_id(_WORKER["factory"]):
        return
    _WORKER.update(policy=None, factory=None, slot_policies={})
    _WORKER.update(policy=policy_factory(), factory=policy_factory)
    for (task, _), _env in _WORKER["envs"].values():
        check_state(_WORKER["policy"], _WORKER["cfg"].backend, task)


def _factory_id(factory):
    """What makes two factories the same after pickling: a functools.partial's function and arguments."""
    if hasattr(factory, "func") and hasattr(factory, "keywords"):
        return (_factory_id(factory.func), factory.args, tuple(sorted(factory.keywords.items())))
    return (getattr(factory, "__module__", None), getattr(factory, "__qualname__", None)) \
        if callable(factory) and hasattr(factory, "__qualname__") else factory


def worker_stats() -> dict:
    """This worker's process id and how many environments it has built (a pooled worker builds them once)."""
    return {"pid": os.getpid(), "built": _WORKER.get("built", 0)}


def close_worker() -> None:
    """Close every environment of this worker and drop its policy (a model can be large)."""
    for _, env in _WORKER.get("envs", {}).values():
        _close(env)
    _WORKER.clear()


def _make_env(task: str, split: str):
    """The backend's environment for (task, split): ``camera`` is passed when its make_task names it, ``split``
    when it names it or the split is not in_distribution (a backend without splits then fails the episode). A
    state-conditioned policy on a task without end-effector state stops the run (StateUnavailableError)."""
    cfg, backend = _WORKER["cfg"], _WORKER["backend"]
    check_state(_WORKER["policy"], cfg.backend, task)
    params = inspect.signature(backend.make_task).parameters
    kwargs = dict(image_size=cfg.image_size, segmentation=False)
    if "camera" in params:
        kwargs["camera"] = cfg.camera
    if "split" in params or split != IN_DISTRIBUTION:
        kwargs["split"] = split
    env = backend.make_task(task, **kwargs)
    _WORKER["built"] = _WORKER.get("built", 0) + 1
    return env


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


def _env_error_record(task: str, split: str, seed: int, e: BaseException) -> dict:
    return {"task": task, "split": split, "seed": int(seed), "success": False, "steps": 0, "wall_s": 0.0,
            "error": error_text(e), "policy_s": 0.0}


def run_job(task: str, split: str, seed: int, strip: str | None, videos: str | None = None) -> dict:
    """Run one episode in this worker (the serial path); an env that fails to build is an episode error."""
    cfg = _WORKER["cfg"]
    try:
        env = _slot_env(0, task, split)
    except StateUnavailableError:
        raise
    except Exception as e:  # noqa: BLE001
        return _env_error_record(task, split, seed, e)
    max_steps = cfg.max_steps or env.max_steps
    keep = strip is not None or wants_video(videos, task, split)
    rationales: list = []
    record, frames = run_episode(env, _WORKER["policy"], seed, max_steps, keep_frames=keep, rationales=rationales)
    if record["error"] is not None:  # the env may be in a broken state: rebuild it for the next episode
        _drop_env(0)
    save_pictures(task, split, record, frames, rationales, strip, cfg.strip_frames, videos)
    return {"task": task, "split": split, **record}


# -----------------------------------------------------------------------------
# lockstep: N environments per worker, one policy call per control step


class _Episode:
    """One episode in flight in a slot."""

    __slots__ = ("task", "split", "seed", "strip", "videos", "env", "obs", "steps", "max_steps", "success",
                 "error", "wall_s", "policy_s", "frames", "rationales")

    def __init__(self, task, split, seed, strip, videos=None):
        self.task, self.split, self.seed, self.strip, self.videos = task, split, int(seed), strip, videos
        self.env = self.obs = self.error = None
        self.steps, self.max_steps, self.success = 0, 0, False
        self.wall_s = self.policy_s = 0.0
        keep = strip is not None or wants_video(videos, task, split)
        self.frames, self.rationales = ([], []) if keep else (None, None)

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


def run_lockstep(jobs):
    """Yield the record of each of ``jobs`` (task, split, seed, strip, videos) as its episode ends, stepping
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
            ep.rationales.append(ep.rationales[-1] if ep.rationales else "")
        record = ep.record()
        save_pictures(ep.task, ep.split, record, ep.frames or [], ep.rationales or [], ep.strip,
                      cfg.strip_frames, ep.videos)
        finished.append(record)

    def start(i: int) -> None:
        """Put the next episode that starts without error into slot i (or leave it empty)."""
        while pending:
            ep = _Episode(*pending.popleft())
            try:
                ep.env = _slot_env(i, ep.task, ep.split)
            except StateUnavailableError:
                raise
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
                ep.error = error_text(e)
            ep.wall_s += time.perf_counter() - t0
            slots[i] = ep
            if ep.error is not None:
                finish(i)
                continue
            return

    period, tick = _decode_period(policy, batched), 0
    while True:
        # an empty slot takes its next episode only on a step where the others decode (every ``period`` steps):
        # then the slots' action chunks run in phase and each decode is one batch of all of them
        if tick % period == 0 or all(ep is None for ep in slots):
            for i, ep in enumerate(slots):
                if ep is None:
                    start(i)
        yield from finished
        finished.clear()
        tick += 1
        live = [i for i, ep in enumerate(slots) if ep is not None]
        if not live:
            if pending:
                continue
            break
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
            if ep.rationales is not None:
                ep.rationales.append(current_rationale(policy if batched else _slot_policy(i), i if batched else 0))
            t0 = time.perf_counter()
            try:
                ep.obs, ep.success = ep.env.step(action)
            except Exception as e:  # noqa: BLE001
                ep.error = error_text(e)
            ep.wall_s += time.perf_counter() - t0
            if ep.error is not None or ep.success or ep.steps >= ep.max_steps:
                finish(i)
    yield from finished


def _decode_period(policy, batched: bool) -> int:
    """Control steps per decode of a batched policy that acts in chunks (its ``chunk``), else 1."""
    return max(1, int(getattr(policy, "chunk", 1) or 1)) if batched else 1


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
                out.append((None, error_text(e), time.perf_counter() - t0))
        return out
    for obs, i in zip(obs_list, live):
        t0 = time.perf_counter()
        try:
            out.append((_slot_policy(i).act(obs), None, time.perf_counter() - t0))
        except Exception as e:  # noqa: BLE001
            out.append((None, error_text(e), time.perf_counter() - t0))
    return out


def run_chunk(jobs, policy_factory=None) -> int:
    """A pool worker's share: run ``jobs`` in lockstep (with ``policy_factory``'s policy when given), putting each
    record on the results queue as its episode ends (so that the parent writes it at once); returns how many it
    put."""
    if policy_factory is not None:
        use_policy(policy_factory)
    results, n = _WORKER["results"], 0
    for record in run_lockstep(jobs):
        results.put(record)
        n += 1
    return n
