"""The HTTP teacher through the Batch API (files + batches) of a fake server on 127.0.0.1: the real `openai`
client, real HTTP, real multipart uploads. The server answers each batch line with the same machinery and
faults as an online request (tests/chat_server.py).

    .venv/bin/pytest tests/test_teacher_batch.py -q
"""
import dataclasses
import json
import os
import sqlite3
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers beside this file, in any import mode
from chat_server import ChatServer, instruction_of  # noqa: E402
from refinevla.teacher import AnnotateConfig, annotate  # noqa: E402
from test_teacher import make_demos  # noqa: E402
from test_teacher_http import (KEY_ENV, SECRET, assert_each_row_has_its_own_answer,  # noqa: E402
                               assert_secret_nowhere, cache_rows, cost)
from test_teacher_http import key, server  # noqa: E402,F401  the same fixtures (key: autouse)


def batch_cfg(server, tmp_path, **overrides) -> AnnotateConfig:
    base = dict(teacher="http", base_url=server.url, model="gpt-4o-mini", api_key_env=KEY_ENV,
                data_root=str(tmp_path / "data"), batch=True, batch_poll_s=0.01, timeout_s=5.0, max_attempts=2,
                preflight=0)
    return AnnotateConfig(**{**base, **overrides})


def online(server) -> list[dict]:
    return [r for r in server.requests if "x-batch-id" not in r["headers"]]


def input_lines(server, batch_id: str) -> list[dict]:
    data = server.files[server.batches[batch_id]["input_file_id"]]["data"]
    return [json.loads(line) for line in data.decode().splitlines()]


def ledger(tmp_path) -> list[tuple]:
    with sqlite3.connect(tmp_path / "data" / "cache" / "teacher.sqlite") as db:
        return db.execute("SELECT batch_id, requests, collected FROM batches ORDER BY created").fetchall()


def test_one_batch_file_carries_the_online_requests_and_fills_the_cache(server, tmp_path):
    assert os.environ[KEY_ENV] == SECRET  # the key the client sends, searched for in every file written below
    demos = make_demos()
    out = annotate(demos, batch_cfg(server, tmp_path), tmp_path / "out")
    assert len(server.batches) == 1 and online(server) == [] and server.count == len(demos) == 10
    assert_each_row_has_its_own_answer(out)
    batch = server.batches["batch_0"]
    assert batch["endpoint"] == "/v1/chat/completions" and batch["completion_window"] == "24h"
    assert server.files[batch["input_file_id"]]["purpose"] == "batch"

    # each line is the online request body, addressed by the frame's cache key
    lines = input_lines(server, "batch_0")
    assert {line["custom_id"] for line in lines} == set(out["input_hash"]) and len(lines) == 10  # cache keys
    body = lines[0]["body"]
    assert lines[0]["method"] == "POST" and lines[0]["url"] == "/v1/chat/completions"
    assert body["model"] == "gpt-4o-mini" and body["response_format"]["type"] == "json_schema"
    assert body["messages"][1]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")

    summary = cost(tmp_path / "out")
    assert summary["mode"] == "batch" and summary["batches_submitted"] == 1 and summary["requests_sent"] == 10
    assert summary["cost_usd"] == pytest.approx((1000 * 0.15 + 200 * 0.60) / 1e6 * 0.5)  # half price
    assert ledger(tmp_path) == [("batch_0", 10, 1)]

    again = annotate(demos, batch_cfg(server, tmp_path), tmp_path / "out2")
    assert len(server.batches) == 1 and len(server.files) == 2, "a re-run must submit nothing"
    assert again["rationale"] == out["rationale"]
    # online and batch answers share one cache: an online re-run sends nothing either
    annotate(demos, batch_cfg(server, tmp_path, batch=False), tmp_path / "out3")
    assert online(server) == []
    assert_secret_nowhere(tmp_path)


def test_files_are_split_by_request_count_and_size(server, tmp_path):
    demos = make_demos(episodes=3, steps=5)
    annotate(demos, batch_cfg(server, tmp_path, batch_max_requests=4), tmp_path / "out")
    assert [len(input_lines(server, b)) for b in server.batches] == [4, 4, 4, 3]
    one_line = len(server.files["file-0"]["data"]) / 4
    annotate(demos, batch_cfg(server, tmp_path, data_root=str(tmp_path / "d2"),
                              batch_max_mb=2.5 * one_line / 1e6), tmp_path / "out2")
    assert [len(input_lines(server, b)) for b in list(server.batches)[4:]] == [2] * 7 + [1]


