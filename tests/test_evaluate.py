"""The evaluation harness: records, resume, splits, error capture, lockstep batching, metrics, tables, bad input.

Most tests run on a tiny fake backend defined in this module (the harness's backend contract: ``TASKS`` and
``make_task``), so they take milliseconds, each on the serial path (envs_per_worker=1) and in lockstep (3). The
real robosuite backend checks that lockstep and serial evaluation give the same episodes for the scripted expert
and for a micro VLA (with and without reasoning, action chunks, the teacher-rationale oracle), and runs two
spawned workers.
"""
import copy
import dataclasses
import functools
import json
import math
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from refinevla import evaluate as ev
from refinevla.backends import StateUnavailableError
from refinevla.evaluate import EvaluateConfig, compare_table, evaluate, summarise
from refinevla.stats import wilson as wilson_interval  # the one Wilson interval (scipy's)
from refinevla.policy import ZeroPolicy
from vla_stubs import MarkerAt

# -----------------------------------------------------------------------------
# a fake backend: "good" succeeds on step 3 for even seeds (odd seeds in the variant split); "broken" raises
# inside step()

TASKS = {"good": "do the good thing", "broken": "do the broken thing", "blind": "do the thing without state"}
RESETS = []  # (task, split, seed) of every env.reset, to count what a re-run really executes


class FakeEnv:
    max_steps = 5

    def __init__(self, task, image_size, split):
        self.task, self.n, self.split = task, image_size, split

    def _obs(self):
        return {"image": np.full((self.n, self.n, 3), self.t * 40, np.uint8), "state": np.zeros(8, np.float32),
                "instruction": TASKS[self.task] + " now" * (self.seed % 3), "seed": self.seed}  # prompts differ

    def reset(self, seed):
        RESETS.append((self.task, self.split, seed))
        self.seed, self.t = seed, 0
        return self._obs()

    def step(self, action):
        assert np.asarray(action).shape == (7,)
        if self.task == "broken":
            raise RuntimeError("simulator exploded")
        self.t += 1
        return self._obs(), self.seed % 2 == (self.split == "variant") and self.t >= 3

    def close(self):
        pass


def make_task(task, image_size=64, segmentation=True, split="in_distribution"):
    return FakeEnv(task, image_size, split)


def has_state(task, backend=None):
    return task != "blind"  # like SimplerEnv's drawers: no end-effector pose in the observation


class RaisingPolicy(ZeroPolicy):
    """Raises on one seed (read from the fake observation)."""

    def __init__(self, bad_seed):
        self.bad_seed = bad_seed

    def act(self, obs):
        if obs["seed"] == self.bad_seed:
            raise ValueError("policy broke on purpose")
        return super().act(obs)


class BatchedRaisingPolicy(RaisingPolicy):
    """The batched interface: one call for all slots; it raises for the whole batch when one slot is bad."""

    calls = []  # batch sizes of every act_batch call

    def reset_slot(self, slot, instruction):
        pass

    def act_batch(self, obs_list, slots):
        BatchedRaisingPolicy.calls.append(len(slots))
        return [self.act(obs) for obs in obs_list]


@pytest.fixture(params=[1, 3], ids=["serial", "lockstep"])
def fake(monkeypatch, request):
    monkeypatch.setitem(ev.BACKENDS, "fake", __name__)
    assert sys.modules[__name__].TASKS is TASKS
    RESETS.clear()
    return functools.partial(EvaluateConfig, backend="fake", image_size=8, progress=False,
                             envs_per_worker=request.param)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _seeds(resets):
    return sorted(seed for _, _, seed in resets)


# -----------------------------------------------------------------------------
# harness behaviour (fake backend)


