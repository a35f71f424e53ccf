"""The book: run the stage notebooks with Papermill, then build the Jupyter Book from the executed copies.

Notebooks run in order with the same parameters (preset + overrides); a notebook whose source, parameters,
package code and input stages did not change since its last successful run is not re-run. The first failing
notebook stops everything in one line naming the cell, the cause and the fix (its traceback goes to the run's log).
Every page that shows models states their lambda, top-K and seeds (``page_note``) and warns when a stored result
was made under other parameters; a page that runs no stage is refused instead. The book is then built with
execution off, warnings as errors, and every page's footer names the commit and the date it was built from.

``notebooks/*.ipynb`` are the only source of the notebooks: edit them in JupyterLab (`make lab`) or any editor.
Inside a notebook, ``open_run`` resolves the run config and moves to the repository root, so a kernel started in
notebooks/ reads and writes the same data/<run>/ folders as `make book`.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from . import stages

REPO = Path(__file__).resolve().parent.parent
#: The pages that run no stage and read the run's results: name -> the stage folders they read (None: every stage's).
#: The overview is written last (from the run's CSVs) but read first.
READING_PAGES = {"06_results": None, "07_ablations": (), "00_overview": ("train", "evaluate", "attention")}
#: The pages that read committed results (results/<folder>/, refinevla.archive) instead of the run's: name -> folder.
RESULTS_PAGES = {"07_ablations": "study"}
OVERVIEW = "00_overview"


@dataclass(frozen=True)
class Notebook:
    """One notebook of the book: the config sections its stage reads (its parameters cell lists exactly the aliases,
    config.ALIASES, that name a field of one of them, beside preset, run and overrides: tests/test_notebooks.py), the
    stage folders it reads and those it writes. The markers of every stage under both are part of its skip key, the
    outputs' recorded after it ran: when a stage is re-run from outside the book (a Papermill run of one notebook,
    the CLI) with another config, the notebook that shows it no longer matches and runs again, so no page shows a
    model or a number its run config did not make."""

    name: str
    sections: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    #: the command that runs its stage alone (the fix a failed notebook names); None: a page that runs no stage
    command: str | None = None


def notebooks() -> dict[str, Notebook]:
    """Every notebook in execution order: each stage's (refinevla.stages), then the pages that read the results."""
    run = [stage for stage in stages.run_stages() if stage.notebook]
    every = tuple(folder for stage in run for folder in stage.outputs)
    out = [Notebook(s.notebook, s.sections, s.inputs, s.outputs, s.name) for s in run]
    out += [Notebook(name, (), every if reads is None else reads) for name, reads in READING_PAGES.items()]
    return {nb.name: nb for nb in out}


def toc_notebooks() -> list[str]:
    """The notebooks in reading order: the overview first."""
    return [OVERVIEW] + [name for name in notebooks() if name != OVERVIEW]


#: The kernel the notebooks name (registered into the venv by `make lab` and by run_notebooks).
KERNEL = "refinevla"
KERNEL_DISPLAY = "Python (refinevla)"
#: Book pages before and after the notebooks, in reading order.
PAGES_BEFORE = ["book/intro", "book/method", "book/paper"]
PAGES_AFTER = ["book/data_sources", "book/simplerenv", "book/limitations", "book/references"]
SECRET_HINTS = ("OPENAI_API_KEY", "GEMINI_API_KEY", "HF_TOKEN")
#: The run's log file (data/<run>/refinevla.log): the command line appends a failure's traceback to it, and the
#: notebooks' kernels write their own messages (Jupyter's warnings, a crash) there instead of the terminal.
LOG = "refinevla.log"


