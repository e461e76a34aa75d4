"""Slower inference tests: the 0.5B and 270M tiers (llama.cpp) and the transformers backend (CPU)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from ruvllm_lab.config import InferenceConfig, SystemConfig
from ruvllm_lab.inference import InferencePool

pytestmark = [pytest.mark.slow, pytest.mark.model]

SMALL, MID, BASE = "smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m"
FRANCE = "What is the capital of France?"


@pytest.fixture(scope="module")
def ladder_pool():
    cfg = InferenceConfig(models=[SMALL, BASE, MID], max_context=512, max_loaded_models=1, max_tokens=24)
    p = InferencePool(cfg, SystemConfig(max_memory_mb=2048))
    yield p
    p.close()


def test_half_billion_tier_knows_paris_and_streams_the_same_text(ladder_pool):
    g = ladder_pool.generate(MID, FRANCE, temperature=0.0, max_tokens=16)
    assert "Paris" in g.text and g.finish_reason == "stop"
    stream = ladder_pool.stream(MID, FRANCE, temperature=0.0, max_tokens=16)
    assert "".join(stream) == g.text == stream.result.text


def test_base_model_tier_answers_through_the_completion_frame(ladder_pool):
    g = ladder_pool.generate(BASE, FRANCE, temperature=0.0, max_tokens=16)
    assert "Paris" in g.text
    assert "Question:" not in g.text  # the frame's stop sequence ended the answer


def test_real_tiers_in_turn_and_in_parallel_keep_one_resident(ladder_pool):
    for tier in (SMALL, MID, SMALL):
        ladder_pool.generate(tier, "Hi", temperature=0.0, max_tokens=2)
        assert ladder_pool.loaded_models() == [tier]
    done, errors = [], []

    def work(tier):
        try:
            done.append(ladder_pool.generate(tier, FRANCE, temperature=0.0, max_tokens=8))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in (SMALL, MID, SMALL, MID)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads) and not errors and len(done) == 4
    assert len(ladder_pool.loaded_models()) == 1


@pytest.fixture(scope="module")
def hf_pool():
    cfg = InferenceConfig(models=[SMALL], max_context=512, backend="transformers", device="cpu", kv_cache_sessions=2)
    p = InferencePool(cfg)
    yield p
    p.close()


def test_transformers_backend_generates_streams_and_scores(hf_pool):
    g = hf_pool.generate(SMALL, FRANCE, temperature=0.0, max_tokens=16, logprobs=True)
    assert "Paris" in g.text
    assert len(g.logprobs) == g.completion_tokens and all(lp <= 0 for lp in g.logprobs)
    stream = hf_pool.stream(SMALL, FRANCE, temperature=0.0, max_tokens=16)
    assert "".join(stream) == g.text


def test_transformers_backend_reuses_a_session_prefix(hf_pool):
    turn1 = [{"role": "user", "content": "Name a fruit."}]
    first = hf_pool.generate(SMALL, turn1, temperature=0.0, max_tokens=8, session_id="s")
    turn2 = turn1 + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And a vegetable?"}]
    warm = hf_pool.generate(SMALL, turn2, temperature=0.0, max_tokens=8, session_id="s")
    cold = hf_pool.generate(SMALL, turn2, temperature=0.0, max_tokens=8)
    assert 0 < warm.prompt_tokens_evaluated < cold.prompt_tokens_evaluated == cold.prompt_tokens


def test_transformers_backend_embeds_with_mean_pooled_hidden_states(hf_pool):
    vecs = hf_pool.embed(SMALL, ["The cat sat on the mat.", "Quarterly revenue grew by 4%."])
    assert vecs.shape == (2, 576) and vecs.dtype == np.float32 and np.isfinite(vecs).all()
    assert not np.allclose(vecs[0], vecs[1], atol=1e-2)
    assert hf_pool.count_tokens(SMALL, "hello world") > 0
