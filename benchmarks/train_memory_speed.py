"""Fine-tuning memory and speed: LoRA on an fp32 base vs LoRA on the same base in 4-bit (nf4), on a CPU.

The model is the ``bench50m`` size preset of refinevla.model (a PaliGemma-architecture VLA of >= 50M
parameters, random weights: memory and speed do not depend on the values). Both variants train the same LoRA
(r=16 on the top half of the decoder, ``refinevla.model.add_lora``) with the joint loss on the same synthetic
batches (``refinevla.train.build_sequence``: 64 image tokens + prompt + rationale + ACTION: + 7 bins).

Method:
- Each variant runs in a fresh Python process, so that peaks never mix and freed pages of one variant do
  not count for the other.
- The 4-bit base is quantised once (in its own process) and saved with ``save_pretrained``; the nf4 variant
  loads that pre-quantised folder. Quantising at load time would leave the fp32 copy's pages resident and
  charge them to the 4-bit variant (measured: the nf4 peak then includes the fp32 pages).
- Memory: after the imports (every library either variant touches), the synthetic batches and one forward +
  backward of a ``micro`` model (torch's lazily initialised CPU kernels), the process resets its peak resident set
  (writes ``5`` to ``/proc/self/clear_refs``, Linux >= 4.0; where that fails, the peak so far stays in the
  figure and the JSON says so) and reads ``VmRSS`` from ``/proc/self/status`` as the baseline. It then loads
  the base, adds LoRA and trains; the figure is ``VmHWM - baseline`` (the peak resident set above the
  baseline), in MB (10^6 bytes). ``ru_maxrss`` is recorded alongside as a check, and at the baseline and after
  the last step where the resident memory is (``memory_at_*``: anonymous vs file-backed pages, i.e. the weights
  mapped from safetensors; glibc's heap in use vs freed but kept, from ``mallinfo2``).
- Speed: optimizer steps per second over ``--steps`` steps after ``--warmup`` untimed steps, each step one
  forward + backward + clip + AdamW step exactly like ``refinevla.train.train_loop``, on ``--threads`` threads.
- Optionally (``--allocator``) both variants again under a glibc malloc tuned to give memory back
  (``MALLOC_ARENA_MAX=1 MALLOC_TRIM_THRESHOLD_=0 MALLOC_MMAP_THRESHOLD_=65536``): bitsandbytes' CPU 4-bit
  matmul dequantises each weight into a temporary buffer on every call, and with glibc's defaults freed
  buffers stay resident.
- Optionally (``--grad-checkpointing``) both variants again with gradient checkpointing
  (``train.gradient_checkpointing``: ``refinevla.model.add_lora(..., gradient_checkpointing=True)``,
  non-reentrant; each decoder layer keeps only its input and recomputes its activations in the backward pass).
  With both options every malloc setting is run with and without it. Checkpointing changes neither the model,
  the LoRA nor the batches, and the losses are the same (recorded per row).
- The summary has one row per setting (``malloc`` x ``grad_checkpointing``): both peaks, their ratio (target
  ``nf4 <= 0.4 x fp32``), both speeds and their ratio.

    .venv/bin/python benchmarks/train_memory_speed.py                          # ~1 min on 1 thread
    .venv/bin/python benchmarks/train_memory_speed.py --steps 3 --allocator --grad-checkpointing   # all rows, ~3 min
Writes benchmarks/results/train_memory_speed.json. On a GPU, use torch.cuda.max_memory_allocated instead.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_file import library_versions, write_result  # benchmarks/results_file.py

HERE = Path(__file__).resolve().parent
SIZE = "bench50m"
TARGET_PEAK_RATIO = 0.4  # the target: the 4-bit variant's peak at most 0.4 x the fp32 one
TUNED_MALLOC = {"MALLOC_ARENA_MAX": "1", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_MMAP_THRESHOLD_": "65536"}
INSTRUCTIONS = ["pick up the red cube", "put the carrot on the plate", "stack the green block on the yellow block"]
RATIONALE = ("observation : the gripper is above the table and the cube is to the left . situation : the gripper "
             "is open and nothing is held . spatial : the cube is four centimetres left and nine below . plan : "
             "move left , descend , close the gripper , lift")


# ------------------------------------------------------------------------------------ measurement
def proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def mb(kb: int) -> float:
    return round(kb * 1024 / 1e6, 1)


def memory_breakdown() -> dict:
    """Where the resident memory is now, in MB: anonymous vs file-backed pages (safetensors weights are mapped
    from the file), and glibc's heap: bytes in use vs freed bytes it keeps (mallinfo2, glibc >= 2.33)."""
    import ctypes

    out = dict(rss_anon_mb=mb(proc_status_kb("RssAnon")), rss_file_mb=mb(proc_status_kb("RssFile")))
    try:
        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        m = libc.mallinfo2()
        out.update(malloc_in_use_mb=round((m.uordblks + m.hblkhd) / 1e6, 1),
                   malloc_free_kept_mb=round(m.fordblks / 1e6, 1))
    except (OSError, AttributeError):
        out.update(malloc_in_use_mb=None, malloc_free_kept_mb=None)
    return out


