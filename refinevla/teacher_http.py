"""The HTTP teacher: an OpenAI-compatible chat endpoint writes the rationale from the frame, instruction,
state and action, at paper scale (~125k frames), where cost, rate limits and crashes matter.

- Requests go through the `openai` SDK with its own retries off (max_retries=0): retries, exponential backoff
  and `Retry-After` (429 / 5xx / timeouts) are done here, visibly, with a cap on requests per item.
- At most `concurrency` requests are in flight (a thread pool over the thread-safe sync client). A 429 with
  Retry-After pauses every worker, not only the one that was told.
- Answers are validated against `Rationale`; with `json_schema=True` the server is asked for structured
  output, otherwise (or if it still answers badly) one repair request quotes the error.
- Every answer is cached in SQLite (WAL mode, one commit per answer, written by the main thread only), keyed
  by the hash of what determines it; a SIGKILL loses at most the requests in flight. An item that fails after
  its attempts is stored as failed with the reason and asked again on the next run. The API key is read
  from the environment variable *named* by `api_key_env` and is never written anywhere.

At paper scale, `batch: true` sends the same request bodies through the provider's Batch API instead
(teacher_batch.py), into the same cache.

The cache key covers the model, temperature, max_tokens, json_schema, the prompt version, the image pixels,
the instruction, the state and the action (all of which are sent). It leaves out `base_url`: the same model
behind another address (a proxy, a mirror) reuses the cache.
"""
from __future__ import annotations

import base64
import email.utils
import io
import itertools
import os
import queue
import random
import re
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from PIL import Image
from pydantic import ValidationError
from tqdm import tqdm

from .schema import RATIONALE_PARTS
from .teacher import (AnnotateConfig, Annotation, Rationale, check_faithfulness, hash_inputs, load_objects,
                      read_rows, summarize_faithfulness)

#: Version of the prompt below; bump it whenever a word of SYSTEM_PROMPT or user_text changes.
PROMPT_VERSION = "http-v1"
#: $ per 1M tokens (input, output): list prices as published by the providers in 2025; check yours and
#: override with AnnotateConfig.prices. Local servers cost nothing.
PRICES = {"gemini-2.0-flash": (0.10, 0.40), "gemini-2.0-flash-lite": (0.075, 0.30),
          "gpt-4o-mini": (0.15, 0.60), "gpt-4o": (2.50, 10.00), "gpt-4.1-mini": (0.40, 1.60),
          "gpt-4.1-nano": (0.10, 0.40)}
IMAGE_TOKENS = 258     # tokens per small image for the estimate (Gemini's count; OpenAI's "low" detail is 85)
OUTPUT_TOKENS = 120    # a typical four-part JSON answer, for the estimate (the upper bound is max_tokens)

SYSTEM_PROMPT = (
    "You are an expert robot teacher. Given a robot camera frame, the task instruction, the robot state and "
    "the action the expert took, explain the expert's reasoning as JSON with exactly four string fields:\n"
    '"observation": the objects in the scene and the gripper;\n'
    '"situation_analysis": where the task stands (e.g. approaching, grasping, holding the object);\n'
    '"spatial_reasoning": where the target object is relative to the gripper, with approximate distances in cm;\n'
    '"task_planning": the next sub-goal.\n'
    "Directions are in the robot's world frame: 'ahead of' = away from the robot base, 'behind' = toward it, "
    "'left of' / 'right of' = the robot's left / right (the camera faces the robot, so the robot's left is on "
    "the right of the picture), 'above' / 'below' = up / down. Use plain words, at most 15 words per field, "
    "and answer with the JSON object only.")
RESPONSE_SCHEMA = {
    "type": "object",
    "properties": {p: {"type": "string"} for p in RATIONALE_PARTS},
    "required": list(RATIONALE_PARTS),
    "additionalProperties": False,
}


# -----------------------------------------------------------------------------
# The cache

