"""The ablation study's page (notebooks/07_ablations): tables and sentences from committed results (refinevla.archive).

    found = archive.load("results/study")
    display(Markdown(ablations.design(found)))          # what the run can resolve, stated from its sizes alone
    table = ablations.arms_table(found)                  # what each arm changes, seeds, held-out losses
    display(Markdown(ablations.conclusion(found)))       # each variant against ReFineVLA, ReFineVLA against the paper

Every sentence is written from the numbers, whichever way they go.
"""
from __future__ import annotations

import pandas as pd

from .config import IN_DISTRIBUTION, VARIANT
from .figures import ARM_LABELS
from .stats import comparison_table, detectable_difference, success_table

#: The paper's headline claim this study can speak to: ReFineVLA over its SpatialVLA base on SimplerEnv's
#: variant aggregation (WidowX and Google Robot, abstract of arXiv 2505.19080 v1), in points.
PAPER_VARIANT_GAIN = 8.6
REFERENCE = "refinevla"
MAIN = ("base", "baseline", "refinevla", "oracle")


def pairs_per_arm(cfg) -> int:
    """Paired episodes per split of one arm against another: seeds x tasks x episodes per task."""
    return cfg.study.arm_seeds * len(cfg.evaluate.tasks) * cfg.evaluate.episodes_per_task


def design(found: dict) -> str:
    """What the run can resolve, from its sizes alone (the figure to state before looking at the results)."""
    cfg = found["config"]
    n = pairs_per_arm(cfg)
    d50, d20 = 100 * detectable_difference(n, 0.5), 100 * detectable_difference(n, 0.2)
    extra = [a for a in cfg.study.arms]
    return (f"Every arm is fine-tuned from the same base on {cfg.study.arm_seeds} seeds (the same adapter "
            f"initialisation and data order per seed) and evaluated on the same {cfg.evaluate.episodes_per_task} "
            f"episode seeds per split and seed: {n} paired episodes per arm and split. With {n} episodes per arm a "
            f"two-sided 5% test has 80% power for a difference of about **{d50:.0f} points** at a 50% success rate "
            f"({d20:.0f} points at 20% or 80%; unpaired normal approximation, conservative for the paired test). "
            f"Smaller effects, like the paper's +{PAPER_VARIANT_GAIN} points, are beyond this run: a variant that "
            f"shows no resolvable difference may still differ by less. {len(extra)} variants of ReFineVLA: "
            + ", ".join(extra) + ".")


def arms_table(found: dict) -> pd.DataFrame:
    """One row per fine-tuned arm: what it changes (lambda, top K, rationale position, dropout, parts), its seeds,
    and its held-out losses averaged over seeds."""
    units = found["units"]
    units = units[units["arm"].isin(set(units["arm"]) - {"base", "oracle"})]
    cols = ["lambda_reason", "top_k", "position", "dropout", "parts"]
    grouped = units.groupby("arm", sort=False)
    out = grouped[cols].first().astype({"top_k": "Int64"}).astype(object).fillna("")
    out["parts"] = [p if p != "observation situation_analysis spatial_reasoning task_planning" else "all four"
                    for p in out["parts"]]
    out.insert(0, "seeds", grouped["train_seed"].apply(lambda s: ", ".join(str(int(x)) for x in s)))
    out["held-out L_action"] = grouped["heldout_l_action"].mean().round(3)
    out["held-out L_reasoning"] = grouped["heldout_l_reason"].mean().round(3)
    out.index = pd.Index([ARM_LABELS.get(a, a) for a in out.index], name="arm")
    return out


def arm_order(found: dict) -> list[str]:
    """The arms as the page lists them: the base, the baseline, ReFineVLA and ReFineVLA on the teacher's rationale,
    then the study's variants in the order its config declares them."""
    present = set(found["episodes"]["arm"])
    declared = [a for a in MAIN if a in present] + [a for a in found["config"].study.arms if a in present]
    return declared + sorted(present - set(declared))


def episodes(found: dict) -> pd.DataFrame:
    """The per-episode results with the arms in ``arm_order`` (tables and figures follow it)."""
    order = {arm: i for i, arm in enumerate(arm_order(found))}
    return found["episodes"].sort_values("arm", key=lambda s: s.map(order), kind="stable")


def success(found: dict) -> pd.DataFrame:
    return success_table(episodes(found))


def against(found: dict, reference: str) -> pd.DataFrame:
    """Every arm against ``reference`` on the same episodes (same fine-tuning seed, split, task, episode seed)."""
    return comparison_table(episodes(found), reference=reference, base_arms=("base",))


def conclusion(found: dict) -> str:
    """The results in words: ReFineVLA against the baseline on each split and the paper's claim, then the variants
    that differ from ReFineVLA, and those that do not."""
    vs_base, vs_ref = against(found, "baseline"), against(found, REFERENCE)
    lines = []
    for split in (IN_DISTRIBUTION, VARIANT):
        r = vs_base[(vs_base["arm"] == REFERENCE) & (vs_base["split"] == split)]
        if len(r):
            r = r.iloc[0]
            said = "no difference this run can resolve" if r.verdict == "no resolvable difference" else \
                f"{r.verdict} than the baseline"
            lines.append(f"ReFineVLA vs the baseline, {split.replace('_', ' ')}: {100 * r['diff']:+.0f} points "
                         f"(95% interval {100 * r.diff_low:+.0f} to {100 * r.diff_high:+.0f}, {r.n_pairs} pairs, "
                         f"McNemar p = {r.p_value:.3g}): {said}.")
            if split == VARIANT:
                inside = 100 * r.diff_low <= PAPER_VARIANT_GAIN <= 100 * r.diff_high
                lines.append(f"The paper reports +{PAPER_VARIANT_GAIN} points on SimplerEnv's variant aggregation. "
                             + ("This run's interval contains it, so it neither confirms nor rules it out at this "
                                "scale." if inside else "This run's interval excludes it: at this scale (a ~2M-"
                                "parameter VLA, a privileged-state teacher, robosuite) the gain does not appear. "
                                "That says nothing about SpatialVLA on SimplerEnv, which this project cannot run "
                                "here."))
    moved = vs_ref[(vs_ref["verdict"] != "no resolvable difference") & ~vs_ref["arm"].isin(MAIN)]
    for r in moved.itertuples():
        lines.append(f"{ARM_LABELS.get(r.arm, r.arm)}, {r.split.replace('_', ' ')}: {100 * r.diff:+.0f} points vs "
                     f"ReFineVLA (95% interval {100 * r.diff_low:+.0f} to {100 * r.diff_high:+.0f}, McNemar p = "
                     f"{r.p_value:.3g}): {r.verdict}.")
    still = sorted(set(vs_ref.loc[~vs_ref["arm"].isin(MAIN), "arm"]) - set(moved["arm"]))
    if still:
        lines.append("No resolvable difference from ReFineVLA on either split: " + ", ".join(still) + ".")
    return "\n\n".join(f"- {x}" for x in lines)