class NotebookFailed(RuntimeError):
    """A notebook stopped (an error in a cell, its kernel died or ran past the cell limit) or a page was refused.
    The message is one line naming the notebook, the cause and the fix; ``details`` holds the notebook's own
    traceback, which the command line keeps in the run's log (LOG) instead of printing it."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


def stage_failures() -> tuple[type, ...]:
    """The runtime failures a stage raises with a one-line message naming the cause and the fix (a stale or damaged
    input, damaged records, a damaged teacher cache, a teacher that gave up, an unreadable checkpoint, a bad config
    value): the command line ends them in that line, from a stage or from inside a notebook."""
    from .checkpoints import CheckpointError
    from .fields import ConfigError
    from .integrity import DamagedFileError
    from .markers import StaleInputError
    from .records import RecordsDamagedError
    from .release import ReleaseError
    from .teacher.cache import CacheError
    from .teacher.online import TeacherError
    from .archive import ArchiveError

    return (StaleInputError, ReleaseError, DamagedFileError, RecordsDamagedError, CacheError, TeacherError,
            CheckpointError, ConfigError, ArchiveError)


#: The pages that show a model (every one but the data and the teacher's): each states, right after the cell that
#: runs its stage, the lambda, top-K and seeds of its models and any stored result made under other ones (page_note).
MODEL_PAGES = ["03_finetune", "04_evaluate", "05_attention", "06_results", "07_ablations", "00_overview"]


def open_run(preset: str, run: str = "", namespace: dict | None = None, overrides: dict | None = None):
    """The run config inside a notebook (its parameters cell's values), with the working directory moved to the
    repository root: run folders (data/<run>/) are the ones `make book` writes, wherever the kernel started.
    A page that shows models states their settings in a cell of its own (``page_note``), after its stage ran."""
    from . import config

    if (REPO / "notebooks").is_dir():  # an installed copy outside the repository keeps the working directory
        os.chdir(REPO)
    return config.notebook_config(preset, run, namespace, overrides)


def models_line(cfg) -> str:
    """The settings that tell this page's models apart: per arm, its lambda, how many top layers its LoRA tunes and
    its fine-tuning seeds; then the base every arm starts from, and the oracle's models."""
    from . import pipeline

    seeds: dict[str, list[int]] = {}
    for arm, seed in pipeline.trained_arms(cfg):
        seeds.setdefault(arm, []).append(seed)
    arms = []
    for arm, arm_seeds in seeds.items():
        tcfg, mcfg = pipeline.arm_configs(cfg, arm, arm_seeds[0])
        loss = f"lambda_reason = {tcfg.lambda_reason}" if tcfg.use_rationale else "no reasoning loss (lambda 0)"
        arms.append(f"**{arm}**: {loss}, top K = {mcfg.tune_top_k_layers}, seeds {arm_seeds}")
    units = pipeline.evaluated_units(cfg)
    oracle = [seed for arm, seed in units if arm == pipeline.ORACLE]
    base = (f"the base: {cfg.model.checkpoint}" if cfg.model.checkpoint else
            f"the base: pre-trained in this run (seed {cfg.pretrain.seed}, {cfg.pretrain.steps} steps)")
    return ("*Models on this page* (lambda_reason: the weight of the reasoning loss; top K: the decoder layers "
            "LoRA tunes; seeds: the fine-tuning seeds) - " + "; ".join(arms) + f"; {base}"
            + (f"; **oracle**: the refinevla models of seeds {oracle} acting on the teacher's rationale" if oracle
               else "") + ".")


def disagreements(cfg) -> list[str]:
    """One line per result stored in the run that was not made with ``cfg`` (stages not made yet are not listed):
    a fine-tune, an evaluation or the attention stage whose key is not the one ``cfg`` gives, naming up to three keys
    that differ, and the evaluation's tables (evaluate/records.csv) when their arms and seeds are not ``cfg``'s."""
    from . import markers, pipeline

    out = []
    sections = pipeline.MODEL_SECTIONS + ("evaluate", "attention")
    made = []
    for arm, seed in pipeline.evaluated_units(cfg):
        made += [pipeline.model_key(cfg, arm, seed)] if arm != pipeline.ORACLE else []
        made.append((pipeline.evaluate_dir(cfg, arm, seed), pipeline.evaluate_key(cfg, arm, seed)))
    made.append((cfg.stage_dir("attention"), None))  # its key reads the models: computed only when it exists
    for folder, expected in made:
        marker = markers.read_marker(folder) if folder is not None else None
        if marker is None or any(f"{folder} was" in o for o in out):
            continue
        if marker.get("hash") == (pipeline.attention_key(cfg) if expected is None else expected):
            continue
        diff = markers._config_diff(cfg, Path(folder) / "config.yaml", sections)
        why = f"other parameters ({'; '.join(diff)})" if diff else "another key (other code or inputs)"
        out.append(f"{folder} was made under {why}")
    tables = unit_mismatch(cfg)
    return out + ([tables] if tables else [])


def unit_mismatch(cfg) -> str:
    """A line when the evaluation's tables (evaluate/records.csv: success, paired, overview) hold other arms or
    seeds than ``cfg`` evaluates, e.g. a page given fewer seeds than the run has; "" when they agree or are absent."""
    import pandas as pd

    from . import pipeline

    path = cfg.stage_dir("evaluate", "records.csv")
    if not Path(path).exists():
        return ""
    try:
        found = pd.read_csv(path, usecols=["arm", "train_seed"]).drop_duplicates()
    except (ValueError, pd.errors.ParserError) as error:
        return f"{path} cannot be read ({' '.join(str(error).split())})"
    stored = {(str(a), int(s)) for a, s in found.itertuples(index=False)}
    wanted = set(pipeline.evaluated_units(cfg))

    def name(units):
        return ", ".join(f"{a}" if s < 0 else f"{a} seed {s}" for a, s in sorted(units)[:4]) + (
            f" and {len(units) - 4} more" if len(units) > 4 else "")

    parts = ([f"holds {name(stored - wanted)}, which these parameters do not evaluate"] if stored - wanted else []) \
        + ([f"lacks {name(wanted - stored)}"] if wanted - stored else [])
    return f"{path} {' and '.join(parts)} (study.seeds, study.arms, study.base or study.oracle differ)" if parts else ""


def page_note(cfg) -> str:
    """The note of every page that shows models (MODEL_PAGES), its first output: their settings (models_line), and
    a warning naming any stored result made under others (disagreements). A page that runs no stage is refused
    instead (refuse_disagreeing); a stage page re-makes its own stage first, so it warns only about the others."""
    found = disagreements(cfg)
    if not found:
        return models_line(cfg)
    return (models_line(cfg) + "\n\n**Warning: this page's parameters disagree with the run's stored results**: "
            + "; ".join(found[:3]) + (f"; and {len(found) - 3} more" if len(found) > 3 else "")
            + ". Numbers read from those folders were not made with the settings above.")


def ensure_kernel(prefix: str | None = None) -> str:
    """Register this interpreter as the kernel the notebooks name (KERNEL) inside the virtual environment (no
    user or system folder is touched), unless it already points at this interpreter; returns the kernel name."""
    prefix = prefix or sys.prefix
    spec = Path(prefix) / "share" / "jupyter" / "kernels" / KERNEL / "kernel.json"
    if spec.exists() and json.loads(spec.read_text()).get("argv", [""])[0] == sys.executable:
        return KERNEL
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", prefix, "--name", KERNEL,
                    "--display-name", KERNEL_DISPLAY], check=True, capture_output=True)
    return KERNEL