def test_records_summary_and_strip(fake, tmp_path):
    df = evaluate(ZeroPolicy, fake(tasks=("good",), episodes_per_task=4), tmp_path)
    lines = _lines(tmp_path / "episodes.jsonl")
    assert len(lines) == len(df) == 4
    assert set(ev.RECORD_KEYS) | {"policy_s"} == set(lines[0])
    assert sorted(r["seed"] for r in lines) == [10_000, 10_001, 10_002, 10_003]  # the file: in order of ending
    assert df.seed.tolist() == [10_000, 10_001, 10_002, 10_003]  # the frame: in episode order
    assert (df.split == "in_distribution").all()
    assert df.success.tolist() == [True, False, True, False]
    assert df.steps.tolist() == [3, 5, 3, 5]
    assert df.error.isna().all()
    summary = pd.read_csv(tmp_path / "summary.csv", index_col="task")
    assert list(summary.index) == ["good", "average"]
    assert summary.loc["good", "success_rate"] == 0.5 and summary.loc["good", "n"] == 4
    assert (tmp_path / "strips" / "good.png").exists()


def test_resume_skips_finished_episodes(fake, tmp_path):
    evaluate(ZeroPolicy, fake(tasks=("good",), episodes_per_task=3), tmp_path)
    assert len(RESETS) == 3
    RESETS.clear()
    df = evaluate(ZeroPolicy, fake(tasks=("good",), episodes_per_task=5), tmp_path)
    assert RESETS == [("good", "in_distribution", 10_003), ("good", "in_distribution", 10_004)]  # only the new
    assert len(_lines(tmp_path / "episodes.jsonl")) == 5 and len(df) == 5
    RESETS.clear()
    evaluate(ZeroPolicy, fake(tasks=("good",), episodes_per_task=5), tmp_path)
    assert RESETS == []


def test_splits_have_their_seeds_records_summaries_and_resume(fake, tmp_path):
    cfg = fake(tasks=("good",), episodes_per_task=2, splits=("in_distribution", "variant"), variant_base_seed=500)
    assert cfg.seed_list("variant") == [500, 501] and cfg.seed_list() == [10_000, 10_001]
    df = evaluate(ZeroPolicy, cfg, tmp_path)
    assert list(zip(df.split, df.seed)) == [("in_distribution", 10_000), ("in_distribution", 10_001),
                                            ("variant", 500), ("variant", 501)]
    assert df.success.tolist() == [True, False, False, True]  # the variant env succeeds on odd seeds
    assert {(r["split"], r["seed"]) for r in _lines(tmp_path / "episodes.jsonl")} == set(zip(df.split, df.seed))
    assert pd.read_csv(tmp_path / "summary_variant.csv", index_col="task").loc["good", "n"] == 2
    assert (tmp_path / "strips" / "good_variant.png").exists()
    # resume: an old record without "split" counts as in_distribution; only missing (task, split, seed) run
    path = tmp_path / "episodes.jsonl"
    kept = [r for r in _lines(path) if (r["split"], r["seed"]) != ("variant", 501)]
    for r in kept:
        if r["split"] == "in_distribution":
            del r["split"]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    RESETS.clear()
    df2 = evaluate(ZeroPolicy, cfg, tmp_path)
    assert RESETS == [("good", "variant", 501)]
    assert df2.drop(columns=["wall_s", "policy_s"]).equals(df.drop(columns=["wall_s", "policy_s"]))
    # same seeds in both splits when explicit seeds are given; unknown splits are refused
    assert EvaluateConfig(seeds=[3, 4]).seed_list("variant") == [3, 4]
    with pytest.raises(ValueError, match="split"):
        evaluate(ZeroPolicy, fake(tasks=("good",), splits=("in_distribution", "sideways")), tmp_path)


def test_torn_last_line_is_run_again(fake, tmp_path):
    evaluate(ZeroPolicy, fake(tasks=("good",), episodes_per_task=2), tmp_path)
    path = tmp_path / "episodes.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][:10])  # a kill in the middle of a write
    RESETS.clear()
    df = evaluate(ZeroPolicy, fake(tasks=("good",), episodes_per_task=2), tmp_path)
    torn = json.loads(lines[1])["seed"]
    assert RESETS == [("good", "in_distribution", torn)] and len(df) == 2
    assert sorted(r["seed"] for r in _lines(path)) == [10_000, 10_001]  # the file is whole again


