"""refinevla.stats: known values, pairing keys, pooled tables and verdicts (fast, no simulator)."""
import numpy as np
import pandas as pd
import pytest

from refinevla import stats


def records_from(arm_outcomes, train_seeds=(0,), split="in_distribution", task="lift"):
    """Records where arm_outcomes[arm] is a list of successes over episode seeds 0..n-1, for each train seed."""
    return pd.DataFrame([dict(arm=arm, train_seed=ts, split=split, task=task, seed=s, success=bool(ok))
                         for arm, outs in arm_outcomes.items() for ts in train_seeds for s, ok in enumerate(outs)])


# ------------------------------------------------------------------------------------ known values
def test_wilson_known_values():
    assert stats.wilson(4, 8) == pytest.approx((0.2152, 0.7848), abs=1e-4)
    low, high = stats.wilson(0, 10)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.2775, abs=1e-4)
    assert stats.wilson(0, 0) == (0.0, 1.0)
    assert stats.wilson(4, 8, level=0.99)[0] < stats.wilson(4, 8)[0]


def test_mcnemar_exact_known_values():
    ref = np.array([1] * 10 + [0] * 2 + [1] * 5 + [0] * 3, bool)
    arm = np.array([0] * 10 + [1] * 2 + [1] * 5 + [0] * 3, bool)
    m = stats.mcnemar_exact(ref, arm)
    assert (m["b"], m["c"], m["n"]) == (10, 2, 20)
    assert m["p_value"] == pytest.approx(2 * sum([1, 12, 66]) / 2 ** 12, abs=1e-12)  # 2 P(X <= 2), Bin(12, .5)
    assert m["p_value"] == pytest.approx(0.0386, abs=1e-4)
    balanced = stats.mcnemar_exact([1, 1, 0, 0, 1], [0, 0, 1, 1, 1])
    assert (balanced["b"], balanced["c"], balanced["p_value"]) == (2, 2, 1.0)
    assert stats.mcnemar_exact([1, 0], [1, 0])["p_value"] == 1.0


def test_detectable_difference_known_values():
    assert stats.detectable_difference(50) == pytest.approx(0.280, abs=1e-3)
    assert stats.detectable_difference(200) == pytest.approx(0.140, abs=1e-3)
    assert stats.detectable_difference(200, p=0.9) < stats.detectable_difference(200)


# ---------------------------------------------------------------------------------------- bootstrap
def test_paired_bootstrap_contains_diff_and_shrinks():
    rng = np.random.default_rng(1)
    widths = []
    for n in (40, 400):
        ref = rng.random(n) < 0.5
        arm = np.where(rng.random(n) < 0.7, ref, rng.random(n) < 0.7)
        diff, low, high = stats.paired_bootstrap(ref, arm, n_resamples=2000)
        assert diff == pytest.approx(arm.mean() - ref.mean())
        assert low <= diff <= high and low < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2


def test_paired_bootstrap_degenerate():
    assert stats.paired_bootstrap([1, 1, 1], [0, 0, 0]) == (-1.0, -1.0, -1.0)
    assert stats.paired_bootstrap([1, 0, 1], [1, 0, 1]) == (0.0, 0.0, 0.0)
    assert stats.paired_bootstrap([True], [False]) == (-1.0, -1.0, -1.0)


# ------------------------------------------------------------------------------------------ pairing
def test_pair_joins_on_keys_and_drops_unmatched():
    recs = records_from({"baseline": [1, 0, 1], "refinevla": [0, 0, 1]}, train_seeds=(0, 1))
    recs = pd.concat([recs, records_from({"refinevla": [1] * 5}, train_seeds=(2,)),    # seed the reference lacks
                      pd.DataFrame([dict(arm="refinevla", train_seed=0, split="in_distribution", task="lift",
                                         seed=99, success=True)])], ignore_index=True)  # episode only one arm ran
    p = stats.pair(recs, "refinevla")
    assert list(p.columns) == ["split", "train_seed", "task", "seed", "ref", "arm"]
    assert len(p) == 6 and set(p["train_seed"]) == {0, 1} and 99 not in set(p["seed"])
    row = p[(p["train_seed"] == 1) & (p["seed"] == 0)].iloc[0]
    assert (row["ref"], row["arm"]) == (True, False)
    assert p["ref"].dtype == bool and p["arm"].dtype == bool


