"""Models: the tiny PaliGemma-architecture VLA, real checkpoints, 4-bit loading and LoRA on the top layers.

The same three calls serve both scales:
- ``build_tiny_vla(size, tokenizer)``: SigLIP + Gemma from a size preset, random init (the tiny scale);
- ``load_base(path_or_id, quantization)``: any saved PaliGemma (our pre-trained tiny base or a real
  PaliGemma / PaliGemma 2 checkpoint), in fp32 / 8-bit / 4-bit (nf4 + double quantisation);
- ``add_lora(model, cfg)``: LoRA adapters on the top K decoder layers only ("selective transfer"),
  the vision tower and the lower layers frozen; trained policy-head rows on a head untied from the (frozen)
  input embeddings, so that nothing below the top K layers changes (``refinevla.frozen`` caches it);
- ``load_finetuned(base, adapter_dir, quantization)``: a saved fine-tune, rebuilt the same way.
Weights are saved and loaded with safetensors only.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .config import LORA_TARGETS, SIZES, ModelConfig  # noqa: F401 - defined with the run config


# ------------------------------------------------------------------------------------- building
def build_tiny_vla(size: str, vocab_size: int, image_token_id: int, pad_token_id: int = 0,
                   seed: int = 0, attn_implementation: str = "eager"):
    """A randomly initialised PaliGemma (SigLIP vision tower + Gemma decoder) of the given size preset."""
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; known: {sorted(SIZES)}")
    s = SIZES[size]
    vision = SiglipVisionConfig(hidden_size=s["vision_hidden"], intermediate_size=4 * s["vision_hidden"],
                                num_hidden_layers=s["vision_layers"], num_attention_heads=s["vision_heads"],
                                image_size=s["image_size"], patch_size=s["patch_size"])
    text = GemmaConfig(vocab_size=vocab_size, hidden_size=s["text_hidden"], intermediate_size=s["mlp"],
                       num_hidden_layers=s["text_layers"], num_attention_heads=s["text_heads"],
                       num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"], max_position_embeddings=1024,
                       pad_token_id=pad_token_id)
    config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                             projection_dim=s["text_hidden"])
    config.text_config.vocab_size = vocab_size
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config)
    model.config._attn_implementation = attn_implementation
    return model


def compute_dtype() -> torch.dtype:
    """The dtype of a loaded base's unquantised modules and of 4-bit compute: bf16 on a GPU, fp32 on a CPU."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def dtype_kwarg(dtype) -> dict:
    """``from_pretrained``'s dtype argument under the installed transformers (``torch_dtype`` before 5.0)."""
    import transformers

    return {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": dtype}


def quantized_load_kwargs(qc) -> dict:
    """``from_pretrained`` arguments of a bitsandbytes load: the config, this process's device, and the dtype of every
    module bitsandbytes does not quantise. Without a dtype, transformers 4.x's bnb quantizers
    (``update_torch_dtype`` in ``quantizers/quantizer_bnb_4bit.py``) load those modules (embeddings, norms,
    convolutions) in float16, whatever the compute dtype; OpenVLA's ``vla-scripts/finetune.py`` passes
    ``torch_dtype=torch.bfloat16`` beside its BitsAndBytesConfig for this reason."""
    return dict(quantization_config=qc, device_map={"": _local_device()}, **dtype_kwarg(compute_dtype()))


def _quantization_config(quantization: str):
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype())
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def _local_device():
    if not torch.cuda.is_available():
        return "cpu"
    from accelerate import PartialState

    return PartialState().local_process_index


def load_base(path: str | Path, quantization: str = "none", attn_implementation: str = "eager"):
    """Load a saved PaliGemma (local folder or hub id), optionally quantised by bitsandbytes."""
    from transformers import PaliGemmaForConditionalGeneration

    kwargs = dict(attn_implementation=attn_implementation, use_safetensors=True)
    qc = _quantization_config(quantization)
    if qc is not None:  # bitsandbytes places the weights itself: on this process's GPU under accelerate launch
        kwargs.update(quantized_load_kwargs(qc))
    elif torch.cuda.is_available():
        kwargs.update(device_map={"": _local_device()}, **dtype_kwarg(torch.bfloat16))
    model = PaliGemmaForConditionalGeneration.from_pretrained(str(path), **kwargs)
    if quantization == "4bit":
        keep_4bit_training_kernel(model)
    return model


