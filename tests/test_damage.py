"""Damaged files are found before they are trusted: a real smoke-preset run, cut down to one seed and
two arms, is made once; each case damages one file of a copy of it and runs the command a user would.

    .venv/bin/pytest tests/test_damage.py -q      (about 3 minutes: the run, then one stage per case)

A damaged output is named in one line and only its stage re-runs (and writes the same bytes again); a damaged
input of a stage that is not re-run stops it in one line before anything is deleted, the traceback kept in the
run's log; episode records never disappear in silence; runtime failures end in one line.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from refinevla import integrity
from refinevla.records import EpisodeLog, RecordsDamagedError, read_records, record_key, resume_records

REPO = Path(__file__).resolve().parent.parent
RUN = "dmg"
SMALL = ["-p", "study.seeds", "[0]", "-p", "study.arms", "{}", "-p", "study.oracle", "false", "-p", "study.base",
         "false", "-p", "evaluate.splits", "[in_distribution]"]

pytestmark = pytest.mark.slow


def cli(root: Path, command: str, *extra, check=None):
    env = dict(os.environ, MUJOCO_GL="egl")
    proc = subprocess.run([sys.executable, "-m", "refinevla.cli", command, "--preset", "smoke", "--run", RUN, "-p",
                           "root", str(root), *SMALL, *extra], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    if check is not None:
        assert proc.returncode == check, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("made")
    for command in ("data", "annotate", "train", "evaluate"):
        cli(root, command, check=0)
    return root / RUN


@pytest.fixture
def copy(made, tmp_path):
    """A copy of the finished run (its own root: nothing can be reused from the original)."""
    root = tmp_path / "root"
    shutil.copytree(made, root / RUN, symlinks=True)
    return root


def marker(stage: Path) -> dict:
    return json.loads((stage / "_done.json").read_text())


def lines_naming(text: str, path: Path) -> list[str]:
    return [line for line in text.splitlines() if str(path) in line]


def assert_restored(stage: Path, rel: str):
    """The re-run wrote the file again, byte for byte what the marker recorded."""
    entry = marker(stage)["files"][rel]
    assert integrity._digest(stage / rel) == entry["sha256"]
    assert (stage / ".damaged" / rel).exists()  # the damaged bytes are kept, out of the way


def test_every_output_is_in_its_marker_with_size_and_hash(made):
    stage = made / "train" / "refinevla" / "seed0"
    files = marker(stage)["files"]
    assert files["model/adapter_model.safetensors"]["bytes"] == (stage / "model/adapter_model.safetensors").stat().st_size
    assert "_done.json" not in files and "_key" not in files
    assert "dataset/data-00000-of-00001.arrow" in marker(made / "annotate")["files"]
    assert "episodes.jsonl" in marker(made / "evaluate" / "refinevla" / "seed0")["files"]
    assert not (stage / ".damaged").exists()


def test_a_cut_adapter_is_named_and_only_its_fine_tune_reruns(copy):
    stage = copy / RUN / "train" / "refinevla" / "seed0"
    adapter = stage / "model" / "adapter_model.safetensors"
    assert integrity.format_problem(adapter) is None
    os.truncate(adapter, adapter.stat().st_size // 2)
    assert "safetensors header describes" in integrity.format_problem(adapter)
    proc = cli(copy, "train", check=0)
    named = lines_naming(proc.stdout, adapter)
    assert len(named) == 1 and "is damaged" in named[0] and "re-running refinevla seed 0" in named[0]
    assert "baseline seed 0: up to date" in proc.stdout and "pretrain: up to date" in proc.stdout
    assert_restored(stage, "model/adapter_model.safetensors")
    assert json.loads((stage / "model" / "vla.json").read_text())["final_metrics"]  # the logged end, kept
    proc = cli(copy, "evaluate", check=0)  # same model, same key: its evaluation is still valid
    assert "evaluate refinevla seed 0: up to date" in proc.stdout


def test_a_damaged_model_stops_its_evaluation_in_one_line_before_anything_is_deleted(copy):
    adapter = copy / RUN / "train" / "refinevla" / "seed0" / "model" / "adapter_model.safetensors"
    os.truncate(adapter, adapter.stat().st_size // 2)
    episodes = copy / RUN / "evaluate" / "refinevla" / "seed0" / "episodes.jsonl"
    before = episodes.read_bytes()
    proc = cli(copy, "evaluate", "--force", "evaluate", check=1)
    err = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(err) == 1 and err[0].startswith("refinevla evaluate: error:") and str(adapter) in err[0] and "refinevla train --run dmg" in err[0], proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" in (copy / RUN / "refinevla.log").read_text()
    assert episodes.read_bytes() == before


def test_garbage_in_the_annotated_dataset_is_found_and_annotate_alone_reruns(copy):
    stage = copy / RUN / "annotate"
    arrow = stage / "dataset" / "data-00000-of-00001.arrow"
    data = bytearray(arrow.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = b"\xff" * 64
    arrow.write_bytes(bytes(data))
    proc = cli(copy, "annotate", check=0)
    named = lines_naming(proc.stdout, arrow)
    assert len(named) == 1 and "re-running annotate" in named[0]
    assert_restored(stage, "dataset/data-00000-of-00001.arrow")
    assert "refinevla seed 0: up to date" in cli(copy, "train", check=0).stdout


def test_a_cut_demos_file_is_found_by_the_format_check_of_an_older_marker(copy):
    stage = copy / RUN / "demos"
    arrow = stage / "dataset" / "data-00000-of-00001.arrow"
    os.truncate(arrow, arrow.stat().st_size // 2)
    done = marker(stage)
    assert integrity.format_problem(arrow).startswith("unreadable arrow")
    del done["files"]  # a marker written before manifests: the Arrow stream is read to its end instead
    (stage / "_done.json").write_text(json.dumps(done))
    proc = cli(copy, "data", check=0)
    named = lines_naming(proc.stdout, arrow)
    assert len(named) == 1 and "re-running data" in named[0] and "unreadable arrow" in named[0]
    assert integrity.format_problem(arrow) is None and marker(stage)["files"]
    assert "annotate: up to date" in cli(copy, "annotate", check=0).stdout


def test_a_damaged_record_line_reruns_its_episode_and_the_tables_keep_every_episode(copy):
    stage = copy / RUN / "evaluate" / "refinevla" / "seed0"
    episodes = stage / "episodes.jsonl"
    lines = episodes.read_text().splitlines()
    assert len(lines) == 2
    episodes.write_text("{not json\n" + lines[1] + "\n")
    with pytest.raises(RecordsDamagedError, match=f"{episodes}: line 1 is not a valid episode record"):
        read_records(episodes)
    proc = cli(copy, "evaluate", check=0)
    assert len(lines_naming(proc.stdout, episodes)) == 1  # named as damaged, then its episode re-ran
    assert f"{episodes}: line 1 is not a valid episode record; dropped, its episode runs again" in proc.stderr
    assert len(read_records(episodes)) == 2
    success = pd.read_csv(copy / RUN / "evaluate" / "success.csv")
    assert set(success["n"]) == {2}


def test_record_lines(tmp_path, capsys):
    path = tmp_path / "episodes.jsonl"
    good = [dict(task="t", split="in_distribution", seed=s, success=True) for s in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"task": "t", "se')  # a kill mid-write
    assert read_records(path) == good
    assert "last line is cut short" in capsys.readouterr().err
    path.write_text(json.dumps(good[0]) + "\n[1, 2\n" + json.dumps(good[1]) + "\n")
    with pytest.raises(RecordsDamagedError, match="line 2 is not a valid episode record"):
        read_records(path)
    assert resume_records(path, retry_errors=False) == good[:2]  # resuming: dropped with a message, re-run
    assert "line 2 is not a valid episode record; dropped" in capsys.readouterr().err
    assert read_records(path) == good[:2]


def test_the_episode_log_resumes_appends_and_returns_the_plan_in_order(tmp_path):
    """The resume logic both evaluation runners share (refinevla.evaluate, refinevla.backends.simpler)."""
    path = tmp_path / "episodes.jsonl"
    rec = lambda seed, **kw: dict(task="t", split="in_distribution", seed=seed, success=seed % 2 == 0, **kw)
    other = dict(rec(99), task="other")  # an episode of another plan in the same file
    path.write_text("".join(json.dumps(r) + "\n" for r in (rec(2), other, rec(0, error="E: boom"))))
    plan = [("t", "in_distribution", s) for s in range(4)]
    log = EpisodeLog(path, record_key, retry_errors=True)  # the errored episode runs again
    assert log.todo(plan) == [plan[0], plan[1], plan[3]]
    new = [rec(3), rec(0), rec(1)]
    appended = []
    for r in log.append(iter(new)):
        appended.append(r)
        assert read_records(path)[-1] == r  # on disk before the next episode runs
    assert appended == new
    assert log.in_order(plan) == [rec(0), rec(1), rec(2), rec(3)]
    assert EpisodeLog(path, record_key).todo(plan) == []  # a second resume has nothing left to run
    assert other in read_records(path)  # nothing of another plan is lost


def test_a_dead_teacher_endpoint_ends_in_one_line_with_the_traceback_in_the_log(copy):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = cli(copy, "annotate", "-p", "teacher", "http", "-p", "base_url", f"http://127.0.0.1:{port}/v1",
               "-p", "annotate.backoff_s", "0", check=1)
    err = [line for line in proc.stderr.splitlines() if line.startswith("refinevla annotate: error:")]
    assert len(err) == 1 and "cannot connect" in err[0] and "check base_url" in err[0]
    assert "Traceback" not in proc.stderr and "TeacherError" in (copy / RUN / "refinevla.log").read_text()


def test_a_damaged_teacher_cache_ends_in_one_line(copy):
    cache = copy / "cache" / "teacher.sqlite"
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(b"this is not a database" * 100)
    proc = cli(copy, "annotate", "-p", "teacher", "http", "-p", "base_url", "http://127.0.0.1:9/v1", check=1)
    err = [line for line in proc.stderr.splitlines() if line.startswith("refinevla annotate: error:")]
    assert len(err) == 1 and "cache is damaged" in err[0] and "rebuild" in err[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------ the book on this run (#33)
def shown_outputs(notebook: Path) -> str:
    """The text of every output the book keeps (cells not tagged remove-cell / hide-output)."""
    import nbformat

    out = []
    for cell in nbformat.read(notebook, as_version=4).cells:
        if cell.cell_type != "code" or {"remove-cell", "remove-output"} & set(cell.metadata.get("tags", [])):
            continue
        for o in cell.get("outputs", []):
            out.append("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/markdown", "")))
    return "\n".join(out)


def test_pages_state_their_models_settings_and_a_page_of_other_settings_is_refused(copy):
    """The real notebooks through Papermill on the run: the evaluation page (its stage up to date) and the overview
    state lambda, top-K and seeds of their models on the page; the overview asked for another lambda than the
    models were trained with is refused in one line, and a stage page asked for it stops in one line, naming the
    model and the keys, before anything is deleted."""
    run_dir = copy / RUN
    proc = cli(copy, "book", "--only", "04_evaluate", "00_overview", "--no-build", check=0)
    assert "evaluate refinevla seed 0: up to date" in proc.stdout
    for name in ("04_evaluate", "00_overview"):
        shown = shown_outputs(run_dir / "notebooks" / f"{name}.ipynb")
        assert "**refinevla**: lambda_reason = 0.5, top K = 1, seeds [0]" in shown, (name, shown[:2000])
        assert "**baseline**: no reasoning loss (lambda 0), top K = 1, seeds [0]" in shown and "disagree" not in shown
    episodes = (run_dir / "evaluate" / "refinevla" / "seed0" / "episodes.jsonl").read_bytes()
    proc = cli(copy, "book", "--only", "00_overview", "--no-build", "-p", "lambda_reason", "0.25", check=1)
    err = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("notebooks:")]
    assert len(err) == 1 and err[0].startswith("refinevla book: error: 00_overview: ") and \
        f"{run_dir}/train/refinevla/seed0 was made under other parameters (refinevla.lambda_reason: 0.5 there, 0.25 " \
        "now)" in err[0], proc.stderr
    proc = cli(copy, "book", "--only", "04_evaluate", "--no-build", "-p", "lambda_reason", "0.25", check=1)
    err = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("notebooks:")]
    assert len(err) == 1 and err[0].startswith("refinevla book: error: 04_evaluate.ipynb failed in cell 4: evaluate "
                                               "refinevla seed 0: "), proc.stderr
    assert "refinevla.lambda_reason: 0.5 there, 0.25 now" in err[0] and "without --only" in err[0]
    assert "Traceback" not in proc.stderr and "The notebook's traceback:" in (run_dir / "refinevla.log").read_text()
    assert (run_dir / "evaluate" / "refinevla" / "seed0" / "episodes.jsonl").read_bytes() == episodes