# ------------------------------------------------------------------------------------ the pieces
def synthetic_batches(tok, n_image: int, image_size: int, batch: int, n: int, seed: int = 0):
    """n batches of ``batch`` rows in the training layout (refinevla.train.build_sequence)."""
    import numpy as np
    import torch

    from refinevla.model import preprocess_images
    from refinevla.train import build_sequence

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        seqs = [build_sequence(tok, INSTRUCTIONS[rng.integers(len(INSTRUCTIONS))], rng.uniform(-1, 1, 8),
                               rng.uniform(-1, 1, 7), n_image, RATIONALE) for _ in range(batch)]
        length = max(len(s[0]) for s in seqs)
        ids = torch.full((batch, length), tok.pad_id)
        tt, part, att = torch.ones_like(ids), torch.zeros_like(ids), torch.zeros_like(ids)
        for i, (s_ids, s_tt, s_part) in enumerate(seqs):
            k = len(s_ids)
            ids[i, :k], tt[i, :k], part[i, :k], att[i, :k] = (torch.tensor(s_ids), torch.tensor(s_tt),
                                                             torch.tensor(s_part), 1)
        pixels = preprocess_images(rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8),
                                   image_size)
        out.append(dict(input_ids=ids, token_type_ids=tt, attention_mask=att, pixel_values=pixels, part=part))
    return out


def prepare(work: Path) -> dict:
    """(in its own process) the fp32 base + tokenizer, saved; returns the parameter count."""
    import numpy as np

    from refinevla.model import build_tiny_vla, parameter_counts
    from refinevla.tokens import BinStats, VLATokenizer

    rng = np.random.default_rng(0)
    tok = VLATokenizer.train_tiny(INSTRUCTIONS + [RATIONALE], BinStats.fit(rng.uniform(-1, 1, (100, 7))),
                                  BinStats.fit(rng.uniform(-1, 1, (100, 8))))
    model = build_tiny_vla(SIZE, tok.vocab_size, tok.image_id, tok.pad_id, seed=0)
    counts = parameter_counts(model)
    model.save_pretrained(work / "fp32", safe_serialization=True)
    tok.save(work / "fp32")
    return dict(parameters=counts["total"], vocab=tok.vocab_size)


def quantise(work: Path) -> dict:
    """(in its own process) load the fp32 base in nf4 and save it pre-quantised."""
    from refinevla.model import load_base, parameter_counts

    model = load_base(work / "fp32", "4bit")
    model.save_pretrained(work / "nf4", safe_serialization=True)
    size = sum(f.stat().st_size for f in (work / "nf4").glob("*.safetensors"))
    return dict(nf4_file_mb=round(size / 1e6, 1), nf4_counted_parameters=parameter_counts(model)["total"])


