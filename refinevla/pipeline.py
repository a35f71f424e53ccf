"""The stages of one run, each reading the previous stage's folder and writing its own.

    data (fine-tuning set, pre-training mixture) -> annotate -> train (pretrain; every arm x seed)
         -> evaluate (every arm x seed x split) -> attention -> book

A stage writes ``_done.json`` last; its hash covers the stage's config and the markers of its inputs, so
a stage whose config and inputs did not change is skipped, and changing, say, ``lambda_reason`` re-runs
the ReFineVLA fine-tune and everything downstream of it, nothing else. Inside a stage, work is written
incrementally (episodes, checkpoints, annotation cache), so a killed stage resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

from .config import RunConfig, config_hash

VARIANTS = ("baseline", "refinevla")  # the main arms: fine-tuned on every study seed
BASE = "base"        # the pre-trained base, evaluated without fine-tuning
ORACLE = "oracle"    # ReFineVLA acting after the privileged teacher's rationale (robosuite only)


# -------------------------------------------------------------------------------------- markers
def read_marker(stage_dir: Path) -> dict | None:
    path = Path(stage_dir) / "_done.json"
    return json.loads(path.read_text()) if path.exists() else None


def stage_key(section_cfgs, inputs=()) -> str:
    """Hash of a stage's config sections and of its input stages' markers."""
    upstream = [(read_marker(d) or {}).get("hash", "missing") for d in inputs]
    return config_hash(*section_cfgs, *upstream)


def is_done(stage_dir: Path, key: str) -> bool:
    marker = read_marker(stage_dir)
    return marker is not None and marker.get("hash") == key


def mark_done(stage_dir: Path, key: str, cfg: RunConfig, started: float, **extra) -> None:
    """Save the run config beside the outputs, then the marker (atomically, last)."""
    import os

    stage_dir = Path(stage_dir)
    cfg.save(stage_dir / "config.yaml")
    marker = dict(hash=key, finished=time.strftime("%Y-%m-%d %H:%M:%S"), wall_s=round(time.time() - started, 1),
                  **extra)
    tmp = stage_dir / "_done.json.tmp"
    tmp.write_text(json.dumps(marker, indent=1))
    os.replace(tmp, stage_dir / "_done.json")


def _clear_marker(stage_dir: Path) -> None:
    (Path(stage_dir) / "_done.json").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------- stages
def demos_dir(cfg: RunConfig) -> Path:
    return cfg.stage_dir("demos")


def run_data(cfg: RunConfig):
    """Demonstrations: the fine-tuning set (robosuite experts or a LeRobot subset) -> demos/dataset, and at the tiny
    scale the pre-training mixture -> demos_pretrain/dataset (its own seeds and tasks, no target masks)."""
    from .data import generate_demos, load_dataset_dir, load_source

    if cfg.data.source == "robosuite" and not cfg.model.checkpoint:
        out = cfg.stage_dir("demos_pretrain")
        key = stage_key([{k: getattr(cfg.data, k) for k in ("pretrain_mix", "image_size", "seed", "camera")}])
        if is_done(out, key):
            print(f"data (pre-training mixture): up to date in {out}")
        else:
            _clear_marker(out)
            started = time.time()
            ds = generate_demos(cfg.data, out, pretrain=True)
            mark_done(out, key, cfg, started, rows=len(ds))
    out = demos_dir(cfg)
    key = stage_key([{k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in ("pretrain_mix", "workers")}])
    if is_done(out, key):
        print(f"data: up to date in {out}")
        return load_dataset_dir(out / "dataset")
    _clear_marker(out)
    started = time.time()
    ds = load_source(cfg.data, out)
    mark_done(out, key, cfg, started, rows=len(ds))
    return ds


def run_annotate(cfg: RunConfig):
    """The teacher writes a rationale for every kept frame -> annotate/dataset."""
    from .data import load_dataset_dir
    from .teacher import annotate

    out, src = cfg.stage_dir("annotate"), demos_dir(cfg)
    key = stage_key([cfg.annotate], [src])
    if is_done(out, key):
        print(f"annotate: up to date in {out}")
        return load_dataset_dir(out / "dataset")
    _clear_marker(out)
    started = time.time()
    cfg.annotate.data_root = cfg.root
    ds = annotate(load_dataset_dir(src / "dataset"), cfg.annotate, out)
    if ds is None:  # a dry run: the estimate was printed, nothing was sent or written
        return None
    mark_done(out, key, cfg, started, rows=len(ds))
    return ds


def base_model_dir(cfg: RunConfig) -> Path | str:
    """Our pre-trained tiny base, or the real checkpoint named by model.checkpoint (paper scale)."""
    return cfg.model.checkpoint or cfg.stage_dir("train", "pretrain", "model")


def run_pretrain(cfg: RunConfig) -> Path | str:
    """Tiny scale only: pre-train the tiny PaliGemma action-only on the pre-training mixture (our stand-in for a
    VLA pre-trained on Open X-Embodiment); its held-out loss is scored on the fine-tuning set's held-out episodes.
    A LeRobot source has no simulator mixture: the tiny base is then pre-trained on the fine-tuning set's training
    episodes (a smoke path for the paper-scale data, not a transfer study)."""
    from .data import load_dataset_dir
    from .train import pretrain_base, split_heldout

    if cfg.model.checkpoint:
        print(f"pretrain: using the pre-trained checkpoint {cfg.model.checkpoint}")
        return cfg.model.checkpoint
    out, src, target = cfg.stage_dir("train", "pretrain"), cfg.stage_dir("demos_pretrain"), cfg.stage_dir("annotate")
    if cfg.data.source != "robosuite":  # no simulator mixture for a LeRobot source: pre-train on its own frames
        src = target
    key = stage_key([cfg.model.size, cfg.model.action_chunk, cfg.pretrain, cfg.data.heldout_every], [src, target])
    if is_done(out, key):
        print(f"pretrain: up to date in {out}")
        return out / "model"
    start_stage(out, key)
    started = time.time()
    annotated = load_dataset_dir(target / "dataset")
    texts = list(dict.fromkeys(list(annotated["instruction"]) + list(annotated["rationale_text"])))
    frames = split_heldout(annotated, cfg.data.heldout_every)[0] if src == target else load_dataset_dir(src / "dataset")
    path = pretrain_base(frames, cfg.model, cfg.pretrain, out, texts=texts,
                         heldout=split_heldout(annotated, cfg.data.heldout_every)[1])
    mark_done(out, key, cfg, started)
    return path


# ------------------------------------------------------------------------------------------ arms
def trained_arms(cfg: RunConfig) -> list[tuple[str, int]]:
    """Every (arm, seed) fine-tune of the study: the main arms on every seed, each extra arm on the first
    ``study.arm_seeds`` seeds."""
    seeds = list(cfg.study.seeds)
    runs = [(arm, seed) for arm in VARIANTS for seed in seeds]
    return runs + [(arm, seed) for arm in cfg.study.arms for seed in seeds[:cfg.study.arm_seeds]]


def arm_configs(cfg: RunConfig, arm: str, seed: int):
    """(TrainConfig, ModelConfig) of one arm and seed: the main arm's section, or an extra arm's changes on top of
    the arm it comes from; the seed sets adapter initialisation and data order."""
    from .config import _coerce

    if arm in VARIANTS:
        spec = {"from": arm}
    elif arm in cfg.study.arms:
        spec = dict(cfg.study.arms[arm])
    else:
        raise ValueError(f"unknown arm {arm!r}; the study trains {list(VARIANTS) + list(cfg.study.arms)}")
    tcfg = dataclasses.replace(getattr(cfg, spec.pop("from", "refinevla")), variant=arm, seed=seed)
    mcfg = dataclasses.replace(cfg.model)
    for key, value in spec.items():
        target, name = (mcfg, key[len("model."):]) if key.startswith("model.") else (tcfg, key)
        if not hasattr(target, name):
            raise ValueError(f"study.arms.{arm}: unknown key {key!r}")
        setattr(target, name, _coerce(getattr(target, name), value))
    tcfg.__post_init__()
    mcfg.__post_init__()
    return tcfg, mcfg


def train_dir(cfg: RunConfig, arm: str, seed: int) -> Path:
    return cfg.stage_dir("train", arm, f"seed{seed}")


def run_finetune(cfg: RunConfig, arm: str, seed: int | None = None) -> Path:
    """One fine-tune of ``arm`` from the base with ``seed`` (default: the first study seed)."""
    from .data import load_dataset_dir
    from .schema import BASE_COLUMNS
    from .train import finetune

    seed = cfg.study.seeds[0] if seed is None else seed
    tcfg, mcfg = arm_configs(cfg, arm, seed)
    base = base_model_dir(cfg)
    out, src = train_dir(cfg, arm, seed), cfg.stage_dir("annotate")
    key = _finetune_key(cfg, arm, seed)
    if is_done(out, key):
        print(f"{arm} seed {seed}: up to date in {out}")
        return out / "model"
    start_stage(out, key)
    started = time.time()
    required = BASE_COLUMNS + (("rationale_text", "rationale") if tcfg.use_rationale else ())
    path = finetune(load_dataset_dir(src / "dataset", required), base, mcfg, tcfg, out, cfg.data.heldout_every)
    mark_done(out, key, cfg, started)
    return path


def _finetune_key(cfg: RunConfig, arm: str, seed: int) -> str:
    tcfg, mcfg = arm_configs(cfg, arm, seed)
    inputs = [cfg.stage_dir("annotate")] + ([cfg.stage_dir("train", "pretrain")] if not cfg.model.checkpoint else [])
    return stage_key([mcfg, tcfg, str(base_model_dir(cfg)), cfg.data.heldout_every], inputs)


def start_stage(out: Path, key: str, partial=("ckpt", "metrics.jsonl")) -> None:
    """Before (re)starting a resumable stage: its partial outputs (checkpoints and metrics of a training stage,
    the episodes of an evaluation) are resumed only if they were written under the same key (config +
    inputs); those of another config are deleted, never resumed."""
    import shutil

    _clear_marker(out)
    if _stale_checkpoint(out, key):
        for name in partial:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "_key").write_text(key)


def _stale_checkpoint(out: Path, key: str) -> bool:
    key_file = out / "_key"
    return not key_file.exists() or key_file.read_text().strip() != key


def run_train(cfg: RunConfig) -> dict:
    """Pre-train (tiny scale), then every fine-tune of the study; returns {(arm, seed): model folder}.

    On a CPU the fine-tunes run side by side in ``parallel_finetunes`` processes (one torch thread each: a
    fine-tune of the tiny model does not speed up with a second thread as much as two fine-tunes do); each is
    seeded on its own, so the result does not depend on which ran where."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp

    run_pretrain(cfg)
    runs = trained_arms(cfg)
    todo = [(arm, seed) for arm, seed in runs if not is_done(train_dir(cfg, arm, seed), _finetune_key(cfg, arm, seed))]
    workers = _parallel_finetunes(cfg, len(todo))
    if workers > 1:
        print(f"{len(todo)} fine-tunes, {workers} at a time")
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                 initializer=_one_thread) as pool:
            for future in [pool.submit(run_finetune, cfg, arm, seed) for arm, seed in todo]:
                future.result()
    return {(arm, seed): run_finetune(cfg, arm, seed) for arm, seed in runs}


