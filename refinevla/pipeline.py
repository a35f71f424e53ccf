"""The stages of one run, each reading the previous stage's folder and writing its own.

    data -> annotate -> train (pretrain, baseline, refinevla) -> evaluate -> attention -> book

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

VARIANTS = ("baseline", "refinevla")
#: ReFineVLA acting after the privileged teacher's rationale (evaluate.teacher_rationale; robosuite only)
ORACLE = "refinevla_teacher_rationale"


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
    """Demonstrations (robosuite experts or a LeRobot subset) -> demos/dataset."""
    from .data import load_dataset_dir, load_source

    out, key = demos_dir(cfg), stage_key([cfg.data])
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
    """Tiny scale only: pre-train the tiny PaliGemma action-only (our stand-in for a pre-trained VLA)."""
    from .data import load_dataset_dir
    from .train import pretrain_base

    if cfg.model.checkpoint:
        print(f"pretrain: using the pre-trained checkpoint {cfg.model.checkpoint}")
        return cfg.model.checkpoint
    out, src = cfg.stage_dir("train", "pretrain"), cfg.stage_dir("annotate")
    key = stage_key([cfg.model.size, cfg.pretrain], [src])
    if is_done(out, key):
        print(f"pretrain: up to date in {out}")
        return out / "model"
    start_stage(out, key)
    started = time.time()
    path = pretrain_base(load_dataset_dir(src / "dataset"), cfg.model, cfg.pretrain, out)
    mark_done(out, key, cfg, started)
    return path


def run_finetune(cfg: RunConfig, variant: str) -> Path:
    """One fine-tune from the base: ``baseline`` (actions only) or ``refinevla`` (rationale + actions)."""
    from .data import load_dataset_dir
    from .schema import BASE_COLUMNS
    from .train import finetune

    tcfg = getattr(cfg, variant)
    base = base_model_dir(cfg)
    out, src = cfg.stage_dir("train", variant), cfg.stage_dir("annotate")
    inputs = [src] + ([cfg.stage_dir("train", "pretrain")] if not cfg.model.checkpoint else [])
    key = stage_key([cfg.model, tcfg, str(base)], inputs)
    if is_done(out, key):
        print(f"{variant}: up to date in {out}")
        return out / "model"
    start_stage(out, key)
    started = time.time()
    required = BASE_COLUMNS + (("rationale_text",) if tcfg.use_rationale else ())
    path = finetune(load_dataset_dir(src / "dataset", required), base, cfg.model, tcfg, out)
    mark_done(out, key, cfg, started)
    return path


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
    """Pre-train (tiny scale), then both fine-tunes; returns {variant: model folder}."""
    run_pretrain(cfg)
    return {v: run_finetune(cfg, v) for v in VARIANTS}


def policy_factory(model_dir, reasoning=None, reason_every=1, threads=1, teacher_rationale=False):
    """A picklable factory: each evaluation worker loads its own copy of the policy."""
    from .policy import load_policy

    return functools.partial(load_policy, str(model_dir), reasoning=reasoning, reason_every=reason_every,
                             threads=threads, teacher_rationale=teacher_rationale)


def evaluated_variants(cfg: RunConfig) -> tuple[str, ...]:
    """The policies the evaluate stage runs: both fine-tunes, and the teacher-rationale oracle if asked for."""
    if cfg.evaluate.teacher_rationale and cfg.evaluate.backend in SIMPLER_BACKENDS:
        raise ValueError("evaluate.teacher_rationale needs the robosuite backend: the privileged teacher reads "
                         "object poses SimplerEnv does not give")
    return VARIANTS + ((ORACLE,) if cfg.evaluate.teacher_rationale else ())


def expert_factory(task: str):
    from .experts import make_expert

    return make_expert(task)


def trained_variant(variant: str) -> str:
    """The fine-tune an evaluated variant runs (the oracle runs the ReFineVLA model)."""
    return "refinevla" if variant == ORACLE else variant


def evaluate_key(cfg: RunConfig, variant: str) -> str:
    """The evaluation's key: its config, whether it reasons, the model's marker. The oracle switch is left out
    of the other variants' keys, so turning it on re-runs only the oracle."""
    trained = trained_variant(variant)
    reasoning = getattr(cfg, trained).use_rationale and cfg.evaluate.reasoning
    ecfg = {k: v for k, v in dataclasses.asdict(cfg.evaluate).items() if k != "teacher_rationale"}
    extra = ["teacher rationale"] if variant == ORACLE else []
    return stage_key([ecfg, reasoning] + extra, [cfg.stage_dir("train", trained)])


