"""Training step time under a competing busy process, per torch thread setting.

Torch splits each operation across its intra-op threads and waits for the slowest; when another process holds one
of the cores, the thread on that core runs a fraction of the time and every operation waits for it. This measures a
pre-training step of the embedded default model (``tiny16``, batch 32, the default sequence length) in a fresh
process per setting, first on an idle machine, then beside one busy process (a pure-Python loop, at normal priority
and at nice 19: a browser tab, a test run), and reports each setting's contended / idle ratio (target <= 2).

    .venv/bin/python benchmarks/threads.py [--steps 8]

Results go to benchmarks/results/threads.json. Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "threads.json"
REPO = Path(__file__).resolve().parents[1]

STEP = r"""
import sys, time, torch, numpy as np
sys.path.insert(0, {repo!r})
from refinevla.model import SIZES, build_tiny_vla
from refinevla.train import resolve_threads
torch.set_num_threads(resolve_threads({threads}))
s = SIZES["tiny16"]
m = build_tiny_vla("tiny16", 600, 5, 0)
n_img = (s["image_size"] // s["patch_size"]) ** 2
L = n_img + 14 + 29
ids = torch.randint(10, 500, (32, L)); ids[:, :n_img] = 5
tt = torch.zeros_like(ids); tt[:, n_img + 14:] = 1
px = torch.randn(32, 3, s["image_size"], s["image_size"])
opt = torch.optim.AdamW(m.parameters(), 1e-3)
times = []
for i in range({steps} + 2):
    t = time.perf_counter()
    out = m(input_ids=ids, pixel_values=px, token_type_ids=tt, attention_mask=torch.ones_like(ids), use_cache=False)
    out.logits.float().mean().backward(); opt.step(); opt.zero_grad()
    times.append(time.perf_counter() - t)
print(float(np.median(times[2:])), torch.get_num_threads())
"""


def step_time(threads: int, steps: int) -> tuple[float, int]:
    code = STEP.format(repo=str(REPO), threads=threads, steps=steps)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), int(out[1])


def busy(nice: int) -> subprocess.Popen:
    return subprocess.Popen(["nice", "-n", str(nice), sys.executable, "-c", "while True: pass"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    settings = {"auto (0)": 0, "1": 1, str(os.cpu_count()): os.cpu_count() or 1}
    rows = []
    for label, threads in settings.items():
        idle, used = step_time(threads, args.steps)
        row = {"setting": label, "threads": used, "idle_s": round(idle, 3)}
        for nice in (0, 19):
            proc = busy(nice)
            try:
                time.sleep(0.5)
                contended, _ = step_time(threads, args.steps)
            finally:
                proc.kill()
            row[f"busy_nice{nice}_s"] = round(contended, 3)
            row[f"ratio_nice{nice}"] = round(contended / idle, 2)
        rows.append(row)
        print(row, flush=True)
    result = {"when": time.strftime("%Y-%m-%d %H:%M"), "machine": {"cpus": os.cpu_count(),
                                                                  "processor": platform.processor()},
              "model": "tiny16, batch 32", "steps": args.steps, "target_ratio": 2.0, "rows": rows}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
