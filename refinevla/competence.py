"""The released base and the competence bar, as tables for the book (``refinevla.report`` re-exports them; they
live here so that report.py stays readable at one sitting).

Every number comes from a run's files: the base's model card (``manifest.json`` of a released base,
refinevla.release), the attention stage's grounding probe (``attention/grounding.csv``) and the evaluation's
success table (``evaluate/success.csv``, stats.success_table). The competence bar (book/limitations.md,
"Competence comes first"): the base names the side of the object and its position within 1 cm on held-out frames in at least 95%
of its answers; the fine-tuned baseline succeeds in at least 60% of in-distribution episodes and in 15-85% of
variant episodes (room for a difference either way). "met" reads the point estimate, as report.conclusion does.
"""
from __future__ import annotations

import math
import numbers
from pathlib import Path

import pandas as pd

#: The bars, as shares.
BASE_BAR = 0.95
IN_DISTRIBUTION_BAR = 0.60
VARIANT_BAND = (0.15, 0.85)
#: The probe stages of a manifest, with the names the tables use.
PROBE_STAGES = {"a": "after stage (a) VLM", "b": "after stage (b) VLA"}
#: A continued release (a manifest with a parent): its stage (b) is the chain's third stage.
CONTINUED = "stage (c) VLA, randomized scenes"
GROUNDING_COLUMNS = {"questions": "questions", "answered": "answered", "side_rows": "side questions",
                     "side_accuracy": "side accuracy", "within_1cm": "within 1 cm", "exact": "exact",
                     "mae_x_cm": "MAE x (cm)", "mae_y_cm": "MAE y (cm)", "mae_z_cm": "MAE z (cm)",
                     "example": "example"}


def _finite(x) -> bool:
    return isinstance(x, numbers.Real) and math.isfinite(x)


# ---------------------------------------------------------------------------------------- the released base
def base_release(cfg) -> dict | None:
    """The manifest of the run's released base (verified: refinevla.release.verify_release), or None when
    ``model.checkpoint`` is not a release (a run that pre-trains its own base, or a hub checkpoint)."""
    from .release import is_release, verify_release

    name = cfg.model.checkpoint
    if not is_release(name):
        return None
    manifest = verify_release(name)
    parent = manifest.get("parent", "").split("@")[0]
    if parent and is_release(parent):  # a continued release (models/tiny-vla): its parent's card comes with it
        manifest["parent_manifest"] = verify_release(parent)
    return manifest


def _example(e: dict | None) -> str:
    if not e:
        return ""
    return f"{e.get('question', '')} -> {e.get('answer') or '(no answer)'} (truth: {e.get('truth', '')})"


def base_probe_table(manifest: dict) -> pd.DataFrame:
    """The base's held-out grounding probe after each pre-training stage: one row per stage (numbers as shares and
    cm; report.tidy reads them)."""
    rows, parent = {}, manifest.get("parent_manifest")
    probe, variant = manifest.get("probe", {}), manifest.get("probe_variant", {})
    if parent:  # the parent's stages from its card, its variant-scene probe from this one, then the third stage
        stages = [(parent.get("probe", {}).get(k), label) for k, label in PROBE_STAGES.items()]
        stages += [(variant.get("a"), f"{PROBE_STAGES['b']}, variant scenes"), (probe.get("b"), f"after {CONTINUED}"),
                   (variant.get("b"), f"after {CONTINUED}, variant scenes")]
    else:
        stages = [(probe.get(k), label) for k, label in PROBE_STAGES.items()]
        stages += [(variant.get(k), f"{label}, variant scenes") for k, label in PROBE_STAGES.items()]
    for p, label in stages:
        if p is None:
            continue
        mae = list(p.get("mae_cm", [math.nan] * 3)) + [math.nan] * 3
        rows[label] = {"questions": p.get("n"), "answered": p.get("answered"), "side questions": p.get("side_rows"),
                       "side accuracy": p.get("side_accuracy"), "within 1 cm": p.get("within_1cm"),
                       "exact": p.get("exact"), "MAE x (cm)": mae[0], "MAE y (cm)": mae[1], "MAE z (cm)": mae[2],
                       "example": _example((p.get("examples") or [None])[0])}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("probe")


