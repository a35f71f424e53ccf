"""Statistics of the closed-loop study: success rates with intervals, paired arm-vs-reference tests, power.

Records are episode rows with columns arm, train_seed, split, task, seed (episode seed) and success (bool).
Every arm runs the same (split, task, seed) episodes for each of its train seeds, so arms are compared
pair by pair (McNemar exact test, paired bootstrap), never as two independent samples. How the book uses it::

    from refinevla import stats
    stats.detectable_difference(200)           # state BEFORE the run: resolves about 14 points
    stats.success_table(records)               # per arm and split: rate with its Wilson 95% interval
    stats.comparison_table(records)            # per arm and split vs "baseline": diff, interval, p, verdict
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as st

from .config import SPLITS  # in_distribution first, then variant

KEYS = ["train_seed", "split", "task", "seed"]


def _splits(records: pd.DataFrame) -> list[str]:
    """Splits present, in_distribution first, then variant, then any other in first-seen order."""
    seen = list(pd.unique(records["split"]))
    return [s for s in SPLITS if s in seen] + [s for s in seen if s not in SPLITS]


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials; (0.0, 1.0) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    ci = st.binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def success_table(records: pd.DataFrame) -> pd.DataFrame:
    """One row per (arm, split): successes, n, rate, Wilson interval, train_seeds; pooled over seeds and tasks."""
    rows = []
    for arm in pd.unique(records["arm"]):
        for split in _splits(records):
            g = records[(records["arm"] == arm) & (records["split"] == split)]
            if len(g) == 0:
                continue
            k, n = int(g["success"].astype(bool).sum()), len(g)
            low, high = wilson(k, n)
            rows.append(dict(arm=arm, split=split, successes=k, n=n, rate=k / n, ci_low=low, ci_high=high,
                             train_seeds=int(g["train_seed"].nunique())))
    return pd.DataFrame(rows)


def pair(records: pd.DataFrame, arm: str, reference: str = "baseline", match_train_seed: bool = True) -> pd.DataFrame:
    """The arm's episodes inner-joined with the reference's: columns split, train_seed, task, seed, ref, arm.

    Joined on (train_seed, split, task, seed); a train seed the reference lacks pairs with nothing. Callers
    comparing "base" (the pre-trained model, one train seed) pass match_train_seed=False: it is then joined on
    (split, task, seed) with the reference's episodes of every train seed (train_seed is the reference's).
    """
    keys = KEYS if match_train_seed else [k for k in KEYS if k != "train_seed"]
    ref = records.loc[records["arm"] == reference, KEYS + ["success"]].rename(columns={"success": "ref"})
    own = records.loc[records["arm"] == arm, keys + ["success"]].rename(columns={"success": "arm"})
    out = ref.merge(own, on=keys, how="inner")[["split", "train_seed", "task", "seed", "ref", "arm"]]
    return out.astype({"ref": bool, "arm": bool}).reset_index(drop=True)


def mcnemar_exact(ref, arm) -> dict:
    """Exact McNemar test on paired booleans: b = ref only, c = arm only, n = pairs, two-sided binomial p on b + c."""
    ref, arm = np.asarray(ref, bool), np.asarray(arm, bool)
    b, c = int((ref & ~arm).sum()), int((~ref & arm).sum())
    p = 1.0 if b + c == 0 else float(st.binomtest(c, b + c, 0.5).pvalue)
    return dict(b=b, c=c, n=len(ref), p_value=p)


def paired_bootstrap(ref, arm, n_resamples: int = 10_000, level: float = 0.95, seed: int = 0):
    """arm rate - ref rate with a paired percentile bootstrap interval: (diff, low, high).

    When every pair has the same difference the bootstrap is degenerate and (diff, diff, diff) is returned.
    """
    ref, arm = np.asarray(ref, float), np.asarray(arm, float)
    if len(ref) == 0:
        raise ValueError("paired_bootstrap needs at least one pair")
    diff = float(arm.mean() - ref.mean())
    if np.ptp(arm - ref) == 0:
        return diff, diff, diff
    res = st.bootstrap((ref, arm), lambda r, a, axis=-1: a.mean(axis=axis) - r.mean(axis=axis), paired=True,
                       vectorized=True, n_resamples=n_resamples, confidence_level=level, method="percentile",
                       random_state=np.random.default_rng(seed))
    return diff, float(res.confidence_interval.low), float(res.confidence_interval.high)


def comparison_table(records: pd.DataFrame, reference: str = "baseline", base_arms=("base",)) -> pd.DataFrame:
    """Each non-reference arm vs the reference per split: rates, bootstrap diff interval, McNemar b, c, p, verdict.

    Arms in base_arms are paired across the reference's train seeds; an (arm, split) with no pairs is left out.
    The verdict is "better"/"worse" (sign of diff) when p_value < 0.05, else "no resolvable difference".
    """
    rows = []
    for arm in pd.unique(records["arm"]):
        if arm == reference:
            continue
        pairs = pair(records, arm, reference, match_train_seed=arm not in base_arms)
        for split in _splits(records):
            p = pairs[pairs["split"] == split]
            if len(p) == 0:
                continue
            diff, low, high = paired_bootstrap(p["ref"], p["arm"])
            m = mcnemar_exact(p["ref"], p["arm"])
            verdict = ("better" if diff > 0 else "worse") if m["p_value"] < 0.05 else "no resolvable difference"
            rows.append(dict(arm=arm, split=split, n_pairs=len(p), ref_rate=float(p["ref"].mean()),
                             arm_rate=float(p["arm"].mean()), diff=diff, diff_low=low, diff_high=high,
                             b=m["b"], c=m["c"], p_value=m["p_value"], verdict=verdict))
    return pd.DataFrame(rows)


def detectable_difference(n: int, p: float = 0.5, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest success-rate difference a two-sided level-alpha test detects with this power, n episodes per arm.

    Normal approximation, unpaired (so conservative for the paired design): (z_{1-alpha/2} + z_power) *
    sqrt(2 p (1-p) / n). The figure to state BEFORE a run: "with n episodes per arm the run can resolve
    differences of about X points".
    """
    z = st.norm.ppf(1 - alpha / 2) + st.norm.ppf(power)
    return float(z * np.sqrt(2 * p * (1 - p) / n))
