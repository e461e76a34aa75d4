"""RuvLLM: the whole self-learning loop behind one object (the seed's SDK, in Python).

Per request::

    embed -> memory search + graph expansion -> graph attention ranks context
          -> router picks tier / context size / sampling  (Constraints.model forces a tier)
          -> inference with the built prompt (ranked context + session history)
          -> judge -> writeback (interaction node + edges) -> learning service records it

Every answer is written back as an ``interaction`` node that records how it was verified
(``gold``, ``judged``, ``rated``, ``corrected``, ``unverified``); feedback updates that at once.
What reaches the prompt is decided by the ``ContextBuilder`` (``context.py``): only trusted
memories about this very question, with their provenance, corrections first, or none at all.
Corrections given through ``feedback`` become ``correction`` nodes linked to the question
(``corrects``), so a paraphrase of a corrected question is answered with the corrected fact.

Thread-safe: the server calls ``query_with`` from a thread pool.  ``max_concurrent_requests``
is enforced here (``Overloaded``) so the SDK and the server share one limit.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import numpy as np
import torch

from . import models
from .attention import GraphAttentionEngine
from .compression import CompressionReport, compress_memory
from .config import STATE_FILES, Config
from .context import ContextBuilder, verification_of
from .embedding import EmbeddingService
from .errors import Cancelled, Overloaded, RequestNotFound, SessionNotFound, ShuttingDown
from .graph import Subgraph
from .health import HealthReport, check_health
from .inference import InferencePool
from .learning.judge import QualityJudge, feedback_signal
from .learning.service import Interaction, LearningService
from .memory import MemoryService
from .records import PENDING_NODE, REQUEST_LOG_FILE, AnsweredRecord, RequestLog
from .router import RouterInput, RoutingDecision, make_router
from .telemetry import Metrics, release_free_heap, stage_span
from .types import Feedback, Request, Response, Session, Source, Turn, Usage

log = logging.getLogger(__name__)

CANCEL_SETTLE_S = 5.0  # after cancelling, how long drain() waits for requests to leave (each stops within a step)


@dataclass
class Prepared:
    """Everything decided before generation starts, filled in stage by stage by ``RuvLLM.prepare``."""
    request: Request
    session: Session | None
    query_vec: np.ndarray | None = None  # (D,)
    router_input: RouterInput | None = None
    decision: Any = None  # the router's RoutingDecision
    state_in: Any = None  # the session's router state before this turn
    sources: list[Source] = field(default_factory=list)  # the notes shown to the model
    subgraph: Subgraph | None = None
    messages: list[dict] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)


class RuvLLM:
    """``RuvLLM(config)``; ``query``, ``query_with``, sessions, ``feedback``, streaming, ``learn``, ``health``."""

    def __init__(self, config: Config | str | Path, *, start_background_learning: bool = False,
                 pool: InferencePool | None = None, embedder: EmbeddingService | None = None):
        """``pool`` and ``embedder`` may be shared between instances (experiments compare memory
        states over one set of loaded models); an injected pool is not closed by ``close()``."""
        if not isinstance(config, Config):
            config = Config.load(config)
        self.config = config
        if config.system.torch_threads > 0:  # process-wide (config doc)
            torch.set_num_threads(config.system.torch_threads)
        dim = config.embedding.dimension
        Path(config.system.data_dir).mkdir(parents=True, exist_ok=True)
        self._owns_pool = pool is None
        self.pool = pool if pool is not None else InferencePool(config.inference, config.system)
        self.embedder = embedder if embedder is not None else EmbeddingService(config.embedding, pool=self.pool)
        self.memory = MemoryService(config.memory, dimension=dim, embedder=self.embedder)
        self.attention = GraphAttentionEngine(config.attention, dim, seed=config.system.seed)
        attention_path = Path(config.system.data_dir) / STATE_FILES["attention_weights"]
        if attention_path.exists():
            self.attention.load(attention_path)
        router = make_router(config.router.kind, config.inference.models, config.router, dim, seed=config.system.seed)
        self.judge = QualityJudge(config.learning, pool=self.pool)
        self.learning = LearningService(config, router, memory=self.memory, attention=self.attention, judge=self.judge)
        self.metrics = Metrics(limit_bytes=config.system.max_memory_mb * 2**20)
        self.context = ContextBuilder(config.retrieval, config.prompt, self.memory, self.attention,
                                      self.embedder.count_tokens, dim,
                                      shared_namespace=getattr(config.server, "shared_namespace", "shared"))
        self.sessions: OrderedDict[tuple[str | None, str], Session] = OrderedDict()  # (tenant, id) -> session
        # Answered requests and labels live in SQLite from the moment they are acknowledged: feedback
        # works across restarts and no label is lost to a crash (records.py).
        self.records = RequestLog(Path(config.system.data_dir) / REQUEST_LOG_FILE, keep=config.system.feedback_window,
                                  cache_kb=config.system.request_log_cache_kb)
        self._lock = threading.Lock()
        self._label_lock = threading.Lock()  # a label's row and its learning-queue entry appear together
        self._slots = threading.BoundedSemaphore(config.system.max_concurrent_requests)
        self._inflight: dict[str, threading.Event] = {}  # request id -> its cancel flag
        self._draining = False
        self._closed = False
        self._stop_compression = threading.Event()
        self._compression_thread: threading.Thread | None = None
        self._stop_learning = threading.Event()
        self._learning_thread: threading.Thread | None = None
        self._write_pending_notes()
        self._replay_unlearned_labels()
        if start_background_learning and config.learning.enabled:
            # our own loop rather than learning.start(): each cycle must go through self.learn(),
            # which marks the labels it trained on as learned in the request log
            self._learning_thread = threading.Thread(target=self._learn_periodically, name="ruvllm-learning",
                                                     daemon=True)
            self._learning_thread.start()
            # shadow evaluation: idle-time answers of a neighbouring tier (learning.shadow_rate; issue 12)
            self.learning.start_shadow(self._shadow_answer, self._busy, lambda: self.pool.loaded_models())
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

    def query_with(self, request: Request, cancel: threading.Event | None = None) -> Response:
        """Answer `request`.  Setting `cancel` (client gone, shutdown) stops generation at the next
        step and raises `Cancelled`; a cancelled request writes nothing back."""
        with self.admit(request, cancel) as cancel:
            prep = self.prepare(request)
            with self._stage("generate", prep):
                gen = self.pool.generate(prep.decision.tier, prep.messages, **self.sampling(prep),
                                         session_id=_kv_session(request), cancel=cancel,
                                         logprobs=self.judge.weights["logprob"] > 0)  # only the judge reads them
            if gen.finish_reason == "cancelled":
                raise Cancelled(f"request {request.request_id} was cancelled before it finished")
            return self.finish(prep, gen)

    def query_stream(self, text: str | Request) -> "ResponseStream":
        """Iterate for text chunks; after exhaustion ``.response`` is the full ``Response``."""
        request = text if isinstance(text, Request) else Request(query=text)
        return ResponseStream(self, request)

    def prepare(self, request: Request) -> Prepared:
        session = self._session(request.session_id, request.tenant) if request.session_id else None
        prep = Prepared(request, session)
        with self._stage("embed", prep):
            prep.query_vec = self.embedder.embed_one(request.query, remember=False)
        tenant = getattr(request, "tenant", None)
        with self._stage("retrieve", prep):
            retrieved = self.context.retrieve(prep.query_vec, tenant)
            prep.subgraph = retrieved.subgraph
        with self._stage("route", prep):
            prep.router_input = RouterInput(
                query_vec=prep.query_vec, query_tokens=self.embedder.count_tokens(request.query),
                top_similarity=retrieved.top_similarity, hit_count=retrieved.hit_count,
                mean_degree=_mean_degree(prep.subgraph), session_turn=session.turn_index if session else 0,
                tier_quality=self.learning.tier_quality(), max_latency_ms=request.constraints.max_latency_ms,
                max_tokens=request.constraints.max_tokens, forced_tier=request.constraints.model)
            prep.state_in = session.router_state if session else None
            prep.decision = self.learning.route(prep.router_input, prep.state_in)
            if session is not None:
                session.router_state = prep.decision.state
        with self._stage("attention", prep):
            prep.sources = self.context.select(request.query, prep.query_vec, retrieved,
                                               prep.decision.context_items, tenant)
        prep.messages = self.context.messages(request.query, prep.sources, session)
        return prep

    def sampling(self, prep: Prepared) -> dict:
        c, d = prep.request.constraints, prep.decision
        return {"max_tokens": c.max_tokens or self.config.inference.max_tokens,
                "temperature": d.temperature if c.temperature is None else c.temperature,
                "top_p": d.top_p if c.top_p is None else c.top_p,
                "stop": c.stop or None,
                "max_latency_ms": _remaining_ms(c.max_latency_ms, prep.t0)}

    def finish(self, prep: Prepared, gen) -> Response:
        request, decision = prep.request, prep.decision
        with self._stage("judge", prep):
            verdict = self.judge.score(request.query, gen.text, gold=request.gold_answer, logprobs=gen.logprobs)
        confidence = verdict.signals.get("logprob", decision.confidence)
        with self._stage("writeback", prep):
            context_ids = [s.node_id for s in prep.sources]
            edges = [(i, "answered_by", self.config.memory.context_edge_weight) for i in context_ids]
            if prep.session is not None and prep.session.turns:
                prev = self._answered(prep.session.turns[-1].request_id)
                if prev is not None:
                    edges.append((prev.interaction_id, "followed_by", self.config.memory.followup_edge_weight))
            verification, trust, verified_meta = verification_of(verdict.signals, verdict.score)
            note = {"text": f"Q: {request.query}\nA: {gen.text.strip()}", "quality": trust, "edges": edges,
                    "context_ids": context_ids,
                    "metadata": {"request_id": request.request_id, "tier": decision.tier,
                                 "session_id": request.session_id, "question": request.query,
                                 "verification": verification, **verified_meta,
                                 "tenant": getattr(request, "tenant", None)}}
            queued = self.config.memory.answer_writeback == "queued"
            interaction_id = PENDING_NODE if queued else self._write_note(note, prep.query_vec)
            cost = models.resolve(decision.tier).relative_cost * (gen.prompt_tokens + gen.completion_tokens)
            router_input = {f.name: getattr(prep.router_input, f.name) for f in dataclasses.fields(prep.router_input)
                            if f.name != "query_vec"}
            with self._label_lock:
                self.records.add_answered(
                    AnsweredRecord(request.request_id, request.tenant, request.session_id, request.query, gen.text,
                                   decision.tier, interaction_id, context_ids, router_input, prep.query_vec,
                                   decision.to_dict()),
                    label=(decision.tier, verdict.score) if verdict.known else None,
                    pending_note=note if queued else None)
                # No subgraph is kept: held per interaction it cost ~140 KB per request (issue 14);
                # attention training re-expands the answer's context nodes instead.
                self.learning.record(Interaction(
                    request_id=request.request_id, x=prep.router_input, decision=decision,
                    tier_scores={decision.tier: verdict.score} if verdict.known else {}, latency_ms=gen.latency_ms,
                    cost=cost, node_ids=context_ids, state=prep.state_in, subgraph=None,
                    # the evidence learning/outcome.py turns into the router's label; texts for shadow evaluation
                    signals={decision.tier: dict(verdict.signals)}, query=request.query, answer=gen.text,
                    gold=request.gold_answer))
            if queued:  # after the record: the write's callback fills in the record's node id
                self._enqueue_note(request.request_id, note, prep.query_vec)
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

    # ---- the answer's memory node ---------------------------------------------------------------
    def _write_note(self, note: dict, vector: np.ndarray) -> int:
        """Write an answer's interaction node now and count its notes as used; returns the node id."""
        node_id = self.memory.add(note["text"], kind="interaction", vector=vector, quality=note["quality"],
                                  edges=note["edges"], metadata=note["metadata"])
        if note["context_ids"]:
            self.memory.mark_used(note["context_ids"])
        return node_id

    def _enqueue_note(self, request_id: str, note: dict, vector: np.ndarray) -> None:
        """Queue the node (memory.answer_writeback = "queued"); its record learns the id once written."""
        def written(node_id: int) -> None:  # on the writeback worker, after the node's commit
            self.records.note_written(request_id, node_id)
            if note["context_ids"]:
                self.memory.mark_used(note["context_ids"])

        self.memory.enqueue(note["text"], kind="interaction", vector=vector, quality=note["quality"],
                            edges=note["edges"], metadata=note["metadata"], on_written=written)

    def _answered(self, request_id: str) -> AnsweredRecord | None:
        """The durable record of an answered request, its node written (waiting for the queue if needed)."""
        rec = self.records.get(request_id)
        if rec is not None and rec.interaction_id == PENDING_NODE:
            self.memory.flush()
            rec = self.records.get(request_id)
        return rec

    def _write_pending_notes(self) -> None:
        """Write the nodes of answers acknowledged before a crash whose node was still queued.  Edges
        to nodes evicted since are dropped; the question is embedded again if its record is gone."""
        written = 0
        for request_id, note in self.records.pending_notes():
            rec = self.records.get(request_id)
            vector = rec.query_vec if rec is not None else self.embedder.embed_one(note["metadata"]["question"])
            note["edges"] = [e for e in note["edges"] if self.memory.exists(int(e[0]))]
            note["context_ids"] = [i for i in note["context_ids"] if self.memory.exists(int(i))]
            self.records.note_written(request_id, self._write_note(note, vector))
            written += 1
        if written:
            log.info("wrote the memory nodes of %d answers acknowledged before the last stop", written)

    # ---- sessions and feedback ---------------------------------------------------------------
    def new_session(self, tenant: str | None = None) -> Session:
        return self._session(Session().id, tenant)

    def _session(self, session_id: str, tenant: str | None = None) -> Session:
        """The tenant's session `session_id`, started when new.  Sessions are keyed by (tenant, id): a
        client-chosen id (the seed's "user-123") names a different session for every tenant."""
        key = (tenant, session_id)
        with self._lock:
            session = self.sessions.get(key)
            if session is None:
                session = self.sessions[key] = Session(id=session_id, tenant=tenant)
            self.sessions.move_to_end(key)
            while len(self.sessions) > self.config.system.max_sessions:
                self.sessions.popitem(last=False)
            return session

    def get_session(self, session_id: str, tenant: str | None = None) -> Session:
        with self._lock:
            session = self.sessions.get((tenant, session_id))
            if session is None:
                raise SessionNotFound(f"no session {session_id!r}")
            return session

    def feedback(self, fb: Feedback) -> dict:
        """A rating re-scores the answer (router label, edges next learning cycle); a correction is stored
        durably as a ``correction`` node linked to the question before this returns."""
        answered = self._answered(fb.request_id)
        if answered is None or answered.tenant != fb.tenant:  # another tenant's request is not found either
            raise RequestNotFound(f"no answered request {fb.request_id!r} (unknown, or older than the last "
                                  f"{self.config.system.feedback_window})")
        result: dict[str, Any] = {"request_id": fb.request_id, "recorded": True}
        score = feedback_signal(fb)
        if score is not None:
            with self._label_lock:  # durable before acknowledged
                self.records.add_label(fb.request_id, answered.tier, score, "feedback")
                try:
                    self.learning.add_feedback(fb.request_id, answered.tier, rating=fb.rating,
                                               correction=fb.correction)
                except RequestNotFound:  # answered before a restart: the learning service never saw it
                    self.learning.record(_interaction_of(answered, {answered.tier: score}, answered.context_ids))
            # The answer's trust changes at once: a rated answer may now be shown as a note, a
            # corrected one never again (context.trusted).
            self.memory.set_quality([(answered.interaction_id, score)])
            corrected = bool(fb.correction and fb.correction.strip())
            self.memory.update_metadata(answered.interaction_id, {"verification": "corrected"} if corrected else
                                        {"verification": "rated", "rating": fb.rating})
            self.metrics.quality.set(score)
            result["score"] = score
        if fb.correction and fb.correction.strip():
            # Embedded with its question, so a paraphrase of the question finds it.
            correction = fb.correction.strip()
            vector = self.embedder.embed_one(f"{answered.query} {correction}")
            correction_id = self.memory.add(correction, kind="correction", quality=1.0, vector=vector,
                                            edges=[(answered.interaction_id, "corrects",
                                                    self.config.memory.correction_edge_weight)],
                                            metadata={"request_id": fb.request_id, "question": answered.query,
                                                      "corrects_node": answered.interaction_id,
                                                      "tenant": answered.tenant})
            result["correction_node"] = correction_id
        return result

    # ---- learning, health, lifecycle -------------------------------------------------------------
    def learn(self) -> dict:
        """One learning cycle; the labels it trained on (and saved) are marked learned in the request log.

        The watermark is read before the cycle drains its queue (under the label lock, so every label
        at or below it is already queued): a label is marked learned only after it was trained on."""
        with self._label_lock:
            watermark = self.records.label_watermark()
        report = self.learning.learn()
        self.metrics.learning_cycles.inc()
        if report.get("swapped") and "save_error" not in report:
            self.records.mark_learned(watermark)
        # A cycle frees megabytes of training temporaries (router and attention copies, autograd); glibc
        # keeps freed heap pages in its arenas, where they stay resident: hand them back (issue 14).
        release_free_heap()
        return report

    def _busy(self) -> bool:
        """A request is in flight: shadow evaluation must not start, or must stop at the next token."""
        return bool(self._inflight) or self._draining or self._closed

    def _shadow_answer(self, tier: str, query: str, max_tokens: int, should_stop) -> tuple | None:
        """Answer `query` with `tier` for shadow evaluation (bare question, greedy); None when a
        request arrived meanwhile -- the stream is closed at once, freeing the model."""
        messages = [{"role": "system", "content": self.config.prompt.system_prompt}, {"role": "user", "content": query}]
        with self.pool.stream(tier, messages, max_tokens=max_tokens, temperature=0.0, logprobs=True) as stream:
            for _ in stream:
                if should_stop():
                    return None
        return stream.result.text, stream.result.logprobs

    def shadow_evaluate(self, max_jobs: int | None = None) -> dict:
        """Run queued shadow evaluations now while idle (the background thread does this on its own);
        returns how many ended how.  Only tiers already loaded are used."""
        counts: dict[str, int] = {}
        while max_jobs is None or sum(counts.values()) < max_jobs:
            what = self.learning.shadow_step(self._shadow_answer, self._busy, lambda: self.pool.loaded_models())
            counts[what] = counts.get(what, 0) + 1
            if what in ("busy", "idle-queue", "preempted"):
                break
        return counts

    def _learn_periodically(self) -> None:
        while self.learning.wait_for_cycle(self._stop_learning):  # every interval, or sooner at learning.max_pending
            try:
                self.learn()
            except Exception:  # noqa: BLE001 - learn() reports its own errors; this is a last guard
                log.exception("background learning cycle crashed")

    def _replay_unlearned_labels(self) -> None:
        """Queue every label the last run acknowledged but did not train on (a crash, or fewer than
        learning.min_examples at shutdown).  Memory reinforcement is not replayed: the last run may
        have applied it already, and applying it twice would bias the edges."""
        replayed = 0
        for rec, tier_scores in self.records.unlearned():
            try:
                self.learning.record(_interaction_of(rec, tier_scores, node_ids=[]))
                replayed += 1
            except (ValueError, TypeError) as e:  # e.g. a tier no longer configured
                log.warning("not replaying the labels of %s: %s", rec.request_id, e)
        if replayed:
            log.info("replayed the unlearned labels of %d answered requests into the learning queue", replayed)

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

    @property
    def in_flight(self) -> int:
        """Requests holding an admission slot right now (streams included)."""
        with self._lock:
            return len(self._inflight)

    def drain(self, grace_s: float) -> int:
        """Stop admitting requests (``ShuttingDown``), let those in flight finish for up to `grace_s`
        seconds, then cancel the rest and give them CANCEL_SETTLE_S to leave.  Returns how many were
        cancelled.  A cancelled request writes nothing back; its client gets ``Cancelled``."""
        with self._lock:
            self._draining = True
        until = time.monotonic() + grace_s
        while self._inflight and time.monotonic() < until:
            time.sleep(0.05)
        with self._lock:
            cancelled = list(self._inflight.values())
        for cancel in cancelled:
            cancel.set()
        until = time.monotonic() + CANCEL_SETTLE_S
        while self._inflight and time.monotonic() < until:  # a stream whose client stopped reading may stay
            time.sleep(0.05)
        if cancelled:
            log.info("shutdown: cancelled %d request(s) still running after %.1f s", len(cancelled), grace_s)
        return len(cancelled)

    def close(self) -> None:
        """Shut down in dependency order: no new requests, in-flight ones cancelled, background loops
        stopped, a final learning cycle, learned state saved, memory drained and closed, and the
        models freed last (the pool waits until no thread is inside a decode step)."""
        if self._closed:
            return
        self._closed = True
        self.drain(0.0)
        self._stop_compression.set()
        if self._compression_thread is not None:
            self._compression_thread.join()  # a pass in flight finishes its writes before memory closes
        self._stop_learning.set()
        if self._learning_thread is not None:
            self._learning_thread.join()
        self.learning.stop()
        if self.config.learning.enabled:
            try:
                report = self.learn()  # the labels of the last interval are trained on now, not lost
                log.info("final learning cycle: %s", {k: v for k, v in report.items() if not isinstance(v, dict)})
            except Exception:  # noqa: BLE001 - shutdown goes on; the labels stay unlearned in the request log
                log.exception("final learning cycle failed")
        try:
            self.learning.save_state()
        except Exception:  # noqa: BLE001
            log.exception("saving learned state at shutdown failed")
        self.memory.close()  # drains the writeback queue
        if self._owns_pool:
            self.pool.close()
        self.records.close()

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
    def admit(self, request: Request, cancel: threading.Event | None = None):
        """Admission: one of `max_concurrent_requests` slots, and the request's cancel flag registered
        so drain() can cancel it; yields the flag."""
        if self._draining:
            raise ShuttingDown("the server is shutting down and admits no new requests; retry on another "
                               "instance or after the restart")
        if not self._slots.acquire(blocking=False):
            self.metrics.errors.labels(stage="admission").inc()
            raise Overloaded(f"{self.config.system.max_concurrent_requests} requests already running "
                             f"(system.max_concurrent_requests); retry shortly")
        cancel = cancel or threading.Event()
        with self._lock:
            self._inflight[request.request_id] = cancel
        try:
            yield cancel
        except Cancelled:
            raise
        except Exception:
            self.metrics.errors.labels(stage="pipeline").inc()
            raise
        finally:
            with self._lock:
                self._inflight.pop(request.request_id, None)
            self._slots.release()

    @contextlib.contextmanager
    def _stage(self, name: str, prep: Prepared):
        t = time.perf_counter()
        with stage_span(name, prep.request.request_id):
            yield
        prep.latency_ms[name] = (time.perf_counter() - t) * 1000