def base_recipe_table(manifest: dict) -> pd.DataFrame:
    """How the base was made: the two pre-training stages (data, steps, batch, peak lr, training minutes, final
    losses), then the base's own closed-loop success (no fine-tuning). A continued release: its parent's rows
    first (named by the parent), then its own stage as stage (c)."""
    parent = manifest.get("parent_manifest")
    if parent:
        rows = base_recipe_table(parent).rename(index=lambda i: f"{parent.get('name', 'parent')}: {i}")
        own = base_recipe_table({k: v for k, v in manifest.items() if k != "parent_manifest"})
        own = own.drop(index="stage (a) VLM").rename(index={"stage (b) VLA": CONTINUED})
        return pd.concat([rows, own.rename(index=lambda i: f"{manifest.get('name', 'base')}: {i}")])
    from .release import train_seed_text

    r = manifest.get("recipe", {}).get("preset_sections", {})
    d, seeds, t = manifest.get("data", {}), manifest.get("seeds", {}), manifest.get("timings_s", {})
    g, mix = r.get("grounding", {}), r.get("data", {}).get("pretrain_mix", {})
    losses = manifest.get("losses", {})
    last = lambda stage: (losses.get(stage) or [{}])[-1]
    minutes = lambda key: round(t[key] / 60, 1) if _finite(t.get(key)) else None
    fmt = lambda v: f"{v:.3f}" if _finite(v) else "?"
    lr = lambda v: f"{v:g}" if _finite(v) else ""  # as text: 2e-4 survives report.tidy's rounding
    a, b, s = r.get("vlm", {}), r.get("pretrain", {}), manifest.get("closed_loop", {})
    rows = {
        "stage (a) VLM": {
            "data": f"{d.get('grounding_rows')} grounding questions about {g.get('frames')} rendered frames of "
                    f"{', '.join(g.get('tasks', []))} (seeds {train_seed_text(seeds)})",
            "steps": a.get("steps"), "batch": a.get("batch_size"), "peak lr": lr(a.get("lr")),
            "minutes": minutes("stage_a_s"), "result": f"final grounding loss {fmt(last('vlm').get('l_reason'))}"},
        "stage (b) VLA": {
            "data": f"{d.get('action_rows')} action frames of {sum(mix.values())} expert episodes "
                    f"({', '.join(f'{k} {v}' for k, v in mix.items())}) + {d.get('stage_b_grounding_rows')} "
                    f"grounding questions (lambda {b.get('lambda_reason')})",
            "steps": b.get("steps"), "batch": b.get("batch_size"), "peak lr": lr(b.get("lr")),
            "minutes": minutes("stage_b_s"),
            "result": f"final action loss {fmt(last('vla').get('l_action'))}, grounding loss "
                      f"{fmt(last('vla').get('l_reason'))}"},
    }
    for s in manifest.get("closed_loop_splits") or ([s] if s else []):
        lo, hi = (list(s.get("ci95", [])) + [math.nan, math.nan])[:2]
        split = str(s.get("split", "")).replace("_", " ")
        seeds_of = s.get("seeds") or []
        rows[f"base closed loop, {split}"] = {
            "data": f"{', '.join(s.get('tasks', []))}, {split}, seeds "
                    f"{'-'.join(str(x) for x in seeds_of[:1] + seeds_of[-1:])}",
            "steps": None, "batch": None, "peak lr": "", "minutes": minutes("evaluate_s"),
            "result": f"{s.get('successes')}/{s.get('episodes')} successes (95% interval "
                      f"{100 * lo:.0f}-{100 * hi:.0f}%)"}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("step")


# ---------------------------------------------------------------------------------------- the grounding probe
def grounding_table(run_dir) -> pd.DataFrame | None:
    """The attention stage's grounding probe (attention/grounding.csv): one row per model (the base, then every
    fine-tune), indexed by model, readable column names; None when the stage has not written it."""
    path = Path(run_dir) / "attention" / "grounding.csv"
    if not path.exists():
        return None
    table = pd.read_csv(path, keep_default_na=False, na_values=["", "nan", "NaN"])
    table = table.rename(columns=GROUNDING_COLUMNS)
    if "example" in table:
        table["example"] = table["example"].fillna("").astype(str)
    if "split" in table:  # one row per model and scene split: "base, in distribution", "base, variant"
        table["model"] = table["model"] + ", " + table.pop("split").str.replace("_", " ")
    return table.set_index("model")


# ---------------------------------------------------------------------------------------- the competence bar
def _share(rate, n, bars=()) -> str:
    """"57% [42, 71] (29/50)"; one decimal where a whole percent would read as a bar it misses or passes (94.7%,
    not 95%, against a 95% bar)."""
    from .stats import wilson

    k = int(round(rate * n))
    lo, hi = wilson(k, int(n))
    pct = 100 * rate
    near = any(round(pct) == round(100 * b) and abs(pct - 100 * b) > 1e-9 for b in bars)
    return f"{pct:.{1 if near else 0}f}% [{100 * lo:.0f}, {100 * hi:.0f}] ({k}/{int(n)})"


