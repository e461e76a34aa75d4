"""EmbeddingService with the real all-MiniLM-L6-v2 (offline package) and, when available, a real LLM tier."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from ruvllm_lab.config import EmbeddingConfig, InferenceConfig
from ruvllm_lab.embedding import (EmbeddingService, _smallest_tier, fit_pca, l2_normalise,
                                  orthogonal_projection)
from ruvllm_lab.errors import ConfigError, DimensionMismatch

CAT = "The cat sat on the mat."
KITTEN = "A kitten is resting on a rug."
REVENUE = "Quarterly revenue grew by five percent."


@pytest.fixture(scope="module")
def emb() -> EmbeddingService:
    return EmbeddingService(EmbeddingConfig())


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b)


# ---- output contract ------------------------------------------------------------------
def test_shape_dtype_and_unit_norm(emb):
    v = emb.embed([CAT, KITTEN, REVENUE])
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert emb.dimension == 384 and emb.native_dimension == 384 and emb.projection_kind == "identity"


def test_embed_one_matches_batch_row(emb):
    np.testing.assert_allclose(emb.embed_one(KITTEN), emb.embed([CAT, KITTEN])[1], atol=1e-6)


def test_empty_list_gives_empty_matrix(emb):
    assert emb.embed([]).shape == (0, 384)


@pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
def test_empty_text_is_value_error(emb, bad):
    with pytest.raises(ValueError, match="empty"):
        emb.embed([CAT, bad])
    with pytest.raises(ValueError):
        emb.embed_one(bad)


def test_wrong_types_are_type_errors(emb):
    with pytest.raises(TypeError, match="list of strings"):
        emb.embed(CAT)
    with pytest.raises(TypeError):
        emb.embed([CAT, 3])
    with pytest.raises(TypeError):
        emb.embed_one(None)


# ---- semantics ------------------------------------------------------------------------
@pytest.mark.parametrize("anchor,close,far", [
    (CAT, KITTEN, REVENUE),
    ("How do I reverse a list in Python?", "Python: invert the order of a list", "The weather in Paris is sunny today."),
    ("The patient was given antibiotics for the infection.", "Doctors treated the bacterial infection with medicine.",
     "The stock market closed higher on Friday."),
    ("Photosynthesis converts sunlight into chemical energy.", "Plants turn light into energy through photosynthesis.",
     "He scored a goal in the final minute of the match."),
])
def test_close_sentences_rank_above_unrelated(emb, anchor, close, far):
    a, c, f = emb.embed([anchor, close, far])
    assert _cos(a, c) > _cos(a, f) + 0.2


def test_nearest_neighbour_retrieval_over_a_small_corpus(emb):
    corpus = [KITTEN, REVENUE, "Python lists can be sorted with sorted().", "The train to Berlin is delayed.",
              "Vaccines train the immune system."]
    q = emb.embed_one("a small cat lying on a carpet")
    scores = emb.embed(corpus) @ q
    assert int(np.argmax(scores)) == 0


# ---- cache and batching ---------------------------------------------------------------
def test_cache_counts_hits_and_misses():
    e = EmbeddingService(EmbeddingConfig(cache_size=100))
    e.embed([CAT, KITTEN])
    assert e.cache_info()["misses"] == 2 and e.cache_info()["hits"] == 0
    e.embed([CAT])
    e.embed_one(KITTEN)
    info = e.cache_info()
    assert info["hits"] == 2 and info["misses"] == 2 and info["size"] == 2


def test_cache_is_lru_and_bounded():
    e = EmbeddingService(EmbeddingConfig(cache_size=2))
    e.embed(["one", "two"])
    e.embed(["one"])  # "one" becomes most recent
    e.embed(["three"])  # evicts "two"
    assert e.cache_info()["size"] == 2
    before = e.cache_info()["misses"]
    e.embed(["one"])
    assert e.cache_info()["misses"] == before  # still cached
    e.embed(["two"])
    assert e.cache_info()["misses"] == before + 1  # was evicted


def test_a_one_off_text_reads_the_cache_without_filling_it():
    e = EmbeddingService(EmbeddingConfig(cache_size=100))
    once = e.embed_one(CAT, remember=False)
    e.embed_one(CAT, remember=False)
    assert e.cache_info()["size"] == 0 and e.cache_info()["misses"] == 2
    e.embed_one(KITTEN)  # remembered
    np.testing.assert_allclose(e.embed_one(KITTEN, remember=False), e.embed_one(KITTEN))
    assert e.cache_info()["hits"] == 2 and e.cache_info()["size"] == 1
    np.testing.assert_allclose(once, e.embed([CAT])[0], atol=1e-6)


def test_cache_disabled_with_size_zero():
    e = EmbeddingService(EmbeddingConfig(cache_size=0))
    a = e.embed([CAT])
    b = e.embed([CAT])
    assert e.cache_info()["size"] == 0 and e.cache_info()["hits"] == 0
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_cached_vector_is_not_aliased(emb):
    v = emb.embed(["aliasing check"])
    v[:] = 0
    assert np.linalg.norm(emb.embed(["aliasing check"])[0]) == pytest.approx(1.0, abs=1e-5)


def test_duplicates_in_one_call_are_encoded_once():
    e = EmbeddingService(EmbeddingConfig(cache_size=100))
    v = e.embed([CAT, CAT, KITTEN, CAT])
    assert e.cache_info()["misses"] == 2
    np.testing.assert_array_equal(v[0], v[3])


def test_backend_called_in_batches_of_batch_size():
    e = EmbeddingService(EmbeddingConfig(batch_size=2, cache_size=0))
    backend = e._get_backend()
    calls: list[int] = []
    real_encode = backend.encode
    backend.encode = lambda texts: (calls.append(len(texts)), real_encode(texts))[1]
    texts = [f"sentence number {i} about topic {i % 3}" for i in range(5)]
    batched = e.embed(texts)
    assert calls == [2, 2, 1]
    unbatched = EmbeddingService(EmbeddingConfig(batch_size=8, cache_size=0)).embed(texts)
    np.testing.assert_allclose(batched, unbatched, atol=1e-5)


def test_concurrent_embedding_is_consistent(emb):
    texts = [f"thread text {i}" for i in range(8)]
    expected = EmbeddingService(EmbeddingConfig(cache_size=0)).embed(texts)
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        results[i] = emb.embed([texts[i]])[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        np.testing.assert_allclose(results[i], expected[i], atol=1e-5)


# ---- tokens ---------------------------------------------------------------------------
def test_count_tokens(emb):
    assert emb.count_tokens("") == 0
    short, long_ = emb.count_tokens("hello world"), emb.count_tokens("hello world " * 10)
    assert short == 2 and long_ == 20
    assert emb.count_tokens("antidisestablishmentarianism") > 1  # word pieces, not words


# ---- projection -----------------------------------------------------------------------
def test_orthogonal_projection_is_orthonormal_and_deterministic():
    p = orthogonal_projection(384, 128)
    np.testing.assert_allclose(p.T @ p, np.eye(128), atol=1e-5)
    q = orthogonal_projection(384, 768)
    np.testing.assert_allclose(q @ q.T, np.eye(384), atol=1e-5)
    np.testing.assert_array_equal(p, orthogonal_projection(384, 128))
    assert not np.allclose(p, orthogonal_projection(384, 128, seed=1))


def test_projection_down_keeps_unit_norm_and_semantics():
    e = EmbeddingService(EmbeddingConfig(dimension=128))
    v = e.embed([CAT, KITTEN, REVENUE])
    assert v.shape == (3, 128) and e.projection_kind == "orthogonal"
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2]


def test_projection_up_is_an_isometry(emb):
    e = EmbeddingService(EmbeddingConfig(dimension=512))
    up = e.embed([CAT, KITTEN, REVENUE])
    native = emb.embed([CAT, KITTEN, REVENUE])
    assert up.shape == (3, 512)
    np.testing.assert_allclose(up @ up.T, native @ native.T, atol=1e-5)


def test_pca_projection_fit():
    e = EmbeddingService(EmbeddingConfig(dimension=8, projection="pca"))
    assert e.fit_projection([CAT, KITTEN]) == "orthogonal"  # fewer texts than dimensions: not fitted
    corpus = [f"{subject} {verb} the {obj}." for subject in ("The dog", "A scientist", "My aunt")
              for verb in ("likes", "studies", "paints") for obj in ("river", "market", "theory")]
    assert e.fit_projection(corpus) == "pca"
    v = e.embed([CAT, KITTEN, REVENUE])
    assert v.shape == (3, 8)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    state = e.projection_state()
    other = EmbeddingService(EmbeddingConfig(dimension=8, projection="pca"))
    other.load_projection_state(state)
    np.testing.assert_allclose(other.embed([CAT]), e.embed([CAT]), atol=1e-5)


def test_fit_pca_recovers_the_dominant_direction():
    rng = np.random.default_rng(0)
    direction = l2_normalise(rng.standard_normal(16))
    x = rng.standard_normal((500, 1)) * 10 * direction + rng.standard_normal((500, 16)) * 0.1
    mean, comps = fit_pca(x, 3)
    assert comps.shape == (16, 3) and mean.shape == (16,)
    np.testing.assert_allclose(comps.T @ comps, np.eye(3), atol=1e-5)
    assert abs(float(comps[:, 0] @ direction)) > 0.99


def test_load_projection_state_checks_shape():
    e = EmbeddingService(EmbeddingConfig(dimension=64))
    with pytest.raises(DimensionMismatch, match="64"):
        e.load_projection_state({"projection": np.zeros((384, 32), np.float32), "pca_mean": None})


def test_l2_normalise_handles_zero_rows():
    out = l2_normalise(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])


# ---- llm-encoder ----------------------------------------------------------------------
def test_llm_encoder_needs_a_pool():
    with pytest.raises(ConfigError, match="inference pool"):
        EmbeddingService(EmbeddingConfig(model="llm-encoder"))


def test_smallest_tier_of_the_ladder():
    class Ladder:  # the attribute an InferencePool exposes
        tiers = ["qwen2.5-coder-0.5b", "smollm2-135m", "gemma3-270m"]
    assert _smallest_tier(Ladder()) == "smollm2-135m"
    with pytest.raises(ConfigError, match="encoder_tier"):
        _smallest_tier(object())


@pytest.mark.slow
@pytest.mark.model
def test_llm_encoder_backend_with_the_real_pool():
    pool_mod = pytest.importorskip("ruvllm_lab.inference.pool")
    pool = pool_mod.InferencePool(InferenceConfig(models=["smollm2-135m"], n_threads=2))
    try:
        e = EmbeddingService(EmbeddingConfig(model="llm-encoder", dimension=256, batch_size=2), pool=pool)
        assert e.backend_name == "llm-encoder:smollm2-135m"
        v = e.embed([CAT, KITTEN, REVENUE])
        assert v.shape == (3, 256) and e.projection_kind == "orthogonal"  # 576-d hidden -> 256
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
        assert v[0] @ v[1] > v[0] @ v[2]
        assert e.count_tokens("hello world") >= 2
    finally:
        pool.close()