def keep_4bit_training_kernel(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel (``load_base`` calls this).

    On CPUs with AVX512-BF16, a ``Linear4bit`` repacks its weight in place on its first call in eval mode without
    gradients, and from then on, in training mode too, computes with a bf16 kernel that has no backward: logits
    about 1e-2 apart, and gradients through the frozen 4-bit weights silently wrong (bitsandbytes warns "an
    autograd kernel was not registered"), e.g. after a held-out evaluation in the middle of a fine-tune. Without
    the repacking every call uses the kernel training uses. CPU inference is unaffected: ``load_vla`` dequantizes
    the weights once (``dequantize_for_inference``). Returns the number of layers set."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False  # read by Linear4bit.forward (bitsandbytes 0.50)
    return len(layers)


def dequantize_for_inference(model) -> int:
    """Replace every bitsandbytes 4-bit linear layer by an fp32 one holding its dequantized weight.

    On a CPU, bitsandbytes dequantizes each 4-bit weight at every call and then multiplies; doing it once
    computes the same numbers (the trained model is unchanged: LoRA adapters stay on top) about twice as fast
    when decoding token by token. Returns the number of layers replaced. GPU inference keeps the 4-bit kernels.
    """
    import bitsandbytes as bnb

    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state).float()
                linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                linear.weight = torch.nn.Parameter(weight, requires_grad=False)
                if child.bias is not None:
                    linear.bias = torch.nn.Parameter(child.bias.data.float(), requires_grad=False)
                setattr(module, name, linear)
                replaced += 1
    return replaced


def num_decoder_layers(model) -> int:
    return model.config.text_config.num_hidden_layers


def top_layers(model, k: int) -> list[int]:
    """Indices of the top ``k`` decoder layers; a clear error when k exceeds the layer count."""
    n = num_decoder_layers(model)
    if not 1 <= k <= n:
        raise ValueError(f"tune_top_k_layers={k} but the decoder has {n} layers (choose 1..{n})")
    return list(range(n - k, n))


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them (activation memory of
    about one layer instead of all of them, for roughly one more forward pass per step).

    Non-reentrant ``torch.utils.checkpoint``: it gives gradients to the trainable weights inside a checkpointed
    layer (LoRA) even when the layer's input does not require grad, so the hook that transformers (and peft, in
    ``get_peft_model``) put on the input embeddings for the reentrant variant is removed: it would make the
    frozen lower layers back-propagate for nothing. ``use_cache`` is switched off per call in the training loop.
    """
    import warnings

    kwargs = {"use_reentrant": False}
    with warnings.catch_warnings():  # gradient_checkpointing_enable is the pre-5.x name, deprecated for v6
        warnings.simplefilter("ignore", FutureWarning)
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    _drop_input_grad_hook(model)


def _drop_input_grad_hook(model) -> None:
    """``disable_input_require_grads``, also where no hook was registered (transformers 4.x then raises; the
    remote-code bases of refinevla.bases run on 4.x)."""
    try:
        model.disable_input_require_grads()
    except AttributeError:
        pass


def untie_policy_head(model) -> bool:
    """Give the policy head (the output embeddings) its own weight, so that training some of its rows leaves the
    input embeddings, and with them everything the frozen lower layers compute, unchanged.

    PaliGemma ties ``lm_head.weight`` to the token embeddings. Where they are one tensor, the head gets a copy
    (the same values: the model computes exactly what it did) and the config no longer asks for tying, so that
    neither transformers (``tie_weights``) nor peft ties them again. Returns whether a copy was made (False: the
    head already had its own weight). Costs vocabulary x hidden more parameters (frozen: only the chosen rows
    train, through peft's trainable tokens), e.g. 0.3 MB for the tiny model, 2.4 GB in fp32 for PaliGemma 2 3B.
    """
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    copied = head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr()
    if copied:
        head.weight = torch.nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    configs = [model.config]
    if hasattr(model.config, "get_text_config"):
        configs.append(model.config.get_text_config())
    for config in configs:
        if hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys") and hasattr(model, "get_expanded_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)  # now empty
    return copied


def resize_embeddings(model, vocab_size: int) -> bool:
    """Grow the token embeddings (and the head) to ``vocab_size`` rows, the new rows set to the mean of the old
    ones: deterministic, so that the fine-tune and every later load of its adapter see the same new rows (the
    input rows stay frozen and are not saved with the adapter). transformers' own ``mean_resizing`` draws them
    around that mean with the global random generator. Returns False when the model is already large enough."""
    old = model.get_input_embeddings().weight.shape[0]
    if vocab_size <= old:
        return False
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            if layer is not None:
                w = layer.weight
                w[old:] = w[:old].float().mean(0).to(w.dtype)
    return True


#: never adapted: the vision towers, projectors and depth model of PaliGemma, SpatialVLA and OpenVLA
_FROZEN_MODULES = (r".*(vision_tower|multi_modal_projector|vision_zoe_model|position_embedding_3d|vision_backbone"
                   r"|projector).*")


def _module_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def add_lora(model, cfg: ModelConfig, trainable_token_ids=None, gradient_checkpointing: bool = False):
    """Freeze everything, then put LoRA adapters on the top K decoder layers (vision tower excluded).

    ``trainable_token_ids``: rows of the policy head (the output embeddings) that are trained as well (peft's
    trainable tokens; only these rows, not the whole vocabulary). The head is first untied from the input
    embeddings (``untie_policy_head``): the input embeddings stay frozen, so nothing below the top K layers
    trains and their hidden states can be cached (``refinevla.frozen``). ``gradient_checkpointing``: see
    ``enable_gradient_checkpointing`` (switched on in the base before the adapters are added)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    layers = top_layers(model, cfg.tune_top_k_layers)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        import warnings

        with warnings.catch_warnings():  # peft still calls a transformers method deprecated for v6
            warnings.simplefilter("ignore", FutureWarning)
            # False leaves checkpointing as set above; peft's own would add the input-embedding hook again
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    token_indices = None
    if trainable_token_ids is not None:
        untie_policy_head(model)  # after the k-bit preparation, which may cast the (tied) weight to fp32
        head = _module_name(model, model.get_output_embeddings())  # "lm_head"
        token_indices = {head: sorted(int(t) for t in trainable_token_ids)}
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), layers_to_transform=layers, layers_pattern="layers",
                      exclude_modules=_FROZEN_MODULES, bias="none",
                      trainable_token_indices=token_indices)
    peft_model = get_peft_model(model, lora)
    if gradient_checkpointing:  # peft hooks the input embeddings of a checkpointed unquantised base again
        _drop_input_grad_hook(model)
    return peft_model