def _one_thread() -> None:
    import os

    os.environ["OMP_NUM_THREADS"] = "1"


def _parallel_finetunes(cfg: RunConfig, n: int) -> int:
    import os

    import torch

    if cfg.study.parallel_finetunes:
        return max(1, min(cfg.study.parallel_finetunes, n))
    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return 1
    return max(1, min(os.cpu_count() or 1, n))


# ------------------------------------------------------------------------------------------ evaluation
def policy_factory(model_dir, reasoning=None, threads=1, teacher_rationale=False):
    """A picklable factory: each evaluation worker loads its own copy of the policy."""
    from .policy import load_policy

    return functools.partial(load_policy, str(model_dir), reasoning=reasoning, threads=threads,
                             teacher_rationale=teacher_rationale)


def evaluated_units(cfg: RunConfig) -> list[tuple[str, int]]:
    """Every (arm, train seed) the evaluate stage runs: the base (seed -1), every fine-tune, and the oracle on the
    ReFineVLA models of the first ``study.arm_seeds`` seeds."""
    oracle = cfg.study.oracle and cfg.evaluate.backend not in SIMPLER_BACKENDS
    units = [(BASE, -1)] if cfg.study.base else []
    units += trained_arms(cfg)
    units += [(ORACLE, seed) for seed in cfg.study.seeds[:max(1, cfg.study.arm_seeds)]] if oracle else []
    return units


