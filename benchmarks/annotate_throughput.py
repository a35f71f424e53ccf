"""Throughput of the HTTP teacher against a local fake server with a fixed latency.

For each concurrency c, requests/s of a cold run (empty cache) through the public `annotate` API and its
ratio to the ideal c / latency (target >= 0.8), with the client's CPU time per request; then the rows/s of a
fully cached re-run (zero requests) and of the offline privileged teacher. The server runs in its own process
so that it does not share the client's GIL. The client does all its work under one GIL (the openai SDK alone
spends ~6 ms of CPU per request here), so one process tops out near 1000 / (CPU ms per request) requests/s:
the sweep at 1 s latency (a realistic LLM answer time) shows the concurrency itself scaling below that ceiling.

    .venv/bin/python benchmarks/annotate_throughput.py            # ~40 s
    .venv/bin/python benchmarks/annotate_throughput.py --latency 0.1 --concurrency 1 4 16 64
Writes benchmarks/results/annotate_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import openai
from PIL import Image

from refinevla.teacher import AnnotateConfig, annotate

HERE = Path(__file__).resolve().parent
KEY_ENV = "REFINEVLA_BENCH_KEY"


def make_demos(n: int, size: int = 64, seed: int = 0) -> datasets.Dataset:
    """n distinct frames (one episode, so stride 1 annotates each) with a target object; images stored as
    datasets.Image() like the data stage writes them."""
    rng = np.random.default_rng(seed)
    objects = json.dumps([{"name": "cube", "role": "target", "pos": [0.0, 0.04, 0.81]}])
    images = [Image.fromarray(x) for x in rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)]
    return datasets.Dataset.from_dict({
        "episode_index": [0] * n, "step_index": list(range(n)), "task": ["lift"] * n,
        "instruction": [f"lift the cube {i}" for i in range(n)], "image": images,
        "state": [[0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.0, 1.0]] * n, "action": [[0.1] * 6 + [1.0]] * n,
        "objects": [objects] * n, "phase": ["approach"] * n}).cast_column("image", datasets.Image())


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    """tests/chat_server.py in its own process; returns it and its URL."""
    proc = subprocess.Popen([sys.executable, str(HERE.parent / "tests" / "chat_server.py"), "--latency",
                             str(latency)], stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed_annotate(demos, cfg, out_dir) -> tuple[dict, float, float]:
    """Run annotate; return its cost.json, the wall seconds and the CPU seconds of the whole call."""
    wall, cpu = time.perf_counter(), cpu_s()
    annotate(demos, cfg, out_dir)
    summary = json.loads((Path(out_dir) / "cost.json").read_text())
    return summary, time.perf_counter() - wall, cpu_s() - cpu


def sweep(latency: float, concurrencies: list[int], seconds: float, tmp: str) -> tuple[list[dict], tuple]:
    """Cold runs at each concurrency against a server with this latency, then a fully cached re-run of the
    last one; returns the rows and the cached run's figures."""
    server, url = start_server(latency)
    rows = []
    try:
        for c in concurrencies:
            n = c * max(3, round(seconds / latency))  # whole rounds of c requests: no half-empty tail
            demos = make_demos(n, seed=c)
            cfg = AnnotateConfig(teacher="http", base_url=url, api_key_env=KEY_ENV, concurrency=c,
                                 data_root=f"{tmp}/data-{latency}-{c}", timeout_s=30.0)
            cold, wall, cpu = timed_annotate(demos, cfg, f"{tmp}/out-{latency}-{c}")
            assert cold["requests_sent"] == n and cold["failed"] == 0, cold
            ideal = c / latency
            rows.append({"latency_s": latency, "concurrency": c, "requests": n, "seconds": cold["request_seconds"],
                         "requests_per_s": cold["requests_per_s"], "ideal_per_s": ideal,
                         "ratio": round(cold["requests_per_s"] / ideal, 3),
                         "client_cpu_ms_per_request": round(cpu / n * 1000, 2), "annotate_wall_s": round(wall, 3)})
            print(f"latency {latency:.1f} s, c={c:3d}: {n} requests in {cold['request_seconds']:.2f} s, "
                  f"{cold['requests_per_s']:.1f}/s, ratio {rows[-1]['ratio']:.2f}", flush=True)
        warm, wall, _ = timed_annotate(demos, cfg, f"{tmp}/out-cached-{latency}")
        assert warm["requests_sent"] == 0, warm
        cached = {"rows": n, "requests": 0, "seconds": warm["request_seconds"],
                  "rows_per_s": round(n / warm["request_seconds"], 1), "annotate_wall_s": round(wall, 3)}
        return rows, cached
    finally:
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.1, help="server latency per request (s)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--realistic-latency", type=float, default=1.0, help="second sweep (0 = skip)")
    parser.add_argument("--realistic-concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--seconds", type=float, default=1.5, help="ideal duration of each cold run (>= 3 rounds)")
    parser.add_argument("--out", default=str(HERE / "results" / "annotate_throughput.json"))
    args = parser.parse_args()
    os.environ[KEY_ENV] = "sk-bench-dummy"
    with tempfile.TemporaryDirectory() as tmp:
        rows, cached = sweep(args.latency, args.concurrency, args.seconds, tmp)
        realistic = sweep(args.realistic_latency, args.realistic_concurrency, args.seconds, tmp)[0] \
            if args.realistic_latency > 0 else []
        n = cached["rows"]
        _, priv_wall, _ = timed_annotate(make_demos(n), AnnotateConfig(data_root=f"{tmp}/data-p"), f"{tmp}/out-p")
    privileged = {"rows": n, "annotate_wall_s": round(priv_wall, 3), "rows_per_s": round(n / priv_wall, 1)}

    print("\nHTTP teacher vs a local fake server (ideal = concurrency / latency)")
    print(f"{'latency s':>9} {'concurrency':>11} {'requests':>8} {'seconds':>8} {'req/s':>8} {'ideal':>8} "
          f"{'ratio':>6} {'cpu ms/req':>10}")
    for r in rows + realistic:
        print(f"{r['latency_s']:>9.1f} {r['concurrency']:>11} {r['requests']:>8} {r['seconds']:>8.2f} "
              f"{r['requests_per_s']:>8.1f} {r['ideal_per_s']:>8.0f} {r['ratio']:>6.2f} "
              f"{r['client_cpu_ms_per_request']:>10.1f}")
    ceiling = 1000 / np.median([r["client_cpu_ms_per_request"] for r in rows])
    print(f"client CPU ceiling (one GIL): ~{ceiling:.0f} requests/s")
    print(f"cached re-run: {n} rows, 0 requests, {cached['rows_per_s']:.0f} rows/s "
          f"(whole annotate call {cached['annotate_wall_s']:.2f} s, dataset save included)")
    print(f"privileged teacher (offline): {privileged['rows_per_s']:.0f} rows/s (whole annotate call)")

    result = {"benchmark": "annotate_throughput", "cold": rows, "cold_realistic_latency": realistic,
              "cached": cached, "privileged": privileged, "target_ratio": 0.8,
              "client_cpu_ceiling_per_s": round(float(ceiling), 1),
              "machine": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
                          "python": platform.python_version(), "openai": openai.__version__,
                          "datasets": datasets.__version__},
              "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
