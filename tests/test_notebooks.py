"""The notebooks: one source each (notebooks/*.ipynb), parameters cells that match the config's aliases and parse in
Papermill, the project kernel, run folders at the repository root wherever the kernel starts, and `make lab`.

`pytest tests/test_notebooks.py -q`
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import pytest
from papermill.inspection import inspect_notebook

from refinevla import book, config

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
ALWAYS = {"preset", "run", "overrides"}


def alias_sections(alias: str) -> set[str]:
    targets = config.ALIASES[alias]
    return {t.split(".")[0] for t in ([targets] if isinstance(targets, str) else targets)}


def parameters_cell(name: str):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{name}: {len(cells)} parameters cells"
    return nb, cells[0]


def test_one_source_per_notebook():
    """The .ipynb files are the source: no generator that would overwrite a student's edit, no stray copies."""
    assert not (REPO / "scripts" / "make_notebooks.py").exists()
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(book.notebooks())
    assert sorted(book.toc_notebooks()) == sorted(book.notebooks())
    for name in book.notebooks():  # committed without outputs
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), name


@pytest.mark.parametrize("name", list(book.notebooks()))
def test_parameters_cell_lists_the_aliases_its_stage_reads(name):
    """Each parameters cell holds preset, run, overrides and exactly the aliases (config.ALIASES) that name a field
    of a section its notebook's stage reads (book.notebooks(): its stage's declaration); Papermill infers every one of them."""
    _, cell = parameters_cell(name)
    inferred = set(inspect_notebook(str(NOTEBOOKS / f"{name}.ipynb")))
    assigned = set(re.findall(r"^(\w+)\s*=", cell.source, flags=re.M))
    sections = set(book.notebooks()[name].sections)
    expected = ALWAYS | {a for a in config.ALIASES if alias_sections(a) & sections}
    assert assigned == expected, f"{name}: missing {expected - assigned}, not an alias of its stage {assigned - expected}"
    assert inferred == assigned, f"{name}: Papermill cannot parse {assigned - inferred}"
    for line in cell.source.splitlines():  # '=' in a comment defeats Papermill's parser
        if "#" in line:
            assert "=" not in line.split("#", 1)[1], f"{name}: '=' in a parameters comment: {line}"
    assert "None" in cell.source and all(f"{a} = None" in cell.source for a in assigned - ALWAYS)


def test_every_alias_reaches_a_notebook():
    listed = set()
    for name in book.notebooks():
        listed |= set(inspect_notebook(str(NOTEBOOKS / f"{name}.ipynb")))
    assert set(config.ALIASES) <= listed, f"aliases no notebook takes: {set(config.ALIASES) - listed}"


def test_papermill_help_notebook_lists_every_parameter():
    exe = Path(sys.executable).parent / "papermill"
    for name in ("01_data", "03_finetune", "04_evaluate"):
        _, cell = parameters_cell(name)
        out = subprocess.run([str(exe), "--help-notebook", str(NOTEBOOKS / f"{name}.ipynb")], capture_output=True,
                             text=True, timeout=120).stdout
        listed = set(re.findall(r"^  (\w+): ", out, flags=re.M))
        assert listed == set(re.findall(r"^(\w+)\s*=", cell.source, flags=re.M)), (name, out)


@pytest.mark.parametrize("name", list(book.notebooks()))
def test_notebook_names_the_project_kernel_and_opens_the_run_first(name):
    nb, cell = parameters_cell(name)
    assert nb.metadata["kernelspec"]["name"] == book.KERNEL
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0] is cell
    assert "book.open_run(preset, run, globals(), overrides)" in code[1].source  # before anything reads data/
    tags = {t for c in code[2:] for t in c.metadata.get("tags", [])}
    assert "parameters" in cell.metadata["tags"] and "remove-cell" in cell.metadata["tags"]
    assert all(c.metadata.get("tags") for c in code), f"{name}: a code cell shown with its code"
    assert tags <= {"remove-input", "hide-input", "hide-cell", "remove-cell"}


