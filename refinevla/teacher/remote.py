"""One run of the HTTP teacher over the key frames: cache hits first, then the misses (a preflight, then online
requests or the provider's Batch API), every answer stored as it arrives; the run's summary.

Stopping early: when the first frames (`fail_fast_frames`, before any success) all fail for the same reason that
no retry fixes (the connection is refused, the key is refused, the model is unknown, a parameter is refused),
the run stops with one message instead of spending every frame's attempts. The preflight sends the first
`preflight` frames one by one before the rest (their answers are kept) and stops at the first such failure.
"""
from __future__ import annotations

import dataclasses
import itertools
import time

from tqdm import tqdm

from .batch import run_batches
from .cache import Answer, AnswerCache
from .cost import cost_usd, price
from .faithfulness import check_faithfulness, summarise_faithfulness
from .online import HttpTeacher, TeacherError, bounded_map
from .rationale import Annotation, Rationale
from .request import PROMPT_VERSION, Job, jobs

HINTS = {"cannot connect": "check base_url and that the server is up",
         "the key was refused": "check the key held by the environment variable named by api_key_env",
         "not found": "check the model name and base_url",
         "a request parameter was refused": "check token_limit_param, reasoning_effort, extra_body and json_schema "
                                            "(json_schema: false for servers without structured output)"}


def stop_message(cfg, kind: str, error: str, where: str) -> str:
    """The one message of a run that stops early."""
    hint = next((h for k, h in HINTS.items() if kind.startswith(k)), "")
    endpoint = cfg.base_url or "https://api.openai.com/v1"
    return f"annotate: stopped: {where}: {kind}, at {endpoint} with model {cfg.model!r}: {hint} (e.g. {error})"


