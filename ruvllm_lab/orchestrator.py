"""RuvLLM: the whole self-learning loop behind one object (the seed's SDK, in Python).

Per request::

    embed -> memory search + graph expansion -> graph attention ranks context
          -> router picks tier / context size / sampling  (Constraints.model forces a tier)
          -> inference with the built prompt (ranked context + session history)
          -> judge -> writeback (interaction node + edges) -> learning service records it

Corrections given through ``feedback`` become ``correction`` nodes linked to the question
(``corrects``).  Retrieval always looks for corrections separately and puts the ones close
to the question first in the prompt, so a paraphrase of a corrected question is answered
with the corrected fact.

Thread-safe: the server calls ``query_with`` from a thread pool.  ``max_concurrent_requests``
is enforced here (``Overloaded``) so the SDK and the server share one limit.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import numpy as np

from . import models
from .attention import GraphAttentionEngine
from .compression import CompressionReport, compress_memory
from .config import STATE_FILES, Config
from .embedding import EmbeddingService
from .errors import Overloaded, RequestNotFound, SessionNotFound
from .graph import Subgraph
from .health import HealthReport, check_health
from .inference import InferencePool
from .learning.judge import QualityJudge, feedback_signal
from .learning.service import Interaction, LearningService
from .memory import MemoryService
from .router import RouterInput, make_router
from .telemetry import Metrics, stage_span
from .types import Feedback, Request, Response, Session, Source, Turn, Usage

log = logging.getLogger(__name__)

SEARCH_K = 8  # seed hits for graph expansion
CORRECTION_K = 2  # corrections looked up separately on every query
CORRECTION_MIN_SCORE = 0.55  # cosine above which a correction is taken to be about this question
LOW_QUALITY = 0.3  # interaction nodes judged or rated below this are not shown to the model again
HISTORY_TURNS = 4  # session turns replayed into the prompt
RECENT_REQUESTS = 10_000  # how many answered requests feedback can still reach
MAX_SESSIONS = 10_000  # least recently used sessions are forgotten beyond this

SYSTEM_PROMPT = "You are a helpful assistant. Answer the question briefly and accurately."


@dataclass
class _Answered:
    """What feedback needs to know about an answered request."""
    request: Request
    query_vec: np.ndarray
    answer: str
    tier: str
    interaction_id: int
    context_ids: list[int]
    session_id: str | None


@dataclass
class _Prepared:
    """Everything decided before generation starts."""
    request: Request
    session: Session | None
    query_vec: np.ndarray
    router_input: RouterInput
    decision: Any
    state_in: Any
    sources: list[Source]
    subgraph: Subgraph
    messages: list[dict]
    latency_ms: dict[str, float] = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)


class RuvLLM:
    """``RuvLLM(config)``; ``query``, ``query_with``, sessions, ``feedback``, streaming, ``learn``, ``health``."""

    def __init__(self, config: Config | str | Path, *, start_background_learning: bool = False):
        if not isinstance(config, Config):
            config = Config.load(config)
        self.config = config
        dim = config.embedding.dimension
        Path(config.system.data_dir).mkdir(parents=True, exist_ok=True)
        self.pool = InferencePool(config.inference, config.system)
        self.embedder = EmbeddingService(config.embedding, pool=self.pool)
        self.memory = MemoryService(config.memory, dimension=dim, embedder=self.embedder)
        self.attention = GraphAttentionEngine(config.attention, dim, seed=config.system.seed)
        attention_path = Path(config.system.data_dir) / STATE_FILES["attention_weights"]
        if attention_path.exists():
            self.attention.load(attention_path)
        router = make_router(config.router.kind, config.inference.models, config.router, dim, seed=config.system.seed)
        self.judge = QualityJudge(config.learning, pool=self.pool)
        self.learning = LearningService(config, router, memory=self.memory, attention=self.attention, judge=self.judge)
        self.metrics = Metrics(limit_bytes=config.system.max_memory_mb * 2**20)
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self._answered: OrderedDict[str, _Answered] = OrderedDict()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(config.system.max_concurrent_requests)
        self._closed = False
        self._stop_compression = threading.Event()
        self._compression_thread: threading.Thread | None = None
        if start_background_learning and config.learning.enabled:
            self.learning.start()
        if start_background_learning and config.compression.enabled:
            self._compression_thread = threading.Thread(target=self._compress_periodically,
                                                        name="ruvllm-compression", daemon=True)
            self._compression_thread.start()

    # ---- the pipeline -------------------------------------------------------------------------
    def query(self, text: str) -> Response:
        return self.query_with(Request(query=text))

    def query_session(self, session: Session | str, text: str) -> Response:
        sid = session.id if isinstance(session, Session) else session
        return self.query_with(Request(query=text, session_id=sid))

    def query_with(self, request: Request) -> Response:
        with self._slot():
            prep = self._prepare(request)
            with self._stage("generate", prep):
                gen = self.pool.generate(prep.decision.tier, prep.messages, **self._sampling(prep),
                                         session_id=request.session_id, logprobs=True)
            return self._finish(prep, gen)

    def query_stream(self, text: str | Request) -> "ResponseStream":
        """Iterate for text chunks; after exhaustion ``.response`` is the full ``Response``."""
        request = text if isinstance(text, Request) else Request(query=text)
        return ResponseStream(self, request)

    def _prepare(self, request: Request) -> _Prepared:
        session = self._session(request.session_id) if request.session_id else None
        prep = _Prepared(request, session, None, None, None, None, [], None, [])  # type: ignore[arg-type]
        with self._stage("embed", prep):
            prep.query_vec = self.embedder.embed_one(request.query)
        with self._stage("retrieve", prep):
            hits = self.memory.search(prep.query_vec, SEARCH_K)
            corrections = [h for h in self.memory.search(prep.query_vec, CORRECTION_K, kinds=("correction",))
                           if h.score >= CORRECTION_MIN_SCORE]
            seeds = {h.node_id: h.score for h in hits + corrections}
            prep.subgraph = (self.memory.expand(list(seeds), seed_scores=seeds) if seeds
                             else Subgraph.empty(self.config.embedding.dimension))
        with self._stage("route", prep):
            prep.router_input = RouterInput(
                query_vec=prep.query_vec, query_tokens=self.embedder.count_tokens(request.query),
                top_similarity=max(seeds.values(), default=0.0), hit_count=len(hits),
                mean_degree=_mean_degree(prep.subgraph), session_turn=session.turn_index if session else 0,
                tier_quality=self.learning.tier_quality(), max_latency_ms=request.constraints.max_latency_ms,
                max_tokens=request.constraints.max_tokens, forced_tier=request.constraints.model)
            prep.state_in = session.router_state if session else None
            prep.decision = self.learning.route(prep.router_input, prep.state_in)
            if session is not None:
                session.router_state = prep.decision.state
        with self._stage("attention", prep):
            ranked = self.attention.select_context(prep.query_vec, prep.subgraph,
                                                   self.config.attention.context_token_budget,
                                                   self.embedder.count_tokens)
            by_id = dict(zip(prep.subgraph.node_ids, range(len(prep.subgraph))))
            correction_ids = {h.node_id for h in corrections}
            if correction_ids:
                # A verified correction of this very question is the answer; other memories only
                # distract a small model from it (they may even be what was wrong).
                chosen = [(i, s) for i, s in ranked if i in correction_ids]
            else:
                relevance = prep.subgraph.vectors @ prep.query_vec  # (N,) cosine: vectors are normalised
                chosen = [(i, s) for i, s in ranked
                          if prep.subgraph.quality[by_id[i]] >= LOW_QUALITY
                          and relevance[by_id[i]] >= self.config.attention.min_relevance
                          ][: prep.decision.context_items]
            prep.sources = [Source(i, prep.subgraph.texts[by_id[i]], float(s), prep.subgraph.kinds[by_id[i]])
                            for i, s in chosen]
        prep.messages = self._messages(request.query, prep.sources, session)
        return prep

    def _sampling(self, prep: _Prepared) -> dict:
        c, d = prep.request.constraints, prep.decision
        return {"max_tokens": c.max_tokens or self.config.inference.max_tokens,
                "temperature": d.temperature if c.temperature is None else c.temperature,
                "top_p": d.top_p if c.top_p is None else c.top_p,
                "max_latency_ms": _remaining_ms(c.max_latency_ms, prep.t0)}

    def _messages(self, query: str, sources: list[Source], session: Session | None) -> list[dict]:
        """System prompt, session history, then memory notes + the question in the last user turn.

        The notes change with every query, so they go last: the system prompt and history stay a
        stable prefix that the inference pool's session KV cache can reuse on the next turn.
        """
        messages = [{"role": "system", "content": SYSTEM_PROMPT}]
        for turn in (session.turns[-HISTORY_TURNS:] if session else []):
            messages += [{"role": "user", "content": turn.prompt or turn.query},
                         {"role": "assistant", "content": turn.answer}]
        notes = [f"- Verified correction: {s.text}" if s.kind == "correction" else f"- {s.text}" for s in sources]
        content = query if not notes else (
            "Notes from memory (use them when relevant):\n" + "\n".join(notes) + f"\n\nQuestion: {query}")
        messages.append({"role": "user", "content": content})
        return messages

    def _finish(self, prep: _Prepared, gen) -> Response:
        request, decision = prep.request, prep.decision
        with self._stage("judge", prep):
            verdict = self.judge.score(request.query, gen.text, gold=request.gold_answer, logprobs=gen.logprobs)
        confidence = verdict.signals.get("logprob", decision.confidence)
        with self._stage("writeback", prep):
            context_ids = [s.node_id for s in prep.sources]
            edges = [(i, "answered_by", 0.5) for i in context_ids]
            if prep.session is not None and prep.session.turns:
                prev = self._answered.get(prep.session.turns[-1].request_id)
                if prev is not None:
                    edges.append((prev.interaction_id, "followed_by", 0.8))
            interaction_id = self.memory.add(
                f"Q: {request.query}\nA: {gen.text.strip()}", kind="interaction", vector=prep.query_vec,
                quality=verdict.score if verdict.known else 0.5, edges=edges,
                metadata={"request_id": request.request_id, "tier": decision.tier, "session_id": request.session_id})
            if context_ids:
                self.memory.mark_used(context_ids)
            cost = models.resolve(decision.tier).relative_cost * (gen.prompt_tokens + gen.completion_tokens)
            self.learning.record(Interaction(
                request_id=request.request_id, x=prep.router_input, decision=decision,
                tier_scores={decision.tier: verdict.score} if verdict.known else {}, latency_ms=gen.latency_ms,
                cost=cost, node_ids=context_ids, state=prep.state_in, subgraph=prep.subgraph))
            with self._lock:
                self._answered[request.request_id] = _Answered(request, prep.query_vec, gen.text, decision.tier,
                                                               interaction_id, context_ids, request.session_id)
                while len(self._answered) > RECENT_REQUESTS:
                    self._answered.popitem(last=False)
            if prep.session is not None:
                prep.session.turns.append(Turn(request.query, gen.text, request.request_id,
                                               prompt=prep.messages[-1]["content"]))
        prep.latency_ms["total"] = (time.perf_counter() - prep.t0) * 1000
        self.metrics.observe_request(decision.tier, prep.latency_ms, decision.confidence,
                                     verdict.score if verdict.known else None)
        return Response(
            text=gen.text, confidence=float(confidence), request_id=request.request_id, sources=prep.sources,
            routing_info={**decision.to_dict(), "rank_method": self.attention.rank_method,
                          "forced": request.constraints.model is not None},
            latency_ms=prep.latency_ms,
            usage=Usage(gen.prompt_tokens, gen.completion_tokens, gen.prompt_tokens_evaluated),
            session_id=request.session_id, finish_reason=gen.finish_reason)

    # ---- sessions and feedback ---------------------------------------------------------------
    def new_session(self) -> Session:
        return self._session(Session().id)

    def _session(self, session_id: str) -> Session:
        with self._lock:
            session = self.sessions.get(session_id)
            if session is None:  # a client-chosen id (the seed's "user-123") starts a session
                session = self.sessions[session_id] = Session(id=session_id)
            self.sessions.move_to_end(session_id)
            while len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
            return session

    def get_session(self, session_id: str) -> Session:
        with self._lock:
            if session_id not in self.sessions:
                raise SessionNotFound(f"no session {session_id!r}")
            return self.sessions[session_id]

    def feedback(self, fb: Feedback) -> dict:
        """A rating re-scores the answer (router label, edges next learning cycle); a correction is stored
        durably as a ``correction`` node linked to the question before this returns."""
        with self._lock:
            answered = self._answered.get(fb.request_id)
        if answered is None:
            raise RequestNotFound(f"no answered request {fb.request_id!r} (unknown, or older than the last "
                                  f"{RECENT_REQUESTS})")
        result: dict[str, Any] = {"request_id": fb.request_id, "recorded": True}
        score = feedback_signal(fb)
        if score is not None:
            self.learning.add_score(fb.request_id, answered.tier, score)
            self.memory.set_quality([(answered.interaction_id, score)])
            self.metrics.quality.set(score)
            result["score"] = score
        if fb.correction and fb.correction.strip():
            # Embedded with its question, so a paraphrase of the question finds it.
            correction = fb.correction.strip()
            vector = self.embedder.embed_one(f"{answered.request.query} {correction}")
            correction_id = self.memory.add(correction, kind="correction", quality=1.0, vector=vector,
                                            edges=[(answered.interaction_id, "corrects", 1.0)],
                                            metadata={"request_id": fb.request_id, "question": answered.request.query,
                                                      "corrects_node": answered.interaction_id})
            result["correction_node"] = correction_id
        return result

    # ---- learning, health, lifecycle -------------------------------------------------------------
    def learn(self) -> dict:
        return self.learning.learn()

    def compress(self) -> CompressionReport:
        """One pass of the third learning loop: summarise memory clusters into concept nodes."""
        return compress_memory(self.memory, self.pool, self.config.compression, embedder=self.embedder,
                               seed=self.config.system.seed)

    def _compress_periodically(self) -> None:
        while not self._stop_compression.wait(self.config.compression.interval_ms / 1000.0):
            try:
                report = self.compress()
                log.info("compression: %d concepts, %d -> %d indexed nodes", len(report.concepts),
                         report.nodes_before, report.nodes_after)
            except Exception:  # noqa: BLE001 - a failed pass leaves memory as it was; try again next interval
                log.exception("background compression pass failed")

    def health(self) -> HealthReport:
        return check_health(self.memory, self.learning.router, self.pool, self.config.embedding.dimension)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_compression.set()
        if self._compression_thread is not None:
            self._compression_thread.join()  # a pass in flight finishes its writes before memory closes
        self.learning.stop()
        with contextlib.suppress(Exception):
            self.learning.save_state()
        self.memory.close()  # drains the writeback queue
        self.pool.close()

    def __enter__(self) -> "RuvLLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- async twins ------------------------------------------------------------------------------
    async def aquery(self, text: str | Request) -> Response:
        request = text if isinstance(text, Request) else Request(query=text)
        return await asyncio.to_thread(self.query_with, request)

    async def afeedback(self, fb: Feedback) -> dict:
        return await asyncio.to_thread(self.feedback, fb)

    async def aquery_stream(self, text: str | Request) -> AsyncIterator[str]:
        stream = self.query_stream(text)
        done = object()
        while True:
            chunk = await asyncio.to_thread(next, stream, done)
            if chunk is done:
                return
            yield chunk

    # ---- helpers -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _slot(self):
        if not self._slots.acquire(blocking=False):
            self.metrics.errors.labels(stage="admission").inc()
            raise Overloaded(f"{self.config.system.max_concurrent_requests} requests already running "
                             f"(system.max_concurrent_requests); retry shortly")
        try:
            yield
        except Exception:
            self.metrics.errors.labels(stage="pipeline").inc()
            raise
        finally:
            self._slots.release()

    @contextlib.contextmanager
    def _stage(self, name: str, prep: _Prepared):
        t = time.perf_counter()
        with stage_span(name, prep.request.request_id):
            yield
        prep.latency_ms[name] = (time.perf_counter() - t) * 1000


class ResponseStream:
    """Text chunks of one answer; the judge and writeback run when the last chunk has been read."""

    def __init__(self, llm: RuvLLM, request: Request):
        self._llm = llm
        self.request = request
        self.response: Response | None = None
        self._iter = self._run()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._iter)

    def _run(self) -> Iterator[str]:
        llm = self._llm
        with llm._slot():
            prep = llm._prepare(self.request)
            t = time.perf_counter()
            with llm.pool.stream(prep.decision.tier, prep.messages, **llm._sampling(prep),
                                 session_id=self.request.session_id, logprobs=True) as stream:
                yield from stream
            prep.latency_ms["generate"] = (time.perf_counter() - t) * 1000
            self.response = llm._finish(prep, stream.result)


def _mean_degree(sg: Subgraph) -> float:
    return 2.0 * sg.num_edges / len(sg) if len(sg) else 0.0


def _remaining_ms(budget_ms: float | None, t0: float) -> float | None:
    if budget_ms is None:
        return None
    return max(1.0, budget_ms - (time.perf_counter() - t0) * 1000)
