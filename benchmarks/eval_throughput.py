"""How close does closed-loop evaluation of a VLA get to the bare simulator's speed?

    MUJOCO_GL=egl .venv/bin/python benchmarks/eval_throughput.py [--episodes 32] [--max-steps 40] [--size tiny16]

On one robosuite task, with the same workers (2), image size (64) and camera, measures episodes/s and env steps/s of
  bare             a step + render loop with a zero action in each spawned worker: the limit (run first and last;
                   the mean of the two is the reference, their spread a hint of the noise)
  baseline_envsN   ``refinevla.evaluate.evaluate`` with an untrained tiny VLA acting directly (no rationale), each
                   worker stepping N = 1, 4 or 16 environments in lockstep (one batched policy call per control
                   step; with action chunks (--chunk, 4 as in the default run) the slots decode in phase)
  reasoning_envsN  the same VLA writing a rationale first (capped at --rationale-tokens; an untrained model never
                   stops earlier) at every decode
and the ratio of each to the bare loop, in two measures:
  in-episode  steps / (time inside episodes / workers): reset, policy and step time only, the steady state
              (the harness's per-episode ``wall_s``, policy time shared among the slots of each call)
  end-to-end  steps / wall clock of the whole call: process start, imports, model load and env builds included
              (each lockstep slot builds its own environment), so short runs understate it
and the CPU seconds the workers used (``cpu_s``, start-up included: steadier than wall clock when the machine is
shared). Noisy on a shared machine: the load average before and after is recorded. About 6 minutes on 2 cores.

Results go to benchmarks/results/eval_throughput.json.
"""
from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from eval_overhead import time_raw  # noqa: E402  (the bare step + render loop, one per worker)
from results_file import write_result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "eval_throughput.json"


