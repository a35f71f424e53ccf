"""Selective transfer without re-running the frozen part of the model at every step.

Under selective transfer (``model.add_lora``) only the top K decoder layers (LoRA) and rows of the policy head
train. The vision tower, the projector, the input embeddings and the lower L - K decoder layers are frozen and
their inputs (a training row's image and tokens) never change, so the hidden states entering decoder layer
L - K (the *cut*) are the same at every step for a given row. ``build_cache`` computes them once for every row
of an encoded dataset; a training step then runs only the top K layers, the final norm and the head
(``upper_logits``), which gives the logits of ``model(**batch)`` within float tolerance, and the same losses
and gradients (tests/test_frozen.py).

Both halves use the model's own forward, so no private transformers helper is involved:
- ``lower_hidden_states``: ``model(**batch)`` under ``no_grad`` with a forward pre-hook on the layer at the cut
  that records its input and stops the forward there (nothing above it runs);
- ``upper_logits``: ``model(inputs_embeds=<cached states>, attention_mask, token_type_ids)`` with the layers
  below the cut swapped, for that call, for modules that return their input. transformers then builds the
  prefix-LM mask (token_type_ids 0 = bidirectional prefix, 1 = causal targets, padding masked), the 1-based
  position ids and the rotary embeddings, and runs the top layers, the final norm, the head and any logit
  soft-capping exactly as in the full forward. With K = all layers the cut is 0 and the cache holds the decoder
  input embeddings (image features merged into the token embeddings).

Exactness needs nothing trainable below the cut (``cut_layer`` checks it: this is why ``add_lora`` unties the
head from the input embeddings) and no dropout below it (checked; the models here have none). The cache is
computed in training mode, as training runs (see ``lower_hidden_states`` for why the mode matters with 4-bit
weights on a CPU). Right padding: rows are cached at the full padded length of the dataset; ``cached_batch`` trims a
batch exactly as ``train.to_batch`` does, and the hidden states of valid tokens do not depend on the padding.
Memory: rows x length x hidden x 4 bytes (float32), e.g. 1,000 rows of 140 tokens of the tiny model: 72 MB.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

_MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask", "pixel_values")
_DROPOUT = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout,
            torch.nn.FeatureAlphaDropout)
_LAYER = re.compile(r"(?:^|\.)language_model\.layers\.(\d+)\.")


class _ReachedCut(Exception):
    """Raised by the pre-hook at the cut: the forward has produced what the cache needs."""


class _PassThrough(torch.nn.Module):
    """Stands in for a frozen decoder layer below the cut: returns its input hidden states unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _unwrap(model):
    """The model under a DistributedDataParallel wrapper (PeftModels forward their attributes themselves)."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def _named_module(model, suffix: str) -> torch.nn.Module:
    for name, module in _unwrap(model).named_modules():
        if name == suffix or name.endswith("." + suffix):
            return module
    raise ValueError(f"the model has no module named *{suffix} (expected a PaliGemma / Gemma decoder)")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The text decoder's layers (PaliGemma's ``model.language_model.layers``), under peft / DDP wrappers too."""
    layers = _named_module(model, "language_model.layers")
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"language_model.layers is a {type(layers).__name__}, expected a ModuleList")
    return layers


def cut_layer(model) -> int:
    """Index of the lowest decoder layer with a trainable parameter (the number of layers when only the final
    norm or the head train). Raises ValueError if anything below the decoder layers trains (token embeddings,
    vision tower, projector): their outputs, and so the cached hidden states, would change with training."""
    model = _unwrap(model)
    n = len(decoder_layers(model))
    above = {id(p) for p in _named_module(model, "language_model.norm").parameters()}
    head = model.get_output_embeddings()
    if head is not None:
        above |= {id(p) for p in head.parameters()}
    cut, below = n, []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        m = _LAYER.search(name)
        if m:
            cut = min(cut, int(m.group(1)))
        elif id(p) not in above:
            below.append(name)
    if below:
        raise ValueError(f"{len(below)} trainable parameters lie below the decoder layers (e.g. {below[:3]}): "
                         "the frozen part would change during training and cannot be cached. Train the policy "
                         "head on its own weight (refinevla.model.add_lora unties it from the input embeddings).")
    return cut


