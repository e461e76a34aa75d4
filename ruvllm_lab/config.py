"""Typed configuration: one dataclass per component, TOML profiles, dotted overrides.

A profile is a TOML file with one table per section (``[system]``, ``[embedding]``,
``[memory]``, ``[router]``, ``[attention]``, ``[inference]``, ``[learning]``,
``[compression]``, ``[server]``).  Every section is optional; missing keys keep the
dataclass default.  Validation collects *every* problem before raising, so a
researcher fixes a config in one pass::

    cfg = Config.load("configs/edge.toml", overrides={"router.hidden_dim": 32})
    cfg = Config.load("configs/edge.toml", overrides=["router.hidden_dim=32"])
    cfg = Config.builder().db_path("./memory.db").models(["smollm2-135m"]).build()

Field constraints live in the field metadata (``choices``, ``min``, ``max``) so the
error message can say what is allowed.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import tomli_w

from .errors import ConfigError


def _f(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
       choices: Iterable[Any] | None = None, min: float | None = None, max: float | None = None,
       doc: str = "") -> Any:
    """A dataclass field whose metadata carries its validation rule and doc."""
    meta = {"choices": tuple(choices) if choices is not None else None, "min": min, "max": max, "doc": doc}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class SystemConfig:
    device_class: str = _f("edge", choices=("edge", "server", "gpu"))
    max_memory_mb: int = _f(2048, min=64, doc="memory budget for loaded models (MB)")
    max_concurrent_requests: int = _f(2, min=1)
    torch_threads: int = _f(1, min=0, doc="intra-op threads of torch in a RuvLLM process: router, graph attention, "
                                          "learning cycles (0 = torch's default, one per core).  More than 1 sets "
                                          "torch's OpenMP team against llama.cpp's decode threads: on 2 cores one "
                                          "2-thread torch call left every later decode step 40-90 % slower "
                                          "(benches/decode_interference.py)")
    data_dir: str = _f("data/runtime", doc="router weights, EWC state, replay buffer live here")
    cache_dir: str = _f("~/.cache/ruvllm_lab", doc="experiment caches (the routing outcome matrix under "
                                                   "outcomes/), outside the source tree; '~' is expanded")
    seed: int = _f(0, min=0)
    log_level: str = _f("info", choices=("debug", "info", "warning", "error"))
    max_sessions: int = _f(10_000, min=1, doc="sessions kept; the least recently used are forgotten beyond this")
    feedback_window: int = _f(10_000, min=1, doc="answered requests that feedback can still reach (request log)")
    request_log_cache_kb: int = _f(256, min=16, doc="SQLite page cache of the request log (KiB): it is appended to and "
                                                    "read back by request id, so a small cache suffices; the OS caches "
                                                    "the file")
    backup_key_env: str = _f("RUVLLM_BACKUP_KEY", doc="env var holding the HMAC-SHA256 key that signs backup "
                                                      "manifests; when set, restore refuses unsigned backups")


@dataclass
class EmbeddingConfig:
    model: str = _f("all-minilm-l6-v2", choices=("all-minilm-l6-v2", "llm-encoder"),
                    doc="sentence-transformers MiniLM, or mean-pooled hidden states of an LLM tier")
    encoder_tier: str = _f("", doc="tier for model='llm-encoder' (default: smallest in inference.models)")
    dimension: int = _f(384, min=8, max=8192)
    batch_size: int = _f(1, min=1)
    projection: str = _f("orthogonal", choices=("orthogonal", "pca"),
                         doc="how a backend vector is mapped to `dimension` when sizes differ")
    cache_size: int = _f(10_000, min=0)
    threads: int = _f(1, min=0, doc="intra-op threads of the MiniLM encoder (onnx: per session; torch: process-wide); 1 "
                                    "leaves the other cores to llama.cpp's decode steps, which run at the same time; "
                                    "0 = the runtime's default")
    runtime: str = _f("onnx", choices=("onnx", "onnx-int8", "torch"),
                      doc="MiniLM runtime: 'onnx' = the same weights exported once to ONNX and run by onnxruntime with "
                          "the fast tokenizer (equal vectors, ~2.6x faster per query on 1 thread; benches/embedding.py), "
                          "'onnx-int8' = that export with int8 MatMul weights (onnxruntime dynamic quantisation: "
                          "~2x faster again, vectors within cosine 0.99 of fp32, its own relevance calibration), "
                          "'torch' = sentence-transformers")


@dataclass
class MemoryConfig:
    backend: str = _f("sqlite", choices=("sqlite", "postgres"),
                      doc="sqlite: embedded SQLite graph + faiss HNSW (one process); postgres: tables + pgvector "
                          "HNSW, shared by every process on the same database")
    db_path: str = _f("data/runtime/memory.db", doc="the SQLite store (backend = sqlite)")
    dsn: str = _f("", doc="PostgreSQL connection string (backend = postgres); empty = env RUVLLM_MEMORY_DSN, "
                          "which keeps a password out of saved configs and backups")
    pg_schema: str = _f("ruvllm_memory", doc="schema holding this store's tables (backend = postgres); one "
                                             "database can hold several stores")
    hnsw_m: int = _f(16, min=2, max=256)
    hnsw_ef_construction: int = _f(100, min=1)
    hnsw_ef_search: int = _f(32, min=1)
    index_threads: int = _f(1, min=0, doc="OpenMP threads of faiss adds and searches (0 = OpenMP's default, one per "
                                          "core).  More than 1 sets an OpenMP team against llama.cpp's decode threads: "
                                          "on 2 cores the memory service's adds and searches at 2 threads left every "
                                          "later decode step ~40 % slower (benches/decode_interference.py)")
    max_nodes: int = _f(100_000, min=1)
    expansion_hops: int = _f(1, min=0, max=5)
    expansion_max_nodes: int = _f(50, min=1)
    similar_edges_k: int = _f(4, min=0, doc="'similar' edges added from a new node to its nearest neighbours")
    similar_edge_min_score: float = _f(0.35, min=-1.0, max=1.0)
    context_edge_weight: float = _f(0.5, min=0.0, max=1.0,
                                    doc="initial weight of 'answered_by' edges from the notes shown to an answer")
    followup_edge_weight: float = _f(0.8, min=0.0, max=1.0,
                                     doc="initial weight of 'followed_by' edges between a session's turns")
    correction_edge_weight: float = _f(1.0, min=0.0, max=1.0,
                                       doc="initial weight of the 'corrects' edge from a correction to its answer")
    edge_learning_rate: float = _f(0.2, min=0.0, max=1.0)
    edge_decay_per_day: float = _f(0.02, min=0.0, max=1.0)
    edge_prune_below: float = _f(0.02, min=0.0, max=1.0)
    sqlite_cache_kb: int = _f(2000, min=16, doc="SQLite page cache of the memory store (KiB; 2000 is SQLite's own "
                                                "default): resident memory that fills as the store is read, then stays")
    writeback_batch_size: int = _f(64, min=1)
    writeback_interval_ms: int = _f(200, min=1)
    answer_writeback: str = _f("request", choices=("request", "queued"),
                               doc="where an answer's interaction node is written: request = before the response "
                                   "(the next query sees it: deterministic experiments); queued = by the writeback "
                                   "queue after the response (off the request path; the node waits in the request "
                                   "log, committed before the response, so a crash loses nothing; the next query "
                                   "may not see it yet)")


@dataclass
class RouterConfig:
    kind: str = _f("fastgrnn", doc="router registry name: fastgrnn, knn, logreg, random, always-smallest, "
                                   "always-largest, always-<tier>")
    hidden_dim: int = _f(32, min=1, max=4096)
    w_rank: int = _f(0, min=0, doc="0 = full rank")
    u_rank: int = _f(0, min=0, doc="0 = full rank")
    sparsity: float = _f(0.95, min=0.0, max=0.999, doc="fraction of zeros after hard thresholding")
    confidence_threshold: float = _f(0.6, min=0.0, max=1.0,
                                     doc="decision_rule = threshold: FastGRNN serves the cheapest tier i with "
                                         "P(cheapest adequate tier <= i) >= this; others fall back below it")
    tier_heads: str = _f("cumulative", choices=("cumulative", "independent"),
                         doc="FastGRNN tier heads (router.model): cumulative = C_i = P(cheapest adequate tier <= i), "
                             "monotone, a failure at t also counts against every cheaper tier; independent = "
                             "C_i = P(tier i adequate), one head per tier, each learning only from its own tier's "
                             "outcomes (for ladders where a cheaper tier can beat a larger one)")
    decision_rule: str = _f("threshold", choices=("threshold", "utility"),
                            doc="FastGRNN's serving rule (router.base.ordinal_choice): threshold = cheapest tier with "
                                "C_i >= confidence_threshold, else the fallback; utility = argmax_i C_i - "
                                "cost_penalty * relative cost_i")
    cost_penalty: float = _f(0.2, min=0.0, doc="utility rule: adequacy probability one largest-tier cost is worth "
                                               "(the price of cost in quality; choose it on a validation workload)")
    fallback: str = _f("largest", choices=("largest", "smallest", "default"),
                       doc="tier used when router confidence is below the threshold")
    default_tier: str = _f("")
    context_buckets: list = _f(default_factory=lambda: [0, 2, 4, 8], doc="memory items per context-size class")
    learning_rate: float = _f(0.01, min=0.0)
    epochs: int = _f(30, min=1)
    batch_size: int = _f(32, min=1)
    cost_weight: float = _f(0.0, min=0.0, doc="weight of expected tier cost in the routing loss; 0 keeps the "
                                              "cumulative tier probabilities calibrated (confidence_threshold is "
                                              "the cost/quality knob)")


@dataclass
class AttentionConfig:
    heads: int = _f(4, min=1, max=64)
    hidden_dim: int = _f(32, min=1)
    concat_heads: bool = _f(True)
    dropout: float = _f(0.0, min=0.0, max=0.9)
    context_token_budget: int = _f(384, min=0)
    learning_rate: float = _f(0.005, min=0.0)


VERIFICATIONS = ("unverified", "judged", "rated", "corrected", "gold")


@dataclass
class RetrievalConfig:
    """Which memories reach the prompt (ruvllm_lab/context.py says how each rule is applied)."""
    search_k: int = _f(8, min=0, doc="nearest memories searched per query (graph expansion seeds)")
    correction_k: int = _f(2, min=0, doc="corrections looked up separately on every query")
    correction_min_score: float = _f(0.55, min=-1.0, max=1.0,
                                     doc="cosine of a correction (embedded with its question) to the query")
    relevance_threshold: float = _f(0.75, min=-1.0, max=1.0,
                                    doc="cosine between the query and a note's question below which the note is "
                                        "not about this question; calibrated per embedding model "
                                        "(`ruvllm calibrate-relevance`, data/memory_eval.jsonl calib split)")
    match_key_terms: bool = _f(True, doc="a note must name the same numbers and proper nouns as the query")
    note_policy: str = _f("verified", choices=("off", "verified", "all"),
                          doc="off: no notes; verified: only corrections and answers whose verification is "
                              "trusted; all: unverified answers too (the pre-trust behaviour, for ablations)")
    trusted_verifications: list = _f(default_factory=lambda: ["gold", "rated"],
                                     doc=f"interaction verifications shown as notes; of {', '.join(VERIFICATIONS)}")
    min_note_quality: float = _f(0.75, min=0.0, max=1.0, doc="trust (node quality) a shown answer needs")
    max_notes: int = _f(3, min=0, doc="notes per prompt")
    max_note_tokens: int = _f(192, min=0, doc="tokens of all notes together")
    calibration: str = _f("", doc="the calibration file relevance_threshold was read from (provenance)")


@dataclass
class PromptConfig:
    system_prompt: str = _f("You are a helpful assistant. Answer the question briefly and accurately.")
    notes_header: str = _f("Notes from memory (use a note only if it answers this exact question):")
    # The layout below was chosen on the calibration split of data/memory_eval.jsonl (the memory
    # ablation reports the eval split; experiments/note_layouts.py): small tiers copy a verified
    # answer far more often when the note names the question it answered.  Ending in "Answer:"
    # helps the 135M chat model a little but breaks completion-format (base) tiers, whose prompt
    # already ends in "Answer:".
    answer_note: str = _f("- {provenance}: Q: {question} A: {answer}",
                          doc="how an earlier answer is shown; fields {provenance}, {question}, {answer}")
    question_with_notes: str = _f("Question: {query}", doc="the question after the notes; field {query}")
    history_turns: int = _f(4, min=0, doc="session turns replayed into the prompt")


@dataclass
class InferenceConfig:
    models: list = _f(default_factory=lambda: ["smollm2-135m"], doc="tier names or paths to .gguf files, smallest first")
    quantization: str = _f("q4_k", choices=("q4_0", "q4_1", "q4_k", "q5_k", "q8_0", "fp16", "bf16", "fp32"),
                           doc="GGUF tiers ship their own quantization; the transformers backend uses fp16/bf16/fp32 as dtype")
    max_context: int = _f(1024, min=64)
    max_loaded_models: int = _f(1, min=1)
    backend: str = _f("llama_cpp", choices=("llama_cpp", "transformers"))
    n_threads: int = _f(0, min=0, doc="0 = all cores")
    device: str = _f("auto", choices=("auto", "cpu", "cuda"))
    use_vllm: bool = _f(False)
    tensor_parallel: int = _f(1, min=1)
    max_tokens: int = _f(128, min=1)
    temperature: float = _f(0.7, min=0.0, max=2.0)
    top_p: float = _f(0.9, min=0.0, max=1.0)
    on_context_overflow: str = _f("truncate", choices=("truncate", "error"))
    kv_cache_sessions: int = _f(8, min=0, doc="session prefix states kept per model (LRU)")
    prefix_reuse: bool = _f(True, doc="llama.cpp: a request reuses the KV of the longest prompt prefix its slot "
                                      "holds.  false: every prompt is evaluated in full, so a greedy answer does "
                                      "not depend on what was asked before (the evaluated chunk's length changes "
                                      "llama.cpp's float rounding: 4 of 200 identical prompts answered differently "
                                      "in the memory ablation); experiments that compare arms turn it off")
    max_batch_sequences: int = _f(16, min=1, max=256,
                                  doc="llama.cpp and transformers: concurrent requests decoded together per model "
                                      "(one sequence / batch row each, up to max_context KV cells each); more wait "
                                      "for a free one")
    batch_tokens: int = _f(512, min=1, doc="llama.cpp: tokens per decode step (one per decoding sequence, the rest "
                                           "prompt chunks of joining requests)")


@dataclass
class LearningConfig:
    enabled: bool = _f(True)
    quality_threshold: float = _f(0.8, min=0.0, max=1.0)
    replay_capacity: int = _f(1000, min=1)
    replay_balance_by_tier: bool = _f(False)
    replay_ratio: float = _f(0.5, min=0.0, max=1.0, doc="share of each training batch drawn from the replay buffer; 0 = naive fine-tuning")
    training_interval_ms: int = _f(300_000, min=100)
    min_examples: int = _f(16, min=1)
    max_pending: int = _f(512, min=1, doc="a cycle starts early once this many answered interactions wait for it "
                                          "(else every training_interval_ms): the learning queue stays bounded at "
                                          "any request rate")
    recent_interactions: int = _f(256, min=1, doc="answered interactions kept in memory (besides those waiting for "
                                                   "the next cycle) so late feedback merges with the answer's own "
                                                   "evidence and router state; feedback on older answers is rebuilt "
                                                   "from the durable request log (records.py) without the router's "
                                                   "hidden state")
    batch_size: int = _f(32, min=1)
    steps_per_cycle: int = _f(50, min=1)
    learning_rate: float = _f(0.01, min=0.0)
    ewc_lambda: float = _f(100.0, min=0.0)
    ewc_gamma: float = _f(0.9, min=0.0, max=1.0, doc="online EWC: F <- gamma * F_old + F_new")
    judge_tier: str = _f("", doc="tier for LLM-as-judge; '' disables it")
    judge_weights: dict = _f(default_factory=lambda: {"gold": 1.0, "feedback": 1.0, "llm": 0.5, "logprob": 0.25})
    # What counts as success in serving (ruvllm_lab/learning/outcome.py applies these in one place).
    rating_success_min: int = _f(4, min=1, max=5, doc="a rating >= this is an adequate answer")
    rating_failure_max: int = _f(2, min=1, max=5, doc="a rating <= this is an inadequate answer (between: neutral)")
    logprob_failure_below: float = _f(0.45, min=0.0, max=1.0,
                                      doc="no gold, rating or correction: geometric-mean token probability below "
                                          "this is a failure (experiments/results/judge_calibration.json: no answer "
                                          "below 0.45 was correct, 6 of 40)")
    logprob_success_at: float = _f(1.0, min=0.0, max=1.0,
                                   doc="... and at or above this a success; 1.0 = practically never (no threshold "
                                       "reached 80 % precision with >= 5 answers in the calibration)")
    logprob_weight: float = _f(0.25, min=0.0, max=1.0, doc="training weight of a log-prob outcome (gold/rating: 1)")
    iht_fraction: float = _f(0.5, min=0.0, max=1.0,
                             doc="share of each router update's steps that hard-threshold after every step (EdgeML "
                                 "phase 2); the steps before are dense (phase 1); every update ends at router.sparsity")
    explore_rate: float = _f(0.1, min=0.0, max=0.5,
                             doc="chance of routing cheaper than the policy's pick (learning.explore_tiers says where; "
                                 "the propensity is logged)")
    explore_tiers: str = _f("next_cheaper", choices=("next_cheaper", "cheaper"),
                            doc="where exploration routes: the next cheaper tier, or any cheaper tier uniformly "
                                "(needed when a cheaper tier can beat the next one, e.g. a weak middle tier)")
    offpolicy_window: int = _f(2000, min=1, doc="logged decisions kept for the inverse-propensity estimate")
    shadow_rate: float = _f(0.1, min=0.0, max=1.0,
                            doc="share of judged interactions the idle learner re-answers with a neighbouring tier")
    shadow_max_tokens: int = _f(48, min=1, doc="token limit of a shadow answer")
    shadow_idle_ms: int = _f(1000, min=10, doc="shadow evaluation polls for an idle pool this often")
    shadow_weight: float = _f(0.5, min=0.0, max=1.0,
                              doc="training weight of a shadow outcome judged by agreement with a rated answer")
    shadow_queue: int = _f(64, min=1, doc="pending shadow jobs kept (oldest dropped)")


@dataclass
class CompressionConfig:
    enabled: bool = _f(True)
    interval_ms: int = _f(3_600_000, min=1000)
    tier: str = _f("", doc="tier that writes summaries (default: smallest)")
    method: str = _f("kmeans", choices=("kmeans", "gmm"))
    k_selection: str = _f("silhouette", choices=("silhouette", "bic"))
    k_min: int = _f(2, min=1)
    k_max: int = _f(16, min=1)
    min_cluster_size: int = _f(3, min=1)
    max_depth: int = _f(2, min=1, max=8)
    archive_members: bool = _f(False)
    summary_max_tokens: int = _f(48, min=4)


@dataclass
class ServerConfig:
    host: str = _f("127.0.0.1")
    port: int = _f(8080, min=0, max=65535)
    api_keys_env: str = _f("RUVLLM_API_KEYS")
    rate_limit_per_minute: int = _f(120, min=0, doc="per API key (or client address); 0 = unlimited")
    max_body_bytes: int = _f(65_536, min=256)
    max_query_chars: int = _f(8_000, min=1)
    max_tokens_limit: int = _f(1024, min=1, doc="largest constraints.max_tokens a client may ask for")
    tls_certfile: str = _f("")
    tls_keyfile: str = _f("")
    api_keys_file_env: str = _f("RUVLLM_API_KEYS_FILE",
                                doc="env var naming a file of API keys, one per line: `<key>` or `<tenant> <key>`")
    auth_failures_per_minute: int = _f(10, min=0, doc="failed authentications allowed per client address; "
                                                      "beyond that 429 before any key is checked; 0 = unlimited")
    shutdown_grace_s: float = _f(30.0, min=0.0, doc="SIGTERM: how long in-flight requests may finish before "
                                                    "they are cancelled")
    health_cache_s: float = _f(10.0, min=0.0, doc="how long a readiness probe (a 1-token generation) is reused")
    shared_namespace: str = _f("shared", doc="memory tenant every API key may read besides its own")


SECTIONS: dict[str, type] = {
    "system": SystemConfig,
    "embedding": EmbeddingConfig,
    "memory": MemoryConfig,
    "router": RouterConfig,
    "attention": AttentionConfig,
    "inference": InferenceConfig,
    "learning": LearningConfig,
    "compression": CompressionConfig,
    "server": ServerConfig,
    "retrieval": RetrievalConfig,
    "prompt": PromptConfig,
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_value(section: str, f: dataclasses.Field, value: Any, tp: Any) -> tuple[Any, str | None]:
    """Coerce `value` to the field's type; return (value, problem-or-None)."""
    key = f"{section}.{f.name}"
    if tp is bool:
        if not isinstance(value, bool):
            return value, f"{key} = {value!r}: expected true or false"
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return value, f"{key} = {value!r}: expected an integer"
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value, f"{key} = {value!r}: expected a number"
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            return value, f"{key} = {value!r}: expected a string"
    elif tp is list:
        if not isinstance(value, list):
            return value, f"{key} = {value!r}: expected a list"
    elif tp is dict:
        if not isinstance(value, dict):
            return value, f"{key} = {value!r}: expected a table"
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        return value, (f"{key} = {value!r}: allowed values are {', '.join(map(repr, meta['choices']))}"
                       f"{_did_you_mean(value, meta['choices'], quote=True)}")
    if meta.get("min") is not None and value < meta["min"]:
        return value, f"{key} = {value!r}: must be >= {meta['min']}"
    if meta.get("max") is not None and value > meta["max"]:
        return value, f"{key} = {value!r}: must be <= {meta['max']}"
    return value, None