def load_finetuned(base_path: str | Path, adapter_dir: str | Path, quantization: str = "4bit",
                   attn_implementation: str = "eager", vocab_size: int | None = None):
    """The fine-tuned model written by ``train.finetune``: the base loaded as in training, the adapter on top.

    The base is loaded (``load_base``), grown to the tokenizer's vocabulary when that is larger
    (``resize_embeddings``; ``vocab_size`` defaults to the tokenizer saved in ``adapter_dir``), its head untied
    exactly as ``add_lora`` did when the adapter trains head rows, and the adapter (LoRA + the trained head rows)
    loaded with peft. Adapters from before the untying (trainable tokens on the tied input embeddings) load as
    they were trained, tied. Returns the PeftModel (inference mode)."""
    import json

    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: {adapter_dir} is not a saved adapter")
    model = load_base(base_path, quantization, attn_implementation)
    if vocab_size is None and (adapter_dir / "vla_tokens.json").exists():
        from .tokens import VLATokenizer

        vocab_size = VLATokenizer.load(adapter_dir).vocab_size
    if vocab_size is not None:
        resize_embeddings(model, vocab_size)
    targets = json.loads(config_file.read_text()).get("trainable_token_indices") or {}
    head = _module_name(model, model.get_output_embeddings())
    if isinstance(targets, dict) and any(head == t or head.endswith("." + t) for t in targets):
        untie_policy_head(model)
    return PeftModel.from_pretrained(model, str(adapter_dir))


def parameter_counts(model) -> dict:
    """Trainable and total parameters (4-bit weights counted as stored elements x 2)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    for p in model.parameters():
        n = p.numel()
        total += n * 2 if p.dtype == torch.uint8 else n  # Params4bit pack two weights per byte
    return {"trainable": trainable, "total": total, "trainable_pct": 100.0 * trainable / max(total, 1)}


def lora_layer_indices(model) -> list[int]:
    """The decoder layers that carry LoRA weights (read back from the parameter names)."""
    import re

    found = set()
    for name, _ in model.named_parameters():
        m = re.search(r"language_model\.(?:model\.)?layers\.(\d+)\..*lora_", name)  # PaliGemma; Gemma 2 / Llama
        if m:
            found.add(int(m.group(1)))
    return sorted(found)


# ----------------------------------------------------------------------------------- images
def num_image_tokens(model) -> int:
    v = model.config.vision_config
    return (v.image_size // v.patch_size) ** 2


def image_size(model) -> int:
    """The input image size (a remote-code base's wrapper, refinevla.bases.RemoteVLA, states its own)."""
    return getattr(model, "image_size_px", None) or model.config.vision_config.image_size


def preprocess_images(images, size: int) -> torch.Tensor:
    """uint8 [B, H, W, 3] (or one [H, W, 3]) -> float [B, 3, size, size] in [-1, 1], SigLIP's normalisation."""
    x = torch.as_tensor(np.array(images, dtype=np.uint8, copy=True))
    if x.ndim == 3:
        x = x[None]
    x = x.permute(0, 3, 1, 2).float()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False)
    return x / 127.5 - 1.0


def model_device(model) -> torch.device:
    return next(model.parameters()).device
