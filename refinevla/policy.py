"""The policy interface every actor implements: the fine-tuned VLA, the scripted experts, a random policy.

An observation is a dict with at least ``image`` (uint8 HxWx3, upright), ``state`` (float32[8]) and
``instruction`` (str); simulator backends may add privileged keys (``objects``, ``phase``) that only
scripted experts read (and the teacher-rationale oracle). An action is float32[7] in the schema convention of
``refinevla.schema``.

A policy may also act for several environments at once (the evaluation harness steps them in lockstep):
``reset_slot(slot, instruction)`` starts an episode in environment slot ``slot`` and
``act_batch(obs_list, slots) -> list of actions`` acts for the given slots in one call. ``VLAPolicy`` and
``TeacherRationalePolicy`` implement both (one batched forward pass per decoding step); for a policy without
them the harness builds one instance per slot.
"""
from __future__ import annotations

from collections import deque
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
class _SlotState:
    """What a VLA policy remembers about one environment slot between control steps."""

    __slots__ = ("instruction", "queue", "rationale_ids", "last_rationale", "step", "decodes")

    def __init__(self, instruction: str = ""):
        self.instruction, self.queue = instruction, deque()
        self.rationale_ids, self.last_rationale, self.step, self.decodes = [], "", 0, 0


class VLAPolicy:
    """A fine-tuned (or base) VLA behind the Policy interface, batched over environment slots.

    Decoding is greedy: with ``reasoning`` it first writes a rationale (any text token) until it emits
    ``ACTION:`` (or ``max_rationale_tokens`` are written), then exactly ``7 * tok.action_chunk`` tokens restricted
    to the action bins; without, ``ACTION:`` is forced at once. A decode yields a chunk of actions, executed one
    control step at a time from a per-slot queue; the next decode (a new rationale first, for a reasoning
    model) happens when the queue is empty.

    Batched decoding (``act_batch``): the slots that need a decode are decoded together, one forward pass per
    decoding step over all of them, with one KV cache holding every slot's sequence. Sequences are LEFT-padded
    (pad token, ``attention_mask`` 0, token type 0) so that they all end in the same column and each step appends
    one column; ``position_ids`` are explicit (1-indexed over each slot's real tokens, PaliGemma's convention), so
    a slot sees exactly the positions and keys of its unbatched decode. A slot that has all its action tokens
    leaves the batch (its rows are dropped from the cache); a slot still writing its rationale goes on while the
    others already emit action bins. The result equals the unbatched decode, token for token (tested).
    """

    def __init__(self, model, tokenizer, reasoning: bool = True, max_rationale_tokens: int = 96):
        import torch

        self.model, self.tok = model.eval(), tokenizer
        self.reasoning, self.max_rationale_tokens = reasoning, max_rationale_tokens
        vocab = model.get_output_embeddings().weight.shape[0]
        self.action_mask = torch.full((vocab,), float("-inf"))
        self.action_mask[torch.as_tensor(tokenizer.action_ids)] = 0.0
        self.text_mask = torch.zeros(vocab)
        banned = list(tokenizer.action_ids) + list(tokenizer.state_ids) + [tokenizer.image_id, tokenizer.pad_id,
                                                                             tokenizer.bos_id]
        self.text_mask[torch.as_tensor(banned)] = float("-inf")
        self.slots: dict[int, _SlotState] = {0: _SlotState()}

    # -- the action chunk
    @property
    def chunk(self) -> int:
        """Actions per decode (the tokenizer's ``action_chunk``; 1 when it has none)."""
        return max(1, int(getattr(self.tok, "action_chunk", 1) or 1))

    @property
    def n_action_tokens(self) -> int:
        return ACTION_DIM * self.chunk

    def ids_to_actions(self, action_ids) -> np.ndarray:
        """float32[chunk, 7] of the ``7 * chunk`` action ids of one decode."""
        bins = self.tok.ids_to_bins([int(t) for t in action_ids]).reshape(-1, ACTION_DIM)  # row by row, as trained
        return np.asarray(self.tok.action_stats.decode(bins), np.float32)

    # -- slot 0 is the single-environment Policy interface
    @property
    def instruction(self) -> str:
        return self.slots[0].instruction

    @property
    def step(self) -> int:
        return self.slots[0].step

    @property
    def rationale_ids(self) -> list[int]:
        return self.slots[0].rationale_ids

    @property
    def last_rationale(self) -> str:
        return self.slots[0].last_rationale

    def reset(self, instruction: str) -> None:
        self.reset_slot(0, instruction)

    def act(self, obs: dict) -> np.ndarray:
        return self.act_batch([obs], [0])[0]

    # -- the batched interface
    def reset_slot(self, slot: int, instruction: str) -> None:
        """A new episode in ``slot``: forget its queued actions and rationale."""
        self.slots[slot] = _SlotState(instruction)

    def act_batch(self, obs_list: list[dict], slots: list[int], rationale_fn=None) -> list[np.ndarray]:
        """One action per (observation, slot): slots whose action queue is empty are decoded together (one
        batched forward per decoding step), then every slot pops its next action.

        ``rationale_fn(obs, slot) -> token ids``: act after this rationale instead of writing one (the oracle).
        Nothing is changed when decoding raises."""
        if len(obs_list) != len(slots):
            raise ValueError(f"act_batch got {len(obs_list)} observations for {len(slots)} slots")
        states = [self.slots.setdefault(int(s), _SlotState(obs.get("instruction") or ""))
                  for obs, s in zip(obs_list, slots)]
        need = [k for k, st in enumerate(states) if not st.queue]
        if need:
            items = []
            for k in need:
                obs, st = obs_list[k], states[k]
                forced = None
                if rationale_fn is not None:
                    forced = list(rationale_fn(obs, int(slots[k])))[:self.max_rationale_tokens]
                items.append((obs["image"], obs.get("instruction") or st.instruction, obs["state"],
                              self.reasoning or forced is not None, forced))
            decoded = self._decode_many(items)
            for k, (rationale, action_ids) in zip(need, decoded):
                st = states[k]
                st.queue.extend(self.ids_to_actions(action_ids))
                st.rationale_ids, st.last_rationale = rationale, self.tok.decode_text(rationale)
                st.decodes += 1
        out = []
        for st in states:
            st.step += 1
            out.append(st.queue.popleft())
        return out

    # -- one-off decodes
    def predict(self, image, instruction: str, state, reasoning: bool | None = None):
        """(rationale_text, action) for one observation: action is float32[7], or float32[chunk, 7] when the
        model emits action chunks."""
        text, actions, _, _ = self._decode(image, instruction, state,
                                           self.reasoning if reasoning is None else reasoning, None)
        return text, actions[0] if self.chunk == 1 else actions

    def generate_ids(self, image, instruction: str, state, reasoning: bool | None = None, rationale_ids=None):
        """(rationale_ids, action_ids) of the greedy decoding, all ``7 * chunk`` action ids (the attention stage
        teacher-forces them). ``rationale_ids``: act after this rationale (e.g. the teacher's) instead of writing
        one."""
        reasoning = self.reasoning if reasoning is None else reasoning
        if rationale_ids is not None:
            reasoning, rationale_ids = True, list(rationale_ids)[:self.max_rationale_tokens]
        _, _, rationale, action_ids = self._decode(image, instruction, state, reasoning, rationale_ids)
        return [int(t) for t in rationale], [int(t) for t in action_ids]

    def _decode(self, image, instruction, state, reasoning, forced_rationale):
        """(rationale text, actions float32[chunk, 7], rationale ids, action ids) of one observation: the
        batched decoder with a batch of one."""
        rationale, action_ids = self._decode_many([(image, instruction, state, reasoning, forced_rationale)])[0]
        return self.tok.decode_text(rationale), self.ids_to_actions(action_ids), rationale, action_ids

    def _decode_many(self, items) -> list[tuple[list[int], list[int]]]:
        """Greedy decoding of several observations at once: ``items`` are (image, instruction, state, reasoning,
        forced_rationale); returns (rationale_ids, action_ids) per item.

        The first pass holds each row's prompt (token type 0) and its known target tokens (type 1: a forced or
        absent rationale and ACTION:), as in training; a row that writes its rationale starts with the prompt
        only. Then every step feeds one token per row still decoding.
        """
        import torch
        from transformers import DynamicCache

        from .model import image_size, model_device, num_image_tokens, preprocess_images

        tok, device = self.tok, model_device(self.model)
        n_image, n_act, max_r = num_image_tokens(self.model), self.n_action_tokens, self.max_rationale_tokens
        prefixes, n_prompt, writing, rationales = [], [], [], []
        for image, instruction, state, reasoning, forced in items:
            prompt = tok.prompt_ids(instruction, np.asarray(state), n_image)
            write = bool(reasoning) and forced is None
            rationale = [] if write or not reasoning else [int(t) for t in forced]
            prefixes.append(prompt + ([] if write else rationale + [tok.marker_id]))
            n_prompt.append(len(prompt))
            writing.append(write)
            rationales.append(rationale)
        b, width = len(items), max(len(p) for p in prefixes)
        ids = torch.full((b, width), int(tok.pad_id), dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        types = torch.zeros((b, width), dtype=torch.long)  # pads: 0 (they are masked out as keys anyway)
        for i, p in enumerate(prefixes):
            pad = width - len(p)
            ids[i, pad:], mask[i, pad:] = torch.as_tensor(p), 1
            types[i, pad + n_prompt[i]:] = 1
        positions = mask.cumsum(-1).clamp(min=1)  # 1-indexed over the real tokens; pads get 1 (unused)
        pixels = preprocess_images(np.stack([np.asarray(it[0], np.uint8) for it in items]),
                                   image_size(self.model)).to(device)
        fed = [len(p) for p in prefixes]
        cache = DynamicCache()
        actions: list[list[int]] = [[] for _ in items]
        with torch.inference_mode():
            out = self.model(input_ids=ids.to(device), pixel_values=pixels, attention_mask=mask.to(device),
                             position_ids=positions.to(device), token_type_ids=types.to(device), cache=cache,
                             use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1].float().cpu()
            rows = list(range(b))  # the items in the cache, in its batch order
            while True:
                # greedy choice of every row at once: text tokens while it writes its rationale, else action bins
                restrict = torch.stack([self.text_mask if writing[i] else self.action_mask for i in rows])
                best = torch.argmax(logits + restrict, dim=-1).tolist()
                keep, nxt_ids = [], []
                for r, i in enumerate(rows):
                    if writing[i]:
                        nxt = best[r] if len(rationales[i]) < max_r else tok.marker_id
                        if nxt == tok.marker_id:
                            writing[i] = False
                        else:
                            rationales[i].append(nxt)
                    else:
                        nxt = best[r]
                        actions[i].append(nxt)
                        if len(actions[i]) == n_act:
                            continue  # done: the last action token is never fed back
                    keep.append(r)
                    nxt_ids.append(nxt)
                if not keep:
                    break
                if len(keep) < len(rows):
                    index = torch.as_tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    mask = mask[keep]
                    rows = [rows[r] for r in keep]
                mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
                positions = torch.as_tensor([[fed[i] + 1] for i in rows])
                for i in rows:
                    fed[i] += 1
                out = self.model(input_ids=torch.as_tensor([[t] for t in nxt_ids], device=device),
                                 attention_mask=mask.to(device), position_ids=positions.to(device), cache=cache,
                                 use_cache=True, logits_to_keep=1)
                logits = out.logits[:, -1].float().cpu()
        return [(rationales[i], actions[i]) for i in range(b)]


class TeacherRationalePolicy:
    """A reasoning VLA that acts after the privileged teacher's rationale instead of writing its own: an oracle,
    for simulation only (the teacher reads the simulator's object poses in ``obs["objects"]`` and describes the
    current state). It measures in closed loop what the model's actions are worth when its rationale is right,
    i.e. how much of the gap to the baseline its own rationales cause. Batched like ``VLAPolicy``; with action
    chunks the rationale is the one of the observation where the chunk is decoded."""

    def __init__(self, vla: VLAPolicy):
        self.vla, self.last_rationale, self.slot_rationale = vla, "", {}

    @property
    def chunk(self) -> int:
        return self.vla.chunk

    def reset(self, instruction: str) -> None:
        self.reset_slot(0, instruction)

    def act(self, obs: dict) -> np.ndarray:
        return self.act_batch([obs], [0])[0]

    def reset_slot(self, slot: int, instruction: str) -> None:
        self.vla.reset_slot(slot, instruction)
        self.slot_rationale[slot] = ""
        if slot == 0:
            self.last_rationale = ""

    def act_batch(self, obs_list: list[dict], slots: list[int]) -> list[np.ndarray]:
        if any(not obs.get("objects") for obs in obs_list):
            raise ValueError("TeacherRationalePolicy needs the simulator's privileged 'objects' in the observation "
                             "(robosuite backend only)")
        return self.vla.act_batch(obs_list, slots, rationale_fn=self._rationale_ids)

    def _rationale_ids(self, obs: dict, slot: int) -> list[int]:
        from .teacher import privileged_rationale, render_rationale

        text = render_rationale(privileged_rationale(obs["state"], obs["objects"]))
        self.slot_rationale[slot] = self.last_rationale = text
        return self.vla.tok.text_ids(text)


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

    from .model import load_finetuned

    base = (model_dir / meta["base"]) if not Path(meta["base"]).is_absolute() else Path(meta["base"])
    base = base if base.exists() else meta["base"]  # a hub id
    # the base as in training (grown to the vocabulary the same way, its head untied when head rows were trained)
    model = load_finetuned(base, model_dir, quantization or meta["quantization"], attn_implementation,
                           vocab_size=tok.vocab_size)
    if dequantize_on_cpu and not torch.cuda.is_available():
        from .model import dequantize_for_inference

        dequantize_for_inference(model)
    return model, tok, meta


def load_policy(model_dir: str | Path, reasoning: bool | None = None, threads: int | None = None,
                teacher_rationale: bool = False, max_rationale_tokens: int = 96, unnorm_key: str = ""):
    """A ready VLAPolicy; reasoning defaults to whether the model was trained to write its rationale before
    acting. ``teacher_rationale``: act after the privileged teacher's rationale (TeacherRationalePolicy).

    A pre-trained VLA run by its own remote code (SpatialVLA, OpenVLA: ``refinevla.bases``) gives a RemotePolicy:
    a fine-tune of one (its folder holds remote_base.json), or the base itself, zero-shot, when ``model_dir`` is its
    checkpoint (local folder or hub id; ``unnorm_key``: the dataset statistics its actions are un-normalised with)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    remote = _remote_policy(model_dir, reasoning, teacher_rationale, max_rationale_tokens, unnorm_key)
    if remote is not None:
        return remote
    model, tok, meta = load_vla(model_dir)
    if reasoning is None:
        reasoning = bool(meta.get("reasons_at_inference", meta.get("use_rationale", False)))
    policy = VLAPolicy(model, tok, reasoning=reasoning, max_rationale_tokens=max_rationale_tokens)
    return TeacherRationalePolicy(policy) if teacher_rationale else policy


def _remote_policy(model_dir, reasoning, teacher_rationale: bool, max_rationale_tokens: int, unnorm_key: str):
    """The RemotePolicy of a remote-code base or of its fine-tune; None for the PaliGemma path."""
    from .bases import RemoteBase, RemotePolicy, detect_kind, load_finetuned_remote, load_zero_shot

    finetuned = RemoteBase.read(model_dir) is not None
    if not finetuned and ((Path(model_dir) / "vla.json").exists() or detect_kind(model_dir) == "paligemma"):
        return None
    if teacher_rationale:
        raise ValueError(f"teacher_rationale=True: the teacher-rationale oracle needs a PaliGemma-path model "
                         f"(robosuite), not the remote-code base in {model_dir}")
    if finetuned:
        vla, meta = load_finetuned_remote(model_dir)
        if reasoning is None:
            reasoning = bool(meta.get("reasons_at_inference", meta.get("use_rationale", False)))
    else:
        vla = load_zero_shot(model_dir, unnorm_key=unnorm_key)
    return RemotePolicy(vla, reasoning=bool(reasoning), max_rationale_tokens=max_rationale_tokens)
