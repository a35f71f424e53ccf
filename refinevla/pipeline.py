"""The stages of one run, each reading the previous stage's folder and writing its own.

    data (fine-tuning set, pre-training mixture) -> annotate -> train (pretrain; every arm x seed)
         -> evaluate (every arm x seed x split) -> attention -> book

A stage writes ``_done.json`` last; its key covers the stage's config, the markers of its inputs and the code it
runs (refinevla.markers), so a stage whose config, inputs and code did not change is skipped, and changing, say,
``lambda_reason`` re-runs the ReFineVLA fine-tunes and everything downstream of them, nothing else. A finished
stage with the same key in another run folder under the same root is copied instead of recomputed.
``force`` (``refinevla <stage> --force STAGE``: a stage, a part of one, or "all"; ``stages.force_names``) re-runs
a stage from scratch whatever its marker says; stages downstream of it re-run only if their key changes (force
them too, or ``--force all``). The stages and their order are declared in refinevla.stages; each function here
starts with ``stage_run`` and writes each of its folders through it (markers.StageRun).

Before a stage deletes or writes anything it validates the whole config (``config.validate``) and checks that
each input is the one the current config makes (its marker holds the key the current config expects): an
evaluation refuses a model trained under another config, in one line naming the keys that differ
(``StaleInputError``). Inside a stage, work is written incrementally (episodes, checkpoints, annotation cache),
so a killed stage resumes where it stopped. Under ``accelerate launch`` only the main process writes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import os
from pathlib import Path

from . import markers, stages
from .config import RunConfig, validate as _validate  # the whole config, before a stage writes
from .markers import (StaleInputError, is_done, is_main, mark_done, read_marker, require_current,  # noqa: F401
                      stage_key, start_stage)
from .stages import sections_upstream

MAIN_ARMS = ("baseline", "refinevla")  # the main arms: fine-tuned on every study seed
BASE = "base"        # the pre-trained base, evaluated without fine-tuning
ORACLE = "oracle"    # ReFineVLA acting after the privileged teacher's rationale (robosuite only)
#: the config sections a model's training reads (what a refusal to use a stale model compares)
MODEL_SECTIONS = sections_upstream("train")


# ------------------------------------------------------------------------------------- plumbing
def _forced(force, name: str) -> bool:
    """Whether ``force`` names the stage (or part of a stage) ``name``: itself, the stage it is part of, or "all"."""
    force, known = set(force or ()), stages.force_names()
    unknown = force - set(known)
    if unknown:
        raise ValueError(f"force={sorted(unknown)}: expected stage names from {list(known)}")
    whole = {stage.name for stage in stages.STAGES if name in stage.parts}
    return bool(force & ({name, "all"} | whole))


def stage_run(cfg: RunConfig, name: str, force=()) -> markers.StageRun:
    """One call of the stage (or part of a stage) ``name``: the whole config validated first, whether it is forced."""
    _validate(cfg)
    return markers.StageRun(cfg, _forced(force, name))


def _fix(cfg: RunConfig, command: str) -> str:
    return f"run `refinevla {command} --run {cfg.name}` first (with this config)"


# ---------------------------------------------------------------------------------------- stages
def demos_dir(cfg: RunConfig) -> Path:
    return cfg.stage_dir("demos")


def _pretrain_data_key(cfg: RunConfig) -> str:  # the share only when set: default-scene mixtures keep their keys
    share = ("pretrain_variant_share",) if cfg.data.pretrain_variant_share else ()
    fields = ("pretrain_mix", "image_size", "seed", "camera") + share
    return stage_key([{k: getattr(cfg.data, k) for k in fields}], code="data")


def _data_key(cfg: RunConfig) -> str:
    fields = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in ("pretrain_mix", "workers")}
    return stage_key([fields], code="data")


def _has_pretrain_mixture(cfg: RunConfig) -> bool:
    return cfg.data.source == "robosuite" and not cfg.model.checkpoint


def run_data(cfg: RunConfig, force=()):
    """Demonstrations: the fine-tuning set (robosuite experts or a LeRobot subset) -> demos/dataset, and at the tiny
    scale the pre-training mixture -> demos_pretrain/dataset (its own seeds and tasks, no target masks)."""
    from .data import generate_demos, load_dataset_dir, load_source

    run = stage_run(cfg, "data", force)
    if _has_pretrain_mixture(cfg):
        out, key = cfg.stage_dir("demos_pretrain"), _pretrain_data_key(cfg)
        if not run.done(out, key, "data (pre-training mixture)"):
            with run.writing(out, key) as marker:
                marker["rows"] = len(generate_demos(cfg.data, out, pretrain=True))
    out, key = demos_dir(cfg), _data_key(cfg)
    if run.done(out, key, "data"):
        return load_dataset_dir(out / "dataset")
    with run.writing(out, key) as marker:
        ds = load_source(cfg.data, out)
        marker["rows"] = len(ds)
    return ds


def _annotate_config(cfg: RunConfig):
    return dataclasses.replace(cfg.annotate, data_root=cfg.root)  # the teacher's cache lives under the run root


def _annotate_key(cfg: RunConfig) -> str:
    section = {k: v for k, v in dataclasses.asdict(cfg.annotate).items() if k != "data_root"}
    return stage_key([section], [demos_dir(cfg)], code="annotate")


def run_annotate(cfg: RunConfig, force=()):
    """The teacher writes a rationale for every kept frame -> annotate/dataset."""
    from .data import load_dataset_dir
    from .teacher import annotate

    run = stage_run(cfg, "annotate", force)
    out, src, key = cfg.stage_dir("annotate"), demos_dir(cfg), _annotate_key(cfg)
    require_input(cfg, "demos", "annotate")  # inputs first, always
    if run.done(out, key, "annotate"):
        return load_dataset_dir(out / "dataset")
    acfg = _annotate_config(cfg)
    if acfg.dry_run:  # the estimate is printed, nothing is sent or written
        return annotate(load_dataset_dir(src / "dataset"), acfg, out)
    with run.writing(out, key) as marker:
        ds = annotate(load_dataset_dir(src / "dataset"), acfg, out)
        marker["rows"] = len(ds)
    return ds


def base_model_dir(cfg: RunConfig) -> Path | str:
    """The base every arm starts from: model.checkpoint (the released tiny VLA ``models/tiny-vla``, found from any
    working directory, or a real checkpoint: paper scale), else the tiny base this run pre-trains itself."""
    from .release import resolve_checkpoint

    return resolve_checkpoint(cfg.model.checkpoint) if cfg.model.checkpoint else cfg.stage_dir("train", "pretrain",
                                                                                               "model")


def _checkpoint_id(cfg: RunConfig) -> str:
    """What the keys record of model.checkpoint: a released base by its manifest's digest, after verifying every
    file of it (refinevla.release; a missing or altered file stops the stage in one line), else its name."""
    from .release import checkpoint_id

    return checkpoint_id(cfg.model.checkpoint)


def _pretrain_inputs(cfg: RunConfig) -> tuple[Path, Path]:
    """(frames it trains on, the annotated fine-tuning set): the mixture at the robosuite scale; a LeRobot source
    has no simulator mixture, so the tiny base is then pre-trained on the fine-tuning set's own frames."""
    target = cfg.stage_dir("annotate")
    return (cfg.stage_dir("demos_pretrain") if cfg.data.source == "robosuite" else target), target