@pytest.mark.parametrize("policy", [RaisingPolicy, BatchedRaisingPolicy])
def test_policy_error_is_recorded_and_run_goes_on(fake, tmp_path, policy):
    BatchedRaisingPolicy.calls.clear()
    factory = functools.partial(policy, bad_seed=10_001)
    df = evaluate(factory, fake(tasks=("good",), episodes_per_task=3), tmp_path)
    bad = df[df.seed == 10_001].iloc[0]
    assert not bad.success and "policy broke on purpose" in bad.error and bad.steps == 1
    assert df[df.seed != 10_001].error.isna().all() and len(df) == 3
    assert df.success.tolist() == [True, False, True] and df.steps.tolist() == [3, 1, 3]
    assert summarise(df.to_dict("records")).loc["good", "errors"] == 1
    if policy is BatchedRaisingPolicy and fake().envs_per_worker == 3:
        assert BatchedRaisingPolicy.calls[0] == 3  # all slots in one call (then one by one, to find the bad one)


def test_env_error_is_recorded(fake, tmp_path):
    df = evaluate(ZeroPolicy, fake(tasks=("broken", "good"), episodes_per_task=2), tmp_path)
    assert len(df) == 4
    assert df[df.task == "broken"].error.str.contains("simulator exploded").all()
    assert df[df.task == "good"].error.isna().all()


def test_retry_errors_reruns_only_failed_episodes(fake, tmp_path):
    evaluate(functools.partial(RaisingPolicy, bad_seed=10_000), fake(tasks=("good",), episodes_per_task=2), tmp_path)
    RESETS.clear()
    df = evaluate(ZeroPolicy, fake(tasks=("good",), episodes_per_task=2, retry_errors=True), tmp_path)
    assert RESETS == [("good", "in_distribution", 10_000)] and df.error.isna().all()
    assert len(_lines(tmp_path / "episodes.jsonl")) == 2


class StateReader(ZeroPolicy):
    """Declares that it conditions on ``obs["state"]`` (the flag ``refinevla.backends.uses_state`` reads)."""

    uses_state = True


def test_state_conditioned_policy_is_refused_where_there_is_no_state(fake, tmp_path):
    with pytest.raises(StateUnavailableError, match="'blind'.*no end-effector state"):
        evaluate(StateReader, fake(tasks=("good", "blind"), episodes_per_task=2), tmp_path)
    assert all(r["task"] == "good" for r in _lines(tmp_path / "episodes.jsonl"))  # nothing ran on zeros
    assert len(evaluate(ZeroPolicy, fake(tasks=("blind",), episodes_per_task=2), tmp_path / "zero")) == 2


def test_max_steps_override(fake, tmp_path):
    df = evaluate(ZeroPolicy, fake(tasks=("good",), seeds=[1], max_steps=2), tmp_path)
    assert df.steps.tolist() == [2]


# -----------------------------------------------------------------------------
# bad input


def test_unknown_task_and_empty_seeds_raise(fake, tmp_path):
    with pytest.raises(ValueError, match="unknown task.*good"):
        evaluate(ZeroPolicy, fake(tasks=("juggle",)), tmp_path)
    with pytest.raises(ValueError, match="seed list is empty"):
        evaluate(ZeroPolicy, fake(tasks=("good",), seeds=[]), tmp_path)
    with pytest.raises(ValueError, match="seed list is empty"):
        evaluate(ZeroPolicy, fake(tasks=("good",), episodes_per_task=0), tmp_path)
    with pytest.raises(ValueError, match="unknown backend"):
        evaluate(ZeroPolicy, EvaluateConfig(backend="gazebo"), tmp_path)
    with pytest.raises(ValueError, match="unknown task"):
        ev.episode_jobs(EvaluateConfig(tasks=("juggle",)))  # the real robosuite table
    with pytest.raises(ValueError, match="envs_per_worker"):
        evaluate(ZeroPolicy, fake(tasks=("good",), envs_per_worker=0), tmp_path)


# -----------------------------------------------------------------------------
# metrics and tables


def test_wilson_interval_known_values():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(23, 40) == pytest.approx((0.4219, 0.7149), abs=1e-4)  # shared README: 42-72%


def _records(task, k, n):
    return [{"task": task, "seed": i, "success": i < k, "steps": 1, "wall_s": 0.1, "error": None} for i in range(n)]


