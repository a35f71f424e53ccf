"""Fine-tuning step time with and without the frozen-part cache (refinevla.frozen), on a CPU.

    .venv/bin/python benchmarks/finetune_cache.py                 # ~1-2 min; writes results/finetune_cache.json
    .venv/bin/python benchmarks/finetune_cache.py --threads 2 --top-k 1 --out /tmp/k1.json   # other settings

The ``tiny`` size preset (random weights: time does not depend on the values) loaded in 4-bit (nf4), LoRA on
the top K = 2 of its 4 decoder layers plus the policy-head rows of the target tokens (``model.add_lora``, head
untied from the input embeddings), batches of 32 synthetic rows in the training layout
(``train.encode_dataset``: 64 image tokens + prompt + rationale + ACTION: + 7 bins, 100-140 tokens).

Each timed step is what ``train.train_loop`` does per step: assemble the batch, forward, joint loss, backward,
clip, AdamW. Variants, on the same rows:
- ``uncached``: ``train.to_batch`` (images preprocessed) and ``model(**batch).logits``: the vision tower and
  all decoder layers run forward at every step;
- ``cached``: ``frozen.cached_batch`` and ``frozen.upper_logits``: only the top K layers, the norm and the head;
- ``tied_uncached`` (context: fine-tuning before the head was untied): the same LoRA with the head rows trained
  as peft trainable tokens on the input embeddings tied to the head, uncached; its backward pass runs through
  every decoder layer down to the embeddings.
Steps of the variants are interleaved (one of each in turn) after ``--warmup`` untimed rounds, so that load
from other processes on the machine affects them alike; the figures are medians. The cache is built once
(``frozen.build_cache``), timed per row. Target: cached / uncached step time <= 1/3.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from results_file import library_versions, write_result  # benchmarks/results_file.py

HERE = Path(__file__).resolve().parent
SIZE = "tiny"
TARGET_RATIO = 1 / 3
INSTRUCTIONS = ["pick up the red cube", "put the carrot on the plate", "stack the green block on the yellow block"]
WORDS = ("observation : the gripper is above the table and the cube is to the left . situation : the gripper is "
         "open and nothing is held . spatial : the cube is four centimetres left and nine below . plan : move "
         "left , descend , close the gripper , lift").split()


def synthetic_data(tok, n_rows: int, n_image: int, image_size: int, seed: int = 0) -> dict:
    """``n_rows`` rows as ``train.encode_dataset`` returns them, 100-140 tokens each (rationale length varies)."""
    from refinevla.train import PREFIX, build_sequence

    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n_rows):
        instruction = INSTRUCTIONS[rng.integers(len(INSTRUCTIONS))]
        state, action = rng.uniform(-1, 1, 8), rng.uniform(-1, 1, 7)
        prompt = len(tok.prompt_ids(instruction, state, n_image))
        n_words = int(rng.integers(max(1, 100 - prompt - 8), 140 - prompt - 8 + 1))
        first = int(rng.integers(len(WORDS)))
        rationale = " ".join(WORDS[(first + j) % len(WORDS)] for j in range(n_words))
        seqs.append(build_sequence(tok, instruction, state, action, n_image, rationale, max_rationale_tokens=200))
    length = max(len(s[0]) for s in seqs)
    data = dict(input_ids=np.full((n_rows, length), tok.pad_id, np.int64),
                token_type_ids=np.ones((n_rows, length), np.int64),
                part=np.full((n_rows, length), PREFIX, np.int64), attention_mask=np.zeros((n_rows, length), np.int64),
                images=rng.integers(0, 256, (n_rows, image_size, image_size, 3), dtype=np.uint8))
    for i, (ids, tt, part) in enumerate(seqs):
        k = len(ids)
        data["input_ids"][i, :k], data["token_type_ids"][i, :k], data["part"][i, :k] = ids, tt, part
        data["attention_mask"][i, :k] = 1
    return data


def tied_lora(model, cfg, head_ids):
    """``add_lora`` as it was before the head was untied: trainable tokens on the tied input embeddings."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from refinevla.model import top_layers

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=list(cfg.lora_targets),
        layers_to_transform=top_layers(model, cfg.tune_top_k_layers), layers_pattern="layers",
        exclude_modules=r".*(vision_tower|multi_modal_projector).*", bias="none",
        trainable_token_indices={"embed_tokens": sorted(int(t) for t in head_ids)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds before them")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rows", type=int, default=256, help="rows of the synthetic dataset (all are cached)")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: steadier figures on a shared machine; training uses 2)")
    ap.add_argument("--no-tied", action="store_true", help="skip the tied_uncached context variant")
    ap.add_argument("--out", default=str(HERE / "results" / "finetune_cache.json"))
    args = ap.parse_args()

    import warnings

    import torch

    from refinevla import frozen
    from refinevla.model import (SIZES, ModelConfig, add_lora, build_tiny_vla, load_base, num_image_tokens,
                                 parameter_counts)
    from refinevla.tokens import BinStats, VLATokenizer
    from refinevla.train import PREFIX, batch_indices, joint_loss, to_batch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    t_start = time.time()
    rng = np.random.default_rng(0)
    tok = VLATokenizer.train_tiny(INSTRUCTIONS + [" ".join(WORDS)], BinStats.fit(rng.uniform(-1, 1, (100, 7))),
                                  BinStats.fit(rng.uniform(-1, 1, (100, 8))))
    s = SIZES[SIZE]
    image_size = s["image_size"]
    cfg = ModelConfig(size=SIZE, quantization="4bit", tune_top_k_layers=args.top_k)
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        build_tiny_vla(SIZE, tok.vocab_size, tok.image_id, tok.pad_id, seed=0).save_pretrained(
            tmp, safe_serialization=True)
        data = synthetic_data(tok, args.rows, (image_size // s["patch_size"]) ** 2, image_size)
        head_ids = np.unique(np.concatenate([data["input_ids"][data["part"] != PREFIX], tok.action_ids,
                                             [tok.marker_id]]))
        torch.manual_seed(0)
        model = add_lora(load_base(tmp, "4bit"), cfg, trainable_token_ids=head_ids.tolist())
        tied = None if args.no_tied else tied_lora(load_base(tmp, "4bit"), cfg, head_ids)
    assert num_image_tokens(model) == (image_size // s["patch_size"]) ** 2
    lengths = data["attention_mask"].sum(1)
    counts = parameter_counts(model)
    print(f"{SIZE} nf4, LoRA on the top {args.top_k} of {s['text_layers']} layers + {len(head_ids)} head rows: "
          f"{counts['trainable']:,} trainable / {counts['total']:,}; {args.rows} rows of {lengths.min()}-"
          f"{lengths.max()} tokens; batch {args.batch}; {args.threads} threads", flush=True)

    model.train()
    t0 = time.perf_counter()
    cache = frozen.build_cache(model, data, batch_size=args.batch)
    build_s = time.perf_counter() - t0
    print(f"cache: {cache.shape} {cache.dtype}, {cache.nbytes / 1e6:.1f} MB, built in {build_s:.2f} s "
          f"({1e3 * build_s / args.rows:.2f} ms/row)", flush=True)

    variants = {"uncached": model, "cached": model}
    if tied is not None:
        variants["tied_uncached"] = tied.train()
    optimizers = {m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for m in {id(m): m for m in variants.values()}.values()}

    def step(name: str, idx) -> tuple[float, float]:
        m = variants[name]
        params = [p for p in m.parameters() if p.requires_grad]
        t = time.perf_counter()
        if name == "cached":
            batch = frozen.cached_batch(data, cache, idx, "cpu")
            logits = frozen.upper_logits(m, batch.pop("hidden_states"), batch)
        else:
            batch = to_batch(data, idx, image_size, "cpu")
            logits = m(**{k: v for k, v in batch.items() if k != "part"}, use_cache=False).logits
        loss = joint_loss(logits, batch["input_ids"], batch["part"], 0.5)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizers[m].step()
        optimizers[m].zero_grad(set_to_none=True)
        return time.perf_counter() - t, loss.item()

    times = {name: [] for name in variants}
    losses = {name: [] for name in variants}
    for i in range(args.warmup + args.steps):
        idx = batch_indices(i, args.rows, args.batch, seed=0)
        took = {}
        for name in variants:  # interleaved: one step of each variant on the same rows
            took[name], loss = step(name, idx)
            losses[name].append(round(loss, 5))
            if i >= args.warmup:
                times[name].append(round(took[name], 4))
        print(f"  {'warm-up' if i < args.warmup else 'timed'} round {i + 1}/{args.warmup + args.steps}: "
              + ", ".join(f"{n} {t:.3f} s" for n, t in took.items()), flush=True)

    med = {n: statistics.median(t) for n, t in times.items()}
    ratio = med["cached"] / med["uncached"]
    summary = dict(uncached_step_s=round(med["uncached"], 4), cached_step_s=round(med["cached"], 4),
                   ratio_cached_over_uncached=round(ratio, 3), target_ratio=round(TARGET_RATIO, 3),
                   meets_target=bool(ratio <= TARGET_RATIO), speedup=round(1 / ratio, 2),
                   cache_build_s=round(build_s, 3), cache_build_ms_per_row=round(1e3 * build_s / args.rows, 3),
                   cache_mb=round(cache.nbytes / 1e6, 1),
                   break_even_steps=round(build_s / max(med["uncached"] - med["cached"], 1e-9), 2))
    if "tied_uncached" in med:
        summary.update(tied_uncached_step_s=round(med["tied_uncached"], 4),
                       ratio_cached_over_tied_uncached=round(med["cached"] / med["tied_uncached"], 3))
    print("\n" + "\n".join(f"{k:34s} {v}" for k, v in summary.items()))

    result = dict(benchmark="finetune_cache", size=SIZE, quantization="nf4",
                  settings=dict(top_k_layers=args.top_k, decoder_layers=s["text_layers"], batch=args.batch,
                                rows=args.rows, tokens_per_row=[int(lengths.min()), int(lengths.max())],
                                head_rows=int(len(head_ids)), steps=args.steps, warmup=args.warmup,
                                threads=args.threads, lora=dict(r=cfg.lora_r, alpha=cfg.lora_alpha)),
                  parameters=counts,
                  method=("one process; the variants' steps interleaved on the same rows after warm-up rounds; "
                          "a step = batch assembly + forward + joint loss + backward + clip + AdamW, as in "
                          "train.train_loop; medians over the timed steps; the cache built once for all rows"),
                  summary=summary, step_s=times, losses=losses, wall_s=round(time.time() - t_start, 1),
                  date=time.strftime("%Y-%m-%d %H:%M:%S"),
                  versions=library_versions(),
                  machine=dict(cores=os.cpu_count(), platform=platform.platform(), load_avg=os.getloadavg()))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
