"""The online HTTP teacher against a fake chat-completions server on 127.0.0.1: the real `openai` client, real HTTP.
Retries to the end of the attempts under a mix of faults, the repair requests, the early stop when the first
frames all fail the same way, the cache across runs and a SIGKILL.

    .venv/bin/pytest tests/test_teacher_http.py -q
"""
import base64
import dataclasses
import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers beside this file, in any import mode
from chat_server import ChatServer, default_answer, instruction_of  # noqa: E402
from refinevla.teacher import AnnotateConfig, annotate, online  # noqa: E402
from refinevla.teacher.online import Throttle, retry_after_s, retryable  # noqa: E402
from refinevla.teacher.request import PROMPT_VERSION, parse_answer  # noqa: E402
from test_teacher import make_demos  # noqa: E402

SECRET = "sk-test-SECRET-123"
KEY_ENV = "REFINEVLA_TEST_TEACHER_KEY"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def server():
    with ChatServer() as s:
        yield s


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def http_cfg(server, tmp_path, **overrides) -> AnnotateConfig:
    """A fast config: tiny backoff, short timeout, the key read from KEY_ENV."""
    base = dict(teacher="http", base_url=server.url, model="gpt-4o-mini", api_key_env=KEY_ENV,
                data_root=str(tmp_path / "data"), concurrency=4, max_attempts=4, backoff_s=0.01, timeout_s=5.0)
    return AnnotateConfig(**{**base, **overrides})


def cost(out_dir) -> dict:
    return json.loads((Path(out_dir) / "cost.json").read_text())


def assert_each_row_has_its_own_answer(ds):
    """The fake server echoes the instruction: no answer lost, duplicated or given to another row."""
    for instruction, rationale in zip(ds["instruction"], ds["rationale"]):
        assert json.loads(rationale)["observation"].endswith(f"for {instruction}")


def assert_secret_nowhere(folder):
    for path in Path(folder).rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"the API key leaked into {path}"


def cache_rows(tmp_path, where="1", root="data"):
    with sqlite3.connect(tmp_path / root / "cache" / "teacher.sqlite") as db:
        return db.execute(f"SELECT status, error FROM answers WHERE {where}").fetchall()


# -- the happy path, the wire format and the cache


