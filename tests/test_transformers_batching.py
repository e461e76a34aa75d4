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

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from ruvllm_lab.config import InferenceConfig, SystemConfig
from ruvllm_lab.inference import InferencePool
from ruvllm_lab.inference.base import GenerationRequest, drain
from ruvllm_lab.inference.prompts import normalize_messages

pytestmark = [pytest.mark.slow, pytest.mark.model]

SMALL = "smollm2-135m"
QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?",
             "Write one sentence about the sea and the wind over it at night.", "Who wrote Hamlet?",
             "What do bees make?"]
STORY = "Write a long story about a dragon who learns to cook."


@pytest.fixture(scope="module")
def pool():
    cfg = InferenceConfig(models=[SMALL], max_context=512, backend="transformers", device="cpu",
                          max_batch_sequences=4, kv_cache_sessions=2, max_tokens=16)
    p = InferencePool(cfg, SystemConfig(max_memory_mb=2048))
    yield p
    p.close()


def backend(pool):
    pool.generate(SMALL, "Hi", temperature=0.0, max_tokens=1)  # loaded
    return pool._resident[SMALL]


def greedy(pool, prompt, **kw):
    return pool.generate(SMALL, prompt, temperature=0.0, max_tokens=kw.pop("max_tokens", 16), logprobs=True, **kw)


def same_answer(a, b) -> bool:
    return (a.text, a.completion_tokens, a.finish_reason) == (b.text, b.completion_tokens, b.finish_reason)


def test_batched_answers_equal_unbatched_ones_token_for_token(pool):
    b = backend(pool)
    assert b.batches
    alone = [greedy(pool, q) for q in QUESTIONS]  # one at a time: every step holds one sequence
    peak_before = b.peak_sequences
    with ThreadPoolExecutor(len(QUESTIONS)) as ex:  # 6 requests for 4 rows: two join mid-flight
        together = list(ex.map(lambda q: greedy(pool, q), QUESTIONS))
    assert peak_before == 1 and b.peak_sequences >= 2, "the concurrent requests were never decoded in one batch"
    for q, a, t in zip(QUESTIONS, alone, together):
        assert same_answer(a, t), (q, a.text, t.text)
        assert len(t.logprobs) == t.completion_tokens
        assert t.logprobs == pytest.approx(a.logprobs, abs=1e-3)
    assert b.busy_sequences() == 0


def test_deadline_cancel_disconnect_and_error_free_their_row_and_spare_the_others(pool):
    b = backend(pool)
    story_alone = greedy(pool, STORY, max_tokens=40)
    colors_alone = greedy(pool, "Name three colors.")

    with pool.stream(SMALL, STORY, temperature=0.0, max_tokens=40, logprobs=True) as story:
        first = next(story)  # the story is decoding now; everything below joins its batch
        # deadline: spent before its prompt could be evaluated
        late = pool.generate(SMALL, "Name three colors.", temperature=0.0, max_tokens=16, max_latency_ms=1)
        assert late.finish_reason == "deadline" and late.completion_tokens == 0
        # cancellation (the server sets the event when the client disconnects)
        cancel = threading.Event()
        stream = pool.stream(SMALL, "Name three colors.", temperature=0.0, max_tokens=16, cancel=cancel)
        got = next(stream)
        cancel.set()
        rest = "".join(stream)
        assert stream.result.finish_reason == "cancelled"
        assert stream.result.completion_tokens < colors_alone.completion_tokens
        assert colors_alone.text.startswith(got + rest)
        # the consumer fails mid-stream: closing the stream frees the row
        with pytest.raises(RuntimeError, match="consumer failed"):
            with pool.stream(SMALL, "Who wrote Hamlet?", temperature=0.0, max_tokens=16) as doomed:
                next(doomed)
                raise RuntimeError("consumer failed")
        # an error inside one request's step (a NaN temperature breaks its sampler)
        bad = GenerationRequest(messages=normalize_messages("What do bees make?"), max_tokens=8,
                                temperature=float("nan"), top_p=1.0)
        with pytest.raises(ValueError):
            drain(b.run(bad))
        # meanwhile a normal request decoded beside the story is unaffected
        colors = greedy(pool, "Name three colors.")
        assert same_answer(colors, colors_alone)
        story_text = first + "".join(story)
        assert b.peak_sequences >= 2
    assert story_text == story_alone.text and same_answer(story.result, story_alone)
    assert b.busy_sequences() == 0
    # every row is usable again: as many concurrent requests as rows, all answered as alone
    with ThreadPoolExecutor(4) as ex:
        again = list(ex.map(lambda q: greedy(pool, q), QUESTIONS[:4]))
    for q, g in zip(QUESTIONS[:4], again):
        assert same_answer(g, greedy(pool, q)), q


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