class AnswerCache:
    """SQLite (WAL) store of teacher answers: key -> ok rationale with its usage, or failed with the reason."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a killed process loses no commit
        self.db.execute("""CREATE TABLE IF NOT EXISTS answers (
            key TEXT PRIMARY KEY, status TEXT NOT NULL, rationale TEXT, model TEXT, prompt_version TEXT,
            input_tokens INTEGER, output_tokens INTEGER, attempts INTEGER, error TEXT, created REAL)""")
        self.db.commit()

    def ok_keys(self) -> set[str]:
        """Every key with a successful answer (one query, instead of one per frame that is not cached)."""
        return {k for (k,) in self.db.execute("SELECT key FROM answers WHERE status = 'ok'")}

    def get(self, key: str) -> dict | None:
        """The cached successful answer, or None (missing or failed: both are asked again)."""
        row = self.db.execute("SELECT rationale, model, prompt_version, input_tokens, output_tokens FROM answers "
                              "WHERE key = ? AND status = 'ok'", (key,)).fetchone()
        if row is None:
            return None
        return dict(zip(("rationale", "model", "prompt_version", "input_tokens", "output_tokens"), row))

    def put_many(self, answers: list[tuple[str, "Answer"]], model: str) -> None:
        """Store answers that arrived together, in one commit (all or none)."""
        self.db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [(
            key, "ok" if answer.rationale else "failed",
            answer.rationale.model_dump_json() if answer.rationale else None, model, PROMPT_VERSION,
            answer.input_tokens, answer.output_tokens, answer.requests, answer.error or None, time.time())
            for key, answer in answers])
        self.db.commit()

    def close(self) -> None:
        self.db.close()


# -----------------------------------------------------------------------------
# The request

@dataclass
class Job:
    """One key frame to annotate: what is sent, and what the faithfulness check needs."""
    index: int
    key: str
    image: np.ndarray
    instruction: str
    state: list
    action: list
    objects: list


@dataclass
class Answer:
    """What happened to one job: the rationale (None if it failed) and what it took."""
    rationale: Rationale | None = None
    error: str = ""
    requests: int = 0
    retries: int = 0
    repairs: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


def user_text(instruction: str, state, action) -> str:
    """The text beside the image: instruction, state and the action the expert took (schema conventions)."""
    s, a = [float(v) for v in state], [float(v) for v in action]
    return (f"Instruction: {instruction}\n"
            f"Gripper position (m): x={s[0]:.3f} y={s[1]:.3f} z={s[2]:.3f}; roll={s[3]:.2f} pitch={s[4]:.2f} "
            f"yaw={s[5]:.2f} rad; gripper opening {s[7]:.2f} (1 = open)\n"
            f"Action taken: dx={a[0]:.3f} dy={a[1]:.3f} dz={a[2]:.3f} droll={a[3]:.3f} dpitch={a[4]:.3f} "
            f"dyaw={a[5]:.3f} gripper={a[6]:.2f} (1 = open, 0 = close)")


def png_data_url(image: np.ndarray) -> str:
    """The frame as a base64 PNG data URL (the OpenAI image_url format every compatible server reads)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)  # fast: bytes do not change image tokens
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def build_messages(job: Job) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": [
                {"type": "text", "text": user_text(job.instruction, job.state, job.action)},
                {"type": "image_url", "image_url": {"url": png_data_url(job.image)}}]}]


def request_body(cfg: AnnotateConfig, messages: list[dict]) -> dict:
    """The chat-completions request body (the same online and in a batch file)."""
    body = {"model": cfg.model, "messages": messages, "temperature": cfg.temperature, "max_tokens": cfg.max_tokens}
    if cfg.json_schema:
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "rationale", "strict": True, "schema": RESPONSE_SCHEMA}}
    return body


def parse_answer(content: str | None) -> tuple[Rationale | None, str]:
    """Validate the model's text as a Rationale (tolerating ```json fences); (None, reason) if it is not one."""
    if not content:
        return None, "empty answer"
    text = re.sub(r"^\s*```(?:json)?\s*|\s*```\s*$", "", content)
    try:
        return Rationale.model_validate_json(text), ""
    except ValidationError as e:
        errors = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'answer'}: {x['msg']}" for x in e.errors()[:4])
        return None, f"invalid rationale JSON ({errors})"


def repair_prompt(reason: str) -> str:
    return (f"Your answer was not valid: {reason}. Reply with only a JSON object with exactly the string "
            f"fields {', '.join(RATIONALE_PARTS)}, at most 15 words each.")


class EmptyChoices(Exception):
    """The server answered 200 with no choices: treated like a server error (retried)."""


def retry_after_s(error: Exception) -> float | None:
    """Seconds the server asked us to wait (Retry-After / retry-after-ms headers), if it said."""
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None) or {}
    if headers.get("retry-after-ms"):
        try:
            return float(headers["retry-after-ms"]) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        date = email.utils.parsedate_to_datetime(value)
        return max(0.0, date.timestamp() - time.time()) if date else None


class Throttle:
    """A pause shared by all workers: a 429 with Retry-After holds every request, not only the one told."""

    def __init__(self):
        self.lock, self.until = threading.Lock(), 0.0

    def pause(self, seconds: float) -> None:
        with self.lock:
            self.until = max(self.until, time.monotonic() + seconds)

    def wait(self) -> None:
        delay = self.until - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def redact(text: str, secret: str | None) -> str:
    """Never let the key reach a file, even if a server echoes it in an error."""
    return text.replace(secret, "***") if secret else text