def _pretrain_key(cfg: RunConfig) -> str:
    return stage_key([cfg.model.size, cfg.model.action_chunk, cfg.pretrain, cfg.data.heldout_every],
                     list(_pretrain_inputs(cfg)), code="train")


def run_pretrain(cfg: RunConfig, force=()) -> Path | str:
    """Tiny scale only: pre-train the tiny PaliGemma action-only on the pre-training mixture (our stand-in for a
    VLA pre-trained on Open X-Embodiment); its held-out loss is scored on the fine-tuning set's held-out episodes.
    A LeRobot source has no simulator mixture: the tiny base is then pre-trained on the fine-tuning set's training
    episodes (a smoke path for the paper-scale data, not a transfer study)."""
    from .data import load_dataset_dir
    from .train import pretrain_base, split_heldout

    run = stage_run(cfg, "pretrain", force)
    if cfg.model.checkpoint:
        print(f"pretrain: using the pre-trained checkpoint {_checkpoint_id(cfg)}")
        return base_model_dir(cfg)
    out, key = cfg.stage_dir("train", "pretrain"), _pretrain_key(cfg)
    src, target = _pretrain_inputs(cfg)
    if src != target:
        require_input(cfg, "demos_pretrain", "pretrain")
    require_input(cfg, "annotate", "pretrain")
    if run.done(out, key, "pretrain", collective=True):
        return out / "model"
    with run.writing(out, key, partial=markers.RESUMED_TRAINING, collective=True):
        annotated = load_dataset_dir(target / "dataset")
        texts = list(dict.fromkeys(list(annotated["instruction"]) + list(annotated["rationale_text"])))
        frames = (split_heldout(annotated, cfg.data.heldout_every)[0] if src == target
                  else load_dataset_dir(src / "dataset"))
        path = pretrain_base(frames, cfg.model, cfg.pretrain, out, texts=texts,
                             heldout=split_heldout(annotated, cfg.data.heldout_every)[1])
    return path


