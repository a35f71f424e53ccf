"""Throughput of the HTTP teacher against a local fake server with a fixed latency, online and through the Batch API.

For each concurrency c, requests/s of a cold run (empty cache) through the public `annotate` API and its ratio
to the ideal c / latency (target >= 0.8). Beside it, what bounds it on this machine: the client's and the
server's CPU time per request and the CPU ceiling they imply, cores * 1000 / (client ms + server ms)
requests/s (every core doing nothing else; the client's Python work also shares one GIL, so the real bound is
lower), and the bare `openai` SDK's own CPU per request (a loop of `client.chat.completions.create` on the same
message) for scale. The server runs in its own
process. A second sweep at 1 s latency (a realistic LLM answer time) shows the concurrency scaling below the
ceiling. Then: rows/s of a fully cached re-run (zero requests), of the offline privileged teacher, and the
client side of the Batch API path (write + upload the JSONL, poll, download and store the answers).

    .venv/bin/python benchmarks/annotate_throughput.py            # ~1 min
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
from refinevla.teacher.request import Job, build_messages

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


def process_cpu_s(pid: int) -> float:
    """user + system CPU seconds of another process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sdk_cpu_ms(url: str, n: int = 200) -> float:
    """CPU ms per request of the bare SDK call (`chat.completions.create`, one thread, same message)."""
    client = openai.OpenAI(api_key="unused-local", base_url=url, max_retries=0)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    messages = build_messages(Job(0, "", image, "lift the cube", [0.0] * 8, [0.1] * 7, []))
    client.chat.completions.create(model="m", messages=messages)
    start = cpu_s()
    for _ in range(n):
        client.chat.completions.create(model="m", messages=messages, temperature=0.0, max_tokens=300)
    return (cpu_s() - start) / n * 1000


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
            cfg = AnnotateConfig(teacher="http", base_url=url, api_key_env=KEY_ENV, concurrency=c, preflight=0,
                                 data_root=f"{tmp}/data-{latency}-{c}", timeout_s=30.0)  # steady state: no preflight
            server_cpu = process_cpu_s(server.pid)
            cold, wall, cpu = timed_annotate(demos, cfg, f"{tmp}/out-{latency}-{c}")
            server_ms = (process_cpu_s(server.pid) - server_cpu) / n * 1000
            assert cold["requests_sent"] == n and cold["failed"] == 0, cold
            ideal, client_ms = c / latency, cpu / n * 1000
            ceiling = (os.cpu_count() or 1) * 1000 / (client_ms + server_ms)
            rows.append({"latency_s": latency, "concurrency": c, "requests": n, "seconds": cold["request_seconds"],
                         "requests_per_s": cold["requests_per_s"], "ideal_per_s": ideal,
                         "ratio": round(cold["requests_per_s"] / ideal, 3),
                         "client_cpu_ms_per_request": round(client_ms, 2),
                         "server_cpu_ms_per_request": round(server_ms, 2),
                         "cpu_ceiling_per_s": round(ceiling, 1),
                         "ratio_to_attainable": round(cold["requests_per_s"] / min(ideal, ceiling), 3),
                         "annotate_wall_s": round(wall, 3)})
            print(f"latency {latency:.1f} s, c={c:3d}: {n} requests in {cold['request_seconds']:.2f} s, "
                  f"{cold['requests_per_s']:.1f}/s, ratio {rows[-1]['ratio']:.2f} (CPU ceiling {ceiling:.0f}/s)",
                  flush=True)
        warm, wall, _ = timed_annotate(demos, cfg, f"{tmp}/out-cached-{latency}")
        assert warm["requests_sent"] == 0, warm
        cached = {"rows": n, "requests": 0, "seconds": warm["request_seconds"],
                  "rows_per_s": round(n / warm["request_seconds"], 1), "annotate_wall_s": round(wall, 3)}
        cached["sdk_cpu_ms_per_request"] = round(sdk_cpu_ms(url), 2)
        return rows, cached
    finally:
        server.kill()
        server.wait()


