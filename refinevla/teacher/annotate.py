"""Stage `annotate`: a teacher writes a four-part rationale for every (key) frame of the demos.

    annotate(demos, AnnotateConfig(), "data/run/annotate")              # privileged, offline
    annotate(demos, AnnotateConfig(teacher="http", model="gemini-3.8-flash", reasoning_effort="low", temperature=1.0,
             base_url="https://generativelanguage.googleapis.com/v1beta/openai/",
             api_key_env="GEMINI_API_KEY", stride=10, dry_run=True), out_dir)
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import yaml

from ..data import save_dataset
from ..schema import require_columns
from .cost import estimate, format_estimate
from .frames import key_frame_sources
from .privileged import run_privileged
from .rationale import Annotation, render_rationale
from .online import TeacherError
from .remote import HttpRun


def add_rationale_columns(demos, sources: list[int], notes: dict[int, Annotation]):
    """The demos plus the annotate columns; a non-key row carries its key frame's rationale and hash."""
    steps = demos.select_columns(["step_index"])[:]["step_index"]
    columns = {
        "rationale": [notes[s].rationale.model_dump_json() for s in sources],
        "rationale_text": [render_rationale(notes[s].rationale) for s in sources],
        "teacher": [notes[s].teacher for s in sources],
        "teacher_model": [notes[s].teacher_model for s in sources],
        "prompt_version": [notes[s].prompt_version for s in sources],
        "input_hash": [notes[s].input_hash for s in sources],
        "rationale_source_step": [int(steps[s]) for s in sources],
    }
    for name, values in columns.items():
        if name in demos.column_names:
            demos = demos.remove_columns(name)
        demos = demos.add_column(name, values)
    return demos


def write_text(path: Path, text: str) -> None:
    """Write via a temporary file and a rename (never half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def annotate(demos, cfg, out_dir):
    """Annotate `demos` (a datasets.Dataset of schema rows) and write `out_dir/dataset`, `cost.json` and
    `config.yaml`; return the annotated dataset. A dry run prints (and writes `cost_estimate.json`) what the
    HTTP run would send and cost, and returns None. If frames still fail after all attempts, no dataset is
    saved (cost.json and config.yaml are): a RuntimeError says how many, and a re-run asks only for them (the
    successes are cached). A run whose first frames all fail the same way stops early with one message."""
    cfg.validate()
    require_columns(demos.column_names, where="demos")
    out_dir = Path(out_dir)
    sources = key_frame_sources(demos, cfg)
    keys = sorted(set(sources))
    if cfg.dry_run:
        if cfg.teacher == "http":
            e = estimate(demos, keys, cfg)
        else:
            e = {"teacher": "privileged", "rows": len(sources), "key_frames": len(keys), "requests": 0,
                 "cost_usd": 0.0}
        print(format_estimate(e))
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "cost_estimate.json", e)
        return None
    notes, summary = HttpRun(demos, keys, cfg).run() if cfg.teacher == "http" else run_privileged(demos, keys)
    summary.update(rows=len(sources), key_frames=len(keys), stride=cfg.stride,
                   segment_by_phase=cfg.segment_by_phase)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "cost.json", summary)
    write_text(out_dir / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    if summary["failed"]:
        raise TeacherError(
            f"annotate: {summary['failed']} of {len(keys)} key frames failed after up to {cfg.max_attempts} "
            f"attempts (reasons in {out_dir / 'cost.json'}, e.g. {summary['failures'][0]['error']!r}); the "
            f"{len(notes)} successes are cached in {cfg.resolved_cache_path()}: "
            "re-run to retry only the failed ones")
    annotated = add_rationale_columns(demos, sources, notes)
    save_dataset(annotated, out_dir / "dataset")
    return annotated


def examples(ds, n: int = 3) -> list[dict]:
    """A few key frames (spread evenly over the dataset) with their instruction and rendered rationale."""
    cols = ds.select_columns(["episode_index", "step_index", "instruction", "rationale_text", "teacher",
                              "rationale_source_step"])[:]
    keys = [i for i, (s, src) in enumerate(zip(cols["step_index"], cols["rationale_source_step"])) if s == src]
    picked = [keys[int(j)] for j in np.linspace(0, len(keys) - 1, min(n, len(keys)))] if keys else []
    return [{k: cols[k][i] for k in ("episode_index", "step_index", "instruction", "rationale_text", "teacher")}
            for i in picked]
