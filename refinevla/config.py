"""One run's configuration: the stage sections (refinevla.sections), presets as short YAML diffs, overrides by key,
validation.

Every stage's config class lives in ``refinevla.sections`` (re-exported here), so that resolving, printing and
checking a run config imports no torch, transformers or datasets (``refinevla config`` answers at once). Each field
is declared with ``opt(default, help, ...)``: its help text (``describe_keys``, per-command help) and its allowed
values (``choices``, bounds ``ge``, ``gt``, ``le``, ``lt``) sit next to it. A preset (``refinevla/presets/*.yaml``)
changes a few defaults; command-line / notebook overrides change a few more. A key is dotted
(``refinevla.lambda_reason``), a short alias (``lambda_reason``) from ``ALIASES``, or a field name that exists in
exactly one section. ``resolve`` validates the whole config (``validate``: types, ranges, enumerations, cross-field
rules) before any stage deletes or writes anything; a ``ConfigError`` names the key, the value and what is allowed,
in one line. The resolved config is saved beside every stage's outputs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from .fields import ConfigError, ConfigKeyError, _bad, _hints, allowed, check_section, opt, set_field  # noqa: F401
from .schema import RATIONALE_PARTS  # noqa: F401
from .sections import (  # noqa: F401  the stage sections, importable from here as before
    SIZES, LORA_TARGETS, IN_DISTRIBUTION, VARIANT, SPLITS, AGGREGATIONS, QUERIES, MAX_DATA_SEED, EPISODES_PER_SEED,
    RESERVED_ARMS, _Checked, DataConfig, GroundingConfig, ModelConfig, TrainConfig, AnnotateConfig, EvaluateConfig, AttentionConfig,
    StudyConfig, with_arm_changes)

PRESETS_DIR = Path(__file__).parent / "presets"


# ------------------------------------------------------------------------------------------------- the run
@dataclass
class RunConfig:
    """Every stage of one run. ``root``/``name`` is the run folder; the book reads only from there."""

    name: str = "default"
    root: str = "data"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    annotate: AnnotateConfig = dataclasses.field(default_factory=AnnotateConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    pretrain: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(
        arm="pretrain", use_rationale=False, lambda_reason=0.0, steps=1500, batch_size=32, lr=1e-3))
    baseline: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(
        arm="baseline", use_rationale=False, lambda_reason=0.0))
    refinevla: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(
        arm="refinevla", use_rationale=True, lambda_reason=0.5))
    evaluate: EvaluateConfig = dataclasses.field(default_factory=EvaluateConfig)
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    study: StudyConfig = dataclasses.field(default_factory=StudyConfig)
    #: the released base's recipe (refinevla.recipe): stage (a) VLM pre-training, then ``pretrain`` as stage (b)
    vlm: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(
        arm="vlm", use_rationale=False, lambda_reason=1.0, steps=6000, batch_size=32, lr=2e-4, warmup_steps=100,
        cache_frozen=False))
    grounding: GroundingConfig = dataclasses.field(default_factory=GroundingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.root) / self.name

    def stage_dir(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS = ("data", "annotate", "model", "pretrain", "baseline", "refinevla", "evaluate", "attention", "study", "vlm",
            "grounding")
#: Short names for the keys readers change most (also the notebook parameters).
ALIASES = {
    "lambda_reason": "refinevla.lambda_reason",
    "finetune_steps": ["baseline.steps", "refinevla.steps"],
    "pretrain_steps": "pretrain.steps",
    "tune_top_k_layers": "model.tune_top_k_layers",
    "quantization": "model.quantization",
    "lora_r": "model.lora_r",
    "model_size": "model.size",
    "checkpoint": "model.checkpoint",
    "dataset": "data.source",
    "demos_per_task": "data.episodes_per_task",
    "episodes_per_task": "evaluate.episodes_per_task",
    "tasks": ["data.tasks", "evaluate.tasks"],
    "image_size": ["data.image_size", "evaluate.image_size"],
    "seed": ["data.seed", "pretrain.seed"],
    "seeds": "study.seeds",
    "action_chunk": "model.action_chunk",
    "eval_splits": "evaluate.splits",
    "gradient_checkpointing": ["pretrain.gradient_checkpointing", "baseline.gradient_checkpointing",
                               "refinevla.gradient_checkpointing"],
    "teacher": "annotate.teacher",
    "base_url": "annotate.base_url",
    "teacher_model": "annotate.model",
    "workers": ["data.workers", "evaluate.workers"],
}


# ------------------------------------------------------------------------------------------------- checking
def validate(cfg: RunConfig) -> RunConfig:
    """Check the whole run config (every section, then the rules across sections); raise a one-line ConfigError
    naming the key, the value and what is allowed. Called by ``resolve`` before any stage runs."""
    if not isinstance(cfg.name, str) or not re.fullmatch(r"\w[\w.-]*", cfg.name, re.ASCII):
        raise _bad("name", cfg.name, "a run folder name: letters, digits, '_', '.', '-' (not starting with '.' or '-')")
    if not isinstance(cfg.root, str) or not cfg.root:
        raise _bad("root", cfg.root, "a folder path")
    for section in SECTIONS:
        check_section(getattr(cfg, section), section)
    for name, spec in cfg.study.arms.items():  # against the run's own sections (e.g. the model's layer count)
        with_arm_changes(getattr(cfg, spec.get("from", "refinevla")), cfg.model, spec, f"study.arms.{name}")
    if not cfg.model.checkpoint:
        layers = SIZES[cfg.model.size]["text_layers"]
        if not -layers <= cfg.attention.layer < layers:
            raise _bad("attention.layer", cfg.attention.layer,
                       f"{-layers}..{layers - 1} (size {cfg.model.size!r} has {layers} decoder layers)")
    if cfg.data.source == "robosuite" and not cfg.model.checkpoint and not sum(cfg.data.pretrain_mix.values()):
        raise _bad("data.pretrain_mix", cfg.data.pretrain_mix, "at least one pre-training episode")
    if cfg.evaluate.backend == "robosuite":
        _check_eval_seeds(cfg.evaluate)
    for key in SHARED_TRAINING:  # the compared arms differ only in their data and loss
        ours, theirs = getattr(cfg.refinevla, key), getattr(cfg.baseline, key)
        if ours != theirs:
            raise _bad(f"refinevla.{key}", ours, f"the baseline's value, {theirs!r}: the compared arms share their "
                       f"training settings and differ only in the rationale and its loss; set both (-p baseline.{key} "
                       f"X -p refinevla.{key} X{', or -p finetune_steps X' if key == 'steps' else ''})")
    return cfg


#: TrainConfig fields the baseline and ReFineVLA sections must share (``validate``); an extra arm
#: (study.arms) may change any of them on purpose.
SHARED_TRAINING = ("steps", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "min_lr_ratio",
                   "clip_grad", "eval_every", "eval_batches", "cache_frozen", "augment_shift", "gradient_checkpointing")


def _check_eval_seeds(ev: EvaluateConfig) -> None:
    """Evaluation seeds stay in 10_000..19_999 (in distribution) and 20_000..29_999 (variant scenes): disjoint from
    the demonstrations' seeds (0..9_999 fine-tuning, 30_000.. pre-training; refinevla.data's seed table)."""
    ranges = {IN_DISTRIBUTION: (10_000, 20_000), VARIANT: (20_000, 30_000)}
    for split in ev.splits:
        low, high = ranges[split]
        seeds = ev.seed_list(split)
        if min(seeds) < low or max(seeds) >= high:
            key = "evaluate.seeds" if ev.seeds is not None else (
                "evaluate.base_seed" if split == IN_DISTRIBUTION else "evaluate.variant_base_seed")
            value = ev.seeds if ev.seeds is not None else seeds[0]
            raise _bad(key, value, f"{split} seeds within {low}..{high - 1} (this gives {min(seeds)}..{max(seeds)}; "
                                   "data seeds are 0..9999, pre-training seeds 30000 and up)")


# ------------------------------------------------------------------------------------------------- keys
def _section_fields(cfg: RunConfig) -> dict[str, set[str]]:
    return {s: {f.name for f in fields(getattr(cfg, s))} for s in SECTIONS}


def resolve_key(cfg: RunConfig, key: str) -> list[str]:
    """The dotted paths a key names; a clear error for unknown or ambiguous keys."""
    if key in ("name", "root"):
        return [key]
    if key in ALIASES:
        target = ALIASES[key]
        return target if isinstance(target, list) else [target]
    by_section = _section_fields(cfg)
    if "." in key:
        section, name = key.split(".", 1)
        if section not in by_section or name not in by_section[section]:
            known = sorted(by_section.get(section, [])) or list(SECTIONS)
            raise ConfigKeyError(f"unknown config key {key!r}; known in {section!r}: {known}")
        return [key]
    owners = [s for s, names in by_section.items() if key in names]
    if len(owners) == 1:
        return [f"{owners[0]}.{key}"]
    if not owners:
        raise ConfigKeyError(f"unknown config key {key!r}: use section.field (sections: {', '.join(SECTIONS)}) "
                       f"or an alias ({', '.join(sorted(ALIASES))})")
    raise ConfigKeyError(f"config key {key!r} is ambiguous (in {owners}); write it as section.{key}")


def apply_overrides(cfg: RunConfig, overrides: dict, check: bool = True) -> RunConfig:
    """Set each key (dotted, alias or unique field name), converting strings to the field's type; None values are
    skipped. ``check``: validate the whole config afterwards."""
    for key, value in overrides.items():
        if value is None:
            continue
        for path in resolve_key(cfg, key):
            if "." not in path:
                setattr(cfg, path, value if not isinstance(value, str) else value.strip())
                continue
            section, name = path.split(".", 1)
            set_field(getattr(cfg, section), name, value, path)
    return validate(cfg) if check else cfg


def model_sizes() -> list[str]:
    """The tiny-scale size presets (SIZES)."""
    return sorted(SIZES)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"preset={name!r}: unknown preset; expected one of {', '.join(list_presets())} (in {PRESETS_DIR})")
    return yaml.safe_load(path.read_text()) or {}


def resolve(preset: str = "default", overrides: dict | None = None, **params) -> RunConfig:
    """The run config: dataclass defaults, then the preset, then overrides (None values are ignored), validated.

    ``params`` are the notebook parameters (same keys as overrides), so a notebook can pass its whole
    parameters cell: ``resolve(preset, lambda_reason=lambda_reason, ...)``.
    """
    cfg = RunConfig(name=preset)
    flat = {}
    for section, values in load_preset(preset).items():
        if isinstance(values, dict):
            flat.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            flat[section] = values
    apply_overrides(cfg, flat, check=False)
    apply_overrides(cfg, dict(overrides or {}), check=False)
    apply_overrides(cfg, params, check=False)
    return validate(cfg)


def from_dict(d: dict) -> RunConfig:
    """Rebuild a RunConfig from a saved config.yaml."""
    cfg = RunConfig(name=d.get("name", "default"), root=d.get("root", "data"))
    flat = {f"{s}.{_LEGACY_KEYS.get(k, k) if isinstance(getattr(cfg, s), TrainConfig) else k}": v
            for s in SECTIONS for k, v in (d.get(s) or {}).items()}
    return apply_overrides(cfg, flat)


#: a training section's keys as configs saved before a rename spell them (results/study/config.yaml, the released
#: models' manifests): the run's name was "variant", a word the scene split also uses
_LEGACY_KEYS = {"variant": "arm"}


def config_hash(*parts) -> str:
    """Stable short hash of dataclasses / dicts / strings (what a stage's completion marker covers)."""
    def plain(p):
        return asdict(p) if dataclasses.is_dataclass(p) else p
    blob = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def notebook_config(preset: str, run: str = "", namespace: dict | None = None, overrides: dict | None = None):
    """The run config inside a notebook: its parameters cell holds the preset, the run name and any alias
    key (None = keep the preset's value); ``overrides`` takes dotted keys (``{"pretrain.lr": 3e-4}``)."""
    params = {k: v for k, v in (namespace or {}).items() if k in ALIASES and v is not None}
    cfg = resolve(preset, overrides, **params)
    if run:
        cfg.name = run
        validate(cfg)
    return cfg


def describe_keys(sections=SECTIONS, cfg: RunConfig | None = None) -> list[tuple[str, object, str]]:
    """(key, default, description) for every field of ``sections`` (section names of RunConfig), generated from the
    dataclasses: the default is ``cfg``'s value (the dataclass defaults when None), the description is the field's
    help followed by what it accepts; the aliases that set a key are named after it."""
    cfg = cfg or RunConfig()
    by_target = {}
    for alias, target in ALIASES.items():
        for path in target if isinstance(target, list) else [target]:
            by_target.setdefault(path, []).append(alias)
    rows = []
    for section in sections:
        stage = getattr(cfg, section)
        hints = _hints(type(stage))
        for f in fields(stage):
            key = f"{section}.{f.name}"
            text = f"{f.metadata.get('help', '')} [{allowed(f, hints[f.name])}]".strip()
            if key in by_target:
                text += f" (alias: {', '.join(by_target[key])})"
            rows.append((key, getattr(stage, f.name), text))
    return rows
