"""Fine-tuning: sequences, the joint loss L = L_action + lambda * L_reasoning, the loop, checkpoints, resume.

Sequence layout (one row = one frame):

    [<image> x N][<bos> instruction state-bins <sep>] | [rationale tokens] ACTION: [7 action bins]
    token_type_ids: 0 ...............................  | 1 ......................................
    part:           PREFIX (no loss)                  | REASON ..................... | ACTION ...

token_type_ids = 1 on every target token is what makes PaliGemma's prefix-LM mask causal over the targets
(with zeros there, each target sees the ones after it and training collapses: shared/README.md).
L_action averages the cross-entropy over the 7 action-bin tokens, L_reasoning over the rationale tokens and
the ACTION: marker (when to stop reasoning). The baseline drops the rationale and uses lambda = 0.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .model import num_image_tokens
from .schema import require_columns
from .tokens import VLATokenizer

PREFIX, REASON, ACTION = 0, 1, 2
IGNORE = -100


@dataclass
class TrainConfig:
    """One training run (the pre-training of the tiny base, or one fine-tune variant)."""

    variant: str = "refinevla"        # pretrain | baseline | refinevla (a name; the folder under train/)
    use_rationale: bool = True        # put the teacher's rationale in the target sequence
    lambda_reason: float = 0.5        # weight of L_reasoning
    steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1         # cosine decays to lr * min_lr_ratio
    clip_grad: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    threads: int = 2                  # CPU threads for torch
    max_rationale_tokens: int = 96    # rationales are cut to this many tokens
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, slower (paper scale)

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("train.steps, train.batch_size and train.grad_accum must be >= 1")
        if self.lambda_reason < 0:
            raise ValueError(f"train.lambda_reason={self.lambda_reason} must be >= 0")


# ------------------------------------------------------------------------------------ sequences
def build_sequence(tok: VLATokenizer, instruction: str, state, action, n_image: int,
                   rationale: str | None = None, max_rationale_tokens: int = 96):
    """(input_ids, token_type_ids, part) for one frame; part marks which loss a *target* token feeds."""
    prompt = tok.prompt_ids(instruction, np.asarray(state), n_image)
    reason = tok.text_ids(rationale)[:max_rationale_tokens] if rationale else []
    target = reason + [tok.marker_id] + tok.action_to_ids(np.asarray(action))
    ids = prompt + target
    token_type = [0] * len(prompt) + [1] * len(target)
    marker_part = REASON if reason else PREFIX  # the baseline's marker is always forced: no loss on it
    part = [PREFIX] * len(prompt) + [REASON] * len(reason) + [marker_part] + [ACTION] * 7
    return ids, token_type, part


def encode_dataset(ds, tok: VLATokenizer, n_image: int, use_rationale: bool, max_rationale_tokens: int = 96,
                   desc: str = "encode"):
    """Tokenise every row into padded arrays held in memory (the tiny datasets fit easily)."""
    needed = ("instruction", "state", "action", "image") + (("rationale_text",) if use_rationale else ())
    require_columns(ds.column_names, needed, where="training dataset")
    seqs, images = [], []
    for row in tqdm(ds, desc=desc, leave=False):
        rationale = row["rationale_text"] if use_rationale else None
        seqs.append(build_sequence(tok, row["instruction"], row["state"], row["action"], n_image,
                                   rationale, max_rationale_tokens))
        images.append(np.asarray(row["image"].convert("RGB") if hasattr(row["image"], "convert") else row["image"],
                                 np.uint8))
    length = max(len(s[0]) for s in seqs)
    n = len(seqs)
    input_ids = np.full((n, length), tok.pad_id, np.int64)
    token_type = np.ones((n, length), np.int64)
    part = np.full((n, length), PREFIX, np.int64)
    attention = np.zeros((n, length), np.int64)
    for i, (ids, tt, pt) in enumerate(seqs):
        input_ids[i, :len(ids)], token_type[i, :len(ids)], part[i, :len(ids)], attention[i, :len(ids)] = ids, tt, pt, 1
    return dict(input_ids=input_ids, token_type_ids=token_type, part=part, attention_mask=attention,
                images=np.stack(images))


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


def batch_indices(step: int, n_rows: int, batch_size: int, seed: int) -> np.ndarray:
    """Rows of micro-batch ``step``: a fresh seeded permutation per epoch, so the data position is the step."""
    per_epoch = max(1, n_rows // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
    return perm[k * batch_size:(k + 1) * batch_size]


def to_batch(data: dict, idx: np.ndarray, image_size: int, device) -> dict:
    from .model import preprocess_images

    batch = {k: torch.as_tensor(data[k][idx], device=device) for k in ("input_ids", "token_type_ids", "part",
                                                                      "attention_mask")}
    length = int(batch["attention_mask"].sum(1).max())  # trim the common right padding
    batch = {k: v[:, :length] for k, v in batch.items()}
    batch["pixel_values"] = preprocess_images(data["images"][idx], image_size).to(device)
    return batch


# ----------------------------------------------------------------------------------- checkpoints
def _trainable_state(model) -> dict:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(ckpt_root: Path, step: int, model, optimizer) -> Path:
    """Write ckpt-<step>/ completely, then point ``latest`` at it atomically; older ones are removed."""
    from safetensors.torch import save_file

    final = ckpt_root / f"ckpt-{step:07d}"
    tmp = ckpt_root / f".tmp-ckpt-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")  # tensors + plain types: loads with weights_only
    save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    shutil.rmtree(final, ignore_errors=True)  # left by a run killed before `latest` moved to it
    os.replace(tmp, final)
    _atomic_write(ckpt_root / "latest", final.name)
    for old in ckpt_root.glob("ckpt-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt_root: Path, model, optimizer) -> int:
    """Restore trainable weights, optimizer and RNG from ``latest``; returns the step to continue from."""
    from safetensors.torch import load_file

    pointer = ckpt_root / "latest"
    if not pointer.exists():
        return 0
    ckpt = ckpt_root / pointer.read_text().strip()
    weights = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise ValueError(f"{ckpt}: checkpoint has parameters this model lacks, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    torch.set_rng_state(load_file(str(ckpt / "rng.safetensors"))["torch_rng"])
    return json.loads((ckpt / "state.json").read_text())["step"]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- the loop
def train_loop(model, data: dict, cfg: TrainConfig, out_dir: Path, stop_after: int | None = None) -> dict:
    """Train the model's trainable parameters on ``data`` (from encode_dataset), resuming from out_dir.

    Runs under Hugging Face Accelerate: one CPU process here, every GPU under ``accelerate launch`` (each
    process takes its own micro-batches; the main process logs and checkpoints). Writes metrics.jsonl
    (appended, flushed per log line) and atomic checkpoints under out_dir/ckpt. ``stop_after`` ends the run
    early at that step (to test resume). Returns the last metrics.
    """
    from accelerate import Accelerator

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    cuda = torch.cuda.is_available()
    acc = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    rank, world = acc.process_index, acc.num_processes
    size = model.config.vision_config.image_size
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt_root = out_dir / "ckpt"
    start = load_checkpoint(ckpt_root, model, optimizer)
    unwrapped = model
    model, optimizer = acc.prepare(model, optimizer)
    n_rows = len(data["input_ids"])
    model.train()
    last, t0, seen = {}, time.time(), 0
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train {cfg.variant}",
               disable=not acc.is_main_process)

    def stop(what: str, step: int, detail: str = ""):
        raise FloatingPointError(f"{what} at step {step}{detail}; stopped, the last good checkpoint in {ckpt_root} "
                                 "is kept. Lower train.lr or check the data statistics.")

    with open(out_dir / "metrics.jsonl", "a") as log:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            sums = np.zeros(3)
            for micro in range(cfg.grad_accum):
                idx = batch_indices((step * cfg.grad_accum + micro) * world + rank, n_rows, cfg.batch_size, cfg.seed)
                batch = to_batch(data, idx, size, acc.device)
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
            if acc.is_main_process and (done % cfg.log_every == 0 or done == cfg.steps):
                last = dict(step=done, loss=sums[0], l_action=sums[1], l_reason=sums[2],
                            lr=optimizer.param_groups[0]["lr"], samples_per_s=world * seen / (time.time() - t0))
                log.write(json.dumps(last) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{sums[0]:.3f}", act=f"{sums[1]:.3f}")
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                acc.wait_for_everyone()
                if acc.is_main_process:
                    save_checkpoint(ckpt_root, done, unwrapped, optimizer)
            if stop_after is not None and done >= stop_after:
                break
    acc.wait_for_everyone()
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


def config_dict(cfg) -> dict:
    return asdict(cfg)


# ------------------------------------------------------------------------------------------ stages
def _stats_from(ds):
    from .tokens import BinStats

    return BinStats.fit(np.asarray(ds["action"], np.float32)), BinStats.fit(np.asarray(ds["state"], np.float32))


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


def pretrain_base(ds, model_cfg, cfg: TrainConfig, out_dir: str | Path) -> Path:
    """Our stand-in for a pre-trained VLA: a tiny PaliGemma trained action-only from scratch on the demos.

    Trains the tokenizer (instructions + rationales + bin tokens) first, so the fine-tunes share its vocabulary.
    Returns out_dir/model (config.json, model.safetensors, tokenizer, vla_tokens.json, vla.json).
    """
    from .model import build_tiny_vla, enable_gradient_checkpointing, parameter_counts

    out_dir = Path(out_dir)
    action_stats, state_stats = _stats_from(ds)
    tok = VLATokenizer.train_tiny(_texts_for_tokenizer(ds), action_stats, state_stats)
    model = build_tiny_vla(model_cfg.size, tok.vocab_size, tok.image_id, tok.pad_id, seed=cfg.seed,
                           attn_implementation=model_cfg.attn_implementation)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    counts = parameter_counts(model)
    print(f"tiny VLA ({model_cfg.size}): {counts['total']:,} parameters, vocabulary {tok.vocab_size}")
    data = encode_dataset(ds, tok, num_image_tokens(model), use_rationale=False, desc="encode demos")
    last = train_loop(model, data, cfg, out_dir)
    if not is_main_process():
        return out_dir / "model"
    meta = dict(kind="base", size=model_cfg.size, parameters=counts, final_metrics=last)
    return _save_model_dir(model, tok, out_dir / "model", meta)


def load_tokenizer_for(base: str | Path, ds=None) -> VLATokenizer:
    """Our tokenizer saved beside a base, or (real checkpoint) its own tokenizer with bins fit on ``ds``."""
    if (Path(base) / "vla_tokens.json").exists():
        return VLATokenizer.load(base)
    if ds is None:
        raise ValueError(f"{base} is not a refinevla base; statistics from a dataset are needed to wrap it")
    return VLATokenizer.from_pretrained_checkpoint(str(base), *_stats_from(ds))


def finetune(ds, base: str | Path, model_cfg, cfg: TrainConfig, out_dir: str | Path) -> Path:
    """ReFineVLA's stage 2 (or its baseline): base in 4-bit, LoRA on the top K layers, the joint loss.

    ``base`` is our pre-trained tiny base folder or a real PaliGemma checkpoint (path or hub id).
    Returns out_dir/model: the LoRA adapter (safetensors), the tokenizer and vla.json naming the base.
    """
    from .model import add_lora, load_base, parameter_counts

    out_dir = Path(out_dir)
    tok = load_tokenizer_for(base, ds)
    model = load_base(base, model_cfg.quantization, model_cfg.attn_implementation)
    if tok.vocab_size > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(tok.vocab_size)
    data = encode_dataset(ds, tok, num_image_tokens(model), cfg.use_rationale, cfg.max_rationale_tokens,
                          desc=f"encode {cfg.variant}")
    # the policy head (tied to the embeddings) is trained on the rows of the target tokens: the paper updates
    # "the upper layers and the policy head"; frozen rows of words the base never wrote cap L_reasoning
    head_ids = np.unique(np.concatenate([data["input_ids"][data["part"] != PREFIX], tok.action_ids, [tok.marker_id]]))
    model = add_lora(model, model_cfg, trainable_token_ids=head_ids.tolist(),
                     gradient_checkpointing=cfg.gradient_checkpointing)
    counts = parameter_counts(model)
    print(f"{cfg.variant}: trainable {counts['trainable']:,} / {counts['total']:,} parameters "
          f"({counts['trainable_pct']:.2f}%), quantization={model_cfg.quantization}, "
          f"LoRA on the top {model_cfg.tune_top_k_layers} layers + {len(head_ids)} policy-head rows"
          + (", gradient checkpointing" if cfg.gradient_checkpointing else ""))
    last = train_loop(model, data, cfg, out_dir)
    if not is_main_process():
        return out_dir / "model"
    base_ref = os.path.relpath(Path(base).resolve(), (out_dir / "model").resolve()) if Path(base).exists() else str(base)
    meta = dict(kind="adapter", base=base_ref, quantization=model_cfg.quantization, variant=cfg.variant,
                use_rationale=cfg.use_rationale, lambda_reason=cfg.lambda_reason,
                tune_top_k_layers=model_cfg.tune_top_k_layers, parameters=counts, final_metrics=last)
    return _save_model_dir(model, tok, out_dir / "model", meta)
