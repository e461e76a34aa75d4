"""The batching contract every ScheduledBackend keeps, checked on a real pool of the 135M model.

Used by test_batching.py (llama.cpp) and test_transformers_batching.py (transformers): the same
checks, with each backend's own token budgets.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from ruvllm_lab.inference.base import GenerationRequest, drain
from ruvllm_lab.inference.prompts import normalize_messages

SMALL = "smollm2-135m"
STORY = "Write a long story about a dragon who learns to cook."


def backend(pool):
    pool.generate(SMALL, "Hi", temperature=0.0, max_tokens=1)  # loaded
    return pool._resident[SMALL]


def greedy(pool, prompt, max_tokens: int, **kw):
    return pool.generate(SMALL, prompt, temperature=0.0, max_tokens=max_tokens, logprobs=True, **kw)


def same_answer(a, b) -> bool:
    return (a.text, a.completion_tokens, a.finish_reason) == (b.text, b.completion_tokens, b.finish_reason)


def check_batched_answers_equal_unbatched_ones(pool, questions: list[str], max_tokens: int) -> None:
    """More requests than sequences, prompts of different lengths: some join while others decode."""
    b = backend(pool)
    assert b.batches
    alone = [greedy(pool, q, max_tokens) for q in questions]  # one at a time: every step holds one sequence
    peak_before = b.peak_sequences
    with ThreadPoolExecutor(len(questions)) as ex:
        together = list(ex.map(lambda q: greedy(pool, q, max_tokens), questions))
    assert peak_before == 1 and b.peak_sequences >= 2, "the concurrent requests were never decoded in one batch"
    for q, a, t in zip(questions, alone, together):
        assert same_answer(a, t), (q, a.text, t.text)
        assert len(t.logprobs) == t.completion_tokens
        assert t.logprobs == pytest.approx(a.logprobs, abs=1e-3)
    assert b.busy_sequences() == 0


def check_early_ends_free_their_sequence_and_spare_the_others(pool, questions: list[str], story_tokens: int,
                                                              max_tokens: int) -> None:
    """Deadline, cancel (client gone), a failing consumer and an error inside one request's step each
    free that request's sequence; the story decoded beside them is unchanged."""
    b = backend(pool)
    story_alone = greedy(pool, STORY, story_tokens)
    colors_alone = greedy(pool, "Name three colors.", max_tokens)

    with pool.stream(SMALL, STORY, temperature=0.0, max_tokens=story_tokens, logprobs=True) as story:
        first = next(story)  # the story is decoding now; everything below joins its batch
        # deadline: spent before its prompt could be evaluated
        late = pool.generate(SMALL, "Name three colors.", temperature=0.0, max_tokens=max_tokens, max_latency_ms=1)
        assert late.finish_reason == "deadline" and late.completion_tokens == 0
        # cancellation (the server sets the event when the client disconnects)
        cancel = threading.Event()
        stream = pool.stream(SMALL, "Name three colors.", temperature=0.0, max_tokens=max_tokens, cancel=cancel)
        got = next(stream)
        cancel.set()
        rest = "".join(stream)
        assert stream.result.finish_reason == "cancelled"
        assert stream.result.completion_tokens < colors_alone.completion_tokens
        assert colors_alone.text.startswith(got + rest)
        # the consumer fails mid-stream: closing the stream frees the sequence
        with pytest.raises(RuntimeError, match="consumer failed"):
            with pool.stream(SMALL, "Who wrote Hamlet?", temperature=0.0, max_tokens=max_tokens) as doomed:
                next(doomed)
                raise RuntimeError("consumer failed")
        # an error inside one request's step (a NaN temperature breaks its sampler)
        bad = GenerationRequest(messages=normalize_messages("What do bees make?"), max_tokens=8,
                                temperature=float("nan"), top_p=1.0)
        with pytest.raises(ValueError):
            drain(b.run(bad))
        # meanwhile a normal request decoded beside the story is unaffected
        colors = greedy(pool, "Name three colors.", max_tokens)
        assert same_answer(colors, colors_alone)
        story_text = first + "".join(story)
        assert b.peak_sequences >= 2
    assert story_text == story_alone.text and same_answer(story.result, story_alone)
    assert b.busy_sequences() == 0
    # every sequence is usable again: as many concurrent requests as sequences, all answered as alone
    with ThreadPoolExecutor(4) as ex:
        again = list(ex.map(lambda q: greedy(pool, q, max_tokens), questions[:4]))
    for q, g in zip(questions[:4], again):
        assert same_answer(g, greedy(pool, q, max_tokens)), q
