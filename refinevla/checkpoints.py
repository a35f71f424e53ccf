"""Training checkpoints: written whole then pointed at, the previous one kept, a corrupt one named and skipped.

``save_checkpoint`` writes ``ckpt-<step>/`` (trainable weights, optimizer, RNG, step) into a temporary folder,
renames it into place and then moves the ``latest`` pointer atomically, so a kill at any point leaves a complete
checkpoint behind; the previous checkpoint is kept beside the new one. ``load_checkpoint`` reads every file of
``latest`` before applying anything; if one is truncated or corrupt it warns, naming the file, and resumes from the
previous checkpoint; with none readable, a ``CheckpointError`` names the file and the fix. ``truncate_metrics``
drops the metric lines logged after the checkpoint a run resumes from, so no step appears twice in metrics.jsonl.
Used by refinevla.train.train_loop (the main process saves; every process loads).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch


def _trainable_state(model) -> dict:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(ckpt_root: Path, step: int, model, optimizer) -> Path:
    """Write ckpt-<step>/ completely, then point ``latest`` at it atomically; the previous checkpoint is kept (the
    fallback when this one turns out unreadable), older ones are removed."""
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
    older = [c for c in _checkpoints(ckpt_root) if _step_of(c) < step]
    for old in older[1:] + [c for c in _checkpoints(ckpt_root) if _step_of(c) > step]:
        shutil.rmtree(old, ignore_errors=True)
    return final


class CheckpointError(ValueError):
    """No readable checkpoint to resume from; the message names the file and the fix, in one line."""


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def _checkpoints(ckpt_root: Path) -> list[Path]:
    """The complete checkpoint folders (renamed into place only once written whole), newest first."""
    found = [p for p in Path(ckpt_root).glob("ckpt-*") if p.is_dir() and p.name.split("-")[1].isdigit()]
    return sorted(found, key=_step_of, reverse=True)


def _read_checkpoint(ckpt: Path) -> tuple[dict, dict, torch.Tensor, int]:
    """Every file of a checkpoint, read before anything is applied; an error names the file that failed."""
    from safetensors.torch import load_file

    current = ckpt / "trainable.safetensors"
    try:
        weights = load_file(str(current))
        current = ckpt / "optimizer.pt"
        optim = torch.load(current, weights_only=True)
        current = ckpt / "rng.safetensors"
        rng = load_file(str(current))["torch_rng"]
        current = ckpt / "state.json"
        step = int(json.loads(current.read_text())["step"])
    except Exception as error:  # noqa: BLE001 - safetensors, pickle, zip, JSON and OS errors all mean "unreadable"
        raise CheckpointError(f"{current}: unreadable checkpoint ({type(error).__name__}: "
                              f"{' '.join(str(error).split())[:120]})") from error
    return weights, optim, rng, step


def load_checkpoint(ckpt_root: Path, model, optimizer) -> int:
    """Restore trainable weights, optimizer and RNG from ``latest``; returns the step to continue from.

    If ``latest`` is unreadable (a truncated or corrupt file), the previous checkpoint is used instead, with a
    warning naming the bad file; if none is readable, a CheckpointError names the file and the fix."""
    ckpt_root = Path(ckpt_root)
    pointer = ckpt_root / "latest"
    if not pointer.exists():
        return 0
    name = pointer.read_text().strip()
    everything = _checkpoints(ckpt_root)
    named = [c for c in everything if c.name == name]
    candidates = named + [c for c in everything if not named or _step_of(c) < _step_of(named[0])]
    errors = [] if named else [f"{pointer}: names {name!r}, no such checkpoint"]
    for ckpt in candidates:
        try:
            weights, optim, rng, step = _read_checkpoint(ckpt)
        except CheckpointError as error:
            errors.append(str(error))
            continue
        params = dict(model.named_parameters())
        missing = [n for n in weights if n not in params]
        if missing:
            raise ValueError(f"{ckpt}: checkpoint has parameters this model lacks, e.g. {missing[:3]}")
        with torch.no_grad():
            for key, value in weights.items():
                params[key].copy_(value)
        optimizer.load_state_dict(optim)
        torch.set_rng_state(rng)
        if errors:
            print(f"warning: {errors[0]}; resuming from the previous checkpoint {ckpt} (step {step}) instead")
        return step
    raise CheckpointError(f"{errors[0] if errors else pointer}; no readable checkpoint in {ckpt_root}: delete that "
                          "folder to train this stage again from step 0 (or restore the file)")


def _atomic_write(path: Path, text: str) -> None:
    """Write a file whole or not at all; the temporary name is unique to the process."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the metric lines up to ``step`` (the checkpoint a resumed run continues from)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut short by a kill
    _atomic_write(path, "".join(k + "\n" for k in keep))
