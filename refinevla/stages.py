"""The stages of a run, declared once: the pipeline, the command line, the book and the stage keys read this list.

A stage is one ``Stage`` in ``STAGES``: its name (its CLI command, what ``--force`` names, and the name of its code
in the stage keys), the config sections it reads (its ``--help`` lists their keys; its notebook's parameters cell
lists their aliases), the run folders it reads and writes (a notebook's skip key hashes their markers), the
``refinevla`` modules and installed distributions its key covers (refinevla.markers), its notebook and the function
that runs it. Adding a stage is one declaration here, its function (``pipeline.run_<name>`` by default) and its
notebook.

Nothing here imports anything of the package, so every module may read it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    #: what ``refinevla <name> --help`` says the command does
    help: str
    #: the config sections it reads (the command's --help and the notebook's parameters list their keys)
    sections: tuple[str, ...]
    #: entry modules of refinevla whose source (and everything they import) its key covers
    code: tuple[str, ...]
    #: distributions whose installed versions its results depend on (also in its key)
    dists: tuple[str, ...]
    #: run folders it writes, and run folders of earlier stages it reads
    outputs: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    #: its notebook under notebooks/ (None: run from the command line only)
    notebook: str | None = None
    #: what runs it, called as fn(cfg, force=...): a function, or "module:function" of refinevla; "" =
    #: pipeline.run_<name> (which starts with pipeline.stage_run and writes its folders through it)
    runner: object = ""
    #: names ``--force`` also takes for a part of the stage (train: pretrain, finetune)
    parts: tuple[str, ...] = ()
    #: whether ``refinevla all`` (and the book) runs it; the base is made once and released
    in_run: bool = True
    #: a stage outside the run: what ``--force`` takes in its own command, and what forcing it does
    own_force: tuple[str, ...] = ()
    force_help: str = ""
    #: what the command prints of the function's result ("{}" is the result); "" = a table's text, if it is one
    result_line: str = ""


STAGES: tuple[Stage, ...] = (
    Stage("data", "record the demonstrations (fine-tuning set; pre-training mixture at the tiny scale)",
          sections=("data",),
          code=("data", "lerobot", "sim", "experts", "scenes", "schema"),
          dists=("numpy", "datasets", "robosuite", "mujoco", "pillow"),
          outputs=("demos", "demos_pretrain"), notebook="01_data"),
    Stage("annotate", "the teacher writes a rationale for every kept frame",
          sections=("annotate",),
          code=("teacher",), dists=("datasets", "openai", "numpy", "pillow"),
          outputs=("annotate",), inputs=("demos",), notebook="02_annotate"),
    Stage("train", "pre-train the tiny base, then every fine-tune of the study",
          sections=("model", "pretrain", "baseline", "refinevla", "study"),
          code=("train", "model", "frozen", "tokens"),
          dists=("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "numpy", "safetensors"),
          outputs=("train",), inputs=("annotate", "demos_pretrain"), notebook="03_finetune",
          parts=("pretrain", "finetune")),
    Stage("evaluate", "closed-loop evaluation of every arm, seed and split",
          sections=("evaluate", "study"),
          code=("evaluate", "policy", "diagnostics", "stats"),
          dists=("torch", "transformers", "peft", "bitsandbytes", "robosuite", "mujoco", "numpy", "scipy"),
          outputs=("evaluate",), inputs=("train",), notebook="04_evaluate"),
    Stage("attention", "attention maps and the attention-on-target score",
          sections=("attention",),
          code=("attention", "policy"), dists=("torch", "transformers", "peft", "bitsandbytes", "numpy", "scipy"),
          outputs=("attention",), inputs=("train", "annotate"), notebook="05_attention"),
    Stage("base", "pre-train the tiny base (two stages) or continue a released one (the vla preset), probe it, "
                  "evaluate it and release it (models/tiny-base, models/tiny-vla)",
          sections=("data", "model", "vlm", "pretrain", "grounding", "evaluate"),
          code=("recipe", "release", "grounding", "train", "model", "frozen", "tokens", "sim", "scenes", "teacher"),
          dists=("torch", "transformers", "accelerate", "datasets", "numpy", "safetensors", "robosuite", "mujoco"),
          outputs=("base",), runner="recipe:run_base", in_run=False, own_force=("base",),
          force_help="re-make the base from scratch (the recorded demonstrations are kept)",
          result_line="The base: {}"),
)



def by_name(name: str) -> Stage:
    return {stage.name: stage for stage in STAGES}[name]


def run_stages() -> list[Stage]:
    """The stages ``refinevla all`` runs, in order."""
    return [stage for stage in STAGES if stage.in_run]


def force_names() -> tuple[str, ...]:
    """What ``--force`` may name in the run's commands: each stage of the run (its parts first), or "all"."""
    return tuple(name for stage in run_stages() for name in (*stage.parts, stage.name)) + ("all",)


def upstream(name: str) -> list[Stage]:
    """The stages of the run up to and including ``name`` whose folders ``name`` reads, directly or through
    another, in pipeline order."""
    folders = {out: stage for stage in STAGES for out in stage.outputs}
    todo, found = [name], set()
    while todo:
        stage = by_name(todo.pop())
        if stage.name in found:
            continue
        found.add(stage.name)
        todo += [folders[f].name for f in stage.inputs if f in folders]
    return [stage for stage in STAGES if stage.name in found]


def sections_upstream(name: str) -> tuple[str, ...]:
    """The config sections that made a stage's outputs: its own and those of every stage it reads (what a refusal
    to use a stale output compares)."""
    return tuple(dict.fromkeys(s for stage in upstream(name) for s in stage.sections))


def names() -> list[str]:
    return [stage.name for stage in STAGES]
