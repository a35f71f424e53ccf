"""Pre-trained VLA bases run by their own remote code: SpatialVLA and OpenVLA behind the project's interface.

The paper fine-tunes a *pre-trained VLA* (SpatialVLA, ~4B, PaliGemma 2 backbone), so that selective transfer keeps
what robot pre-training taught the lower layers. ``model.base`` names the kind:

- ``paligemma``: our tiny base or a raw PaliGemma checkpoint (``refinevla.model``, the project's own tokenizer);
- ``spatialvla``: e.g. ``IPEC-COMMUNITY/spatialvla-4b-224-pt``, loaded with ``AutoModel`` / ``AutoProcessor`` and
  ``trust_remote_code=True`` (https://github.com/SpatialVLA/SpatialVLA/tree/main/model). One action = THREE of its
  spatial action tokens (translation on a spherical grid, rotation, gripper: ``processor.action_tokenizer``), a
  decode = a chunk of ``processor.action_chunk_size`` (4) actions, un-normalised by
  ``processor.decode_actions(ids, unnorm_key)`` with the dataset's q01/q99 (``processor.statistics``);
- ``openvla``: e.g. ``openvla/openvla-7b`` (``AutoModelForVision2Seq``, https://github.com/openvla/openvla,
  ``prismatic/extern/hf``): seven tokens per action, the last 256 ids of the Llama vocabulary, un-normalised as its
  ``predict_action`` does (``config.norm_stats[unnorm_key]``); the image patches enter after ``<bos>``, so its
  logits are cut back to the token positions here.

A training row keeps the base's own format and puts the rationale, as target text, BEFORE the base's action
tokens: ``prompt | rationale tokens, action tokens``. The first action token ends the rationale (no marker token
is added: the vocabularies stay as pre-trained). Parts: the rationale tokens feed L_reasoning, the action tokens
L_action (``train.joint_loss``). Selective transfer is ``model.add_lora``: LoRA on the top K language layers and
the head rows of the target tokens (the action head: every action token, and the rationale's words), on a head
untied from the frozen input embeddings; vision tower, projector, depth model and lower layers stay frozen.

Acting: greedy, text tokens until an action token wins (or ``max_rationale_tokens``), then exactly the chunk's
action tokens, each restricted to the tokens of its position; each step recomputes the sequence (no KV cache: the
same code runs the remote models written for transformers 4.x and the tests' stand-in on 5.x). The robot state is not
read: neither base takes it. Remote code needs its own transformers: SpatialVLA's imports names transformers 5
removed (``HybridCache``, PaliGemma processor helpers), so the paper scale runs in its own environment with
transformers 4.47 (README, book/paper.md); the tests use a stand-in with the same interface (tests/standins/).
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from .schema import ACTION_DIM
from .sequences import join, pad

BASE_KINDS = ("paligemma", "spatialvla", "openvla")
REMOTE_KINDS = ("spatialvla", "openvla")
DEFAULT_UNNORM_KEY = {"spatialvla": "bridge_orig/1.0.0", "openvla": "bridge_orig"}
#: the statistics each base's own SimplerEnv adapter un-normalises with, per robot
#: (simpler_env/policies/spatialvla/spatialvla_model.py, SimplerEnv-OpenVLA policies/openvla/openvla_model.py);
#: used when model.unnorm_key is left '' (``RemoteBase.select_robot``), a set key is used for every robot
ROBOT_UNNORM_KEY = {"spatialvla": {"widowx": "bridge_orig/1.0.0", "google_robot": "fractal20220817_data/0.1.0"},
                    "openvla": {"widowx": "bridge_orig", "google_robot": "fractal20220817_data"}}
META_FILE = "remote_base.json"
OPENVLA_EMPTY = 29871  # Llama's "" token that OpenVLA's predict_action appends after "Out:"


# ------------------------------------------------------------------------------------- actions
def normalize(actions, stats: dict) -> np.ndarray:
    """BOUNDS_Q99, as both bases were trained: 2 (a - q01) / (q99 - q01) - 1 clipped to [-1, 1] where ``mask``
    (arm dimensions); the others (the gripper) pass unchanged."""
    a = np.asarray(actions, np.float64)
    low, high = np.asarray(stats["q01"], np.float64), np.asarray(stats["q99"], np.float64)
    mask = np.asarray(stats.get("mask", np.ones_like(low, bool)), bool)
    unit = np.clip(2 * (a - low) / np.maximum(high - low, 1e-8) - 1, -1, 1)
    return np.where(mask, unit, a)


def unnormalize(normalized, stats: dict) -> np.ndarray:
    """The inverse of ``normalize`` (the formula of SpatialVLA's ``decode_actions`` and OpenVLA's
    ``predict_action``)."""
    n = np.asarray(normalized, np.float64)
    low, high = np.asarray(stats["q01"], np.float64), np.asarray(stats["q99"], np.float64)
    mask = np.asarray(stats.get("mask", np.ones_like(low, bool)), bool)
    return np.where(mask, 0.5 * (n + 1) * (high - low) + low, n).astype(np.float32)


def fit_stats(actions) -> dict:
    """Statistics for a dataset the base has none for: q01 / q99 of the arm dimensions, the gripper unmasked."""
    a = np.asarray(actions, np.float64)
    mask = [True] * (a.shape[1] - 1) + [False]
    return {"action": {"q01": np.quantile(a, 0.01, 0).tolist(), "q99": np.quantile(a, 0.99, 0).tolist(),
                       "mask": mask}}


def openvla_action_ids(normalized, vocab_size: int, n_bins: int = 256) -> np.ndarray:
    """OpenVLA's ActionTokenizer: digitize on ``linspace(-1, 1, n_bins)``, token = vocab_size - bin."""
    return (vocab_size - np.digitize(np.clip(normalized, -1, 1), np.linspace(-1, 1, n_bins))).astype(np.int64)