class HttpTeacher:
    """One configured client; `answer(job)` runs one item to completion or failure and never raises."""

    def __init__(self, cfg: AnnotateConfig):
        import openai  # a dependency of this path only
        self.openai, self.cfg = openai, cfg
        self.key = os.environ.get(cfg.api_key_env)
        if not self.key:
            host = urlparse(cfg.base_url or "").hostname
            if host not in ("127.0.0.1", "localhost", "::1"):
                raise RuntimeError(f"AnnotateConfig.api_key_env: environment variable {cfg.api_key_env!r} is "
                                   "not set (it should hold the API key; the key never goes in the config)")
        self.client = openai.OpenAI(api_key=self.key or "unused-local", base_url=cfg.base_url,
                                    timeout=cfg.timeout_s, max_retries=0)
        self.throttle = Throttle()

    def complete(self, messages: list[dict], answer: Answer) -> str | None:
        """One request; adds its usage to `answer`; returns the message text.

        The body is posted through the client's own `post` (same base URL, auth, timeout and error classes as
        `chat.completions.create`): `create` first walks every message through the SDK's typed-dict
        transformer, a third of the client's CPU per request here (benchmarks/annotate_throughput.py), and
        our body is already plain JSON."""
        answer.requests += 1
        response = self.client.post("/chat/completions", body=request_body(self.cfg, messages),
                                    cast_to=self.openai.types.chat.ChatCompletion)
        if response.usage is not None:
            answer.input_tokens += response.usage.prompt_tokens or 0
            answer.output_tokens += response.usage.completion_tokens or 0
        if not response.choices:
            raise EmptyChoices("the server returned no choices")
        return response.choices[0].message.content

    def backoff_s(self, attempt: int) -> float:
        """Exponential backoff with jitter: backoff_s * 2^(attempt-1) * [0.5, 1], capped at max_wait_s."""
        return min(self.cfg.max_wait_s, self.cfg.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.0))

    def answer(self, job: Job) -> Answer:
        """Ask until a valid rationale, a non-retryable error, or max_attempts requests (repair included).
        Never raises: whatever goes wrong becomes the item's failure reason, and the run goes on."""
        answer = Answer()
        try:
            self.ask(job, answer)
        except Exception as e:  # a bug or an odd frame must not end a 125k-item run
            answer.rationale, answer.error = None, f"unexpected {describe(e)}"
        answer.error = redact(answer.error, self.key)
        return answer

    def ask(self, job: Job, answer: Answer) -> None:
        base = build_messages(job)
        messages = base
        for attempt in range(1, self.cfg.max_attempts + 1):
            self.throttle.wait()
            try:
                content = self.complete(messages, answer)
            except (self.openai.APIError, EmptyChoices) as e:
                answer.error = describe(e)
                if not retryable(e):  # 400, 401, 404...: asking again will not help
                    if getattr(e, "status_code", None) == 400 and self.cfg.json_schema:
                        answer.error += " (if the server lacks structured output, set json_schema=False)"
                    return
                if attempt < self.cfg.max_attempts:
                    answer.retries += 1
                    told = retry_after_s(e)
                    if told is not None:
                        self.throttle.pause(min(told, self.cfg.max_wait_s))
                    else:
                        time.sleep(self.backoff_s(attempt))
                continue
            rationale, reason = parse_answer(content)
            if rationale is not None:
                answer.rationale, answer.error = rationale, ""
                return
            if messages is not base:  # the one repair was already spent
                answer.error = f"{reason}, after one repair request"
                return
            answer.error, answer.repairs = reason, answer.repairs + 1
            messages = base + [{"role": "assistant", "content": content or ""},
                               {"role": "user", "content": repair_prompt(reason)}]


def retryable(error: Exception) -> bool:
    """Timeouts, lost connections, empty answers, 408, 409, 429 and 5xx are worth another try."""
    status = getattr(error, "status_code", None)
    return status is None or status in (408, 409, 429) or status >= 500


def describe(error: Exception) -> str:
    """A short reason for the failure record: the error class, HTTP status and message."""
    status = getattr(error, "status_code", None)
    return f"{type(error).__name__}{f' {status}' if status else ''}: {str(error)[:200]}"


# -----------------------------------------------------------------------------
# Running many

