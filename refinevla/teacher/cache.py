"""The teacher's answer cache: SQLite (WAL) keyed by the hash of what determines an answer, with a JSONL ledger.

Every successful answer is appended to a ledger beside the database (``<cache>.answers.jsonl``) before it is
committed, so a lost or damaged database can be rebuilt without asking the teacher again. A run writes the cache
from its main thread only, one commit per group of answers that arrived together; in WAL mode a SIGKILL loses at
most the answers in flight. An answer that failed is
stored with its reason (and asked again by the next run), but not in the ledger. The API key is never stored.

    python -m refinevla.teacher.cache check data/cache/teacher.sqlite
    python -m refinevla.teacher.cache rebuild data/cache/teacher.sqlite [--from data/<run>/annotate/dataset ...]

`rebuild` moves the damaged file aside (never deletes it) and fills a new database from the ledger and from any
annotated datasets named (their `input_hash` column is the cache key). The Batch API's table of submitted batches
is not rebuilt: a batch still running at the provider is then submitted again (paid twice, nothing lost).
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from .rationale import Rationale

COLUMNS = ("key", "status", "rationale", "model", "prompt_version", "input_tokens", "output_tokens", "attempts",
           "error", "created")


@dataclass
class Answer:
    """What happened to one frame: the rationale (None if it failed), what it took, and why it failed."""
    rationale: Rationale | None = None
    error: str = ""
    kind: str = ""          # a non-transient failure's kind ("key refused (401)", ...); "" when transient or ok
    requests: int = 0
    retries: int = 0
    repairs: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


class CacheError(RuntimeError):
    """The cache file cannot be read; the message names the file and the fix."""


def ledger_path(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".answers.jsonl")


def damaged(path, error) -> CacheError:
    return CacheError(
        f"{path}: the teacher's answer cache is damaged ({error}). Fix: `python -m refinevla.teacher.cache rebuild "
        f"{path}` rebuilds it from its ledger {ledger_path(path).name} (add `--from <run>/annotate/dataset` to "
        "use an annotated dataset too); or delete the file to ask the teacher again")


def is_damage(error: Exception) -> bool:
    """A damaged file ("file is not a database", "disk image is malformed"), not a busy one ("locked")."""
    return isinstance(error, sqlite3.DatabaseError) and not isinstance(error, sqlite3.OperationalError) or \
        "malformed" in str(error) or "not a database" in str(error)


class AnswerCache:
    """SQLite (WAL) store of teacher answers: key -> ok rationale with its usage, or failed with the reason."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(str(self.path), timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a killed process loses no commit
            self.db.execute("""CREATE TABLE IF NOT EXISTS answers (
                key TEXT PRIMARY KEY, status TEXT NOT NULL, rationale TEXT, model TEXT, prompt_version TEXT,
                input_tokens INTEGER, output_tokens INTEGER, attempts INTEGER, error TEXT, created REAL)""")
            self.db.commit()
            result = self.db.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as e:
            if is_damage(e):
                raise damaged(self.path, e) from None
            raise
        if result != "ok":
            self.db.close()
            raise damaged(self.path, result)
        self.ledger = ledger_path(self.path)

    def query(self, sql: str, args=()) -> list[tuple]:
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as e:
            if is_damage(e):
                raise damaged(self.path, e) from None
            raise

    def ok_keys(self) -> set[str]:
        """Every key with a successful answer (one query, instead of one per frame that is not cached)."""
        return {k for (k,) in self.query("SELECT key FROM answers WHERE status = 'ok'")}

    def get(self, key: str) -> dict | None:
        """The cached successful answer, or None (missing or failed: both are asked again)."""
        names = ("rationale", "model", "prompt_version", "input_tokens", "output_tokens")
        rows = self.query(f"SELECT {', '.join(names)} FROM answers WHERE key = ? AND status = 'ok'", (key,))
        return dict(zip(names, rows[0])) if rows else None

    def put_many(self, answers: list[tuple[str, Answer]], model: str, prompt_version: str) -> None:
        """Store answers that arrived together: the successes appended to the ledger, then one commit."""
        now = time.time()
        rows = [(key, "ok" if a.rationale else "failed", a.rationale.model_dump_json() if a.rationale else None,
                 model, prompt_version, a.input_tokens, a.output_tokens, a.requests, a.error or None, now)
                for key, a in answers]
        self.insert(rows, ledger=True)

    def insert(self, rows: list[tuple], ledger: bool) -> None:
        """Rows in COLUMNS order; the ok ones also go to the ledger when `ledger`."""
        ok = [dict(zip(COLUMNS, row)) for row in rows if row[1] == "ok"]
        if ledger and ok:
            with open(self.ledger, "a") as f:
                f.writelines(json.dumps({k: v for k, v in r.items() if k not in ("status", "error")}) + "\n"
                             for r in ok)
        try:
            self.db.executemany(f"INSERT OR REPLACE INTO answers VALUES ({', '.join('?' * len(COLUMNS))})", rows)
            self.db.commit()
        except sqlite3.DatabaseError as e:
            if is_damage(e):
                raise damaged(self.path, e) from None
            raise

    def close(self) -> None:
        self.db.close()


