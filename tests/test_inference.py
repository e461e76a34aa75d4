"""Inference pool on the real 135M model (llama.cpp).  One module-scoped pool keeps this fast.

The second "tier" is the same GGUF reached through a symlink: a distinct tier name, so a
real second model load, without paying for a larger model in the default suite (the 0.5B
and transformers runs live in test_inference_slow.py).
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from ruvllm_lab import models
from ruvllm_lab.config import InferenceConfig, SystemConfig
from ruvllm_lab.errors import ContextOverflow, ModelLoadError, ModelNotFound
from ruvllm_lab.inference import Generation, InferencePool
from ruvllm_lab.inference.base import TextAssembler, fit_prompt, sample_token, token_logprob, top_k_indices
from ruvllm_lab.inference.pool import FairLock
from ruvllm_lab.inference.prompts import COMPLETION_STOP, build_prompt, normalize_messages, render_completion

SMALL = "smollm2-135m"
FRANCE = "What is the capital of France?"


@pytest.fixture(scope="module")
def twin_tier(tmp_path_factory) -> str:
    """A second tier name for the 135M weights (a symlinked .gguf path)."""
    link = tmp_path_factory.mktemp("twin") / "smollm2-twin.gguf"
    link.symlink_to(models.model_path(SMALL))
    return str(link)


@pytest.fixture(scope="module")
def pool(twin_tier):
    cfg = InferenceConfig(models=[SMALL, twin_tier], max_context=512, max_loaded_models=1, kv_cache_sessions=4,
                          max_tokens=32)
    p = InferencePool(cfg, SystemConfig(max_memory_mb=1024))
    yield p
    p.close()


# ---- pure helpers (no model) ------------------------------------------------------------------

def test_completion_prompt_frames_a_conversation_as_question_answer():
    msgs = normalize_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                               {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}])
    assert render_completion(msgs) == "Be brief.\n\nQuestion: 2+2?\nAnswer: 4\nQuestion: 3+3?\nAnswer:"
    text, stop = build_prompt(normalize_messages("hi"), "completion", None)
    assert text == "Question: hi\nAnswer:" and stop == COMPLETION_STOP


@pytest.mark.parametrize("bad", ["", "   ", [], [{"role": "robot", "content": "x"}], [{"content": "x"}], 42])
def test_bad_prompts_are_rejected(bad):
    with pytest.raises(ValueError):
        normalize_messages(bad)


def test_text_assembler_never_leaks_a_stop_sequence_and_chunks_add_up():
    asm = TextAssembler(["\nQuestion:"])
    chunks = [asm.feed(p) for p in [b" Paris", b".", b"\n", b"Quest", b"ion:", b" more"]]
    chunks.append(asm.finish())
    assert asm.stopped and asm.text == "Paris." and "".join(chunks) == "Paris."


def test_text_assembler_holds_back_a_split_utf8_character():
    asm = TextAssembler([])
    euro = "€".encode()
    first = asm.feed(euro[:2])
    rest = asm.feed(euro[2:]) + asm.finish()
    assert first == "" and first + rest == "€"


def test_fit_prompt_left_truncates_or_raises():
    tokens = list(range(100))
    kept, truncated = fit_prompt(tokens, n_ctx=64, max_tokens=16, on_overflow="truncate", keep_first=True)
    assert truncated and len(kept) == 48 and kept[0] == 0 and kept[-1] == 99
    same, truncated = fit_prompt(tokens[:40], n_ctx=64, max_tokens=16, on_overflow="truncate")
    assert not truncated and same == tokens[:40]
    with pytest.raises(ContextOverflow, match="max_context=64"):
        fit_prompt(tokens, n_ctx=64, max_tokens=16, on_overflow="error")


def test_sampling_is_greedy_at_temperature_zero_and_logprob_is_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=50).astype(np.float32)
    assert sample_token(logits, 0.0, 1.0, rng) == int(np.argmax(logits))
    draws = {sample_token(logits, 1.0, 0.9, rng) for _ in range(200)}
    assert len(draws) > 1
    p = np.exp(logits - logits.max())
    p /= p.sum()
    assert token_logprob(logits, 3) == pytest.approx(np.log(p[3]), abs=1e-5)


@pytest.mark.parametrize("n, k", [(49152, 40), (151936, 40), (262144, 1), (1000, 100), (130, 40), (50, 40), (40, 40)])
def test_top_k_indices_are_the_k_largest_logits_even_with_ties(n, k):
    rng = np.random.default_rng(n + k)
    for trial in range(10):
        logits = (rng.standard_normal(n) * 3).astype(np.float32)
        if trial % 2:
            logits = np.round(logits, 1)  # many ties, also at the k-th value
        got = top_k_indices(logits, k)
        assert len(set(got.tolist())) == k
        assert np.array_equal(np.sort(logits[got]), np.sort(logits)[n - k:])


def test_sampling_at_denormal_temperature_and_top_p_is_greedy_not_nan():
    """Found by fuzzing the HTTP API: temperature = top_p = 5e-324 made every probability NaN."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=50).astype(np.float32)
    for t, top_p in [(5e-324, 5e-324), (1e-300, 1.0), (5e-324, 0.9)]:
        assert sample_token(logits, t, top_p, rng) == int(np.argmax(logits))