def evaluate_dir(cfg: RunConfig, arm: str, seed: int) -> Path:
    return cfg.stage_dir("evaluate", arm) if arm == BASE else cfg.stage_dir("evaluate", arm, f"seed{seed}")


def _unit_model(cfg: RunConfig, arm: str, seed: int) -> tuple[Path, bool]:
    """(model folder, whether it writes a rationale before acting) of an evaluated unit."""
    if arm == BASE:
        return Path(base_model_dir(cfg)), False
    trained = "refinevla" if arm == ORACLE else arm
    tcfg, _ = arm_configs(cfg, trained, seed)
    return train_dir(cfg, trained, seed) / "model", tcfg.reasons_at_inference and cfg.evaluate.reasoning


def evaluate_key(cfg: RunConfig, arm: str, seed: int) -> str:
    """The evaluation's key: its config, whether it reasons, the model's marker."""
    model_dir, reasoning = _unit_model(cfg, arm, seed)
    extra = ["teacher rationale"] if arm == ORACLE else []
    return stage_key([cfg.evaluate, reasoning] + extra, [model_dir.parent])


def run_evaluate(cfg: RunConfig, units=None):
    """Closed-loop evaluation of every unit on every split -> evaluate/<arm>/seed<k>/episodes.jsonl; then
    evaluate/records.csv (every episode, with its arm and train seed), success.csv (Wilson intervals per arm and
    split) and paired.csv (each arm against the baseline on the same episodes). Returns the success table."""
    import pandas as pd

    from .evaluate import evaluate, read_records, validate
    from .stats import comparison_table, success_table

    if cfg.evaluate.backend not in SIMPLER_BACKENDS:
        validate(cfg.evaluate)  # a bad split, task or seed list is refused before any finished episode is deleted
    frames, checks = [], []
    for arm, seed in units or evaluated_units(cfg):
        out = evaluate_dir(cfg, arm, seed)
        model_dir, reasoning = _unit_model(cfg, arm, seed)
        key = evaluate_key(cfg, arm, seed)
        if is_done(out, key):
            print(f"evaluate {arm} seed {seed}: up to date in {out}")
        else:
            how = " (acts on the teacher's rationale)" if arm == ORACLE else \
                " (writes its rationale before acting)" if reasoning else ""
            print(f"evaluate {arm} seed {seed}{how}")
            start_stage(out, key, partial=("episodes.jsonl",))  # episodes of another model or config: deleted
            started = time.time()
            if reasoning and arm != ORACLE:  # the gate: can it write the teacher's rationale for unseen frames?
                _rationale_check(cfg, model_dir, out)
            factory = policy_factory(model_dir, reasoning=reasoning, teacher_rationale=arm == ORACLE)
            if cfg.evaluate.backend in SIMPLER_BACKENDS:
                run_simpler_backend(factory, cfg.evaluate, out)
            else:
                evaluate(factory, cfg.evaluate, out)
            mark_done(out, key, cfg, started)
        records = pd.DataFrame(read_records(out / "episodes.jsonl"))
        if "split" not in records:
            records["split"] = "in_distribution"
        frames.append(records.assign(arm=arm, train_seed=seed))
        if (out / "rationale.csv").exists():
            checks.append(pd.read_csv(out / "rationale.csv").assign(arm=arm, train_seed=seed))
    if checks:
        pd.concat(checks, ignore_index=True).to_csv(cfg.stage_dir("evaluate", "rationale_accuracy.csv"), index=False)
    records = pd.concat(frames, ignore_index=True)
    records.to_csv(cfg.stage_dir("evaluate", "records.csv"), index=False)
    table = success_table(records)
    table.to_csv(cfg.stage_dir("evaluate", "success.csv"), index=False)
    if "baseline" in set(records["arm"]):
        comparison_table(records, reference="baseline", base_arms=(BASE,)).to_csv(
            cfg.stage_dir("evaluate", "paired.csv"), index=False)
    return table


