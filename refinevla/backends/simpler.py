"""The SimplerEnv backend: paper-scale closed-loop evaluation on SimplerEnv's WidowX and Google Robot tasks.

    records = run_simpler(policy_factory, SimplerConfig(tasks=WIDOWX_TASKS), "data/run/evaluate/simpler")
    results_table(records)   # the paper's table shape, Wilson 95% intervals

``refinevla.evaluate.evaluate`` calls :func:`run` for ``EvaluateConfig.backend`` "simpler_env" (alias "simpler")
or "maniskill3", with every SimplerEnv setting of the run config (``SimplerConfig.from_evaluate``). Records are
the harness's (``refinevla.records``: one JSON line per episode, appended as it ends; a re-run skips recorded
episodes; an exception inside one episode is recorded and the run goes on), episodes run through the harness's
one loop (``refinevla.rollout.run_episode``), with the SimplerEnv columns ``setting``, ``variant`` and
``partial_success`` in place of ``split``.

The protocol (SimplerEnv's ``maniskill2_evaluator.py``): every episode runs to its step limit (unless
``stop_on_success``) and success is the env's flag at the last step; the episode grid is the evaluation scripts'
(``simpler_tasks.episode_plan``). Two simulators sit behind it (``SimplerConfig.backend``): SimplerEnv itself
(``simpler_env``, GPU) and ManiSkill3's WidowX ports (``maniskill3``). Neither is imported at import time; a missing
one raises ``SimulatorNotInstalledError`` (an ``ImportError``) with install steps at the point of use.

State: SimplerEnv's drawer tasks and every ManiSkill3 task have no end-effector pose (``has_state``); a
state-conditioned policy is refused on them (``refinevla.backends.check_state``). The gripper entry of the state is
the last commanded opening, not a measurement (``simpler_convert.state_from_obs``).
"""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from tqdm import tqdm

from ..records import EpisodeLog, summarise
from ..rollout import run_episode, save_pictures, wants_video
from . import check_state
from .maniskill3 import ManiSkill3Sim, require_maniskill3
from .simpler_convert import ActionConverter, policy_obs
from .simpler_env import SimplerEnvSim, require_simpler_env
from .simpler_tasks import SETTINGS, TASKS, EpisodeSpec, episode_plan, has_state  # noqa: F401 (has_state: the contract)

#: Google Robot sticky gripper (repeat, update) of each base's own SimplerEnv adapter, by ``policy.base_kind``:
#: SpatialVLA's holds a command 10 steps and moves its previous value only on a trigger
#: (simpler_env/policies/spatialvla/spatialvla_model.py); Octo's and OpenVLA's, 15 steps, every step (the default).
#: A run's evaluate.simpler_sticky_repeat / simpler_sticky_update, when set, override them.
BASE_GRIPPER = {"spatialvla": (10, "on_trigger")}
DEFAULT_GRIPPER = (15, "every_step")

#: the record of one SimplerEnv episode
RECORD_KEYS = ("task", "seed", "success", "steps", "wall_s", "error", "policy_s",
               "setting", "variant", "partial_success")