# ------------------------------------------------------------------------------------------ arms
def trained_arms(cfg: RunConfig) -> list[tuple[str, int]]:
    """Every (arm, seed) fine-tune of the study: the main arms on every seed, each extra arm on the first
    ``study.arm_seeds`` seeds."""
    seeds = list(cfg.study.seeds)
    runs = [(arm, seed) for arm in MAIN_ARMS for seed in seeds]
    return runs + [(arm, seed) for arm in cfg.study.arms for seed in seeds[:cfg.study.arm_seeds]]


def arm_configs(cfg: RunConfig, arm: str, seed: int):
    """(TrainConfig, ModelConfig) of one arm and seed: the main arm's section, or an extra arm's changes on top of
    the arm it comes from (sections.with_arm_changes); the seed sets adapter initialisation and data order."""
    from .config import with_arm_changes

    if arm in MAIN_ARMS:
        spec = {"from": arm}
    elif arm in cfg.study.arms:
        spec = dict(cfg.study.arms[arm])
    else:
        raise ValueError(f"unknown arm {arm!r}; the study trains {list(MAIN_ARMS) + list(cfg.study.arms)}")
    tcfg, mcfg = with_arm_changes(getattr(cfg, spec.get("from", "refinevla")), cfg.model, spec, f"study.arms.{arm}")
    return dataclasses.replace(tcfg, arm=arm, seed=seed), mcfg


def train_dir(cfg: RunConfig, arm: str, seed: int) -> Path:
    return cfg.stage_dir("train", arm, f"seed{seed}")


def _finetune_key(cfg: RunConfig, arm: str, seed: int) -> str:
    tcfg, mcfg = arm_configs(cfg, arm, seed)
    inputs = [cfg.stage_dir("annotate")] + ([cfg.stage_dir("train", "pretrain")] if not cfg.model.checkpoint else [])
    base = _checkpoint_id(cfg) if cfg.model.checkpoint else "pretrain"
    return stage_key([mcfg, tcfg, base, cfg.data.heldout_every], inputs, code="train")


def run_finetune(cfg: RunConfig, arm: str, seed: int | None = None, force=()) -> Path:
    """One fine-tune of ``arm`` from the base with ``seed`` (default: the first study seed)."""
    from .data import load_dataset_dir
    from .schema import BASE_COLUMNS
    from .train import finetune

    run = stage_run(cfg, "finetune", force)
    seed = cfg.study.seeds[0] if seed is None else seed
    tcfg, mcfg = arm_configs(cfg, arm, seed)
    out, src, key = train_dir(cfg, arm, seed), cfg.stage_dir("annotate"), _finetune_key(cfg, arm, seed)
    _require_finetune_inputs(cfg, f"{arm} seed {seed}")
    # run_train has already met the other processes and left out the fine-tunes that are done
    if markers.ready(cfg.run_dir, out, key, run.forced, f"{arm} seed {seed}"):
        return out / "model"
    with run.writing(out, key, partial=markers.RESUMED_TRAINING, collective=True):
        required = BASE_COLUMNS + (("rationale_text", "rationale") if tcfg.use_rationale else ())
        path = finetune(load_dataset_dir(src / "dataset", required), base_model_dir(cfg), mcfg, tcfg, out,
                        cfg.data.heldout_every)
    return path


