"""Requests that fit today's models, against the fake chat-completions server on 127.0.0.1 (real `openai` client):
max_tokens vs max_completion_tokens, reasoning_effort and extra request fields in the body, the preflight that
stops on a refused key, model or parameter, per-provider image tokens in the dry run, the paper preset's teacher.

    .venv/bin/pytest tests/test_teacher_requests.py -q
"""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers beside this file, in any import mode
from refinevla.config import resolve  # noqa: E402
from refinevla.teacher import annotate  # noqa: E402
from refinevla.teacher.cost import PRICES, image_tokens  # noqa: E402
from test_teacher import make_demos  # noqa: E402
from test_teacher_http import (SECRET, assert_each_row_has_its_own_answer, assert_secret_nowhere,  # noqa: E402
                               cost, http_cfg)
from test_teacher_http import key, server  # noqa: E402,F401  the same fixtures (key: autouse)


def test_gpt5_and_o_series_get_max_completion_tokens(server, tmp_path):
    server.token_param = "max_completion_tokens"  # as OpenAI's reasoning models: max_tokens is a 400
    for model in ("gpt-5-mini", "o4-mini", "openai/gpt-5"):
        annotate(make_demos(episodes=1, steps=2), http_cfg(server, tmp_path, model=model), tmp_path / model)
    bodies = server.bodies()
    assert len(bodies) == 6 and all(b["max_completion_tokens"] == 300 and "max_tokens" not in b for b in bodies)


def test_a_400_asking_for_max_completion_tokens_switches_once_for_the_whole_run(server, tmp_path):
    server.token_param = "max_completion_tokens"  # an endpoint whose model name says nothing (a proxy, an alias)
    out = annotate(make_demos(), http_cfg(server, tmp_path, model="my-alias", concurrency=1), tmp_path / "out")
    assert_each_row_has_its_own_answer(out)
    bodies = server.bodies()
    assert "max_tokens" in bodies[0] and all("max_completion_tokens" in b for b in bodies[1:])
    summary = cost(tmp_path / "out")
    assert server.count == 11 and summary["failed"] == 0 and summary["retries"] == 0
    assert summary["token_limit_param"] == "max_completion_tokens"
    # and the other way round: an older server that does not know max_completion_tokens
    server.reset()
    server.token_param = "max_tokens"
    out = annotate(make_demos(seed=1), http_cfg(server, tmp_path, model="gpt-5-mini", concurrency=3,
                                                data_root=str(tmp_path / "d2")), tmp_path / "o2")
    assert_each_row_has_its_own_answer(out)
    assert all("max_tokens" in b for b in server.bodies()[1:]) and server.count <= 10 + 3


def test_a_fixed_token_param_the_endpoint_refuses_stops_at_the_preflight(server, tmp_path):
    server.token_param = "max_completion_tokens"
    cfg = http_cfg(server, tmp_path, model="my-alias", token_limit_param="max_tokens")
    with pytest.raises(RuntimeError, match=r"preflight request failed: a request parameter was "
                                           r"refused \(400: .*max_completion_tokens.*check token_limit_param"):
        annotate(make_demos(), cfg, tmp_path / "out")
    assert server.count == 1


def test_reasoning_effort_and_extra_fields_arrive_in_the_body_and_key_the_cache(server, tmp_path):
    demos = make_demos(episodes=1, steps=3)
    annotate(demos, http_cfg(server, tmp_path), tmp_path / "plain")
    assert all("reasoning_effort" not in b for b in server.bodies())  # empty = not sent
    extra = {"service_tier": "flex", "extra_body": {"google": {"thinking_config": {"thinking_budget": 0}}}}
    cfg = http_cfg(server, tmp_path, model="gemini-2.5-flash", reasoning_effort="none", extra_body=extra)
    annotate(demos, cfg, tmp_path / "out")
    body = server.bodies()[-1]
    assert body["reasoning_effort"] == "none" and body["service_tier"] == "flex"
    assert body["extra_body"] == extra["extra_body"] and body["max_tokens"] == 300
    n = server.count
    annotate(demos, cfg, tmp_path / "again")
    assert server.count == n, "the same settings: every answer cached"
    annotate(demos, http_cfg(server, tmp_path, model="gemini-2.5-flash", reasoning_effort="low", extra_body=extra),
             tmp_path / "low")
    assert server.count == n + 3, "another reasoning effort is another answer"