@dataclass
class SimplerConfig:
    backend: str = "simpler_env"  # "simpler_env" | "maniskill3"
    tasks: tuple[str, ...] | None = None  # None = all paper tasks (maniskill3: the four WidowX tasks)
    settings: tuple[str, ...] = SETTINGS
    env_mode: str = "scripts"  # "scripts" (the evaluation scripts' grid) | "prepackaged" (simpler_env.make)
    episodes: int | None = None  # None = the paper's counts; k = at most k per variant (evenly spaced)
    image_size: Any = None  # policy input size (int or (H, W)); None = policy.image_size if set, else native
    sticky_repeat: int | None = None  # Google Robot sticky gripper (Octo/OpenVLA 15; SpatialVLA 10); None: the base's
    sticky_update: str | None = None  # "every_step" (Octo/OpenVLA) | "on_trigger" (SpatialVLA); None: the base's
    action_scale: float = 1.0
    stop_on_success: bool = False  # SimplerEnv runs every episode to max steps and scores the last step
    reuse_env: bool = False  # the scripts build a fresh env per episode (same RNG start, seed 2022); True is
    # faster (https://github.com/simpler-env/SimplerEnv/issues/83) but shifts the env's episode RNG
    retry_errors: bool = False  # on resume, re-run episodes whose record has an error
    seed: int = 0  # maniskill3 / prepackaged: reset seed of episode i is seed + i
    asset_dir: str | None = None  # SimplerEnv data dir (real_inpainting/...); None = mani_skill2_real2sim's
    ms3_sim_backend: str = "cpu"
    ms3_render_backend: str = "cpu"  # "cpu" = lavapipe software Vulkan; "gpu" on a GPU machine
    videos: bool = False  # a GIF of the first success and the first failure per task and setting

    @classmethod
    def from_evaluate(cls, ecfg) -> "SimplerConfig":
        """The SimplerEnv settings of a run's ``EvaluateConfig`` (its ``simpler_*`` / ``ms3_*`` fields)."""
        own = {f.name for f in fields(cls)}
        kw = {name[len("simpler_"):]: getattr(ecfg, name) for name in vars(ecfg)
              if name.startswith("simpler_") and name[len("simpler_"):] in own}
        kw.update({name: getattr(ecfg, name) for name in ("ms3_sim_backend", "ms3_render_backend")
                   if hasattr(ecfg, name)})
        defaults = {f.name: f.default for f in fields(type(ecfg))} if is_dataclass(ecfg) else {}
        for name in ("sticky_repeat", "sticky_update"):  # left at the config's default: the base's own
            if name in kw and kw[name] == defaults.get("simpler_" + name, object()):
                kw[name] = None
        backend = "simpler_env" if ecfg.backend == "simpler" else ecfg.backend
        return cls(backend=backend, tasks=tuple(ecfg.tasks), episodes=ecfg.episodes_per_task,
                   image_size=ecfg.image_size, retry_errors=ecfg.retry_errors,
                   videos=bool(getattr(ecfg, "videos", False)), **{k: tuple(v) if isinstance(v, list) else v
                                                                 for k, v in kw.items()})

    def gripper(self, base_kind: str | None = None) -> tuple[int, str]:
        """(sticky repeat, update rule) of the Google Robot gripper for a policy on a ``base_kind`` base: the set
        values, else the base's own adapter's (``BASE_GRIPPER``), else Octo's / OpenVLA's."""
        repeat, update = BASE_GRIPPER.get(base_kind or "", DEFAULT_GRIPPER)
        return (repeat if self.sticky_repeat is None else self.sticky_repeat), (self.sticky_update or update)

    @property
    def sim(self):
        """The simulator class of ``backend``."""
        return ManiSkill3Sim if self.backend == "maniskill3" else SimplerEnvSim

    def require(self) -> None:
        """Import the simulator, or raise SimulatorNotInstalledError with its install steps."""
        (require_maniskill3 if self.backend == "maniskill3" else require_simpler_env)()


class SimplerTask:
    """One simulator behind the harness's env contract: ``reset(seed) -> obs``, ``step(action) ->
    (obs, success)``, ``max_steps``, ``close()``, ``stop_on_success``, ``truncated`` and ``record_extras()``,
    plus ``reset_spec(spec)`` for a planned episode and ``partial_success`` after each step.

    Observations are the Policy's obs dicts (``policy_obs``); actions are schema actions, converted per robot
    by an ``ActionConverter`` that is reset with every episode. The env is built lazily per episode spec and
    rebuilt for every episode unless ``cfg.reuse_env`` (then only when the build kwargs change).
    """

    def __init__(self, cfg: SimplerConfig, plan: list[EpisodeSpec] | None = None, image_size=None,
                 make_env: Callable[[EpisodeSpec], Any] | None = None):
        self.cfg = cfg
        self.backend = cfg.sim(cfg)
        self.plan = plan if plan is not None else episode_plan(cfg)  # (validates cfg)
        self.image_size = image_size if image_size is not None else cfg.image_size
        self.stop_on_success = cfg.stop_on_success
        self._make = make_env or self.backend.make
        self.env, self._env_key, self.spec = None, None, None
        self.truncated, self.partial_success, self.info = False, None, {}
        self.base_kind = None  # the acting policy's base (its Google Robot gripper settings: SimplerConfig.gripper)

    @property
    def max_steps(self) -> int:
        return (self.spec or self.plan[0]).max_steps

    def reset(self, seed: int) -> dict:
        """Episode ``seed % len(plan)`` of the plan (the harness contract: integer seeds)."""
        return self.reset_spec(self.plan[int(seed) % len(self.plan)])

    def reset_spec(self, spec: EpisodeSpec) -> dict:
        self.truncated, self.partial_success, self.info = False, None, {}
        key = (spec.env_id, json.dumps(spec.build_kwargs, sort_keys=True, default=str))
        if self.env is None or not self.cfg.reuse_env or key != self._env_key:
            self.close()
            self.env, self._env_key = self._make(spec), key
        self.spec = spec
        self.converter = ActionConverter(spec.robot, *self.cfg.gripper(self.base_kind), self.cfg.action_scale)
        raw, self.instruction = self.backend.reset(self.env, spec)
        return self._obs(raw)

    def step(self, action) -> tuple[dict, bool]:
        raw, success, self.truncated, self.info = self.backend.step(self.env, self.converter(action))
        self.partial_success = self.backend.partial_success(self.info)
        return self._obs(raw), success

    def record_extras(self) -> dict:
        """The SimplerEnv columns of the episode's record."""
        spec = self.spec
        return {"setting": spec.setting if spec else None, "variant": spec.variant if spec else None,
                "partial_success": self.partial_success}

    def _obs(self, raw: dict) -> dict:
        return policy_obs(raw, self.instruction, self.spec.robot, self.backend.name, self.image_size,
                          self.converter.last_open)

    def close(self) -> None:
        if self.env is not None:
            try:
                self.env.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        self.env, self._env_key = None, None