def _rationale_check(cfg: RunConfig, model_dir: Path, out: Path) -> None:
    """Held-out rationale accuracy of a reasoning model -> out/rationale.csv (diagnostics.rationale_accuracy)."""
    from .data import load_dataset_dir
    from .diagnostics import rationale_accuracy
    from .train import split_heldout

    heldout = split_heldout(load_dataset_dir(cfg.stage_dir("annotate", "dataset")), cfg.data.heldout_every)[1]
    if heldout is not None:
        rationale_accuracy(model_dir, heldout, n=cfg.evaluate.rationale_frames).to_csv(out / "rationale.csv",
                                                                                       index=False)


SIMPLER_BACKENDS = {"simpler": "simpler_env", "simpler_env": "simpler_env", "maniskill3": "maniskill3"}


def run_simpler_backend(factory, ecfg, out: Path):
    """Paper scale: SimplerEnv's own protocol (every episode to the step limit, success at the last step)."""
    from .simpler import SimplerConfig, run_simpler

    scfg = SimplerConfig(backend=SIMPLER_BACKENDS[ecfg.backend], tasks=tuple(ecfg.tasks),
                         episodes=ecfg.episodes_per_task, image_size=ecfg.image_size)
    return run_simpler(factory, scfg, out)


def run_attention(cfg: RunConfig):
    """Attention maps and the attention-on-target score, baseline vs ReFineVLA (first seed) -> attention/."""
    from .attention import run_attention as attention_stage
    from .data import load_dataset_dir

    out, seed = cfg.stage_dir("attention"), cfg.study.seeds[0]
    inputs = [cfg.stage_dir("annotate")] + [train_dir(cfg, v, seed) for v in VARIANTS]
    key = stage_key([cfg.attention], inputs)
    if is_done(out, key):
        import pandas as pd
        print(f"attention: up to date in {out}")
        return pd.read_csv(out / "scores.csv")
    _clear_marker(out)
    started = time.time()
    models = {v: train_dir(cfg, v, seed) / "model" for v in VARIANTS}
    table = attention_stage(models, load_dataset_dir(cfg.stage_dir("annotate", "dataset")), cfg.attention, out)
    mark_done(out, key, cfg, started)
    return table


