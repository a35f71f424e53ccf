"""The recipe of the released tiny base (``refinevla base``, ``make base``); the folder it writes and the check that a
folder is the one released are refinevla.release.

The paper fine-tunes SpatialVLA, whose VLM learnt to ground referring expressions before it saw robot actions
(PaliGemma 2, arXiv 2407.07726) and which was then trained on robot data (arXiv 2501.15830). The tiny base follows
the same two stages:

(a) **VLM pre-training** (``vlm`` section): referring expressions about rendered robosuite scenes, "where is the
    green cube" -> "the green cube is 4 cm left of and 9 cm below the gripper" (refinevla.grounding), every object of
    a frame asked about (counterfactual pairs: the same pixels, another name, another answer).
(b) **VLA pre-training** (``pretrain`` section): the action-only pre-training mixture (``data.pretrain_mix``), with
    the grounding rows mixed in so the base keeps looking while it learns to act.

A recipe may also continue a released base instead of building one (``model.checkpoint`` set to its folder; the
``vla`` preset: models/tiny-base -> models/tiny-vla): the parent, verified and keyed by its manifest's digest, is
probed as it is, then trained by stage (b) on that preset's mixture (half of it in randomized scenes), with the
parent's tokenizer, whose action bins are what its weights mean.

Then the held-out grounding probe after each stage (frames on their own seeds, never trained on), the base's own
closed-loop success (``evaluate`` section, one split), and the folder: weights (safetensors), tokenizer, vla.json,
``manifest.json`` (the recipe config, seeds, sizes, losses, probe, success, training time, the sha256 of every file)
and ``README.md`` (the model card). ``verify_release`` names a missing or altered file in one line; a run that
loads the base (``model.checkpoint: models/tiny-base``) verifies it first and keys its stages by the manifest's
digest, so a new release re-runs the fine-tunes.

Every step is resumable (demonstrations per episode, rendered frames per split, training checkpoints, evaluation
episodes) and keyed like a pipeline stage under ``data/<run>/base/``; the release folder is written last, whole.
The learning rate of both stages (2e-4) is the measured lever of book/limitations.md: at 1e-3 the tiny model's
attention readout of position does not learn.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from .release import MANIFEST, VOCAB_SEEDS, ReleaseError, is_release, resolve_checkpoint, verify_release, write_release


# ------------------------------------------------------------------------------------------------ vocabulary
def vocabulary_texts(tasks) -> list[str]:
    """The tokenizer's training texts, from the tasks' own scenes and the teacher's templates only (no recorded
    data, so the vocabulary is fixed by the code): every instruction, every object's question and offsets in
    every direction, every branch of the privileged rationale, and the integers 0..MAX_CM."""
    from .grounding import question
    from .sim import TASKS, make_task
    from .teacher import render_rationale
    from .teacher.privileged import MAX_CM, describe_offset, privileged_rationale

    texts = [" ".join(str(i) for i in range(MAX_CM + 1))]
    offsets = [np.array(v) * s for v in ((0.1, 0.05, 0.02), (0.02, 0.1, 0.05), (0.05, 0.02, 0.1)) for s in (1, -1)]
    # gripper placements relative to the target (metres) x openings: far, above, at, near; open, closing, closed
    placements = [np.array(v) for v in ((0.08, -0.06, 0.1), (0.0, 0.0, 0.05), (0.0, 0.0, 0.0), (0.0, 0.0, 0.02))]
    for task in dict.fromkeys(tasks):
        spec = TASKS[task]
        texts += [inst for _, inst in (spec.choices or ((spec.target, spec.instruction),))]
        sim = make_task(task, image_size=16, segmentation=False)
        for seed in VOCAB_SEEDS:
            sim.reset(seed)
            texts.append(sim.instruction)
            state, objects = sim.state(), sim.objects()
            target = next((o for o in objects if o["role"] == "target"), objects[0])
            for o in objects:
                if " " in o["name"]:
                    texts += [question(o["name"])] + [describe_offset(o["name"], v) for v in offsets]
            for place in placements:
                for opening in (1.0, 0.7, 0.0):
                    s = np.array(state, np.float64)
                    s[:3], s[7] = np.asarray(target["pos"]) + place, opening
                    texts.append(render_rationale(privileged_rationale(s, objects)))
        sim.close()
    return texts


def base_tokenizer(tasks, action_stats, state_stats, action_chunk: int):
    from .tokens import VLATokenizer

    return VLATokenizer.train_tiny(vocabulary_texts(tasks), action_stats, state_stats, action_chunk=action_chunk)


def recipe_tasks(cfg) -> list[str]:
    """Every task whose words the base must know: grounding, pre-training mixture, fine-tuning and evaluation."""
    return list(dict.fromkeys(list(cfg.grounding.tasks) + list(cfg.data.pretrain_mix) + list(cfg.data.tasks)
                              + list(cfg.evaluate.tasks)))


# ------------------------------------------------------------------------------------------------ frames
def _frames(cfg, out: Path, which: str) -> list[dict]:
    """The rendered grounding frames of one set, cached in out (resumable: written whole, once): "train" (a share
    grounding.variant_share of them in randomized scenes), "probe" (held out, default scenes) or "probe_variant"
    (the same held-out seeds in the variant scenes they draw, as the evaluation's variant split)."""
    from .grounding import frame_seeds, render_frames
    from .markers import stage_key

    g = cfg.grounding
    probe = which != "train"
    n = g.probe_frames if probe else g.frames
    share = 0.0 if probe else g.variant_share
    split = "variant" if which == "probe_variant" else "in_distribution"
    key = stage_key([g.tasks, n, g.arm_noise, cfg.data.image_size, cfg.data.camera, probe, share, split],
                    code="data")
    path = out / f"{which}-{key[:12]}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:  # each z[...] reads (and keeps) the whole array: once each
            images, states, meta = z["images"], z["states"], json.loads(str(z["meta"]))
        return [dict(m, image=images[i], state=states[i]) for i, m in enumerate(meta)]
    frames = render_frames(list(g.tasks), frame_seeds(n, probe), cfg.data.image_size, cfg.data.camera, g.arm_noise,
                           desc=f"grounding frames ({which})", split=split, variant_share=share)
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    meta = [{k: v for k, v in f.items() if k not in ("image", "state")} for f in frames]
    np.savez(tmp, images=np.stack([f["image"] for f in frames]), states=np.stack([f["state"] for f in frames]),
             meta=json.dumps(meta))
    os.replace(tmp, path)
    return frames


# ------------------------------------------------------------------------------------------------ the recipe
def _stage_keys(cfg) -> dict:
    from .markers import stage_key
    from .pipeline import _pretrain_data_key
    from .release import checkpoint_id

    g = dataclasses.asdict(cfg.grounding)
    g.pop("release_dir")
    model = [cfg.model.size, cfg.model.action_chunk, cfg.model.attn_implementation]
    # a continued release: the parent (by its manifest's digest) takes the place of stage (a)
    start = ["parent", checkpoint_id(cfg.model.checkpoint)] if cfg.model.checkpoint else [model, cfg.vlm]
    vlm = stage_key(start + [g, cfg.data.image_size, cfg.data.camera, _pretrain_data_key(cfg)], code="base")
    vla = stage_key([vlm, cfg.pretrain], code="base")
    return dict(vlm=vlm, vla=vla, evaluate=stage_key([vla, cfg.evaluate, cfg.grounding.eval_splits], code="evaluate"))


def run_base(cfg, force=()) -> Path:
    """Make the released base (module docstring) -> cfg.grounding.release_dir; returns that folder."""
    from . import markers
    from .data import generate_demos, load_dataset_dir
    from .grounding import encode_rows, frames_from_demos, grounding_rows, probe
    from .markers import mark_done, start_stage
    from .model import build_tiny_vla, load_base, parameter_counts
    from .pipeline import _pretrain_data_key, _validate
    from .sequences import concat
    from .train import _save_model_dir, _stats_from, encode_dataset, num_image_tokens, train_loop

    _validate(cfg)
    parent = resolve_checkpoint(cfg.model.checkpoint) if cfg.model.checkpoint else ""
    if parent and not is_release(parent):
        raise ValueError(f"model.checkpoint={cfg.model.checkpoint!r}: a recipe continues a released base only (a "
                         f"folder with {MANIFEST}, e.g. models/tiny-base); or '' to build the tiny base itself")
    forced = bool(set(force or ()) & {"base", "all"})
    work, g = cfg.stage_dir("base"), cfg.grounding
    keys, timings = _stage_keys(cfg), {}

    # the pre-training mixture's demonstrations (resumable per episode)
    demos_dir, key = work / "demos", _pretrain_data_key(cfg)
    t = time.time()
    if not markers.ready(cfg.run_dir, demos_dir, key, forced, "base: demonstrations"):
        start_stage(demos_dir, key, partial=(), fresh=False)  # recorded episodes are kept (named by task and seed)
        demos = generate_demos(cfg.data, demos_dir, pretrain=True)
        mark_done(demos_dir, key, cfg, t, rows=len(demos))
    demos = load_dataset_dir(demos_dir / "dataset")
    timings["demonstrations_s"] = round(time.time() - t, 1)

    t = time.time()
    train_frames = _frames(cfg, work / "frames", "train")
    probe_frames = _frames(cfg, work / "frames", "probe")
    variant_rows = grounding_rows(_frames(cfg, work / "frames", "probe_variant"), g.min_pixels)
    timings["frames_s"] = round(time.time() - t, 1)
    train_rows, probe_rows = grounding_rows(train_frames, g.min_pixels), grounding_rows(probe_frames, g.min_pixels)
    print(f"grounding: {len(train_frames)} frames -> {len(train_rows)} questions (train, "
          f"{sum(f['split'] == 'variant' for f in train_frames)} frames in randomized scenes), "
          f"{len(probe_frames)} -> {len(probe_rows)} (probe), {len(variant_rows)} (probe, variant scenes)")
    probes = lambda model: {"in_distribution": probe(model, tok, probe_rows), "variant": probe(model, tok, variant_rows)}
    if parent:  # the parent's tokenizer: its action bins are what its weights mean
        from .tokens import VLATokenizer

        tok = VLATokenizer.load(parent)
    else:
        action_stats, state_stats = _stats_from(demos)
        if g.state_bins == "frames":  # the frames' arm poses too, angles unwrapped (limitations: tried, no gain)
            from .schema import STATE_ANGLES
            from .tokens import BinStats

            states = np.concatenate([np.asarray(demos["state"], np.float32),
                                     np.stack([f["state"] for f in train_frames])])
            state_stats = BinStats.fit(states, angles=STATE_ANGLES)
        tok = base_tokenizer(recipe_tasks(cfg), action_stats, state_stats, action_chunk=cfg.model.action_chunk)

    # stage (a): VLM pre-training on referring expressions (a continued release: the parent, probed as it is)
    vlm_dir = work / ("parent" if parent else "vlm")
    t = time.time()
    if markers.ready(cfg.run_dir, vlm_dir, keys["vlm"], forced,
                     "base: the parent release" if parent else "base: stage (a) VLM pre-training"):
        model = load_base(parent or vlm_dir / "model")
    elif parent:
        start_stage(vlm_dir, keys["vlm"], fresh=forced)
        model = load_base(parent)
        print(f"continuing the released base {cfg.model.checkpoint}: probing it first")
        (vlm_dir / "probe.json").write_text(json.dumps(probes(model), indent=1))
        mark_done(vlm_dir, keys["vlm"], cfg, t)
    else:
        start_stage(vlm_dir, keys["vlm"], fresh=forced)
        model = build_tiny_vla(cfg.model.size, tok.vocab_size, tok.image_id, tok.pad_id, seed=cfg.vlm.seed,
                               attn_implementation=cfg.model.attn_implementation)
        n_image = num_image_tokens(model)
        print(f"tiny VLA ({cfg.model.size}): {parameter_counts(model)['total']:,} parameters, "
              f"vocabulary {tok.vocab_size}")
        held = encode_rows(probe_rows, tok, n_image)
        last = train_loop(model, encode_rows(train_rows, tok, n_image), cfg.vlm, vlm_dir, heldout=held)
        _save_model_dir(model, tok, vlm_dir / "model", dict(kind="base", stage="vlm", final_metrics=last))
        (vlm_dir / "probe.json").write_text(json.dumps(probes(model), indent=1))
        mark_done(vlm_dir, keys["vlm"], cfg, t)
    timings["stage_a_s"] = round(time.time() - t, 1)

    # stage (b): VLA pre-training on the mixture's actions, the grounding rows mixed in
    vla_dir = work / "vla"
    t = time.time()
    n_image = num_image_tokens(model)
    if markers.ready(cfg.run_dir, vla_dir, keys["vla"], forced, "base: stage (b) VLA pre-training"):
        model = load_base(vla_dir / "model")
    else:
        start_stage(vla_dir, keys["vla"], fresh=forced)
        demo_rows = grounding_rows(frames_from_demos(demos, g.demo_every), g.min_pixels) if g.demo_every else []
        actions = encode_dataset(demos, tok, n_image, use_rationale=False, desc="encode demos")
        data = concat(actions, encode_rows(train_rows + demo_rows, tok, n_image), pad_id=tok.pad_id)
        print(f"stage (b): {actions['n_rows']} action rows + {len(train_rows) + len(demo_rows)} grounding rows")
        last = train_loop(model, data, cfg.pretrain, vla_dir, heldout=encode_rows(probe_rows, tok, n_image))
        meta = dict(kind="base", size=cfg.model.size, parameters=parameter_counts(model), final_metrics=last,
                    action_chunk=tok.action_chunk)
        _save_model_dir(model, tok, vla_dir / "model", meta)
        (vla_dir / "probe.json").write_text(json.dumps(probes(model), indent=1))
        mark_done(vla_dir, keys["vla"], cfg, t, action_rows=actions["n_rows"],
                  grounding_rows=len(train_rows) + len(demo_rows))
    timings["stage_b_s"] = round(time.time() - t, 1)

    t = time.time()
    success = _evaluate_base(cfg, vla_dir / "model", work / "evaluate", keys["evaluate"], forced)
    timings["evaluate_s"] = round(time.time() - t, 1)
    return write_release(cfg, work, train_rows, len(probe_rows), success, timings)


def _evaluate_base(cfg, model_dir: Path, out: Path, key: str, forced: bool) -> list[dict]:
    """The base's own closed-loop success on each split of grounding.eval_splits (resumable per episode): one dict
    per split."""
    from . import markers
    from .evaluate import evaluate, read_records
    from .pipeline import policy_factory
    from .stats import wilson

    ev = dataclasses.replace(cfg.evaluate, splits=tuple(cfg.grounding.eval_splits), reasoning=False, videos=False)
    t = time.time()
    if not markers.ready(cfg.run_dir, out, key, forced, "base: closed-loop evaluation"):
        markers.start_stage(out, key, partial=("episodes.jsonl",), fresh=forced)
        evaluate(policy_factory(model_dir, reasoning=False), ev, out)
        markers.mark_done(out, key, cfg, t)
    records = read_records(out / "episodes.jsonl")
    out_rows = []
    for split in ev.splits:
        rows = [r for r in records if r.get("split", "in_distribution") == split]
        k, n = sum(bool(r["success"]) for r in rows), len(rows)
        low, high = wilson(k, n)
        out_rows.append(dict(split=split, tasks=list(ev.tasks), successes=k, episodes=n,
                             seeds=sorted({int(r["seed"]) for r in rows}), ci95=[round(low, 3), round(high, 3)]))
    return out_rows



# ------------------------------------------------------------------------------------------------ the proof
def check_recipe(path, cfg, out_dir) -> tuple[list[dict], list[dict]]:
    """Re-run the first logged steps of stage (a) of the recipe ``cfg`` (the ``base`` preset) and return (the
    release's first metrics, the re-run's), to compare bit for bit: the tokenizer is rebuilt from the code (its bin
    statistics are read from the release: they come from the recorded demonstrations), the model is built from its
    seed, and the rows the first batches draw are rendered again from their seeds (``reproduce.rows`` of the
    manifest lists every training row as [seed, object]). Raises ReleaseError when the rebuilt vocabulary differs."""
    import torch

    from .grounding import SEED_OFFSET, encode_rows, grounding_rows, render_frames
    from .model import build_tiny_vla
    from .tokens import VLATokenizer
    from .train import batch_indices, num_image_tokens, train_loop

    path = Path(resolve_checkpoint(str(path)))
    manifest = verify_release(path)
    released = VLATokenizer.load(path)
    tok = base_tokenizer(recipe_tasks(cfg), released.action_stats, released.state_stats, released.action_chunk)
    if tok.hf.get_vocab() != released.hf.get_vocab():
        raise ReleaseError(f"{path}/tokenizer.json: the recipe's vocabulary (refinevla.recipe.vocabulary_texts) "
                           "is not the released one")
    expected = manifest["reproduce"]["first_metrics"]
    table = manifest["reproduce"]["rows"]
    steps = expected[-1]["step"]
    vlm = cfg.vlm
    needed = sorted({int(i) for s in range(steps * vlm.grad_accum)
                     for i in batch_indices(s, len(table), vlm.batch_size, vlm.seed)})
    tasks = list(cfg.grounding.tasks)
    seeds = sorted({table[i][0] for i in needed})
    frames = render_frames([tasks[(s - SEED_OFFSET) % len(tasks)] for s in seeds], seeds, cfg.data.image_size,
                           cfg.data.camera, cfg.grounding.arm_noise, desc="frames of the first batches",
                           variant_share=cfg.grounding.variant_share, order=tasks)
    by_key = {(r["seed"], r["name"]): r for r in grounding_rows(frames, cfg.grounding.min_pixels)}
    missing = [table[i] for i in needed if (table[i][0], table[i][1]) not in by_key]
    if missing:
        raise ReleaseError(f"{path}/{MANIFEST}: rows {missing[:3]} are not asked about when rendered again "
                           "(the frames differ from the release's)")
    threads = torch.get_num_threads()
    try:
        model = build_tiny_vla(cfg.model.size, tok.vocab_size, tok.image_id, tok.pad_id, seed=vlm.seed,
                               attn_implementation=cfg.model.attn_implementation)
        enc = encode_rows([by_key[tuple(table[i])] for i in needed], tok, num_image_tokens(model))
        data = {k: np.zeros((len(table),) + v.shape[1:], v.dtype) for k, v in enc.items() if k != "n_rows"}
        for k in data:
            data[k][needed] = enc[k]
        data["n_rows"] = len(table)
        train_loop(model, data, vlm, Path(out_dir), stop_after=steps)
    finally:
        torch.set_num_threads(threads)
    got = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return expected, got[:len(expected)]
