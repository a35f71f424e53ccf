"""Visual grounding of a VLA: does the model locate the object its prompt names, on still frames it never saw?

    .venv/bin/python benchmarks/grounding.py          # writes results/grounding.json; ~8 min on one idle core
    .venv/bin/python benchmarks/grounding.py --train-from none --checkpoint data/default/train/refinevla/model
    .venv/bin/python benchmarks/grounding.py --checkpoint none --train-from scratch --steps 1500 --lr 1e-3

Frames: initial scenes of ``pick_cube`` (two cubes, one on each side of the table; the seed fixes which cube is on
the left, so consecutive seeds give both colours on both sides) with the arm's joints moved by N(0, 0.1) rad
(``refinevla.grounding.perturbed_frame``), on seeds no other part of the project uses (``TRAIN_SEED_OFFSET``,
``HELDOUT_SEED_OFFSET`` below). A frame is kept when both cubes are visible (>= 4 pixels) and each lies at least
1 cm (rounded) to the left or right of the gripper; every kept frame is asked about both cubes: a counterfactual
pair, the same pixels and state under two prompts.

Two modes, each optional:

- readout (``--checkpoint DIR``, repeatable; default the released base ``models/tiny-base``; ``none``: skip):
  greedy answers of the checkpoint, no training, to the grounding question "where is the red cube" on the held-out
  frames, scored by ``refinevla.grounding.score`` (side accuracy, within 1 cm on every axis, MAE per axis in cm),
  split by the colour named, by the side the cube is on and by how far to the side it lies (``DISTANCE_BINS``);
  counterfactual-pair consistency (both answers of a
  frame on the right side; both within 1 cm); whether it reads its state tokens (``state_swaps``: the side
  accuracy with the position, the orientation or the whole state taken from another frame, ``STATE_SWAPS``); the
  feature spread of its image features; with several checkpoints, each against the first on the same questions
  (``paired``: the questions only one of them gets right, McNemar's exact test); and a linear probe of
  those features (``--feature-probe``, on by default: one logistic regression per cube fitted on the training
  frames, scored per distance bin), which says whether a side the model gets wrong is in its image features at
  all. For a released base, after each later stage, and for every fine-tune.
- train (``--train-from scratch|DIR``, repeatable; default ``scratch`` and the release; ``none``: skip): a fresh
  copy of the model per question, the whole model trained (AdamW, linear warm-up, cosine decay) on one-token
  answers; held-out accuracy (the answer scored between the question's two words) and feature spread every
  ``--eval-every`` steps. The prompt names a cube ("where is the red cube", words of the release's vocabulary; it
  has no "which", "side" or "colour"); the three questions differ only in the answer:
    task         the side of the named cube relative to the gripper  -> left / right (needs text and image)
    text_only    the colour the prompt names                         -> red / green  (image irrelevant)
    vision_only  the side of the red cube, whatever the prompt names -> left / right (text irrelevant)
  ``scratch`` is a randomly initialised model of ``--size`` (default: the release's size) with the release's
  tokenizer.

- ceiling (``--ceiling``, on by default): the geometric ceiling of the question, no model involved: a logistic
  regression (cubic features) from each cube's true pixel position (its segmentation centroid) to its side, alone,
  with the gripper's true orientation, and with the orientation as the release's state tokens give it
  (``geometric_ceiling``). The wrist camera turns with the arm, so the side of a cube next to the gripper is not in
  the pixels alone; this says what a perfect localiser could reach from the inputs the model has.

Feature spread: the image features the decoder reads (vision tower + projector, ``get_image_features``) of the
held-out frames, [frames, tokens, dims]: the standard deviation over frames, averaged over tokens and dims, divided
by the mean absolute feature. 0 means every frame gives the same features: the decoder cannot tell frames apart.

Time at the default size (one torch thread), with both releases read out (the committed result:
``--checkpoint models/tiny-base --checkpoint models/tiny-vla``): 6.1 min of CPU time, 6.1 min of wall time beside
another busy job on 2 cores (2026-12-07, results/grounding.json); the result file records both (``wall_s``,
``cpu_s``, per run and the median step).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

RELEASE = "models/tiny-base"
TASK = "pick_cube"
#: Seeds of this benchmark, outside every other range (refinevla.data's seed table: fine-tuning demos 0-9_999,
#: evaluation 10_000-29_999 (development 10_000-11_999 / 20_000-21_999), pre-training demos 30_000-39_999;
#: refinevla.grounding: training frames 40_000-44_999, the probe 45_000-49_999 (its declared maximum, incl. the
#: release's vocabulary frames 49_000-49_007)): training frames 50_000-50_999, held-out frames 51_000-51_999.
TRAIN_SEED_OFFSET, HELDOUT_SEED_OFFSET, MAX_SEEDS = 50_000, 51_000, 1_000
NAMES = ("red cube", "green cube")
QUESTIONS = {  # question -> (its two answer words, what it needs)
    "task": (("left", "right"), "the side of the named cube (text and image)"),
    "text_only": (("red", "green"), "the colour named (control: text only)"),
    "vision_only": (("left", "right"), "the side of the red cube whatever is named (control: image only)"),
}
PROMPTS = {"where": "where is the {name}", "instruction": "pick up the {name}"}


# ------------------------------------------------------------------------------------------------ frames and rows
#: how far the named object lies to the side of the gripper (|y| in whole cm, as the answer states it): the
#: readout's accuracy per bin says whether the side errors are near the gripper's plane or spread over the table
DISTANCE_BINS = {"1-2 cm": (1, 2), "3-5 cm": (3, 5), "6-10 cm": (6, 10), "11+ cm": (11, 10_000)}
#: the state dims the readout swaps between frames (refinevla.schema: end-effector xyz 0-2, roll/pitch/yaw 3-5, pad
#: and gripper 6-7): if the side accuracy drops when a frame is asked about with another frame's orientation, the
#: model reads the orientation from its state tokens
STATE_SWAPS = {"position": (0, 1, 2), "orientation": (3, 4, 5), "all": tuple(range(8))}


def distance_bin(row: dict) -> str | None:
    """The ``DISTANCE_BINS`` name of a row's object (None: less than 1 cm to the side, never a pair row)."""
    from refinevla.grounding import true_cm

    far = abs(true_cm(row["offset_m"])[1])
    return next((name for name, (lo, hi) in DISTANCE_BINS.items() if lo <= far <= hi), None)