def run_evaluate(cfg: RunConfig, variants=None) -> dict:
    """Closed-loop evaluation of each fine-tuned policy -> evaluate/<variant>/episodes.jsonl + summary.csv;
    returns {variant: per-task summary} (evaluate.summarise) and writes evaluate/comparison.csv."""
    from .evaluate import compare_table, evaluate, summarise, read_records

    summaries = {}
    for variant in variants or evaluated_variants(cfg):
        trained = trained_variant(variant)
        out, src = cfg.stage_dir("evaluate", variant), cfg.stage_dir("train", trained)
        reasoning = getattr(cfg, trained).use_rationale and cfg.evaluate.reasoning
        key = evaluate_key(cfg, variant)
        if is_done(out, key):
            print(f"evaluate {variant}: up to date in {out}")
        else:
            start_stage(out, key, partial=("episodes.jsonl",))  # episodes of another model or config: deleted
            started = time.time()
            factory = policy_factory(src / "model", reasoning=reasoning, reason_every=cfg.evaluate.reason_every,
                                     teacher_rationale=variant == ORACLE)
            if cfg.evaluate.backend in SIMPLER_BACKENDS:
                run_simpler_backend(factory, cfg.evaluate, out)
            else:
                evaluate(factory, cfg.evaluate, out)
            mark_done(out, key, cfg, started)
        summaries[variant] = summarise(read_records(out / "episodes.jsonl"), tasks=list(cfg.evaluate.tasks))
    compare_table(summaries, ci=True).to_csv(cfg.stage_dir("evaluate", "comparison.csv"))
    return summaries


SIMPLER_BACKENDS = {"simpler": "simpler_env", "simpler_env": "simpler_env", "maniskill3": "maniskill3"}


def run_simpler_backend(factory, ecfg, out: Path):
    """Paper scale: SimplerEnv's own protocol (every episode to the step limit, success at the last step)."""
    from .simpler import SimplerConfig, run_simpler

    scfg = SimplerConfig(backend=SIMPLER_BACKENDS[ecfg.backend], tasks=tuple(ecfg.tasks),
                         episodes=ecfg.episodes_per_task, image_size=ecfg.image_size)
    return run_simpler(factory, scfg, out)


def run_attention(cfg: RunConfig):
    """Attention maps and the attention-on-target score, baseline vs ReFineVLA -> attention/."""
    from .attention import run_attention as attention_stage
    from .data import load_dataset_dir

    out = cfg.stage_dir("attention")
    inputs = [cfg.stage_dir("annotate")] + [cfg.stage_dir("train", v) for v in VARIANTS]
    key = stage_key([cfg.attention], inputs)
    if is_done(out, key):
        import pandas as pd
        print(f"attention: up to date in {out}")
        return pd.read_csv(out / "scores.csv")
    _clear_marker(out)
    started = time.time()
    models = {v: cfg.stage_dir("train", v, "model") for v in VARIANTS}
    table = attention_stage(models, load_dataset_dir(cfg.stage_dir("annotate", "dataset")), cfg.attention, out)
    mark_done(out, key, cfg, started)
    return table


STAGES = {"data": run_data, "annotate": run_annotate, "train": run_train, "evaluate": run_evaluate,
          "attention": run_attention}


def run_all(cfg: RunConfig) -> None:
    for name, fn in STAGES.items():
        print(f"== {name}")
        fn(cfg)