def make_task(task: str, image_size=None, segmentation: bool = False, setting: str = "visual_matching",
              **cfg_overrides) -> SimplerTask:
    """The harness's backend entry point (``backend="simpler"`` through ``refinevla.rollout``): a SimplerTask over
    one (task, setting) that stops at the first success; integer seeds pick episodes of its grid (``seed % n``).
    ``segmentation`` is accepted for the contract and unused. For the paper's protocol use :func:`run_simpler`."""
    make_env = cfg_overrides.pop("make_env", None)
    cfg_overrides.setdefault("stop_on_success", True)
    cfg = SimplerConfig(tasks=(task,), settings=(setting,), **cfg_overrides)
    plan = episode_plan(cfg)
    if not plan:
        raise ValueError(f"{task} has no {setting!r} episodes for backend {cfg.backend!r}")
    if make_env is None:
        cfg.require()
    return SimplerTask(cfg, plan, image_size=image_size, make_env=make_env)


# --------------------------------------------------------------------------------------------------------
# The protocol's run: every planned episode, resumable
# --------------------------------------------------------------------------------------------------------

def _record_key(rec: dict) -> tuple:
    return (rec.get("task"), rec.get("setting"), rec.get("variant"), int(rec.get("seed", -1)))


def _policy_source(policy_factory) -> Callable[[str], Any]:
    """Policies per robot. A Policy instance serves every robot. A factory is called once per robot, with
    the robot name ("widowx" / "google_robot") when it takes an argument (so a model can pick its Bridge or
    Fractal statistics), else with none (the ``refinevla.evaluate`` convention)."""
    if not isinstance(policy_factory, type) and hasattr(policy_factory, "act") and hasattr(policy_factory, "reset"):
        return lambda robot: policy_factory
    try:
        inspect.signature(policy_factory).bind("robot")
        takes_robot = True
    except (TypeError, ValueError):
        takes_robot = False
    cache: dict[str, Any] = {}

    def get(robot: str):
        if robot not in cache:
            cache[robot] = policy_factory(robot) if takes_robot else policy_factory()
        return cache[robot]

    return get


def _for_robot(task_env: SimplerTask, policy, robot: str, said: set) -> None:
    """Settings chosen from the policy's base for ``robot``: the gripper (``SimplerConfig.gripper``) and, for a
    remote-code base, its statistics (``policy.select_robot``); said once per robot."""
    task_env.base_kind = getattr(policy, "base_kind", None)
    select = getattr(policy, "select_robot", None)
    key = select(robot) if callable(select) else None
    if robot not in said and (task_env.base_kind or key):
        said.add(robot)
        repeat, update = task_env.cfg.gripper(task_env.base_kind)
        grip = f"sticky gripper {repeat} steps, {update}" if robot == "google_robot" else "binary gripper"
        print(f"simpler: {robot} with a {task_env.base_kind or 'policy'} base: {grip}"
              f"{f', unnorm key {key}' if key else ''}", flush=True)


def _episodes(task_env: SimplerTask, policy_factory, todo: list, videos: Path | None):
    """Run the (index, EpisodeSpec) episodes of ``todo`` one by one; yield each record as its episode ends."""
    get_policy = _policy_source(policy_factory)
    said: set = set()
    cfg = task_env.cfg
    for k, spec in todo:
        policy = get_policy(spec.robot)  # outside the episode: a policy that cannot load stops the run
        _for_robot(task_env, policy, spec.robot, said)
        check_state(policy, cfg.backend, spec.task)
        task_env.image_size = cfg.image_size if cfg.image_size is not None else getattr(policy, "image_size", None)
        keep = wants_video(videos, spec.task, spec.setting)
        rationales: list = []
        record, frames = run_episode(task_env, policy, k, spec.max_steps, keep_frames=keep, rationales=rationales)
        if record["error"] is not None:
            task_env.close()  # the env may be broken: the next episode builds a new one
        rec = {"task": spec.task, **record, "seed": int(spec.seed)}
        save_pictures(spec.task, spec.setting, rec, frames, rationales, None, 0, videos)
        yield rec