def _resolve_cut(model, cut: int | None) -> int:
    n = len(decoder_layers(model))
    cut = cut_layer(model) if cut is None else int(cut)
    if not 0 <= cut <= n:
        raise ValueError(f"cut={cut} but the decoder has {n} layers (0..{n})")
    return cut


def _check_no_dropout_below(model, cut: int) -> None:
    """A cache holds one forward of the lower part: random dropout masks there could not be reproduced."""
    model = _unwrap(model)
    config = model.config
    found = [f"{name}.attention_dropout={getattr(c, 'attention_dropout', 0.0)}"
             for name, c in (("vision_config", getattr(config, "vision_config", None)),
                             ("text_config", config.get_text_config() if cut > 0 else None))
             if c is not None and getattr(c, "attention_dropout", 0.0)]
    layers = decoder_layers(model)
    upper = {id(m) for layer in list(layers)[cut:] for m in layer.modules()}
    upper |= {id(m) for m in _named_module(model, "language_model.norm").modules()}
    upper |= {id(m) for m in model.get_output_embeddings().modules()}
    found += [f"{name} (p={m.p})" for name, m in model.named_modules()
              if isinstance(m, _DROPOUT) and m.p > 0 and id(m) not in upper]
    if found:
        raise ValueError(f"dropout below the cut at decoder layer {cut}: {found[:3]}; the frozen part is not "
                         "deterministic in training and cannot be cached")


def lower_hidden_states(model, batch: dict, cut: int | None = None) -> dict:
    """The hidden states entering decoder layer ``cut`` (default ``cut_layer(model)``), without gradients.

    ``batch``: input_ids, token_type_ids, attention_mask and pixel_values (other keys are ignored), as from
    ``train.to_batch``. Stops the forward at the cut. Runs the model in training mode, as ``train.train_loop``
    does (each module's mode is restored afterwards): bitsandbytes' CPU 4-bit layers, on CPUs with AVX512-BF16,
    repack their weights in place on their first eval-mode call without gradients and from then on compute with
    another kernel (about 1e-2 apart in the logits), so an eval-mode cache would not hold what an uncached
    training step computes. Raises ValueError where dropout is active below the cut. Returns
    ``{"hidden_states": [B, T, hidden], "cut": cut}``, to pass to ``upper_logits`` with the same batch."""
    cut = _resolve_cut(model, cut)
    _check_no_dropout_below(model, cut)
    layers = decoder_layers(model)
    at_cut = layers[cut] if cut < len(layers) else _named_module(model, "language_model.norm")
    seen = {}

    def stop_here(module, args, kwargs):
        seen["hidden_states"] = args[0] if args else kwargs["hidden_states"]
        raise _ReachedCut

    modes = {m: m.training for m in model.modules()}
    handle = at_cut.register_forward_pre_hook(stop_here, with_kwargs=True)
    model.train()
    try:
        with torch.no_grad():
            model(**{k: batch[k] for k in _MODEL_INPUTS}, use_cache=False)
    except _ReachedCut:
        pass
    finally:
        handle.remove()
        for m, training in modes.items():
            m.training = training
    if "hidden_states" not in seen:
        raise RuntimeError(f"the forward never reached decoder layer {cut}: this transformers version builds "
                           "PaliGemma differently; the frozen-part cache cannot be used")
    return {"hidden_states": seen["hidden_states"].detach(), "cut": cut}


@contextmanager
def _layers_below_skipped(model, cut: int):
    layers = decoder_layers(model)
    kept = [layers[i] for i in range(cut)]
    try:
        for i in range(cut):
            layers[i] = _PassThrough()
        yield
    finally:
        for i, layer in enumerate(kept):
            layers[i] = layer