def _require_finetune_inputs(cfg: RunConfig, what: str) -> None:
    require_input(cfg, "annotate", what)
    if not cfg.model.checkpoint:
        require_input(cfg, "train/pretrain", what)


def run_train(cfg: RunConfig, force=()) -> dict:
    """Pre-train (tiny scale), then every fine-tune of the study; returns {(arm, seed): model folder}.

    On a CPU the fine-tunes run side by side in ``parallel_finetunes`` processes (one torch thread each: a
    fine-tune of the tiny model does not speed up with a second thread as much as two fine-tunes do); each is
    seeded on its own, so the result does not depend on which ran where."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp

    _validate(cfg)
    run_pretrain(cfg, force)
    _require_finetune_inputs(cfg, "train")
    runs = trained_arms(cfg)
    forced = _forced(force, "finetune")
    todo = [(arm, seed) for arm, seed in runs if not markers.ready(
        cfg.run_dir, train_dir(cfg, arm, seed), _finetune_key(cfg, arm, seed), forced, f"{arm} seed {seed}")]
    markers.sync()  # every process trains the same list (the main one may have copied some from another run)
    if not is_main() and not forced:
        todo = [(a, s) for a, s in todo if not is_done(train_dir(cfg, a, s), _finetune_key(cfg, a, s))]
    workers = _parallel_finetunes(cfg, len(todo))
    if workers > 1:
        print(f"{len(todo)} fine-tunes, {workers} at a time")
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker,
                                 initargs=(markers.pinned_code_hashes(),)) as pool:
            for future in [pool.submit(run_finetune, cfg, arm, seed, force) for arm, seed in todo]:
                future.result()
    else:
        for arm, seed in todo:
            run_finetune(cfg, arm, seed, force)
    return {(arm, seed): train_dir(cfg, arm, seed) / "model" for arm, seed in runs}


def _worker(code_hashes: dict) -> None:
    """A fine-tune worker: one torch thread, and the parent's code hashes (the keys of one run agree)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    markers.pin_code_hashes(code_hashes)


def _parallel_finetunes(cfg: RunConfig, n: int) -> int:
    import torch

    if markers.world_size() > 1:
        return 1
    if cfg.study.parallel_finetunes:
        return max(1, min(cfg.study.parallel_finetunes, n))
    if torch.cuda.is_available():
        return 1
    return max(1, min(os.cpu_count() or 1, n))


# ------------------------------------------------------------------------------------------ evaluation
def policy_factory(model_dir, reasoning=None, threads=1, teacher_rationale=False, unnorm_key=""):
    """A picklable factory: each evaluation worker loads its own copy of the policy."""
    from .policy import load_policy

    return functools.partial(load_policy, str(model_dir), reasoning=reasoning, threads=threads,
                             teacher_rationale=teacher_rationale, unnorm_key=unnorm_key)


def evaluated_units(cfg: RunConfig) -> list[tuple[str, int]]:
    """Every (arm, train seed) the evaluate stage runs: the base (seed -1), every fine-tune, and the oracle on the
    ReFineVLA models of the first ``study.arm_seeds`` seeds."""
    from .backends import PROTOCOL_BACKENDS

    oracle = cfg.study.oracle and cfg.evaluate.backend not in PROTOCOL_BACKENDS
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


def model_key(cfg: RunConfig, arm: str, seed: int) -> tuple[Path | None, str]:
    """(stage folder, the key the current config expects its marker to hold) of the model a unit evaluates;
    (None, checkpoint name) for a real checkpoint evaluated as the base."""
    if arm == BASE:
        if cfg.model.checkpoint:
            return None, _checkpoint_id(cfg)
        return cfg.stage_dir("train", "pretrain"), _pretrain_key(cfg)
    trained = "refinevla" if arm == ORACLE else arm
    return train_dir(cfg, trained, seed), _finetune_key(cfg, trained, seed)


def evaluate_key(cfg: RunConfig, arm: str, seed: int) -> str:
    """The evaluation's key: its config, whether it reasons, the model's marker, the evaluation code."""
    model_dir, reasoning = _unit_model(cfg, arm, seed)
    extra = ["teacher rationale"] if arm == ORACLE else []
    folder, checkpoint = model_key(cfg, arm, seed)
    inputs = [folder] if folder is not None else []
    return stage_key([cfg.evaluate, reasoning] + extra + ([] if inputs else [checkpoint]), inputs, code="evaluate")