def test_fair_lock_serves_waiters_in_arrival_order():
    lock, order = FairLock(), []
    assert lock.acquire()
    threads = []
    for i in range(4):
        t = threading.Thread(target=lambda i=i: (lock.acquire(), order.append(i), lock.release()))
        t.start()
        threads.append(t)
        while len(lock._queue) < i + 1:  # wait until thread i is queued
            threading.Event().wait(0.001)
    lock.release()
    for t in threads:
        t.join(5)
    assert order == [0, 1, 2, 3]


# ---- real model ----------------------------------------------------------------------------------

def test_capital_of_france_is_paris(pool):
    g = pool.generate(SMALL, FRANCE, temperature=0.0, max_tokens=16)
    assert isinstance(g, Generation) and g.tier == SMALL
    assert "Paris" in g.text
    assert g.finish_reason == "stop" and 0 < g.completion_tokens <= 16
    assert 0 < g.prompt_tokens_evaluated <= g.prompt_tokens and not g.truncated
    assert g.latency_ms >= g.ttft_ms > 0


def test_stream_concatenates_to_the_non_streamed_text(pool):
    g = pool.generate(SMALL, "Name three colors.", temperature=0.0, max_tokens=24)
    stream = pool.stream(SMALL, "Name three colors.", temperature=0.0, max_tokens=24)
    chunks = list(stream)
    assert len(chunks) > 1
    assert "".join(chunks) == g.text == stream.result.text
    assert stream.result.completion_tokens == g.completion_tokens


def test_logprobs_align_with_completion_tokens(pool):
    g = pool.generate(SMALL, FRANCE, temperature=0.0, max_tokens=8, logprobs=True)
    assert len(g.logprobs) == g.completion_tokens > 0
    assert all(lp <= 0.0 for lp in g.logprobs)
    assert pool.generate(SMALL, FRANCE, temperature=0.0, max_tokens=8).logprobs is None


def test_stop_sequence_ends_the_answer_before_it(pool):
    g = pool.generate(SMALL, FRANCE, temperature=0.0, max_tokens=16, stop=["Paris"])
    assert "Paris" not in g.text and g.finish_reason == "stop"


def test_max_tokens_gives_finish_reason_length(pool):
    g = pool.generate(SMALL, "Write a long story about a dragon.", temperature=0.0, max_tokens=5)
    assert g.finish_reason == "length" and g.completion_tokens == 5


def test_one_ms_deadline_returns_with_finish_reason_deadline(pool):
    free = pool.generate(SMALL, "Write a long story about a dragon.", temperature=0.0, max_tokens=48)
    g = pool.generate(SMALL, "Write a long story about a dragon.", temperature=0.0, max_tokens=48, max_latency_ms=1)
    assert g.finish_reason == "deadline"
    assert g.completion_tokens < free.completion_tokens


