"""Several processes, as under `accelerate launch`: only the main process writes markers, config.yaml and stage
outputs; the others take part in training and wait for the markers of the rest (refinevla.markers).

    .venv/bin/pytest tests/test_multiprocess.py -q

The ranks are real processes with the environment `accelerate launch` gives them (RANK, LOCAL_RANK, WORLD_SIZE),
without a process group (no MASTER_ADDR: the file-based wait is used). The stage bodies are the stand-ins of
tests/test_stage_keys.py (their training stand-ins write nothing on a non-main rank, as train.finetune and
train.pretrain_base do). An audit hook (sys.addaudithook) records every file the non-main rank opens for writing,
renames, creates or deletes under the run root.
"""
import multiprocessing as mp
import os
import sys
import traceback
from pathlib import Path

import pytest

from refinevla import markers

sys.path.insert(0, str(Path(__file__).parent))
from test_stage_keys import StandIns, smoke  # noqa: E402

WRITE_EVENTS = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.link", "os.replace"}


class RankStandIns(StandIns):
    """The stand-ins, with training bodies that write only on the main rank (like the real ones)."""

    def pretrain(self, *a, **kw):
        if markers.is_main():
            return super().pretrain(*a, **kw)
        self._log("pretrain", a[3])

    def finetune(self, *a, **kw):
        if markers.is_main():
            return super().finetune(*a, **kw)
        self._log("finetune", a[4], f"{a[3].arm}/{a[3].seed}")


def _rank(rank: int, tmp_path: Path, report: Path, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    if port:  # a gloo process group on the CPU, set up by accelerate's PartialState as under accelerate launch
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)  # a forked child: forget the single-process state of earlier tests
    else:
        os.environ.pop("MASTER_ADDR", None)
    root = str(tmp_path / "data")
    writes = []

    def audit(event, args):
        if event == "open" and args[0] is not None and isinstance(args[0], (str, bytes, os.PathLike)):
            path, mode = os.fsdecode(args[0]), args[1] or "r"
            if path.startswith(root) and any(c in str(mode) for c in "wax+"):
                writes.append(f"open {path} {mode}")
        elif event in WRITE_EVENTS and args and isinstance(args[0], (str, bytes, os.PathLike)) \
                and os.fsdecode(args[0]).startswith(root):
            writes.append(f"{event} {os.fsdecode(args[0])}")

    try:
        from refinevla import pipeline

        monkeypatch = pytest.MonkeyPatch()
        stand_ins = RankStandIns(monkeypatch)
        sys.addaudithook(audit)
        pipeline.run_all(smoke(tmp_path))
        report.write_text(repr(dict(calls=stand_ins.calls, writes=writes)))
    except BaseException:  # noqa: BLE001 - reported to the test
        report.write_text(repr(dict(error=traceback.format_exc())))
        os._exit(1)
    os._exit(0)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("group", ["file wait", "gloo"])
def test_only_the_main_rank_writes_and_the_other_waits_for_it(tmp_path, group):
    ctx = mp.get_context("fork")
    reports = [tmp_path / f"rank{r}.txt" for r in range(2)]
    port = _free_port() if group == "gloo" else 0
    procs = [ctx.Process(target=_rank, args=(r, tmp_path, reports[r], port)) for r in (1, 0)]  # the waiting rank first
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
    main, other = (eval(r.read_text()) if r.exists() else {"error": "no report"} for r in reports)  # noqa: S307
    assert "error" not in main and "error" not in other, (main.get("error"), other.get("error"))
    assert [p.exitcode for p in procs] == [0, 0]
    assert other["writes"] == []  # the non-main rank wrote, renamed and deleted nothing under data/
    assert any("_done.json" in w for w in main["writes"])  # (the hook sees the main rank's writes)
    # it takes part in the training stages the main rank has not finished yet when it gets there (without a
    # process group nothing holds the main rank back); every other stage it only waits for
    assert {s for s, _, _ in other["calls"]} <= {"pretrain", "finetune"}
    if group == "gloo":  # with a process group every rank trains exactly what the main rank trains
        assert other["calls"], "the process group was not set up"
        assert sorted(c for c in other["calls"]) == sorted(c for c in main["calls"] if c[0] in ("pretrain", "finetune"))
    cfg = smoke(tmp_path)
    from refinevla import pipeline

    assert pipeline.is_done(cfg.stage_dir("attention"), pipeline.attention_key(cfg))


def _hammer(path: str, n: int, tag: str) -> None:
    for i in range(n):
        markers.atomic_write(Path(path), f"{tag} {i}")


def test_atomic_writes_from_several_processes_never_collide(tmp_path):
    """Every rank used to write the same `_done.json.tmp` and rename it: one rank's rename found it gone."""
    ctx = mp.get_context("fork")
    target = tmp_path / "_done.json"
    procs = [ctx.Process(target=_hammer, args=(str(target), 200, f"p{k}")) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * 4
    assert target.read_text().split()[1] == "199" and not list(tmp_path.glob("*.tmp"))


def test_a_non_main_rank_never_writes_a_marker(tmp_path, monkeypatch):
    cfg = smoke(tmp_path)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    markers.mark_done(tmp_path / "stage", "key", cfg, started=0.0)
    markers.clear_marker(tmp_path / "stage")
    assert not (tmp_path / "stage").exists()
    with pytest.raises(TimeoutError, match="rank 1"):
        markers.wait_for_marker(tmp_path / "stage", "key", timeout_s=0.2)
