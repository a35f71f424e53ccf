"""Demonstrations: scripted experts in robosuite (tiny scale) or a LeRobot dataset (paper scale), one schema.

Each robosuite episode is written to its own ``.npz`` as soon as it ends (atomically), so a killed run
resumes with the episodes it has; the episodes are then assembled into a Hugging Face ``datasets`` dataset.
Only successful expert episodes become demonstrations; the others are counted in ``stats.json``.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .lerobot import load_lerobot
from .scenes import randomized
from .schema import BASE_COLUMNS, EPISODES_PER_SEED, MAX_DATA_SEED, require_columns, row_features

EPISODE_KEYS = ("images", "target_masks", "states", "actions", "phases", "objects")

#: Episode seed ranges, fixed before any training and disjoint by construction (tests/test_data.py and tests/test_study.py check them):
#:   fine-tuning demos [seed*1000, seed*1000 + n) for data seeds 0..9          ->      0 ..  9_999
#:   evaluation, in-distribution scenes (evaluate.base_seed)                  -> 10_000 .. 19_999
#:   evaluation, variant scenes (evaluate.variant_base_seed)                  -> 20_000 .. 29_999
#:   pre-training demos 30_000 + [seed*1000, seed*1000 + n)                   -> 30_000 .. 39_999
#:   (frames, not episodes: grounding training 40_000 .. 44_999 and 60_000 .. 69_999, its probe 45_000 .. 49_999
#:   (refinevla.grounding); the grounding benchmark's 50_000 .. 51_999 (benchmarks/grounding.py))
PRETRAIN_SEED_OFFSET = 30_000


def data_seeds(seed: int, n: int, offset: int = 0) -> list[int]:
    """Seeds of the demonstrations: offset + [seed*1000, seed*1000 + n) (offset 0: the fine-tuning set,
    PRETRAIN_SEED_OFFSET: the pre-training mixture). Evaluation seeds start at 10_000 (see the table above)."""
    if n > EPISODES_PER_SEED:
        raise ValueError(f"data.episodes_per_task={n}: at most {EPISODES_PER_SEED} per data seed")
    if not 0 <= seed <= MAX_DATA_SEED:
        raise ValueError(f"data.seed={seed}: must be in 0..{MAX_DATA_SEED} (seeds 10_000 and up are evaluation seeds)")
    return [offset + seed * EPISODES_PER_SEED + i for i in range(n)]


# ------------------------------------------------------------------------------------- one episode
_TASK_CACHE: dict = {}


def _sim_task(task: str, image_size: int, camera: str = "", masks: bool = True, split: str = "in_distribution"):
    """One robosuite env per (task, size, camera, masks, split) per worker process: creating it costs more than an
    episode."""
    from .sim import make_task

    key = (task, image_size, camera, masks, split)
    if key not in _TASK_CACHE:
        _TASK_CACHE[key] = make_task(task, image_size=image_size, segmentation=masks, camera=camera, split=split)
    return _TASK_CACHE[key]


def record_episode(task: str, seed: int, image_size: int, camera: str = "", masks: bool = True,
                   split: str = "in_distribution") -> tuple[dict, bool]:
    """Run the scripted expert once; every frame with the action taken on it and the expert's phase.
    ``masks``: also render the target's segmentation mask per frame (the attention stage reads it); ``split``
    "variant": the scene's textures, lighting and camera are drawn from ``seed`` (refinevla.scenes)."""
    from .experts import make_expert

    sim = _sim_task(task, image_size, camera, masks, split)
    expert = make_expert(task, seed=seed)
    obs = sim.reset(seed)
    expert.reset(obs["instruction"])
    frames = {k: [] for k in EPISODE_KEYS}
    success = False
    for _ in range(sim.max_steps):
        action = expert.act(obs)
        frames["images"].append(obs["image"])
        frames["target_masks"].append(obs["target_mask"] if masks else np.zeros((1, 1), np.uint8))
        frames["states"].append(obs["state"])
        frames["actions"].append(np.asarray(action, np.float32))
        frames["phases"].append(expert.phase)
        frames["objects"].append(json.dumps(obs["objects"]))
        obs, success = sim.step(action)
        if success:
            break
    arrays = {k: np.asarray(v) for k, v in frames.items()}
    arrays["instruction"] = np.asarray(obs["instruction"])
    return arrays, success


def _episode_path(episodes_dir: Path, task: str, seed: int, split: str = "in_distribution") -> Path:
    return episodes_dir / f"{task}_{seed:06d}{'_variant' if split == 'variant' else ''}.npz"


def _write_npz(path: Path, arrays: dict) -> None:
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def _demo_job(job: tuple) -> dict:
    """Worker entry: record one episode and save it; returns its summary line."""
    task, seed, image_size, path, camera, masks, split = job
    t0 = time.time()
    arrays, success = record_episode(task, seed, image_size, camera, masks, split)
    arrays["success"] = np.asarray(success)
    _write_npz(Path(path), arrays)
    return dict(task=task, seed=seed, success=bool(success), steps=len(arrays["actions"]), wall_s=time.time() - t0)