def _package_hash() -> str:
    h = hashlib.sha256()
    for path in sorted((REPO / "refinevla").rglob("*")):
        if path.suffix in (".py", ".yaml", ".csv"):
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def notebook_key(name: str, params: dict, run_dir: Path, notebooks_dir: Path = REPO / "notebooks") -> str:
    """Hash of the notebook source, its parameters, the package code, and the markers of the stages it reads and
    writes (``Notebook``)."""
    h = hashlib.sha256()
    h.update((Path(notebooks_dir) / f"{name}.ipynb").read_bytes())
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    h.update(_package_hash().encode())
    nb = notebooks()[name]
    if name in RESULTS_PAGES:  # the committed results it reads
        for path in sorted((REPO / "results" / RESULTS_PAGES[name]).glob("*")):
            h.update(path.name.encode() + path.read_bytes())
    for stage in nb.inputs + nb.outputs:
        markers = sorted((run_dir / stage).rglob("_done.json")) if (run_dir / stage).exists() else []
        for marker in markers:
            h.update(str(marker.relative_to(run_dir)).encode() + marker.read_bytes())
        if not markers:
            h.update(b"missing")
    return h.hexdigest()[:16]


def run_notebooks(preset: str, params: dict, run: str = "", only: list[str] | None = None,
                  force: bool = False, timeout_s: int = 3600, root: str = "data",
                  notebooks_dir: Path = REPO / "notebooks") -> Path:
    """Execute each notebook into <root>/<run>/notebooks/ (``root`` relative to the repository, or absolute);
    returns that folder. The first failing notebook stops everything: NotebookFailed (``execute``)."""
    from tqdm import tqdm

    run = run or preset
    run_dir = REPO / root / run
    notebooks_dir = Path(notebooks_dir)
    out_dir = run_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    parameters = {"preset": preset, "run": run, **params}
    kernel = ensure_kernel()
    with open(run_dir / LOG, "a") as kernel_log:  # the kernels' own messages: the run's log, not the terminal
        known = notebooks()
        for name in tqdm(only or list(known), desc="notebooks"):
            if name not in known:
                raise ValueError(f"unknown notebook {name!r}; known: {list(known)}")
            output = out_dir / f"{name}.ipynb"
            key_file = out_dir / f".{name}.key"
            key = notebook_key(name, parameters, run_dir, notebooks_dir)
            if not force and output.exists() and key_file.exists() and key_file.read_text() == key:
                print(f"{name}: unchanged since its last successful run, not re-run")
                continue
            if not known[name].outputs and name not in RESULTS_PAGES:  # it must not show other settings' results
                refuse_disagreeing(name, preset, run, params, root)
            key_file.unlink(missing_ok=True)
            print(f"{name}: running")
            kernel_log.write(f"--- {datetime.datetime.now():%Y-%m-%d %H:%M:%S} the kernel of {name}.ipynb\n")
            kernel_log.flush()
            execute(notebooks_dir / f"{name}.ipynb", output, parameters, kernel, timeout_s, kernel_log,
                    *_fixes(name, preset, run, params, only))
            scrub_secrets(output)
            hide_parameters(output)
            # the key after the run: its own stages' markers are now the ones its pages show
            key_file.write_text(notebook_key(name, parameters, run_dir, notebooks_dir))
    return out_dir


