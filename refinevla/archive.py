"""Committed results of a long run: its per-episode evaluation records, its resolved config and the keys of every
evaluated unit, exported into a small folder (``results/<run>/``) that the book reads without re-running anything.

    refinevla all --preset study && refinevla export --preset study    # or: make study (~2 h on 2 cores)

Files of ``results/<run>/``:
    config.yaml    the run's resolved config (RunConfig.to_dict)
    units.csv      one row per evaluated unit (arm, train_seed): what its arm changes, its config digest
                   (``unit_digest``: the config sections that made and evaluated it, and the base's release digest),
                   the stage keys of its fine-tune and of its evaluation (from the run's markers), its held-out losses
    episodes.csv   every episode: arm, train_seed, task, split, seed, success, steps
    grounding.csv  the grounding probe of the main fine-tunes (the attention stage), when the run has one
    stages.csv     the wall time of each stage
    manifest.json  the preset, the commit and the code digests of the stages it was made with, and when

``check(folder)`` verifies that the files carry the config they claim (tests/test_archive.py runs it on every
committed folder): the config is its preset's as resolved today, every unit's digest is the one that config gives,
and every unit holds every episode of every split once. Code digests are reported (``code_drift``), not required.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pandas as pd

from .config import RunConfig, config_hash, from_dict, resolve

REPO = Path(__file__).resolve().parent.parent
#: where ``export`` writes a run's results (results/<run name>/)
RESULTS = REPO / "results"
EPISODE_COLUMNS = ["arm", "train_seed", "task", "split", "seed", "success", "steps"]
CODE_STAGES = ("data", "annotate", "train", "evaluate")


class ArchiveError(ValueError):
    """A results folder that does not hold what it claims (one line naming the file and what differs)."""


def unit_digest(cfg: RunConfig, arm: str, seed: int) -> str:
    """Digest of everything in the config that made and evaluated one unit: the data and teacher sections, the
    arm's training and model sections (after its changes), the base (a release's digest), whether it writes its
    rationale at evaluation, and the evaluation section. Computable without the run's folders."""
    from . import pipeline
    from .stages import sections_upstream

    _, reasoning = pipeline._unit_model(cfg, arm, seed)
    base = pipeline._checkpoint_id(cfg) if cfg.model.checkpoint else ("pretrain", cfg.pretrain, cfg.model)
    evaluated = [cfg.evaluate, bool(reasoning), arm == pipeline.ORACLE]
    if arm == pipeline.BASE:
        return config_hash(base, *evaluated)
    trained = "refinevla" if arm == pipeline.ORACLE else arm
    tcfg, mcfg = pipeline.arm_configs(cfg, trained, seed)
    upstream = [getattr(cfg, s) for s in sections_upstream("annotate")]
    return config_hash(*upstream, tcfg, mcfg, base, cfg.data.heldout_every, *evaluated)


def _unit_row(cfg: RunConfig, arm: str, seed: int) -> dict:
    from . import markers, pipeline

    row = {"arm": arm, "train_seed": seed, "digest": unit_digest(cfg, arm, seed)}
    if arm != pipeline.BASE:
        trained = "refinevla" if arm == pipeline.ORACLE else arm
        tcfg, mcfg = pipeline.arm_configs(cfg, trained, seed)
        row.update(lambda_reason=tcfg.lambda_reason if tcfg.use_rationale else 0.0,
                   top_k=mcfg.tune_top_k_layers, rationale=tcfg.use_rationale,
                   position=tcfg.rationale_position if tcfg.use_rationale else "",
                   dropout=tcfg.rationale_dropout,
                   parts=" ".join(tcfg.rationale_parts or ()) if tcfg.use_rationale else "")
        train = markers.read_marker(pipeline.train_dir(cfg, trained, seed)) or {}
        meta_path = pipeline.train_dir(cfg, trained, seed) / "model" / "vla.json"
        final = json.loads(meta_path.read_text()).get("final_metrics", {}) if meta_path.exists() else {}
        row.update(train_key=train.get("hash", ""), heldout_l_action=final.get("heldout_l_action"),
                   heldout_l_reason=final.get("heldout_l_reason"))
    evaluated = markers.read_marker(pipeline.evaluate_dir(cfg, arm, seed)) or {}
    row["evaluate_key"] = evaluated.get("hash", "")
    return row


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def export(cfg: RunConfig, preset: str, overrides: dict | None = None, dest: Path | None = None) -> Path:
    """Write the results of ``cfg`` (``preset`` with ``overrides``; its evaluate stage finished) into ``dest``
    (default results/<run name>/); returns it.
    Refused in one line, before anything is written, when an evaluated unit is missing or was made under another
    config (the evaluate stage's own check, ``pipeline.require_input``-style)."""
    import yaml

    from . import markers, pipeline

    records_path = cfg.stage_dir("evaluate", "records.csv")
    if not records_path.exists():
        raise ArchiveError(f"{records_path} not found: run `refinevla evaluate --preset {preset}` first")
    units = pipeline.evaluated_units(cfg)

    def current(arm, seed):  # its model is the one cfg trains, and its evaluation the one cfg asks for
        folder, expected = pipeline.model_key(cfg, arm, seed)
        made = (markers.read_marker(folder) or {}).get("hash") if folder is not None else expected
        return made == expected and markers.is_done(pipeline.evaluate_dir(cfg, arm, seed),
                                                    pipeline.evaluate_key(cfg, arm, seed))
    stale = [f"{a} seed {s}" for a, s in units if not current(a, s)]
    if stale:
        raise ArchiveError(f"evaluation of {', '.join(stale[:3])}{' and more' if len(stale) > 3 else ''} is missing "
                           f"or was made under another config: run `refinevla evaluate --preset {preset}` first")
    records = pd.read_csv(records_path)
    wanted = set(units)
    records = records[[(a, int(s)) in wanted for a, s in zip(records["arm"], records["train_seed"])]]
    dest = Path(dest or RESULTS / cfg.name)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    pd.DataFrame([_unit_row(cfg, a, s) for a, s in units]).to_csv(dest / "units.csv", index=False)
    records[EPISODE_COLUMNS].sort_values(["arm", "train_seed", "task", "split", "seed"]).to_csv(
        dest / "episodes.csv", index=False)
    grounding = cfg.stage_dir("attention", "grounding.csv")
    if grounding.exists():
        pd.read_csv(grounding).to_csv(dest / "grounding.csv", index=False)
    markers.stage_times(cfg.run_dir).to_csv(dest / "stages.csv", index=False)
    manifest = {"preset": preset, "overrides": {k: str(v) for k, v in (overrides or {}).items()}, "run": cfg.name, "commit": _commit(), "exported": time.strftime("%Y-%m-%d %H:%M"),
                "code": {stage: markers.code_hash(stage) for stage in CODE_STAGES}}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return dest


