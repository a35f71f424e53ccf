"""The book: run the stage notebooks with Papermill, then build the Jupyter Book from the executed copies.

Notebooks run in order with the same parameters (preset + overrides); a notebook whose source, parameters,
package code and input stages did not change since its last successful run is not re-run. The first failing
notebook stops everything and names the cell. The book is then built with execution off, warnings as errors.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = ["01_data", "02_annotate", "03_finetune", "04_evaluate", "05_attention", "06_results"]
#: Stage folders (under the run) each notebook reads: the markers of every stage under them are part of its skip key.
NOTEBOOK_INPUTS = {
    "01_data": [],
    "02_annotate": ["demos"],
    "03_finetune": ["annotate", "demos_pretrain"],
    "04_evaluate": ["train"],
    "05_attention": ["train", "annotate"],
    "06_results": ["demos", "demos_pretrain", "annotate", "train", "evaluate", "attention"],
}
#: Book pages around the notebooks, in reading order (None marks where the notebooks go).
PAGES_BEFORE = ["book/intro", "book/method", "book/paper"]
PAGES_AFTER = ["book/data_sources", "book/simplerenv", "book/limitations", "book/references"]
SECRET_HINTS = ("OPENAI_API_KEY", "GEMINI_API_KEY", "HF_TOKEN")


class NotebookFailed(RuntimeError):
    pass


def _package_hash() -> str:
    h = hashlib.sha256()
    for path in sorted((REPO / "refinevla").rglob("*")):
        if path.suffix in (".py", ".yaml", ".csv"):
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def notebook_key(name: str, params: dict, run_dir: Path, notebooks_dir: Path = REPO / "notebooks") -> str:
    """Hash of the notebook source, its parameters, the package code and its input stages' markers."""
    h = hashlib.sha256()
    h.update((Path(notebooks_dir) / f"{name}.ipynb").read_bytes())
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    h.update(_package_hash().encode())
    for stage in NOTEBOOK_INPUTS[name]:
        markers = sorted((run_dir / stage).rglob("_done.json")) if (run_dir / stage).exists() else []
        for marker in markers:
            h.update(str(marker.relative_to(run_dir)).encode() + marker.read_bytes())
        if not markers:
            h.update(b"missing")
    return h.hexdigest()[:16]


def run_notebooks(preset: str, params: dict, run: str = "", only: list[str] | None = None,
                  force: bool = False, timeout_s: int = 3600, root: str = "data",
                  notebooks_dir: Path = REPO / "notebooks") -> Path:
    """Execute each notebook into data/<run>/notebooks/; returns that folder."""
    import papermill as pm
    from tqdm import tqdm

    run = run or preset
    run_dir = REPO / root / run
    notebooks_dir = Path(notebooks_dir)
    out_dir = run_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    parameters = {"preset": preset, "run": run, **params}
    for name in tqdm(only or NOTEBOOKS, desc="notebooks"):
        if name not in NOTEBOOKS:
            raise ValueError(f"unknown notebook {name!r}; known: {NOTEBOOKS}")
        output = out_dir / f"{name}.ipynb"
        key_file = out_dir / f".{name}.key"
        key = notebook_key(name, parameters, run_dir, notebooks_dir)
        if not force and output.exists() and key_file.exists() and key_file.read_text() == key:
            print(f"{name}: unchanged since its last successful run, not re-run")
            continue
        key_file.unlink(missing_ok=True)
        print(f"{name}: running")
        try:
            pm.execute_notebook(str(notebooks_dir / f"{name}.ipynb"), str(output), parameters=parameters,
                                cwd=str(REPO), kernel_name="python3", execution_timeout=timeout_s,
                                progress_bar=False, log_output=True, stdout_file=sys.stdout, stderr_file=sys.stderr)
        except pm.PapermillExecutionError as err:
            raise NotebookFailed(f"{name}.ipynb failed in cell {err.exec_count} (executed copy: {output}):\n"
                                 f"{err.ename}: {err.evalue}") from None
        scrub_secrets(output)
        key_file.write_text(key)  # the key of the source that ran (its inputs are upstream: unchanged by it)
    return out_dir


def scrub_secrets(path: Path) -> None:
    """Refuse to keep an executed notebook that contains the value of a secret environment variable."""
    text = path.read_text()
    for var in SECRET_HINTS + tuple(v for v in os.environ if v.endswith(("_API_KEY", "_TOKEN"))):
        value = os.environ.get(var, "")
        if len(value) >= 8 and value in text:
            path.unlink()
            raise NotebookFailed(f"{path.name} contained the value of ${var}; the executed copy was deleted. "
                                 "Secrets must be read from the environment inside the package, never printed.")


def write_toc(run_dir: Path, root_prefix: str) -> Path:
    """The book's table of contents for this run: pages, then the executed notebooks."""
    import yaml

    notebooks = [f"{root_prefix}/notebooks/{n}" for n in NOTEBOOKS]
    existing = [p for p in PAGES_AFTER if (REPO / f"{p}.md").exists()]
    toc = {"format": "jb-book", "root": PAGES_BEFORE[0], "parts": [
        {"caption": "The paper", "chapters": [{"file": p} for p in PAGES_BEFORE[1:]]},
        {"caption": "The study, stage by stage", "numbered": True, "chapters": [{"file": n} for n in notebooks]},
        {"caption": "More", "chapters": [{"file": p} for p in existing]},
    ]}
    path = run_dir / "_toc.yml"
    path.write_text(yaml.safe_dump(toc, sort_keys=False))
    return path


def build_book(run: str, root: str = "data", strict: bool = True) -> Path:
    """jupyter-book build (execution off, warnings are errors); returns the path of index.html."""
    run_dir = REPO / root / run
    mathjax = REPO / "book" / "_static" / "mathjax" / "tex-mml-chtml.js"
    if not mathjax.exists():
        raise RuntimeError(f"{mathjax} is missing: run `bash scripts/vendor_mathjax.sh` (needs npm) so the "
                           "book's formulas render offline")
    toc = write_toc(run_dir, f"{root}/{run}")
    out = run_dir / "book"
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(REPO), "--toc", str(toc),
           "--path-output", str(out)]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed (exit {proc.returncode}); see the messages above")
    index = out / "_build" / "html" / "index.html"
    if not index.exists():
        raise RuntimeError(f"jupyter-book exited 0 but wrote no {index}")
    return index


def make_book(preset: str = "default", params: dict | None = None, run: str = "", force: bool = False,
              root: str = "data") -> Path:
    """Everything: notebooks through Papermill, then the book. Returns the built index.html."""
    run = run or preset
    run_notebooks(preset, params or {}, run=run, force=force, root=root)
    return build_book(run, root=root)