def test_a_run_that_stops_waiting_is_collected_by_the_next_without_resubmitting(server, tmp_path):
    server.batch_polls = 10**6  # stays in progress
    demos = make_demos()
    with pytest.raises(RuntimeError, match="10 of 10 key frames failed"):
        annotate(demos, batch_cfg(server, tmp_path, batch_timeout_s=0.05), tmp_path / "out")
    summary = cost(tmp_path / "out")
    assert summary["batches_running"] == ["batch_0"] and server.count == 0
    assert "batch still running (batch_0): re-run annotate" in summary["failures"][0]["error"]
    assert ledger(tmp_path) == [("batch_0", 10, 0)]

    server.batch_polls = 0
    server.batches["batch_0"]["_polls"] = 0  # the provider finishes it
    out = annotate(demos, batch_cfg(server, tmp_path), tmp_path / "out")
    assert len(server.batches) == 1 and len(online(server)) == 0, "nothing may be sent twice"
    assert server.count == 10 and ledger(tmp_path) == [("batch_0", 10, 1)]
    assert_each_row_has_its_own_answer(out)


def test_a_crash_between_creating_and_recording_adopts_the_providers_batch(server, tmp_path):
    server.batch_polls = 10**6
    demos = make_demos()
    with pytest.raises(RuntimeError):
        annotate(demos, batch_cfg(server, tmp_path, batch_timeout_s=0.01), tmp_path / "out")
    with sqlite3.connect(tmp_path / "data" / "cache" / "teacher.sqlite") as db:
        db.execute("UPDATE batches SET batch_id = NULL")  # as if killed right after batches.create
    server.batches["batch_0"]["_polls"] = 0
    out = annotate(demos, batch_cfg(server, tmp_path), tmp_path / "out")
    assert len(server.batches) == 1 and server.count == 10  # found by its metadata, not created again
    assert server.batches["batch_0"]["metadata"]["refinevla_input_sha"]
    assert_each_row_has_its_own_answer(out)


def test_failed_lines_are_recorded_and_only_they_are_sent_again(server, tmp_path):
    server.rule = lambda n, body: ({"status": 500} if "ep1" in instruction_of(body) and n < 10 else
                                   {"content": "not json"} if "ep0 st2" in instruction_of(body) and n < 10
                                   else None)
    demos = make_demos()
    with pytest.raises(RuntimeError, match="6 of 10 key frames failed"):
        annotate(demos, batch_cfg(server, tmp_path), tmp_path / "out")
    errors = sorted(e for _, e in cache_rows(tmp_path, "status = 'failed'"))
    assert len(errors) == 6 and sum(e.startswith("batch line status 500") for e in errors) == 5
    assert sum("invalid rationale JSON" in e for e in errors) == 1
    out = annotate(demos, batch_cfg(server, tmp_path), tmp_path / "out")
    assert len(input_lines(server, "batch_1")) == 6 and server.count == 16
    assert_each_row_has_its_own_answer(out)


def test_an_expired_batch_keeps_what_was_answered(server, tmp_path):
    server.batch_script.append({"status": "expired", "after": 3})
    demos = make_demos()
    with pytest.raises(RuntimeError, match="7 of 10 key frames failed"):
        annotate(demos, batch_cfg(server, tmp_path), tmp_path / "out")
    assert len(cache_rows(tmp_path, "status = 'ok'")) == 3
    assert "batch batch_0 expired before answering this frame" in cost(tmp_path / "out")["failures"][0]["error"]
    annotate(demos, batch_cfg(server, tmp_path), tmp_path / "out")
    assert len(input_lines(server, "batch_1")) == 7 and server.count == 10


def test_an_unreadable_result_line_costs_its_frame_not_the_run(server, tmp_path):
    demos = make_demos()
    original = server.add_file

    def garble(data, filename, purpose):  # the provider's output file with its first line cut short
        if purpose == "batch_output":
            first, rest = data.split(b"\n", 1)
            data = first[:40] + b"\n" + rest
        return original(data, filename, purpose)

    server.add_file = garble
    with pytest.raises(RuntimeError, match="1 of 10 key frames failed"):
        annotate(demos, batch_cfg(server, tmp_path), tmp_path / "out")
    assert "completed without a readable answer line" in cost(tmp_path / "out")["failures"][0]["error"]
    server.add_file = original
    annotate(demos, batch_cfg(server, tmp_path), tmp_path / "out")
    assert len(input_lines(server, "batch_1")) == 1