def bounded_map(fn, items, concurrency: int):
    """Yield lists of (item, fn(item)), in completion order, with at most `concurrency` calls in flight;
    `items` is consumed lazily, so only the frames in flight are held in memory. `fn` must not raise. Calls
    that finish together come as one list (the consumer stores them with one commit); the next calls start
    only after the consumer has taken (and stored) them, so a crash loses at most `concurrency` answers.
    Finished calls report to a queue (constant cost per call, where `wait` would re-arm every pending one)."""
    items, finished = iter(items), queue.SimpleQueue()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:

        def start(item):
            pool.submit(fn, item).add_done_callback(lambda future, item=item: finished.put((item, future)))

        running = 0
        for item in itertools.islice(items, concurrency):
            start(item)
            running += 1
        while running:
            done = [finished.get()]
            while True:  # everything else that has finished meanwhile
                try:
                    done.append(finished.get_nowait())
                except queue.Empty:
                    break
            running -= len(done)
            yield [(item, future.result()) for item, future in done]
            for item in itertools.islice(items, len(done)):
                start(item)
                running += 1


def cache_key(cfg: AnnotateConfig, image: np.ndarray, instruction: str, state, action) -> str:
    """Hash of everything that determines the answer (see the module docstring; base_url is left out)."""
    return hash_inputs("http", cfg.model, cfg.temperature, cfg.max_tokens, cfg.json_schema, PROMPT_VERSION,
                       image, instruction, np.asarray(state, np.float32), np.asarray(action, np.float32))


def jobs(demos, keys: list[int], cfg: AnnotateConfig):
    """Read each key frame once (image decoded here, in the main thread) and build its job."""
    for i, row in read_rows(demos, keys, ["image", "instruction", "state", "action", "objects"]):
        image = row["image"]
        key = cache_key(cfg, image, row["instruction"], row["state"], row["action"])
        yield Job(i, key, image, row["instruction"], list(row["state"]), list(row["action"]),
                  load_objects(row.get("objects"), f"row {i}"))


def price(cfg: AnnotateConfig) -> tuple[float, float] | None:
    """($ per 1M input, $ per 1M output) for cfg.model ("models/x" and "google/x" match "x"), or None."""
    table = {**PRICES, **{k: tuple(v) for k, v in cfg.prices.items()}}
    return table.get(cfg.model) or table.get(cfg.model.rsplit("/", 1)[-1])


def cost_usd(cfg: AnnotateConfig, input_tokens: int, output_tokens: int) -> float | None:
    """At the online list price, or its batch_discount share when the Batch API is used."""
    p = price(cfg)
    scale = cfg.batch_discount if cfg.batch else 1.0
    return None if p is None else (input_tokens * p[0] + output_tokens * p[1]) / 1e6 * scale