def side_of(offset_m) -> str | None:
    """"left" / "right" of the gripper as the teacher states it (y in whole cm, + is left), None below 1 cm."""
    from refinevla.grounding import true_cm

    y = true_cm(offset_m)[1]
    return None if y == 0 else "left" if y > 0 else "right"


def pair_rows(frame: dict, index: int, prompt: str = "where", min_pixels: int = 4) -> list[dict]:
    """The counterfactual pair of one frame: one row per cube (red first), or [] when the frame cannot be asked
    about both (a cube out of view, or less than 1 cm to either side of the gripper)."""
    from refinevla.grounding import question
    from refinevla.teacher.privileged import describe_offset

    objects = {o["name"]: o for o in frame["objects"]}
    if any(n not in objects or objects[n].get("pixels", min_pixels) < min_pixels for n in NAMES):
        return []
    eef = np.asarray(frame["state"], np.float64)[:3]
    offsets = {n: np.asarray(objects[n]["pos"], np.float64) - eef for n in NAMES}
    sides = {n: side_of(offsets[n]) for n in NAMES}
    if None in sides.values():
        return []
    return [dict(image=frame["image"], state=np.asarray(frame["state"], np.float32), frame=index,
                 seed=frame.get("seed"), name=n, colour=n.split()[0], prompt=PROMPTS[prompt].format(name=n),
                 side=sides[n], red_side=sides["red cube"], offset_m=offsets[n],
                 question=question(n), answer=describe_offset(n, offsets[n])) for n in NAMES]


def answer_word(row: dict, which: str) -> str:
    """The one-word answer of ``row`` to question ``which`` (QUESTIONS)."""
    if which == "task":
        return row["side"]
    if which == "text_only":
        return row["colour"]
    if which == "vision_only":
        return row["red_side"]
    raise ValueError(f"unknown question {which!r}; known: {list(QUESTIONS)}")


def collect_frames(n: int, offset: int, prompt: str, image_size: int = 64, arm_noise: float = 0.1,
                   min_pixels: int = 4, desc: str = "frames") -> tuple[list[dict], dict]:
    """The first ``n`` usable frames (pair_rows) of seeds offset, offset + 1, ... -> (rows, {seeds, usable ...})."""
    from refinevla.grounding import perturbed_frame
    from refinevla.sim import make_task

    sim = make_task(TASK, image_size=image_size, segmentation=False)
    rows, seed, used = [], offset, 0
    t0, c0 = time.time(), time.process_time()
    try:
        while used < n:
            if seed >= offset + MAX_SEEDS:
                raise RuntimeError(f"{desc}: only {used} usable frames among seeds {offset}-{seed - 1}")
            frame = dict(perturbed_frame(sim, seed, arm_noise), task=TASK, seed=seed)
            pair = pair_rows(frame, used, prompt, min_pixels)
            if pair:
                add_pixel_positions(sim, pair, image_size)
                rows += pair
                used += 1
            seed += 1
            if seed % 100 == 0:
                print(f"  {desc}: {seed - offset} rendered, {used}/{n} usable", flush=True)
    finally:
        sim.close()
    info = dict(seeds=[offset, seed - 1], rendered=seed - offset, usable=used, rows=len(rows),
                cubes_on_different_sides=float(np.mean([rows[i]["side"] != rows[i + 1]["side"]
                                                        for i in range(0, len(rows), 2)])),
                render_s=round(time.time() - t0, 1), render_cpu_s=round(time.process_time() - c0, 1))
    return rows, info


