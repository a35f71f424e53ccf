"""The book runner: skip keys, failing notebooks named with their cell, secrets refused, the toc. Real Papermill.

`pytest tests/test_book.py -q`
"""
import json

import nbformat
import pytest

from refinevla import book


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
    with pytest.raises(book.NotebookFailed, match=r"(?s)01_data.ipynb failed in cell 4 .*ValueError: bad value"):
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


def test_toc_lists_pages_then_the_run_notebooks(tmp_path):
    toc = book.write_toc(tmp_path, "data/myrun")
    text = toc.read_text()
    assert "data/myrun/notebooks/01_data" in text and "data/myrun/notebooks/06_results" in text
    assert text.index("book/method") < text.index("data/myrun/notebooks/01_data")
