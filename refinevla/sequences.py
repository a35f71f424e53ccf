"""Training sequences, one layout for every base and every stage: a row's prompt, rationale and action tokens
joined into (input_ids, token_type_ids, part), and a set of rows padded into the arrays ``train.train_loop`` reads.

Layout of one row (k = the action chunk; the tiny base's tokenizer adds an ``ACTION:`` marker, a remote base's
prompt ends where its actions begin, so it has none):

    [prompt: image tokens, instruction, state] | [rationale tokens] [ACTION:] [action tokens]
    token_type_ids: 0 ....................... | 1 .............................................
    part:           PREFIX (no loss)          | REASON ...................... | ACTION .......

``position="after"`` (ECoT-Lite's reasoning after the action) writes ``[ACTION:] [action tokens] [rationale]``: the
actions cannot attend to the rationale. The marker feeds L_reasoning (when to stop reasoning) after a rationale; with
no rationale before it, it is forced and has no loss. The grounding questions use the same layout with the answer as
the rationale and no actions.

Used by refinevla.train (the tiny base), refinevla.bases (SpatialVLA, OpenVLA) and refinevla.grounding.
"""
from __future__ import annotations

import numpy as np

PREFIX, REASON, ACTION = 0, 1, 2  # which loss a target token feeds (PREFIX: none)
ARRAYS = ("input_ids", "token_type_ids", "part", "attention_mask")


def join(prompt: list[int], reason: list[int], actions: list[int], position: str = "before",
         marker: int | None = None) -> tuple[list[int], list[int], list[int]]:
    """(input_ids, token_type_ids, part) of one row from its prompt, rationale and action token ids (module
    docstring); ``marker``: the id written between the rationale and the actions, or None."""
    m = [] if marker is None else [marker]
    if position == "after":
        target = m + actions + reason
        part = [PREFIX] * len(m) + [ACTION] * len(actions) + [REASON] * len(reason)
    elif position == "before":
        target = reason + m + actions
        part = [REASON] * len(reason) + [REASON if reason else PREFIX] * len(m) + [ACTION] * len(actions)
    else:
        raise ValueError(f"rationale position {position!r}: expected 'before' or 'after'")
    return prompt + target, [0] * len(prompt) + [1] * len(target), [PREFIX] * len(prompt) + part


def pad(seqs, images, pad_id: int, n_rows: int | None = None) -> dict:
    """Rows from ``join`` (and their uint8 images) as right-padded arrays: input_ids (``pad_id``), token_type_ids
    (1), part (PREFIX), attention_mask (0 on padding), images, and n_rows (the frames; default: every row)."""
    length, n = max(len(s[0]) for s in seqs), len(seqs)
    out = dict(input_ids=np.full((n, length), pad_id, np.int64), token_type_ids=np.ones((n, length), np.int64),
               part=np.full((n, length), PREFIX, np.int64), attention_mask=np.zeros((n, length), np.int64))
    for i, (ids, tt, pt) in enumerate(seqs):
        k = len(ids)
        out["input_ids"][i, :k], out["token_type_ids"][i, :k], out["part"][i, :k] = ids, tt, pt
        out["attention_mask"][i, :k] = 1
    out["images"] = np.stack([np.asarray(im, np.uint8) for im in images])
    out["n_rows"] = n if n_rows is None else n_rows
    return out


def concat(*encoded: dict, pad_id: int = 0) -> dict:
    """Several padded sets (``pad``) as one, right-padded to the longest row: the co-training mixture of the base's
    second stage (each set's first n_rows rows)."""
    length = max(p["input_ids"].shape[1] for p in encoded)
    out = {}
    for key, fill in zip(ARRAYS, (pad_id, 1, PREFIX, 0)):
        out[key] = np.concatenate([np.pad(p[key][:p["n_rows"]], ((0, 0), (0, length - p[key].shape[1])),
                                          constant_values=fill) for p in encoded])
    out["images"] = np.concatenate([p["images"][:p["n_rows"]] for p in encoded])
    out["n_rows"] = len(out["input_ids"])
    return out