@pytest.mark.parametrize("name", list(book.notebooks()))
def test_a_page_that_shows_models_states_their_settings_first_and_visibly(name):
    """Its first shown output is book.page_note (lambda, top-K and seeds of its models, and a warning when the run's
    stored results disagree), in a cell whose output the book keeps, after the cell that runs its stage (whose
    outputs it describes, re-made or not); the data and teacher pages show no model."""
    code = [c for c in nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4).cells if c.cell_type == "code"]
    notes = [i for i, c in enumerate(code) if "book.page_note(cfg)" in c.source]
    if name not in book.MODEL_PAGES:
        assert name in ("01_data", "02_annotate") and not notes
        assert not any(re.search(r"load_policy|[\"'](train|evaluate|attention)[\"']", c.source) for c in code), name
        return
    assert len(notes) == 1, f"{name}: {len(notes)} page notes"
    note = notes[0]
    assert code[note].source.startswith("display(Markdown(book.page_note(cfg)))")
    assert code[note].metadata["tags"] == ["remove-input"]  # the output stays on the page (not remove-/hide-cell)
    stage = [i for i, c in enumerate(code) if "pipeline.run_" in c.source]
    assert all(i < note for i in stage), f"{name}: the note comes before its stage ran"
    shown = [i for i, c in enumerate(code) if {"remove-input", "hide-input"} & set(c.metadata.get("tags", []))]
    assert shown[0] == note, f"{name}: cell {shown[0]} shows a result before the page states its models"


def test_open_run_resolves_run_folders_at_the_repository_root(tmp_path, monkeypatch):
    """A kernel started in notebooks/ (JupyterLab) or anywhere else reads and writes data/<run>/ at the top."""
    monkeypatch.chdir(NOTEBOOKS)
    cfg = book.open_run("smoke", "labrun", {"lambda_reason": 0.25, "unrelated": 3}, {})
    assert Path.cwd() == REPO
    assert cfg.run_dir.resolve() == REPO / "data" / "labrun"
    assert cfg.refinevla.lambda_reason == 0.25
    monkeypatch.chdir(tmp_path)
    book.open_run("smoke", "labrun", {}, {})
    assert Path.cwd() == REPO
    assert not (NOTEBOOKS / "data").exists()


def test_notebooks_data_is_ignored_by_git():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    assert subprocess.run(["git", "check-ignore", "-q", "notebooks/data/x/demos"], cwd=REPO).returncode == 0


def test_ensure_kernel_registers_this_interpreter_once(tmp_path):
    assert book.ensure_kernel(str(tmp_path)) == book.KERNEL
    spec = tmp_path / "share" / "jupyter" / "kernels" / book.KERNEL / "kernel.json"
    data = json.loads(spec.read_text())
    assert data["argv"][0] == sys.executable and data["display_name"] == book.KERNEL_DISPLAY
    before = spec.stat().st_mtime_ns
    book.ensure_kernel(str(tmp_path))
    assert spec.stat().st_mtime_ns == before


def _lab_commands(*wrap, cwd=REPO) -> str:
    return subprocess.run([*wrap, "make", "-n", "-o", "setup", "lab"], cwd=cwd, capture_output=True, text=True,
                          check=True).stdout


def test_make_lab_allows_root_only_as_root():
    root = os.getuid() == 0
    out = _lab_commands()
    assert ("--allow-root" in out) == root and "ensure_kernel" in out and "notebooks/" in out
    if root and shutil.which("setpriv"):  # the same target as an ordinary user: no --allow-root
        # the Makefile alone, in a folder that user may enter (a checkout under a 0700 folder, as `mktemp -d` makes)
        with tempfile.TemporaryDirectory() as folder:
            os.chmod(folder, 0o755)
            shutil.copy(REPO / "Makefile", folder)
            user = _lab_commands("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", cwd=folder)
        assert "--allow-root" not in user and "jupyter lab" in user


@pytest.mark.slow
def test_make_lab_starts_jupyterlab(tmp_path):
    """`make lab` really serves (as whoever runs the tests: root here, so --allow-root is exercised)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"))
    proc = subprocess.Popen(["make", "-o", "setup", "lab",
                             f"LAB_ARGS=--no-browser --port={port} --ServerApp.token=t --ServerApp.ip=127.0.0.1"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env)
    lines = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if f":{port}/lab" in line:
                break
        assert any(f":{port}/lab" in line for line in lines), "".join(lines)[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
