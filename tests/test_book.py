"""The book runner: skip keys, failing notebooks named with their cell, secrets refused, the toc. Real Papermill.

`pytest tests/test_book.py -q`
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from refinevla import book

REPO = Path(__file__).resolve().parent.parent


def write_notebook(path, sources):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cells = [nbformat.v4.new_code_cell(src) for src in sources]
    cells[0].metadata["tags"] = ["parameters"]
    nb.cells = cells
    nbformat.write(nb, path)


@pytest.fixture
def run_root(tmp_path, monkeypatch):
    monkeypatch.setattr(book, "REPO", tmp_path)
    (tmp_path / "refinevla").mkdir()
    (tmp_path / "refinevla" / "x.py").write_text("x = 1\n")
    return tmp_path


def test_failing_notebook_is_named_with_its_cell(run_root):
    nbs = run_root / "nbs"
    nbs.mkdir()
    write_notebook(nbs / "01_data.ipynb", ['preset = "smoke"', "a = 1", "raise ValueError('bad value in cell')"])
    with pytest.raises(book.NotebookFailed, match=r"01_data.ipynb failed in cell 4: ValueError: bad value in cell "
                                                  r"\(not an expected failure"):
        book.run_notebooks("smoke", {}, run="r", only=["01_data"], notebooks_dir=nbs)
    assert not (run_root / "data" / "r" / "notebooks" / ".01_data.key").exists()  # never marked as done


def test_parameters_are_injected_and_unchanged_notebooks_skipped(run_root, capsys):
    nbs = run_root / "nbs"
    nbs.mkdir()
    write_notebook(nbs / "01_data.ipynb", ['preset = "default"\nlambda_reason = None', "print('lr', lambda_reason)"])
    out = book.run_notebooks("smoke", {"lambda_reason": 0.5}, run="r", only=["01_data"], notebooks_dir=nbs)
    executed = (out / "01_data.ipynb").read_text()
    assert "lambda_reason = 0.5" in executed and "lr 0.5" in executed
    capsys.readouterr()
    book.run_notebooks("smoke", {"lambda_reason": 0.5}, run="r", only=["01_data"], notebooks_dir=nbs)
    assert "not re-run" in capsys.readouterr().out
    book.run_notebooks("smoke", {"lambda_reason": 0.7}, run="r", only=["01_data"], notebooks_dir=nbs)
    assert "lambda_reason = 0.7" in (out / "01_data.ipynb").read_text()


def test_upstream_marker_changes_the_key(run_root):
    nbs = run_root / "nbs"
    nbs.mkdir()
    write_notebook(nbs / "02_annotate.ipynb", ['preset = "smoke"'])
    run_dir = run_root / "data" / "r"
    before = book.notebook_key("02_annotate", {}, run_dir, nbs)
    (run_dir / "demos").mkdir(parents=True)
    (run_dir / "demos" / "_done.json").write_text(json.dumps({"hash": "abc"}))
    assert book.notebook_key("02_annotate", {}, run_dir, nbs) != before


def test_an_executed_notebook_holding_a_secret_is_deleted(run_root, monkeypatch):
    monkeypatch.setenv("SOME_PROVIDER_API_KEY", "sk-live-0123456789")
    nbs = run_root / "nbs"
    nbs.mkdir()
    write_notebook(nbs / "01_data.ipynb", ['preset = "smoke"', "import os; print(os.environ['SOME_PROVIDER_API_KEY'])"])
    with pytest.raises(book.NotebookFailed, match="SOME_PROVIDER_API_KEY"):
        book.run_notebooks("smoke", {}, run="r", only=["01_data"], notebooks_dir=nbs)
    assert not (run_root / "data" / "r" / "notebooks" / "01_data.ipynb").exists()


def test_unknown_notebook_name(run_root):
    with pytest.raises(ValueError, match="unknown notebook"):
        book.run_notebooks("smoke", {}, run="r", only=["99_nope"])


def test_toc_puts_the_overview_first_then_the_paper_then_the_stages(tmp_path):
    import yaml

    toc = yaml.safe_load(book.write_toc(tmp_path, "data/myrun").read_text())
    assert toc["root"] == "book/intro"
    files = [c["file"] for part in toc["parts"] for c in part["chapters"]]
    assert files[0] == "data/myrun/notebooks/00_overview"            # the first page after the intro
    assert files.index("book/method") < files.index("data/myrun/notebooks/01_data")
    assert [f.rsplit("/", 1)[1] for f in files if "/notebooks/" in f] == book.toc_notebooks()
    assert list(book.notebooks())[-1] == "00_overview"  # executed last: it reads every stage's outputs


def test_parameters_cells_are_hidden_in_the_executed_copy(run_root):
    """The parameters cell and the one Papermill injects are removed from the page (remove-cell)."""
    nbs = run_root / "nbs"
    nbs.mkdir()
    write_notebook(nbs / "01_data.ipynb", ['preset = "default"\nlambda_reason = None', "print('shown')"])
    out = book.run_notebooks("smoke", {"lambda_reason": 0.5}, run="r", only=["01_data"], notebooks_dir=nbs)
    cells = nbformat.read(out / "01_data.ipynb", as_version=4).cells
    tags = [c.metadata.get("tags", []) for c in cells]
    assert tags[0] == ["parameters", "remove-cell"]
    assert tags[1] == ["injected-parameters", "remove-cell"] and "lambda_reason = 0.5" in cells[1].source
    assert tags[2] == []


def test_every_page_footer_names_the_commit_and_date(tmp_path):
    import re

    import yaml

    info = book.build_info()
    assert re.fullmatch(r"Built from (commit \S+( \(with uncommitted changes\))?|an unknown commit) on \d{4}-\d\d-\d\d \d\d:\d\d UTC\.", info)
    conf = yaml.safe_load(book.write_config(tmp_path).read_text())
    assert "Built from commit" in conf["html"]["extra_footer"]
    assert conf["title"] == yaml.safe_load((book.REPO / "_config.yml").read_text())["title"]


def test_repeated_inline_scripts_are_dropped(tmp_path):
    page = tmp_path / "a.html"
    page.write_text("<head><script>const A = 1</script>\n<script>const B = 2</script><script>const A = 1</script>"
                    "<script src='x.js'></script></head>")
    assert book.dedupe_scripts(tmp_path) == 1
    text = page.read_text()
    assert text.count("const A = 1") == 1 and "const B = 2" in text and "x.js" in text
    assert book.dedupe_scripts(tmp_path) == 0


def test_pages_workflow_builds_the_default_book_and_deploys_it():
    import yaml

    wf = yaml.safe_load((book.REPO / ".github" / "workflows" / "book.yml").read_text())
    steps = wf["jobs"]["build"]["steps"]
    runs = " ".join(s.get("run", "") for s in steps)
    uses = [s.get("uses", "") for s in steps] + [s.get("uses", "") for s in wf["jobs"]["deploy"]["steps"]]
    assert "make book PRESET=default" in runs and "tests/test_book_browser.py" in runs
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-pages-artifact"))
    assert upload["with"]["path"] == "data/default/book/_build/html"
    assert any(u.startswith("actions/deploy-pages") for u in uses)
    assert wf["permissions"]["pages"] == "write" and wf["permissions"]["id-token"] == "write"


def test_a_stage_rerun_outside_the_book_reruns_the_notebook_that_shows_it(run_root, capsys):
    """The pages never disagree with the run folder: the fine-tune notebook ran and wrote train/ (lambda 0.5); a
    Papermill run of that notebook alone (or the CLI) retrains with lambda 0.25; the next book build re-runs the
    notebook instead of keeping a page about a model that is no longer there."""
    nbs = run_root / "nbs"
    nbs.mkdir()
    marker = run_root / "data" / "r" / "train" / "refinevla" / "seed0" / "_done.json"
    write_notebook(nbs / "03_finetune.ipynb", [
        'preset = "smoke"\nlambda_reason = None',
        "import json, pathlib\n"
        f"m = pathlib.Path({str(marker)!r}); m.parent.mkdir(parents=True, exist_ok=True)\n"
        "m.write_text(json.dumps({'hash': f'lambda {lambda_reason}'}))"])
    book.run_notebooks("smoke", {"lambda_reason": 0.5}, run="r", only=["03_finetune"], notebooks_dir=nbs)
    capsys.readouterr()
    book.run_notebooks("smoke", {"lambda_reason": 0.5}, run="r", only=["03_finetune"], notebooks_dir=nbs)
    assert "not re-run" in capsys.readouterr().out  # its own outputs count, as they were when it finished
    marker.write_text(json.dumps({"hash": "lambda 0.25"}))  # the stage re-run from outside the book
    book.run_notebooks("smoke", {"lambda_reason": 0.5}, run="r", only=["03_finetune"], notebooks_dir=nbs)
    assert "not re-run" not in capsys.readouterr().out
    assert json.loads(marker.read_text())["hash"] == "lambda 0.5"  # the run folder matches the page again


# ------------------------------------------------------------------------ failures inside a notebook (#33)
def test_a_stage_failure_inside_a_notebook_is_its_own_line_and_its_traceback_is_kept(run_root):
    """An expected failure raised in a cell (here a stale input) is named by its own message, which names the
    cause and the fix; with --only, the notebooks it skipped are named too. The notebook's traceback travels in
    ``details``, and the kernel's own messages go to the run's log, not the terminal."""
    nbs = run_root / "nbs"
    nbs.mkdir()
    write_notebook(nbs / "02_annotate.ipynb", [
        'preset = "smoke"', "from refinevla.markers import StaleInputError\n"
        "def stage():\n    raise StaleInputError('annotate: data/r/demos is not finished; run `refinevla data` first')\n"
        "stage()"])
    with pytest.raises(book.NotebookFailed) as caught:
        book.run_notebooks("smoke", {"lambda_reason": 0.25, "overrides": {"study.seeds": [0]}}, run="r",
                           only=["02_annotate"], notebooks_dir=nbs)
    message = str(caught.value)
    assert "\n" not in message and "StaleInputError" not in message
    assert message.startswith("02_annotate.ipynb failed in cell 3: annotate: data/r/demos is not finished; run "
                              "`refinevla data` first; or run the notebooks before it with these parameters "
                              "(`refinevla book --preset smoke --run r -p lambda_reason 0.25 -p study.seeds '[0]'` "
                              "without --only)"), message
    assert "StaleInputError" in caught.value.details and "----> 4 stage()" in caught.value.details
    assert "\x1b[" not in caught.value.details  # colours stripped: the log is read as text
    assert (run_root / "data" / "r" / book.LOG).read_text().startswith("--- ")  # the kernel's header line


def test_a_dead_kernel_and_a_cell_past_its_limit_end_in_one_line_naming_the_stage_to_resume(run_root):
    nbs = run_root / "nbs"
    nbs.mkdir()
    write_notebook(nbs / "03_finetune.ipynb", ['preset = "smoke"', "x = 1", "import os\nos._exit(9)"])
    with pytest.raises(book.NotebookFailed, match=r"^03_finetune.ipynb: its kernel died in cell 4 \(killed, or out "
                                                  r"of memory; its messages are in .*refinevla.log\); run `refinevla "
                                                  r"train --preset smoke --run r` \(a stage resumes"):
        book.run_notebooks("smoke", {}, run="r", only=["03_finetune"], notebooks_dir=nbs)
    assert "[papermill] ERROR | Kernel died" in (run_root / "data" / "r" / book.LOG).read_text()  # not the terminal
    write_notebook(nbs / "04_evaluate.ipynb", ['preset = "smoke"', "import time\ntime.sleep(60)"])
    with pytest.raises(book.NotebookFailed, match=r"^04_evaluate.ipynb: cell 3 ran past the limit of 3 s a cell; "
                                                  r"run `refinevla evaluate --preset smoke --run r` first .* "
                                                  r"--cell-timeout SECONDS$"):
        book.run_notebooks("smoke", {}, run="r", only=["04_evaluate"], notebooks_dir=nbs, timeout_s=3)
    assert not (run_root / "data" / "r" / "notebooks" / ".04_evaluate.key").exists()


def test_the_command_line_ends_a_stale_input_inside_a_notebook_in_one_line(tmp_path):
    """`refinevla book --only 02_annotate` on a run with no demonstrations: the real notebook, run by Papermill,
    stops in the annotate stage's input check; the command prints one line naming the missing folder and how to
    make it, and keeps the notebook's traceback in the run's log."""
    root = tmp_path / "root"
    proc = subprocess.run([sys.executable, "-m", "refinevla.cli", "book", "--preset", "smoke", "--run", "r", "-p",
                           "root", str(root), "--only", "02_annotate", "--no-build"], cwd=REPO,
                          env=dict(os.environ, MUJOCO_GL="egl"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("notebooks:")]
    assert len(lines) == 1, proc.stderr  # no traceback, no kernel message: the one line
    line, log = lines[0], root / "r" / book.LOG
    assert line.startswith(f"refinevla book: error: 02_annotate.ipynb failed in cell 4: annotate: {root}/r/demos "
                           "is not finished; run `refinevla data --run r` first"), line
    assert f"(`refinevla book --preset smoke --run r -p root {root}` without --only)" in line
    assert line.endswith(f"(traceback in {log})")
    text = log.read_text()
    assert "NotebookFailed" in text and "The notebook's traceback:" in text
    assert "----> 1 annotated = pipeline.run_annotate(cfg)" in text and "raise StaleInputError" in text