def test_summarise_shape_and_average():
    s = summarise(_records("lift", 8, 10) + _records("stack", 2, 10))
    assert list(s.index) == ["lift", "stack", "average"]
    assert {"success_rate", "n", "ci_low", "ci_high", "successes", "errors"} <= set(s.columns)
    assert s.loc["average", "success_rate"] == pytest.approx(0.5) and s.loc["average", "n"] == 20
    assert s.loc["lift", "ci_low"] < 0.8 < s.loc["lift", "ci_high"]


def test_compare_table_one_column_per_model():
    a = summarise(_records("lift", 8, 10) + _records("stack", 2, 10))
    b = summarise(_records("lift", 9, 10))
    table = compare_table({"baseline": a, "refinevla": b})
    assert list(table.columns) == ["baseline", "refinevla"]
    assert list(table.index) == ["lift", "stack", "average"]
    assert table.loc["lift", "refinevla"] == pytest.approx(0.9) and np.isnan(table.loc["stack", "refinevla"])
    text = compare_table({"baseline": a}, ci=True)
    assert text.loc["lift", "baseline"].startswith("80.0% [")
    with pytest.raises(ValueError):
        compare_table({})


# -----------------------------------------------------------------------------
# lockstep equals serial: the scripted expert and a micro VLA


class Recorder:
    """Wraps a policy and logs every action it returns, one list per episode (batched when the policy is)."""

    def __init__(self, inner):
        self.inner, self.episodes, self.current, self.calls = inner, [], {}, []

    @property
    def chunk(self):
        return getattr(self.inner, "chunk", 1)

    def _new(self, slot):
        self.current[slot] = []
        self.episodes.append(self.current[slot])

    def reset(self, instruction):
        self.inner.reset(instruction)
        self._new(0)

    def act(self, obs):
        action = self.inner.act(obs)
        self.current[0].append(np.asarray(action).tolist())
        return action

    def reset_slot(self, slot, instruction):
        self.inner.reset_slot(slot, instruction)
        self._new(slot)

    def act_batch(self, obs_list, slots):
        self.calls.append(len(slots))
        actions = self.inner.act_batch(obs_list, slots)
        for s, a in zip(slots, actions):
            self.current[s].append(np.asarray(a).tolist())
        return actions

    def trajectories(self):
        return sorted(tuple(map(tuple, e)) for e in self.episodes)


def _outcomes(df):
    return df.drop(columns=["wall_s", "policy_s"]).to_dict("records")


def _serial_and_lockstep(factory, cfg, tmp_path, n=3):
    serial = evaluate(factory, dataclasses.replace(cfg, envs_per_worker=1), tmp_path / "serial")
    lockstep = evaluate(factory, dataclasses.replace(cfg, envs_per_worker=n), tmp_path / "lockstep")
    assert _outcomes(serial) == _outcomes(lockstep)
    assert serial.error.isna().all()
    return serial, lockstep


@pytest.fixture(scope="module")
def micro_vla(tmp_path_factory):
    """(model, tokenizer) of a micro ReFineVLA fine-tune, trained as in test_policy.py."""
    from conftest import synthetic_dataset
    from refinevla import train
    from refinevla.model import ModelConfig
    from refinevla.policy import load_vla
    from refinevla.train import TrainConfig

    torch.set_num_threads(1)
    ds, root = synthetic_dataset(), tmp_path_factory.mktemp("vla")
    base = train.pretrain_base(ds, ModelConfig(size="micro"),
                               TrainConfig(arm="pretrain", use_rationale=False, steps=30, batch_size=8,
                                           lr=3e-3, warmup_steps=3, log_every=10, threads=1), root / "pretrain")
    refine = train.finetune(ds, base, ModelConfig(size="micro", tune_top_k_layers=1),
                            TrainConfig(arm="refinevla", steps=15, batch_size=8, lr=1e-2, warmup_steps=2,
                                        log_every=5, threads=1), root / "refinevla")
    model, tok, _ = load_vla(refine)
    return model, tok


