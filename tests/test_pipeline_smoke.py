"""The whole study at the smoke preset through the README's path: Papermill notebooks, then the book.

`pytest tests/test_pipeline_smoke.py -q` (a few minutes). Asserts every stage wrote well-formed outputs,
a command-line parameter reaches the executed notebook and the page, and a secret in the environment
never reaches a written file.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUN = "pytest-smoke"
SECRET = "sk-test-DUMMY-not-a-real-key-123456"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built():
    run_dir = REPO / "data" / RUN
    shutil.rmtree(run_dir, ignore_errors=True)
    env = dict(os.environ, OPENAI_API_KEY=SECRET, MUJOCO_GL="egl")
    cmd = [sys.executable, "-m", "refinevla.cli", "book", "--preset", "smoke", "--run", RUN,
           "-p", "lambda_reason", "0.3"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    yield run_dir, proc.stdout
    shots = run_dir / "book" / "screenshots"  # the browser test's page screenshots: kept as CI artefacts
    if shots.is_dir():
        shutil.rmtree(REPO / "data" / "ci-screenshots", ignore_errors=True)
        shutil.copytree(shots, REPO / "data" / "ci-screenshots")
    # keep the run for inspection only when asked
    if not os.environ.get("REFINEVLA_KEEP_TEST_RUN"):
        shutil.rmtree(run_dir, ignore_errors=True)


UNITS = ["base", "baseline/seed0", "baseline/seed1", "refinevla/seed0", "refinevla/seed1", "dropout/seed0",
         "after/seed0", "oracle/seed0"]


def test_every_stage_wrote_well_formed_outputs(built):
    import datasets

    run_dir, _ = built
    trained = ["pretrain"] + [u for u in UNITS if u not in ("base", "oracle/seed0")]
    for stage in (["demos", "demos_pretrain", "annotate", "attention"] + [f"train/{t}" for t in trained]
                  + [f"evaluate/{u}" for u in UNITS]):
        marker = json.loads((run_dir / stage / "_done.json").read_text())
        assert marker["hash"], stage
        assert (run_dir / stage / "config.yaml").exists(), stage
    demos = datasets.load_from_disk(str(run_dir / "demos" / "dataset"))
    annotated = datasets.load_from_disk(str(run_dir / "annotate" / "dataset"))
    assert len(annotated) == len(demos) > 0
    assert all(t.strip() for t in annotated["rationale_text"])
    for t in trained:
        meta = json.loads((run_dir / "train" / t / "model" / "vla.json").read_text())
        assert meta["final_metrics"]["l_action"] > 0 and "heldout_l_action" in meta["final_metrics"], t
    meta = json.loads((run_dir / "train" / "refinevla" / "seed1" / "model" / "vla.json").read_text())
    assert meta["lambda_reason"] == 0.3 and meta["seed"] == 1 and meta["reasons_at_inference"]
    for unit in UNITS:  # every arm on both splits, the same episode seeds
        records = [json.loads(x) for x in (run_dir / "evaluate" / unit / "episodes.jsonl").read_text().splitlines()]
        assert sorted((r["split"], r["seed"]) for r in records) == [
            ("in_distribution", 10_000), ("in_distribution", 10_001), ("variant", 20_000), ("variant", 20_001)], unit
        assert all(r["error"] is None for r in records), records
    for table in ("records.csv", "success.csv", "paired.csv", "rationale_accuracy.csv"):
        assert (run_dir / "evaluate" / table).stat().st_size > 50, table
    scores = (run_dir / "attention" / "scores.csv").read_text()
    assert "baseline" in scores and "refinevla" in scores
    assert (run_dir / "attention" / "overlays.png").stat().st_size > 1000


def test_parameter_reaches_notebook_and_page(built):
    run_dir, _ = built
    nb = (run_dir / "notebooks" / "03_finetune.ipynb").read_text()
    assert "lambda_reason = 0.3" in nb
    page = (run_dir / "book" / "_build" / "html" / "data" / RUN / "notebooks" / "03_finetune.html").read_text()
    assert "lambda_reason" in page and "0.3" in page


def test_book_has_results_table_and_attention_figure(built):
    run_dir, stdout = built
    html = run_dir / "book" / "_build" / "html"
    assert str(html / "index.html") in stdout
    results = (html / "data" / RUN / "notebooks" / "06_results.html").read_text()
    assert "<table" in results and "ReFineVLA" in results and "variant" in results and "McNemar" in results
    attention = (html / "data" / RUN / "notebooks" / "05_attention.html").read_text()
    assert "<img" in attention
    assert "cdn.jsdelivr" not in (html / "book" / "method.html").read_text()


def test_secret_never_written(built):
    run_dir, _ = built
    leaks = [p for p in run_dir.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaks


def test_second_run_skips_unchanged_notebooks(built):
    proc = subprocess.run([sys.executable, "-m", "refinevla.cli", "book", "--preset", "smoke", "--run", RUN,
                           "-p", "lambda_reason", "0.3", "--no-build"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from refinevla.book import notebooks

    ran = [line for line in proc.stdout.splitlines() if line.endswith(": running")]
    assert proc.stdout.count("not re-run") == len(notebooks()), ran


@pytest.mark.timeout(600)
def test_every_page_reads_in_a_browser(built):
    """The smoke book in headless Chromium: no clipped table, broken image or video, console error or missing
    figure on any page (tests/browser_check.py); screenshots of every page land in <run>/book/screenshots/."""
    pytest.importorskip("playwright.sync_api")
    if not shutil.which("chromium") and not shutil.which("chromium-browser") and not shutil.which("google-chrome"):
        pytest.skip("no Chromium on this machine (make setup installs the system package)")
    sys.path.insert(0, str(Path(__file__).parent))
    from browser_check import check_book

    failures = check_book(built[0] / "book")
    assert not failures, "\n".join(failures)


def test_export_carries_the_runs_config_and_keys(built, tmp_path):
    """`refinevla export`'s folder passes its own check; a changed config, digest or a missing episode fails it in
    one line naming the file."""
    import shutil as sh

    import pandas as pd

    from refinevla import archive
    from refinevla.config import resolve

    overrides = {"lambda_reason": "0.3"}
    cfg = resolve("smoke", dict(overrides, name=RUN))
    folder = archive.export(cfg, "smoke", overrides, tmp_path / "smoke")
    found = archive.check(folder)
    assert len(found["episodes"]) == len(UNITS) * 4 and len(found["units"]) == len(UNITS)
    assert found["units"]["evaluate_key"].str.len().gt(0).all() and archive.code_drift(found) == []
    assert set(found["units"].loc[found["units"].arm == "refinevla", "lambda_reason"]) == {0.3}

    def damaged(name, change):
        copy = tmp_path / name
        sh.copytree(folder, copy)
        change(copy)
        return copy

    no_override = damaged("config", lambda d: (d / "manifest.json").write_text(
        (d / "manifest.json").read_text().replace('"lambda_reason": "0.3"', "")))
    with pytest.raises(archive.ArchiveError, match=r"config.yaml is not the smoke preset's config today"):
        archive.check(no_override)

    def digest(d):
        units = pd.read_csv(d / "units.csv")
        units.loc[1, "digest"] = "0" * 16
        units.to_csv(d / "units.csv", index=False)
    with pytest.raises(archive.ArchiveError, match=r"units.csv: baseline seed 0 has digest 0000"):
        archive.check(damaged("digest", digest))

    def episode(d):
        pd.read_csv(d / "episodes.csv").iloc[1:].to_csv(d / "episodes.csv", index=False)
    with pytest.raises(archive.ArchiveError, match=r"episodes.csv: .* holds 3 episodes, not the 4"):
        archive.check(damaged("episode", episode))
