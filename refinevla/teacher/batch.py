"""The batch teacher: the provider's Batch API for paper-scale annotation (~125k frames) as JSONL files.

Online requests (refinevla/teacher/online.py) suit thousands of frames. Beyond that the provider's own batch engine does
the scale-out: the requests go up as JSONL files (`files.create(purpose="batch")`) and run as batches
(`batches.create(endpoint="/v1/chat/completions")`) within `batch_window`, at half the online price, with no
client-side concurrency or rate limit to tune. OpenAI offers it, and so does Gemini through its
OpenAI-compatible endpoint (since September 2025). Each line is exactly the online request body, with the
answer-cache key as its `custom_id`, so online and batch answers share one cache.

Resumable and never paid twice: each batch is recorded in the cache database (table `batches`: the sha256 of its
input file and the keys it holds) *before* it is created, its id right after, and it is marked collected only
after its answers are committed. A run that is killed, or that stops waiting after `batch_timeout_s`, leaves
its batches running at the provider; the next run collects them instead of submitting their frames again. A
crash between creating a batch and recording its id is covered by the batch's metadata
(`refinevla_input_sha`), looked up in the provider's batch list. A provider that refuses `metadata` gets the
batch without it, and one that refuses listing is not searched: the ledger is kept either way, and only that
narrow crash window then costs a second submission of the same frames.

Lines that come back with an error status, invalid JSON, or not at all (an expired or failed batch) are
stored as failed with their reason and sent again by the next run; a batch has no repair round.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from .cache import Answer
from .online import TeacherError
from .request import build_messages, parse_answer, request_body

ENDPOINT = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "expired", "cancelled")
METADATA_KEY = "refinevla_input_sha"


class BatchLedger:
    """The batches this cache has submitted and not yet collected (a table beside the answers)."""

    def __init__(self, db):
        self.db = db
        self.db.execute("""CREATE TABLE IF NOT EXISTS batches (
            sha TEXT PRIMARY KEY, batch_id TEXT, keys TEXT NOT NULL, requests INTEGER, created REAL,
            collected INTEGER NOT NULL DEFAULT 0)""")
        self.db.commit()

    def open(self) -> list[dict]:
        """Submitted (or being submitted) and not collected, oldest first."""
        rows = self.db.execute("SELECT sha, batch_id, keys, created FROM batches WHERE collected = 0 "
                               "ORDER BY created")
        return [{"sha": sha, "batch_id": bid, "keys": json.loads(keys), "created": created}
                for sha, bid, keys, created in rows]

    def record(self, sha: str, keys: list[str]) -> None:
        """A batch about to be created (the same input sent again, after its lines failed, starts afresh)."""
        self.db.execute("INSERT OR REPLACE INTO batches (sha, batch_id, keys, requests, created, collected) "
                        "VALUES (?, NULL, ?, ?, ?, 0)", (sha, json.dumps(keys), len(keys), time.time()))
        self.db.commit()

    def set_id(self, sha: str, batch_id: str) -> None:
        self.db.execute("UPDATE batches SET batch_id = ? WHERE sha = ?", (batch_id, sha))
        self.db.commit()

    def collected(self, sha: str) -> None:
        self.db.execute("UPDATE batches SET collected = 1 WHERE sha = ?", (sha,))
        self.db.commit()


# -----------------------------------------------------------------------------
# Submitting

def batch_line(job, cfg, temperature: bool | None = None) -> bytes:
    """One JSONL line: the online request body, addressed by the job's cache key (``temperature``: as
    ``request.request_body``; False when the online preflight found the endpoint refusing it)."""
    body = request_body(cfg, build_messages(job), temperature=temperature)
    return (json.dumps({"custom_id": job.key, "method": "POST", "url": ENDPOINT, "body": body},
                       separators=(",", ":")) + "\n").encode()


def write_files(jobs, cfg, folder: Path, temperature: bool | None = None):
    """Yield (path, sha256, keys) of JSONL input files of at most batch_max_requests lines and batch_max_mb MB,
    written as the jobs stream in (only one file's worth of frames is ever held)."""
    limit = int(cfg.batch_max_mb * 1e6)
    folder.mkdir(parents=True, exist_ok=True)
    handle, path, sha, keys, size = None, None, None, [], 0

    def close():
        handle.close()
        return path, sha.hexdigest(), keys

    for job in jobs:
        line = batch_line(job, cfg, temperature)
        if handle is not None and (len(keys) >= cfg.batch_max_requests or size + len(line) > limit):
            yield close()
            handle = None
        if handle is None:
            fd, name = tempfile.mkstemp(suffix=".jsonl", dir=folder)
            handle, path, sha, keys, size = os.fdopen(fd, "wb"), Path(name), hashlib.sha256(), [], 0
        handle.write(line)
        sha.update(line)
        keys.append(job.key)
        size += len(line)
    if handle is not None:
        yield close()


def find_submitted(client, sha: str, since: float, look_at: int = 1000):
    """The batch created for input `sha` at or after `since` (unix time) but not recorded: a crash right after
    `batches.create`. The provider lists newest first; the first `look_at` are searched."""
    for i, batch in enumerate(client.batches.list(limit=100)):
        if (batch.metadata or {}).get(METADATA_KEY) == sha and batch.created_at >= int(since) - 1:
            return batch
        if i + 1 >= look_at or batch.created_at < int(since) - 1:
            return None
    return None


def client_errors() -> tuple:
    """The SDK's errors that mean "this server has no such route" (local servers without a Batch API)."""
    import openai
    return (openai.NotFoundError, openai.UnprocessableEntityError)


def refused(error: Exception) -> bool:
    """A request the provider does not support (400, 404, 405, 422, 501): e.g. Gemini refusing `metadata` or the
    batch list."""
    return getattr(error, "status_code", None) in (400, 404, 405, 422, 501)


def submit(client, ledger: BatchLedger, path: Path, sha: str, keys: list[str], cfg) -> str:
    """Upload one input file and create its batch (or adopt the one already created for it); return its id."""
    ledger.record(sha, keys)  # first: a crash from here on is recovered from the batch's metadata
    with open(path, "rb") as f:
        try:
            uploaded = client.files.create(file=(f"refinevla-{sha[:16]}.jsonl", f, "application/jsonl"),
                                           purpose="batch")
        except client_errors() as e:
            raise TeacherError(f"AnnotateConfig.batch: {client.base_url} has no Batch API (uploading the input "
                               f"file answered {e.status_code}); set batch: false to send online requests") from e
    import openai
    create = dict(input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window=cfg.batch_window)
    try:
        batch = client.batches.create(**create, metadata={METADATA_KEY: sha})
    except openai.APIStatusError as e:
        if not (refused(e) and "metadata" in str(e).lower()):
            raise
        batch = client.batches.create(**create)  # without metadata: the ledger alone records it
    ledger.set_id(sha, batch.id)
    return batch.id


# -----------------------------------------------------------------------------
# Waiting and collecting

def wait_for(client, batch_ids: list[str], cfg) -> dict:
    """Poll until every batch is terminal or batch_timeout_s passed (0 = no limit); return id -> last Batch."""
    state = {bid: client.batches.retrieve(bid) for bid in batch_ids}
    total = sum((b.request_counts.total if b.request_counts else 0) for b in state.values())
    start = time.monotonic()
    with tqdm(total=total, desc="annotate (batch)", unit="req", mininterval=0.5) as bar:
        while True:
            done = sum((b.request_counts.completed + b.request_counts.failed) if b.request_counts else 0
                       for b in state.values())
            bar.total = max(bar.total or 0, sum((b.request_counts.total if b.request_counts else 0)
                                                for b in state.values()))
            bar.update(done - bar.n)
            running = [bid for bid, b in state.items() if b.status not in TERMINAL]
            bar.set_postfix_str(", ".join(f"{b.id} {b.status}" for b in state.values())[:80])
            if not running or (cfg.batch_timeout_s and time.monotonic() - start >= cfg.batch_timeout_s):
                return state
            time.sleep(cfg.batch_poll_s)
            for bid in running:
                state[bid] = client.batches.retrieve(bid)


def read_lines(client, file_id: str | None) -> list[dict]:
    """The result lines of one output or error file; a line that is not a JSON object with a custom_id is
    skipped (its frame then counts as unanswered and is asked again next run) rather than ending the run."""
    if not file_id:
        return []
    lines = []
    for line in client.files.content(file_id).text.splitlines():
        try:
            obj = json.loads(line) if line.strip() else None
        except ValueError:
            obj = None
        if isinstance(obj, dict) and "custom_id" in obj:
            lines.append(obj)
    return lines


def answer_of(line: dict) -> Answer:
    """One output (or error) line as an Answer: the rationale, or why there is none."""
    response = line.get("response") or {}
    body = response.get("body") or {}
    status = response.get("status_code")
    usage = body.get("usage") or {}
    answer = Answer(requests=1, input_tokens=usage.get("prompt_tokens") or 0,
                    output_tokens=usage.get("completion_tokens") or 0)
    if status != 200:
        error = line.get("error") or body.get("error") or {}
        message = error.get("message", "") if isinstance(error, dict) else str(error)
        answer.error = f"batch line status {status}: {message}"[:300]
        return answer
    choices = body.get("choices") or []
    if not choices:
        answer.error = "batch line: the server returned no choices"
        return answer
    answer.rationale, answer.error = parse_answer((choices[0].get("message") or {}).get("content"),
                                                  choices[0].get("finish_reason"))
    return answer


def collect(client, batch, keys: list[str]) -> list[tuple[str, Answer]]:
    """(key, Answer) for every key of a terminal batch: answered lines, error lines, and the never-answered
    (expired, cancelled or failed batch) recorded as failed with the batch's status."""
    got = {}
    for line in read_lines(client, batch.output_file_id) + read_lines(client, batch.error_file_id):
        got[line["custom_id"]] = answer_of(line)
    if batch.status == "completed":
        reason = f"batch {batch.id} completed without a readable answer line for this frame"
    else:
        reason = f"batch {batch.id} {batch.status} before answering this frame"
        if batch.status == "failed" and batch.errors and batch.errors.data:
            reason += f": {batch.errors.data[0].message}"
    return [(key, got.get(key) or Answer(error=reason)) for key in keys]


# -----------------------------------------------------------------------------
# The whole round

def run_batches(client, cache, misses, cfg, on_answers, temperature: bool | None = None) -> dict:
    """Collect the batches an earlier run left open, submit the misses they do not cover, wait, and pass every
    collected batch's (key, Answer) list to `on_answers` (which stores them) before marking it collected.
    Returns what happened: batches submitted / collected / still running."""
    ledger = BatchLedger(cache.db)
    folder = cache.path.parent / "batches"
    for stale in folder.glob("*.jsonl"):  # input files of a killed run (rewritten below if still needed)
        stale.unlink()
    earlier = ledger.open()
    for row in earlier:
        if row["batch_id"] is None:  # recorded, then the run died before or while creating it
            row["batch_id"] = submit_recovered(client, ledger, row)
    earlier = [row for row in earlier if row["batch_id"]]
    covered = {key for row in earlier for key in row["keys"]}
    fresh = (job for job in misses if job.key not in covered)
    submitted = []
    for path, sha, keys in write_files(fresh, cfg, folder, temperature):
        try:
            submitted.append({"sha": sha, "keys": keys, "batch_id": submit(client, ledger, path, sha, keys, cfg)})
        finally:
            path.unlink(missing_ok=True)  # the provider holds it now (or it is rewritten from the cache next run)
    rows = earlier + submitted
    print(f"annotate (batch): {len(submitted)} batch(es) submitted, {len(rows) - len(submitted)} from an earlier "
          f"run; waiting (poll every {cfg.batch_poll_s:g} s)")
    state = wait_for(client, [row["batch_id"] for row in rows], cfg) if rows else {}
    still = []
    for row in rows:
        batch = state[row["batch_id"]]
        if batch.status not in TERMINAL:
            still.append(batch.id)
            continue
        on_answers(collect(client, batch, row["keys"]))
        ledger.collected(row["sha"])
    return {"batches_submitted": len(submitted), "batches_collected": len(rows) - len(still),
            "batches_running": still}


def submit_recovered(client, ledger: BatchLedger, row: dict) -> str | None:
    """A batch recorded without an id: adopt the provider's batch with its input sha, or forget the record (its
    frames are misses again and go into a new file)."""
    import openai
    try:
        batch = find_submitted(client, row["sha"], since=row["created"])
    except openai.APIStatusError as e:  # no batch list here (or it is refused): nothing to adopt
        if not refused(e):
            raise
        batch = None
    if batch is not None:
        ledger.set_id(row["sha"], batch.id)
        return batch.id
    ledger.collected(row["sha"])
    return None
