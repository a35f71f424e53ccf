"""One run's configuration: a dataclass per stage, presets as short YAML diffs, overrides by key.

Defaults live in the stage dataclasses (each in its own module); a preset (``refinevla/presets/*.yaml``)
changes a few of them; command-line / notebook overrides change a few more. A key is either dotted
(``refinevla.lambda_reason``) or a short alias (``lambda_reason``) from ``ALIASES``, or any field name that
exists in exactly one stage. The resolved config is saved beside every stage's outputs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from .model import ModelConfig
from .train import TrainConfig

PRESETS_DIR = Path(__file__).parent / "presets"


@dataclass
class DataConfig:
    """Where the demonstrations come from and how many."""

    source: str = "robosuite"        # robosuite | a LeRobot dataset id or local path (paper scale)
    tasks: list[str] = field(default_factory=lambda: ["pick_cube"])  # the fine-tuning (target) set
    episodes_per_task: int = 30
    #: the pre-training mixture (robosuite only), {task: episodes}: the role Open X-Embodiment plays for the paper's
    #: base; its own seeds (data.PRETRAIN_SEED_OFFSET), so no pre-training episode is a fine-tuning one
    pretrain_mix: dict = field(default_factory=lambda: {"pick_cube": 120, "lift": 40, "stack": 20})
    heldout_every: int = 10          # every 10th fine-tuning episode is held out of training (held-out loss)
    image_size: int = 64
    seed: int = 0                    # data seeds are seed*1000 + i: disjoint from the evaluation seeds
    workers: int = 2
    # LeRobot source only
    episodes: str = "0:10"          # episode range "a:b" or a count "n" of a seeded sample
    stride: int = 1                  # keep every k-th frame
    revision: str = "main"
    camera: str = ""                 # "" = the source's default camera (robosuite: the wrist camera)


@dataclass
class StudyConfig:
    """Which arms are trained and evaluated, and on how many fine-tuning seeds.

    The main arms (baseline, refinevla) are fine-tuned once per seed in ``seeds``; each extra arm in ``arms`` is the
    ``from`` arm's config with a few keys changed, fine-tuned on the first ``arm_seeds`` seeds. The same seed gives
    every arm the same adapter initialisation and the same data order (train.finetune)."""

    seeds: list[int] = field(default_factory=lambda: [0, 1])
    #: name -> {"from": baseline | refinevla, key: value, ...}; keys are fields of the training config, or
    #: "model.<field>" (e.g. model.tune_top_k_layers)
    arms: dict = field(default_factory=lambda: {
        "dropout": {"from": "refinevla", "rationale_dropout": 0.5},    # ECoT-Lite: reasoning dropout, act directly
        "after": {"from": "refinevla", "rationale_position": "after"},  # ECoT-Lite: rationale after the action
    })
    arm_seeds: int = 1               # seeds of each extra arm (the first ones of `seeds`)
    base: bool = True                # evaluate the pre-trained base without fine-tuning (the first row)
    oracle: bool = True              # evaluate ReFineVLA acting on the teacher's rationale (robosuite only)
    #: fine-tunes run side by side, one per process with one torch thread each (0 = auto: one per core on a CPU,
    #: one at a time on a GPU or under `accelerate launch`)
    parallel_finetunes: int = 0

    def __post_init__(self):
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"study.seeds={self.seeds}: give one or more distinct fine-tuning seeds")
        if not 0 <= self.arm_seeds <= len(self.seeds):
            raise ValueError(f"study.arm_seeds={self.arm_seeds} must be in 0..{len(self.seeds)} (len(study.seeds))")
        for name, spec in self.arms.items():
            if name in ("baseline", "refinevla", "base", "oracle", "pretrain"):
                raise ValueError(f"study.arms: {name!r} is a reserved arm name")
            if not isinstance(spec, dict) or spec.get("from", "refinevla") not in ("baseline", "refinevla"):
                raise ValueError(f"study.arms.{name}: needs a mapping with from: baseline | refinevla, got {spec!r}")


def _stage_defaults():
    from .attention import AttentionConfig
    from .evaluate import EvaluateConfig
    from .teacher import AnnotateConfig

    return AnnotateConfig, EvaluateConfig, AttentionConfig


@dataclass
class RunConfig:
    """Every stage of one run. ``root``/``name`` is the run folder; the book reads only from there."""

    name: str = "default"
    root: str = "data"
    data: DataConfig = field(default_factory=DataConfig)
    annotate: object = None
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(
        variant="pretrain", use_rationale=False, lambda_reason=0.0, steps=1500, batch_size=32, lr=1e-3))
    baseline: TrainConfig = field(default_factory=lambda: TrainConfig(
        variant="baseline", use_rationale=False, lambda_reason=0.0))
    refinevla: TrainConfig = field(default_factory=lambda: TrainConfig(
        variant="refinevla", use_rationale=True, lambda_reason=0.5))
    evaluate: object = None
    attention: object = None
    study: StudyConfig = field(default_factory=StudyConfig)

    def __post_init__(self):
        annotate_cls, evaluate_cls, attention_cls = _stage_defaults()
        self.annotate = self.annotate if self.annotate is not None else annotate_cls()
        self.evaluate = self.evaluate if self.evaluate is not None else evaluate_cls()
        self.attention = self.attention if self.attention is not None else attention_cls()

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


SECTIONS = ("data", "annotate", "model", "pretrain", "baseline", "refinevla", "evaluate", "attention", "study")
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
            raise KeyError(f"unknown config key {key!r}; known in {section!r}: {known}")
        return [key]
    owners = [s for s, names in by_section.items() if key in names]
    if len(owners) == 1:
        return [f"{owners[0]}.{key}"]
    if not owners:
        raise KeyError(f"unknown config key {key!r}: use section.field (sections: {', '.join(SECTIONS)}) "
                       f"or an alias ({', '.join(sorted(ALIASES))})")
    raise KeyError(f"config key {key!r} is ambiguous (in {owners}); write it as section.{key}")


def _coerce(current, value):
    """Parse strings from the command line into the type of the field they replace."""
    if not isinstance(value, str) or isinstance(current, str):
        return value
    parsed = yaml.safe_load(value)
    if isinstance(current, (list, tuple)) and isinstance(parsed, str):
        return [v.strip() for v in parsed.split(",") if v.strip()]
    if isinstance(current, float) and isinstance(parsed, (str, int)) and not isinstance(parsed, bool):
        try:
            return float(parsed)  # YAML reads "3e-4" as a string
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    return parsed


def apply_overrides(cfg: RunConfig, overrides: dict) -> RunConfig:
    """Set each key (dotted, alias or unique field name); values given as strings are parsed (YAML)."""
    for key, value in overrides.items():
        if value is None:
            continue
        for path in resolve_key(cfg, key):
            if "." not in path:
                setattr(cfg, path, value)
                continue
            section, name = path.split(".", 1)
            stage = getattr(cfg, section)
            setattr(stage, name, _coerce(getattr(stage, name), value))
    for section in SECTIONS:  # re-validate after changes
        stage = getattr(cfg, section)
        for check in ("__post_init__", "validate"):
            if hasattr(stage, check):
                getattr(stage, check)()
    return cfg


def model_sizes() -> list[str]:
    """The tiny-scale size presets (refinevla.model.SIZES)."""
    from .model import SIZES

    return sorted(SIZES)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.exists():
        raise ValueError(f"unknown preset {name!r}; known presets: {list_presets()} (in {PRESETS_DIR})")
    return yaml.safe_load(path.read_text()) or {}


def resolve(preset: str = "default", overrides: dict | None = None, **params) -> RunConfig:
    """The run config: dataclass defaults, then the preset, then overrides (None values are ignored).

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
    apply_overrides(cfg, flat)
    apply_overrides(cfg, dict(overrides or {}))
    apply_overrides(cfg, params)
    return cfg


def from_dict(d: dict) -> RunConfig:
    """Rebuild a RunConfig from a saved config.yaml."""
    cfg = RunConfig(name=d.get("name", "default"), root=d.get("root", "data"))
    flat = {f"{s}.{k}": v for s in SECTIONS for k, v in (d.get(s) or {}).items()}
    return apply_overrides(cfg, flat)


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
    return cfg
