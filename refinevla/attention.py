"""Attention maps: where the policy looks when it writes its action (or its rationale), and how much of that
falls on the target object.

Procedure for one frame (the same for the tiny model and a real checkpoint, fp32 or 4-bit + LoRA):

1. decode with the policy (``VLAPolicy``): a rationale if the model reasons, then ``ACTION:`` and 7 bins;
2. run ONE teacher-forced forward pass over ``prompt + generated target`` with ``token_type_ids`` 0 on the prompt
   and 1 on the target (the training mask: train.build_sequence) and ``output_attentions=True`` (eager attention;
   transformers returns one [B, heads, L, L] tensor per decoder layer);
3. read the rows of the query positions that *predict* the chosen tokens (a position's logits predict the next
   token): for ``query="action"`` the ``ACTION:`` marker and the first six action tokens; for ``"rationale"``
   the last prompt token and every rationale token but the last;
4. aggregate: ``mean_heads`` = the chosen layer's attention averaged over heads; ``rollout`` = attention rollout
   (Abnar & Zuidema 2020): per layer the head-averaged matrix plus the identity (residual), rows renormalised,
   multiplied from layer 0 up to the chosen layer;
5. average the query rows, keep the image columns (positions 0..N-1: image tokens come first), and normalise them
   to sum 1: the map is the *distribution of image attention* over the sqrt(N) x sqrt(N) patch grid. The mass the
   rows put on the image before normalising is kept as ``image_mass``.

The attention-on-target score of a map p (sum 1 over patches) and a target mask:
``cover[i, j]`` = the fraction of patch (i, j) covered by the mask (the mask, at camera resolution, area-averaged
onto the patch grid: the patch grid spans the whole frame, as the model's square resize does);
``share = sum(p * cover)`` (attention on a patch is taken as spread evenly over it, which is the same as
upsampling the map with nearest-neighbour to the camera resolution), ``mask_share = mean(cover)`` (the share a
uniform map would get) and ``lift = share / mask_share`` (1.0 = no preference, > 1 = drawn to the target).
A frame whose mask is missing or has fewer than ``min_mask_pixels`` visible pixels (target occluded or out of
view), or that has no query position (``query="rationale"`` for a model that wrote none), is *undefined*: NaN
with a reason, counted as ``n_undefined``. Means over frames come with a 95% Student-t interval
(mean +- t_{0.975, n-1} s / sqrt(n); share intervals clipped to [0, 1]; n < 2 gives no interval).
"""
from __future__ import annotations

import json
import math
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .config import AGGREGATIONS, QUERIES, AttentionConfig  # noqa: F401 - defined with the run config
from .diagnostics import open_loop_errors
from .figures import plot_overlays, plot_scores

N_ACTION = 7


# ----------------------------------------------------------------------------------- aggregation
def resolve_layer(layer: int, n_layers: int) -> int:
    """A layer index in 0..n_layers-1 (negative counts from the top), with a clear error when out of range."""
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"attention.layer={layer} but the decoder has {n_layers} layers "
                         f"(choose 0..{n_layers - 1} or -1..-{n_layers})")
    return layer % n_layers


def query_positions(n_prompt: int, n_rationale: int, query: str = "action") -> list[int]:
    """Positions whose outputs predict the chosen target tokens (sequence = prompt, rationale, ACTION:, 7 bins).

    action: the ACTION: marker and the first six action tokens (they predict the 7 bins);
    rationale: the last prompt token and the rationale tokens but the last (they predict the rationale);
    empty when there is no rationale.
    """
    if query == "action":
        start = n_prompt + n_rationale  # the marker
        return list(range(start, start + N_ACTION))
    if query == "rationale":
        return list(range(n_prompt - 1, n_prompt + n_rationale - 1))
    raise ValueError(f"query={query!r}; expected one of {QUERIES}")


def _as_layers(attentions) -> np.ndarray:
    """Per-layer attentions ([heads, L, L] or [1, heads, L, L] each, torch or numpy) -> [layers, heads, L, L]."""
    layers = []
    for a in attentions:
        a = a.detach().float().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)
        if a.ndim == 4:
            if a.shape[0] != 1:
                raise ValueError(f"expected a batch of one, got attention of shape {a.shape}")
            a = a[0]
        if a.ndim != 3 or a.shape[1] != a.shape[2]:
            raise ValueError(f"expected per-layer attention [heads, L, L], got {a.shape}")
        layers.append(a)
    return np.stack(layers)  # float32 from a model (memory), float64 sums downstream