def _vla_policy(micro_vla, kind):
    from refinevla.policy import TeacherRationalePolicy, VLAPolicy

    model, tok = micro_vla
    if kind == "baseline":
        return VLAPolicy(model, tok, reasoning=False)
    if kind == "reasoning":  # rationales end at ACTION: after 1-5 tokens, at a step of each slot's own
        return VLAPolicy(MarkerAt(model, tok.marker_id), tok, reasoning=True, max_rationale_tokens=12)
    if kind == "reasoning_capped":  # every rationale runs to the cap
        return VLAPolicy(model, tok, reasoning=True, max_rationale_tokens=6)
    if kind == "oracle":
        return TeacherRationalePolicy(VLAPolicy(model, tok, reasoning=True))
    raise ValueError(kind)


@pytest.mark.slow
def test_lockstep_equals_serial_for_the_scripted_expert(tmp_path):
    pytest.importorskip("robosuite")
    from refinevla.experts import ExpertPolicy

    cfg = EvaluateConfig(tasks=("lift",), seeds=[10_000, 10_001, 10_002, 10_003, 10_004], max_steps=34,
                         image_size=32, strip_frames=2, progress=False)
    serial, lockstep = _serial_and_lockstep(ExpertPolicy, cfg, tmp_path)
    assert serial.success.sum() >= 2 and serial.steps.nunique() > 1  # episodes end at different steps
    assert (tmp_path / "lockstep" / "strips" / "lift.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["baseline", "reasoning", "oracle"])
def test_lockstep_equals_serial_for_a_micro_vla(tmp_path, micro_vla, kind):
    """Same records and the same actions, step for step, in every episode (the oracle reads the robosuite
    observation's privileged objects)."""
    pytest.importorskip("robosuite")
    cfg = EvaluateConfig(tasks=("lift",), seeds=[10_000, 10_001, 10_002, 10_003], max_steps=5, image_size=32,
                         strip_frames=0, progress=False)
    recorders = []

    def factory():
        recorders.append(Recorder(_vla_policy(micro_vla, kind)))
        return recorders[-1]

    serial, _ = _serial_and_lockstep(factory, cfg, tmp_path)
    assert len(recorders) == 2  # batched policies: one instance per worker, not per slot
    assert recorders[0].trajectories() == recorders[1].trajectories()
    assert len(recorders[1].episodes) == 4 and all(len(e) == 5 for e in recorders[1].episodes)


@pytest.mark.parametrize("kind,chunk", [("baseline", 3), ("reasoning", 2), ("reasoning_capped", 1)])
def test_lockstep_chunks_and_rationales_on_staggered_episodes(fake, tmp_path, micro_vla, kind, chunk):
    """On the fake backend episodes end at steps 3 or 5, so lockstep slots free up out of phase: each slot
    executes its chunk before decoding again (one decode per `chunk` steps of each episode, counted on the
    model), a freed slot takes its next episode at the others' next decode so that every decode is one batch of
    all live slots, and lockstep and serial take the same actions."""
    model, tok = micro_vla
    tok = copy.copy(tok)
    tok.action_chunk = chunk
    decoded_rows, in_call, recorders = [], [], []

    def hook(mod, args, kw):
        if kw.get("pixel_values") is not None:
            decoded_rows.append(len(kw["input_ids"]))
            in_call.append((len(recorders[-1].calls), len(kw["input_ids"])))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)

    def factory():
        recorders.append(Recorder(_vla_policy((model, tok), kind)))
        return recorders[-1]

    cfg = fake(tasks=("good",), episodes_per_task=7)
    try:
        df = evaluate(factory, cfg, tmp_path)
    finally:
        handle.remove()
    assert df.error.isna().all() and set(df.steps) == {3, 5}
    assert sum(decoded_rows) == sum(math.ceil(s / chunk) for s in df.steps)
    if kind == "reasoning" and cfg.envs_per_worker > 1:  # prompts of 3 lengths: rationales of different lengths
        assert len({len(st.rationale_ids) for st in recorders[0].inner.slots.values() if st.step}) > 1
    if cfg.envs_per_worker > 1:
        assert max(decoded_rows) > 1  # several slots in one forward pass
        calls = recorders[0].calls
        assert all(rows == calls[k - 1] for k, rows in in_call)  # each decode: every slot of its call, in phase
    trajectories = recorders[0].trajectories()
    serial = dataclasses.replace(cfg, envs_per_worker=1)
    evaluate(factory, serial, tmp_path / "serial")
    assert recorders[1].trajectories() == trajectories