class HttpRun:
    """Annotate `keys` of `demos` with the HTTP teacher: `run()` returns the annotations and the summary."""

    def __init__(self, demos, keys: list[int], cfg):
        self.teacher = HttpTeacher(cfg)  # first: a missing key fails before anything is opened
        self.demos, self.keys, self.cfg = demos, keys, cfg
        self.notes: dict[int, Annotation] = {}
        self.checks, self.failures, self.early_kinds = [], [], []
        self.answered = False  # a frame has succeeded: no early stop from here on
        self.totals = dict.fromkeys(("requests", "retries", "repairs", "input_tokens", "output_tokens"), 0)
        self.cached = {"hits": 0, "input_tokens": 0, "output_tokens": 0}  # answers reused from the cache
        self.cache = self.bar = None
        self.stored = 0  # frames whose answer this run asked for and stored

    def run(self) -> tuple[dict[int, Annotation], dict]:
        self.cache = AnswerCache(self.cfg.resolved_cache_path())
        self.bar = tqdm(total=len(self.keys), desc=f"annotate ({self.cfg.model})", mininterval=0.5)
        start, batches = time.perf_counter(), None
        try:
            misses = self.preflight(self.misses())
            if self.cfg.batch:
                batches = self.run_batches(misses)
            else:
                for done in bounded_map(self.teacher.answer, misses, self.cfg.concurrency):
                    self.store(done)
        finally:
            self.seconds = time.perf_counter() - start
            self.teacher.stopped.set()
            self.bar.close()
            self.cache.close()
        summary = self.summary(batches)
        if summary["requests_sent"]:
            per = summary["requests_per_stored_frame"]
            print(f"annotate: {self.stored} frames stored with {summary['requests_sent']} requests "
                  f"({per if per is not None else 'none stored'} per stored frame; {summary['repairs']} repairs, "
                  f"{summary['retries']} retries) in {self.seconds:.1f} s", flush=True)
        return self.notes, summary

    def record(self, job: Job, rationale: Rationale) -> None:
        self.notes[job.index] = Annotation(rationale, "http", self.cfg.model, PROMPT_VERSION, job.key)
        if job.objects:
            self.checks.append(check_faithfulness(rationale, job.objects, job.state))
        self.bar.update()

    def misses(self):
        """Record the cache hits; yield the frames still to ask."""
        answered = self.cache.ok_keys()
        for job in jobs(self.demos, self.keys, self.cfg):
            hit = self.cache.get(job.key) if job.key in answered else None
            if hit is None:
                yield job
                continue
            self.cached["hits"] += 1
            self.cached["input_tokens"] += hit["input_tokens"] or 0
            self.cached["output_tokens"] += hit["output_tokens"] or 0
            self.record(job, Rationale.model_validate_json(hit["rationale"]))

    def preflight(self, misses):
        """Ask the first `preflight` misses one by one; stop the run at the first that fails for a reason no
        retry fixes. Returns the misses left."""
        for job in itertools.islice(misses, self.cfg.preflight):
            answer = self.teacher.answer(job)
            self.store([(job, answer)])
            if answer.rationale is None and answer.kind:
                raise TeacherError(stop_message(self.cfg, answer.kind, answer.error, "the preflight request failed"))
        return misses

    def store(self, pairs: list[tuple[Job, Answer]]) -> None:
        """Cache answers that arrived together (one commit), record them, and stop the run when the first frames
        all failed the same way."""
        self.cache.put_many([(job.key, answer) for job, answer in pairs], self.cfg.model, PROMPT_VERSION)
        for job, answer in pairs:
            for k in self.totals:
                self.totals[k] += getattr(answer, k)
            if answer.rationale is not None:
                self.answered = True
                self.stored += 1
                self.record(job, answer.rationale)
                continue
            self.failures.append({"row": job.index, "error": answer.error, "requests": answer.requests})
            self.bar.update()
            if not self.answered and self.cfg.fail_fast_frames:
                self.early_kinds.append(answer.kind)
                kinds = set(self.early_kinds)
                if len(self.early_kinds) >= self.cfg.fail_fast_frames and len(kinds) == 1 and answer.kind:
                    self.teacher.stopped.set()
                    where = f"the first {len(self.early_kinds)} frames all failed the same way"
                    raise TeacherError(stop_message(self.cfg, answer.kind, answer.error, where))

    def run_batches(self, misses) -> dict:
        """The misses through the provider's Batch API; frames whose batch is still running when the wait ends
        are reported as failed "still running" and collected by the next run."""
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
                       if key not in waiting and answer.rationale is not None and self.cache.get(key) is None]
            self.answered = True  # batches are not stopped early: their frames are already paid for
            self.store([(job, answer) for key, answer in pairs for job in waiting.pop(key, [])])
            if orphans:
                self.cache.put_many(orphans, self.cfg.model, PROMPT_VERSION)

        client = self.teacher.client.with_options(max_retries=self.cfg.max_attempts,
                                                  timeout=max(self.cfg.timeout_s, 600.0))
        # the batch lines carry the token-limit name the preflight found the endpoint to take
        cfg = dataclasses.replace(self.cfg, token_limit_param=self.teacher.limit_param)
        info = run_batches(client, self.cache, unique_misses(), cfg, on_answers, self.teacher.temperature)
        ids = ", ".join(info["batches_running"])
        for job in [job for jobs_ in waiting.values() for job in jobs_]:
            self.store([(job, Answer(error=f"batch still running ({ids}): re-run annotate to collect it"))])
        return info

    def summary(self, batches: dict | None) -> dict:
        cfg, totals, cached, seconds = self.cfg, self.totals, self.cached, self.seconds
        dataset_in = totals["input_tokens"] + cached["input_tokens"]
        dataset_out = totals["output_tokens"] + cached["output_tokens"]
        summary = {"teacher": "http", "model": cfg.model, "prompt_version": PROMPT_VERSION,
                   "token_limit_param": self.teacher.limit_param, "temperature_sent": self.teacher.temperature,
                   "cache_hits": cached["hits"],
                   "requests_sent": totals["requests"], "retries": totals["retries"], "repairs": totals["repairs"],
                   "input_tokens": totals["input_tokens"], "output_tokens": totals["output_tokens"],
                   "cost_usd": cost_usd(cfg, totals["input_tokens"], totals["output_tokens"]),
                   "price_per_1m": price(cfg), "request_seconds": round(seconds, 3),
                   "requests_per_s": round(totals["requests"] / seconds, 2) if seconds > 0 else None,
                   "stored": self.stored,
                   "requests_per_stored_frame": round(totals["requests"] / self.stored, 3) if self.stored else None,
                   # the whole dataset's answers, cached ones included (what the annotations cost to make)
                   "dataset_input_tokens": dataset_in, "dataset_output_tokens": dataset_out,
                   "dataset_cost_usd": cost_usd(cfg, dataset_in, dataset_out),
                   "failed": len(self.failures), "failures": self.failures[:50],
                   "faithfulness": summarise_faithfulness(self.checks), "mode": "batch" if cfg.batch else "online"}
        if batches is not None:
            summary.update(batches, batch_discount=cfg.batch_discount)
        return summary
