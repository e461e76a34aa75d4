"""Continuous batching in the llama.cpp backend, on the real 135M model.

* Answers decoded together in one batch equal the answers decoded alone, token for token
  (temperature 0: greedy, so any difference would be a scheduling bug).
* A request that ends early (deadline, cancel, client gone, error) frees its sequence at once
  and leaves the answers of the requests decoded beside it unchanged.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from ruvllm_lab.config import InferenceConfig, SystemConfig
from ruvllm_lab.inference import InferencePool

from .batching_contract import (SMALL, STORY, check_batched_answers_equal_unbatched_ones,
                                check_early_ends_free_their_sequence_and_spare_the_others, greedy)

QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?",
             "Write one sentence about the sea.", "Who wrote Hamlet?", "What do bees make?"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def pool():
    cfg = InferenceConfig(models=[SMALL], max_context=512, max_batch_sequences=4, kv_cache_sessions=2,
                          max_tokens=24)
    p = InferencePool(cfg, SystemConfig(max_memory_mb=1024))
    yield p
    p.close()


def test_batched_answers_equal_unbatched_ones_token_for_token(pool):
    check_batched_answers_equal_unbatched_ones(pool, QUESTIONS, MAX_TOKENS)  # 6 requests for 4 sequences


def test_system_prompt_prefix_is_computed_once_and_reused(pool):
    system = {"role": "system", "content": "You are a terse assistant. Answer in as few words as possible."}
    first = greedy(pool, [system, {"role": "user", "content": "Capital of Italy?"}], 4)
    second = greedy(pool, [system, {"role": "user", "content": "Capital of Spain?"}], 4)
    assert first.prompt_tokens_evaluated <= first.prompt_tokens
    assert 0 < second.prompt_tokens_evaluated < second.prompt_tokens - 10  # the shared system turn was cached


def test_deadline_cancel_disconnect_and_error_free_their_sequence_and_spare_the_others(pool):
    check_early_ends_free_their_sequence_and_spare_the_others(pool, QUESTIONS, story_tokens=48, max_tokens=MAX_TOKENS)


def test_session_turns_keep_their_prefix_while_other_requests_run(pool):
    turn1 = [{"role": "user", "content": "Name a fruit."}]
    first = greedy(pool, turn1, max_tokens=12, session_id="fruit")
    turn2 = turn1 + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And a vegetable?"}]
    with ThreadPoolExecutor(4) as ex:  # other sessions and anonymous requests take sequences meanwhile
        list(ex.map(lambda i: greedy(pool, QUESTIONS[i], MAX_TOKENS, session_id=f"other{i}" if i % 2 else None),
                    range(5)))
    warm = greedy(pool, turn2, max_tokens=12, session_id="fruit")
    cold = greedy(pool, turn2, max_tokens=12)
    assert warm.prompt_tokens == cold.prompt_tokens
    assert 0 < warm.prompt_tokens_evaluated < cold.prompt_tokens_evaluated


def test_closing_the_pool_ends_open_streams_cleanly():
    cfg = InferenceConfig(models=[SMALL], max_context=256, max_batch_sequences=2)
    p = InferencePool(cfg, SystemConfig(max_memory_mb=1024))
    stream = p.stream(SMALL, STORY, temperature=0.0, max_tokens=200)
    next(stream)
    p.close()  # cancels the stream and stops the scheduler before the model is freed
    for _ in stream:  # whatever was decoded before the cancel may still arrive
        pass
    assert stream.result is not None and stream.result.finish_reason == "cancelled"


def test_without_prefix_reuse_an_answer_does_not_depend_on_what_was_asked_before():
    """prefix_reuse = false (the memory ablation's setting): every prompt is evaluated in full, so
    the same prompt gives bit-identical log-probs whichever prompt its sequence held before."""
    cfg = InferenceConfig(models=[SMALL], max_context=512, max_batch_sequences=1, max_tokens=12, prefix_reuse=False)
    p = InferencePool(cfg, SystemConfig(max_memory_mb=1024))
    try:
        target = "What is the capital of Morocco?"
        runs = []
        for before in ("What is the capital of Mongolia?", "Name three colors.", None):
            if before:
                greedy(p, before, max_tokens=4)
            runs.append(greedy(p, target, max_tokens=12))
        for r in runs:
            assert r.prompt_tokens_evaluated == r.prompt_tokens  # nothing reused
            assert (r.text, r.logprobs) == (runs[0].text, runs[0].logprobs)  # exact, not approximate
    finally:
        p.close()
    # the default reuses the shared prefix (the system prompt and "What is the capital of")
    reuse_cfg = InferenceConfig(models=[SMALL], max_context=512, max_batch_sequences=1, max_tokens=4)
    p = InferencePool(reuse_cfg, SystemConfig(max_memory_mb=1024))
    try:
        greedy(p, "What is the capital of Mongolia?", max_tokens=4)
        again = greedy(p, target, max_tokens=4)
        assert again.prompt_tokens_evaluated < again.prompt_tokens
    finally:
        p.close()