# ------------------------------------------------------------------------------------------ the stage
def generate_demos(cfg, out_dir: str | Path, pretrain: bool = False):
    """Record expert episodes with ``cfg.workers`` processes; resumable. The fine-tuning set: ``cfg.episodes_per_task``
    per task of ``cfg.tasks``, with target masks; ``pretrain``: the pre-training mixture ``cfg.pretrain_mix``
    ({task: episodes}) on its own seeds, without masks.

    Returns the assembled ``datasets.Dataset`` (also saved to out_dir/dataset) and writes stats.json.
    """
    import multiprocessing as mp

    out_dir = Path(out_dir)
    episodes_dir = out_dir / "episodes"
    episodes_dir.mkdir(parents=True, exist_ok=True)
    counts = dict(cfg.pretrain_mix) if pretrain else {task: cfg.episodes_per_task for task in cfg.tasks}
    offset = PRETRAIN_SEED_OFFSET if pretrain else 0
    share = cfg.pretrain_variant_share if pretrain else 0.0  # the mixture may show randomized scenes, never the target
    jobs = [(task, seed, cfg.image_size, str(_episode_path(episodes_dir, task, seed, split)), cfg.camera,
             not pretrain, split)
            for task, n in counts.items() for i, seed in enumerate(data_seeds(cfg.seed, n, offset))
            for split in ["variant" if randomized(i, share) else "in_distribution"]]
    todo = [j for j in jobs if not Path(j[3]).exists()]
    print(f"{len(jobs)} episodes ({len(jobs) - len(todo)} already recorded), {cfg.workers} worker(s)")
    if todo:
        if cfg.workers > 1:
            with mp.get_context("spawn").Pool(cfg.workers) as pool:
                for _ in tqdm(pool.imap_unordered(_demo_job, todo), total=len(todo), desc="demos"):
                    pass
        else:
            for job in tqdm(todo, desc="demos"):
                _demo_job(job)
    ds, stats = assemble(jobs)
    stats["image_size"] = cfg.image_size
    save_dataset(ds, out_dir / "dataset")
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=1))
    return ds


def _load_episode(path: str) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def assemble(jobs: list[tuple]):
    """Successful episodes -> one dataset (episode_index numbers them in task, seed order) + statistics."""
    import datasets

    per_task: dict = {}
    kept = []
    for task, seed, _, path, *_ in jobs:
        ep = _load_episode(path)
        s = per_task.setdefault(task, dict(episodes=0, successes=0, frames=0))
        s["episodes"] += 1
        if bool(ep["success"]):
            s["successes"] += 1
            s["frames"] += len(ep["actions"])
            kept.append((task, seed, path))
    if not kept:
        raise RuntimeError("no successful expert episode: nothing to train on (check the scripted experts)")

    def rows():
        for index, (task, seed, path) in enumerate(kept):
            ep = _load_episode(path)
            for t in range(len(ep["actions"])):
                yield dict(episode_index=index, step_index=t, task=task, instruction=str(ep["instruction"]),
                           image=ep["images"][t], state=ep["states"][t].tolist(), action=ep["actions"][t].tolist(),
                           objects=str(ep["objects"][t]), phase=str(ep["phases"][t]),
                           target_mask=ep["target_masks"][t], seed=seed)

    ds = datasets.Dataset.from_generator(rows, features=row_features())
    for s in per_task.values():
        s["expert_success_rate"] = s["successes"] / max(1, s["episodes"])
    return ds, dict(tasks=per_task, episodes=len(kept), frames=len(ds))


def save_dataset(ds, path: Path) -> None:
    """save_to_disk into a temporary folder, then swap it in: a kill at any point leaves either the old dataset at
    ``path`` or, between the two renames, the old one beside it (``.<name>.old-<pid>``), which
    ``load_dataset_dir`` moves back. Temporary names carry the process id, so two processes never clash."""
    import shutil

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    ds.save_to_disk(str(tmp))
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _restore_interrupted_save(path: Path) -> None:
    """A kill between save_dataset's two renames leaves the previous dataset as .<name>.old-<pid>: put it back."""
    if path.exists():
        return
    olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds:
        os.replace(olds[-1], path)


def load_dataset_dir(path: str | Path, required=None):
    """A dataset saved by a stage, with a clear error when it is missing or lacks columns."""
    import datasets

    path = Path(path)
    _restore_interrupted_save(path)
    if not (path / "dataset_info.json").exists() and not (path / "state.json").exists():
        raise FileNotFoundError(f"{path}: no dataset here (run the stage that writes it first)")
    ds = datasets.load_from_disk(str(path))
    require_columns(ds.column_names, required or BASE_COLUMNS, where=str(path))
    return ds


def load_source(cfg, out_dir: str | Path):
    """The data stage for any source: robosuite demos, or a LeRobot dataset subset (paper scale)."""
    if cfg.source == "robosuite":
        return generate_demos(cfg, out_dir)
    out_dir = Path(out_dir)
    # an empty revision reads a known dataset at its pinned v2.x commit (refinevla/lerobot/conventions.py)
    ds = load_lerobot(cfg.source, episodes=cfg.episodes, stride=cfg.stride, revision=cfg.revision or None,
                      camera=cfg.camera or None, image_size=cfg.image_size)
    save_dataset(ds, out_dir / "dataset")
    (out_dir / "stats.json").write_text(json.dumps(dict(source=cfg.source, frames=len(ds),
                                                        episodes=len(set(ds["episode_index"]))), indent=1))
    return ds
