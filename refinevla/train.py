"""Fine-tuning: sequences, the joint loss L = L_action + lambda * L_reasoning, the loop (its checkpoints and resume:
refinevla.checkpoints).

Sequence layout (one row = one frame): refinevla.sequences. ``rationale_position: after`` (ECoT-Lite's reasoning
after the action) puts the rationale after the action tokens, so the actions cannot attend to it and it only shapes
the representation; ``rationale_dropout: p`` (ECoT-Lite's reasoning dropout) trains each sample without its
rationale with probability p, so the policy can act without writing one.

token_type_ids = 1 on every target token is what makes PaliGemma's prefix-LM mask causal over the targets
(with zeros there, each target sees the ones after it and training collapses; tests/test_model.py checks it).
L_action averages the cross-entropy over the 7 action-bin tokens, L_reasoning over the rationale tokens and
the ACTION: marker (when to stop reasoning). The baseline drops the rationale and uses lambda = 0.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoints import CheckpointError, load_checkpoint, save_checkpoint, truncate_metrics  # noqa: F401
from .config import TrainConfig  # noqa: F401 - defined with the run config
from .model import image_size, num_image_tokens
from .schema import RATIONALE_PARTS, require_columns
from .sequences import ACTION, PREFIX, REASON, join, pad
from .tokens import VLATokenizer

IGNORE = -100


# ------------------------------------------------------------------------------------ sequences
def build_sequence(tok: VLATokenizer, instruction: str, state, action, n_image: int,
                   rationale: str | None = None, max_rationale_tokens: int = 96, position: str = "before"):
    """(input_ids, token_type_ids, part) for one frame; part marks which loss a *target* token feeds.
    ``action``: float[7] or the chunk float[k, 7] (k = the tokenizer's action_chunk)."""
    prompt = tok.prompt_ids(instruction, np.asarray(state), n_image)
    reason = tok.text_ids(rationale)[:max_rationale_tokens] if rationale else []
    return join(prompt, reason, tok.action_to_ids(np.asarray(action)), position, marker=tok.marker_id)


def action_chunks(ds, chunk: int) -> np.ndarray:
    """float32[rows, chunk, 7]: each frame's action and the next chunk - 1 of its episode (the last action repeated
    past the episode's end). Rows must be in episode, step order, as every stage writes them."""
    actions = np.asarray(ds["action"], np.float32)
    episodes = np.asarray(ds["episode_index"])
    out = np.empty((len(actions), chunk, actions.shape[1]), np.float32)
    for i in range(len(actions)):
        for j in range(chunk):
            k = i + j if i + j < len(actions) and episodes[i + j] == episodes[i] else None
            out[i, j] = actions[k] if k is not None else out[i, j - 1]
    return out


def rationale_texts(ds, parts=RATIONALE_PARTS) -> list[str]:
    """The rationale of every row as training text; only ``parts`` of the four when fewer are asked for."""
    if tuple(parts) == tuple(RATIONALE_PARTS):
        return list(ds["rationale_text"])
    from .teacher import render_rationale

    return [render_rationale(r, parts) for r in ds["rationale"]]


def encode_dataset(ds, tok: VLATokenizer, n_image: int, use_rationale: bool, max_rationale_tokens: int = 96,
                   desc: str = "encode", position: str = "before", parts=RATIONALE_PARTS, with_dropped: bool = False):
    """Tokenise every row into padded arrays held in memory (the tiny datasets fit easily).

    ``with_dropped``: append a second copy of every row without its rationale (rows n..2n-1), for reasoning
    dropout; ``n_rows`` in the result is the number of frames either way."""
    needed = ("episode_index", "instruction", "state", "action", "image") + (("rationale_text",) if use_rationale else ())
    require_columns(ds.column_names, needed, where="training dataset")
    chunks = action_chunks(ds, tok.action_chunk)
    texts = rationale_texts(ds, parts) if use_rationale else [None] * len(ds)
    seqs, images = [], []
    for i, row in enumerate(tqdm(ds.select_columns(["instruction", "state", "image"]), desc=desc, leave=False)):
        seqs.append(build_sequence(tok, row["instruction"], row["state"], chunks[i], n_image,
                                   texts[i], max_rationale_tokens, position))
        images.append(np.asarray(row["image"].convert("RGB") if hasattr(row["image"], "convert") else row["image"],
                                 np.uint8))
    n_rows = len(seqs)
    if with_dropped:
        for i, row in enumerate(ds.select_columns(["instruction", "state"])):
            seqs.append(build_sequence(tok, row["instruction"], row["state"], chunks[i], n_image, None))
        images = images + images
    return pad(seqs, images, tok.pad_id, n_rows=n_rows)


def resolve_threads(threads: int = 0) -> int:
    """Torch intra-op threads: ``threads`` when given, else one per core but one (at least 1).

    Every intra-op thread must finish its share before an operation returns, so a thread whose core is taken by
    another busy process (a browser, a simulator, a test run) stalls all of them. Measured on 2 cores
    (benchmarks/results/threads.json, pre-training step of the default model): 2 threads take 0.12 s idle and
    0.31 s beside one busy process (2.5x); 1 thread takes 0.21 s either way. Leaving one core free costs 1.7x on an
    idle 2-core machine and keeps a step's time whatever else runs; set ``threads`` to the core count for speed on a
    machine you know is idle."""
    import os

    return threads if threads > 0 else max(1, (os.cpu_count() or 1) - 1)


# ---------------------------------------------------------------------------------------- losses
def joint_loss(logits: torch.Tensor, input_ids: torch.Tensor, part: torch.Tensor, lambda_reason: float):
    """(total, L_action, L_reasoning): next-token cross-entropy, averaged separately per part."""
    logits, targets, target_part = logits[:, :-1].float(), input_ids[:, 1:], part[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    ce = ce.view_as(targets)
    act, rsn = target_part == ACTION, target_part == REASON
    l_action = (ce * act).sum() / act.sum().clamp(min=1)
    l_reason = (ce * rsn).sum() / rsn.sum().clamp(min=1)
    total = l_action + lambda_reason * l_reason if lambda_reason > 0 else l_action
    return total, l_action, l_reason


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def batch_indices(step: int, n_rows: int, batch_size: int, seed: int, dropout: float = 0.0) -> np.ndarray:
    """Rows of micro-batch ``step``: a fresh seeded permutation per epoch, so the data position is the step.
    ``dropout``: each row is replaced, with this probability, by its copy without rationale (row + n_rows; see
    encode_dataset's with_dropped), drawn from the same seed and step: every variant sees the same frames."""
    per_epoch = max(1, n_rows // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
    idx = perm[k * batch_size:(k + 1) * batch_size]
    if dropout > 0:
        idx = np.where(np.random.default_rng([seed, epoch, k, 1]).random(len(idx)) < dropout, idx + n_rows, idx)
    return idx


@torch.no_grad()
def heldout_loss(model, data: dict, batch_size: int, device, max_batches: int = 0, size: int | None = None) -> dict:
    """Teacher-forced losses on held-out frames, averaged over every token of the held-out set (not one batch):
    {"heldout_l_action", "heldout_l_reason"} (the latter only when the sequences hold rationales)."""
    size = size or image_size(model)
    sums, counts = np.zeros(2), np.zeros(2)
    was_training = model.training
    model.eval()
    n = data["n_rows"]
    starts = range(0, n, batch_size)
    for b, start in enumerate(starts):
        if max_batches and b >= max_batches:
            break
        batch = to_batch(data, np.arange(start, min(n, start + batch_size)), size, device)
        part = batch.pop("part")
        logits = model(**batch, use_cache=False).logits[:, :-1].float()
        targets, target_part = batch["input_ids"][:, 1:], part[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        ce = ce.view_as(targets)
        for j, kind in enumerate((ACTION, REASON)):
            mask = target_part == kind
            sums[j] += float((ce * mask).sum())
            counts[j] += float(mask.sum())
    model.train(was_training)
    out = {"heldout_l_action": sums[0] / max(counts[0], 1)}
    if counts[1]:
        out["heldout_l_reason"] = sums[1] / counts[1]
    return out


def to_batch(data: dict, idx: np.ndarray, image_size: int, device, shift: int = 0, seed=()) -> dict:
    """Rows ``idx`` as model inputs; ``shift`` > 0: each image moved by a random offset of up to ``shift`` pixels
    per axis (edges replicated), drawn from ``seed`` (the same step gives the same shifts)."""
    from .model import preprocess_images

    batch = {k: torch.as_tensor(data[k][idx], device=device) for k in ("input_ids", "token_type_ids", "part",
                                                                      "attention_mask")}
    length = int(batch["attention_mask"].sum(1).max())  # trim the common right padding
    batch = {k: v[:, :length] for k, v in batch.items()}
    pixels = preprocess_images(data["images"][idx], image_size)
    if shift:
        pixels = random_shift(pixels, shift, np.random.default_rng(list(seed)))
    batch["pixel_values"] = pixels.to(device)
    return batch


def random_shift(pixels: torch.Tensor, shift: int, rng: np.random.Generator) -> torch.Tensor:
    """[B, C, H, W] images, each translated by integers in [-shift, shift] per axis, edges replicated."""
    h, w = pixels.shape[-2:]
    padded = F.pad(pixels, (shift, shift, shift, shift), mode="replicate")
    dy, dx = rng.integers(0, 2 * shift + 1, size=(2, len(pixels)))
    return torch.stack([padded[i, :, y:y + h, x:x + w] for i, (y, x) in enumerate(zip(dy, dx))])


# ---------------------------------------------------------------------------------------- the loop
def train_loop(model, data: dict, cfg: TrainConfig, out_dir: Path, stop_after: int | None = None,
               heldout: dict | None = None, cache_frozen: bool = False) -> dict:
    """Train the model's trainable parameters on ``data`` (from encode_dataset), resuming from out_dir.
    ``heldout`` (encoded the same way): its averaged loss is logged every ``eval_every`` steps and at the end.
    ``cache_frozen`` (fine-tunes): the hidden states entering the first trainable layer are computed once per row
    (refinevla.frozen.build_cache) and each step runs only the trainable top of the model on them.

    Runs under Hugging Face Accelerate: one CPU process here, every GPU under ``accelerate launch`` (each
    process takes its own micro-batches; the main process logs and checkpoints). Writes metrics.jsonl
    (appended, flushed per log line) and atomic checkpoints under out_dir/ckpt. ``stop_after`` ends the run
    early at that step (to test resume). Returns the last metrics.
    """
    from accelerate import Accelerator

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(resolve_threads(cfg.threads))
    torch.manual_seed(cfg.seed)
    cuda = torch.cuda.is_available()
    acc = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    rank, world = acc.process_index, acc.num_processes
    size = image_size(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt_root = out_dir / "ckpt"
    start = load_checkpoint(ckpt_root, model, optimizer)
    metrics_path = out_dir / "metrics.jsonl"
    if acc.is_main_process:
        truncate_metrics(metrics_path, start)  # steps logged after the checkpoint we resume from run again
    unwrapped = model
    model, optimizer = acc.prepare(model, optimizer)
    n_rows = data.get("n_rows", len(data["input_ids"]))
    dropout = cfg.rationale_dropout if len(data["input_ids"]) == 2 * n_rows else 0.0
    eval_every = cfg.eval_every or max(1, cfg.steps // 4)
    model.train()
    cache = None
    if cache_frozen:
        from . import frozen

        with acc.autocast():  # the precision of the training forward (bf16 on a GPU)
            cache = frozen.build_cache(unwrapped, data, batch_size=cfg.batch_size)
    last, t0, seen = {}, time.time(), 0
    interval, interval_steps = np.zeros(3), 0
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train {cfg.arm}",
               disable=not acc.is_main_process)

    def stop(what: str, step: int, detail: str = ""):
        raise FloatingPointError(f"{what} at step {step}{detail}; stopped, the last good checkpoint in {ckpt_root} "
                                 "is kept. Lower train.lr or check the data statistics.")

    with open(metrics_path, "a") as log:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            sums = np.zeros(3)
            for micro in range(cfg.grad_accum):
                idx = batch_indices((step * cfg.grad_accum + micro) * world + rank, n_rows, cfg.batch_size, cfg.seed,
                                    dropout)
                if cache is not None:
                    batch = frozen.cached_batch(data, cache, idx, acc.device)
                    part, hidden = batch.pop("part"), batch.pop("hidden_states")
                    logits = frozen.upper_logits(model, hidden, batch)
                else:
                    batch = to_batch(data, idx, size, acc.device, cfg.augment_shift,
                                     (cfg.seed, step * cfg.grad_accum + micro, rank, 2))
                    part = batch.pop("part")
                    logits = model(**batch, use_cache=False).logits  # no KV cache in training
                losses = joint_loss(logits, batch["input_ids"], part, cfg.lambda_reason)
                if not all(torch.isfinite(x) for x in losses):
                    stop("non-finite loss", step, f" (total={losses[0].item()}, L_action={losses[1].item()}, "
                         f"L_reasoning={losses[2].item()})")
                acc.backward(losses[0] / cfg.grad_accum)
                sums += [x.item() / cfg.grad_accum for x in losses]
                seen += len(idx)
            grad_norm = acc.clip_grad_norm_(params, cfg.clip_grad)
            if grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm)):
                stop("non-finite gradient norm", step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not torch.stack([torch.isfinite(p).all() for p in params]).all():
                stop("non-finite weights after the optimizer step", step)
            done = step + 1
            interval, interval_steps = interval + sums, interval_steps + 1
            evaluate_now = heldout is not None and (done % eval_every == 0 or done == cfg.steps)
            if acc.is_main_process and (done % cfg.log_every == 0 or done == cfg.steps or evaluate_now):
                mean = interval / interval_steps  # averaged over the steps since the last line, not one batch
                last = dict(step=done, loss=mean[0], l_action=mean[1], l_reason=mean[2],
                            lr=optimizer.param_groups[0]["lr"], samples_per_s=world * seen / (time.time() - t0))
                if evaluate_now:
                    last.update(heldout_loss(model, heldout, cfg.batch_size, acc.device, cfg.eval_batches, size))
                log.write(json.dumps(last) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{mean[0]:.3f}", act=f"{mean[1]:.3f}")
                interval, interval_steps = np.zeros(3), 0
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                acc.wait_for_everyone()
                if acc.is_main_process:
                    save_checkpoint(ckpt_root, done, unwrapped, optimizer)
            if stop_after is not None and done >= stop_after:
                break
    acc.wait_for_everyone()
    if not last and metrics_path.exists():  # resumed at its last step (a damaged model saved again): the logged end
        lines = [line for line in metrics_path.read_text().splitlines() if line.strip()]
        last = json.loads(lines[-1]) if lines else {}
    return last


def is_main_process() -> bool:
    """True in a single process, and in the first of several under ``accelerate launch``."""
    from accelerate import PartialState

    return PartialState().is_main_process


def read_metrics(out_dir: str | Path):
    """metrics.jsonl as a DataFrame (the book plots training curves from it)."""
    import pandas as pd

    path = Path(out_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ stages
def _stats_from(ds):
    from .tokens import ACTION_BINS, BinStats

    actions = BinStats.fit(np.asarray(ds["action"], np.float32), n_bins=ACTION_BINS, symmetric=range(6))
    return actions, BinStats.fit(np.asarray(ds["state"], np.float32))


def _texts_for_tokenizer(ds) -> list[str]:
    texts = list(dict.fromkeys(ds["instruction"]))
    if "rationale_text" in ds.column_names:
        texts += list(dict.fromkeys(ds["rationale_text"]))
    return texts


def _save_model_dir(model, tok: VLATokenizer, out: Path, meta: dict) -> Path:
    """save_pretrained (safetensors) + tokenizer + meta into a temporary folder, then rename: never half-written."""
    tmp = out.with_name("." + out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save(tmp)
    (tmp / "vla.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def split_heldout(ds, every: int):
    """(training rows, held-out rows): every ``every``-th episode (episode_index % every == every - 1) is held out
    of training and only scored (the held-out loss); every = 0 holds nothing out."""
    if not every:
        return ds, None
    episodes = np.asarray(ds["episode_index"])
    held = episodes % every == every - 1
    if held.all() or not held.any():
        return ds, None
    return ds.select(np.flatnonzero(~held)), ds.select(np.flatnonzero(held))


def tiny_tokenizer(ds, texts=(), action_chunk: int = 1) -> VLATokenizer:
    """The word-level tokenizer of a tiny base: the words of ``ds``'s instructions (and rationales) plus ``texts``,
    the action and state bins fit on ``ds``."""
    return VLATokenizer.train_tiny(list(dict.fromkeys(_texts_for_tokenizer(ds) + list(texts))), *_stats_from(ds),
                                   action_chunk=action_chunk)


def pretrain_base(ds, model_cfg, cfg: TrainConfig, out_dir: str | Path, texts=(), heldout=None) -> Path:
    """Our stand-in for a pre-trained VLA: a tiny PaliGemma trained action-only from scratch on the demos.

    Its tokenizer is :func:`tiny_tokenizer` of ``ds`` and ``texts`` (the fine-tuning set's instructions and
    rationales, so the fine-tunes share its vocabulary). ``heldout``: frames whose action loss is logged.
    Returns out_dir/model (config.json, model.safetensors, tokenizer, vla_tokens.json, vla.json).
    """
    from .model import build_tiny_vla, enable_gradient_checkpointing, parameter_counts

    out_dir = Path(out_dir)
    tok = tiny_tokenizer(ds, texts, model_cfg.action_chunk)
    model = build_tiny_vla(model_cfg.size, tok.vocab_size, tok.image_id, tok.pad_id, seed=cfg.seed,
                           attn_implementation=model_cfg.attn_implementation)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    counts = parameter_counts(model)
    print(f"tiny VLA ({model_cfg.size}): {counts['total']:,} parameters, vocabulary {tok.vocab_size}")
    data = encode_dataset(ds, tok, num_image_tokens(model), use_rationale=False, desc="encode demos")
    held = None if heldout is None else encode_dataset(heldout, tok, num_image_tokens(model), use_rationale=False,
                                                       desc="encode held-out")
    last = train_loop(model, data, cfg, out_dir, heldout=held)
    if not is_main_process():
        return out_dir / "model"
    meta = dict(kind="base", size=model_cfg.size, parameters=counts, final_metrics=last,
                action_chunk=tok.action_chunk)
    return _save_model_dir(model, tok, out_dir / "model", meta)


def load_tokenizer_for(base: str | Path, ds=None, action_chunk: int = 1) -> VLATokenizer:
    """Our tokenizer saved beside a base, or (real checkpoint) its own tokenizer with bins fit on ``ds``."""
    if (Path(base) / "vla_tokens.json").exists():
        return VLATokenizer.load(base)
    if ds is None:
        raise ValueError(f"{base} is not a refinevla base; statistics from a dataset are needed to wrap it")
    return VLATokenizer.from_pretrained_checkpoint(str(base), *_stats_from(ds), action_chunk=action_chunk)


def finetune(ds, base: str | Path, model_cfg, cfg: TrainConfig, out_dir: str | Path, heldout_every: int = 10) -> Path:
    """ReFineVLA's stage 2 (or its baseline): base in 4-bit, LoRA on the top K layers, the joint loss.

    ``base`` is our pre-trained tiny base folder or a real PaliGemma checkpoint (path or hub id). Every
    ``heldout_every``-th episode is held out of training and scored (split_heldout). ``cfg.seed`` is set before
    anything random happens (adapter initialisation, data order, dropout draws), so two variants with the same
    seed start from the same adapters and see the same frames in the same order, whatever ran before them.
    Returns out_dir/model: the LoRA adapter (safetensors), the tokenizer and vla.json naming the base.
    """
    from .model import add_lora, load_base, parameter_counts, resize_embeddings

    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    ds, heldout = split_heldout(ds, heldout_every)
    if getattr(model_cfg, "base", "paligemma") != "paligemma":
        return _finetune_remote(ds, heldout, base, model_cfg, cfg, out_dir)
    tok = load_tokenizer_for(base, ds, model_cfg.action_chunk)
    model = load_base(base, model_cfg.quantization, model_cfg.attn_implementation)
    resize_embeddings(model, tok.vocab_size)
    encode = dict(use_rationale=cfg.use_rationale, max_rationale_tokens=cfg.max_rationale_tokens,
                  position=cfg.rationale_position, parts=cfg.rationale_parts)
    data = encode_dataset(ds, tok, num_image_tokens(model), desc=f"encode {cfg.arm}",
                          with_dropped=cfg.use_rationale and cfg.rationale_dropout > 0, **encode)
    held = None if heldout is None else encode_dataset(heldout, tok, num_image_tokens(model), desc="encode held-out",
                                                       **encode)
    # the policy head (untied from the frozen input embeddings) is trained on the rows of the target tokens: the paper updates
    # "the upper layers and the policy head"; frozen rows of words the base never wrote cap L_reasoning
    head_ids = np.unique(np.concatenate([data["input_ids"][data["part"] != PREFIX], tok.action_ids, [tok.marker_id]]))
    torch.manual_seed(cfg.seed)  # the adapters' initial values depend on this seed only
    model = add_lora(model, model_cfg, trainable_token_ids=head_ids.tolist(),
                     gradient_checkpointing=cfg.gradient_checkpointing)
    counts = parameter_counts(model)
    print(f"{cfg.arm}: trainable {counts['trainable']:,} / {counts['total']:,} parameters "
          f"({counts['trainable_pct']:.2f}%), quantization={model_cfg.quantization}, "
          f"LoRA on the top {model_cfg.tune_top_k_layers} layers + {len(head_ids)} policy-head rows"
          + (", gradient checkpointing" if cfg.gradient_checkpointing else ""))
    last = train_loop(model, data, cfg, out_dir, heldout=held, cache_frozen=cfg.cache_frozen)
    if not is_main_process():
        return out_dir / "model"
    meta = _adapter_meta(base, out_dir, model_cfg, cfg, tok.action_chunk, counts, last)
    return _save_model_dir(model, tok, out_dir / "model", meta)


def _adapter_meta(base, out_dir: Path, model_cfg, cfg: TrainConfig, action_chunk: int, counts: dict,
                  last: dict) -> dict:
    """vla.json of a fine-tune: the base (relative to the model folder when local), how it was trained."""
    local = Path(base).exists()
    base_ref = os.path.relpath(Path(base).resolve(), (out_dir / "model").resolve()) if local else str(base)
    return dict(kind="adapter", base=base_ref, base_kind=getattr(model_cfg, "base", "paligemma"),
                quantization=model_cfg.quantization, arm=cfg.arm,
                use_rationale=cfg.use_rationale, lambda_reason=cfg.lambda_reason, seed=cfg.seed,
                rationale_position=cfg.rationale_position, rationale_dropout=cfg.rationale_dropout,
                reasons_at_inference=cfg.reasons_at_inference, action_chunk=action_chunk,
                tune_top_k_layers=model_cfg.tune_top_k_layers, parameters=counts, final_metrics=last)


def _finetune_remote(ds, heldout, base, model_cfg, cfg: TrainConfig, out_dir: Path) -> Path:
    """``finetune`` for a pre-trained VLA run by its own remote code (``model.base``: spatialvla | openvla, see
    refinevla.bases): the base's prompt and action tokens with the rationale before them, the same joint loss, loop,
    checkpoints and outputs. The frozen-part cache (refinevla.frozen) is PaliGemma-only and not used here."""
    from .bases import RemoteVLA, load_for_finetune
    from .model import add_lora, parameter_counts

    model, layout = load_for_finetune(base, model_cfg, np.asarray(ds["action"], np.float32))
    needed = ("episode_index", "instruction", "action", "image") + (("rationale_text",) if cfg.use_rationale else ())

    def encode(d, dropped=False):
        require_columns(d.column_names, needed, where="training dataset")
        texts = rationale_texts(d, cfg.rationale_parts) if cfg.use_rationale else None
        return layout.encode_dataset(d, cfg.use_rationale, cfg.max_rationale_tokens, cfg.rationale_position,
                                     with_dropped=dropped, chunks=action_chunks(d, layout.action_chunk), texts=texts)

    data = encode(ds, cfg.use_rationale and cfg.rationale_dropout > 0)
    held = None if heldout is None else encode(heldout)
    # the action head (every action token's row) and the rows of the rationale's words train, as in finetune
    head_ids = np.unique(np.concatenate([data["input_ids"][data["part"] != PREFIX], layout.action_ids]))
    torch.manual_seed(cfg.seed)  # the adapters' initial values depend on this seed only
    model = RemoteVLA(add_lora(model, model_cfg, trainable_token_ids=head_ids.tolist(),
                               gradient_checkpointing=cfg.gradient_checkpointing), layout)
    counts = parameter_counts(model)
    print(f"{cfg.arm} ({model_cfg.base}): trainable {counts['trainable']:,} / {counts['total']:,} parameters, "
          f"LoRA on the top {model_cfg.tune_top_k_layers} layers + {len(head_ids)} head rows, "
          f"statistics {layout.unnorm_key!r}")
    last = train_loop(model, data, cfg, out_dir, heldout=held, cache_frozen=False)
    if not is_main_process():
        return out_dir / "model"
    meta = _adapter_meta(base, out_dir, model_cfg, cfg, layout.action_chunk, counts, last)
    return _save_model_dir(model, layout, out_dir / "model", meta)