class ResponseStream:
    """Text chunks of one answer; the judge and writeback run when the last chunk has been read.

    While open, a stream holds an admission slot and its model.  ``close()`` (the client went away)
    cancels it and releases both at once -- or, when another thread is inside a step right now, as
    soon as that step ends.  A stream cancelled by shutdown raises ``Cancelled`` on the next read.
    """

    def __init__(self, llm: RuvLLM, request: Request):
        self._llm = llm
        self.request = request
        self.response: Response | None = None
        self.cancel = threading.Event()
        self._step_lock = threading.Lock()  # one thread inside the generator at a time; close() waits its turn
        self._done = False
        self._iter = self._run()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        with self._step_lock:
            if self._done:
                if self.cancel.is_set() and self.response is None:
                    raise Cancelled(f"request {self.request.request_id} was cancelled before it finished")
                raise StopIteration
            try:
                chunk = next(self._iter)
            except BaseException:
                self._done = True
                raise
            if self.cancel.is_set():  # cancelled during this step: release the slot and the model now
                self._close_locked()
            return chunk

    def close(self) -> None:
        """Cancel and release the slot and the model (without blocking on a step in progress)."""
        self.cancel.set()
        if self._step_lock.acquire(blocking=False):
            try:
                self._close_locked()
            finally:
                self._step_lock.release()

    def _close_locked(self) -> None:
        if not self._done:
            self._done = True
            self._iter.close()  # GeneratorExit: the pool stream, then the slot, are released by their `with`

    def _run(self) -> Iterator[str]:
        llm = self._llm
        with llm.admit(self.request, self.cancel):
            prep = llm.prepare(self.request)
            t = time.perf_counter()
            with llm.pool.stream(prep.decision.tier, prep.messages, **llm.sampling(prep),
                                 session_id=_kv_session(self.request), cancel=self.cancel,
                                 logprobs=llm.judge.weights["logprob"] > 0) as stream:
                yield from stream
            prep.latency_ms["generate"] = (time.perf_counter() - t) * 1000
            if stream.result.finish_reason == "cancelled":
                raise Cancelled(f"request {self.request.request_id} was cancelled before it finished")
            self.response = llm.finish(prep, stream.result)


