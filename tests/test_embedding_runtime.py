"""The ONNX Runtime MiniLM gives the same vectors as sentence-transformers/torch (real weights, real texts).

Equality is what makes the runtime a free choice: the relevance threshold in configs/calibration/ was
calibrated on one runtime's vectors and is used with the other's.  Speed is measured by
benches/embedding.py, not here.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from ruvllm_lab.config import Config, EmbeddingConfig
from ruvllm_lab.embedding import (EmbeddingService, _OnnxMiniLMBackend, export_minilm_onnx, minilm_onnx_path,
                                  minilm_source, quantize_minilm_onnx)
from ruvllm_lab.errors import ConfigError
from ruvllm_lab.relevance import calibrate, cosines, gate_scores, load_memory_eval, question_pairs

ROOT = Path(__file__).resolve().parents[1]


def _real_texts() -> list[str]:
    """Questions and answers of the corpus, plus what tokenisation finds hard: accents, CJK, symbols, a text
    past MiniLM's 256-token window (both runtimes must truncate it the same way), one word."""
    rows = [json.loads(line) for line in (ROOT / "data/knowledge.jsonl").read_text().splitlines() if line.strip()]
    texts = [r["question"] for r in rows[:60]] + [str(r["answer"]) for r in rows[:20]]
    long = " ".join(r["question"] for r in rows[:40])  # ~400 word pieces
    return texts + [long, "Dostoyevsky wrote « Crime and Punishment » in 1866 — naïve café façade.",
                    "東京は日本の首都です。", "x = 3 * (4 + 5) / 2; print(f'{x:.2f}')  # 13.50", "Paris"]


@pytest.fixture(scope="module")
def runtimes() -> tuple[EmbeddingService, EmbeddingService]:
    onnx = EmbeddingService(EmbeddingConfig(runtime="onnx", cache_size=0))
    torch = EmbeddingService(EmbeddingConfig(runtime="torch", cache_size=0))
    return onnx, torch


def test_onnx_is_the_default_runtime_and_the_profiles_use_it(runtimes):
    assert EmbeddingConfig().runtime == "onnx"
    for profile in ("server-cpu", "server-gpu"):
        assert Config.load(ROOT / f"configs/{profile}.toml").embedding.runtime == "onnx"
    assert Config.load(ROOT / "configs/edge.toml").embedding.runtime == "onnx-int8"  # latency first (issue 15)
    onnx, torch = runtimes
    onnx.embed_one("load")
    torch.embed_one("load")
    assert isinstance(onnx._backend, _OnnxMiniLMBackend) and not isinstance(torch._backend, _OnnxMiniLMBackend)


def test_an_unknown_runtime_is_rejected_with_the_key_named():
    with pytest.raises(ConfigError, match="embedding.runtime"):
        Config.load(ROOT / "configs/edge.toml", overrides={"embedding.runtime": "tensorrt"})


def test_onnx_and_torch_vectors_are_equal_on_real_texts(runtimes):
    onnx, torch = runtimes
    texts = _real_texts()
    a, b = onnx.embed(texts), torch.embed(texts)  # one padded batch each
    cos = np.sum(a * b, axis=1)
    assert cos.min() >= 0.9999, f"lowest cosine {cos.min():.6f} for {texts[int(cos.argmin())]!r}"
    assert np.abs(a - b).max() < 1e-5


def test_single_queries_equal_the_padded_batch(runtimes):
    """Padding to the longest text must not leak into a shorter text's vector."""
    onnx, _ = runtimes
    texts = _real_texts()[:12]
    batch = onnx.embed(texts)
    one_by_one = np.stack([onnx.embed_one(t) for t in texts])
    assert np.abs(batch - one_by_one).max() < 1e-5


def test_token_counts_agree(runtimes):
    onnx, torch = runtimes
    for text in _real_texts():
        assert onnx.count_tokens(text) == torch.count_tokens(text)


