"""The teacher's answer cache when its file is damaged: a truncated or garbage SQLite file gives one error naming
the file and the fix, `check` reports it, and `rebuild` restores every answer from the ledger or from an
annotated dataset without asking the teacher again (fake chat server on 127.0.0.1, real `openai` client).

    .venv/bin/pytest tests/test_teacher_cache.py -q
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers beside this file, in any import mode
from refinevla.teacher import CacheError, annotate, cache  # noqa: E402
from test_teacher import make_demos  # noqa: E402
from test_teacher_http import ROOT, assert_each_row_has_its_own_answer, assert_secret_nowhere, http_cfg  # noqa: E402
from test_teacher_http import key, server  # noqa: E402,F401  the same fixtures (key: autouse)


def cache_file(tmp_path) -> Path:
    return tmp_path / "data" / "cache" / "teacher.sqlite"


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    assert not Path(str(path) + "-wal").exists() or Path(str(path) + "-wal").stat().st_size == 0
    path.write_bytes(data[:len(data) // 2] if how == "truncated" else b"\x00garbage" * 64)


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_a_damaged_cache_names_the_file_and_is_rebuilt_from_the_ledger(server, tmp_path, how):
    demos = make_demos(episodes=2, steps=40)  # enough answers for several database pages
    first = annotate(demos, http_cfg(server, tmp_path), tmp_path / "out")
    path = cache_file(tmp_path)
    assert cache.check(path)["ok"] and cache.check(path)["answers"] == 80 == cache.check(path)["ledger_answers"]
    damage(path, how)

    with pytest.raises(CacheError) as error:
        annotate(demos, http_cfg(server, tmp_path), tmp_path / "out2")
    message = str(error.value)
    assert str(path) in message and f"python -m refinevla.teacher.cache rebuild {path}" in message
    assert "\n" not in message and server.count == 80  # nothing was sent
    report = cache.check(path)
    assert not report["ok"] and report["error"] and report["ledger_answers"] == 80

    restored = cache.rebuild(path)
    assert restored["from_ledger"] == 80 and Path(restored["moved_aside"]).exists()  # the damaged file is kept
    again = annotate(demos, http_cfg(server, tmp_path), tmp_path / "out2")
    assert server.count == 80, "every answer came back from the ledger"
    assert again["rationale"] == first["rationale"] and cache.check(path)["ok"]
    assert_secret_nowhere(tmp_path)


def test_rebuild_from_an_annotated_dataset_when_the_ledger_is_gone_too(server, tmp_path):
    demos = make_demos(episodes=2, steps=6)
    annotate(demos, http_cfg(server, tmp_path, stride=2), tmp_path / "out")
    path = cache_file(tmp_path)
    damage(path, "truncated")
    cache.ledger_path(path).unlink()
    restored = cache.rebuild(path, [tmp_path / "out" / "dataset"])
    assert restored == {**restored, "from_ledger": 0, "from_datasets": 6}  # the key frames, not every row
    assert cache.check(path)["ledger_answers"] == 6  # written to the ledger for the next time
    out = annotate(demos, http_cfg(server, tmp_path, stride=2), tmp_path / "out2")
    assert server.count == 6 and out["rationale"] == annotate(demos, http_cfg(server, tmp_path, stride=2),
                                                              tmp_path / "out3")["rationale"]
    assert_each_row_has_its_own_answer(out.filter(lambda r: r["step_index"] == r["rationale_source_step"]))


def test_the_command_line_checks_and_rebuilds(server, tmp_path):
    annotate(make_demos(), http_cfg(server, tmp_path), tmp_path / "out")
    path = cache_file(tmp_path)
    run = lambda *args: subprocess.run([sys.executable, "-m", "refinevla.teacher.cache", *args, str(path)],
                                       cwd=ROOT, capture_output=True, text=True)
    assert run("check").returncode == 0
    shutil.copy(path, tmp_path / "good.sqlite")
    damage(path, "truncated")
    bad = run("check")
    assert bad.returncode != 0 and f"rebuild {path}" in bad.stderr
    assert json.loads(run("rebuild").stdout)["from_ledger"] == 10
    assert json.loads(run("check").stdout)["answers"] == 10