def upper_logits(model, cached, batch: dict, cut: int | None = None) -> torch.Tensor:
    """Logits of the full model from the hidden states at the cut: only the layers from the cut up, the final
    norm and the head run (with their LoRA / trained head rows, with gradients as usual).

    ``cached``: the dict of ``lower_hidden_states`` or a [B, T, hidden] tensor (a slice of ``build_cache``'s
    array, e.g. ``cached_batch(...)["hidden_states"]``), trimmed like ``batch``; ``batch`` gives attention_mask
    and token_type_ids (other keys are ignored). ``cut`` defaults to the dict's, else ``cut_layer(model)``."""
    if isinstance(cached, dict):
        cut = cached.get("cut") if cut is None else cut
        cached = cached["hidden_states"]
    cut = _resolve_cut(model, cut)
    attention_mask, token_type_ids = batch["attention_mask"], batch["token_type_ids"]
    if tuple(cached.shape[:2]) != tuple(attention_mask.shape):
        raise ValueError(f"cached hidden states {tuple(cached.shape)} do not match the batch "
                         f"{tuple(attention_mask.shape)}: trim them like the batch (frozen.cached_batch)")
    embed = _unwrap(model).get_input_embeddings().weight
    hidden = torch.as_tensor(cached).to(device=embed.device, dtype=embed.dtype)
    with _layers_below_skipped(model, cut):
        out = model(inputs_embeds=hidden, attention_mask=attention_mask, token_type_ids=token_type_ids,
                    use_cache=False)
    return out.logits


def build_cache(model, data: dict, batch_size: int = 32, cut: int | None = None, dtype=np.float32,
                out_path: str | Path | None = None, desc: str = "cache frozen part") -> np.ndarray:
    """The hidden states at the cut for every row of ``data`` (from ``train.encode_dataset``), computed once.

    Returns an array [rows, max_len, hidden] (``dtype``: float32, or float16 for half the memory at about 1e-3
    relative error in the logits), at the dataset's full padded length: slice it per batch with
    ``cached_batch``, which trims like ``train.to_batch``. ``out_path``: write it to a .npy file, memory-mapped,
    instead of holding it in memory. Rows are taken in order, ``batch_size`` at a time, with a progress bar."""
    from tqdm import tqdm

    from .model import image_size, model_device, preprocess_images

    cut = _resolve_cut(model, cut)
    device = model_device(model)
    size = image_size(_unwrap(model))
    n, length = data["input_ids"].shape
    out = None
    with tqdm(total=n, desc=desc, unit="row", leave=False) as bar:
        for start in range(0, n, batch_size):
            idx = np.arange(start, min(start + batch_size, n))
            batch = {k: torch.as_tensor(data[k][idx], device=device)
                     for k in ("input_ids", "token_type_ids", "attention_mask")}
            batch["pixel_values"] = preprocess_images(data["images"][idx], size).to(device)
            hidden = lower_hidden_states(model, batch, cut)["hidden_states"]
            if out is None:
                shape = (n, length, hidden.shape[-1])
                out = (np.lib.format.open_memmap(str(out_path), mode="w+", dtype=dtype, shape=shape)
                       if out_path is not None else np.empty(shape, dtype))
            out[idx] = hidden.float().cpu().numpy().astype(dtype, copy=False)
            bar.update(len(idx))
    if isinstance(out, np.memmap):
        out.flush()
    return out


def cached_batch(data: dict, cache: np.ndarray, idx: np.ndarray, device) -> dict:
    """``train.to_batch`` for the cached path: input_ids, token_type_ids, part, attention_mask trimmed to the
    batch's longest row, and ``hidden_states`` (float32) from ``cache`` trimmed the same way; no pixels."""
    batch = {k: torch.as_tensor(data[k][idx], device=device) for k in ("input_ids", "token_type_ids", "part",
                                                                      "attention_mask")}
    length = int(batch["attention_mask"].sum(1).max())  # trim the common right padding, as to_batch does
    batch = {k: v[:, :length] for k, v in batch.items()}
    batch["hidden_states"] = torch.as_tensor(np.asarray(cache[np.asarray(idx), :length]),
                                             device=device).float()
    return batch