def test_relevance_calibration_and_gate_decisions_are_the_same_on_both_runtimes(runtimes):
    """`ruvllm calibrate-relevance` semantics: the calib split's threshold, and every pair's side of it."""
    onnx, torch = runtimes
    cal_onnx, cal_torch = calibrate(onnx.embed), calibrate(torch.embed)
    assert cal_onnx["threshold"] == pytest.approx(cal_torch["threshold"], abs=1e-5)
    assert cal_onnx["false_positive_rate"] == cal_torch["false_positive_rate"]
    assert cal_onnx["recall"] == cal_torch["recall"]
    stored = json.loads((ROOT / "configs/calibration/all-minilm-l6-v2-384.json").read_text())
    assert cal_onnx["threshold"] == pytest.approx(stored["threshold"], abs=1e-4)
    pairs = question_pairs(load_memory_eval())  # every split
    c_onnx, c_torch = cosines(onnx.embed, pairs), cosines(torch.embed, pairs)
    assert np.abs(c_onnx - c_torch).max() < 1e-5
    threshold = Config.load(ROOT / "configs/server-cpu.toml").retrieval.relevance_threshold
    near = np.abs(c_torch - threshold) < 1e-5  # a tie within float noise could go either way
    assert np.array_equal((c_onnx >= threshold)[~near], (c_torch >= threshold)[~near])


def test_int8_vectors_are_close_to_fp32_and_the_gate_decides_alike(runtimes):
    """onnx-int8 is not exact: its vectors are near fp32's, it has its own calibration (the one the edge
    profile uses), and the relevance gate admits the same question pairs but for a handful."""
    onnx, _ = runtimes
    int8 = EmbeddingService(EmbeddingConfig(runtime="onnx-int8", cache_size=0))
    texts = _real_texts()
    a, b = onnx.embed(texts), int8.embed(texts)
    assert np.sum(a * b, axis=1).min() >= 0.98
    assert np.array_equal(b[:5], np.stack([int8.embed_one(t) for t in texts[:5]]))  # a batch is one text per call
    cal = calibrate(int8.embed)
    stored = json.loads((ROOT / "configs/calibration/all-minilm-l6-v2-int8-384.json").read_text())
    assert cal["threshold"] == pytest.approx(stored["threshold"], abs=1e-4)
    edge = Config.load(ROOT / "configs/edge.toml").retrieval
    assert edge.relevance_threshold == pytest.approx(stored["threshold"], abs=1e-4)
    assert edge.calibration == "configs/calibration/all-minilm-l6-v2-int8-384.json"
    pairs = question_pairs(load_memory_eval(split="eval"))
    c_fp32, c_int8 = cosines(onnx.embed, pairs), cosines(int8.embed, pairs)
    flips = (c_fp32 >= edge.relevance_threshold) != (c_int8 >= edge.relevance_threshold)
    assert flips.mean() <= 0.01
    g_fp32, g_int8 = (gate_scores(c, pairs, edge.relevance_threshold, edge.match_key_terms) for c in (c_fp32, c_int8))
    assert abs(g_fp32["recall"] - g_int8["recall"]) <= 0.02
    assert abs(g_fp32["false_positive_rate"] - g_int8["false_positive_rate"]) <= 0.002


def test_the_export_is_cached_reused_and_redone_when_the_weights_change(tmp_path, monkeypatch):
    """A private copy of the package directory and model dir: touching the weights gives a new export."""
    source = tmp_path / "minilm"
    shutil.copytree(minilm_source(), source)
    monkeypatch.setenv("RUVLLM_MODEL_DIR", str(tmp_path / "models"))
    first = export_minilm_onnx(source)
    assert first == minilm_onnx_path(source) and first.is_file()
    assert first.resolve().is_relative_to((tmp_path / "models").resolve())  # never the source tree
    stamp = first.stat().st_mtime_ns
    assert export_minilm_onnx(source) == first and first.stat().st_mtime_ns == stamp  # reused, not rewritten
    quantised = quantize_minilm_onnx(source)
    assert quantised.parent == first.parent and quantised.is_file()
    assert export_minilm_onnx(source) == first and quantised.exists()  # its own int8 file is not stale
    weights = source / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # "a new version of the package"
    second = export_minilm_onnx(source)
    assert second != first and second.is_file() and not first.exists()  # the stale export is removed
    assert not quantised.exists()  # with its int8 version
    assert not list(second.parent.glob(".*.tmp"))  # nothing half-written is left