def rollout(attentions, layer: int = -1, residual: float = 0.5) -> np.ndarray:
    """Attention rollout [L, L] from layer 0 up to ``layer``: A_l' = (1 - r) mean_heads(A_l) + r I, rows
    renormalised, R = A_layer' ... A_1' A_0' (Abnar & Zuidema 2020, r = 0.5)."""
    att = _as_layers(attentions)
    last = resolve_layer(layer, len(att))
    length = att.shape[-1]
    eye = np.eye(length)
    result = eye
    for a in att[:last + 1]:
        a = (1.0 - residual) * a.mean(0, dtype=np.float64) + residual * eye
        a = a / a.sum(-1, keepdims=True)
        result = a @ result
    return result


def image_attention(attentions, queries, n_image: int, layer: int = -1, aggregation: str = "mean_heads",
                    residual: float = 0.5) -> tuple[np.ndarray, float]:
    """(map over the n_image patches summing to 1, image_mass) for the given query rows.

    image_mass is the mean attention the query rows put on the image tokens before normalising (NaN map when
    there are no queries or no mass on the image).
    """
    att = _as_layers(attentions)
    queries = list(queries)
    if not queries:
        return np.full(n_image, np.nan), float("nan")
    if aggregation == "mean_heads":
        matrix = att[resolve_layer(layer, len(att))].mean(0, dtype=np.float64)
    elif aggregation == "rollout":
        matrix = rollout(att, layer, residual)
    else:
        raise ValueError(f"aggregation={aggregation!r}; expected one of {AGGREGATIONS}")
    rows = matrix[queries].mean(0)
    image = rows[:n_image]
    mass = float(image.sum())
    if not mass > 0:
        return np.full(n_image, np.nan), mass
    return image / mass, mass


def to_grid(patch_map: np.ndarray) -> np.ndarray:
    """[N] patch values -> [g, g] with g = sqrt(N) (row-major: SigLIP's patch order, top-left first)."""
    patch_map = np.asarray(patch_map)
    g = math.isqrt(patch_map.shape[-1])
    if g * g != patch_map.shape[-1]:
        raise ValueError(f"{patch_map.shape[-1]} image tokens do not form a square patch grid")
    return patch_map.reshape(*patch_map.shape[:-1], g, g)