def batch_client_side(n: int, tmp: str) -> dict:
    """The Batch API path end to end against the fake server (answered at the first poll): the client's
    share, i.e. rows/s to write, upload, poll, download and store n answers, and the input file's size."""
    server, url = start_server(0.0)
    try:
        demos = make_demos(n, seed=7)
        cfg = AnnotateConfig(teacher="http", base_url=url, api_key_env=KEY_ENV, batch=True, batch_poll_s=0.05,
                             data_root=f"{tmp}/data-batch", timeout_s=60.0, preflight=0)
        summary, wall, cpu = timed_annotate(demos, cfg, f"{tmp}/out-batch")
        assert summary["requests_sent"] == n and summary["failed"] == 0, summary
        return {"rows": n, "annotate_wall_s": round(wall, 3), "rows_per_s": round(n / wall, 1),
                "client_cpu_ms_per_row": round(cpu / n * 1000, 2), "batches": summary["batches_submitted"]}
    finally:
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.1, help="server latency per request (s)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--realistic-latency", type=float, default=1.0, help="second sweep (0 = skip)")
    parser.add_argument("--realistic-concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--seconds", type=float, default=3.0, help="ideal duration of each cold run (>= 3 rounds)")
    parser.add_argument("--batch-rows", type=int, default=2000, help="frames sent through the Batch API path")
    parser.add_argument("--out", default=str(HERE / "results" / "annotate_throughput.json"))
    args = parser.parse_args()
    os.environ[KEY_ENV] = "sk-bench-dummy"
    with tempfile.TemporaryDirectory() as tmp:
        rows, cached = sweep(args.latency, args.concurrency, args.seconds, tmp)
        realistic = sweep(args.realistic_latency, args.realistic_concurrency, args.seconds, tmp)[0] \
            if args.realistic_latency > 0 else []
        n = cached["rows"]
        _, priv_wall, _ = timed_annotate(make_demos(n), AnnotateConfig(data_root=f"{tmp}/data-p"), f"{tmp}/out-p")
        batch = batch_client_side(args.batch_rows, tmp)
    privileged = {"rows": n, "annotate_wall_s": round(priv_wall, 3), "rows_per_s": round(n / priv_wall, 1)}

    print("\nHTTP teacher vs a local fake server (ideal = concurrency / latency)")
    print(f"{'latency s':>9} {'concurrency':>11} {'requests':>8} {'req/s':>8} {'ideal':>8} {'ratio':>6} "
          f"{'client ms':>9} {'server ms':>9} {'ceiling':>8} {'ratio to min(ideal, ceiling)':>28}")
    for r in rows + realistic:
        print(f"{r['latency_s']:>9.1f} {r['concurrency']:>11} {r['requests']:>8} {r['requests_per_s']:>8.1f} "
              f"{r['ideal_per_s']:>8.0f} {r['ratio']:>6.2f} {r['client_cpu_ms_per_request']:>9.2f} "
              f"{r['server_cpu_ms_per_request']:>9.2f} {r['cpu_ceiling_per_s']:>8.0f} {r['ratio_to_attainable']:>28.2f}")
    ceiling = float(np.median([r["cpu_ceiling_per_s"] for r in rows]))
    print(f"CPU ceiling on this machine ({os.cpu_count()} cores, client + server): ~{ceiling:.0f} requests/s; "
          f"the bare SDK call alone costs {cached['sdk_cpu_ms_per_request']:.1f} ms CPU per request")
    print(f"Batch API path, client side: {batch['rows']} rows in {batch['annotate_wall_s']:.1f} s "
          f"({batch['rows_per_s']:.0f} rows/s, {batch['client_cpu_ms_per_row']:.2f} ms CPU per row)")
    print(f"cached re-run: {n} rows, 0 requests, {cached['rows_per_s']:.0f} rows/s "
          f"(whole annotate call {cached['annotate_wall_s']:.2f} s, dataset save included)")
    print(f"privileged teacher (offline): {privileged['rows_per_s']:.0f} rows/s (whole annotate call)")

    result = {"benchmark": "annotate_throughput", "cold": rows, "cold_realistic_latency": realistic,
              "cached": cached, "privileged": privileged, "batch_api": batch, "target_ratio": 0.8,
              "cpu_ceiling_per_s": round(ceiling, 1),
              "machine": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
                          "python": platform.python_version(), "openai": openai.__version__,
                          "datasets": datasets.__version__},
              "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