def estimate(demos, keys: list[int], cfg: AnnotateConfig) -> dict:
    """What a run would send (cache hits excluded), its tokens (text ~4 characters per token plus
    IMAGE_TOKENS per frame, OUTPUT_TOKENS per answer) and its cost. Sends nothing."""
    cache = AnswerCache(cfg.resolved_cache_path())
    requests, input_tokens = 0, 0
    for job in jobs(demos, keys, cfg):
        if cache.get(job.key) is None:
            requests += 1
            input_tokens += (len(SYSTEM_PROMPT) + len(user_text(job.instruction, job.state, job.action))) // 4
            input_tokens += IMAGE_TOKENS
    cache.close()
    output_tokens = requests * OUTPUT_TOKENS
    worst = cost_usd(cfg, input_tokens, requests * cfg.max_tokens)
    return {"teacher": "http", "model": cfg.model, "rows": len(demos), "key_frames": len(keys),
            "cached": len(keys) - requests, "requests": requests, "input_tokens": input_tokens,
            "output_tokens": output_tokens, "cost_usd": cost_usd(cfg, input_tokens, output_tokens),
            "cost_usd_max": worst, "price_per_1m": price(cfg), "mode": "batch" if cfg.batch else "online",
            "batch_files": -(-requests // cfg.batch_max_requests) if cfg.batch else 0}


def run(demos, keys: list[int], cfg: AnnotateConfig) -> tuple[dict[int, Annotation], dict]:
    """Annotate the key frames: cache hits first, misses through the teacher; returns the annotations and
    the run's summary (requests, retries, repairs, tokens, cost, failures, faithfulness)."""
    teacher = HttpTeacher(cfg)  # first: a missing key fails before anything is opened
    cache = AnswerCache(cfg.resolved_cache_path())
    notes, checks, failures = {}, [], []
    totals = dict.fromkeys(("requests", "retries", "repairs", "input_tokens", "output_tokens"), 0)
    cached = {"hits": 0, "input_tokens": 0, "output_tokens": 0}  # answers reused from the cache
    bar = tqdm(total=len(keys), desc=f"annotate ({cfg.model})", mininterval=0.5)

    def record(job: Job, rationale: Rationale) -> None:
        notes[job.index] = Annotation(rationale, "http", cfg.model, PROMPT_VERSION, job.key)
        if job.objects:
            checks.append(check_faithfulness(rationale, job.objects, job.state))
        bar.update()

    def misses():
        answered = cache.ok_keys()
        for job in jobs(demos, keys, cfg):
            hit = cache.get(job.key) if job.key in answered else None
            if hit is None:
                yield job
            else:
                cached["hits"] += 1
                cached["input_tokens"] += hit["input_tokens"] or 0
                cached["output_tokens"] += hit["output_tokens"] or 0
                record(job, Rationale.model_validate_json(hit["rationale"]))

    def store(pairs: list[tuple[Job, Answer]]) -> None:
        cache.put_many([(job.key, answer) for job, answer in pairs], cfg.model)  # one commit
        for job, answer in pairs:
            for k in totals:
                totals[k] += getattr(answer, k)
            if answer.rationale is not None:
                record(job, answer.rationale)
            else:
                failures.append({"row": job.index, "error": answer.error, "requests": answer.requests})
                bar.update()

    start, batches = time.perf_counter(), None
    try:
        if cfg.batch:
            batches = run_batch_mode(teacher, cache, misses(), cfg, store)
        else:
            for done in bounded_map(teacher.answer, misses(), cfg.concurrency):
                store(done)
    finally:
        seconds = time.perf_counter() - start
        bar.close()
        cache.close()
    dataset_in = totals["input_tokens"] + cached["input_tokens"]
    dataset_out = totals["output_tokens"] + cached["output_tokens"]
    summary = {"teacher": "http", "model": cfg.model, "prompt_version": PROMPT_VERSION,
               "cache_hits": cached["hits"], "requests_sent": totals["requests"], "retries": totals["retries"],
               "repairs": totals["repairs"], "input_tokens": totals["input_tokens"],
               "output_tokens": totals["output_tokens"],
               "cost_usd": cost_usd(cfg, totals["input_tokens"], totals["output_tokens"]),
               "price_per_1m": price(cfg), "request_seconds": round(seconds, 3),
               "requests_per_s": round(totals["requests"] / seconds, 2) if seconds > 0 else None,
               # the whole dataset's answers, cached ones included (what the annotations cost to make)
               "dataset_input_tokens": dataset_in, "dataset_output_tokens": dataset_out,
               "dataset_cost_usd": cost_usd(cfg, dataset_in, dataset_out),
               "failed": len(failures), "failures": failures[:50],
               "faithfulness": summarize_faithfulness(checks), "mode": "batch" if cfg.batch else "online"}
    if batches is not None:
        summary.update(batches, batch_discount=cfg.batch_discount)
    return notes, summary


def run_batch_mode(teacher: HttpTeacher, cache: AnswerCache, misses, cfg: AnnotateConfig, store) -> dict:
    """The misses through the provider's Batch API (teacher_batch); frames whose batch is still running when
    the wait ends are reported as failed "still running" and collected by the next run."""
    from .teacher_batch import run_batches

    waiting: dict[str, list[Job]] = {}  # key -> the frames that need its answer (pixels dropped once written)

    def unique_misses():
        for job in misses:
            if job.key in waiting:  # the same inputs twice: one line (a batch rejects duplicate custom_ids)
                waiting[job.key].append(job)
                continue
            waiting[job.key] = [job]
            yield job
            job.image = None  # its line is written

    def on_answers(pairs: list[tuple[str, Answer]]) -> None:
        # answers nobody here waits for (an earlier run's batch, frames since dropped or answered): kept if new
        orphans = [(key, answer) for key, answer in pairs
                   if key not in waiting and answer.rationale is not None and cache.get(key) is None]
        store([(job, answer) for key, answer in pairs for job in waiting.pop(key, [])])
        if orphans:
            cache.put_many(orphans, cfg.model)

    client = teacher.client.with_options(max_retries=cfg.max_attempts, timeout=max(cfg.timeout_s, 600.0))
    info = run_batches(client, cache, unique_misses(), cfg, on_answers)
    ids = ", ".join(info["batches_running"])
    for job in [job for jobs in waiting.values() for job in jobs]:
        store([(job, Answer(error=f"batch still running ({ids}): re-run annotate to collect it"))])
    return info