def test_sends_image_state_action_and_caches(server, tmp_path):
    demos = make_demos(image="pil")
    out = annotate(demos, http_cfg(server, tmp_path), tmp_path / "out")
    nested = make_demos(image="array")  # the same pixels stored as arrays: same cache keys, no new request
    assert annotate(nested, http_cfg(server, tmp_path), tmp_path / "out3")["input_hash"] == out["input_hash"]
    assert server.count == len(demos) == len(out)
    assert_each_row_has_its_own_answer(out)
    assert set(out["teacher"]) == {"http"} and set(out["teacher_model"]) == {"gpt-4o-mini"}
    assert set(out["prompt_version"]) == {PROMPT_VERSION} and len(set(out["input_hash"])) == len(demos)

    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["headers"]["authorization"] == f"Bearer {SECRET}"
    pixels = {row["instruction"]: np.asarray(row["image"]) for row in demos}
    for request in server.requests:
        body = request["body"]
        assert body["model"] == "gpt-4o-mini" and body["temperature"] == 0.0 and body["max_tokens"] == 300
        assert body["response_format"]["type"] == "json_schema"
        assert body["response_format"]["json_schema"]["schema"]["required"] == [
            "observation", "situation_analysis", "spatial_reasoning", "task_planning"]
        text, image = body["messages"][1]["content"]
        assert "Gripper position" in text["text"] and "Action taken: dx=0.100 dy=-0.200" in text["text"]
        url = image["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        sent = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
        assert np.array_equal(sent, pixels[instruction_of(body)])

    summary = cost(tmp_path / "out")
    assert summary["requests_sent"] == 10 and summary["retries"] == 0 and summary["failed"] == 0
    assert summary["input_tokens"] == 1000 and summary["output_tokens"] == 200  # the fake server's usage
    assert summary["cost_usd"] == pytest.approx((1000 * 0.15 + 200 * 0.60) / 1e6)
    assert summary["faithfulness"] == {"checked": 10, "agreement_rate": 1.0, "target_named_rate": 1.0,
                                       "direction_rate": 1.0}

    again = annotate(demos, http_cfg(server, tmp_path), tmp_path / "out2")
    assert server.count == 10, "a re-run must send zero requests"
    assert again["rationale"] == out["rationale"] and cost(tmp_path / "out2")["cache_hits"] == 10
    assert cost(tmp_path / "out2")["dataset_cost_usd"] == pytest.approx(summary["cost_usd"])
    assert_secret_nowhere(tmp_path)


def test_stride_sends_key_frames_only(server, tmp_path):
    out = annotate(make_demos(), http_cfg(server, tmp_path, stride=2), tmp_path / "out")
    assert server.count == 6  # steps 0, 2, 4 of two episodes
    assert out["rationale_source_step"][:5] == [0, 0, 2, 2, 4]
    assert out["rationale"][1] == out["rationale"][0]


def test_dry_run_sends_nothing(server, tmp_path, capsys):
    cfg = http_cfg(server, tmp_path, dry_run=True)
    assert annotate(make_demos(), cfg, tmp_path / "out") is None
    assert server.count == 0 and not (tmp_path / "out" / "dataset").exists()
    estimate = json.loads((tmp_path / "out" / "cost_estimate.json").read_text())
    assert estimate["requests"] == 10 and estimate["input_tokens"] > 10 * 258 and estimate["cost_usd"] > 0
    assert "10 requests" in capsys.readouterr().out
    annotate(make_demos(), dataclasses.replace(cfg, dry_run=False), tmp_path / "out")
    annotate(make_demos(), cfg, tmp_path / "out")
    assert server.count == 10 and "0 requests" in capsys.readouterr().out  # all cached now


# -- faults: retries, Retry-After, repair, failures


def test_retries_recover_from_500_timeout_and_empty_choices(server, tmp_path):
    faults = [{"status": 500}, {"delay": 1.5}, {"empty_choices": True}, {"status": 503}]
    server.script.extend(faults)  # with one worker, all four hit item 0: its fifth attempt succeeds
    cfg = http_cfg(server, tmp_path, concurrency=1, timeout_s=0.4, max_attempts=5)
    out = annotate(make_demos(), cfg, tmp_path / "out")
    assert_each_row_has_its_own_answer(out)
    summary = cost(tmp_path / "out")
    assert summary["retries"] == 4 and summary["requests_sent"] == server.count == 14 and summary["failed"] == 0
    # the same faults with a cap of 4 attempts: item 0 fails after exactly 4 requests, the others succeed
    server.reset()
    server.script.extend(faults)
    with pytest.raises(RuntimeError, match="1 of 3 key frames failed after up to 4 attempts"):
        annotate(make_demos(episodes=1, steps=3, seed=1), dataclasses.replace(cfg, max_attempts=4),
                 tmp_path / "o2")
    assert server.count == 6 and cost(tmp_path / "o2")["failures"][0]["requests"] == 4


def test_retry_after_is_honoured_and_pauses_every_worker(server, tmp_path):
    # request 0 is refused at once; the others are in flight when it is, and answer 0.2 s later
    server.rule = lambda n, body: {"status": 429, "retry_after": 1} if n == 0 else {"delay": 0.2}
    cfg = http_cfg(server, tmp_path, concurrency=3, preflight=0)
    out = annotate(make_demos(episodes=1, steps=6), cfg, tmp_path / "out")
    assert_each_row_has_its_own_answer(out)
    times = [r["time"] for r in server.requests]
    assert len(times) == 7 and cost(tmp_path / "out")["retries"] == 1
    later = [t - times[0] for t in times[3:]]  # every request sent after the 429 waited for Retry-After
    assert min(later) >= 0.9, later
    assert max(later) < 2.5, "the wait should be Retry-After, not much more"


def test_retry_after_header_forms():
    class E:
        def __init__(self, headers):
            self.response = type("R", (), {"headers": headers})()
    assert retry_after_s(E({"retry-after": "2"})) == 2.0
    assert retry_after_s(E({"retry-after-ms": "250"})) == 0.25
    assert 50 < retry_after_s(E({"retry-after": time.strftime("%a, %d %b %Y %H:%M:%S GMT",
                                                                time.gmtime(time.time() + 60))})) <= 61
    assert retry_after_s(E({})) is None and retry_after_s(ValueError()) is None
    throttle = Throttle()
    throttle.pause(0.2)
    start = time.monotonic()
    throttle.wait()
    assert time.monotonic() - start >= 0.15


def test_repair_request_fixes_bad_json(server, tmp_path):
    bad = "Sure! Here is the rationale: {observation: cube"
    server.script.extend([{"content": bad}])
    out = annotate(make_demos(episodes=1, steps=3), http_cfg(server, tmp_path, json_schema=False, concurrency=1),
                   tmp_path / "out")
    assert_each_row_has_its_own_answer(out)
    assert server.count == 4 and cost(tmp_path / "out")["repairs"] == 1
    repair = server.requests[1]["body"]
    assert "response_format" not in repair
    assert repair["messages"][-2] == {"role": "assistant", "content": bad}
    asked = repair["messages"][-1]["content"]
    assert "not valid" in asked and "invalid rationale JSON" in asked
    assert instruction_of(repair) == instruction_of(server.requests[0]["body"])  # same frame, same question


def test_off_schema_answers_are_repaired_until_the_attempts_run_out(server, tmp_path):
    fenced = "```json\n" + default_answer({"messages": [{"role": "user", "content": "Instruction: x"}]}) + "\n```"
    assert parse_answer(fenced)[0] is not None  # fences are tolerated
    violations = [{"content": json.dumps({"observation": "only one part"})},
                  {"content": json.dumps({"observation": "x", "situation_analysis": "y", "spatial_reasoning": "z",
                                          "task_planning": "w", "extra": "not allowed"})}]
    server.script.extend(violations)  # item 0: a bad answer, a bad repair, then the question again: answered
    out = annotate(make_demos(episodes=1, steps=3), http_cfg(server, tmp_path, concurrency=1), tmp_path / "out")
    assert_each_row_has_its_own_answer(out)
    assert server.count == 5 and cost(tmp_path / "out")["repairs"] == 1
    repair, again = server.requests[1]["body"]["messages"], server.requests[2]["body"]["messages"]
    assert len(repair) == 4 and "only one part" in repair[-2]["content"]  # the repair quotes the bad answer
    assert again == server.requests[0]["body"]["messages"]  # a bad repair is not repaired: the question again

    server.reset()  # the same with 2 attempts: the frame fails, and only it is asked again by the next run
    server.script.extend(violations)
    cfg = http_cfg(server, tmp_path, concurrency=1, max_attempts=2, data_root=str(tmp_path / "d2"))
    with pytest.raises(RuntimeError, match="1 of 3 key frames failed.*re-run to retry only the failed"):
        annotate(make_demos(episodes=1, steps=3), cfg, tmp_path / "o2")
    assert server.count == 4 and not (tmp_path / "o2" / "dataset").exists()
    failure = cost(tmp_path / "o2")["failures"][0]
    assert "(after 2 attempts)" in failure["error"] and failure["requests"] == 2
    assert cache_rows(tmp_path, "status = 'failed'", root="d2")[0][1].startswith("invalid rationale JSON")
    out = annotate(make_demos(episodes=1, steps=3), cfg, tmp_path / "o2")
    assert server.count == 5 and len(out) == 3
    assert_each_row_has_its_own_answer(out)
    assert cache_rows(tmp_path, "status = 'failed'", root="d2") == []


FAULTS = [{"status": 429, "retry_after": 0}, {"status": 500}, {"delay": 1.6}, {"content": "Sure! {observation: cube"},
          {"content": json.dumps({"observation": "only one part"})}, {"content": ""}, {"empty_choices": True},
          {"status": 503}]


def test_a_mix_of_faults_never_ends_a_frame_before_its_last_attempt(server, tmp_path):
    """Frame i meets i % 9 faults in a row (429, 500, a timeout, malformed JSON, off-schema, empty, no choices,
    503, in turns), then an answer: with 9 attempts every frame ends annotated, with exactly one request per
    fault plus one."""
    demos = make_demos(episodes=3, steps=12)
    order = {f"lift the red cube ep{ep} st{st}": ep * 12 + st for ep in range(3) for st in range(12)}
    seen, lock = {}, threading.Lock()

    def rule(n, body):
        frame = order[instruction_of(body)]
        with lock:
            k = seen[frame] = seen.get(frame, -1) + 1
        return FAULTS[(frame + k) % len(FAULTS)] if k < frame % 9 else None

    server.rule = rule
    cfg = http_cfg(server, tmp_path, concurrency=6, max_attempts=9, timeout_s=1.0, json_schema=False)
    out = annotate(demos, cfg, tmp_path / "out")
    assert_each_row_has_its_own_answer(out)
    summary = cost(tmp_path / "out")
    assert summary["failed"] == 0 and server.count == sum(i % 9 + 1 for i in range(36)) == summary["requests_sent"]
    assert summary["repairs"] > 0 and summary["retries"] > 0


def prompt_of(body: dict) -> str:
    """The conversation a request carries, images left out: a repair (the question, the bad answer, the repair
    prompt) is another conversation than the question alone."""
    texts = []
    for message in body.get("messages", []):
        content = message.get("content")
        parts = [content] if isinstance(content, str) else [c.get("text", "") for c in content or []]
        texts.append(f"{message.get('role')}: " + " ".join(p or "" for p in parts))
    return "\n".join(texts)


def test_every_frame_is_stored_in_one_run_when_repairs_meet_faults_too(server, tmp_path, capsys):
    """A fault server that treats a repair as a new prompt: each conversation meets the frame's i % 9 faults
    (429, 500, a timeout, malformed JSON, off-schema, empty, no choices, 503, in turns) before an answer, a repair
    starting over. A repair of a repair is a new conversation each time and never got through (seven attempts a
    frame stored none of 84); asking the question again after a failed repair reaches its answer. At the default
    max_attempts every one of the 84 frames is stored in one run; requests per stored frame are reported."""
    demos = make_demos(episodes=7, steps=12)
    order = {f"lift the red cube ep{ep} st{st}": ep * 12 + st for ep in range(7) for st in range(12)}
    seen, lock = {}, threading.Lock()

    def rule(n, body):
        frame, prompt = order[instruction_of(body)], prompt_of(body)
        with lock:
            k = seen[prompt] = seen.get(prompt, -1) + 1
        return FAULTS[(frame + k) % len(FAULTS)] if k < frame % 9 else None

    server.rule = rule
    default_attempts = AnnotateConfig().max_attempts
    cfg = http_cfg(server, tmp_path, concurrency=8, max_attempts=default_attempts, timeout_s=1.0, json_schema=False)
    start = time.monotonic()
    out = annotate(demos, cfg, tmp_path / "out")
    wall = time.monotonic() - start
    assert len(out) == 84
    assert_each_row_has_its_own_answer(out)
    summary = cost(tmp_path / "out")
    assert summary["failed"] == 0 and summary["stored"] == 84 and summary["repairs"] > 0
    assert summary["requests_sent"] == server.count
    assert summary["requests_per_stored_frame"] == round(server.count / 84, 3)
    assert all(len(body["messages"]) <= 4 for body in server.bodies())  # no repair of a repair
    printed = capsys.readouterr().out
    assert f"84 frames stored with {server.count} requests ({summary['requests_per_stored_frame']} per stored frame" \
        in printed
    print(f"\nfault mix with mangled repairs: {server.count} requests for 84 frames "
          f"({summary['requests_per_stored_frame']} per stored frame), {wall:.1f} s", file=sys.stderr)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"  # nothing listens there: every connection is refused


@pytest.mark.parametrize("preflight", [2, 0])
def test_a_refused_connection_stops_the_run_after_a_few_frames(tmp_path, capsys, preflight):
    cfg = AnnotateConfig(teacher="http", base_url=closed_port_url(), api_key_env=KEY_ENV, max_attempts=3,
                         backoff_s=0.01, concurrency=4, preflight=preflight, fail_fast_frames=4,
                         data_root=str(tmp_path / "data"))
    start = time.monotonic()
    with pytest.raises(RuntimeError) as stopped:
        annotate(make_demos(episodes=6, steps=10), cfg, tmp_path / "out")
    message = str(stopped.value)
    assert message.count("\n") == 0 and "cannot connect" in message and "check base_url" in message
    assert ("the preflight request" if preflight else "the first 4 frames all") in message
    with sqlite3.connect(tmp_path / "data" / "cache" / "teacher.sqlite") as db:
        attempts = [n for (n,) in db.execute("SELECT attempts FROM answers")]  # requests per frame asked
    frames, requests = len(attempts), sum(attempts)
    assert frames == 1 if preflight else 4 <= frames <= 4 + cfg.concurrency  # of 60
    assert requests <= frames * cfg.max_attempts and time.monotonic() - start < 20
    assert not (tmp_path / "out" / "dataset").exists()


def test_a_refused_key_stops_the_run_with_one_message(server, tmp_path):
    server.api_key = "sk-the-right-one"
    cfg = http_cfg(server, tmp_path, preflight=0, fail_fast_frames=3, concurrency=2)
    with pytest.raises(RuntimeError, match=r"the first 3 frames all failed the same way: the key was refused "
                                           r"\(401\).*api_key_env"):
        annotate(make_demos(episodes=6, steps=10), cfg, tmp_path / "out")
    assert 3 <= server.count <= 3 + 2  # one request per frame (a 401 is not retried), not 60
    assert_secret_nowhere(tmp_path)


def test_a_failure_after_a_success_does_not_stop_the_run(server, tmp_path):
    server.rule = lambda n, body: {"status": 404} if n > 0 else None  # the first frame succeeds, then 404s
    with pytest.raises(RuntimeError, match="9 of 10 key frames failed"):
        annotate(make_demos(), http_cfg(server, tmp_path, preflight=1, fail_fast_frames=2, concurrency=1),
                 tmp_path / "out")
    assert server.count == 10  # every frame was asked (once: a 404 is not retried)


def test_persistent_failures_are_recorded_and_the_run_survives(server, tmp_path):
    server.rule = lambda n, body: {"status": 500} if "ep1" in instruction_of(body) else None
    cfg = http_cfg(server, tmp_path, max_attempts=2)
    with pytest.raises(RuntimeError, match="5 of 10 key frames failed after up to 2 attempts"):
        annotate(make_demos(), cfg, tmp_path / "out")
    assert server.count == 5 + 5 * 2  # episode 0 once each, episode 1 twice each (the cap)
    failed = cache_rows(tmp_path, "status = 'failed'")
    assert len(failed) == 5 and all("InternalServerError 500" in error for _, error in failed)
    server.rule = None
    before = server.count
    out = annotate(make_demos(), cfg, tmp_path / "out")
    assert server.count - before == 5
    assert all("ep1" in instruction_of(r["body"]) for r in server.requests[before:])
    assert_each_row_has_its_own_answer(out)


def test_non_retryable_error_fails_fast_and_the_key_is_never_written(server, tmp_path):
    server.script.extend([{"status": 400, "message": f"response_format json_schema is not supported (key {SECRET})"}])
    with pytest.raises(RuntimeError, match="1 of 3 key frames failed"):
        annotate(make_demos(episodes=1, steps=3), http_cfg(server, tmp_path, concurrency=1, preflight=0),
                 tmp_path / "out")
    assert server.count == 3  # the 400 was not retried
    error = cost(tmp_path / "out")["failures"][0]["error"]
    assert "BadRequestError 400" in error and "json_schema=False" in error and "***" in error
    assert (tmp_path / "out" / "config.yaml").read_text().count(KEY_ENV) == 1
    assert_secret_nowhere(tmp_path)


def test_which_errors_are_retried(server, tmp_path):
    status = lambda code: type("E", (Exception,), {"status_code": code})()
    assert all(retryable(status(c)) for c in (408, 409, 429, 500, 502, 503)) and retryable(TimeoutError())
    assert not any(retryable(status(c)) for c in (400, 401, 403, 404, 422))
    server.script.extend([{"status": 408}, {"status": 409}])
    annotate(make_demos(episodes=1, steps=2), http_cfg(server, tmp_path, concurrency=1), tmp_path / "out")
    assert server.count == 4 and cost(tmp_path / "out")["retries"] == 2


def test_an_unexpected_error_fails_one_item_not_the_run(server, tmp_path, monkeypatch):
    build = online.build_messages
    def flaky(job):
        if job.instruction.endswith("st1"):
            raise OSError("cannot encode this frame")
        return build(job)
    monkeypatch.setattr(online, "build_messages", flaky)
    with pytest.raises(RuntimeError, match="1 of 3 key frames failed"):
        annotate(make_demos(episodes=1, steps=3), http_cfg(server, tmp_path), tmp_path / "out")
    assert server.count == 2
    assert cost(tmp_path / "out")["failures"][0]["error"] == "unexpected OSError: cannot encode this frame"


def test_missing_key_variable_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    cfg = AnnotateConfig(teacher="http", base_url="https://api.example.invalid/v1", api_key_env=KEY_ENV,
                         data_root=str(tmp_path / "data"))
    with pytest.raises(RuntimeError, match=f"'{KEY_ENV}' is not set"):
        annotate(make_demos(), cfg, tmp_path / "out")


def test_faithfulness_of_http_rationales_is_reported(server, tmp_path):
    wrong = json.dumps({"observation": "the red cube", "situation_analysis": "s", "task_planning": "p",
                        "spatial_reasoning": "the red cube is right of and above the gripper"})
    server.answer = lambda body: wrong if "ep1" in instruction_of(body) else default_answer(body)
    annotate(make_demos(), http_cfg(server, tmp_path), tmp_path / "out")
    f = cost(tmp_path / "out")["faithfulness"]
    assert f["checked"] == 10 and f["agreement_rate"] == 0.5 and f["target_named_rate"] == 1.0


# -- a crash


CHILD = """
import json, sys
import datasets
from refinevla.teacher import AnnotateConfig, annotate
annotate(datasets.load_from_disk(sys.argv[1]), AnnotateConfig(**json.loads(sys.argv[2])), sys.argv[3])
"""


def test_sigkill_mid_run_keeps_the_cache_and_the_rerun_asks_only_the_rest(server, tmp_path):
    server.latency_s = 0.1
    demos = make_demos(episodes=6, steps=10)
    demos.save_to_disk(str(tmp_path / "demos"))
    cfg = http_cfg(server, tmp_path)
    db_path = tmp_path / "data" / "cache" / "teacher.sqlite"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "demos"),
                              json.dumps(dataclasses.asdict(cfg)), str(tmp_path / "killed")],
                             cwd=ROOT, env={**os.environ}, stdout=subprocess.DEVNULL,
                             stderr=open(tmp_path / "child.log", "w"))
    deadline, n_ok = time.time() + 40, 0
    while n_ok < 10:
        assert child.poll() is None and time.time() < deadline, \
            "the child ended before it could be killed: " + (tmp_path / "child.log").read_text()[-2000:]
        time.sleep(0.02)
        if db_path.exists():
            try:
                with sqlite3.connect(db_path) as db:
                    n_ok = db.execute("SELECT COUNT(*) FROM answers WHERE status = 'ok'").fetchone()[0]
            except sqlite3.OperationalError:  # the table is not created yet
                pass
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        n_ok = db.execute("SELECT COUNT(*) FROM answers WHERE status = 'ok'").fetchone()[0]
    asked = len({instruction_of(body) for body in server.bodies()})  # items (a retry under load asks twice)
    assert 10 <= n_ok < 60 and asked - n_ok <= cfg.concurrency  # lost: at most the items in flight
    assert not (tmp_path / "killed" / "dataset").exists()
    before = server.count
    out = annotate(demos, cfg, tmp_path / "out")
    assert len({instruction_of(b) for b in server.bodies()[before:]}) == 60 - n_ok  # only the rest is asked
    assert_each_row_has_its_own_answer(out)
    assert_secret_nowhere(tmp_path)
