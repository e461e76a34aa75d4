"""The OpenAI-compatible routes, driven by the official `openai` package against a real `ruvllm serve`.

The server runs the edge profile plus the `gemma3-270m` tier, so that forcing a tier and letting
the router choose are different requests; answers are a few tokens long.
"""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from ruvllm_lab.server.openai_api import conversation, from_seed_error
from ruvllm_lab.server.openai_types import ChatCompletionIn

from .test_server import KEY, Server

pytestmark = [pytest.mark.model, pytest.mark.slow]

TIERS = ["smollm2-135m", "gemma3-270m"]
TIMEOUT = 300  # model-backed calls: never a short timeout


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("openai"), [f"inference.models={json.dumps(TIERS)}",
                                                   "inference.max_loaded_models=2", "inference.max_tokens=8",
                                                   "server.rate_limit_per_minute=0"])
    yield s
    assert s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, timeout=TIMEOUT, max_retries=0)


def test_models_lists_the_tiers_and_auto(client):
    ids = [m.id for m in client.models.list()]
    assert ids == [*TIERS, "ruvllm-auto"]
    assert client.models.retrieve("gemma3-270m").id == "gemma3-270m"


def test_non_streamed_completion_runs_the_loop(client, server):
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=6, temperature=0)
    done = raw.parse()
    answer = done.choices[0]
    assert answer.message.role == "assistant" and answer.message.content
    assert answer.finish_reason in ("stop", "length")
    assert done.model == "smollm2-135m" and done.object == "chat.completion"
    assert 0 < done.usage.completion_tokens <= 6
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    ext = done.ruvllm  # the extension field, kept by the client as a pydantic extra
    assert ext["request_id"] == done.id == raw.headers["x-ruvllm-request-id"]
    assert ext["tier"] == raw.headers["x-ruvllm-tier"] == "smollm2-135m" and ext["forced"] is True
    assert 0 <= ext["confidence"] <= 1 and isinstance(ext["sources"], list)
    assert set(ext["latency_ms"]) >= {"embed", "retrieve", "route", "generate", "judge", "writeback"}


def test_streamed_completion_matches_openai_chunks(client, server):
    with client.chat.completions.with_streaming_response.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "Count to three."}], max_tokens=8,
            stream=True, stream_options={"include_usage": True}) as raw:
        request_id = raw.headers["x-ruvllm-request-id"]
        chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and text
    assert {c.id for c in chunks} == {request_id}
    assert chunks[0].choices[0].delta.role == "assistant"
    ext = finishing[0].ruvllm
    assert ext["request_id"] == request_id and ext["tier"] == "smollm2-135m"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0  # include_usage: the last chunk


