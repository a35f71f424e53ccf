"""Episode records: the one format every evaluation backend writes, its JSONL file, and the summary tables.

    records = read_records("data/run/evaluate/refinevla/seed0/episodes.jsonl")
    summarise(records, split="in_distribution")     # per task: success rate, Wilson 95% interval, errors
    compare_table({"baseline": s1, "refinevla": s2}, ci=True)

A record is one JSON line per finished episode, appended and flushed as the episode ends:
``{"task", "split", "seed", "success", "steps", "wall_s", "error", "policy_s"}`` (``error`` is null, or the
message of the exception that ended the episode; a record written before splits existed has no "split" and counts
as "in_distribution"). A backend adds its own columns after these (the SimplerEnv backend: ``setting``,
``variant``, ``partial_success``, and no ``split``).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd

from .config import IN_DISTRIBUTION, SPLITS, VARIANT  # noqa: F401  (re-exported: the split names)
from .stats import wilson

RECORD_KEYS = ("task", "split", "seed", "success", "steps", "wall_s", "error")


def record_key(record: dict) -> tuple[str, str, int]:
    """(task, split, seed) of a record (one written before splits existed is in_distribution)."""
    return record["task"], record.get("split") or IN_DISTRIBUTION, int(record["seed"])


def error_text(e: BaseException) -> str:
    """How an exception that ended an episode is recorded."""
    return f"{type(e).__name__}: {e}"


# -----------------------------------------------------------------------------
# the file


class RecordsDamagedError(ValueError):
    """A line of an episodes.jsonl other than its last is not a record: one line naming the file, the line and
    the fix (refinevla.cli ends with it)."""


def _parse_lines(path: Path) -> tuple[list[dict], list[int], bool]:
    """(records, numbers of the bad lines other than the last, whether the last line is torn)."""
    lines = path.read_text().splitlines()
    records, bad, torn = [], [], False
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
            records.append(record)
        except ValueError:
            if number == len(lines):
                torn = True  # a kill mid-write cuts the last line only
            else:
                bad.append(number)
    return records, bad, torn


def read_records(path) -> list[dict]:
    """Episode records of an ``episodes.jsonl`` (missing file = none). A torn last line (a run killed while writing
    it) is left out with a message; any other line that is not a record stops here (RecordsDamagedError naming the
    file and the line), so that no table loses an episode in silence."""
    path = Path(path)
    if not path.exists():
        return []
    records, bad, torn = _parse_lines(path)
    if bad:
        raise RecordsDamagedError(
            f"{path}: line {bad[0]} is not a valid episode record" + (f" (and {len(bad) - 1} more line(s))"
                                                                       if len(bad) > 1 else "")
            + "; run the evaluation again (`refinevla evaluate`): the damaged file is found and its episodes re-run")
    if torn:
        print(f"{path}: its last line is cut short (a run stopped while writing it); that episode is left out "
              "and runs again when the evaluation resumes", file=sys.stderr, flush=True)
    return records


def append_record(fh, record: dict) -> None:
    """Append one record to an open episodes.jsonl and make it durable before the next episode starts."""
    fh.write(json.dumps(record) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def is_torn(path: Path) -> bool:
    """True when the file's last line was cut short (no final newline), e.g. by a kill mid-write."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) != b"\n"


def rewrite_records(path: Path, records: list[dict]) -> None:
    """Replace the file's content with these whole records (after dropping errored or torn ones)."""
    with open(path, "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")


def resume_records(path: Path, retry_errors: bool) -> list[dict]:
    """The records a resumed run keeps: every whole one, less the errored ones with ``retry_errors``; a line that
    is not a record (a torn last line, or one damaged later) is dropped with a message naming it, and its
    episode runs again. The file is rewritten when something was dropped, so that appended lines start on a
    fresh line."""
    path = Path(path)
    if not path.exists():
        return []
    records, bad, torn = _parse_lines(path)
    for number in bad + ([len(path.read_text().splitlines())] if torn else []):
        print(f"{path}: line {number} is not a valid episode record; dropped, its episode runs again",
              file=sys.stderr, flush=True)
    if retry_errors:
        records = [r for r in records if not r.get("error")]
    if retry_errors or bad or torn or is_torn(path):
        rewrite_records(path, records)
    return records


