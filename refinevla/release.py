"""The released tiny base as a folder: ``models/tiny-base/``, committed like a hub checkpoint (safetensors weights,
tokenizer, ``vla.json``, ``manifest.json`` and the model card ``README.md``), written whole by ``write_release``
from the finished stages of the recipe (refinevla.recipe, ``make base``), and checked by ``verify_release``.

``manifest.json`` holds the recipe config, seeds, sizes, losses, the held-out grounding probe after each stage,
the base's own closed-loop success, the training time and the sha256 of every file. ``verify_release`` names a
missing or altered file in one line; a run that loads the base (``model.checkpoint: models/tiny-base``) verifies it
first and keys its stages by the manifest's digest (``checkpoint_id``), so a new release re-runs the fine-tunes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path

from .markers import StaleInputError

REPO = Path(__file__).resolve().parents[1]
MANIFEST, CARD = "manifest.json", "README.md"
#: what vocabulary_texts asks the simulator for: scenes per task, from these seeds (outside every other range)
VOCAB_SEEDS = range(49_000, 49_008)


class ReleaseError(StaleInputError):
    """A released base folder that is not the one its manifest describes; the message is one line (the command
    line exits with status 1, as for any input that is not the one the config names)."""


# ------------------------------------------------------------------------------------------------ paths
def resolve_checkpoint(name: str) -> str:
    """``model.checkpoint`` as a path: absolute or existing from here as given, else relative to the repository
    root when it exists there (``models/tiny-base`` from any working directory); anything else (a hub id) as is."""
    if not name:
        return name
    path = Path(name).expanduser()
    if path.is_absolute() or path.exists():
        return str(path)
    return str(REPO / path) if (REPO / path).exists() else name


def is_release(name: str) -> bool:
    return bool(name) and (Path(resolve_checkpoint(name)) / MANIFEST).is_file()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_release(path) -> dict:
    """The manifest of a released base folder, after checking every file it lists (size and sha256); a missing
    or altered file raises ReleaseError naming it, in one line, with the fix."""
    path = Path(resolve_checkpoint(str(path)))
    fix = f"restore it (git checkout -- {path}) or re-make the base (make base)"
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ReleaseError(f"{manifest_path}: missing; {path} is not a released refinevla base ({fix})")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as error:
        raise ReleaseError(f"{manifest_path}: unreadable ({type(error).__name__}: {error}); {fix}") from None
    for name, want in sorted(files.items()):
        f = path / name
        if not f.is_file():
            raise ReleaseError(f"{f}: missing (the release's manifest lists it); {fix}")
        if f.stat().st_size != want["bytes"] or sha256(f) != want["sha256"]:
            raise ReleaseError(f"{f}: altered (sha256 differs from the release's manifest); {fix}")
    return manifest


def checkpoint_id(name: str) -> str:
    """What a stage's key records of ``model.checkpoint``: a released base by its manifest's digest (verified
    first), anything else by its name."""
    if not is_release(name):
        return name
    verify_release(name)
    return f"{name}@{sha256(Path(resolve_checkpoint(name)) / MANIFEST)[:16]}"



# ------------------------------------------------------------------------------------------------ the folder
def _first_metrics(path: Path, n: int) -> list[dict]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(x) for x in lines[:n]]


def _curve(path: Path, every: int = 1) -> list[dict]:
    keep = ("step", "loss", "l_action", "l_reason", "heldout_l_action", "heldout_l_reason")
    lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return [{k: round(v, 4) if k != "step" else v for k, v in m.items() if k in keep}
            for i, m in enumerate(lines) if i % every == 0 or i == len(lines) - 1]


def write_release(cfg, work: Path, train_rows: list[dict], n_probe_rows: int, success: list[dict],
                  timings: dict) -> Path:
    """Assemble the release folder from the finished stages (written to a temporary folder, then renamed).
    ``success``: the base's closed loop, one dict per split (the first is ``closed_loop``, all ``closed_loop_splits``).
    The probe of each stage is ``probe`` (held-out frames, default scenes) and ``probe_variant`` (the same seeds in
    the variant scenes they draw)."""
    import torch
    import transformers

    from .grounding import EXTRA_SEED_OFFSET, MAX_FRAMES, PROBE_SEED_OFFSET, SEED_OFFSET

    out = Path(cfg.grounding.release_dir)
    out = out if out.is_absolute() else REPO / out
    tmp = out.with_name("." + out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(work / "vla" / "model", tmp)
    parent = checkpoint_id(cfg.model.checkpoint) if cfg.model.checkpoint else ""
    first = "parent" if parent else "vlm"  # a continued release: "a" is its parent, probed before stage (b)
    probes = {s: json.loads((work / d / "probe.json").read_text()) for s, d in (("a", first), ("b", "vla"))}
    variant = {s: p["variant"] for s, p in probes.items() if "variant" in p}
    probes = {s: p.get("in_distribution", p) for s, p in probes.items()}
    marker = json.loads((work / "vla" / "_done.json").read_text())
    params = json.loads((tmp / "vla.json").read_text())["parameters"]
    manifest = dict(
        name=out.name, kind="refinevla tiny base", architecture=f"PaliGemma ({cfg.model.size})", parameters=params,
        parent=parent,
        recipe=dict(preset_sections={s: dataclasses.asdict(getattr(cfg, s))
                                     for s in ("data", "model", "vlm", "pretrain", "grounding", "evaluate")},
                    command="make base"),
        seeds=dict(grounding_train=[SEED_OFFSET, SEED_OFFSET + min(cfg.grounding.frames, MAX_FRAMES) - 1],
                   **({"grounding_train_extra": [EXTRA_SEED_OFFSET, EXTRA_SEED_OFFSET + cfg.grounding.frames
                                                 - MAX_FRAMES - 1]} if cfg.grounding.frames > MAX_FRAMES else {}),
                   grounding_probe=[PROBE_SEED_OFFSET, PROBE_SEED_OFFSET + cfg.grounding.probe_frames - 1],
                   pretrain_mix=dict(cfg.data.pretrain_mix), vocabulary=[VOCAB_SEEDS.start, VOCAB_SEEDS.stop - 1],
                   pretrain_variant_share=cfg.data.pretrain_variant_share,
                   grounding_variant_share=cfg.grounding.variant_share,
                   evaluation={r["split"]: r["seeds"] for r in success}),
        data=dict(grounding_rows=len(train_rows), probe_rows=n_probe_rows, action_rows=marker.get("action_rows"),
                  stage_b_grounding_rows=marker.get("grounding_rows")),
        probe=probes, probe_variant=variant, closed_loop=success[0], closed_loop_splits=success, timings_s=dict(timings, total=round(sum(timings.values()), 1)),
        losses=dict(vlm=_curve(work / "vlm" / "metrics.jsonl", 10), vla=_curve(work / "vla" / "metrics.jsonl", 10)),
        #: what tests/test_release.py re-runs: stage (a)'s first logged steps, and which rows they trained on
        reproduce=dict(first_metrics=_first_metrics(work / ("vla" if parent else "vlm") / "metrics.jsonl", 2),
                       rows=[[int(r["seed"]), r["name"]] for r in train_rows]),
        environment=dict(python=platform.python_version(), torch=torch.__version__,
                         transformers=transformers.__version__, machine=platform.machine(),
                         threads=(cfg.pretrain if parent else cfg.vlm).threads),
        created=time.strftime("%Y-%m-%d"))
    (tmp / CARD).write_text(model_card(manifest))
    manifest["files"] = {p.name: dict(bytes=p.stat().st_size, sha256=sha256(p)) for p in sorted(tmp.iterdir())
                         if p.is_file()}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    print(f"released {out} ({size:.1f} MB)")
    return out


def train_seed_text(seeds: dict) -> str:
    """The seeds of a manifest's grounding training frames as a card shows them: "40000-43999", and the range past
    5,000 frames when there is one ("40000-44999, 60000-66999")."""
    return ", ".join(f"{r[0]}-{r[1]}" for r in (seeds.get("grounding_train"), seeds.get("grounding_train_extra")) if r)


def model_card(m: dict) -> str:
    """README.md of the release: what it is, how it was made, what it can do (numbers from the manifest)."""
    r, s, t = m["recipe"]["preset_sections"], m["closed_loop"], m["timings_s"]
    pa, pb, pv = m["probe"]["a"], m["probe"]["b"], m.get("probe_variant", {})
    loops = m.get("closed_loop_splits") or [s]
    loop_lines = "\n".join(f"- {x['split'].replace('_', ' ')} (seeds {x['seeds'][0] if x['seeds'] else '-'}-"
                           f"{x['seeds'][-1] if x['seeds'] else '-'}): **{x['successes']}/{x['episodes']}** successes "
                           f"(95% Wilson interval {x['ci95'][0]:.2f}-{x['ci95'][1]:.2f})" for x in loops)
    share = r["data"].get("pretrain_variant_share", 0.0), r["grounding"].get("variant_share", 0.0)
    scenes = (f"A share of the pre-training shows randomized scenes (textures, lighting and camera drawn from each "
              f"frame's or episode's own seed, as the evaluation's variant split draws its scenes from other seeds): "
              f"{share[1]:.0%} of the grounding frames and {share[0]:.0%} of the mixture's episodes. The fine-tuning "
              f"set of the study shows the default scene only." if any(share) else
              "Every pre-training frame shows the default scene.")
    row = lambda name, p: (f"| {name} | {p['n']} | {p['side_accuracy']:.3f} | {p['within_1cm']:.3f} | "
                           f"{p['exact']:.3f} | {' / '.join(f'{x:.2f}' for x in p['mae_cm'])} |")
    parent = m.get("parent", "")
    names = {"a": f"the parent ({parent.split('@')[0]})" if parent else "stage (a)",
             "b": "stage (c)" if parent else "stage (b)"}  # a continued release is the chain's third stage
    variant_rows = "".join("\n" + row(f"{names[k]}, variant scenes", pv[k]) for k in ("a", "b") if k in pv)
    threads = f"{m['environment']['threads']} thread" + ("s" if m['environment']['threads'] != 1 else "")
    if parent:
        intro = f"""A {m['architecture']} vision-language-action model, {m['parameters']['total']:,} parameters: the released