def _require_model(cfg: RunConfig, arm: str, seed: int, stage: str = "evaluate") -> str:
    """The training key of the model a unit evaluates, if it is the one the current config trains; else a
    StaleInputError (nothing is deleted or evaluated)."""
    folder, expected = model_key(cfg, arm, seed)
    if folder is None:
        return expected
    return require_current(cfg, folder, expected, f"{stage} {arm} seed {seed}", _fix(cfg, "train"),
                           MODEL_SECTIONS)["hash"]


def run_evaluate(cfg: RunConfig, units=None, force=()):
    """Closed-loop evaluation of every unit on every split -> evaluate/<arm>/seed<k>/episodes.jsonl; then
    evaluate/records.csv (every episode, with its arm and train seed), success.csv (Wilson intervals per arm and
    split) and paired.csv (each arm against the baseline on the same episodes). Returns the success table.

    Every unit's model is checked first: a model whose training key is not the current config's is refused before
    any episode is deleted; each unit's marker records the key it evaluated. One WorkerPool serves every unit."""
    import pandas as pd

    from .backends import PROTOCOL_BACKENDS
    from .evaluate import WorkerPool, episode_jobs, evaluate, read_records
    from .stats import comparison_table, success_table

    run = stage_run(cfg, "evaluate", force)
    episode_jobs(cfg.evaluate)  # a bad split, task or seed list is refused before any finished episode is deleted
    units = list(units or evaluated_units(cfg))
    trained_keys = {(arm, seed): _require_model(cfg, arm, seed) for arm, seed in units}
    frames, checks = [], []
    pooled = cfg.evaluate.workers > 1 and cfg.evaluate.backend not in PROTOCOL_BACKENDS  # one pool for all units
    with WorkerPool(cfg.evaluate) if pooled else contextlib.nullcontext() as pool:  # workers start at first use
        for arm, seed in units:
            out = evaluate_dir(cfg, arm, seed)
            model_dir, reasoning = _unit_model(cfg, arm, seed)
            key = evaluate_key(cfg, arm, seed)
            if not run.done(out, key, f"evaluate {arm} seed {seed}"):
                print(f"evaluate {arm} seed {seed}" + (" (acts on the teacher's rationale)" if arm == ORACLE else
                                                       " (writes its rationale before acting)" if reasoning else ""))
                # another model's episodes are deleted, never resumed
                with run.writing(out, key, partial=("episodes.jsonl",)) as marker:
                    if reasoning and arm != ORACLE:  # the gate: can it write the teacher's rationale?
                        _rationale_check(cfg, model_dir, out)
                    factory = policy_factory(model_dir, reasoning=reasoning, teacher_rationale=arm == ORACLE,
                                             unnorm_key=cfg.model.unnorm_key)
                    evaluate(factory, cfg.evaluate, out, pool)  # every backend: robosuite, SimplerEnv, ManiSkill3
                    marker.update(model=str(model_dir), model_key=trained_keys[(arm, seed)])
            records = pd.DataFrame(read_records(out / "episodes.jsonl"))
            frames.append(records.assign(arm=arm, train_seed=seed, split=records.get("split", "in_distribution")))
            if (out / "rationale.csv").exists():
                checks.append(pd.read_csv(out / "rationale.csv").assign(arm=arm, train_seed=seed))
    records = pd.concat(frames, ignore_index=True)
    table = success_table(records)
    if not is_main():
        return table
    if checks:
        pd.concat(checks, ignore_index=True).to_csv(cfg.stage_dir("evaluate", "rationale_accuracy.csv"), index=False)
    records.to_csv(cfg.stage_dir("evaluate", "records.csv"), index=False)
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


def _probed_arms(cfg: RunConfig) -> list[tuple[str, int]]:  # the grounding probe reads every main fine-tune
    return [(v, s) for v, s in trained_arms(cfg) if v in MAIN_ARMS]