def stage_times(cfg: RunConfig) -> "pd.DataFrame":
    """Wall time of every finished stage of the run (from its marker), in pipeline order."""
    import pandas as pd

    rows = []
    for marker in sorted(cfg.run_dir.rglob("_done.json"), key=lambda p: p.stat().st_mtime):
        m = json.loads(marker.read_text())
        rows.append(dict(stage=str(marker.parent.relative_to(cfg.run_dir)), wall_s=m.get("wall_s"),
                         finished=m.get("finished")))
    table = pd.DataFrame(rows, columns=["stage", "wall_s", "finished"])
    if table.empty:
        return table
    ends = pd.to_datetime(table["finished"])
    first_start = (ends - pd.to_timedelta(table["wall_s"], unit="s")).min()
    summary = [dict(stage="sum of the stages (fine-tunes run side by side, so this counts them twice)",
                    wall_s=round(table["wall_s"].sum(), 1), finished=""),
               dict(stage="wall clock, first stage start to last stage end",
                    wall_s=round((ends.max() - first_start).total_seconds(), 1), finished="")]
    return pd.concat([table, pd.DataFrame(summary)], ignore_index=True)


STAGES = {"data": run_data, "annotate": run_annotate, "train": run_train, "evaluate": run_evaluate,
          "attention": run_attention}


def run_all(cfg: RunConfig) -> None:
    for name, fn in STAGES.items():
        print(f"== {name}")
        fn(cfg)
