"""What does the evaluation harness cost on top of the simulator itself?

Runs the same episodes (same task, seeds and number of steps) twice:
  raw      a bare loop: make_task, reset(seed), step(zero action) + render, nothing else
  harness  refinevla.evaluate.evaluate with ZeroPolicy (records, jsonl, strips, episode GIFs, summary, progress off)
and prints overhead = harness / raw - 1 (target: <= 10%), in wall-clock and in this process's CPU time (the
steadier one on a shared machine). The two are alternated ``--repeats`` times and the fastest of each is kept.

With ``--policy-dir DIR`` it also loads ``refinevla.policy.load_policy(DIR)`` and times its per-action latency
on real observations of the task (the fine-tuned VLA's cost per control step).

    .venv/bin/python benchmarks/eval_overhead.py [--episodes N] [--policy-dir DIR]

Results go to benchmarks/results/eval_overhead.json.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from refinevla.evaluate import EvaluateConfig, evaluate  # noqa: E402
from refinevla.policy import ZeroPolicy  # noqa: E402
from refinevla.sim import make_task  # noqa: E402
from results_file import write_result  # noqa: E402  (benchmarks/results_file.py)

RESULTS = Path(__file__).resolve().parent / "results" / "eval_overhead.json"


def time_raw(task: str, seeds: list[int], max_steps: int, image_size: int, camera: str = "") -> dict:
    """The floor: build the env once, then reset + step + render for every episode, no bookkeeping
    (also the per-worker limit of benchmarks/eval_throughput.py)."""
    t0, c0 = time.perf_counter(), time.process_time()
    env = make_task(task, image_size=image_size, segmentation=False, camera=camera)
    t_build = time.perf_counter() - t0
    action = ZeroPolicy().act({})
    t1 = time.perf_counter()
    for seed in seeds:
        env.reset(seed)
        for _ in range(max_steps):
            env.step(action)
    t_episodes = time.perf_counter() - t1
    env.close()
    total = time.perf_counter() - t0
    return {"total_s": total, "cpu_s": time.process_time() - c0, "build_s": t_build, "episodes_s": t_episodes,
            "steps": len(seeds) * max_steps}


def time_harness(task: str, seeds: list[int], max_steps: int, image_size: int) -> dict:
    """The same episodes through the harness, in this process (workers=1), into a throw-away folder."""
    cfg = EvaluateConfig(tasks=(task,), seeds=seeds, max_steps=max_steps, workers=1, image_size=image_size,
                         strip_frames=4, progress=False)
    with tempfile.TemporaryDirectory() as out:
        t0, c0 = time.perf_counter(), time.process_time()
        df = evaluate(ZeroPolicy, cfg, out)
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert (df.steps == max_steps).all() and df.error.isna().all(), df  # same work as the raw loop
    return {"total_s": total, "cpu_s": cpu, "episodes_s": float(df.wall_s.sum()), "policy_s": float(df.policy_s.sum())}


def time_policy(policy_dir: str, task: str, seed: int, image_size: int, n: int) -> dict:
    """Per-action latency of a saved policy on real observations (2 warm-up calls not counted)."""
    try:
        from refinevla.policy import load_policy  # written by the training stage
    except ImportError as e:
        raise SystemExit(f"--policy-dir needs refinevla.policy.load_policy, which this checkout lacks ({e})")

    t0 = time.perf_counter()
    policy = load_policy(policy_dir)
    load_s = time.perf_counter() - t0
    env = make_task(task, image_size=image_size, segmentation=False)
    obs = env.reset(seed)
    policy.reset(obs["instruction"])
    times = []
    for i in range(n + 2):
        t1 = time.perf_counter()
        action = policy.act(obs)
        if i >= 2:
            times.append(time.perf_counter() - t1)
        obs, _ = env.step(action)
    env.close()
    ms = 1000 * np.asarray(times)
    return {"policy_dir": str(policy_dir), "load_s": load_s, "n": n, "mean_ms": float(ms.mean()),
            "median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=4)
    ap.add_argument("--max-steps", type=int, default=80)
    ap.add_argument("--task", default="lift")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="alternate raw/harness this many times, keep the fastest")
    ap.add_argument("--policy-dir", default=None, help="also time refinevla.policy.load_policy(DIR) per action")
    ap.add_argument("--policy-steps", type=int, default=20)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    seeds = [10_000 + i for i in range(args.episodes)]
    load_before = os.getloadavg()
    time_harness(args.task, seeds[:1], 5, args.image_size)  # warm-up, discarded: first builds in a process are slower
    raws, harnesses = [], []
    for _ in range(args.repeats):
        raws.append(time_raw(args.task, seeds, args.max_steps, args.image_size))
        harnesses.append(time_harness(args.task, seeds, args.max_steps, args.image_size))
    raw = {k: min(r[k] for r in raws) for k in raws[0]}  # fastest of each measure
    harness = {k: min(r[k] for r in harnesses) for k in harnesses[0]}
    steps = args.episodes * args.max_steps
    result = {
        "task": args.task, "episodes": args.episodes, "max_steps": args.max_steps, "image_size": args.image_size,
        "repeats": args.repeats, "raw": raw, "harness": harness,
        "overhead": harness["total_s"] / raw["total_s"] - 1,  # wall clock
        "overhead_cpu": harness["cpu_s"] / raw["cpu_s"] - 1,  # CPU time of this process: steadier when shared
        "overhead_episodes": harness["episodes_s"] / raw["episodes_s"] - 1,  # inside episodes only (per-step cost)
        "raw_steps_per_s": steps / raw["episodes_s"],
        "harness_steps_per_s": steps / harness["episodes_s"],
        "policy": None,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if args.policy_dir:
        result["policy"] = time_policy(args.policy_dir, args.task, seeds[0], args.image_size, args.policy_steps)

    print(f"{steps} steps of {args.task} at {args.image_size}px (fastest of {args.repeats})")
    print(f"  raw loop   {raw['total_s']:7.2f} s  ({result['raw_steps_per_s']:.1f} steps/s, env build {raw['build_s']:.2f} s)")
    print(f"  harness    {harness['total_s']:7.2f} s  ({result['harness_steps_per_s']:.1f} steps/s)")
    print(f"  overhead   {100 * result['overhead']:+.1f}% wall, {100 * result['overhead_cpu']:+.1f}% CPU, "
          f"{100 * result['overhead_episodes']:+.1f}% inside episodes"
          f"  (target <= 10%; load average {load_before[0]:.1f} on {os.cpu_count()} CPUs)")
    if result["policy"]:
        p = result["policy"]
        print(f"  policy     {p['mean_ms']:.1f} ms/action mean, {p['median_ms']:.1f} median, {p['p90_ms']:.1f} p90")
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
