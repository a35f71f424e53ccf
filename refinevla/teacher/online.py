"""The online HTTP teacher: one OpenAI-compatible client that runs a frame to its answer, retrying to the end.

- Requests go through the `openai` SDK with its own retries off (max_retries=0): retries, exponential backoff
  and `Retry-After` (429 / 5xx / timeouts) are done here, visibly, with a cap of `max_attempts` requests per
  frame. Whatever mix of faults a frame meets (429, 5xx, timeouts, no choices, empty, malformed or off-schema
  answers), it is asked again until a valid rationale or its last attempt; after a bad answer the next attempt
  is a repair request that quotes the error (it counts as one attempt). A repair is sent once: when it fails
  (a bad answer again, or an error) the next attempt, after a backoff, asks the original question afresh. A repair
  of a repair would be a new conversation every time, so an endpoint that fails new prompts more often (rate
  limits per prompt, a cache keyed by the conversation, a fault server that treats a repair as a new prompt) would
  never answer it: seven attempts a frame stored none of 84 frames that way; asking the same question again
  does not start over.
- Errors that asking again cannot fix (400, 401, 403, 404, 422) end the frame at once, with a `kind` the run
  uses to stop early when the first frames all fail the same way (refinevla/teacher/remote.py). A 400 asking for
  `max_completion_tokens` instead of `max_tokens` (or the reverse) switches the name once for the whole run
  (token_limit_param "auto") and resends, without spending an attempt. A 400 refusing `temperature` (OpenAI's
  reasoning models take only their default; by name they are never sent one) drops it for the whole run the same
  way; either change is said once on stdout.
- At most `concurrency` requests are in flight (`bounded_map`: a thread pool over the thread-safe sync client).
  A 429 with Retry-After pauses every worker, not only the one that was told.
- The API key is read from the environment variable *named* by `api_key_env` and never written anywhere
  (`redact` removes it from any error a server echoes).
"""
from __future__ import annotations

import email.utils
import itertools
import os
import queue
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

from .cache import Answer
from .request import (TOKEN_PARAMS, Job, build_messages, parse_answer, refuses_temperature, repair_prompt,
                      request_body, sends_temperature, token_param)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class TeacherError(RuntimeError):
    """The teacher cannot go on (no key, the endpoint refuses or is dead, frames failed, no Batch API); the message
    is one line naming the cause and the fix (the command line ends with it)."""


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


def retryable(error: Exception) -> bool:
    """Timeouts, lost connections, empty answers, 408, 409, 429 and 5xx are worth another try."""
    status = getattr(error, "status_code", None)
    return status is None or status in (408, 409, 429) or status >= 500


def describe(error: Exception) -> str:
    """A short reason for the failure record: the error class, HTTP status and message."""
    status = getattr(error, "status_code", None)
    return f"{type(error).__name__}{f' {status}' if status else ''}: {str(error)[:200]}"


def fault_kind(error: Exception) -> str:
    """What a failure says about the whole run, for errors that are the same for every frame: "" when it is
    transient or about this frame only."""
    import openai
    status = getattr(error, "status_code", None)
    if isinstance(error, openai.APIConnectionError) and not isinstance(error, openai.APITimeoutError):
        return "cannot connect (connection refused or no route to the server)"
    if status in (401, 403):
        return f"the key was refused ({status})"
    if status == 404:
        return "not found (404): unknown model or wrong base_url"
    if status in (400, 422):
        return f"a request parameter was refused ({status}: {str(error)[:160]})"
    return ""


def asks_other_token_param(error: Exception, sent: str) -> bool:
    """A 400 that refuses the token-limit name we sent, or names the other one ("Use 'max_completion_tokens'")."""
    other = TOKEN_PARAMS[1 - TOKEN_PARAMS.index(sent)]
    text = str(error).lower()
    return getattr(error, "status_code", None) == 400 and (
        other in text or (sent in text and ("support" in text or "unrecognized" in text or "extra" in text)))