class EpisodeLog:
    """One evaluation's ``episodes.jsonl``, the resume logic every backend shares:

        log = EpisodeLog(out / "episodes.jsonl", record_key, retry_errors)
        for record in log.append(run(log.todo(plan))): ...   # each appended (durably) as its episode ends
        records = log.in_order(plan)

    ``key(record)`` is the episode's key in the plan (``record_key``: (task, split, seed); SimplerEnv's: (task,
    setting, variant, seed)). The records kept on resume are :func:`resume_records`'s."""

    def __init__(self, path, key, retry_errors: bool = False):
        self.path, self.key = Path(path), key
        self.done = {key(r): r for r in resume_records(self.path, retry_errors)}

    def todo(self, plan: list) -> list:
        """The plan's keys without a record yet, in plan order."""
        return [k for k in plan if k not in self.done]

    def append(self, records):
        """Append each record of the iterable to the file as it comes (flushed and synced before the next) and
        yield it."""
        with open(self.path, "a") as fh:
            for record in records:
                append_record(fh, record)
                self.done[self.key(record)] = record
                yield record

    def in_order(self, plan: list) -> list[dict]:
        """The recorded episodes of the plan, in plan order (records of other episodes in the file are left out)."""
        return [self.done[k] for k in plan if k in self.done]


# -----------------------------------------------------------------------------
# metrics


def summarise(records, tasks=None, split: str | None = None) -> pd.DataFrame:
    """One row per task (in ``tasks`` order, else first-seen order) and an "average" row.

    Columns: success_rate, successes, n, ci_low, ci_high (Wilson 95%), errors, and partial_rate where the backend
    records a ``partial_success`` (the SimplerEnv grasp). The average row is the mean of the per-task rates (how
    the paper's tables average); its interval is Wilson's on the pooled counts.
    ``split``: only the records of this split (a record without "split" is in_distribution); None: all records.
    """
    records = list(records)
    if split is not None:
        records = [r for r in records if (r.get("split") or IN_DISTRIBUTION) == split]
    df = pd.DataFrame(records, columns=list(RECORD_KEYS) + ["partial_success"])
    partial = df["partial_success"].notna().any()
    if tasks is None:
        tasks = list(dict.fromkeys(df["task"]))
    rows = {}
    for task in tasks:
        sub = df[df["task"] == task]
        k, n = int(sub["success"].astype(bool).sum()), len(sub)
        rows[task] = _row(k, n, k / n if n else float("nan"), int(sub["error"].notna().sum()))
        if partial:
            known = sub["partial_success"].dropna().astype(bool)
            rows[task]["partial_rate"] = float(known.mean()) if len(known) else float("nan")
    per_task = pd.DataFrame.from_dict(rows, orient="index")
    k, n = int(per_task["successes"].sum()) if rows else 0, int(per_task["n"].sum()) if rows else 0
    mean_rate = float(per_task["success_rate"].mean()) if rows else float("nan")
    rows["average"] = _row(k, n, mean_rate, int(per_task["errors"].sum()) if rows else 0)
    if partial:
        rows["average"]["partial_rate"] = float(per_task["partial_rate"].mean()) if rows else float("nan")
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "task"
    return out


def _row(k: int, n: int, rate: float, errors: int) -> dict:
    lo, hi = wilson(k, n)
    return {"success_rate": rate, "successes": k, "n": n, "ci_low": lo, "ci_high": hi, "errors": errors}


def compare_table(summaries: dict, ci: bool = False) -> pd.DataFrame:
    """The paper's table shape: one row per task (+ average), one column per model.

    ``summaries`` maps a model name to its :func:`summarise` frame. Cells are success rates in [0, 1], or with
    ``ci`` strings such as ``"57.5% [42.2, 71.5]"``. A task a model was not evaluated on is NaN / "".
    """
    if not summaries:
        raise ValueError("compare_table needs at least one model summary")
    tasks = list(dict.fromkeys(t for s in summaries.values() for t in s.index if t != "average")) + ["average"]
    table = pd.DataFrame(index=pd.Index(tasks, name="task"))
    for model, s in summaries.items():
        if ci:
            table[model] = [_cell(s.loc[t]) if t in s.index else "" for t in tasks]
        else:
            table[model] = [float(s.loc[t, "success_rate"]) if t in s.index else float("nan") for t in tasks]
    return table


def _cell(row) -> str:
    return f"{100 * row['success_rate']:.1f}% [{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]"
