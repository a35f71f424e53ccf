"""The request body per model family, and a 400 that refuses `temperature`, against the fake chat-completions server
on 127.0.0.1 (real `openai` client).

    .venv/bin/pytest tests/test_teacher_families.py -q

OpenAI's reasoning models (o-series, gpt-5) answer 400 to any temperature but their default ("Unsupported value:
'temperature' does not support 0 with this model. Only the default (1) value is supported.", param "temperature"),
and a 400 ends the frame: by name they are sent none; any other endpoint that refuses it has it dropped once.
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers beside this file, in any import mode
from refinevla.config import AnnotateConfig  # noqa: E402
from refinevla.teacher import annotate  # noqa: E402
from refinevla.teacher.batch import batch_line  # noqa: E402
from refinevla.teacher.request import Job, request_body  # noqa: E402
from test_teacher import make_demos  # noqa: E402
from test_teacher_http import assert_each_row_has_its_own_answer, cost, http_cfg  # noqa: E402
from test_teacher_http import key, server  # noqa: E402,F401  the same fixtures (key: autouse)

REFUSAL = {"status": 400, "message": "Unsupported value: 'temperature' does not support 0 with this model. Only the "
                                     "default (1) value is supported."}


@pytest.mark.parametrize("model, temperature, limit", [
    ("gpt-4o-mini", True, "max_tokens"), ("gpt-4.1-nano", True, "max_tokens"),
    ("gpt-5", False, "max_completion_tokens"), ("gpt-5-mini", False, "max_completion_tokens"),
    ("openai/gpt-5-nano", False, "max_completion_tokens"), ("o3", False, "max_completion_tokens"),
    ("o4-mini", False, "max_completion_tokens"), ("gemini-3.8-flash", True, "max_tokens"),
    ("models/gemini-3.5-flash-lite", True, "max_tokens"), ("Qwen/Qwen2.5-VL-7B-Instruct", True, "max_tokens")])
def test_the_request_built_for_each_model_family(model, temperature, limit):
    cfg = AnnotateConfig(teacher="http", model=model, temperature=0.0)
    body = request_body(cfg, [])
    assert ("temperature" in body) == temperature and body[limit] == cfg.max_tokens
    assert set(body) & {"max_tokens", "max_completion_tokens"} == {limit}


def test_batch_lines_follow_the_same_rule(monkeypatch):
    from refinevla.teacher import batch

    monkeypatch.setattr(batch, "build_messages", lambda job: [{"role": "user", "content": "x"}])
    job = Job(0, "k", None, "", [], [], [])
    assert b'"temperature"' not in batch_line(job, AnnotateConfig(teacher="http", model="gpt-5-mini"))
    assert b'"temperature":0.0' in batch_line(job, AnnotateConfig(teacher="http", model="gpt-4o-mini"))
    assert b'"temperature"' not in batch_line(job, AnnotateConfig(teacher="http", model="gpt-4o-mini"), False)


def test_a_400_refusing_temperature_drops_it_once_for_the_whole_run(server, tmp_path, capsys):
    server.rule = lambda n, body: REFUSAL if "temperature" in body else None  # an alias whose name says nothing
    out = annotate(make_demos(), http_cfg(server, tmp_path, model="my-alias", concurrency=1), tmp_path / "out")
    assert_each_row_has_its_own_answer(out)
    bodies = server.bodies()
    assert "temperature" in bodies[0] and not any("temperature" in b for b in bodies[1:])
    summary = cost(tmp_path / "out")
    assert summary["failed"] == 0 and summary["retries"] == 0 and summary["temperature_sent"] is False
    said = [ln for ln in capsys.readouterr().out.splitlines() if "refused temperature" in ln]
    assert len(said) == 1 and "sent without temperature from now on" in said[0]
    # with several workers in flight: each frame is resent once, nothing is spent, still said once
    server.reset()
    server.rule = lambda n, body: REFUSAL if "temperature" in body else None
    out = annotate(make_demos(seed=1), http_cfg(server, tmp_path, model="my-alias", concurrency=4,
                                                data_root=str(tmp_path / "d2")), tmp_path / "o2")
    assert_each_row_has_its_own_answer(out)
    assert cost(tmp_path / "o2")["failed"] == 0
    assert len([ln for ln in capsys.readouterr().out.splitlines() if "refused temperature" in ln]) == 1


def test_reasoning_models_are_never_sent_a_temperature(server, tmp_path):
    server.rule = lambda n, body: REFUSAL if "temperature" in body else None
    server.token_param = "max_completion_tokens"
    annotate(make_demos(episodes=1, steps=2), http_cfg(server, tmp_path, model="o4-mini"), tmp_path / "o")
    assert server.bodies() and not any("temperature" in b for b in server.bodies())
    assert cost(tmp_path / "o")["failed"] == 0