class HttpTeacher:
    """One configured client; `answer(job)` runs one frame to completion or failure and never raises."""

    def __init__(self, cfg):
        import openai  # a dependency of this path only
        self.openai, self.cfg = openai, cfg
        self.key = os.environ.get(cfg.api_key_env)
        if not self.key and urlparse(cfg.base_url or "").hostname not in LOCAL_HOSTS:
            raise TeacherError(f"AnnotateConfig.api_key_env: environment variable {cfg.api_key_env!r} is "
                               "not set (it should hold the API key; the key never goes in the config)")
        self.client = openai.OpenAI(api_key=self.key or "unused-local", base_url=cfg.base_url,
                                    timeout=cfg.timeout_s, max_retries=0)
        self.throttle = Throttle()
        self.limit_param = token_param(cfg)  # switched once if the endpoint asks for the other name
        self.temperature = sends_temperature(cfg)  # dropped once if the endpoint refuses it
        self.said: set[str] = set()  # what has been said on stdout already (once per run)
        self.lock = threading.Lock()
        self.stopped = threading.Event()     # set when the run stops early: frames in flight end at their next try

    def say_once(self, key: str, text: str) -> None:
        with self.lock:
            if key in self.said:
                return
            self.said.add(key)
        print(f"annotate: {text}", flush=True)

    def drop_temperature(self, error: Exception) -> None:
        self.temperature = False  # for every worker from now on
        self.say_once("temperature", f"{self.cfg.model} refused temperature={self.cfg.temperature} "
                                     f"({str(error)[:160]}); sent without temperature from now on")

    def complete(self, messages: list[dict], answer: Answer, limit_param: str,
                 temperature: bool = True) -> tuple[str | None, str | None]:
        """One request; adds its usage to `answer`; returns the message text and the finish reason.

        The body is posted through the client's own `post` (same base URL, auth, timeout and error classes as
        `chat.completions.create`): `create` first walks every message through the SDK's typed-dict
        transformer, a third of the client's CPU per request here (benchmarks/annotate_throughput.py), and
        our body is already plain JSON."""
        answer.requests += 1
        body = request_body(self.cfg, messages, limit_param, temperature)
        response = self.client.post("/chat/completions", body=body, cast_to=self.openai.types.chat.ChatCompletion)
        if response.usage is not None:
            answer.input_tokens += response.usage.prompt_tokens or 0
            answer.output_tokens += response.usage.completion_tokens or 0
        if not response.choices:
            raise EmptyChoices("the server returned no choices")
        return response.choices[0].message.content, response.choices[0].finish_reason

    def backoff_s(self, attempt: int) -> float:
        """Exponential backoff with jitter: backoff_s * 2^(attempt-1) * [0.5, 1], capped at max_wait_s."""
        return min(self.cfg.max_wait_s, self.cfg.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.0))

    def answer(self, job: Job) -> Answer:
        """Ask until a valid rationale, a non-retryable error, or max_attempts requests (repairs included).
        Never raises: whatever goes wrong becomes the frame's failure reason, and the run goes on."""
        answer = Answer()
        try:
            self.ask(job, answer)
        except Exception as e:  # a bug or an odd frame must not end a 125k-item run
            answer.rationale, answer.error = None, f"unexpected {describe(e)}"
        answer.error = redact(answer.error, self.key)
        answer.kind = redact(answer.kind, self.key)
        return answer

    def ask(self, job: Job, answer: Answer) -> None:
        base = build_messages(job)
        messages, attempt, switched, dropped = base, 0, False, False
        while attempt < self.cfg.max_attempts:
            if self.stopped.is_set():
                answer.error = answer.error or "not asked: the run stopped early"
                return
            attempt += 1
            self.throttle.wait()
            sent, sent_temperature = self.limit_param, self.temperature
            try:
                content, finish = self.complete(messages, answer, sent, sent_temperature)
            except (self.openai.APIError, EmptyChoices) as e:
                answer.error, answer.kind = describe(e), ""
                if not switched and self.cfg.token_limit_param == "auto" and asks_other_token_param(e, sent):
                    self.limit_param = TOKEN_PARAMS[1 - TOKEN_PARAMS.index(sent)]  # for every worker from now on
                    self.say_once("token", f"{self.cfg.model} asked for {self.limit_param} instead of {sent}: "
                                           f"sent as {self.limit_param} from now on")
                    switched, attempt = True, attempt - 1  # resent at once, not an attempt
                    continue
                if not dropped and sent_temperature and (refuses_temperature(e) or (
                        getattr(e, "status_code", None) == 400 and not self.temperature)):
                    if self.temperature:
                        self.drop_temperature(e)
                    dropped, attempt = True, attempt - 1  # resent at once without it, not an attempt
                    continue
                if getattr(e, "status_code", None) == 400 and sent != self.limit_param and not switched:
                    # another worker switched the name while this request was in flight
                    switched, attempt = True, attempt - 1
                    continue
                if not retryable(e):  # 400, 401, 404...: asking again will not help
                    answer.kind = fault_kind(e)
                    if getattr(e, "status_code", None) == 400 and self.cfg.json_schema and \
                            re.search(r"response_format|json_schema|schema", str(e), flags=re.I):
                        answer.error += " (if the server lacks structured output, set json_schema=False)"
                    return
                answer.kind = fault_kind(e)  # a refused connection is retried, but the run watches it
                messages = base  # a repair that failed is not sent again: the question is asked afresh
                if attempt < self.cfg.max_attempts:
                    answer.retries += 1
                    told = retry_after_s(e)
                    if told is not None:
                        self.throttle.pause(min(told, self.cfg.max_wait_s))
                    else:
                        time.sleep(self.backoff_s(attempt))
                continue
            rationale, reason = parse_answer(content, finish)
            if rationale is not None:
                answer.rationale, answer.error, answer.kind = rationale, "", ""
                return
            answer.error, answer.kind = reason, ""
            if attempt >= self.cfg.max_attempts:
                break
            if messages is base:  # the next attempt (one of the frame's attempts) asks to repair this answer
                answer.repairs += 1
                messages = base + [{"role": "assistant", "content": content or ""},
                                   {"role": "user", "content": repair_prompt(reason)}]
            else:  # a bad repair is not repaired in turn: after a pause the question is asked afresh
                messages = base
                answer.retries += 1
                time.sleep(self.backoff_s(attempt))
        answer.error = f"{answer.error} (after {attempt} attempts)"


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