def attention_key(cfg: RunConfig) -> str:
    """The attention stage's key: its config and probe, the base (release digest or pre-training), its fine-tunes."""
    inputs = [cfg.stage_dir("annotate")] + [train_dir(cfg, v, s) for v, s in _probed_arms(cfg)]
    base = [_checkpoint_id(cfg)] if cfg.model.checkpoint else []
    if not cfg.model.checkpoint:
        inputs.append(cfg.stage_dir("train", "pretrain"))
    return stage_key([cfg.attention, cfg.data.image_size, cfg.data.camera, cfg.evaluate.splits] + base, inputs,
                     code="attention")


def run_attention(cfg: RunConfig, force=()):
    """Attention maps and the attention-on-target score, baseline vs ReFineVLA (first seed) -> attention/; then the
    grounding probe ("where is the red cube" on held-out frames, refinevla.grounding) of the base and of every
    baseline and ReFineVLA fine-tune -> attention/grounding.csv. The models are checked like the evaluation's, and
    the marker records their training keys."""
    from .attention import score_models
    from .data import load_dataset_dir

    run = stage_run(cfg, "attention", force)
    if cfg.model.base != "paligemma":  # attention is read out of the PaliGemma-path models only (refinevla.bases)
        print(f"attention: model.base={cfg.model.base} (a remote-code base): the attention stage reads PaliGemma-path "
              "models only; skipped")
        return None
    out, seed = cfg.stage_dir("attention"), cfg.study.seeds[0]
    probed = _probed_arms(cfg)
    key = attention_key(cfg)
    require_input(cfg, "annotate", "attention")
    trained_keys = {f"{v} seed {s}": _require_model(cfg, v, s, "attention") for v, s in probed}  # before "up to date"
    if run.done(out, key, "attention"):
        import pandas as pd
        return pd.read_csv(out / "scores.csv")
    with run.writing(out, key) as marker:
        models = {v: train_dir(cfg, v, seed) / "model" for v in MAIN_ARMS}
        table = score_models(models, load_dataset_dir(cfg.stage_dir("annotate", "dataset")), cfg.attention, out)
        if cfg.attention.grounding_frames and cfg.data.source == "robosuite":
            from .grounding import probe_models

            probed_models = {"base": base_model_dir(cfg)} | {f"{v} seed {s}": train_dir(cfg, v, s) / "model"
                                                             for v, s in probed}
            probe_models(probed_models, cfg.attention.grounding_frames, cfg.evaluate.tasks, cfg.data.image_size,
                         cfg.data.camera, splits=cfg.evaluate.splits).to_csv(out / "grounding.csv", index=False)
        marker["model_keys"] = trained_keys
    return table


def stage_times(cfg: RunConfig):
    """Wall time of every stage of the run, in pipeline order: a DataFrame (markers.stage_times)."""
    return markers.stage_times(cfg.run_dir)


# ------------------------------------------------------------------------------------------ inputs
#: the run folders a stage reads from an earlier stage: folder -> (its key, the command that makes it, the config
#: sections a refusal compares)
_INPUTS = {
    "demos": (_data_key, "data", sections_upstream("data")),
    "demos_pretrain": (_pretrain_data_key, "data", sections_upstream("data")),
    "annotate": (_annotate_key, "annotate", sections_upstream("annotate")),
    "train/pretrain": (_pretrain_key, "train", ("model", "pretrain")),
}


def require_input(cfg: RunConfig, folder: str, what: str) -> dict:
    """The marker of the run folder ``folder`` if it holds the key the current config gives (and its files are
    whole); else a one-line StaleInputError naming the command that makes it (markers.require_current)."""
    key, command, sections = _INPUTS[folder]
    return require_current(cfg, cfg.stage_dir(*folder.split("/")), key(cfg), what, _fix(cfg, command), sections)


def runner(stage: stages.Stage):
    """The function that runs a declared stage: ``stage.runner`` (a function, or "module:function" of this
    package), else this module's ``run_<name>``."""
    if callable(stage.runner):
        return stage.runner
    module, _, name = (stage.runner or f"pipeline:run_{stage.name}").partition(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def run_all(cfg: RunConfig, force=()) -> None:
    """Every stage of the run, in the declared order (refinevla.stages)."""
    for stage in stages.run_stages():
        print(f"== {stage.name}")
        runner(stage)(cfg, force=force)