def test_a_failed_batch_names_the_providers_reason(server, tmp_path):
    server.batch_script.append({"status": "failed", "message": "line 1: model not available for batch"})
    with pytest.raises(RuntimeError, match="10 of 10"):
        annotate(make_demos(), batch_cfg(server, tmp_path), tmp_path / "out")
    assert "model not available for batch" in cost(tmp_path / "out")["failures"][0]["error"]


def test_a_server_without_the_batch_api_gets_a_clear_error(tmp_path):
    with ChatServer() as plain:
        plain_url = plain.url
        cfg = batch_cfg(plain, tmp_path, base_url=plain_url.replace("/v1", "/v0"))  # no route there
        with pytest.raises(RuntimeError, match="has no Batch API.*set batch: false"):
            annotate(make_demos(), cfg, tmp_path / "out")


def test_a_provider_that_refuses_metadata_and_listing_still_runs_and_recovers(server, tmp_path):
    """Gemini's batch endpoint may refuse `metadata` and the batch list: the batch is created without metadata,
    the ledger keeps it, and a run killed before recording its id submits its frames again (nothing lost)."""
    server.refuse_batch_metadata = server.refuse_batch_list = True
    server.batch_polls = 10**6
    demos = make_demos()
    with pytest.raises(RuntimeError, match="10 of 10 key frames failed"):
        annotate(demos, batch_cfg(server, tmp_path, batch_timeout_s=0.01), tmp_path / "out")
    assert server.batches["batch_0"]["metadata"] is None and ledger(tmp_path) == [("batch_0", 10, 0)]
    server.batches["batch_0"]["_polls"] = 0
    out = annotate(demos, batch_cfg(server, tmp_path), tmp_path / "out")  # collected through the ledger
    assert len(server.batches) == 1 and ledger(tmp_path) == [("batch_0", 10, 1)]
    assert_each_row_has_its_own_answer(out)

    with sqlite3.connect(tmp_path / "data" / "cache" / "teacher.sqlite") as db:  # a crash before the id was saved
        db.execute("DELETE FROM answers")
        db.execute("UPDATE batches SET batch_id = NULL, collected = 0")
    server.batch_polls = 0
    out = annotate(demos, batch_cfg(server, tmp_path), tmp_path / "out2")  # no list to search: sent again
    assert len(server.batches) == 2 and len(input_lines(server, "batch_1")) == 10
    assert_each_row_has_its_own_answer(out)


def test_preflight_before_a_batch_sends_two_online_requests_then_the_rest_as_a_batch(server, tmp_path):
    out = annotate(make_demos(), batch_cfg(server, tmp_path, preflight=2), tmp_path / "out")
    assert len(online(server)) == 2 and len(input_lines(server, "batch_0")) == 8
    assert_each_row_has_its_own_answer(out)
    server.models = {"another-model"}
    with pytest.raises(RuntimeError, match="preflight request failed: not found"):
        annotate(make_demos(seed=1), batch_cfg(server, tmp_path, preflight=2), tmp_path / "out2")
    assert len(server.batches) == 1, "a refused model must not reach the Batch API"


def test_batch_lines_use_the_token_limit_name_the_preflight_found(server, tmp_path):
    server.token_param = "max_completion_tokens"  # a model name that says nothing (an alias behind a proxy)
    out = annotate(make_demos(), batch_cfg(server, tmp_path, model="my-alias", preflight=2), tmp_path / "out")
    assert_each_row_has_its_own_answer(out)
    lines = input_lines(server, "batch_0")
    assert len(lines) == 8 and all("max_completion_tokens" in line["body"] for line in lines)
    assert len(online(server)) == 3  # the first preflight request was refused once, then resent


def test_dry_run_prices_the_batch(server, tmp_path, capsys):
    annotate(make_demos(), batch_cfg(server, tmp_path, dry_run=True, batch_max_requests=4), tmp_path / "o")
    batch = json.loads((tmp_path / "o" / "cost_estimate.json").read_text())
    annotate(make_demos(), batch_cfg(server, tmp_path, dry_run=True, batch=False), tmp_path / "o")
    single = json.loads((tmp_path / "o" / "cost_estimate.json").read_text())
    assert batch["cost_usd"] == pytest.approx(single["cost_usd"] / 2) and batch["batch_files"] == 3
    assert "in 3 Batch API file(s)" in capsys.readouterr().out and server.count == 0 and not server.files


def test_bad_batch_settings_name_the_field():
    for bad, field in [({"batch_max_requests": 0}, "batch_max_requests"), ({"batch_poll_s": -1}, "batch_poll_s"),
                       ({"batch_discount": 1.5}, "batch_discount")]:
        with pytest.raises(ValueError, match=field):
            dataclasses.replace(AnnotateConfig(), **bad).validate()