def _command(command: str, preset: str, run: str, params: dict) -> str:
    """The command line that runs ``command`` (a stage, or "book") with the book's parameters."""
    import shlex

    given = {**{k: v for k, v in params.items() if k != "overrides"}, **params.get("overrides", {})}
    args = [f"-p {k} {shlex.quote(v if isinstance(v, str) else json.dumps(v))}" for k, v in given.items()]
    return " ".join([f"refinevla {command} --preset {preset} --run {run}"] + args)


def _fixes(name: str, preset: str, run: str, params: dict, only) -> tuple[str, str]:
    """(what resumes a notebook that died or ran out of time: its stage alone, or the book again; what makes a
    missing or stale input when --only skipped the notebooks before it: the book without --only, else "")."""
    book = f"`{_command('book', preset, run, params)}`"
    stage = notebooks()[name].command
    before = f"the notebooks before it with these parameters ({book} without --only)" if only else ""
    return (f"`{_command(stage, preset, run, params)}`" if stage else book), before


def _kernel_manager(stderr):
    """The kernel manager class Papermill starts each kernel with: the kernel process writes its own messages
    (Jupyter's warnings, its interrupt on shutdown, a crash) to ``stderr`` (the run's log) instead of the terminal.
    Cell output is unchanged: it reaches the terminal through Papermill (ipykernel forwards the kernel's own
    file descriptors 1 and 2, subprocesses included, to the cell's streams)."""
    from jupyter_client import AsyncKernelManager

    class LoggedKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw):
            kw.setdefault("stderr", stderr)
            return await super().start_kernel(**kw)

    return LoggedKernelManager


def _last_cell(path: Path) -> int | None:
    """The number ("In [n]") of the last cell Papermill started in an executed copy: the count of code cells it
    started, since each one runs once, in order (a kernel that dies at once never sends the cell its own number);
    None without a copy."""
    import nbformat

    try:
        cells = nbformat.read(path, as_version=4).cells
    except (OSError, ValueError):
        return None
    return sum(1 for c in cells if c.cell_type == "code" and c.get("metadata", {}).get("papermill", {}).get(
        "start_time")) or None