def read_ledger(path) -> list[tuple]:
    """The ledger's answers as rows in COLUMNS order (a line cut short by a kill is skipped)."""
    rows, ledger = [], ledger_path(path)
    if not ledger.exists():
        return rows
    for line in ledger.read_text().splitlines():
        try:
            r = json.loads(line)
            Rationale.model_validate_json(r["rationale"])
        except (ValueError, KeyError, TypeError):
            continue
        rows.append((r["key"], "ok", r["rationale"], r.get("model"), r.get("prompt_version"),
                     r.get("input_tokens"), r.get("output_tokens"), r.get("attempts"), None, r.get("created")))
    return rows


def dataset_rows(folder) -> list[tuple]:
    """An annotated dataset's key-frame answers from an HTTP teacher as cache rows (input_hash = the key)."""
    import datasets
    names = ["input_hash", "rationale", "teacher", "teacher_model", "prompt_version", "step_index",
             "rationale_source_step"]
    cols = datasets.load_from_disk(str(folder)).select_columns(names)[:]
    return [(key, "ok", rationale, model, version, None, None, None, None, time.time())
            for key, rationale, teacher, model, version, step, source in zip(*(cols[n] for n in names))
            if teacher == "http" and step == source]


def check(path) -> dict:
    """Whether the cache opens and passes SQLite's integrity check, with its answer counts; never raises."""
    path = Path(path)
    report = {"path": str(path), "exists": path.exists(), "ok": False, "error": None, "answers": 0, "failed": 0,
              "ledger_answers": len({r[0] for r in read_ledger(path)})}
    if not path.exists():
        report["error"] = "no such file"
        return report
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            result = db.execute("PRAGMA integrity_check").fetchone()[0]
            if result != "ok":
                raise sqlite3.DatabaseError(result)
            counts = dict(db.execute("SELECT status, COUNT(*) FROM answers GROUP BY status").fetchall())
    except sqlite3.DatabaseError as e:
        report["error"] = str(e)
        return report
    report.update(ok=True, answers=counts.get("ok", 0), failed=counts.get("failed", 0))
    return report


def rebuild(path, datasets_from=()) -> dict:
    """Move the cache file (and its -wal / -shm) aside, then fill a new one from the ledger and the annotated
    datasets named; return what was restored and where the old file went."""
    path = Path(path)
    aside = None
    if path.exists():
        aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        path.rename(aside)
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(Path(str(aside or path) + suffix + ".old"))
    from_ledger = read_ledger(path)
    have = {r[0] for r in from_ledger}
    from_data = [r for folder in datasets_from for r in dataset_rows(folder) if r[0] not in have]
    cache = AnswerCache(path)
    cache.insert(from_ledger, ledger=False)
    cache.insert(from_data, ledger=True)  # now in the ledger too, for the next rebuild
    cache.close()
    return {"path": str(path), "moved_aside": str(aside) if aside else None, "from_ledger": len(have),
            "from_datasets": len({r[0] for r in from_data})}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m refinevla.teacher.cache", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("check", "rebuild"))
    parser.add_argument("path", help="the cache file, e.g. data/cache/teacher.sqlite")
    parser.add_argument("--from", dest="datasets", nargs="*", default=[], help="annotated dataset folders (rebuild)")
    args = parser.parse_args(argv)
    report = check(args.path) if args.action == "check" else rebuild(args.path, args.datasets)
    print(json.dumps(report, indent=1))
    if args.action == "check" and not report["ok"]:
        raise SystemExit(f"{args.path}: damaged ({report['error']}); run `python -m refinevla.teacher.cache "
                         f"rebuild {args.path}`")


if __name__ == "__main__":
    main()
