"""Schemathesis fuzzes the OpenAPI document that a real `ruvllm serve` process publishes.

For every operation Hypothesis generates schema-valid and schema-violating requests; whatever it
sends, the server never answers 5xx, and its answers conform to the schema it publishes.

Nothing here depends on how fast the machine is: a fuzzed query runs the real model, so every call
gets MODEL_CALL_TIMEOUT_S (schemathesis' default read timeout is 10 s, which a loaded CI machine can
exceed and Hypothesis then reports as a FlakyFailure).
"""
from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from .test_server import KEY, Server

pytestmark = [pytest.mark.model, pytest.mark.slow]

AUTH = {"Authorization": f"Bearer {KEY}"}
FUZZ_EXAMPLES = int(os.environ.get("RUVLLM_FUZZ_EXAMPLES", "25"))  # per operation and mode
BODYLESS = {"GET /v1/health", "GET /v1/health/ready", "GET /v1/metrics", "POST /v1/sessions", "GET /v1/models"}
MODEL_CALL_TIMEOUT_S = 300  # a model-backed call is never cut short: a slow machine is not a failure


@pytest.fixture(scope="module")
def served_schema(tmp_path_factory):
    # short generations keep the fuzzed queries cheap; no rate limit so fuzzing is never throttled
    srv = Server(tmp_path_factory.mktemp("fuzz"), ["server.max_tokens_limit=4", "inference.max_tokens=4",
                                                   "server.rate_limit_per_minute=0", "server.max_query_chars=400"])
    yield schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
    assert srv.stop()


def _operations(schema):
    return [result.ok() for result in schema.get_all_operations()]


def test_the_served_document_lists_every_route(served_schema):
    labels = {op.label for op in _operations(served_schema)}
    assert {"POST /v1/query", "POST /v1/feedback", "POST /v1/sessions", "GET /v1/health", "GET /v1/health/ready",
            "GET /v1/metrics", "POST /v1/chat/completions", "GET /v1/models", "GET /v1/models/{model_id}"} <= labels


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_fuzzed_requests_get_no_5xx_and_schema_conformant_answers(served_schema, mode):
    for op in _operations(served_schema):
        if mode is schemathesis.GenerationMode.NEGATIVE and op.label in BODYLESS:
            continue  # nothing in these requests can be made invalid
        @given(case=op.as_strategy(generation_mode=mode))
        # derandomize: CI sees the same examples every run, so a failure reproduces; explore more with
        # RUVLLM_FUZZ_EXAMPLES=150 (ran clean twice before this was committed)
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None, derandomize=True)
        def check(case):
            case.call_and_validate(headers=AUTH, timeout=MODEL_CALL_TIMEOUT_S)

        check()