def execute(source: Path, output: Path, parameters: dict, kernel: str, timeout_s: int, kernel_log, rerun: str,
            before: str = ""):
    """Run one notebook with Papermill. A failure is a NotebookFailed in one line: an expected stage failure
    (stage_failures) by its own message, which names the cause and the fix (a missing or stale input adds
    ``before``: the notebooks --only skipped); any other error by its type and message; a dead kernel or a cell
    past ``timeout_s`` with ``rerun``, the command that resumes the notebook's stage. The notebook's traceback is
    kept in ``details`` (and in the executed copy)."""
    import papermill as pm
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import strip_color

    name = Path(source).stem
    logger = logging.getLogger("papermill")  # its own warnings (a dead kernel, a timeout): the log too
    handler = logging.StreamHandler(kernel_log)
    handler.setFormatter(logging.Formatter("[papermill] %(levelname)s | %(message)s"))
    logger.addHandler(handler)
    try:  # the cells' own streams reach the terminal once, through stdout_file / stderr_file
        pm.execute_notebook(str(source), str(output), parameters=parameters, cwd=str(REPO), kernel_name=kernel,
                            execution_timeout=timeout_s, progress_bar=False, log_output=False,
                            stdout_file=sys.stdout, stderr_file=sys.stderr,
                            kernel_manager_class=_kernel_manager(kernel_log))
    except pm.PapermillExecutionError as err:
        classes = {cls.__name__: cls for cls in stage_failures()}
        cause = err.evalue if err.ename in classes else \
            f"{err.ename}: {err.evalue} (not an expected failure: the traceback shows where)"
        if before and err.ename in classes and issubclass(classes[err.ename], classes["StaleInputError"]):
            cause += f"; or run {before}"
        raise NotebookFailed(f"{name}.ipynb failed in cell {err.exec_count}: {cause} (executed copy: {output})",
                             strip_color("\n".join(err.traceback))) from None
    except CellTimeoutError as err:
        raise NotebookFailed(f"{name}.ipynb: cell {_last_cell(output)} ran past the limit of {timeout_s} s a cell; "
                             f"run {rerun} first (a stage resumes where it stopped), or raise the limit with "
                             "--cell-timeout SECONDS", str(err)) from None
    except DeadKernelError as err:
        raise NotebookFailed(f"{name}.ipynb: its kernel died in cell {_last_cell(output)} (killed, or out of "
                             f"memory; its messages are in {kernel_log.name}); run {rerun} (a stage resumes where it "
                             "stopped)", str(err)) from None
    finally:
        logger.removeHandler(handler)


def refuse_disagreeing(name: str, preset: str, run: str, params: dict, root: str = "data") -> None:
    """A page that runs no stage (00_overview, 06_results) is not built from results whose stored config disagrees
    with the parameters given: NotebookFailed, one line naming the folder, the keys and the fix."""
    from . import config

    namespace = {k: v for k, v in params.items() if k != "overrides"}
    cfg = config.notebook_config(preset, run, namespace, params.get("overrides"))
    cfg.root = str(REPO / root)
    found = disagreements(cfg)
    if found:
        raise NotebookFailed(f"{name}: {found[0]}" + (f" (and {len(found) - 1} more)" if len(found) > 1 else "")
                             + "; run the stage notebooks with these parameters first (refinevla book without "
                               "--only), or build with the run's own parameters")


def scrub_secrets(path: Path) -> None:
    """Refuse to keep an executed notebook that contains the value of a secret environment variable."""
    text = path.read_text()
    for var in SECRET_HINTS + tuple(v for v in os.environ if v.endswith(("_API_KEY", "_TOKEN"))):
        value = os.environ.get(var, "")
        if len(value) >= 8 and value in text:
            path.unlink()
            raise NotebookFailed(f"{path.name} contained the value of ${var}; the executed copy was deleted. "
                                 "Secrets must be read from the environment inside the package, never printed.")


