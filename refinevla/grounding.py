"""Visual grounding: referring-expression questions about robosuite frames, and the probe that scores them.

The VLM inside SpatialVLA (PaliGemma 2) learnt to locate named objects (detection and referring expressions,
arXiv 2407.07726) before it ever saw a robot action; a tiny model trained on actions alone never learns to look
(book/limitations.md). So the tiny base's first pre-training stage asks, about each frame and each object in it:

    where is the red cube   ->   the red cube is 4 cm left of and 9 cm below the gripper ACTION:

The answer is the privileged teacher's own spatial sentence (``teacher.privileged.describe_offset``): the object's
position relative to the gripper in whole centimetres per axis, in the robot's frame; the ACTION: marker ends it,
as it ends a rationale. Every object of a frame is asked about, so each frame comes as a counterfactual pair (or
more): the same pixels and state, a different name, a different answer; only the image can tell them apart.

Frames: the initial scenes of the grounding tasks on their own seeds (``SEED_OFFSET`` for training,
``PROBE_SEED_OFFSET`` for the held-out probe; disjoint from the demonstrations and evaluation seeds,
refinevla.data's seed table), each with the arm's joints moved by Gaussian noise so the wrist camera sees the
table from many poses; and the frames of recorded demonstrations (the poses of a grasp).

``probe`` is the representation check of the issue tracker's table: greedy answers on held-out frames, scored as
side accuracy (left / right of the gripper), per-axis error and the share within 1 cm on every axis.
"""
from __future__ import annotations

import json

import numpy as np
from tqdm import tqdm

from .scenes import randomized
from .sequences import join, pad
from .teacher.privileged import MAX_CM, describe_offset, parse_offset

#: grounding frames: seeds SEED_OFFSET + i (training), PROBE_SEED_OFFSET + i (the held-out probe); below 50_000.
#: Training frames past MAX_FRAMES continue on EXTRA_SEED_OFFSET + i (60_000..69_999; 50_000..51_999 are the
#: grounding benchmark's), up to MAX_TRAIN_FRAMES in all
SEED_OFFSET, PROBE_SEED_OFFSET, MAX_FRAMES = 40_000, 45_000, 5_000
EXTRA_SEED_OFFSET, MAX_TRAIN_FRAMES = 60_000, 15_000


def question(name: str) -> str:
    """The referring expression asked about one object."""
    return f"where is the {name}"


def frame_seeds(n: int, probe: bool = False) -> list[int]:
    """Seeds of the first ``n`` training frames (or probe frames): module constants above."""
    most = MAX_FRAMES if probe else MAX_TRAIN_FRAMES
    if not 0 < n <= most:
        raise ValueError(f"grounding {'probe_frames' if probe else 'frames'}={n}: expected 1..{most} (its seed range)")
    if probe:
        return [PROBE_SEED_OFFSET + i for i in range(n)]
    return [SEED_OFFSET + i if i < MAX_FRAMES else EXTRA_SEED_OFFSET + i - MAX_FRAMES for i in range(n)]


# ------------------------------------------------------------------------------------------------ frames
def perturbed_frame(sim, seed: int, arm_noise: float) -> dict:
    """The initial scene of ``seed`` with the arm's joints moved by N(0, arm_noise) radians (drawn from the seed)
    and the gripper opened at random: {image, state, objects}."""
    sim.reset(seed)
    rng = np.random.default_rng([int(seed), 7])
    data, robot = sim.env.sim.data, sim.robot
    joints = robot._ref_joint_pos_indexes
    data.qpos[joints] = data.qpos[joints] + rng.normal(0.0, arm_noise, len(joints))
    fingers = robot._ref_gripper_joint_pos_indexes["right"]
    opening = rng.uniform(0.0, 0.04)  # Panda fingers: [0, 0.04] and [-0.04, 0] metres
    data.qpos[fingers] = [opening, -opening]
    sim.env.sim.forward()
    seen = sim.render(segmentation=True)
    objects = sim.objects()
    plain = {v: k for k, v in dict(sim.spec.names).items()}
    for obj in objects:  # visible pixels of each object: an object out of view is not asked about
        geoms = sim._geoms_of(plain.get(obj["name"], obj["name"]))
        obj["pixels"] = int(np.isin(seen, geoms).sum())
    return dict(image=sim.render(), state=sim.state(), objects=objects)