def test_stream_ends_with_done(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=TIMEOUT) as c, \
            c.stream("POST", "/v1/chat/completions", json={"model": "ruvllm-auto", "stream": True, "max_tokens": 4,
                                                           "messages": [{"role": "user", "content": "Say hi."}]}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and len(data) >= 3


def test_forced_tier_and_auto_routing(client):
    forced = client.chat.completions.create(model="gemma3-270m", max_tokens=4,
                                            messages=[{"role": "user", "content": "Name a colour."}])
    assert forced.model == forced.ruvllm["tier"] == "gemma3-270m" and forced.ruvllm["forced"] is True
    auto = client.chat.completions.create(model="ruvllm-auto", max_tokens=4,
                                          messages=[{"role": "user", "content": "Name an animal."}])
    assert auto.ruvllm["forced"] is False and auto.model == auto.ruvllm["tier"] in TIERS
    assert auto.ruvllm["routing_info"]["tier"] == auto.model


def test_stop_sequence_cuts_the_answer(client):
    cut = client.chat.completions.create(model="smollm2-135m", max_tokens=8, temperature=0, stop=[" ", "\n"],
                                         messages=[{"role": "user", "content": "List three fruits."}])
    text = cut.choices[0].message.content
    assert cut.choices[0].finish_reason == "stop" and " " not in text and "\n" not in text


def test_user_keeps_a_session_with_the_history(client):
    first = client.chat.completions.create(model="smollm2-135m", max_tokens=6, user="ada",
                                           messages=[{"role": "user", "content": "My name is Ada."}])
    sid = first.ruvllm["session_id"]
    assert sid
    history = [{"role": "user", "content": "My name is Ada."},
               {"role": "assistant", "content": first.choices[0].message.content}]
    second = client.chat.completions.create(model="smollm2-135m", max_tokens=6, user="ada",
                                            messages=[*history, {"role": "user", "content": "What is my name?"}])
    assert second.ruvllm["session_id"] == sid
    # the client's history matched the session's turns, so the prefix was served from the KV cache
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    other = client.chat.completions.create(model="smollm2-135m", max_tokens=4, user="bob",
                                           messages=[{"role": "user", "content": "Hello."}])
    assert other.ruvllm["session_id"] != sid


def test_feedback_with_the_completion_id_reaches_the_next_answer(client, server):
    done = client.chat.completions.create(model="ruvllm-auto", max_tokens=4,
                                          messages=[{"role": "user", "content": "What is the capital of Peru?"}])
    with server.client() as c:
        fb = c.post("/v1/feedback", json={"request_id": done.id, "rating": 1,
                                          "correction": "The capital of Peru is Lima."})
    assert fb.status_code == 200 and fb.json()["recorded"] and fb.json()["correction_node"] > 0
    # the correction is in memory now: a paraphrase retrieves it into the prompt
    again = client.chat.completions.create(model="ruvllm-auto", max_tokens=4,
                                           messages=[{"role": "user", "content": "Which city is Peru's capital?"}])
    assert {"node_id": fb.json()["correction_node"], "kind": "correction"}.items() <= next(
        s for s in again.ruvllm["sources"] if s["kind"] == "correction").items()


def test_errors_have_openai_shape(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404 and e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="ruvllm-auto", messages=[{"role": "user", "content": "hi"}],
                                       temperature=7)
    assert e.value.param == "temperature" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="ruvllm-auto", messages=[{"role": "user", "content": "hi"},
                                                                      {"role": "assistant", "content": "hello"}])
    assert e.value.param == "messages" and "last message" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="ruvllm-auto", max_tokens=100_000,
                                       messages=[{"role": "user", "content": "hi"}])
    assert e.value.param == "max_tokens"
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=TIMEOUT) as c:
        too_big = c.post("/v1/chat/completions", content=b"x" * (server.config.server.max_body_bytes + 1),
                         headers={"content-type": "application/json"})  # answered by the gate, before any route
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "body_too_large"
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", timeout=TIMEOUT, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key" and e.value.body["message"]


# ---- the mapping itself (no server) ----------------------------------------------------------------

def _messages(*pairs):
    return ChatCompletionIn.model_validate({"model": "m", "messages": [{"role": r, "content": c} for r, c in pairs]}
                                           ).messages


def test_conversation_maps_history_and_instructions():
    question, history = conversation(_messages(("system", "Be terse."), ("user", "Hi."), ("assistant", "Hello."),
                                               ("user", "2+2?"), ("user", "Just the number.")))
    assert question == "Be terse.\n\n2+2?\n\nJust the number."
    assert history == [("Be terse.\n\nHi.", "Hello.")]
    with pytest.raises(ValueError, match="last message"):
        conversation(_messages(("user", "Hi."), ("assistant", "Hello.")))


def test_seed_errors_become_openai_errors():
    assert from_seed_error(429, {"error": "rate_limited", "detail": "retry in 1 s"}) == {"error": {
        "message": "retry in 1 s", "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}}
    assert from_seed_error(503, {"error": "shutting_down", "detail": "bye"})["error"]["type"] == "server_error"