# ----------------------------------------------------------------------------------------------- bare loop
def _children_cpu() -> float:
    """CPU seconds used so far by this process's finished child processes (the workers, once joined)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_bare(task, seeds, max_steps, image_size, camera, workers) -> dict:
    chunks = [seeds[k::workers] for k in range(workers)]
    t0, c0 = time.perf_counter(), _children_cpu()
    pool = mp.get_context("spawn").Pool(workers)
    parts = pool.starmap(time_raw, [(task, c, max_steps, image_size, camera) for c in chunks])
    pool.close()
    pool.join()  # joined: their CPU time is counted in RUSAGE_CHILDREN
    wall = time.perf_counter() - t0
    steps = sum(p["steps"] for p in parts)
    return _rates("bare", len(seeds), steps, wall, sum(p["episodes_s"] for p in parts) / workers, workers,
                  envs_per_worker=1, build_s=max(p["build_s"] for p in parts), cpu_s=_children_cpu() - c0)


# ------------------------------------------------------------------------------------------------- harness
def build_model(out: Path, size: str) -> dict:
    """An untrained tiny PaliGemma VLA saved as a base model folder (what ``load_policy`` reads)."""
    from refinevla.model import SIZES, build_tiny_vla, parameter_counts
    from refinevla.sim import TASKS
    from refinevla.tokens import BinStats, VLATokenizer

    texts = [spec.instruction for spec in TASKS.values()]
    texts += [instr for spec in TASKS.values() for _, instr in getattr(spec, "choices", ())]
    texts += ["OBSERVATION: the red cube and the gripper open SITUATION: 12 cm from the cube "
              "SPATIAL: the cube is 3 cm left of and 10 cm below the gripper PLAN: reach the cube then grasp it"]
    tok = VLATokenizer.train_tiny(texts, BinStats(low=[-1.0] * 7, high=[1.0] * 7),
                                  BinStats(low=[-1.0] * 8, high=[1.0] * 8))
    model = build_tiny_vla(size, tok.vocab_size, tok.image_id, tok.pad_id, seed=0)
    model.save_pretrained(out, safe_serialization=True)
    tok.save(out)
    (out / "vla.json").write_text(json.dumps({"kind": "base", "use_rationale": False}))
    return {"size": size, "parameters": parameter_counts(model)["total"], "image_size": SIZES[size]["image_size"],
            "patch_size": SIZES[size]["patch_size"], "vocab": tok.vocab_size}


def make_policy(model_dir: str, reasoning: bool, chunk: int, rationale_tokens: int):
    """The picklable policy factory each evaluation worker calls; it warms the model up (one decode at batch 1
    and 4: the first forward passes of a process are several times slower), like a long evaluation would."""
    import numpy as np

    from refinevla.policy import load_policy

    policy = load_policy(model_dir, reasoning=reasoning, max_rationale_tokens=rationale_tokens)
    policy.tok.action_chunk = chunk
    obs = {"image": np.zeros((64, 64, 3), np.uint8), "state": np.zeros(8, np.float32), "instruction": "warm up"}
    for n in (1, 4):
        policy.act_batch([obs] * n, list(range(n)))
    return policy


def time_harness(name, factory, task, seeds, max_steps, image_size, camera, workers, envs_per_worker) -> dict:
    from refinevla.evaluate import EvaluateConfig, evaluate

    cfg = EvaluateConfig(tasks=(task,), seeds=seeds, max_steps=max_steps, workers=workers,
                         envs_per_worker=envs_per_worker, image_size=image_size, camera=camera, strip_frames=0,
                         progress=False)
    with tempfile.TemporaryDirectory() as out:
        t0, c0 = time.perf_counter(), _children_cpu()
        df = evaluate(factory, cfg, out)
        wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
    assert df.error.isna().all(), df.error.dropna().tolist()
    return _rates(name, len(df), int(df.steps.sum()), wall, float(df.wall_s.sum()) / workers, workers,
                  envs_per_worker=envs_per_worker, policy_s=float(df.policy_s.sum()), cpu_s=cpu)


def _rates(name, episodes, steps, wall, in_episode_s, workers, **extra) -> dict:
    return {"name": name, "episodes": episodes, "steps": steps, "workers": workers, "wall_s": round(wall, 3),
            "in_episode_s": round(in_episode_s, 3),
            "episodes_per_s": episodes / wall, "steps_per_s": steps / wall,
            "in_episode_episodes_per_s": episodes / in_episode_s, "in_episode_steps_per_s": steps / in_episode_s,
            **extra}


# ----------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    from refinevla.model import SIZES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="lift")
    ap.add_argument("--episodes", type=int, default=32, help="episodes per run (fills 2 workers x 16 slots once)")
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--camera", default="robot0_eye_in_hand")
    ap.add_argument("--size", default="tiny16" if "tiny16" in SIZES else "tiny", help="tiny model size preset")
    ap.add_argument("--chunk", type=int, default=4, help="actions per decode (the tokenizer's action_chunk)")
    ap.add_argument("--rationale-tokens", type=int, default=40)
    ap.add_argument("--envs", type=int, nargs="+", default=[1, 4, 16], help="envs_per_worker values to run")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    seeds = [10_000 + i for i in range(args.episodes)]
    common = dict(task=args.task, seeds=seeds, max_steps=args.max_steps, image_size=args.image_size,
                  camera=args.camera, workers=args.workers)
    load_before, started = os.getloadavg(), time.perf_counter()
    runs = [time_bare(**common)]
    print(_line(runs[-1]))
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp), args.size)
        for reasoning in (False, True):
            factory = functools.partial(make_policy, tmp, reasoning, args.chunk, args.rationale_tokens)
            for n in args.envs:
                name = f"{'reasoning' if reasoning else 'baseline'}_envs{n}"
                runs.append(time_harness(name, factory, envs_per_worker=n, **common))
                print(_line(runs[-1]))
    runs.append(dict(time_bare(**common), name="bare_again"))
    print(_line(runs[-1]))
    bare = [r for r in runs if r["name"].startswith("bare")]
    limit = {k: sum(r[k] for r in bare) / len(bare) for k in ("steps_per_s", "in_episode_steps_per_s")}
    for r in runs:
        r["ratio"] = r["steps_per_s"] / limit["steps_per_s"]
        r["ratio_in_episode"] = r["in_episode_steps_per_s"] / limit["in_episode_steps_per_s"]
    result = {
        "task": args.task, "episodes": args.episodes, "max_steps": args.max_steps, "workers": args.workers,
        "image_size": args.image_size, "camera": args.camera,
        "model": dict(model, chunk=args.chunk, rationale_tokens=args.rationale_tokens, trained=False),
        "limit": limit, "runs": {r["name"]: r for r in runs},
        "total_s": round(time.perf_counter() - started, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(f"limit (mean of the bare runs): {limit['in_episode_steps_per_s']:.1f} steps/s in episodes, "
          f"{limit['steps_per_s']:.1f} end to end; {result['total_s']} s in all, load average "
          f"{load_before[0]:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for r in runs:
        print(f"  {r['name']:<18} ratio {r['ratio_in_episode']:.2f} in episodes, {r['ratio']:.2f} end to end")
    write_result(args.out, result)
    return result


def _line(r: dict) -> str:
    return (f"{r['name']:<18} {r['episodes']} episodes, {r['steps']} steps: {r['in_episode_steps_per_s']:6.1f} "
            f"steps/s in episodes ({r['in_episode_episodes_per_s']:.2f} ep/s), {r['steps_per_s']:6.1f} steps/s "
            f"end to end ({r['episodes_per_s']:.2f} ep/s, {r['wall_s']:.1f} s, workers' CPU {r['cpu_s']:.1f} s)")


if __name__ == "__main__":
    main()
