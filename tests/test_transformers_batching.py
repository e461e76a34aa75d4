"""Batched generation in the transformers backend, on the real 135M model (CPU, float32).

* Answers decoded together in one left-padded batch equal the answers decoded alone, token for
  token (temperature 0), with prompts of different lengths (so rows carry different padding) and
  more requests than rows (so some join while others decode).
* A request that ends early (deadline, cancel, client gone, error) frees its row at once and leaves
  the answers of the requests decoded beside it unchanged.
* Sessions keep their prefix while other requests share the batch.

The first run converts the GGUF to an HF checkpoint (~1 min, cached under the models dir).  The CUDA
path (bf16) is not exercised here: no GPU on this machine.
"""
from __future__ import annotations

import pytest

from ruvllm_lab.config import InferenceConfig, SystemConfig
from ruvllm_lab.inference import InferencePool

from .batching_contract import (SMALL, STORY, check_batched_answers_equal_unbatched_ones,
                                check_early_ends_free_their_sequence_and_spare_the_others, greedy, same_answer)

pytestmark = [pytest.mark.slow, pytest.mark.model]

QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?",
             "Write one sentence about the sea and the wind over it at night.", "Who wrote Hamlet?",
             "What do bees make?"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def pool():
    cfg = InferenceConfig(models=[SMALL], max_context=512, backend="transformers", device="cpu",
                          max_batch_sequences=4, kv_cache_sessions=2, max_tokens=16)
    p = InferencePool(cfg, SystemConfig(max_memory_mb=2048))
    yield p
    p.close()


def test_batched_answers_equal_unbatched_ones_token_for_token(pool):
    check_batched_answers_equal_unbatched_ones(pool, QUESTIONS, MAX_TOKENS)  # 6 requests for 4 rows


def test_deadline_cancel_disconnect_and_error_free_their_row_and_spare_the_others(pool):
    check_early_ends_free_their_sequence_and_spare_the_others(pool, QUESTIONS, story_tokens=40, max_tokens=MAX_TOKENS)


def test_session_turns_keep_their_prefix_while_other_requests_share_the_batch(pool):
    turn1 = [{"role": "user", "content": "Name a fruit."}]
    first = greedy(pool, turn1, max_tokens=8, session_id="fruit")
    turn2 = turn1 + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And a vegetable?"}]
    with pool.stream(SMALL, STORY, temperature=0.0, max_tokens=24) as story:  # a neighbour in the batch
        next(story)
        warm = greedy(pool, turn2, max_tokens=8, session_id="fruit")
        "".join(story)
    cold = greedy(pool, turn2, max_tokens=8)
    assert 0 < warm.prompt_tokens_evaluated < cold.prompt_tokens_evaluated == cold.prompt_tokens
    assert same_answer(warm, cold)  # the reused cells are the cells a cold prefill computes