base `{parent.split('@')[0]}` (manifest digest {parent.split('@')[-1]}: its own card says how it was pre-trained, as a
VLM on referring expressions and then as a VLA on a robosuite mixture) trained further in a third stage (c)
(refinevla.recipe: stage (b) continued) on the actions of a scripted-expert mixture with grounding questions mixed in. It plays the role SpatialVLA
plays in the paper: the pre-trained VLA that ReFineVLA fine-tunes (`model.checkpoint: models/{m['name']}` in the
default preset). Made by `make base`; every number below comes from that run ({m['created']},
{m['environment']['machine']}, torch {m['environment']['torch']}, {threads})."""
        stage_a = f"| parent | `{parent}` | - | - | - | - |"
    else:
        intro = f"""A {m['architecture']} vision-language-action model, {m['parameters']['total']:,} parameters, pre-trained on
robosuite scenes in two stages (refinevla.recipe): (a) referring expressions ("where is the red cube" -> "the red
cube is 4 cm left of and 9 cm below the gripper"), (b) the actions of a scripted-expert mixture with those questions
mixed in. It plays the role SpatialVLA plays in the paper: the pre-trained VLA that ReFineVLA fine-tunes. Made by
`make base`; every number below comes from that run ({m['created']}, {m['environment']['machine']}, torch
{m['environment']['torch']}, {threads})."""
        stage_a = (f"| (a) VLM | {m['data']['grounding_rows']} questions about {r['grounding']['frames']} rendered frames of "
                   f"{', '.join(r['grounding']['tasks'])} (seeds {train_seed_text(m['seeds'])}, arm joints moved by N(0, {r['grounding']['arm_noise']}) rad) | "
                   f"{r['vlm']['steps']} | {r['vlm']['batch_size']} | {r['vlm']['lr']} | {r['vlm']['warmup_steps']} "
                   f"warm-up, cosine to {r['vlm']['min_lr_ratio']}x |")
    last = lambda stage, key: (m['losses'][stage][-1].get(key, float('nan')) if m['losses'][stage] else float('nan'))
    return f"""# {m['name']}: the refinevla tiny {'VLA' if parent else 'base'}

{intro}

{scenes}

## Recipe
| stage | data | steps | batch | peak lr | schedule |
|---|---|---|---|---|---|
{stage_a}
| {'(c) VLA, randomized scenes' if parent else '(b) VLA'} | {m['data']['action_rows']} action frames of {sum(r['data']['pretrain_mix'].values())} expert episodes ({', '.join(f'{k} {v}' for k, v in r['data']['pretrain_mix'].items())}; seeds 30000+) + {m['data']['stage_b_grounding_rows']} questions (lambda {r['pretrain']['lambda_reason']}) | {r['pretrain']['steps']} | {r['pretrain']['batch_size']} | {r['pretrain']['lr']} | {r['pretrain']['warmup_steps']} warm-up, cosine to {r['pretrain']['min_lr_ratio']}x |

Training time on {threads}: {'probing the parent' if parent else 'stage (a)'} {t['stage_a_s'] / 60:.1f} min, {names['b']} {t['stage_b_s'] / 60:.1f} min;
demonstrations {t['demonstrations_s'] / 60:.1f} min, frames {t['frames_s'] / 60:.1f} min, evaluation
{t['evaluate_s'] / 60:.1f} min (total {t['total'] / 60:.1f} min, those of a resumed run count only their last part).
Final training losses: {'' if parent else f"stage (a) {last('vlm', 'loss'):.3f}, "}{names['b']} action {last('vla', 'l_action'):.3f},
grounding {last('vla', 'l_reason'):.3f}.

## Grounding probe (held-out frames, seeds {m['seeds']['grounding_probe'][0]}-{m['seeds']['grounding_probe'][1]})
Greedy answers to "where is the <object>"; side: the object's left/right of the gripper (rows where it is >= 1 cm
to a side); within 1 cm: every axis; mean absolute error per axis (x ahead, y left, z up) in cm.

| after | questions | side accuracy | within 1 cm | exact | MAE x / y / z (cm) |
|---|---|---|---|---|---|
{row(names['a'], pa)}
{row(names['b'], pb)}{variant_rows}

## Closed loop
The base acting alone (no fine-tuning) on {', '.join(s['tasks'])}, on the study's evaluation seeds:
{loop_lines}

## Files
`model.safetensors` + `config.json` (transformers' PaliGemmaForConditionalGeneration), the word-level tokenizer
(`tokenizer.json`, `vla_tokens.json`: action and state bins, action chunk), `vla.json`, `manifest.json` (the recipe
config, seeds, losses every 10th logged line, the probe, the sha256 of every file). `refinevla.release.verify_release`
checks them; `tests/test_release.py` checks the committed releases and re-runs the first steps of the base's stage (a)
bit for bit.

## Limits
Trained on robosuite scenes of the grounding and mixture tasks seen through the wrist camera at 64 px; it knows those objects' names and
the teacher's words, nothing else. Bit-exact reproduction holds for the same library versions and one torch thread.
"""