def run_simpler(policy_factory, cfg: SimplerConfig | None = None, out_dir=".", *,
                make_env: Callable[[EpisodeSpec], Any] | None = None) -> list[dict]:
    """Run (or resume) the evaluation; append one record per episode to ``out_dir/episodes.jsonl``.

    ``policy_factory``: a Policy, or a factory (``f(robot)`` or ``f()``) called once per robot.
    ``make_env(spec)`` replaces the simulator's env constructor (tests, or a custom build); with it no
    simulator package is imported. Returns the plan's records (old and new) and writes ``summary.csv``
    (``results_table``). Records: ``RECORD_KEYS``. A state-conditioned policy on a task without end-effector state
    stops the run before its first episode (``refinevla.backends.StateUnavailableError``).
    """
    cfg = cfg or SimplerConfig()
    plan = episode_plan(cfg)
    task_env = SimplerTask(cfg, plan, make_env=make_env)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = EpisodeLog(out / "episodes.jsonl", _record_key, cfg.retry_errors)
    pending = set(log.todo([s.key for s in plan]))
    todo = [(k, s) for k, s in enumerate(plan) if s.key in pending]
    if todo and make_env is None:  # fail before the loop, with the install steps, not once per episode
        cfg.require()
    try:
        with tqdm(total=len(plan), initial=len(plan) - len(todo), desc="simpler episodes", unit="ep") as bar:
            for _ in log.append(_episodes(task_env, policy_factory, todo, out / "videos" if cfg.videos else None)):
                bar.update(1)
    finally:
        task_env.close()
    records = log.in_order([s.key for s in plan])
    results_table(records).to_csv(out / "summary.csv", index=False)
    return records


def run(policy_factory, ecfg, out_dir):
    """``refinevla.evaluate.evaluate``'s entry point for the protocol backends: :func:`run_simpler` with the run
    config's SimplerEnv settings; returns the records as a DataFrame."""
    import pandas as pd

    return pd.DataFrame(run_simpler(policy_factory, SimplerConfig.from_evaluate(ecfg), out_dir),
                        columns=list(RECORD_KEYS))


# --------------------------------------------------------------------------------------------------------
# Results: the paper's table shape with Wilson intervals
# --------------------------------------------------------------------------------------------------------

def results_table(records: Iterable[dict]):
    """Aggregate episode records into the paper's table shape (a pandas DataFrame).

    One row per (robot, setting, task): episodes n, successes, success rate with a Wilson 95% interval,
    grasp (partial) success rate where the env reports it, errored episodes (counted as failures). Then an
    ``average`` row per (robot, setting) with two tasks or more: the mean of the task rates (the papers'
    "Average"), with the Wilson interval of the pooled episodes. Each (robot, setting) block is the harness's
    ``refinevla.records.summarise`` of its records. SimplerEnv averages variants with equal episode counts, so
    the pooled rate of a task equals its mean over variants (tools/calc_metrics_evaluation_videos.py).
    WidowX has visual matching only; Google Robot has a row per task per setting.
    """
    import pandas as pd

    columns = ["robot", "setting", "task", "label", "n", "successes", "success", "ci_low", "ci_high",
               "partial_success", "errors"]
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((TASKS.get(r["task"], {}).get("robot", "unknown"), r.get("setting", "")), []).append(r)
    order = {t: i for i, t in enumerate(TASKS)}
    blocks = []
    for robot, setting in sorted(groups):
        recs = groups[robot, setting]
        tasks = sorted(dict.fromkeys(r["task"] for r in recs), key=lambda t: order.get(t, len(order)))
        block = summarise([dict(r, partial_success=r.get("partial_success")) for r in recs], tasks=tasks)
        if len(tasks) < 2:
            block = block.drop(index="average")
        if "partial_rate" not in block:
            block["partial_rate"] = float("nan")
        block = block.reset_index().rename(columns={"success_rate": "success", "partial_rate": "partial_success"})
        block["label"] = [TASKS.get(t, {}).get("label", t) if t != "average" else "Average" for t in block["task"]]
        blocks.append(block.assign(robot=robot, setting=setting)[columns])
    if not blocks:
        return pd.DataFrame(columns=columns)
    return pd.concat(blocks, ignore_index=True)