def openvla_normalized(ids, vocab_size: int, n_bins: int = 256) -> np.ndarray:
    """OpenVLA's decoding (``predict_action``): bin centres of ``vocab_size - id - 1``, clipped to the bins."""
    bins = np.linspace(-1, 1, n_bins)
    centres = (bins[:-1] + bins[1:]) / 2.0
    return centres[np.clip(vocab_size - np.asarray(ids) - 1, 0, len(centres) - 1)]


# ------------------------------------------------------------------------------------- loading
def detect_kind(path) -> str:
    """The base kind of a checkpoint (local folder or hub id) from its config.json ``model_type``."""
    try:
        from transformers.utils import cached_file

        local = Path(path) / "config.json"
        found = local if Path(path).is_dir() else cached_file(str(path), "config.json")
        config = json.loads(Path(found).read_text()) if found and Path(found).exists() else {}
    except (OSError, ValueError):
        return "paligemma"
    kind = config.get("model_type", "")
    return kind if kind in REMOTE_KINDS else "paligemma"


def load_remote(path, kind: str, quantization: str = "none", attn_implementation: str = "eager"):
    """(model, processor) of a remote-code base, 4-bit / 8-bit as ``model.load_base`` loads PaliGemma."""
    import transformers
    from transformers import AutoModel, AutoProcessor

    from .model import (_local_device, _quantization_config, dtype_kwarg, keep_4bit_training_kernel,
                        quantized_load_kwargs)

    if kind not in REMOTE_KINDS:
        raise ValueError(f"model.base={kind!r} is not a remote-code base; choose from {list(REMOTE_KINDS)}")
    kwargs = dict(trust_remote_code=True, attn_implementation=attn_implementation)
    qc = _quantization_config(quantization)
    if qc is not None:  # with the dtype of the unquantised modules (model.quantized_load_kwargs)
        kwargs.update(quantized_load_kwargs(qc))
    elif torch.cuda.is_available():
        kwargs.update(device_map={"": _local_device()}, **dtype_kwarg(torch.bfloat16))
    # OpenVLA registers AutoModelForVision2Seq (transformers 4.x; AutoModelForImageTextToText in 5.x)
    auto = AutoModel if kind == "spatialvla" else getattr(transformers, "AutoModelForVision2Seq", None)
    try:
        model = auto.from_pretrained(str(path), **kwargs)
    except ImportError as e:  # remote code written for transformers 4.x
        raise ImportError(f"{path}: its remote code does not import under transformers {transformers.__version__} "
                          f"({e}); run the paper scale in the paper-{kind} environment (README)") from e
    if quantization == "4bit":
        keep_4bit_training_kernel(model)
    processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=True)
    return model, processor


