"""The policy interface every actor implements: the fine-tuned VLA, the scripted experts, a random policy.

An observation is a dict with at least ``image`` (uint8 HxWx3, upright), ``state`` (float32[8]) and
``instruction`` (str); simulator backends may add privileged keys (``objects``, ``phase``) that only
scripted experts read. An action is float32[7] in the schema convention of ``refinevla.schema``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from .schema import ACTION_DIM


@runtime_checkable
class Policy(Protocol):
    """reset() once per episode with the instruction, then act() once per control step."""

    def reset(self, instruction: str) -> None: ...

    def act(self, obs: dict) -> np.ndarray: ...


class RandomPolicy:
    """Uniform random deltas in [-1, 1] and a random gripper: the floor every success rate is read against."""

    def __init__(self, seed: int = 0, scale: float = 1.0):
        self.rng = np.random.default_rng(seed)
        self.scale = scale

    def reset(self, instruction: str) -> None:
        pass

    def act(self, obs: dict) -> np.ndarray:
        action = self.rng.uniform(-self.scale, self.scale, ACTION_DIM).astype(np.float32)
        action[6] = float(self.rng.random() < 0.5)
        return action


class ZeroPolicy:
    """Does nothing, at no cost: what the harness-overhead benchmark measures against."""

    def reset(self, instruction: str) -> None:
        pass

    def act(self, obs: dict) -> np.ndarray:
        action = np.zeros(ACTION_DIM, np.float32)
        action[6] = 1.0
        return action


# ------------------------------------------------------------------------------------ the VLA policy
class VLAPolicy:
    """A fine-tuned (or base) VLA behind the Policy interface.

    ``predict`` decodes greedily: with ``reasoning`` it first writes a rationale (any text token) until it
    emits ``ACTION:``, then exactly 7 tokens restricted to the action bins; without, ``ACTION:`` is forced at
    once. ``reason_every`` re-writes the rationale only every N control steps and reuses it in between
    (writing ~60 tokens per step is the main cost of reasoning at inference on a CPU).
    """

    def __init__(self, model, tokenizer, reasoning: bool = True, reason_every: int = 1,
                 max_rationale_tokens: int = 96):
        import torch

        self.model, self.tok = model.eval(), tokenizer
        self.reasoning, self.reason_every, self.max_rationale_tokens = reasoning, max(1, reason_every), max_rationale_tokens
        vocab = model.get_output_embeddings().weight.shape[0]
        self.action_mask = torch.full((vocab,), float("-inf"))
        self.action_mask[torch.as_tensor(tokenizer.action_ids)] = 0.0
        self.text_mask = torch.zeros(vocab)
        banned = list(tokenizer.action_ids) + list(tokenizer.state_ids) + [tokenizer.image_id, tokenizer.pad_id,
                                                                             tokenizer.bos_id]
        self.text_mask[torch.as_tensor(banned)] = float("-inf")
        self.instruction, self.step, self.rationale_ids, self.last_rationale = "", 0, [], ""

    def reset(self, instruction: str) -> None:
        self.instruction, self.step, self.rationale_ids, self.last_rationale = instruction, 0, [], ""

    def act(self, obs: dict) -> np.ndarray:
        reuse = self.reasoning and self.step % self.reason_every != 0
        text, action, ids, _ = self._decode(obs["image"], obs.get("instruction") or self.instruction, obs["state"],
                                            self.reasoning, self.rationale_ids if reuse else None)
        self.rationale_ids, self.last_rationale, self.step = ids, text, self.step + 1
        return action

    def predict(self, image, instruction: str, state, reasoning: bool | None = None):
        """(rationale_text, action float32[7]) for one observation."""
        text, action, _, _ = self._decode(image, instruction, state,
                                          self.reasoning if reasoning is None else reasoning, None)
        return text, action

    def generate_ids(self, image, instruction: str, state, reasoning: bool | None = None, rationale_ids=None):
        """(rationale_ids, action_ids) of the greedy decoding (the attention stage teacher-forces them).
        ``rationale_ids``: act after this rationale (e.g. the teacher's) instead of writing one."""
        reasoning = self.reasoning if reasoning is None else reasoning
        if rationale_ids is not None:
            reasoning, rationale_ids = True, list(rationale_ids)[:self.max_rationale_tokens]
        _, _, rationale, action_ids = self._decode(image, instruction, state, reasoning, rationale_ids)
        return [int(t) for t in rationale], [int(t) for t in action_ids]

    def _decode(self, image, instruction, state, reasoning, forced_rationale):
        import torch
        from transformers import DynamicCache

        from .model import image_size, model_device, num_image_tokens, preprocess_images

        device = model_device(self.model)
        prompt = self.tok.prompt_ids(instruction, np.asarray(state), num_image_tokens(self.model))
        pixels = preprocess_images(np.asarray(image), image_size(self.model)).to(device)
        cache = DynamicCache()

        def feed(ids, first=False, token_type=None):
            kwargs = dict(pixel_values=pixels, token_type_ids=token_type) if first else {}
            out = self.model(input_ids=torch.as_tensor([ids], device=device), cache=cache, use_cache=True, **kwargs)
            return out.logits[0, -1].float().cpu()

        def feed_prefix(target):
            """One pass over the prompt (token type 0) and the known target tokens (type 1): the training mask."""
            types = torch.tensor([[0] * len(prompt) + [1] * len(target)], dtype=torch.long, device=device)
            return feed(prompt + target, first=True, token_type=types)

        with torch.no_grad():
            if reasoning and forced_rationale is None:  # write the rationale, token by token, until ACTION:
                rationale = []
                logits = feed_prefix([])
                while len(rationale) < self.max_rationale_tokens:
                    nxt = int(torch.argmax(logits + self.text_mask))
                    if nxt == self.tok.marker_id:
                        break
                    rationale.append(nxt)
                    logits = feed([nxt])
                logits = feed([self.tok.marker_id])
            else:  # no rationale, or one reused from an earlier step: a single pass up to ACTION:
                rationale = list(forced_rationale or []) if reasoning else []
                logits = feed_prefix(rationale + [self.tok.marker_id])
            action_ids = []
            for _ in range(7):
                nxt = int(torch.argmax(logits + self.action_mask))
                action_ids.append(nxt)
                if len(action_ids) < 7:
                    logits = feed([nxt])
        return self.tok.decode_text(rationale), self.tok.ids_to_action(action_ids), rationale, action_ids


class TeacherRationalePolicy:
    """A reasoning VLA that acts after the privileged teacher's rationale instead of writing its own: an oracle,
    for simulation only (the teacher reads the simulator's object poses, and a shadow scripted expert, fed the
    policy's own observations, tracks the task phase). It measures in closed loop what the model's actions are
    worth when its rationale is right, i.e. how much of the gap to the baseline its own rationales cause."""

    def __init__(self, vla: VLAPolicy):
        from .experts import ExpertPolicy

        self.vla, self.shadow, self.last_rationale = vla, ExpertPolicy(), ""

    def reset(self, instruction: str) -> None:
        self.vla.reset(instruction)
        self.shadow.reset(instruction)
        self.last_rationale = ""

    def act(self, obs: dict) -> np.ndarray:
        from .teacher import privileged_rationale, render_rationale

        if not obs.get("objects"):
            raise ValueError("TeacherRationalePolicy needs the simulator's privileged 'objects' in the observation "
                             "(robosuite backend only)")
        self.shadow.act(obs)  # the phase the expert would be in on this trajectory, as in the training data
        self.last_rationale = render_rationale(privileged_rationale(obs["state"], obs["objects"], self.shadow.phase))
        _, action_ids = self.vla.generate_ids(obs["image"], obs.get("instruction") or self.vla.instruction,
                                              obs["state"], rationale_ids=self.vla.tok.text_ids(self.last_rationale))
        return self.vla.tok.ids_to_action(action_ids)


def load_vla(model_dir: str | Path, quantization: str | None = None, attn_implementation: str = "eager",
             dequantize_on_cpu: bool = True):
    """(model, tokenizer, meta) from a folder written by train.pretrain_base or train.finetune.

    A 4-bit base is loaded exactly as it was trained; on a CPU its weights are then dequantized once for
    inference (``model.dequantize_for_inference``: the same numbers, twice as fast to decode)."""
    import json

    from .model import load_base
    from .tokens import VLATokenizer

    model_dir = Path(model_dir)
    meta_file = model_dir / "vla.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{meta_file} not found: {model_dir} is not a refinevla model folder")
    meta = json.loads(meta_file.read_text())
    tok = VLATokenizer.load(model_dir)
    if meta["kind"] == "base":
        return load_base(model_dir, quantization or "none", attn_implementation), tok, meta
    import torch
    from peft import PeftModel

    base = (model_dir / meta["base"]) if not Path(meta["base"]).is_absolute() else Path(meta["base"])
    base = base if base.exists() else meta["base"]  # a hub id
    model = load_base(base, quantization or meta["quantization"], attn_implementation)
    if tok.vocab_size > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(tok.vocab_size)
    model = PeftModel.from_pretrained(model, str(model_dir))
    if dequantize_on_cpu and not torch.cuda.is_available():
        from .model import dequantize_for_inference

        dequantize_for_inference(model)
    return model, tok, meta


def load_policy(model_dir: str | Path, reasoning: bool | None = None, reason_every: int = 1,
                threads: int | None = None, teacher_rationale: bool = False):
    """A ready VLAPolicy; reasoning defaults to whether the model was trained with rationales.
    ``teacher_rationale``: act after the privileged teacher's rationale (TeacherRationalePolicy)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    model, tok, meta = load_vla(model_dir)
    if reasoning is None:
        reasoning = bool(meta.get("use_rationale", False))
    policy = VLAPolicy(model, tok, reasoning=reasoning, reason_every=reason_every)
    return TeacherRationalePolicy(policy) if teacher_rationale else policy