def add_pixel_positions(sim, rows: list[dict], image_size: int) -> None:
    """Each row's ``pixel_uv``: the centroid (column, row) of its cube's visible pixels in the frame just rendered,
    as a fraction of the image side (the segmentation render of the simulator's current state)."""
    seen = sim.render(segmentation=True)
    plain = {v: k for k, v in dict(sim.spec.names).items()}
    for r in rows:
        rows_px, cols_px = np.nonzero(np.isin(seen, sim._geoms_of(plain.get(r["name"], r["name"]))))
        r["pixel_uv"] = (float(cols_px.mean()) / image_size, float(rows_px.mean()) / image_size)


#: the inputs of the geometric ceiling: what a perfect localiser of the cube in the image could be given
CEILING_INPUTS = {
    "pixel": "the cube's pixel position alone",
    "pixel+orientation": "the cube's pixel position and the gripper's true roll, pitch, yaw",
    "pixel+orientation tokens": "the cube's pixel position and the gripper's roll, pitch, yaw as the release's state "
                                "tokens give them (256 bins over the range of its pre-training demonstrations, clipped)",
}
ORIENTATION = slice(3, 6)  # refinevla.sim.SimTask.state: eef xyz, roll, pitch, yaw, 0, gripper


def _poly(x: np.ndarray, degree: int) -> np.ndarray:
    """Every monomial of the columns of x up to ``degree`` (a constant column first)."""
    import itertools

    cols = [np.ones(len(x))]
    for d in range(1, degree + 1):
        cols += [np.prod(x[:, list(c)], axis=1) for c in itertools.combinations_with_replacement(range(x.shape[1]), d)]
    return np.stack(cols, 1)


def geometric_ceiling(train_rows, held_rows, state_stats, degree: int = 3, l2: float = 1e-4) -> dict:
    """How well could a model that locates the cube in the image perfectly say its side? A logistic regression on
    cubic features of each ``CEILING_INPUTS`` (fitted on the training frames, scored on the held-out ones, per
    ``DISTANCE_BINS``). The wrist camera turns with the arm, so a cube 1-2 cm to the side of the gripper can sit on
    either side of the image's centre: its side needs the camera's orientation as well as its pixels. Also: the
    share of held-out frames whose roll, pitch or yaw lies outside the state tokens' range (clipped to the end bin)."""
    import torch

    def inputs(rows, kind):
        uv = np.array([r["pixel_uv"] for r in rows], np.float64)
        if kind == "pixel":
            return uv
        state = np.array([r["state"] for r in rows], np.float64)
        if kind == "pixel+orientation tokens":
            state = state_stats.decode(state_stats.encode(state)).astype(np.float64)
        return np.c_[uv, state[:, ORIENTATION]]

    y = torch.tensor([r["side"] == "left" for r in train_rows], dtype=torch.float64)
    bins_of = np.array([distance_bin(r) for r in held_rows], dtype=object)
    out = {}
    for kind, meaning in CEILING_INPUTS.items():
        x_train, x_held = _poly(inputs(train_rows, kind), degree), _poly(inputs(held_rows, kind), degree)
        mean, std = x_train.mean(0), x_train.std(0) + 1e-9
        mean[0], std[0] = 0.0, 1.0
        a = torch.tensor((x_train - mean) / std)
        w = torch.zeros(a.shape[1], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=2000, line_search_fn="strong_wolfe")

        def loss():
            opt.zero_grad()
            value = torch.nn.functional.binary_cross_entropy_with_logits(a @ w, y) + l2 * (w[1:] @ w[1:])
            value.backward()
            return value

        opt.step(loss)
        with torch.no_grad():
            said_left = (torch.tensor((x_held - mean) / std) @ w > 0).numpy()
        right = said_left == np.array([r["side"] == "left" for r in held_rows])
        out[kind] = dict(inputs=meaning, side_accuracy=float(right.mean()), by_distance={
            b: dict(n=int((bins_of == b).sum()), side_accuracy=float(right[bins_of == b].mean())
                    if (bins_of == b).any() else float("nan")) for b in DISTANCE_BINS})
    held_state = np.array([r["state"] for r in held_rows[0::2]], np.float64)[:, ORIENTATION]
    low, high = np.asarray(state_stats.low)[ORIENTATION], np.asarray(state_stats.high)[ORIENTATION]
    outside = (held_state < low) | (held_state > high)
    return dict(fits=out, degree=degree, l2=l2, train_frames=len(train_rows) // 2,
                outside_token_range={k: float(outside[:, i].mean()) for i, k in enumerate(("roll", "pitch", "yaw"))},
                outside_any=float(outside.any(1).mean()),
                token_range={k: [float(low[i]), float(high[i])] for i, k in enumerate(("roll", "pitch", "yaw"))},
                heldout_orientation_5_95={k: [float(np.percentile(held_state[:, i], 5)),
                                              float(np.percentile(held_state[:, i], 95))]
                                          for i, k in enumerate(("roll", "pitch", "yaw"))})