def render_frames(tasks, seeds, image_size: int = 64, camera: str = "", arm_noise: float = 0.1,
                  desc: str = "grounding frames", split: str = "in_distribution",
                  variant_share: float = 0.0, order=None) -> list[dict]:
    """Frame i: task ``tasks[i % len(tasks)]``, scene ``seeds[i]`` (perturbed_frame); deterministic per seed.
    ``split`` "variant" shows each frame in the variant scene its seed draws (textures, lighting, camera:
    refinevla.scenes), as the evaluation's variant split does; ``variant_share`` shows that share of the seeds
    (``scenes.randomized``) so and the others in the default scene (the base's pre-training: scenes of many looks)."""
    from .sim import make_task

    plan = [(tasks[i % len(tasks)], "variant" if split == "variant" or randomized(int(seed), variant_share)
             else "in_distribution") for i, seed in enumerate(seeds)]
    # every simulator is made before the first frame, in a fixed order: the last one made holds the GL context the
    # renders use, so making one mid-way would change later pixels (the released base's frames were made so)
    # (``order``: the tasks in the order their simulators are made; default: as they first appear in ``tasks``)
    rank = {t: i for i, t in enumerate(dict.fromkeys(list(order or []) + list(tasks)))}
    sims = {key: make_task(key[0], image_size=image_size, segmentation=False, camera=camera, split=key[1])
            for key in sorted(dict.fromkeys(plan), key=lambda k: (k[1] == "variant", rank[k[0]]))}
    frames = []
    for seed, (task, scene) in zip(tqdm(seeds, desc=desc, mininterval=1.0), plan):
        frames.append(dict(perturbed_frame(sims[task, scene], seed, arm_noise), task=task, seed=int(seed),
                           split=scene))
    for sim in sims.values():
        sim.close()
    return frames


def frames_from_demos(ds, every: int = 1) -> list[dict]:
    """Every ``every``-th frame of a recorded demonstration set (image, state, privileged objects)."""
    keep = range(0, len(ds), max(1, every))
    sub = ds.select(list(keep)).select_columns(["image", "state", "objects", "task", "seed"])
    return [dict(image=np.asarray(r["image"], np.uint8), state=np.asarray(r["state"], np.float32),
                 objects=json.loads(r["objects"]), task=r["task"], seed=int(r["seed"])) for r in sub]


def grounding_rows(frames, min_pixels: int = 4) -> list[dict]:
    """One row per (frame, named object): the question, the answer and the true offset (metres, object - gripper).
    Objects without a plain name (visual markers), and objects with fewer than ``min_pixels`` visible pixels in a
    frame that counted them (perturbed_frame), are not asked about."""
    rows = []
    for f in frames:
        eef = np.asarray(f["state"], np.float64)[:3]
        for obj in f["objects"]:
            name = obj["name"]
            if " " not in name or obj.get("pixels", min_pixels) < min_pixels:  # robosuite's own names (e.g.
                continue  # "VisualCan") have no words the base knows; an object out of view cannot be located
            offset = np.asarray(obj["pos"], np.float64) - eef
            rows.append(dict(image=f["image"], state=np.asarray(f["state"], np.float32), name=name,
                             question=question(name), answer=describe_offset(name, offset), offset_m=offset,
                             seed=f.get("seed"), task=f.get("task")))
    return rows


# ------------------------------------------------------------------------------------------------ sequences
def encode_rows(rows, tok, n_image: int) -> dict:
    """Rows as training sequences (refinevla.sequences: the prompt, then the answer as the rationale and ACTION:,
    targets with token type 1 feeding L_reasoning, no actions); the same dict as ``train.encode_dataset``."""
    seqs = [join(tok.prompt_ids(r["question"], r["state"], n_image), tok.text_ids(r["answer"]), [],
                 marker=tok.marker_id) for r in rows]
    return pad(seqs, [r["image"] for r in rows], tok.pad_id)