def test_second_session_turn_evaluates_fewer_prompt_tokens_than_cold(pool):
    turn1 = [{"role": "user", "content": "Name a fruit."}]
    first = pool.generate(SMALL, turn1, temperature=0.0, max_tokens=12, session_id="s1")
    turn2 = turn1 + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And a vegetable?"}]
    pool.generate(SMALL, FRANCE, temperature=0.0, max_tokens=4, session_id="other")  # another session takes the context
    warm = pool.generate(SMALL, turn2, temperature=0.0, max_tokens=12, session_id="s1")
    cold = pool.generate(SMALL, turn2, temperature=0.0, max_tokens=12)
    assert warm.prompt_tokens == cold.prompt_tokens
    # a request without a session still reuses a cached prefix of the shared chat template, no more
    assert cold.prompt_tokens_evaluated <= cold.prompt_tokens
    assert 0 < warm.prompt_tokens_evaluated < cold.prompt_tokens_evaluated


def test_long_prompt_is_left_truncated_and_flagged(pool):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 80 + FRANCE
    g = pool.generate(SMALL, long_prompt, temperature=0.0, max_tokens=8)
    assert g.truncated and g.prompt_tokens <= 512 - 8


def test_context_overflow_error_when_configured():
    with InferencePool(InferenceConfig(models=[SMALL], max_context=128, on_context_overflow="error")) as p:
        with pytest.raises(ContextOverflow, match="max_context=128"):
            p.generate(SMALL, "word " * 300, max_tokens=8)


def test_unknown_tier_names_the_known_tiers(pool):
    with pytest.raises(ModelNotFound, match=SMALL):
        pool.generate("no-such-model", FRANCE)


def test_truncated_gguf_gives_a_clear_error_and_the_pool_keeps_serving(pool, tmp_path):
    src = models.model_path(SMALL)
    broken = tmp_path / "truncated.gguf"
    with src.open("rb") as f:
        broken.write_bytes(f.read(src.stat().st_size - 4096))
    with pytest.raises(ModelLoadError, match="truncated.gguf"):
        pool.generate(str(broken), FRANCE, max_tokens=4)
    assert "Paris" in pool.generate(SMALL, FRANCE, temperature=0.0, max_tokens=16).text


def test_two_tiers_in_turn_leave_exactly_one_resident(pool, twin_tier):
    pool.generate(SMALL, "Hi", temperature=0.0, max_tokens=2)
    assert pool.loaded_models() == [SMALL]
    pool.generate(twin_tier, "Hi", temperature=0.0, max_tokens=2)
    assert pool.loaded_models() == [twin_tier]
    pool.generate(SMALL, "Hi", temperature=0.0, max_tokens=2)
    assert pool.loaded_models() == [SMALL]


def test_two_threads_on_two_tiers_at_the_limit_both_finish(pool, twin_tier):
    results, errors = {}, []

    def work(tier):
        try:
            results[tier] = [pool.generate(tier, FRANCE, temperature=0.0, max_tokens=8) for _ in range(2)]
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in (SMALL, twin_tier)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads) and not errors
    assert all(len(r) == 2 and r[0].text for r in results.values()) and len(results) == 2
    assert len(pool.loaded_models()) == 1


def test_embed_and_count_tokens(pool):
    vecs = pool.embed(SMALL, ["The cat sat on the mat.", "Quarterly revenue grew by 4%.", "The cat sat on the mat."])
    assert vecs.shape == (3, 576) and vecs.dtype == np.float32
    assert np.allclose(vecs[0], vecs[2], atol=1e-4) and not np.allclose(vecs[0], vecs[1], atol=1e-2)
    short, long = pool.count_tokens(SMALL, "hello"), pool.count_tokens(SMALL, "hello " * 20)
    assert 0 < short < long and pool.count_tokens(SMALL, "") == 0


def test_health_check_reports_a_probe(pool):
    h = pool.health_check()
    assert h["healthy"] and h["latency_ms"] > 0
    assert h["loaded_models"] and h["available_memory_mb"] > 0