def hide_parameters(path: Path) -> None:
    """Tag the parameters cell and the one Papermill injects remove-cell: the book shows the resolved config
    once (a table), not the cells that set it."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if ("parameters" in tags or "injected-parameters" in tags) and "remove-cell" not in tags:
            cell.metadata["tags"] = tags + ["remove-cell"]
    nbformat.write(nb, path)


def write_toc(run_dir: Path, root_prefix: str) -> Path:
    """The book's table of contents for this run: the intro, the overview, the paper's pages, then the
    executed notebooks stage by stage."""
    import yaml

    pages = [f"{root_prefix}/notebooks/{n}" for n in toc_notebooks() if n != OVERVIEW]
    existing = [p for p in PAGES_AFTER if (REPO / f"{p}.md").exists()]
    toc = {"format": "jb-book", "root": PAGES_BEFORE[0], "parts": [
        {"caption": "The result", "chapters": [{"file": f"{root_prefix}/notebooks/{OVERVIEW}"}]},
        {"caption": "The paper", "chapters": [{"file": p} for p in PAGES_BEFORE[1:]]},
        {"caption": "The study, stage by stage", "numbered": True, "chapters": [{"file": n} for n in pages]},
        {"caption": "More", "chapters": [{"file": p} for p in existing]},
    ]}
    path = run_dir / "_toc.yml"
    path.write_text(yaml.safe_dump(toc, sort_keys=False))
    return path


def build_info(repo: Path = REPO) -> str:
    """"Built from commit abc1234 (with uncommitted changes) on 2026-11-29 16:05 UTC": the footer of every page."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    commit = git("rev-parse", "--short", "HEAD") or os.environ.get("GITHUB_SHA", "")[:7]
    dirty = " (with uncommitted changes)" if commit and git("status", "--porcelain", "--untracked-files=no") else ""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"Built from {'commit ' + commit if commit else 'an unknown commit'}{dirty} on {when}."


def write_config(run_dir: Path) -> Path:
    """The repository's _config.yml with this build's commit and date as every page's footer."""
    import yaml

    conf = yaml.safe_load((REPO / "_config.yml").read_text())
    conf.setdefault("html", {})["extra_footer"] = f'<p class="build-info">{build_info()}</p>'
    path = run_dir / "_config.yml"
    path.write_text(yaml.safe_dump(conf, sort_keys=False))
    return path


def build_book(run: str, root: str = "data", strict: bool = True) -> Path:
    """jupyter-book build (execution off, warnings are errors); returns the path of index.html."""
    run_dir = REPO / root / run
    mathjax = REPO / "book" / "_static" / "mathjax" / "tex-mml-chtml.js"
    if not mathjax.exists():
        raise RuntimeError(f"{mathjax} is missing: run `bash scripts/vendor_mathjax.sh` (needs npm) so the "
                           "book's formulas render offline")
    toc = write_toc(run_dir, f"{root}/{run}")
    conf = write_config(run_dir)
    out = run_dir / "book"
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(REPO), "--toc", str(toc),
           "--config", str(conf), "--path-output", str(out)]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed (exit {proc.returncode}); see the messages above")
    index = out / "_build" / "html" / "index.html"
    if not index.exists():
        raise RuntimeError(f"jupyter-book exited 0 but wrote no {index}")
    dedupe_scripts(index.parent)
    return index


def dedupe_scripts(html_dir: Path) -> int:
    """Drop repeated identical inline <script> blocks from the built pages (sphinx-thebe adds its configuration
    twice under Jupyter Book 1.0, and the second `const` declaration is a console error); returns the pages fixed."""
    import re

    fixed = 0
    for page in Path(html_dir).rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        seen, parts, changed = set(), [], False
        pos = 0
        for m in re.finditer(r"<script>(.*?)</script>\s*", text, flags=re.S):
            body = m.group(1).strip()
            if body in seen:
                parts.append(text[pos:m.start()])
                pos, changed = m.end(), True
            seen.add(body)
        if changed:
            page.write_text("".join(parts) + text[pos:], encoding="utf-8")
            fixed += 1
    return fixed