# ------------------------------------------------------------------------------------------------ the probe
def true_cm(offset_m) -> np.ndarray:
    """The offset as the teacher states it: whole cm per axis, 0 below 1 cm, at most MAX_CM."""
    cm = np.round(np.abs(np.asarray(offset_m, np.float64)) * 100)
    cm = np.where(cm >= 1, np.minimum(cm, MAX_CM), 0)
    return np.sign(offset_m) * cm


def answers(model, tok, rows, batch_size: int = 64, max_tokens: int = 24) -> list[str]:
    """Greedy answers (text) to each row's question, in batches; the model is left in its training mode."""
    from .policy import VLAPolicy

    policy = VLAPolicy(model, tok, reasoning=True, max_rationale_tokens=max_tokens)
    was_training = model.training
    model.eval()
    out = []
    for start in tqdm(range(0, len(rows), batch_size), desc="grounding probe", leave=False):
        batch = rows[start:start + batch_size]
        decoded = policy._decode_many([(r["image"], r["question"], r["state"], True, None) for r in batch])
        out += [tok.decode_text(ids) for ids, _ in decoded]
    model.train(was_training)
    return out


def probe(model, tok, rows, batch_size: int = 64, max_tokens: int = 24) -> dict:
    """Greedy answers to each row's question -> {n, answered, side_accuracy (rows whose object is >= 1 cm left or
    right of the gripper), side_rows, within_1cm (every axis within 1 cm), exact, mae_cm [x, y, z]}."""
    return score(rows, answers(model, tok, rows, batch_size, max_tokens))


def score(rows, answers) -> dict:
    truth = np.stack([true_cm(r["offset_m"]) for r in rows])
    parsed = [parse_offset(a) for a in answers]
    ok = np.array([p is not None for p in parsed])
    pred = np.stack([p if p is not None else np.full(3, np.nan) for p in parsed])
    side = truth[:, 1] != 0
    side_right = np.sign(np.nan_to_num(pred[:, 1], nan=0.0)) == np.sign(truth[:, 1])
    err = np.abs(pred - truth)
    within = ok & np.all(np.nan_to_num(err, nan=1e9) <= 1, axis=1)
    exact = ok & np.all(np.nan_to_num(err, nan=1e9) == 0, axis=1)
    return dict(n=len(rows), answered=float(ok.mean()), side_rows=int(side.sum()),
                side_accuracy=float(side_right[side].mean()) if side.any() else float("nan"),
                within_1cm=float(within.mean()), exact=float(exact.mean()),
                mae_cm=[float(x) for x in np.nanmean(np.where(ok[:, None], err, np.nan), axis=0)],
                examples=[dict(question=r["question"], answer=a, truth=r["answer"])
                          for r, a in list(zip(rows, answers))[:6]])


def probe_models(models: dict, n_frames: int = 200, tasks=("pick_cube",), image_size: int = 64, camera: str = "",
                 arm_noise: float = 0.1, min_pixels: int = 4, splits=("in_distribution",)):
    """The grounding probe of several models (a display name -> model folder: a base or a fine-tune, load_vla) on
    the same held-out frames (the first ``n_frames`` probe seeds), shown in each scene split of ``splits`` -> one
    row per model and split (pandas DataFrame)."""
    import pandas as pd

    from .policy import load_vla

    rows = {split: grounding_rows(render_frames(list(tasks), frame_seeds(n_frames, probe=True), image_size, camera,
                                                arm_noise, desc=f"grounding probe frames ({split})", split=split),
                                  min_pixels) for split in splits}
    table = []
    for (name, model_dir), split in ((m, split) for m in models.items() for split in splits):
        model, tok, _ = load_vla(model_dir)
        s = probe(model, tok, rows[split])
        table.append(dict(model=name, split=split, questions=s["n"], answered=s["answered"], side_rows=s["side_rows"],
                          side_accuracy=s["side_accuracy"], within_1cm=s["within_1cm"], exact=s["exact"],
                          mae_x_cm=s["mae_cm"][0], mae_y_cm=s["mae_cm"][1], mae_z_cm=s["mae_cm"][2],
                          example=f"{s['examples'][0]['question']} -> {s['examples'][0]['answer']}"))
        del model
    return pd.DataFrame(table)
