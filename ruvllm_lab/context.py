"""Context building: which memories reach the model's prompt, and how they are shown.

The memory keeps everything (every answer stays in the graph for learning, edges and
compression); this module decides what the *model* sees.  A memory shown to a frozen model
is taken as fact, so a note must be both **trusted** and **about this question**, or no note
goes in at all.

Per query (``ContextBuilder``)::

    retrieve : search_k nearest memories + correction_k nearest corrections (cosine of the
               correction, embedded with its question, >= correction_min_score); graph expansion
               around them (graph attention needs the edges)
    select   : graph attention ranks the subgraph; every candidate passes the gate below;
               corrections first, then ranked notes, at most max_notes and max_note_tokens
    messages : system prompt, session history, then the notes (each with its provenance)
               and the question in the last user turn

The gate (``ContextBuilder.admits``), all of:

* **visible**: the node's tenant is the request's tenant or the shared namespace;
* **trusted** (``trusted``): a correction or a document always; an interaction when
  ``note_policy = "verified"`` and its verification is in ``trusted_verifications`` with
  quality >= ``min_note_quality``; under ``"all"`` (the pre-trust behaviour, for ablations)
  every interaction except a corrected one or one checked and found wrong (gold or rated, below
  ``min_note_quality``); ``"off"`` shows nothing; concept summaries (of unverified answers) only
  under ``"all"``;
* **about this question** (``about_same_question``): cosine between the query and the note's
  question >= ``relevance_threshold`` (calibrated per embedding model from paraphrase vs
  unrelated pairs, ``calibrate_threshold``), and with ``match_key_terms`` the two questions
  name the same numbers and proper nouns ("12 + 30" is not about "12 + 31", "capital of
  Greece" not about "capital of Portugal", however close their embeddings).

Verification of an interaction node (``metadata["verification"]``), set at writeback and
updated by feedback: ``gold`` (checked against a gold answer), ``rated`` (a user's 1-5
rating), ``corrected`` (a user corrected it: never shown again), ``judged`` (an LLM judge's
signal), ``unverified`` (log-prob confidence at most: not evidence of correctness, see the
judge calibration in the README).
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .config import PromptConfig, RetrievalConfig
from .graph import Subgraph
from .types import Session, Source

_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_SENTENCE_START = re.compile(r"(?:^|[.?!:;]\s+)([A-Za-z][\w-]*)")
_TOKEN = re.compile(r"[a-z0-9]+")
# Function words: a paraphrase may add, drop or swap these freely.
_FUNCTION_WORDS = frozenset("""a an the of for in on at to by with from and or is are was were be been does do did
has have had what which who whom whose how many much when where why this that these those it its there
through around into about over under between
""".split())
SIBLING_MIN_RATIO = 0.6  # token-sequence similarity above which a swapped content word is a sibling question


def _numbers(text: str) -> list[str]:
    return sorted(str(float(n)) for n in _NUMBER.findall(text))


def _words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text.replace("'s ", " "))}


def proper_nouns(text: str) -> set[str]:
    """Capitalised words that do not start a sentence (lower-cased): names, places, languages."""
    starts = {m.start(1) for m in _SENTENCE_START.finditer(text)}
    return {m.group(0).lower() for m in _WORD.finditer(text)
            if m.group(0)[0].isupper() and m.start() not in starts}


def _stem(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") else word


def sibling_questions(a: str, b: str) -> bool:
    """Same template, another slot filler: "...symbol for calcium?" vs "...symbol for sodium?".

    The token sequences mostly align (difflib ratio >= SIBLING_MIN_RATIO) and an aligned
    replacement swaps a content word for another content word.  Paraphrases restructure the
    sentence or swap only function words, so they are not siblings (an in-place synonym such as
    "largest" -> "biggest" is, and is rejected: precision over recall).
    """
    ta, tb = _TOKEN.findall(a.lower()), _TOKEN.findall(b.lower())
    matcher = difflib.SequenceMatcher(None, ta, tb, autojunk=False)
    if matcher.ratio() < SIBLING_MIN_RATIO:
        return False
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "replace":
            left = {_stem(w) for w in ta[i1:i2] if w not in _FUNCTION_WORDS}
            right = {_stem(w) for w in tb[j1:j2] if w not in _FUNCTION_WORDS}
            if left and right and left != right:
                return True
    return False


def key_terms_agree(a: str, b: str) -> bool:
    """Whether two questions ask the same thing, beyond embedding similarity.

    They name the same numbers (as a multiset), each one's proper nouns occur in the other
    (sentence-initial words are not taken as names: "Portugal has which city as its capital?"
    agrees with "What is the capital of Portugal?", "...of Greece?" does not), and they are not
    sibling questions (``sibling_questions``).
    """
    if _numbers(a) != _numbers(b):
        return False
    if not (proper_nouns(a) <= _words(b) and proper_nouns(b) <= _words(a)):
        return False
    return not sibling_questions(a, b)


def note_question(text: str, metadata: dict[str, Any]) -> str:
    """The question a stored memory answers: recorded at writeback, or the ``Q:`` line of older nodes."""
    question = metadata.get("question")
    if question:
        return str(question)
    if text.startswith("Q: "):
        return text[3:].split("\nA:", 1)[0]
    return text


def trusted(kind: str, metadata: dict[str, Any], quality: float, config: RetrievalConfig) -> bool:
    """Whether a memory may be put in front of the model as a fact (module docstring)."""
    if config.note_policy == "off":
        return False
    if kind in ("correction", "document"):
        return True
    if kind == "concept":
        return config.note_policy == "all"
    verification = metadata.get("verification", "unverified")
    if verification == "corrected":
        return False
    checked = verification in ("gold", "rated")
    if config.note_policy == "all":  # known-bad answers stay out; nobody checked the others
        return not checked or quality >= config.min_note_quality
    return verification in config.trusted_verifications and quality >= config.min_note_quality


def provenance(kind: str, metadata: dict[str, Any]) -> str:
    """How the model is told where a note comes from."""
    if kind == "correction":
        return "Correction from a user"
    if kind == "document":
        return "Document"
    if kind == "concept":
        return "Summary of earlier answers (unverified)"
    verification = metadata.get("verification", "unverified")
    if verification == "gold":
        return "Earlier answer, checked against a reference answer"
    if verification == "rated":
        return f"Earlier answer, rated {metadata.get('rating', '?')}/5 by a user"
    if verification == "judged":
        return f"Earlier answer, judged {float(metadata.get('signal', 0.0)):.2f} by a model"
    return "Earlier answer (unverified)"


def verification_of(signals: dict[str, float], score: float | None) -> tuple[str, float, dict[str, Any]]:
    """(verification, trust, metadata) of a fresh answer from the judge's signals.

    A gold answer decides (trust 1 or 0); an LLM judge's verdict is ``judged``; log-prob
    confidence alone leaves the answer ``unverified`` (it ranks answers, AUROC 0.69 against gold
    in the judge calibration, but does not make one a fact) with that score as its quality.
    """
    if "gold" in signals:
        return "gold", 1.0 if signals["gold"] >= 1.0 else 0.0, {}
    if "llm" in signals:
        return "judged", float(score if score is not None else signals["llm"]), {"signal": float(signals["llm"])}
    return "unverified", float(score) if score is not None else 0.5, {}


def calibrate_threshold(related: np.ndarray, unrelated: np.ndarray, max_false_positive_rate: float) -> dict:
    """Relevance threshold from labelled similarity distributions.

    The threshold is the smallest cosine at which at most ``max_false_positive_rate`` of the
    unrelated pairs pass (their (1 - rate) quantile, taken as an upper order statistic so
    the bound holds on the sample); the returned dict also reports the related pairs' recall
    at that threshold and both distributions' summary, to store with the profile.
    """
    related, unrelated = np.sort(np.asarray(related, np.float64)), np.sort(np.asarray(unrelated, np.float64))
    if len(related) == 0 or len(unrelated) == 0:
        raise ValueError("calibration needs related and unrelated pairs")
    allowed = int(np.floor(max_false_positive_rate * len(unrelated)))  # unrelated pairs allowed above
    threshold = float(np.nextafter(unrelated[len(unrelated) - 1 - allowed], np.inf))
    return {"threshold": threshold,
            "max_false_positive_rate": max_false_positive_rate,
            "false_positive_rate": float(np.mean(unrelated >= threshold)),
            "recall": float(np.mean(related >= threshold)),
            "n_related": int(len(related)), "n_unrelated": int(len(unrelated)),
            "related_mean": float(related.mean()), "unrelated_mean": float(unrelated.mean()),
            "unrelated_p99": float(np.quantile(unrelated, 0.99))}


def _render_note(source: Source, prompt: PromptConfig) -> str:
    """One line per note.  An earlier answer is shown with the question it answered
    (``prompt.answer_note``); other notes as their text."""
    if source.kind == "interaction" and source.text.startswith("Q: ") and "\nA: " in source.text:
        question, answer = source.text[3:].split("\nA: ", 1)
        return prompt.answer_note.format(provenance=source.provenance, question=" ".join(question.split()),
                                         answer=" ".join(answer.split()))
    return f"- {source.provenance}: {' '.join(source.text.split())}"


@dataclass
class Retrieved:
    """Search results for one query, before gating."""
    subgraph: Subgraph
    correction_ids: set[int]
    top_similarity: float
    hit_count: int


class ContextBuilder:
    """Retrieval + trust/relevance gate + attention ranking + prompt: one unit, configured by
    ``[retrieval]`` and ``[prompt]``.  ``memory``, ``attention`` and ``count_tokens`` are injected."""

    def __init__(self, retrieval: RetrievalConfig, prompt: PromptConfig, memory: Any, attention: Any,
                 count_tokens: Callable[[str], int], dimension: int, shared_namespace: str = "shared"):
        self.config, self.prompt = retrieval, prompt
        self.memory, self.attention, self.count_tokens = memory, attention, count_tokens
        self.dimension, self.shared_namespace = dimension, shared_namespace

    def visible(self, metadata: dict[str, Any], tenant: str | None) -> bool:
        owner = metadata.get("tenant")
        return owner == tenant or owner == self.shared_namespace

    def retrieve(self, query_vec: np.ndarray, tenant: str | None = None) -> Retrieved:
        c = self.config
        # Over-fetch so that other tenants' nodes filtered out here do not starve this one.
        hits = [h for h in self.memory.search(query_vec, c.search_k * 2) if self.visible(h.metadata, tenant)]
        hits = hits[: c.search_k]
        corrections = [h for h in self.memory.search(query_vec, c.correction_k * 2, kinds=("correction",))
                       if h.score >= c.correction_min_score and self.visible(h.metadata, tenant)][: c.correction_k]
        seeds = {h.node_id: h.score for h in hits + corrections}
        subgraph = (self.memory.expand(list(seeds), seed_scores=seeds) if seeds else Subgraph.empty(self.dimension))
        return Retrieved(subgraph, {h.node_id for h in corrections}, max(seeds.values(), default=0.0), len(hits))

    def admits(self, query: str, query_vec: np.ndarray, sg: Subgraph, p: int, tenant: str | None) -> bool:
        """The gate of the module docstring, for the candidate at position `p` of the subgraph."""
        kind, text, meta, vector = sg.kinds[p], sg.texts[p], sg.metadata[p], sg.vectors[p]
        if not self.visible(meta, tenant) or not trusted(kind, meta, float(sg.quality[p]), self.config):
            return False
        if kind == "correction":
            # Matched by correction_min_score in retrieve(); it must still correct *this* question.
            question = meta.get("question")
            return not (self.config.match_key_terms and question) or key_terms_agree(query, str(question))
        # An interaction is stored under its question's embedding, a document under its text's.
        if float(vector @ query_vec) < self.config.relevance_threshold:
            return False
        if self.config.match_key_terms:
            if kind == "document":
                # A document may name more than the question; the question's terms must be in it.
                if _numbers(query) and not set(_numbers(query)) <= set(_numbers(text)):
                    return False
                if not proper_nouns(query) <= _words(text):
                    return False
            elif not key_terms_agree(query, note_question(text, meta)):
                return False
        return True

    def select(self, query: str, query_vec: np.ndarray, retrieved: Retrieved, max_items: int,
               tenant: str | None = None) -> list[Source]:
        """Gated notes, corrections first then by attention rank, within the note and token budgets."""
        c, sg = self.config, retrieved.subgraph
        if c.note_policy == "off" or len(sg) == 0 or c.max_notes == 0:
            return []
        pos = {node_id: i for i, node_id in enumerate(sg.node_ids)}
        ranked = self.attention.rank(query_vec, sg)
        ranked.sort(key=lambda r: r[0] not in retrieved.correction_ids)  # stable: corrections first
        chosen: list[Source] = []
        used_tokens, other_notes = 0, 0
        for node_id, score in ranked:
            if len(chosen) >= c.max_notes:
                break
            p, is_correction = pos[node_id], node_id in retrieved.correction_ids
            if not is_correction and other_notes >= max_items:
                continue
            if not is_correction and sg.kinds[p] == "correction":
                continue  # a correction of some other question, reached by expansion
            if not self.admits(query, query_vec, sg, p, tenant):
                continue
            cost = self.count_tokens(sg.texts[p])
            if used_tokens + cost > c.max_note_tokens:
                continue
            used_tokens += cost
            other_notes += not is_correction
            chosen.append(Source(node_id, sg.texts[p], float(score), sg.kinds[p],
                                 provenance=provenance(sg.kinds[p], sg.metadata[p])))
        if any(s.kind == "correction" for s in chosen):
            # A user's correction of this very question is the answer; older answers to it are
            # what was wrong, and a small model copies whatever it is shown.
            chosen = [s for s in chosen if s.kind == "correction"]
        return chosen

    def messages(self, query: str, sources: Sequence[Source], session: Session | None) -> list[dict]:
        """System prompt, session history, then notes + the question in the last user turn.

        The notes change with every query, so they go last: the system prompt and history stay a
        stable prefix that the inference pool's session KV cache can reuse on the next turn.
        """
        messages = [{"role": "system", "content": self.prompt.system_prompt}]
        history = session.turns[-self.prompt.history_turns:] if session and self.prompt.history_turns else []
        for turn in history:
            messages += [{"role": "user", "content": turn.prompt or turn.query},
                         {"role": "assistant", "content": turn.answer}]
        notes = [_render_note(s, self.prompt) for s in sources]
        content = query if not notes else (self.prompt.notes_header + "\n" + "\n".join(notes) + "\n\n"
                                           + self.prompt.question_with_notes.format(query=query))
        messages.append({"role": "user", "content": content})
        return messages