def _build_section(name: str, cls: type, raw: Any, problems: list[str]) -> Any:
    if not isinstance(raw, Mapping):
        problems.append(f"[{name}] must be a table, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            problems.append(f"unknown key {name}.{key}{_did_you_mean(key, fields, f'{name}.')}; "
                            f"known keys of [{name}]: {', '.join(fields)}")
            continue
        value, problem = _check_value(name, fields[key], value, hints[key])
        if problem:
            problems.append(problem)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def _did_you_mean(word: Any, candidates: Iterable[Any], prefix: str = "", quote: bool = False) -> str:
    """' (did you mean x?)' for the nearest candidate (difflib), or '' when none is close."""
    import difflib
    if not isinstance(word, str):
        return ""
    near = difflib.get_close_matches(word, [str(c) for c in candidates], n=1, cutoff=0.6)
    if not near:
        return ""
    return f" (did you mean {prefix}{near[0]!r}?)" if quote else f" (did you mean {prefix}{near[0]}?)"


def _tier_problems(key: str, tier: Any) -> list[str]:
    """A tier must be on the model ladder (``models.LADDER``) or a path to a ``.gguf`` file."""
    from .models import LADDER
    if not isinstance(tier, str):
        return [f"{key} = {tier!r}: expected a tier name or a path to a .gguf file"]
    if tier in LADDER or tier.endswith(".gguf") or Path(tier).expanduser().is_file():
        return []
    return [f"{key} = {tier!r}: unknown tier{_did_you_mean(tier, LADDER, quote=True)}; known tiers: "
            f"{', '.join(LADDER)} (or a path to a .gguf file)"]