def upsample(grid: np.ndarray, size: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """[g, g] -> [H, W] (the grid spans the whole frame); ``mode`` bilinear (display) or nearest."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(np.asarray(grid, np.float32))[None, None]
    kwargs = dict(align_corners=False) if mode == "bilinear" else {}
    return F.interpolate(x, size=tuple(size), mode=mode, **kwargs)[0, 0].numpy()


# ------------------------------------------------------------------------------------------ score
def mask_array(mask) -> np.ndarray | None:
    """A stored target mask (PIL image, array, or None) -> bool [H, W] (or None when there is none)."""
    if mask is None:
        return None
    m = np.asarray(mask.convert("L") if hasattr(mask, "convert") else mask)
    if m.ndim == 3:
        m = m.max(-1)
    return m > 0


def mask_coverage(mask, grid: int) -> np.ndarray:
    """Fraction of each patch of a grid x grid layout covered by the mask (area average; exact when the mask's
    height and width are multiples of the grid)."""
    import torch
    import torch.nn.functional as F

    m = torch.as_tensor(np.asarray(mask_array(mask), np.float32))[None, None]
    return F.adaptive_avg_pool2d(m, (grid, grid))[0, 0].double().numpy()


def target_score(grid_map: np.ndarray, mask, min_mask_pixels: int = 1) -> dict:
    """share, mask_share, lift and reason ("" when defined) for a [g, g] map (sum 1) and a target mask."""
    nan = dict(share=float("nan"), mask_share=float("nan"), lift=float("nan"))
    grid_map = np.asarray(grid_map, np.float64)
    m = mask_array(mask)
    if m is None:
        return dict(nan, reason="no target mask (the source has no segmentation)")
    visible = int(m.sum())
    if visible < max(1, min_mask_pixels):
        return dict(nan, reason=f"target not visible (occluded or out of view: {visible} mask pixels)")
    if not np.isfinite(grid_map).all():
        return dict(nan, reason="no attention map (no query tokens or no attention on the image)")
    cover = mask_coverage(m, grid_map.shape[-1])
    share = float((grid_map * cover).sum() / grid_map.sum())
    mask_share = float(cover.mean())
    return dict(share=share, mask_share=mask_share, lift=share / mask_share, reason="")


def reason_kind(reason: str) -> str:
    """The short kind of an undefined-score reason ("target not visible", "no target mask", ...)."""
    return reason.split(" (")[0].split(":")[0].strip()


def mean_ci(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval over the finite values; NaN interval below two values."""
    from scipy import stats

    x = np.asarray(values, np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(x.mean())
    if len(x) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, mean - half, mean + half


TABLE_COLUMNS = ["model", "task", "n_frames", "n_undefined", "share", "share_ci_low", "share_ci_high",
                 "lift", "lift_ci_low", "lift_ci_high", "mask_share", "image_mass", "undefined_reasons"]


def summarise(per_frame, all_tasks: bool = True):
    """The score table from per-frame records (columns model, task, share, lift, mask_share, image_mass, reason):
    one row per model and task, plus a pooled "(all)" row per model when there are several tasks."""
    import pandas as pd

    df = pd.DataFrame(per_frame)
    df["reason"] = df["reason"].fillna("")  # read back from frames.csv, "" comes back as NaN
    groups = []
    for (model, task), g in df.groupby(["model", "task"], sort=False):
        groups.append((model, task, g))
    if all_tasks and df["task"].nunique() > 1:
        for model, g in df.groupby("model", sort=False):
            groups.append((model, "(all)", g))
    rows = []
    for model, task, g in groups:
        defined = g[g["reason"] == ""]
        share, share_lo, share_hi = mean_ci(defined["share"])
        lift, lift_lo, lift_hi = mean_ci(defined["lift"])
        reasons = g.loc[g["reason"] != "", "reason"].map(reason_kind).value_counts()
        rows.append(dict(model=model, task=task, n_frames=len(g), n_undefined=len(g) - len(defined),
                         share=share, share_ci_low=max(0.0, share_lo) if np.isfinite(share_lo) else share_lo,
                         share_ci_high=min(1.0, share_hi) if np.isfinite(share_hi) else share_hi,
                         lift=lift, lift_ci_low=lift_lo, lift_ci_high=lift_hi,
                         mask_share=float(defined["mask_share"].mean()) if len(defined) else float("nan"),
                         image_mass=float(g["image_mass"].mean()),
                         undefined_reasons="; ".join(f"{k} ({v})" for k, v in reasons.items())))
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def paired_difference(per_frame, reference: str, metric: str = "lift"):
    """Per task, each other model's mean paired difference in ``metric`` from ``reference`` over the frames
    both have defined (the same frames for every model), with a Student-t 95% interval."""
    import pandas as pd

    df = pd.DataFrame(per_frame)
    df = df[df["reason"].fillna("") == ""]
    wide = df.pivot_table(index=["task", "frame_index"], columns="model", values=metric)
    rows = []
    for model in [m for m in wide.columns if m != reference]:
        if reference not in wide.columns:
            break
        for task, g in wide.groupby(level="task"):
            d = (g[model] - g[reference]).dropna()
            mean, lo, hi = mean_ci(d)
            rows.append(dict(model=model, reference=reference, task=task, metric=metric, n_pairs=len(d),
                             diff=mean, ci_low=lo, ci_high=hi))
    return pd.DataFrame(rows, columns=["model", "reference", "task", "metric", "n_pairs", "diff", "ci_low",
                                       "ci_high"])


# --------------------------------------------------------------------------------------- extraction
def _row_image(row) -> np.ndarray:
    img = row["image"]
    return np.asarray(img.convert("RGB") if hasattr(img, "convert") else img, np.uint8)


def decode_frame(model, tok, image, instruction: str, state, reasoning: bool,
                 max_rationale_tokens: int = 96) -> tuple[list[int], list[int]]:
    """(rationale_ids, action_ids) the policy generates greedily for one observation."""
    from .policy import VLAPolicy

    policy = VLAPolicy(model, tok, reasoning=reasoning, max_rationale_tokens=max_rationale_tokens)
    return policy.generate_ids(image, instruction, np.asarray(state, np.float32), reasoning)


def forward_attentions(model, tok, image, instruction: str, state, rationale_ids, action_ids):
    """One teacher-forced pass over prompt + target (token_type_ids 0 on the prompt, 1 on the target: the training
    mask) with output_attentions=True; returns (attentions float32 numpy [layers, heads, L, L], prompt length)."""
    import torch

    from .model import image_size, model_device, num_image_tokens, num_decoder_layers, preprocess_images

    device = model_device(model)
    prompt = tok.prompt_ids(instruction, np.asarray(state), num_image_tokens(model))
    target = list(rationale_ids) + [tok.marker_id] + list(action_ids)
    ids = torch.as_tensor([prompt + target], device=device)
    token_type = torch.as_tensor([[0] * len(prompt) + [1] * len(target)], device=device)
    pixels = preprocess_images(np.asarray(image), image_size(model)).to(device)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, token_type_ids=token_type, output_attentions=True,
                    use_cache=False)
    attentions = getattr(out, "attentions", None)
    if not attentions or any(a is None for a in attentions):
        raise RuntimeError("the model returned no attentions: load it with attn_implementation='eager' "
                           "(load_vla does by default); sdpa and flash attention cannot return them")
    n_layers = num_decoder_layers(model)
    if len(attentions) != n_layers:
        raise RuntimeError(f"expected one attention tensor per decoder layer ({n_layers}), got {len(attentions)}")
    return _as_layers(attentions), len(prompt)


def frame_attention(model, tok, image, instruction: str, state, cfg: AttentionConfig, reasoning: bool) -> dict:
    """Decode one frame, read its attention: dict(map [g, g] summing to 1 (NaN when undefined), image_mass,
    n_queries, rationale, action, action_ids) for ``cfg.query``, and ``rationale_map``: the same read from the
    positions that write the rationale (NaN when the model wrote none), from the same forward pass."""
    from .model import num_image_tokens

    rationale_ids, action_ids = decode_frame(model, tok, image, instruction, state, reasoning,
                                             cfg.max_rationale_tokens)
    att, n_prompt = forward_attentions(model, tok, image, instruction, state, rationale_ids, action_ids)
    queries = query_positions(n_prompt, len(rationale_ids), cfg.query)
    n_image = num_image_tokens(model)
    vec, mass = image_attention(att, queries, n_image, cfg.layer, cfg.aggregation, cfg.residual)
    written = query_positions(n_prompt, len(rationale_ids), "rationale") if rationale_ids else []
    rationale_vec, _ = image_attention(att, written, n_image, cfg.layer, cfg.aggregation, cfg.residual)
    return dict(map=to_grid(vec), image_mass=mass, n_queries=len(queries), rationale_map=to_grid(rationale_vec),
                rationale=tok.decode_text(rationale_ids), action=tok.ids_to_actions(action_ids)[0],
                action_ids=action_ids)


# ------------------------------------------------------------------------------------------ frames
def select_frames(dataset, frames_per_task: int, seed: int = 0, min_mask_pixels: int = 1) -> list[int]:
    """A fixed, seeded choice of row indices per task (tasks in sorted order, rows sorted within a task).

    Rows whose target is visible (target_mask with >= min_mask_pixels) come first; among them, frames from
    different episodes before a second frame of the same episode. The choice depends only on the dataset, the
    seed and the task name, so every model is scored on the same frames.
    """
    cols = dataset.column_names
    tasks = list(dataset["task"])
    episodes = list(dataset["episode_index"]) if "episode_index" in cols else list(range(len(tasks)))
    if "target_mask" in cols:
        masks = dataset.select_columns(["target_mask"])
        visible = []
        for r in masks:
            m = mask_array(r["target_mask"])
            visible.append(m is not None and int(m.sum()) >= max(1, min_mask_pixels))
    else:
        visible = [False] * len(tasks)
    chosen = []
    for task in sorted(set(tasks)):
        rows = np.array([i for i, t in enumerate(tasks) if t == task])
        rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
        perm = rows[rng.permutation(len(rows))]
        seen: dict = {}
        rank = []
        for i in perm:  # the k-th frame drawn from its episode
            key = episodes[i]
            rank.append(seen.get(key, 0))
            seen[key] = rank[-1] + 1
        order = sorted(range(len(perm)), key=lambda k: (not visible[perm[k]], rank[k]))  # stable: seeded
        chosen += sorted(int(perm[k]) for k in order[:frames_per_task])
    return chosen


# --------------------------------------------------------------------------------------------- stage
def _overlay_choice(frame_tasks: list[str], defined: np.ndarray, k: int) -> list[int]:
    """Up to k positions, round-robin over tasks, frames with a defined score for every model first."""
    by_task: dict = {}
    for pos, task in enumerate(frame_tasks):
        by_task.setdefault(task, []).append(pos)
    for task in by_task:
        by_task[task].sort(key=lambda p: not defined[p])
    picked, depth = [], 0
    while len(picked) < k and any(depth < len(v) for v in by_task.values()):
        for task in sorted(by_task):
            if depth < len(by_task[task]) and len(picked) < k:
                picked.append(by_task[task][depth])
        depth += 1
    return picked


def score_models(models: dict, dataset, cfg: AttentionConfig, out_dir):
    """The attention stage: maps and attention-on-target scores for every model over the same frames.

    ``models`` maps a display name to a model folder (load_vla); the first is the reference of the paired
    differences. ``dataset`` is a datasets.Dataset in the row schema (or a folder saved with save_to_disk).
    Writes out_dir/maps.npz (the maps of ``cfg.query`` and of the rationale tokens), frames.csv (per frame, with
    the open-loop action errors of diagnostics.open_loop_errors when ``cfg.open_loop``), scores.csv (the table),
    paired.csv, and the figures (``draw_figures``); returns the table (pandas DataFrame, TABLE_COLUMNS).
    """
    import gc

    import pandas as pd
    import torch
    from tqdm import tqdm

    from .policy import load_vla
    from .schema import require_columns

    if not models:
        raise ValueError("score_models needs at least one model {name: model_dir}")
    if isinstance(dataset, (str, Path)):
        import datasets

        dataset = datasets.load_from_disk(str(dataset))
    require_columns(dataset.column_names, ("task", "instruction", "image", "state"), where="attention dataset")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from .train import resolve_threads

    torch.set_num_threads(resolve_threads(cfg.threads))

    indices = select_frames(dataset, cfg.frames_per_task, cfg.seed, cfg.min_mask_pixels)
    rows = dataset.select(indices)
    has_mask = "target_mask" in dataset.column_names
    frames = [dict(image=_row_image(r), instruction=r["instruction"], state=np.asarray(r["state"], np.float32),
                   task=r["task"], mask=mask_array(r["target_mask"]) if has_mask else None,
                   episode_index=r.get("episode_index", -1), step_index=r.get("step_index", -1),
                   action=r.get("action"), rationale_text=r.get("rationale_text") or "") for r in rows]

    records, maps, masses, rationale_maps = [], {}, {}, {}
    bar = tqdm(total=len(models) * len(frames), desc="attention")
    for name, model_dir in models.items():
        model, tok, meta = load_vla(model_dir)
        reasoning = bool(meta.get("use_rationale", False)) if cfg.reasoning is None else cfg.reasoning
        maps[name], masses[name], rationale_maps[name] = [], [], []
        for idx, f in zip(indices, frames):
            bar.set_postfix(model=name)
            res = frame_attention(model, tok, f["image"], f["instruction"], f["state"], cfg, reasoning)
            score = target_score(res["map"], f["mask"], cfg.min_mask_pixels)
            if res["n_queries"] == 0:
                score = dict(score, share=float("nan"), lift=float("nan"),
                             reason="no query tokens (the model wrote no rationale)")
            maps[name].append(res["map"].astype(np.float32))
            rationale_maps[name].append(res["rationale_map"].astype(np.float32))
            masses[name].append(res["image_mass"])
            errors = {}
            if cfg.open_loop and f["action"] is not None:  # an evaluation diagnostic over the same frames
                errors = open_loop_errors(model, tok, f, res["action_ids"], reasoning, cfg.max_rationale_tokens)
            records.append(dict(model=name, task=f["task"], frame_index=idx, episode_index=f["episode_index"],
                                step_index=f["step_index"], instruction=f["instruction"],
                                n_queries=res["n_queries"], image_mass=res["image_mass"], **score,
                                rationale=res["rationale"], **errors))
            bar.update(1)
        del model
        gc.collect()
    bar.close()

    per_frame = pd.DataFrame(records)
    table = summarise(per_frame)
    names = list(models)
    arrays = dict(models=np.array(names), frame_index=np.array(indices, np.int64),
                  tasks=np.array([f["task"] for f in frames]),
                  instructions=np.array([f["instruction"] for f in frames]),
                  config=np.array(json.dumps(asdict(cfg))))
    for k, name in enumerate(names):
        arrays[f"maps_{k}"] = np.stack(maps[name])
        arrays[f"image_mass_{k}"] = np.asarray(masses[name], np.float64)
        arrays[f"rationale_maps_{k}"] = np.stack(rationale_maps[name])
    np.savez_compressed(out_dir / "maps.npz", **arrays)
    per_frame.to_csv(out_dir / "frames.csv", index=False)
    table.to_csv(out_dir / "scores.csv", index=False)
    paired_difference(per_frame, names[0], "lift").to_csv(out_dir / "paired.csv", index=False)

    draw_figures(frames, indices, maps, per_frame, table, cfg.overlay_frames, out_dir)
    return table


def draw_figures(frames, indices, maps, per_frame, table, overlay_frames: int, out_dir) -> None:
    """The stage's figures from what ``score_models`` measured: out_dir/overlays.png (the maps of every model on a
    few frames of each task, each with its score) and, when a score is defined, scores.png (figures.py)."""
    import matplotlib.pyplot as plt

    names = list(maps)
    defined = per_frame.groupby("frame_index", sort=False)["reason"].apply(lambda r: (r == "").all())
    defined = np.array([defined[i] for i in indices])
    pick = _overlay_choice([f["task"] for f in frames], defined, overlay_frames)
    lookup = per_frame.set_index(["model", "frame_index"])
    notes = {name: [_note(lookup.loc[(name, indices[p])]) for p in pick] for name in names}
    fig = plot_overlays([frames[p]["image"] for p in pick], {n: [maps[n][p] for p in pick] for n in names},
                        [frames[p]["instruction"] for p in pick], masks=[frames[p]["mask"] for p in pick],
                        notes=notes)
    fig.savefig(Path(out_dir) / "overlays.png", dpi=110)
    plt.close(fig)
    if table["lift"].notna().any():
        fig = plot_scores(table)
        fig.savefig(Path(out_dir) / "scores.png", dpi=110)
        plt.close(fig)


def _note(rec) -> str:
    if rec["reason"]:
        return "undefined: " + reason_kind(rec["reason"])
    return f"share {rec['share']:.2f}, lift {rec['lift']:.2f}"


def load_maps(path) -> dict:
    """maps.npz back as {model name: [n_frames, g, g]} plus rationale_maps (the same for the rationale tokens;
    empty for a run made before they were kept), frame_index, tasks, instructions, image_mass."""
    with np.load(Path(path), allow_pickle=False) as z:
        names = [str(n) for n in z["models"]]
        rationale = {n: z[f"rationale_maps_{k}"] for k, n in enumerate(names) if f"rationale_maps_{k}" in z}
        return dict(maps={n: z[f"maps_{k}"] for k, n in enumerate(names)}, rationale_maps=rationale,
                    image_mass={n: z[f"image_mass_{k}"] for k, n in enumerate(names)},
                    frame_index=z["frame_index"], tasks=[str(t) for t in z["tasks"]],
                    instructions=[str(t) for t in z["instructions"]], config=json.loads(str(z["config"])))