def load(folder: Path | str) -> dict:
    """The files of a results folder: config (RunConfig, root set to the folder's parent so that no run folder is
    read through it), units, episodes, grounding (or None), stages, manifest."""
    import yaml

    folder = Path(folder)
    for name in ("config.yaml", "units.csv", "episodes.csv", "manifest.json"):
        if not (folder / name).exists():
            raise ArchiveError(f"{folder / name} not found: not a results folder (refinevla export)")
    cfg = from_dict(dict(yaml.safe_load((folder / "config.yaml").read_text()), root=str(folder.parent),
                         name=folder.name))
    optional = {name: pd.read_csv(folder / f"{name}.csv") if (folder / f"{name}.csv").exists() else None
                for name in ("grounding", "stages")}
    return {"config": cfg, "units": pd.read_csv(folder / "units.csv"),
            "episodes": pd.read_csv(folder / "episodes.csv"),
            "manifest": json.loads((folder / "manifest.json").read_text()), **optional}


def check(folder: Path | str) -> dict:
    """Load ``folder`` and verify it (``ArchiveError`` naming the first difference): its config is its preset's (with
    its overrides) as resolved today, its units are the ones that config evaluates with the digests it gives, and each unit holds
    every (task, split, seed) episode of the evaluation once. Returns what ``load`` returns."""
    from . import pipeline

    found = load(folder)
    cfg, units, episodes, preset = found["config"], found["units"], found["episodes"], found["manifest"]["preset"]
    today = resolve(preset, dict(found["manifest"].get("overrides") or {})).to_dict()
    claimed = {k: v for k, v in cfg.to_dict().items() if k not in ("name", "root")}
    differ = sorted(k for k in set(today) | set(claimed) if k not in ("name", "root") and today.get(k) != claimed.get(k))
    if differ:
        raise ArchiveError(f"{folder}/config.yaml is not the {preset} preset's config today (sections {differ} "
                           f"differ): regenerate the results (refinevla export) or restore the preset")
    wanted = pipeline.evaluated_units(cfg)
    have = [(str(a), int(s)) for a, s in zip(units["arm"], units["train_seed"])]
    if sorted(have) != sorted(wanted):
        raise ArchiveError(f"{folder}/units.csv lists {len(have)} units, the config evaluates {len(wanted)}")
    for (arm, seed), digest in zip(have, units["digest"]):
        if digest != unit_digest(cfg, arm, seed):
            raise ArchiveError(f"{folder}/units.csv: {arm} seed {seed} has digest {digest}, the config gives "
                               f"{unit_digest(cfg, arm, seed)}")
    jobs = sorted((t, sp, sd) for t in cfg.evaluate.tasks for sp in cfg.evaluate.splits
                  for sd in cfg.evaluate.seed_list(sp))
    for (arm, seed), got in episodes.groupby(["arm", "train_seed"]):
        keys = sorted(zip(got["task"], got["split"], got["seed"].astype(int)))
        if keys != jobs:
            raise ArchiveError(f"{folder}/episodes.csv: {arm} seed {seed} holds {len(keys)} episodes, not the "
                               f"{len(jobs)} of the evaluation config")
    if episodes.groupby(["arm", "train_seed"]).ngroups != len(wanted):
        raise ArchiveError(f"{folder}/episodes.csv does not hold every unit of units.csv")
    return found


def code_drift(found: dict) -> list[str]:
    """The stages whose code changed since the results were made (their digests differ from today's)."""
    from .markers import code_hash

    made = found["manifest"].get("code", {})
    return [stage for stage in CODE_STAGES if made.get(stage) not in (None, code_hash(stage))]