def test_current_rationale_reads_each_slot_of_a_reasoning_vla(micro_vla):
    """The caption of an episode GIF is the rationale the real VLA wrote for that slot at that step."""
    from refinevla.rollout import current_rationale

    policy = _vla_policy(micro_vla, "reasoning")
    obs = [{"image": np.full((32, 32, 3), 40 * k, np.uint8), "state": np.zeros(8, np.float32),
            "instruction": "pick up the red cube" + " now" * k} for k in range(2)]
    for slot in (0, 1):
        policy.reset_slot(slot, obs[slot]["instruction"])
    assert current_rationale(policy, 0) == current_rationale(policy, 1) == ""
    policy.act_batch(obs, [0, 1])
    said = [current_rationale(policy, slot) for slot in (0, 1)]
    assert said == [policy.tok.decode_text(policy.slots[s].rationale_ids) for s in (0, 1)] and all(said)
    assert current_rationale(_vla_policy(micro_vla, "baseline")) == ""  # acts directly: no rationale


# -----------------------------------------------------------------------------
# the real backend, in spawned workers


@pytest.mark.slow
def test_robosuite_backend_in_two_spawned_workers(tmp_path):
    """Two spawned workers, each stepping two environments in lockstep over its chunk of the episodes (here one
    split each); records stream back as episodes end, with their split."""
    pytest.importorskip("robosuite")
    cfg = EvaluateConfig(tasks=("lift",), episodes_per_task=2, max_steps=5, workers=2, envs_per_worker=2,
                         splits=("in_distribution", "variant"), image_size=32, progress=False)
    df = evaluate(ZeroPolicy, cfg, tmp_path)
    assert len(df) == 4 and df.error.isna().all() and (df.steps == 5).all() and not df.success.any()
    assert list(zip(df.split, df.seed)) == [("in_distribution", 10_000), ("in_distribution", 10_001),
                                            ("variant", 20_000), ("variant", 20_001)]
    assert len(_lines(tmp_path / "episodes.jsonl")) == 4
    assert (tmp_path / "strips" / "lift.png").exists() and (tmp_path / "strips" / "lift_variant.png").exists()


@pytest.mark.slow
def test_a_worker_pool_serves_one_model_after_another(tmp_path):
    """One WorkerPool for two models (the scripted expert, then a policy that never moves): the same two worker
    processes run both, build their environments once (each keeps its split), load the second model for the second
    call, and give the records a pool made for one call gives."""
    pytest.importorskip("robosuite")
    from refinevla.experts import ExpertPolicy

    cfg = EvaluateConfig(tasks=("lift",), episodes_per_task=3, max_steps=34, workers=2, envs_per_worker=2,
                         splits=("in_distribution", "variant"), image_size=32, progress=False)
    with ev.WorkerPool(cfg) as pool:
        expert = evaluate(ExpertPolicy, cfg, tmp_path / "expert", pool=pool)
        first = pool.stats()
        zero = evaluate(ZeroPolicy, cfg, tmp_path / "zero", pool=pool)
        second = pool.stats()
        with pytest.raises(ValueError, match="another EvaluateConfig"):
            evaluate(ZeroPolicy, dataclasses.replace(cfg, max_steps=5), tmp_path / "other", pool=pool)
    assert [s["pid"] for s in first] == [s["pid"] for s in second]
    assert [s["built"] for s in second] == [2, 2]  # 2 slots per worker, one split each, for both models
    assert expert.success.sum() >= 1 and not zero.success.any() and (zero.steps == 34).all()
    alone = evaluate(ExpertPolicy, cfg, tmp_path / "alone")
    columns = ["task", "split", "seed", "success", "steps"]
    pd.testing.assert_frame_equal(expert[columns], alone[columns])