def _kv_session(request: Request) -> str | None:
    """The inference pool's prefix-cache key: per tenant, so one tenant never resumes another's prompt."""
    if request.session_id is None or request.tenant is None:
        return request.session_id
    return f"{request.tenant}/{request.session_id}"


def _interaction_of(rec: AnsweredRecord, tier_scores: dict[str, float], node_ids: list[int]) -> Interaction:
    """Rebuild a learning Interaction from its durable record (the router's hidden state is not kept)."""
    x_fields = {f.name for f in dataclasses.fields(RouterInput)}
    x = RouterInput(query_vec=rec.query_vec, **{k: v for k, v in rec.router_input.items() if k in x_fields})
    decision = None
    if rec.decision:
        d_fields = {f.name for f in dataclasses.fields(RoutingDecision)}
        decision = RoutingDecision(**{k: v for k, v in rec.decision.items() if k in d_fields})
    return Interaction(request_id=rec.request_id, x=x, decision=decision, tier_scores=dict(tier_scores),
                       node_ids=list(node_ids))


def _mean_degree(sg: Subgraph) -> float:
    return 2.0 * sg.num_edges / len(sg) if len(sg) else 0.0


def _remaining_ms(budget_ms: float | None, t0: float) -> float | None:
    if budget_ms is None:
        return None
    return max(1.0, budget_ms - (time.perf_counter() - t0) * 1000)