def child(variant: str, work: Path, steps: int, warmup: int, batch: int, threads: int,
          checkpointing: bool = False) -> dict:
    """One variant in this (fresh) process: baseline after imports and data, then load, LoRA, train."""
    import resource

    # every library either variant touches is imported before the baseline (bitsandbytes, peft and the
    # PaliGemma modules alone are ~175 MB resident here, and would otherwise be charged to the variants)
    import bitsandbytes as bnb
    import peft  # noqa: F401
    import torch
    import transformers.integrations.bitsandbytes  # noqa: F401
    import transformers.quantizers.quantizer_bnb_4bit  # noqa: F401
    from transformers import PaliGemmaForConditionalGeneration  # noqa: F401

    from refinevla.model import SIZES, ModelConfig, add_lora, build_tiny_vla, load_base, parameter_counts
    from refinevla.tokens import VLATokenizer
    from refinevla.train import joint_loss

    torch.set_num_threads(threads)
    tok = VLATokenizer.load(work / "fp32")
    s = SIZES[SIZE]
    n_image = (s["image_size"] // s["patch_size"]) ** 2
    batches = synthetic_batches(tok, n_image, s["image_size"], batch, warmup + steps)
    # one forward + backward of a micro model first: torch's lazily initialised CPU kernels (~20 MB) are a
    # per-process constant, not part of either variant
    micro = build_tiny_vla("micro", tok.vocab_size, tok.image_id, tok.pad_id)
    warm = synthetic_batches(tok, (SIZES["micro"]["image_size"] // SIZES["micro"]["patch_size"]) ** 2,
                             SIZES["micro"]["image_size"], batch, 1)[0]
    warm_part = warm.pop("part")
    joint_loss(micro(**warm, use_cache=False).logits, warm["input_ids"], warm_part, 0.5)[0].backward()
    del micro, warm

    reset = reset_peak()
    baseline_kb = proc_status_kb("VmRSS")
    hwm_at_baseline_kb = proc_status_kb("VmHWM")
    memory_at_baseline = memory_breakdown()
    t_load = time.perf_counter()
    if variant == "fp32":
        model = load_base(work / "fp32", "none")
    else:  # the pre-quantised folder: its config carries the quantisation
        model = load_base(work / "nf4", "4bit")
    top_half = s["text_layers"] // 2
    torch.manual_seed(0)
    model = add_lora(model, ModelConfig(size=SIZE, quantization="4bit" if variant == "nf4" else "none",
                                        tune_top_k_layers=top_half), gradient_checkpointing=checkpointing)
    load_s = time.perf_counter() - t_load
    after_load_kb = proc_status_kb("VmRSS")
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    times, losses = [], []
    for i, b in enumerate(batches):
        b = dict(b)
        part = b.pop("part")
        t0 = time.perf_counter()
        logits = model(**b, use_cache=False).logits
        loss = joint_loss(logits, b["input_ids"], part, 0.5)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(round(loss.item(), 4))
    peak_kb = proc_status_kb("VmHWM")
    memory_at_end = memory_breakdown()
    counts = parameter_counts(model)
    base = model.get_base_model()
    active = (base.is_activation_checkpointing if hasattr(base, "is_activation_checkpointing")
              else base.is_gradient_checkpointing)
    return dict(variant=variant, grad_checkpointing=checkpointing, checkpointing_active=active,
                linear4bit_modules=n4, parameters=counts["total"], trainable=counts["trainable"],
                lora_layers=top_half, tokens_per_row=int(batches[0]["attention_mask"].sum(1).max()),
                steps_timed=len(times), step_s=[round(t, 3) for t in times],
                steps_per_s=round(len(times) / sum(times), 4), load_s=round(load_s, 2),
                baseline_rss_mb=mb(baseline_kb), peak_reset=reset,
                hwm_at_baseline_mb=mb(hwm_at_baseline_kb), after_load_rss_mb=mb(after_load_kb),
                peak_hwm_mb=mb(peak_kb), peak_above_baseline_mb=mb(peak_kb - baseline_kb),
                ru_maxrss_mb=mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), losses=losses,
                memory_at_baseline=memory_at_baseline, memory_at_end=memory_at_end)


# ------------------------------------------------------------------------------------ orchestration
def run_child(args, role: str, work: Path, env_extra: dict | None = None, variant: str = "") -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    cmd = [sys.executable, __file__, "--role", role, "--work", str(work), "--variant", variant,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--threads", str(args.threads)] + (["--checkpointing"] if args.checkpointing else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{role} {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps per variant")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--allocator", action="store_true", help="also run both variants with a tuned glibc malloc")
    ap.add_argument("--allocator-steps", type=int, default=2, help="timed steps under the tuned malloc (slow)")
    ap.add_argument("--grad-checkpointing", action="store_true",
                    help="also run both variants (under each malloc) with gradient checkpointing")
    ap.add_argument("--out", default=str(HERE / "results" / "train_memory_speed.json"))
    ap.add_argument("--role", default="main", choices=["main", "prepare", "quantise", "child"], help=argparse.SUPPRESS)
    ap.add_argument("--work", default="", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="", help=argparse.SUPPRESS)
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.role != "main":
        work = Path(args.work)
        result = (prepare(work) if args.role == "prepare" else quantise(work) if args.role == "quantise"
                  else child(args.variant, work, args.steps, args.warmup, args.batch, args.threads,
                             args.checkpointing))
        print(json.dumps(result))
        return

    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        work = Path(tmp)
        model_info = run_child(args, "prepare", work)
        model_info.update(run_child(args, "quantise", work))
        print(f"{SIZE}: {model_info['parameters']:,} parameters (vocabulary {model_info['vocab']}); "
              f"nf4 file {model_info['nf4_file_mb']} MB")
        mallocs = [("default", {})] + ([("tuned", TUNED_MALLOC)] if args.allocator else [])
        settings = [(name, env, ckpt) for name, env in mallocs
                    for ckpt in ((False, True) if args.grad_checkpointing else (False,))]
        rows = []
        for name, env, ckpt in settings:
            steps = args.steps if name == "default" else args.allocator_steps
            sub = argparse.Namespace(**{**vars(args), "steps": steps, "checkpointing": ckpt})
            for variant in ("fp32", "nf4"):
                r = run_child(sub, "child", work, env, variant)
                r["malloc"] = name
                rows.append(r)
                print(f"  {name:8s} {'ckpt' if ckpt else '':4s} {variant:5s} peak +{r['peak_above_baseline_mb']:7.1f} "
                      f"MB  {r['steps_per_s']:.3f} steps/s", flush=True)

    summary = []
    for name, _, ckpt in settings:
        fp32, nf4 = (next(r for r in rows if r["malloc"] == name and r["grad_checkpointing"] == ckpt
                          and r["variant"] == v) for v in ("fp32", "nf4"))
        summary.append(dict(malloc=name, grad_checkpointing=ckpt, fp32_peak_mb=fp32["peak_above_baseline_mb"],
                            nf4_peak_mb=nf4["peak_above_baseline_mb"],
                            peak_ratio=round(nf4["peak_above_baseline_mb"] / fp32["peak_above_baseline_mb"], 3),
                            fp32_steps_per_s=fp32["steps_per_s"], nf4_steps_per_s=nf4["steps_per_s"],
                            speed_ratio=round(nf4["steps_per_s"] / fp32["steps_per_s"], 3)))

    print(f"\n{'malloc':8s} {'ckpt':5s} {'variant':7s} {'peak MB':>9s} {'steps/s':>8s} {'s/step':>7s}")
    for r in rows:
        print(f"{r['malloc']:8s} {str(r['grad_checkpointing']):5s} {r['variant']:7s} "
              f"{r['peak_above_baseline_mb']:9.1f} {r['steps_per_s']:8.3f} {1 / r['steps_per_s']:7.2f}")
    for s in summary:
        print(f"{s['malloc']:8s} {str(s['grad_checkpointing']):5s} nf4/fp32 peak ratio {s['peak_ratio']:.2f} "
              f"(target <= {TARGET_PEAK_RATIO:.2f}), speed ratio {s['speed_ratio']:.2f}")

    result = dict(benchmark="train_memory_speed", size=SIZE, model=model_info,
                  settings=dict(steps=args.steps, warmup=args.warmup, batch=args.batch, threads=args.threads,
                                allocator_steps=args.allocator_steps if args.allocator else None,
                                grad_checkpointing=[False, True] if args.grad_checkpointing else [False],
                                tuned_malloc=TUNED_MALLOC, lora=dict(r=16, alpha=32, top_k_layers="half")),
                  method=("each variant in a fresh process; peak = VmHWM - VmRSS baseline (after all imports, the "
                          "data and a micro-model forward/backward; VmHWM reset via /proc/self/clear_refs); nf4 "
                          "base saved pre-quantised once and loaded pre-quantised; steps/s over the timed steps "
                          "after warmup; gradient checkpointing (where on) non-reentrant, on the base before LoRA"),
                  target_peak_ratio=TARGET_PEAK_RATIO, summary=summary, rows=rows, wall_s=round(time.time() - t0, 1),
                  when=time.strftime("%Y-%m-%d %H:%M:%S"),
                  versions=library_versions(),
                  machine=dict(cpu_count=os.cpu_count(), platform=platform.platform(),
                               load_avg=os.getloadavg()))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