class RemoteBase:
    """Token layout, action codec and pixel conversion of one remote-code base (its processor and config).

    Also the "tokenizer" a fine-tune saves beside its adapter (``save`` / ``load``): the kind, the unnorm key and
    the statistics the actions were normalised with."""

    def __init__(self, kind: str, processor, config, unnorm_key: str = "", stats: dict | None = None,
                 fit_actions=None, per_robot: bool | None = None):
        """``stats``: saved statistics; else the base's own for ``unnorm_key``; else fit on ``fit_actions``.
        ``per_robot``: ``select_robot`` may switch to the robot's statistics (default: when no key was given and the
        base's own statistics are used)."""
        if kind not in REMOTE_KINDS:
            raise ValueError(f"model.base={kind!r}: expected one of {list(REMOTE_KINDS)}")
        self.kind, self.processor, self.config = kind, processor, config
        self.hf = processor.tokenizer
        self.unnorm_key = unnorm_key or DEFAULT_UNNORM_KEY[kind]
        known = self._known_stats()
        if stats is not None:
            self.stats = stats
        elif self.unnorm_key in known:
            self.stats = known[self.unnorm_key]["action"]
        elif fit_actions is not None:
            self.stats = fit_stats(fit_actions)["action"]
        else:
            raise ValueError(f"model.unnorm_key={self.unnorm_key!r} is not among the base's statistics "
                             f"{sorted(known)}; pick one, or fine-tune (statistics are then fit on the data)")
        if kind == "spatialvla":
            self.action_chunk, self.tokens_per_action = int(processor.action_chunk_size), 3
            at = processor.action_tokenizer
            self.action_ids = np.arange(at.action_token_begin_idx, at.action_token_begin_idx + at.vocab_size)
            self.image_size = int(config.vision_config.image_size)
            self.n_image = int(processor.image_seq_length)
            self.image_id = int(processor.image_token_id)
        else:
            self.action_chunk, self.tokens_per_action = 1, ACTION_DIM
            self.vocab = int(config.text_config.vocab_size - config.pad_to_multiple_of)
            self.n_bins = int(getattr(config, "n_action_bins", 256))
            self.action_ids = np.arange(self.vocab - self.n_bins, self.vocab)
            self.image_size = int(config.image_sizes[0])
            self.n_image, self.image_id = 0, -1
        self.pad_id = self.hf.pad_token_id if self.hf.pad_token_id is not None else 0
        self.eos_id, self.bos_id = self.hf.eos_token_id, self.hf.bos_token_id
        self.per_robot = bool(not unnorm_key and stats is None and self.unnorm_key in known) \
            if per_robot is None else bool(per_robot)
        if self.stats.get("q01") is None or len(self.stats["q01"]) != ACTION_DIM:
            raise ValueError(f"statistics for {self.unnorm_key!r} need 7-D q01 / q99, got {self.stats}")

    def select_robot(self, robot: str) -> str:
        """The unnorm key for ``robot`` (SimplerEnv's "widowx" / "google_robot"): the base's own key for that robot
        (``ROBOT_UNNORM_KEY``) when ``per_robot``, else the one in use. Returns the key now in use."""
        key = ROBOT_UNNORM_KEY.get(self.kind, {}).get(robot)
        if self.per_robot and key and key != self.unnorm_key:
            known = self._known_stats()
            if key not in known:
                raise ValueError(f"the {self.kind} base has no statistics {key!r} for {robot} (it has "
                                 f"{sorted(known)}): set model.unnorm_key")
            self.unnorm_key, self.stats = key, known[key]["action"]
        return self.unnorm_key

    def _known_stats(self) -> dict:
        return dict(self.processor.statistics) if self.kind == "spatialvla" else dict(self.config.norm_stats or {})

    @property
    def n_action_tokens(self) -> int:
        return self.tokens_per_action * self.action_chunk

    # -- text and actions as token ids
    def text_ids(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def decode_text(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True).strip()

    def prompt_ids(self, instruction: str) -> list[int]:
        """The base's own prompt: SpatialVLA ``<image> x N <bos> instruction \\n`` (its processor's layout),
        OpenVLA ``<s> In: What action should the robot take to {instruction}?\\nOut:`` + its empty token."""
        if self.kind == "spatialvla":
            return [self.image_id] * self.n_image + [self.bos_id] + self.text_ids(instruction.lower() + "\n")
        text = f"In: What action should the robot take to {instruction.lower()}?\nOut:"
        ids = list(self.hf(text, add_special_tokens=True)["input_ids"])
        return ids if ids[-1] == OPENVLA_EMPTY else ids + [OPENVLA_EMPTY]

    def action_to_ids(self, chunk) -> list[int]:
        """float[k, 7] (k = the chunk) or float[7] -> the base's action tokens, action by action."""
        norm = normalize(np.asarray(chunk, np.float64).reshape(-1, ACTION_DIM), self.stats)
        if self.kind == "spatialvla":
            tokens = self.processor.action_tokenizer(norm)  # [k, 3] token strings
            return [int(t) for t in self.hf.convert_tokens_to_ids(tokens.reshape(-1).tolist())]
        return openvla_action_ids(norm, self.vocab, self.n_bins).reshape(-1).tolist()

    def ids_to_actions(self, ids) -> np.ndarray:
        """The chunk's action tokens -> float32[k, 7] in the dataset's units."""
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        if self.kind == "spatialvla":
            key = self.unnorm_key
            self.processor.statistics.setdefault(key, {"action": self.stats})  # fit stats: make them known
            return np.asarray(self.processor.decode_actions(torch.as_tensor(ids), unnorm_key=key)["actions"],
                              np.float32)
        return unnormalize(openvla_normalized(ids.reshape(-1, ACTION_DIM), self.vocab, self.n_bins), self.stats)

    # -- training rows
    def build_sequence(self, instruction: str, chunk, rationale: str | None = None, max_rationale_tokens: int = 96,
                       position: str = "before"):
        """(input_ids, token_type_ids, part): prompt (type 0) | rationale and action tokens (type 1, causal)."""
        reason = self.text_ids(rationale)[:max_rationale_tokens] if rationale else []
        return join(self.prompt_ids(instruction), reason, self.action_to_ids(chunk), position)

    def encode_dataset(self, ds, use_rationale: bool, max_rationale_tokens: int = 96, position: str = "before",
                       with_dropped: bool = False, chunks=None, texts=None) -> dict:
        """``train.encode_dataset`` for this base: the same padded arrays (input_ids, token_type_ids, part,
        attention_mask, images, n_rows), images resized to the base's input size. ``chunks``: float[rows, k, 7]
        (``train.action_chunks``); ``texts``: the rationale of every row (with ``use_rationale``)."""
        from PIL import Image

        rows = [(ins, chunks[i], texts[i] if use_rationale else None) for i, ins in enumerate(ds["instruction"])]
        seqs = [self.build_sequence(ins, ch, r, max_rationale_tokens, position) for ins, ch, r in rows]
        if with_dropped:
            seqs += [self.build_sequence(ins, ch, None) for ins, ch, _ in rows]
        images = []
        for img in ds["image"]:
            img = img if hasattr(img, "convert") else Image.fromarray(np.asarray(img, np.uint8))
            images.append(np.asarray(img.convert("RGB").resize((self.image_size, self.image_size),
                                                               Image.BILINEAR), np.uint8))
        return pad(seqs, images + images if with_dropped else images, self.pad_id, n_rows=len(rows))

    # -- the model's inputs
    def model_inputs(self, input_ids, pixel_values, attention_mask, token_type_ids, dtype=None) -> dict:
        """Our pixels (``model.preprocess_images``: [-1, 1]) and tokens -> the remote forward's arguments; the
        pixels (and SpatialVLA's intrinsic) in ``dtype``, the model's (``RemoteVLA.input_dtype``).

        SpatialVLA normalises [0, 1] pixels itself (its training data is not normalised by the processor) and
        reads the camera ``intrinsic``; it builds the prefix-LM mask only when ``labels`` are given, so labels are
        always passed (without them the first pass is bidirectional over the targets). OpenVLA takes each vision
        backbone's normalisation, stacked on the channels (its fused DINOv2 + SigLIP backbone).

        The cast matters on a GPU, where the base is bf16 and evaluation runs without autocast: SpatialVLA's own
        ``predict_action`` casts its inputs to bfloat16 and SimplerEnv's OpenVLA adapter sends bfloat16 pixels,
        because modules such as ZoeDepth's BEiT patch convolution (transformers 4.47) and OpenVLA's timm backbone
        convolve float32 pixels as they come and stop with a dtype error (tests/test_paper_dtypes.py)."""
        unit = (pixel_values.float() + 1) / 2
        dtype = dtype or torch.float32
        labels = input_ids.masked_fill(token_type_ids == 0, -100)
        if self.kind == "spatialvla":
            intr = self.processor.dataset_intrinsics
            k = intr.get(self.unnorm_key, intr.get("default"))
            intrinsic = None if k is None else k.to(unit.device, dtype).expand(len(unit), 3, 3)
            return dict(input_ids=input_ids, pixel_values=unit.to(dtype), intrinsic=intrinsic,
                        attention_mask=attention_mask, token_type_ids=token_type_ids, labels=labels, use_cache=False)
        ip = self.processor.image_processor
        stacks = [(unit - torch.tensor(m, device=unit.device)[:, None, None]) / torch.tensor(s, device=unit.device)[
            :, None, None] for m, s in zip(ip.means, ip.stds)]
        return dict(input_ids=input_ids, pixel_values=torch.cat(stacks, 1).to(dtype), attention_mask=attention_mask,
                    labels=labels, use_cache=False)

    def align_logits(self, logits, n_tokens: int):
        """Logits at the token positions (OpenVLA's image patches sit after <bos>: cut them out)."""
        if logits.shape[1] == n_tokens:
            return logits
        return torch.cat([logits[:, :1], logits[:, 1 + logits.shape[1] - n_tokens:]], dim=1)

    # -- persistence beside a fine-tune's adapter (what VLATokenizer.save is for the PaliGemma path)
    def save(self, out_dir) -> None:
        meta = dict(kind=self.kind, unnorm_key=self.unnorm_key, stats=self.stats, action_chunk=self.action_chunk,
                    per_robot=self.per_robot)
        (Path(out_dir) / META_FILE).write_text(json.dumps(meta, indent=1))

    @staticmethod
    def read(path) -> dict | None:
        f = Path(path) / META_FILE
        return json.loads(f.read_text()) if f.exists() else None


class RemoteVLA(torch.nn.Module):
    """A remote-code base (or its PeftModel) behind the call ``train.train_loop`` makes:
    ``model(input_ids, pixel_values, attention_mask, token_type_ids).logits``, logits aligned with input_ids."""

    def __init__(self, inner, base: RemoteBase):
        super().__init__()
        self.inner, self.base = inner, base
        self.image_size_px = base.image_size

    @property
    def config(self):
        return self.inner.config

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the base's vision weights hold (its first floating-point weight that is not an adapter's: the
        patch convolution, which bitsandbytes never quantises): bf16 for a GPU base, 4-bit or not; fp32 on a CPU."""
        for name, p in self.inner.named_parameters():
            if p.is_floating_point() and "lora_" not in name:
                return p.dtype
        return torch.float32

    def forward(self, input_ids, pixel_values, attention_mask, token_type_ids, use_cache=False, **_):
        inputs = self.base.model_inputs(input_ids, pixel_values, attention_mask, token_type_ids, self.input_dtype)
        out = self.inner(**inputs)
        return SimpleNamespace(logits=self.base.align_logits(out.logits, input_ids.shape[1]))

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def save_pretrained(self, out_dir, **kwargs):
        self.inner.save_pretrained(out_dir, **kwargs)


def load_for_finetune(path, model_cfg, actions):
    """(model, RemoteBase) for ``train.finetune``: the base as loaded for training and its layout. Statistics: the
    base's own for ``model.unnorm_key`` when it has them (its pre-trained action tokens keep their meaning), else
    fit on ``actions`` (a dataset the base has not seen)."""
    model, processor = load_remote(path, model_cfg.base, model_cfg.quantization, model_cfg.attn_implementation)
    base = RemoteBase(model_cfg.base, processor, model.config, model_cfg.unnorm_key, fit_actions=actions)
    if model_cfg.action_chunk not in (1, base.action_chunk):
        raise ValueError(f"model.action_chunk={model_cfg.action_chunk} but the {model_cfg.base} base decodes chunks "
                         f"of {base.action_chunk}: set model.action_chunk {base.action_chunk}")
    return model, base


def load_finetuned_remote(model_dir, quantization: str | None = None, attn_implementation: str = "eager"):
    """(RemoteVLA with the adapter, meta) from a folder ``train.finetune`` wrote for a remote-code base."""
    from peft import PeftModel

    from .model import untie_policy_head

    model_dir = Path(model_dir)
    meta = json.loads((model_dir / "vla.json").read_text())
    saved = RemoteBase.read(model_dir)
    base_path = model_dir / meta["base"] if not Path(meta["base"]).is_absolute() else Path(meta["base"])
    base_path = base_path if base_path.exists() else meta["base"]
    model, processor = load_remote(base_path, saved["kind"], quantization or meta["quantization"],
                                   attn_implementation)
    untie_policy_head(model)  # the adapter trained head rows on an untied head (model.add_lora)
    model = PeftModel.from_pretrained(model, str(model_dir))
    base = RemoteBase(saved["kind"], processor, model.config, saved["unnorm_key"], stats=saved["stats"],
                      per_robot=saved.get("per_robot", False))
    return RemoteVLA(model, base), meta


def load_zero_shot(path, kind: str | None = None, unnorm_key: str = "", quantization: str = "none",
                   attn_implementation: str = "eager") -> RemoteVLA:
    """The pre-trained base as it is (the first row of the paper-scale table), with its own statistics."""
    kind = kind or detect_kind(path)
    model, processor = load_remote(path, kind, quantization, attn_implementation)
    return RemoteVLA(model, RemoteBase(kind, processor, model.config, unnorm_key))


# ------------------------------------------------------------------------------------------ acting
class RemotePolicy:
    """A remote-code VLA behind the Policy interface (``refinevla.policy``): ``reset`` / ``act`` and the batched
    ``reset_slot`` / ``act_batch`` (slots are decoded one after another). A decode writes the rationale (with
    ``reasoning``), then the chunk's action tokens, each restricted to the tokens of its position (SpatialVLA:
    translation, rotation, gripper; OpenVLA: the 256 bins), and un-normalises them with the unnorm key's
    statistics; the chunk is executed one control step at a time."""

    def __init__(self, vla: RemoteVLA, reasoning: bool = True, max_rationale_tokens: int = 96):
        self.vla, self.base = vla.eval(), vla.base
        self.tok = self.base  # text_ids / decode_text, as VLAPolicy.tok (refinevla.diagnostics reads them)
        self.reasoning, self.max_rationale_tokens = reasoning, max_rationale_tokens
        vocab = vla.get_output_embeddings().weight.shape[0]
        self.position_masks = []
        for lo, hi in self._position_ranges():
            m = torch.full((vocab,), float("-inf"))
            m[lo:hi] = 0.0
            self.position_masks.append(m)
        self.action_set = set(int(t) for t in self.base.action_ids)
        self.text_mask = torch.zeros(vocab)  # action tokens stay allowed: the first one ends the rationale
        banned = [t for t in (self.base.pad_id, self.base.eos_id, self.base.bos_id, self.base.image_id)
                  if t is not None and 0 <= t < vocab]
        self.text_mask[banned] = float("-inf")
        self.slots: dict[int, dict] = {}
        self.reset_slot(0, "")

    def _position_ranges(self):
        if self.base.kind == "spatialvla":
            at = self.base.processor.action_tokenizer
            t, r = at.translation_tokenizer, at.rotation_tokenizer
            g0 = r.token_end_idx + 1
            return [(t.token_start_idx, t.token_end_idx + 1), (r.token_start_idx, r.token_end_idx + 1), (g0, g0 + 2)]
        return [(int(self.base.action_ids[0]), int(self.base.action_ids[-1]) + 1)] * ACTION_DIM

    uses_state = False  # neither base reads the robot state (refinevla.backends.check_state)

    @property
    def base_kind(self) -> str:
        """The base's kind: SimplerEnv picks its own Google Robot gripper settings by it (backends.simpler)."""
        return self.base.kind

    def select_robot(self, robot: str) -> str:
        """Called by SimplerEnv's loop before a robot's episodes: that robot's statistics (``RemoteBase``)."""
        return self.base.select_robot(robot)

    @property
    def chunk(self) -> int:
        return self.base.action_chunk

    def rationale(self, slot: int = 0) -> str:
        """The rationale ``slot`` acted on at its last step (refinevla.rollout.current_rationale)."""
        return self.slots[slot]["last_rationale"] if slot in self.slots else ""

    @property
    def last_rationale(self) -> str:
        return self.slots[0]["last_rationale"]

    def decode(self, image, instruction: str, reasoning: bool) -> tuple[list[int], list[int]]:
        """(rationale ids, action ids) of one greedy decode."""
        from .model import model_device, preprocess_images

        base, device = self.base, model_device(self.vla)
        pixels = preprocess_images(np.asarray(image, np.uint8), base.image_size).to(device)
        ids = base.prompt_ids(instruction)
        n_prompt, rationale, actions = len(ids), [], []
        writing = bool(reasoning)
        with torch.inference_mode():
            while len(actions) < base.n_action_tokens:
                t = torch.as_tensor([ids], device=device)
                types = torch.zeros_like(t)
                types[:, n_prompt:] = 1
                logits = self.vla(input_ids=t, pixel_values=pixels, attention_mask=torch.ones_like(t),
                                  token_type_ids=types).logits[0, -1].float().cpu()
                if writing and len(rationale) < self.max_rationale_tokens:
                    nxt = int(torch.argmax(logits + self.text_mask))
                    if nxt not in self.action_set:
                        rationale.append(nxt)
                        ids.append(nxt)
                        continue
                writing = False
                mask = self.position_masks[len(actions) % base.tokens_per_action]
                nxt = int(torch.argmax(logits + mask))
                actions.append(nxt)
                ids.append(nxt)
        return rationale, actions

    def predict(self, image, instruction: str, state=None, reasoning: bool | None = None):
        """(rationale text, float32[chunk, 7] in the dataset's units) for one observation (state is not read)."""
        rationale, actions = self.decode(image, instruction, self.reasoning if reasoning is None else reasoning)
        return self.base.decode_text(rationale), self.base.ids_to_actions(actions)

    def reset(self, instruction: str) -> None:
        self.reset_slot(0, instruction)

    def act(self, obs: dict) -> np.ndarray:
        return self.act_batch([obs], [0])[0]

    def reset_slot(self, slot: int, instruction: str) -> None:
        from collections import deque

        self.slots[slot] = dict(instruction=instruction, queue=deque(), last_rationale="", step=0, decodes=0)

    def act_batch(self, obs_list: list[dict], slots: list[int]) -> list[np.ndarray]:
        if len(obs_list) != len(slots):
            raise ValueError(f"act_batch got {len(obs_list)} observations for {len(slots)} slots")
        out = []
        for obs, slot in zip(obs_list, slots):
            if int(slot) not in self.slots:
                self.reset_slot(int(slot), obs.get("instruction") or "")
            st = self.slots[int(slot)]
            if not st["queue"]:
                text, actions = self.predict(obs["image"], obs.get("instruction") or st["instruction"])
                st["queue"].extend(actions)
                st["last_rationale"], st["decodes"] = text, st["decodes"] + 1
            st["step"] += 1
            out.append(st["queue"].popleft())
        return out