def test_pair_base_across_train_seeds():
    recs = pd.concat([records_from({"baseline": [1, 0, 1, 1]}, train_seeds=(0, 1, 2)),
                      records_from({"base": [0, 0, 1, 0]}, train_seeds=(-1,))], ignore_index=True)
    assert len(stats.pair(recs, "base")) == 0
    p = stats.pair(recs, "base", match_train_seed=False)
    assert len(p) == 12 and sorted(set(p["train_seed"])) == [0, 1, 2]
    assert list(p.loc[p["train_seed"] == 2, "arm"]) == [False, False, True, False]


# ------------------------------------------------------------------------------------------- tables
def test_success_table_pools_train_seeds_and_orders_rows():
    recs = pd.concat([records_from({"refinevla": [1, 1, 0, 0]}, train_seeds=(0,), split="variant"),
                      records_from({"refinevla": [1, 1, 1, 0]}, train_seeds=(1,), split="variant"),
                      records_from({"refinevla": [1, 0]}, train_seeds=(0, 1)),
                      records_from({"baseline": [0, 0]}, train_seeds=(0, 1, 2))], ignore_index=True)
    t = stats.success_table(recs)
    assert list(zip(t["arm"], t["split"])) == [("refinevla", "in_distribution"), ("refinevla", "variant"),
                                               ("baseline", "in_distribution")]
    v = t.iloc[1]
    assert (v["successes"], v["n"], v["rate"], v["train_seeds"]) == (5, 8, 5 / 8, 2)
    assert (v["ci_low"], v["ci_high"]) == pytest.approx(stats.wilson(5, 8))
    assert t.iloc[2]["train_seeds"] == 3


def test_comparison_table_verdicts():
    ref = np.array([True, False] * 20)
    better, worse = ref.copy(), ref.copy()
    better[np.flatnonzero(~ref)[:15]] = True            # arm wins 15 of 15 discordant pairs
    worse[np.flatnonzero(ref)[:15]] = False             # arm loses 15 of 15
    arms = {"baseline": ref, "same": ref, "refinevla": better, "dropout": worse}
    recs = pd.concat([records_from(arms), records_from(arms, split="variant")], ignore_index=True)
    t = stats.comparison_table(recs)
    assert list(zip(t["arm"], t["split"]))[:2] == [("same", "in_distribution"), ("same", "variant")]
    assert "baseline" not in set(t["arm"])
    same = t[t["arm"] == "same"].iloc[0]
    assert same["verdict"] == "no resolvable difference" and same["p_value"] == 1.0 and same["diff"] == 0
    r = t[(t["arm"] == "refinevla") & (t["split"] == "variant")].iloc[0]
    assert (r["n_pairs"], r["b"], r["c"]) == (40, 0, 15) and r["verdict"] == "better"
    assert r["diff"] == pytest.approx(15 / 40) and r["diff_low"] > 0 and r["p_value"] < 1e-3
    assert t[t["arm"] == "dropout"].iloc[0]["verdict"] == "worse"


def test_comparison_table_pairs_base_across_train_seeds():
    ref = [1, 1, 1, 1, 0, 1, 1, 1]
    recs = pd.concat([records_from({"baseline": ref}, train_seeds=(0, 1, 2)),
                      records_from({"base": [0] * 8}, train_seeds=(-1,))], ignore_index=True)
    row = stats.comparison_table(recs).iloc[0]
    assert (row["arm"], row["n_pairs"], row["b"], row["c"]) == ("base", 24, 21, 0)
    assert row["verdict"] == "worse"
    assert stats.comparison_table(recs, base_arms=()).empty