def _parse_override_value(text: str) -> Any:
    """`32` -> 32, `0.5` -> 0.5, `true` -> True, `["a","b"]` -> list; anything else stays a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


@dataclass
class Config:
    system: SystemConfig = field(default_factory=SystemConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    learning: LearningConfig = field(default_factory=LearningConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], overrides: Mapping[str, Any] | Iterable[str] | None = None) -> "Config":
        """Build and validate; raises ConfigError listing every problem."""
        problems: list[str] = []
        data: dict[str, dict] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
        for dotted, value in _normalise_overrides(overrides, problems):
            section, _, key = dotted.partition(".")
            if not key:
                problems.append(f"override {dotted!r}: expected section.key=value")
                continue
            data.setdefault(section, {})
            if isinstance(data[section], dict):
                data[section][key] = value
        sections = {}
        for name, section_raw in data.items():
            if name not in SECTIONS:
                problems.append(f"unknown section [{name}]{_did_you_mean(name, [f'[{k}]' for k in SECTIONS])}; "
                                f"known sections: {', '.join(SECTIONS)}")
                continue
            sections[name] = _build_section(name, SECTIONS[name], section_raw, problems)
        cfg = cls(**sections)
        problems.extend(cfg._cross_checks())
        if problems:
            raise ConfigError(problems)
        return cfg

    @classmethod
    def load(cls, path: str | os.PathLike, overrides: Mapping[str, Any] | Iterable[str] | None = None) -> "Config":
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError([f"config file not found: {path}"]) from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError([f"{path}: invalid TOML: {e}"]) from None
        return cls.from_dict(raw, overrides)

    @classmethod
    def builder(cls) -> "ConfigBuilder":
        return ConfigBuilder()

    def _cross_checks(self) -> list[str]:
        problems = []
        if not self.inference.models:
            problems.append("inference.models is empty: name at least one tier")
        for i, tier in enumerate(self.inference.models):
            problems.extend(_tier_problems(f"inference.models[{i}]", tier))
        for key in ("embedding.encoder_tier", "compression.tier", "learning.judge_tier", "router.default_tier"):
            section, _, name = key.partition(".")
            tier = getattr(getattr(self, section), name)
            if tier:
                problems.extend(_tier_problems(key, tier))
        for key, fields in (("answer_note", {"provenance": "", "question": "", "answer": ""}),
                            ("question_with_notes", {"query": ""})):
            try:
                getattr(self.prompt, key).format(**fields)
            except (KeyError, IndexError, ValueError) as e:
                problems.append(f"prompt.{key}: a format string with the fields {{{'}, {'.join(fields)}}} only "
                                f"({type(e).__name__}: {e})")
        if self.compression.k_min > self.compression.k_max:
            problems.append(f"compression.k_min ({self.compression.k_min}) > compression.k_max ({self.compression.k_max})")
        if self.inference.max_loaded_models > max(1, len(self.inference.models)):
            pass  # allowed: a budget larger than the ladder simply never evicts
        for key in ("gold", "feedback", "llm", "logprob"):
            w = self.learning.judge_weights.get(key, 0.0)
            if not isinstance(w, (int, float)) or w < 0:
                problems.append(f"learning.judge_weights.{key} = {w!r}: must be a number >= 0")
        unknown = set(self.learning.judge_weights) - {"gold", "feedback", "llm", "logprob"}
        if unknown:
            problems.append(f"unknown key(s) learning.judge_weights.{', '.join(sorted(unknown))}; known: gold, feedback, llm, logprob")
        if sorted(self.router.context_buckets) != list(self.router.context_buckets) or any(
                not isinstance(b, int) or b < 0 for b in self.router.context_buckets):
            problems.append(f"router.context_buckets = {self.router.context_buckets!r}: must be ascending integers >= 0")
        bad = [v for v in self.retrieval.trusted_verifications if v not in VERIFICATIONS]
        if bad:
            problems.append(f"retrieval.trusted_verifications: unknown {', '.join(map(repr, bad))}; "
                            f"allowed: {', '.join(VERIFICATIONS)}")
        return problems

    # ---- views -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_flat_dict(self) -> dict[str, Any]:
        """`{"router.hidden_dim": 32, ...}`: what MLflow logs as params."""
        flat = {}
        for section, values in self.to_dict().items():
            for key, value in values.items():
                flat[f"{section}.{key}"] = value
        return flat

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_toml())
        return path

    def with_overrides(self, overrides: Mapping[str, Any] | Iterable[str]) -> "Config":
        return Config.from_dict(self.to_dict(), overrides)

    @property
    def data_dir(self) -> Path:
        return Path(self.system.data_dir)


def _normalise_overrides(overrides: Mapping[str, Any] | Iterable[str] | None, problems: list[str]):
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return list(overrides.items())
    pairs = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r}: expected section.key=value")
            continue
        key, _, value = item.partition("=")
        pairs.append((key.strip(), _parse_override_value(value.strip())))
    return pairs


class ConfigBuilder:
    """The seed's builder: each method is a field name, unique across sections.

    ``Config.builder().db_path("./memory.db").models(["smollm2-135m"]).hidden_dim(16).build()``
    A name used by two sections (e.g. ``hidden_dim``) can be qualified: ``.set("router.hidden_dim", 16)``.
    """

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}
        owners: dict[str, list[str]] = {}
        for section, cls in SECTIONS.items():
            for f in dataclasses.fields(cls):
                owners.setdefault(f.name, []).append(section)
        self._owners = owners

    def set(self, dotted: str, value: Any) -> "ConfigBuilder":
        self._values[dotted] = value
        return self

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        sections = self._owners.get(name)
        if not sections:
            raise ConfigError([f"builder: no config field named {name!r}"])
        if len(sections) > 1:
            raise ConfigError([f"builder: {name!r} exists in {', '.join(sections)}; use .set('<section>.{name}', value)"])
        return lambda value: self.set(f"{sections[0]}.{name}", value)

    def build(self) -> Config:
        return Config.from_dict({}, self._values)


# Learned state kept in `system.data_dir` (the seed's runbook backs these up beside the memory store).
STATE_FILES: dict[str, str] = {
    "router_weights": "router_weights.pt",
    "attention_weights": "attention_weights.pt",
    "ewc_state": "ewc_state.pt",
    "replay_buffer": "replay_buffer.pt",
}