@pytest.mark.parametrize("refuse, expected", [
    ("key", r"the key was refused \(401\).*api_key_env"),
    ("model", r"not found \(404\): unknown model or wrong base_url.*check the model name"),
    ("field", r"a request parameter was refused \(400: .*Unknown name .reasoning_effort."),
])
def test_preflight_stops_at_once_on_a_refused_key_model_or_parameter(server, tmp_path, refuse, expected):
    if refuse == "key":
        server.api_key = "sk-the-right-one"
    elif refuse == "model":
        server.models = {"gemini-2.5-flash"}
    else:
        server.refused_fields = {"reasoning_effort"}  # e.g. a local server that does not know the field
    cfg = http_cfg(server, tmp_path, model="gpt-4o-mini", reasoning_effort="low", concurrency=8)
    with pytest.raises(RuntimeError, match=expected) as stopped:
        annotate(make_demos(episodes=6, steps=10), cfg, tmp_path / "out")
    assert "\n" not in str(stopped.value) and SECRET not in str(stopped.value)
    assert server.count == 1 and not (tmp_path / "out" / "dataset").exists()  # one request, then one message
    assert_secret_nowhere(tmp_path)


def test_a_thinking_model_that_used_up_its_tokens_is_told_how_to_fix_it(server, tmp_path):
    server.rule = lambda n, body: {"content": "", "finish_reason": "length"}
    with pytest.raises(RuntimeError, match="finish_reason=length.*raise max_tokens or set reasoning_effort"):
        annotate(make_demos(episodes=1, steps=2), http_cfg(server, tmp_path, max_attempts=2), tmp_path / "out")


def test_image_tokens_per_provider_follow_the_published_rules():
    assert image_tokens("gemini-2.5-flash", 224, 224) == 258 == image_tokens("models/gemini-2.0-flash", 384, 384)
    assert image_tokens("gemini-2.5-flash", 768, 1024) == 2 * 258  # two 768 px tiles
    assert image_tokens("gpt-4o", 1024, 1024) == 85 + 170 * 4  # OpenAI's worked example: 765
    assert image_tokens("gpt-4o", 4096, 2048) == 85 + 170 * 6  # fit in 2048, short side 768: 1105
    assert image_tokens("gpt-4o-mini", 224, 224) == 2833 + 5667
    assert image_tokens("gpt-4.1-mini", 1024, 1024) == int(1024 * 1.62) + 1  # 1024 patches x 1.62, rounded up
    assert image_tokens("gpt-5-mini", 64, 64) == 7  # 4 patches x 1.62
    assert image_tokens("my-local-model", 64, 64) == 258


def test_dry_run_counts_the_providers_image_tokens(server, tmp_path):
    counts = {}
    for model in ("gemini-2.5-flash", "gpt-4o-mini", "gpt-5-mini"):
        annotate(make_demos(size=64), http_cfg(server, tmp_path, model=model, dry_run=True), tmp_path / model)
        counts[model] = json.loads((tmp_path / model / "cost_estimate.json").read_text())
    assert [counts[m]["image_tokens_per_frame"] for m in counts] == [[258], [8500], [7]]
    text = counts["gemini-2.5-flash"]["input_tokens"] - 10 * 258
    assert counts["gpt-4o-mini"]["input_tokens"] == text + 10 * 8500 and server.count == 0
    assert counts["gemini-2.5-flash"]["cost_usd"] == pytest.approx(
        (counts["gemini-2.5-flash"]["input_tokens"] * 0.30 + 10 * 120 * 2.50) / 1e6)


def test_the_paper_preset_uses_a_current_ga_teacher_with_gemini_3_parameters():
    """gemini-2.5-flash was shut down in 2026 (https://ai.google.dev/gemini-api/docs/deprecations); Gemini 3 keeps
    temperature at 1.0, its OpenAI endpoint takes reasoning_effort none / low / medium / high, and thinking counts
    against max_tokens."""
    a = resolve("paper").annotate
    assert a.model.startswith("gemini-3") and "preview" not in a.model and a.preflight >= 1
    assert a.temperature == 1.0 and a.reasoning_effort in ("none", "low", "medium", "high") and a.max_tokens >= 1024
    assert a.model in PRICES  # the dry run prices it
    assert a.base_url.startswith("https://generativelanguage.googleapis.com/") and a.api_key_env == "GEMINI_API_KEY"