# ------------------------------------------------------------------------------------------------ models
def image_features(model, images, batch: int = 64):
    """The image features the decoder reads (vision tower + projector), [frames, tokens, dims], float32 on the CPU."""
    import torch

    from refinevla.model import image_size, model_device, preprocess_images

    was_training = model.training
    model.eval()
    feats = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            px = preprocess_images(np.stack(images[start:start + batch]), image_size(model)).to(model_device(model))
            out = model.get_image_features(px)
            out = out if isinstance(out, torch.Tensor) else out.pooler_output
            feats.append(out.float().cpu())
    model.train(was_training)
    return torch.cat(feats)


def feature_spread(model, images, batch: int = 64) -> float:
    """std over frames of the image features (averaged over tokens and dims) / their mean magnitude."""
    f = image_features(model, images, batch)
    return float(f.std(0).mean() / f.abs().mean().clamp(min=1e-12))


def linear_side_probe(model, train_rows, held_rows, l2: float = 1e-2) -> dict:
    """Can the image features alone say the side of each cube? One L2-regularised logistic regression per cube
    (red, green) on the flattened, standardised image features of the training frames (L-BFGS), scored on the
    held-out frames overall and per ``DISTANCE_BINS``. Beside the model's own answers it tells where a side error
    comes from: features that do not separate the sides (the probe fails too), or a decoder that does not read them."""
    import torch

    f_train = image_features(model, [r["image"] for r in train_rows[0::2]]).flatten(1)
    f_held = image_features(model, [r["image"] for r in held_rows[0::2]]).flatten(1)
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6
    f_train, f_held = (f_train - mean) / std, (f_held - mean) / std
    right, bins_of = [], []
    for k in range(len(NAMES)):  # rows come in pairs, one per cube in NAMES order
        y = torch.tensor([r["side"] == "left" for r in train_rows[k::2]], dtype=torch.float32)
        w = torch.zeros(f_train.shape[1], requires_grad=True)
        b = torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

        def loss():
            opt.zero_grad()
            value = torch.nn.functional.binary_cross_entropy_with_logits(f_train @ w + b, y) + l2 * (w @ w)
            value.backward()
            return value

        opt.step(loss)
        with torch.no_grad():
            said_left = ((f_held @ w + b) > 0).tolist()
        right += [s == (r["side"] == "left") for s, r in zip(said_left, held_rows[k::2])]
        bins_of += [distance_bin(r) for r in held_rows[k::2]]
    right, bins_of = np.array(right), np.array(bins_of, dtype=object)
    bins = {}
    for name in DISTANCE_BINS:
        sel = bins_of == name
        bins[name] = dict(n=int(sel.sum()), side_accuracy=float(right[sel].mean()) if sel.any() else float("nan"))
    return dict(train_frames=len(train_rows) // 2, l2=l2, side_accuracy=float(right.mean()), by_distance=bins)


def word_id(tok, word: str) -> int:
    ids = tok.text_ids(word)
    if len(ids) != 1 or ids[0] == tok.hf.unk_token_id:
        raise ValueError(f"the tokenizer has no single token for {word!r} (ids {ids}): choose answer words it knows")
    return ids[0]


def encode(rows, which: str, tok, n_image: int) -> dict:
    """Prompt + the one answer token (token type 1, part REASON: the only loss), right-padded, as train.to_batch
    reads it; ``answer`` holds the answer ids, ``choices`` the question's two ids."""
    from refinevla.train import PREFIX, REASON

    seqs = [tok.prompt_ids(r["prompt"], r["state"], n_image) + [word_id(tok, answer_word(r, which))] for r in rows]
    length, n = max(len(s) for s in seqs), len(seqs)
    out = dict(input_ids=np.full((n, length), tok.pad_id, np.int64), token_type_ids=np.ones((n, length), np.int64),
               part=np.full((n, length), PREFIX, np.int64), attention_mask=np.zeros((n, length), np.int64))
    for i, s in enumerate(seqs):
        k = len(s)
        out["input_ids"][i, :k], out["attention_mask"][i, :k] = s, 1
        out["token_type_ids"][i, :k - 1] = 0
        out["part"][i, k - 1] = REASON
    out["images"] = np.stack([np.asarray(r["image"], np.uint8) for r in rows])
    out["n_rows"] = n
    out["answer"] = np.array([s[-1] for s in seqs])
    out["choices"] = np.array([word_id(tok, w) for w in QUESTIONS[which][0]])
    return out


def choice_accuracy(model, data: dict, batch: int = 64) -> tuple[float, np.ndarray]:
    """(share right, right per row): the answer position's logits compared between the question's two words."""
    import torch

    from refinevla.model import image_size, model_device
    from refinevla.train import to_batch

    was_training = model.training
    model.eval()
    right = []
    with torch.no_grad():
        for start in range(0, data["n_rows"], batch):
            idx = np.arange(start, min(data["n_rows"], start + batch))
            b = to_batch(data, idx, image_size(model), model_device(model))
            b.pop("part")
            logits = model(**b, use_cache=False).logits.float().cpu()
            at = b["attention_mask"].sum(1).cpu() - 2  # the position that predicts the answer token
            scores = logits[torch.arange(len(idx)), at][:, torch.as_tensor(data["choices"])]
            right.append(data["choices"][scores.argmax(1).numpy()] == data["answer"][idx])
    model.train(was_training)
    right = np.concatenate(right)
    return float(right.mean()), right


def pair_share(right: np.ndarray) -> float:
    """Share of frames whose two rows (a counterfactual pair, consecutive) are both right."""
    return float(np.mean(right[0::2] & right[1::2]))


def here(path) -> Path:
    """``path`` as given when it exists, else relative to the repository (model folders are named from there)."""
    return Path(path) if Path(path).exists() or Path(path).is_absolute() else REPO / path


def load_init(init: str, size: str, tok_dir: str, seed: int = 0):
    """(model, tokenizer) to train: a fresh model of ``size`` with the tokenizer of ``tok_dir`` (``scratch``), or a
    refinevla model folder (a fine-tune is merged into its base: the whole model trains)."""
    from refinevla.model import build_tiny_vla
    from refinevla.policy import load_vla
    from refinevla.tokens import VLATokenizer

    if init == "scratch":
        tok = VLATokenizer.load(here(tok_dir))
        return build_tiny_vla(size, tok.vocab_size, tok.image_id, tok.pad_id, seed=seed), tok
    model, tok, _ = load_vla(here(init))
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = model.float()
    for p in model.parameters():
        p.requires_grad_(True)
    return model, tok


# ------------------------------------------------------------------------------------------------ the two modes
def swap_state(rows: list[dict], dims, seed: int = 0) -> list[dict]:
    """The rows with the state dims ``dims`` of another frame: a fixed derangement of the frames (no frame keeps its
    own), the two rows of a pair moved together, so only the state differs from the true readout."""
    frames = len(rows) // 2
    order = np.random.default_rng(seed).permutation(frames)
    donor = np.empty(frames, np.int64)
    donor[order] = np.roll(order, 1)  # each frame takes the state of the next in a random cycle
    dims = list(dims)
    out = []
    for i, r in enumerate(rows):
        state = np.array(r["state"], np.float32)
        state[dims] = np.asarray(rows[2 * donor[i // 2]]["state"], np.float32)[dims]
        out.append(dict(r, state=state))
    return out


def side_right(rows: list[dict], answers: list[str]) -> np.ndarray:
    """bool per row: the answer puts the object on its true side of the gripper (an unparsed answer is wrong)."""
    from refinevla.grounding import parse_offset, true_cm

    pred = [parse_offset(a) for a in answers]
    return np.array([p is not None and np.sign(p[1]) == np.sign(true_cm(r["offset_m"])[1])
                     for p, r in zip(pred, rows)])


def readout(checkpoint: str, rows: list[dict], batch: int = 64, max_tokens: int = 24,
            train_rows: list[dict] | None = None) -> dict:
    """Greedy answers of ``checkpoint`` to "where is the <object>" on ``rows`` (pairs), scored; with ``train_rows``
    also the linear probe of its image features (``linear_side_probe``)."""
    from refinevla.grounding import answers as greedy_answers
    from refinevla.grounding import parse_offset, score, true_cm
    from refinevla.policy import load_vla

    t0, c0 = time.time(), time.process_time()
    model, tok, meta = load_vla(here(checkpoint))
    short = copy.copy(tok)  # the answer ends at ACTION:; decode the fewest action tokens after it (7, not 7 x chunk)
    short.action_chunk = 1
    answers = greedy_answers(model, short, rows, batch, max_tokens)  # each answer kept: the pairs need them
    overall = score(rows, answers)

    def subset(keep):
        sel = [i for i, r in enumerate(rows) if keep(r)]
        if not sel:
            return dict(n=0, side_accuracy=float("nan"), within_1cm=float("nan"))
        s = score([rows[i] for i in sel], [answers[i] for i in sel])
        return dict(n=s["n"], side_accuracy=s["side_accuracy"], within_1cm=s["within_1cm"])

    pred = [parse_offset(a) for a in answers]
    truth = [true_cm(r["offset_m"]) for r in rows]
    side_ok = side_right(rows, answers)
    near = np.array([p is not None and bool(np.all(np.abs(p - t) <= 1)) for p, t in zip(pred, truth)])
    close = np.array([distance_bin(r) == "1-2 cm" for r in rows])
    share = lambda ok: float(ok[close].mean()) if close.any() else float("nan")  # noqa: E731
    swaps = {"true": dict(side_accuracy=float(side_ok.mean()), close=share(side_ok))}
    for name, dims in STATE_SWAPS.items():  # the same pixels and question, another frame's state
        ok = side_right(rows, greedy_answers(model, short, swap_state(rows, dims), batch, max_tokens))
        swaps[name] = dict(side_accuracy=float(ok.mean()), close=share(ok),
                           changed=float(np.mean(ok != side_ok)))
    images = [r["image"] for r in rows[0::2]]
    return dict(checkpoint=str(checkpoint), kind=meta.get("kind"), size=meta.get("size"),
                question="where is the <object>", questions=overall["n"], frames=len(rows) // 2,
                answered=overall["answered"], side_accuracy=overall["side_accuracy"],
                within_1cm=overall["within_1cm"], exact=overall["exact"], mae_cm=overall["mae_cm"],
                by_colour={c: subset(lambda r, c=c: r["colour"] == c) for c in ("red", "green")},
                by_side={s: subset(lambda r, s=s: r["side"] == s) for s in ("left", "right")},
                by_distance={b: subset(lambda r, b=b: distance_bin(r) == b) for b in DISTANCE_BINS},
                pair_side_consistency=pair_share(side_ok), pair_within_1cm=pair_share(near), state_swaps=swaps,
                side_right=side_ok.tolist(),
                spread=feature_spread(model, images), examples=overall["examples"][:4],
                feature_probe=linear_side_probe(model, train_rows, rows) if train_rows else None,
                wall_s=round(time.time() - t0, 1), cpu_s=round(time.process_time() - c0, 1))


def train_probe(init: str, which: str, train_rows, held_rows, args) -> dict:
    """Train a fresh copy of ``init`` on question ``which``; held-out accuracy and spread every eval_every steps."""
    import torch

    from refinevla.config import TrainConfig
    from refinevla.model import image_size, num_image_tokens
    from refinevla.train import batch_indices, joint_loss, lr_at, to_batch

    t0, c0 = time.time(), time.process_time()
    torch.manual_seed(args.seed)
    model, tok = load_init(init, args.size, args.tokenizer, args.seed)
    n_image, size = num_image_tokens(model), image_size(model)
    data, held = encode(train_rows, which, tok, n_image), encode(held_rows, which, tok, n_image)
    held_images = [r["image"] for r in held_rows[0::2]]
    cfg = TrainConfig(arm="grounding", steps=args.steps, lr=args.lr, warmup_steps=min(args.warmup, args.steps),
                      batch_size=args.batch, min_lr_ratio=0.1, clip_grad=1.0, weight_decay=0.0, seed=args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    curve, losses, step_times, step_cpu = [], [], [], []

    def evaluate(step: int, loss: float | None):
        acc, right = choice_accuracy(model, held)
        curve.append(dict(step=step, accuracy=round(acc, 4), pairs_right=round(pair_share(right), 4),
                          spread=round(feature_spread(model, held_images), 5),
                          loss=None if loss is None else round(loss, 4)))
        print(f"    {init} / {which}: step {step:4d}  accuracy {acc:.3f}  spread {curve[-1]['spread']:.4f}"
              + ("" if loss is None else f"  loss {loss:.3f}"), flush=True)

    evaluate(0, None)
    model.train()
    for step in range(cfg.steps):
        t, c = time.perf_counter(), time.process_time()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = to_batch(data, batch_indices(step, data["n_rows"], cfg.batch_size, cfg.seed), size, "cpu")
        part = batch.pop("part")
        loss = joint_loss(model(**batch, use_cache=False).logits, batch["input_ids"], part, 1.0)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step_times.append(time.perf_counter() - t)
        step_cpu.append(time.process_time() - c)
        done = step + 1
        if done % args.eval_every == 0 or done == cfg.steps:
            evaluate(done, float(np.mean(losses[-args.eval_every:])))
    last = curve[-1]
    return dict(init=init, question=which, answers=list(QUESTIONS[which][0]), needs=QUESTIONS[which][1],
                prompt=held_rows[0]["prompt"], steps=cfg.steps, lr=cfg.lr, accuracy=last["accuracy"],
                pairs_right=last["pairs_right"], spread_start=curve[0]["spread"], spread_end=last["spread"],
                final_loss=last["loss"], curve=curve,
                step_s=round(statistics.median(step_times), 4) if step_times else None,
                step_cpu_s=round(statistics.median(step_cpu), 4) if step_cpu else None,
                wall_s=round(time.time() - t0, 1), cpu_s=round(time.process_time() - c0, 1))


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", action="append", default=None,
                    help=f"readout of this model folder, repeatable (default: {RELEASE}; none: no readout)")
    ap.add_argument("--train-from", action="append", default=None,
                    help=f"train probes from scratch or a model folder, repeatable (default: scratch and {RELEASE}; "
                         "none: no training)")
    ap.add_argument("--questions", default=",".join(QUESTIONS), help="train mode: comma-separated, of "
                    + ", ".join(QUESTIONS))
    ap.add_argument("--frames", type=int, default=400, help="training frames (x2 rows: the pairs)")
    ap.add_argument("--heldout-frames", type=int, default=150, help="held-out frames (x2 rows)")
    ap.add_argument("--prompt", choices=sorted(PROMPTS), default="where",
                    help="train mode: the prompt naming the cube (where: 'where is the red cube'; instruction: "
                         "'pick up the red cube')")
    ap.add_argument("--steps", type=int, default=300, help="training steps per (init, question)")
    ap.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (AdamW; the release's was 2e-4)")
    ap.add_argument("--warmup", type=int, default=50, help="linear warm-up steps, then cosine decay to 0.1 x lr")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--size", default="", help="model size of a scratch init (default: the release's)")
    ap.add_argument("--tokenizer", default=RELEASE, help="the tokenizer of a scratch init")
    ap.add_argument("--seed", type=int, default=0, help="scratch initialisation and data order")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--feature-probe", action=argparse.BooleanOptionalAction, default=True,
                    help="readout mode: also a linear probe of each checkpoint's image features for each cube's side, "
                         "fitted on the training frames")
    ap.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=True,
                    help="also the geometric ceiling: the side from the cube's true pixel position, with and without "
                         "the gripper's orientation (true, or as the release's state tokens give it)")
    ap.add_argument("--out", default=str(HERE / "results" / "grounding.json"))
    args = ap.parse_args(argv)

    import warnings

    import torch

    from results_file import library_versions, write_result  # benchmarks/results_file.py

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    t_start, c_start = time.time(), time.process_time()
    checkpoints = [c for c in (args.checkpoint or [RELEASE]) if c != "none"]
    inits = [c for c in (args.train_from or ["scratch", RELEASE]) if c != "none"]
    questions = [q.strip() for q in args.questions.split(",") if q.strip()]
    for q in questions:
        answer_word(dict(side="left", colour="red", red_side="left"), q)  # an unknown name fails here
    if not args.size:
        import json

        args.size = json.loads((here(args.tokenizer) / "vla.json").read_text()).get("size", "tiny16")
    print(f"grounding benchmark: readout {checkpoints}, train {inits} x {questions}, {args.frames} + "
          f"{args.heldout_frames} frames, {args.steps} steps at lr {args.lr:g}, {args.threads} thread(s)", flush=True)

    held_rows, held_info = collect_frames(args.heldout_frames, HELDOUT_SEED_OFFSET, args.prompt, desc="held-out")
    train_rows, train_info = (collect_frames(args.frames, TRAIN_SEED_OFFSET, args.prompt, desc="training")
                              if inits or args.ceiling or (checkpoints and args.feature_probe) else ([], None))
    print(f"  frames: held-out {held_info}, training {train_info}", flush=True)
    ceiling = None
    if args.ceiling:
        from refinevla.tokens import VLATokenizer

        ceiling = geometric_ceiling(train_rows, held_rows, VLATokenizer.load(here(args.tokenizer)).state_stats)
        print("  geometric ceiling (side accuracy, overall / 1-2 cm): " + ", ".join(
            f"{k} {v['side_accuracy']:.3f} / {v['by_distance']['1-2 cm']['side_accuracy']:.3f}"
            for k, v in ceiling["fits"].items()) + f"; orientation outside the state tokens' range in "
            f"{ceiling['outside_any']:.0%} of the held-out frames", flush=True)

    readouts = []
    for c in checkpoints:
        print(f"  readout of {c} ...", flush=True)
        readouts.append(readout(c, held_rows, train_rows=train_rows if args.feature_probe else None))
        r = readouts[-1]
        print(f"    side accuracy {r['side_accuracy']:.3f}, within 1 cm {r['within_1cm']:.3f}, pairs "
              f"{r['pair_side_consistency']:.3f}, MAE {[round(x, 2) for x in r['mae_cm']]} cm, spread "
              f"{r['spread']:.4f} ({r['wall_s']} s)", flush=True)
        print("    side accuracy with another frame's state: " + ", ".join(
            f"{k} {v['side_accuracy']:.3f}" for k, v in r["state_swaps"].items()), flush=True)
        if r["feature_probe"]:
            print(f"    linear probe of the image features: side accuracy {r['feature_probe']['side_accuracy']:.3f}",
                  flush=True)
    from refinevla.stats import mcnemar_exact

    right = [r.pop("side_right") for r in readouts]  # per question: kept for the paired test, not in the file
    paired = [dict(reference=checkpoints[0], checkpoint=c, **mcnemar_exact(right[0], ok))
              for c, ok in zip(checkpoints[1:], right[1:])]
    for p in paired:
        print(f"  paired with {p['reference']}: {p['checkpoint']} alone right on {p['c']}, the reference alone on "
              f"{p['b']} of {p['n']} questions (McNemar exact p = {p['p_value']:.3f})", flush=True)
    trained = []
    for init in inits:
        for q in questions:
            print(f"  train {init} / {q} ({QUESTIONS[q][1]}) ...", flush=True)
            trained.append(train_probe(init, q, train_rows, held_rows, args))

    result = dict(
        benchmark="grounding", task=TASK,
        settings=dict(frames=args.frames, heldout_frames=args.heldout_frames,
                      prompt=PROMPTS[args.prompt].format(name="<cube>"), steps=args.steps, lr=args.lr,
                      warmup=args.warmup, schedule="cosine to 0.1 x lr", batch=args.batch,
                      eval_every=args.eval_every, scratch_size=args.size, tokenizer=args.tokenizer, seed=args.seed,
                      threads=args.threads, arm_noise_rad=0.1, min_pixels=4,
                      seed_ranges=dict(training=[TRAIN_SEED_OFFSET, TRAIN_SEED_OFFSET + MAX_SEEDS - 1],
                                       heldout=[HELDOUT_SEED_OFFSET, HELDOUT_SEED_OFFSET + MAX_SEEDS - 1])),
        frames=dict(heldout=held_info, training=train_info),
        questions={q: dict(answers=list(w), needs=n) for q, (w, n) in QUESTIONS.items()},
        method=("readout: greedy answers to 'where is the <object>' scored by refinevla.grounding.score; pairs: both "
                "answers of a frame right; state swaps: the same rows with the position, orientation or whole state of "
                "another frame (a fixed derangement); train: the whole model, a fresh copy per question, one-token answers, "
                "held-out accuracy between the question's two words; spread: std over frames of the image features "
                "(averaged over tokens and dims) / their mean magnitude, on the held-out frames; feature probe: a logistic "
                "regression per cube on the flattened image features of the training frames (L2, L-BFGS); ceiling: a logistic "
                "regression on cubic features of the cube's true pixel centroid (and the gripper's roll, pitch, yaw: "
                "true, or decoded from the release's state tokens), fitted on the training frames"),
        readout=readouts, paired=paired, train=trained, ceiling=ceiling, wall_s=round(time.time() - t_start, 1),
        cpu_s=round(time.process_time() - c_start, 1),
        when=time.strftime("%Y-%m-%d %H:%M"), versions=library_versions(),
        machine=dict(cpus=os.cpu_count(), platform=platform.platform(), load_avg=list(os.getloadavg())))
    print(f"done in {result['wall_s'] / 60:.1f} min ({result['cpu_s'] / 60:.1f} min of CPU time)", flush=True)
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
