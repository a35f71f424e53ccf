"""The committed results (results/<run>/, written by `refinevla export`) carry the config they claim: the preset's
config as resolved today, every evaluated unit with the digest that config gives, every episode of every split.

    .venv/bin/pytest tests/test_archive.py -q

The export itself is tested on the smoke run in tests/test_pipeline_smoke.py.
"""
from pathlib import Path

import pytest

from refinevla import archive

FOLDERS = sorted(p.parent for p in archive.RESULTS.glob("*/manifest.json"))


@pytest.mark.parametrize("folder", FOLDERS, ids=[p.name for p in FOLDERS])
def test_committed_results_carry_the_keys_of_their_config(folder):
    found = archive.check(folder)
    assert found["manifest"]["preset"] in ("default", "study")
    assert len(found["episodes"]) == len(found["units"]) * sum(
        len(found["config"].evaluate.seed_list(s)) for s in found["config"].evaluate.splits)
    assert found["units"]["evaluate_key"].notna().all()


def test_the_study_results_are_committed():
    if not (archive.RESULTS / "study" / "manifest.json").exists():
        pytest.skip("results/study is not committed yet (make study, then commit results/study)")
    assert Path(archive.RESULTS / "study") in FOLDERS


def test_the_ablation_page_lists_the_main_arms_first_then_the_variants_as_declared():
    from refinevla import ablations

    if not (archive.RESULTS / "study" / "manifest.json").exists():
        pytest.skip("results/study is not committed yet")
    found = archive.load(archive.RESULTS / "study")
    shuffled = dict(found, episodes=found["episodes"].sample(frac=1.0, random_state=0))  # file order is not used
    order = ablations.arm_order(shuffled)
    assert order[:3] == ["base", "baseline", "refinevla"]
    variants = [a for a in found["config"].study.arms if a in order]
    assert [a for a in order if a in variants] == variants and set(order) == set(found["episodes"]["arm"])
    assert list(dict.fromkeys(ablations.success(shuffled)["arm"])) == order
    assert len(ablations.success(shuffled)) == len(ablations.success(found))