def _row(what, source, rate, n, bar, ok, bars=()) -> dict:
    measured = _finite(rate) and _finite(n) and n > 0
    return {"what": what, "measured [95% interval] (count)": _share(rate, n, bars) if measured else "not measured",
            "source": source, "bar": bar, "met": ("yes" if ok(rate) else "no") if measured else "not measured"}


def competence_table(success: pd.DataFrame | None, manifest: dict | None = None,
                     grounding: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per bar: what, the measured value (Wilson 95% interval, count), where it comes from, the bar, and
    whether it is met (yes / no / not measured). The base's rows read its probe after stage (b) from the manifest
    when there is one, else the "base" row of the attention stage's probe (grounding_table)."""
    side = within = (math.nan, math.nan)
    source = "no probe of the base in this run"
    probe = (manifest or {}).get("probe", {}).get("b")
    if probe is not None:
        side = (probe.get("side_accuracy"), probe.get("side_rows"))
        within = (probe.get("within_1cm"), probe.get("n"))
        last = CONTINUED if manifest.get("parent") else "stage (b)"
        source = f"the base's model card (manifest.json), probe after {last}"
    elif grounding is not None and ({"base", "base, in distribution"} & set(grounding.index)):
        row = "base" if "base" in grounding.index else "base, in distribution"
        g = grounding.loc[row]
        side, within = (g["side accuracy"], g["side questions"]), (g["within 1 cm"], g["questions"])
        source = f"attention/grounding.csv, row {row}"
    num = lambda pair: tuple(float(x) if _finite(x) else math.nan for x in pair)
    at_least = lambda bar: (lambda r: r >= bar - 1e-12)  # 57/60 is the bar 0.95, whatever its last bit
    bar = f">= {100 * BASE_BAR:.0f}%"
    rows = [_row("base: side of the named object, held-out frames", source, *num(side), bar, at_least(BASE_BAR),
                 [BASE_BAR]),
            _row("base: position within 1 cm, held-out frames", source, *num(within), bar, at_least(BASE_BAR),
                 [BASE_BAR])]
    lo, hi = VARIANT_BAND
    for split, bar, ok, bars in [
            ("in_distribution", f">= {100 * IN_DISTRIBUTION_BAR:.0f}%", at_least(IN_DISTRIBUTION_BAR),
             [IN_DISTRIBUTION_BAR]),
            ("variant", f"{100 * lo:.0f}-{100 * hi:.0f}%", lambda r: lo - 1e-12 <= r <= hi + 1e-12, [lo, hi])]:
        s = (success[(success["arm"] == "baseline") & (success["split"] == split)] if success is not None
             else pd.DataFrame())
        rate, n = (float(s.iloc[0]["rate"]), float(s.iloc[0]["n"])) if len(s) else (math.nan, math.nan)
        rows.append(_row(f"fine-tuned baseline: closed-loop success, {split.replace('_', ' ')}",
                         "evaluate/success.csv, arm baseline", rate, n, bar, ok, bars))
    return pd.DataFrame(rows).set_index("what")


def competence_sentence(table: pd.DataFrame) -> str:
    """The competence table in two sentences, whichever way each goes (numbers from the table only): the gate a
    comparison needs (the fine-tuned baseline's closed-loop rows), then the base's grounding bar (its probe rows)."""
    value = "measured [95% interval] (count)"
    say = lambda what, r: f"{what} {r[value]} against {r['bar']}"

    def sentence(name: str, rows: pd.DataFrame) -> str:
        failed = [say(w, r) for w, r in rows.iterrows() if r["met"] == "no"]
        missing = [w for w, r in rows.iterrows() if r["met"] == "not measured"]
        if failed:
            return (f"{name} is not met: " + "; ".join(failed)
                    + (f" (not measured: {'; '.join(missing)})" if missing else "") + ".")
        if missing:
            return (f"{name} is not established: {'; '.join(missing)} not measured in this run"
                    + (" (every measured bar is met)." if len(missing) < len(rows) else "."))
        return f"{name} is met: " + "; ".join(say(w, r) for w, r in rows.iterrows()) + "."

    base = table.index.str.startswith("base:")
    parts = [("The competence gate (the fine-tuned baseline)", table[~base]),
             ("The base's grounding bar", table[base])]
    return " ".join(sentence(name, rows) for name, rows in parts if len(rows))
