"""Workloads: query sets with exact gold answers, for routing, forgetting and compression runs.

Two sources:

* ``load_jsonl(path)`` — researchers bring their own set, one JSON object per line with
  ``{"query", "answer", "family", "difficulty"}`` (optional ``"match"``: ``number`` | ``text`` |
  ``case``, default ``text``; optional ``"aliases"``: other accepted spellings of a text answer).
  ``save_jsonl`` writes the same format back.
* ``generate(families, n, seed, difficulties)`` — built-in families whose gold answers are
  computed, not looked up, so they are exact:

  ========== ===================================================== ====================
  family     difficulty 1 / 2 / 3                                   gold
  ========== ===================================================== ====================
  arithmetic operands of 1 / 2 / 3 digits, operator + - *           the integer result
  units      x1000 metric / one-step time & length / two-step      integer
  string     uppercase / reverse a word / count a letter            exact string or int
  date       weekday after n days / date + n days / days between    weekday, ISO date, int
  factual    facts of ``data/knowledge.jsonl`` by their difficulty   the fact's answer
  ========== ===================================================== ====================

Everything is drawn from ``random.Random(seed)``: the same arguments give the same items in
the same order on every machine.  ``shift_schedule`` builds phases with different family
mixes (distribution shift) for forgetting runs.

``is_correct(item, answer)`` is the one strict gold matcher: experiments, the learning judge
(``learning.judge.gold_match`` shares its core, ``answer_matches``), the demo and the benches all
use it; its rules are in ``answer_matches``'s docstring.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

FAMILIES = ("arithmetic", "units", "string", "date", "factual")
DIFFICULTIES = (1, 2, 3)
MATCH_MODES = ("number", "text", "case")
KNOWLEDGE_PATH = Path(__file__).resolve().parent.parent / "data" / "knowledge.jsonl"

_SUFFIX_NUMBER = " Answer with just the number."


@dataclass(frozen=True)
class WorkItem:
    """One query with its gold answer.

    ``match`` says how an answer is compared with ``answer`` (see ``is_correct``);
    ``context`` is an optional supporting text (the knowledge fact for ``factual`` items).
    """

    query: str
    answer: str
    family: str
    difficulty: int
    match: str = "text"
    context: str = ""
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.aliases, (list, tuple)) and all(isinstance(a, str) and a.strip() for a in self.aliases):
            object.__setattr__(self, "aliases", tuple(self.aliases))  # JSON gives lists; keep the item hashable
        else:
            raise ValueError(f"WorkItem.aliases must be a list of non-empty strings, got {self.aliases!r}")
        if not isinstance(self.query, str) or not self.query.strip():
            raise ValueError("WorkItem.query must be a non-empty string")
        if not isinstance(self.answer, str) or not self.answer.strip():
            raise ValueError(f"WorkItem.answer must be a non-empty string (query {self.query!r})")
        if isinstance(self.difficulty, bool) or not isinstance(self.difficulty, int) or self.difficulty < 1:
            raise ValueError(f"WorkItem.difficulty must be an integer >= 1, got {self.difficulty!r}")
        if self.match not in MATCH_MODES:
            raise ValueError(f"WorkItem.match = {self.match!r}: allowed values are {', '.join(MATCH_MODES)}")

    @property
    def item_id(self) -> str:
        """Stable 12-hex id from query and gold answer (same item -> same id everywhere)."""
        return hashlib.sha1(f"{self.query}\x00{self.answer}".encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- JSONL ------------------------------------------------------------------------------

def load_jsonl(path: str | os.PathLike) -> list[WorkItem]:
    """Read ``{query, answer, family, difficulty[, match, context]}`` lines; blank lines are skipped.

    Raises ``ValueError`` naming the file and line of the first malformed record.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"workload file not found: {path}")
    known = {f.name for f in dataclasses.fields(WorkItem)}
    items = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(raw).__name__}")
        missing = [k for k in ("query", "answer") if k not in raw]
        if missing:
            raise ValueError(f"{path}:{lineno}: missing key(s) {', '.join(missing)}; "
                             "expected {query, answer, family, difficulty}")
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{path}:{lineno}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        raw.setdefault("family", "custom")
        raw.setdefault("difficulty", 1)
        if not isinstance(raw["answer"], str):
            raw["answer"] = str(raw["answer"])
        try:
            items.append(WorkItem(**raw))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}:{lineno}: {e}") from None
    return items


def save_jsonl(items: Iterable[WorkItem], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for item in items:
            fh.write(json.dumps(item.to_dict(), ensure_ascii=False) + "\n")
    return path


# ---- knowledge corpus -------------------------------------------------------------------

@dataclass(frozen=True)
class Fact:
    id: str
    category: str
    question: str
    answer: str
    fact: str
    difficulty: int
    aliases: tuple[str, ...] = ()  # other accepted spellings ("Dostoyevsky" for "Dostoevsky")


def load_knowledge(path: str | os.PathLike | None = None) -> list[Fact]:
    """The seeded knowledge corpus (``data/knowledge.jsonl``): short facts with question and answer."""
    path = Path(path) if path else KNOWLEDGE_PATH
    if not path.exists():
        raise FileNotFoundError(f"knowledge corpus not found: {path}")
    facts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            raw = json.loads(line)
            raw["aliases"] = tuple(raw.get("aliases", ()))
            facts.append(Fact(**raw))
    return facts


# ---- generators -------------------------------------------------------------------------
# Each takes (rng, difficulty) and returns a WorkItem; difficulty is 1, 2 or 3.

def _arithmetic(rng: random.Random, d: int) -> WorkItem:
    lo, hi = 10 ** (d - 1) if d > 1 else 1, 10 ** d - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    op = rng.choice("+-*")
    if op == "-" and b > a:
        a, b = b, a  # keep results non-negative: small models trip on signs, not on the skill measured
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    return WorkItem(f"What is {a} {op} {b}?{_SUFFIX_NUMBER}", str(result), "arithmetic", d, "number")


# (from-unit, to-unit, factor) per difficulty; difficulty 3 chains two conversions.
_UNITS = {
    1: [("kilometres", "metres", 1000), ("kilograms", "grams", 1000), ("litres", "millilitres", 1000),
        ("metres", "centimetres", 100)],
    2: [("hours", "minutes", 60), ("minutes", "seconds", 60), ("feet", "inches", 12), ("days", "hours", 24),
        ("weeks", "days", 7), ("yards", "feet", 3)],
    3: [("hours", "seconds", 3600), ("days", "minutes", 1440), ("weeks", "hours", 168), ("kilometres", "centimetres", 100_000),
        ("yards", "inches", 36)],
}


def _units(rng: random.Random, d: int) -> WorkItem:
    src, dst, factor = rng.choice(_UNITS[d])
    value = rng.randint(2, 9 if d == 3 else 19)
    return WorkItem(f"Convert {value} {src} to {dst}.{_SUFFIX_NUMBER}", str(value * factor), "units", d, "number")


_WORDS = {
    1: ["cat", "sun", "tree", "book", "milk", "bird", "rain", "fish", "door", "lamp"],
    2: ["garden", "planet", "window", "rocket", "silver", "button", "candle", "forest", "pencil", "market"],
    3: ["elephant", "mountain", "computer", "umbrella", "strawberry", "telescope", "butterfly", "hospital",
        "chocolate", "adventure", "mississippi", "bookkeeper", "programming", "committee", "tennessee"],
}


def _string(rng: random.Random, d: int) -> WorkItem:
    if d == 1:
        word = rng.choice(_WORDS[1] + _WORDS[2])
        return WorkItem(f"Write the word '{word}' in uppercase letters. Answer with just the word.",
                        word.upper(), "string", d, "case")
    if d == 2:
        word = rng.choice(_WORDS[1] + _WORDS[2])
        return WorkItem(f"Reverse the letters of the word '{word}'. Answer with just the reversed word.",
                        word[::-1], "string", d, "case")
    word = rng.choice(_WORDS[3])
    letter = rng.choice(sorted(set(word)))
    return WorkItem(f"How many times does the letter '{letter}' appear in the word '{word}'?{_SUFFIX_NUMBER}",
                    str(word.count(letter)), "string", d, "number")


_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _random_date(rng: random.Random) -> _dt.date:
    return _dt.date(2020, 1, 1) + _dt.timedelta(days=rng.randint(0, 5 * 365))


def _date(rng: random.Random, d: int) -> WorkItem:
    if d == 1:
        start, n = rng.randrange(7), rng.randint(1, 6)
        days = "day" if n == 1 else "days"
        return WorkItem(f"What day of the week comes {n} {days} after {_WEEKDAYS[start]}? Answer with just the day.",
                        _WEEKDAYS[(start + n) % 7], "date", d, "text")
    if d == 2:
        start, n = _random_date(rng), rng.randint(3, 40)
        end = start + _dt.timedelta(days=n)
        return WorkItem(f"What date is {n} days after {start.isoformat()}? Answer in YYYY-MM-DD format.",
                        end.isoformat(), "date", d, "text")
    start = _random_date(rng)
    end = start + _dt.timedelta(days=rng.randint(20, 400))
    return WorkItem(f"How many days are there from {start.isoformat()} to {end.isoformat()}?{_SUFFIX_NUMBER}",
                    str((end - start).days), "date", d, "number")


_KNOWLEDGE_CACHE: dict[str, list[Fact]] = {}


def _factual(rng: random.Random, d: int) -> WorkItem:
    key = str(KNOWLEDGE_PATH)
    if key not in _KNOWLEDGE_CACHE:
        _KNOWLEDGE_CACHE[key] = load_knowledge(KNOWLEDGE_PATH)
    pool = [f for f in _KNOWLEDGE_CACHE[key] if f.difficulty == d] or _KNOWLEDGE_CACHE[key]
    fact = rng.choice(pool)
    answer_is_number = re.fullmatch(r"\d+", fact.answer) is not None
    match = "number" if answer_is_number else ("case" if fact.category == "chemical_symbol" else "text")
    suffix = _SUFFIX_NUMBER if answer_is_number else " Answer briefly."
    return WorkItem(fact.question + suffix, fact.answer, "factual", d, match, context=fact.fact, aliases=fact.aliases)


GENERATORS: dict[str, Callable[[random.Random, int], WorkItem]] = {
    "arithmetic": _arithmetic,
    "units": _units,
    "string": _string,
    "date": _date,
    "factual": _factual,
}


def _check_families(families: Iterable[str]) -> list[str]:
    families = list(families)
    unknown = [f for f in families if f not in GENERATORS]
    if unknown:
        raise ValueError(f"unknown workload family {', '.join(map(repr, unknown))}; known: {', '.join(GENERATORS)}")
    if not families:
        raise ValueError("name at least one workload family")
    return families


def _check_difficulties(difficulties: Iterable[int]) -> list[int]:
    difficulties = list(difficulties)
    bad = [d for d in difficulties if d not in DIFFICULTIES]
    if bad or not difficulties:
        raise ValueError(f"difficulties must be a non-empty subset of {DIFFICULTIES}, got {difficulties!r}")
    return difficulties


def generate(families: Sequence[str] | Mapping[str, float] | None = None, n: int = 100, seed: int = 0,
             difficulties: Sequence[int] = DIFFICULTIES, distinct: bool = False) -> list[WorkItem]:
    """``n`` items drawn from ``families`` (a list: uniform; a mapping: weights) and ``difficulties``.

    Reproducible: a function of the arguments only.  Family and difficulty of each item are
    drawn first, then its content, from one ``random.Random(seed)``.  ``distinct=True`` skips a
    drawn query already in the set (a repeated query lets a memory-based router look its label
    up), drawing on until ``n`` distinct queries exist; ``ValueError`` when the families cannot
    supply that many.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    if families is None:
        families = FAMILIES
    if isinstance(families, Mapping):
        names = _check_families(families)
        weights = [float(families[f]) for f in names]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"family weights must be >= 0 and not all 0, got {dict(families)!r}")
    else:
        names = _check_families(families)
        weights = [1.0] * len(names)
    diffs = _check_difficulties(difficulties)
    rng = random.Random(seed)
    items: list[WorkItem] = []
    seen: set[str] = set()
    draws, max_draws = 0, 50 * n + 100
    while len(items) < n:
        if draws >= max_draws:
            raise ValueError(f"families {names} x difficulties {diffs} gave only {len(items)} distinct queries "
                             f"in {draws} draws; ask for fewer than {n}")
        draws += 1
        family = rng.choices(names, weights=weights)[0]
        d = rng.choice(diffs)
        item = GENERATORS[family](rng, d)
        if distinct:
            if item.query in seen:
                continue
            seen.add(item.query)
        items.append(item)
    return items


@dataclass
class Phase:
    """One phase of a distribution-shift schedule: its family mix and its items."""

    index: int
    mix: dict[str, float]
    items: list[WorkItem] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"phase{self.index}:" + "+".join(f for f, w in self.mix.items() if w > 0)


DEFAULT_PHASES = ({"arithmetic": 1.0, "units": 0.5}, {"string": 1.0}, {"factual": 1.0, "date": 0.25})


def shift_schedule(phases: Sequence[Mapping[str, float]] = DEFAULT_PHASES, n_per_phase: int = 100, seed: int = 0,
                   difficulties: Sequence[int] = DIFFICULTIES) -> list[Phase]:
    """Phases of ``n_per_phase`` items each, phase ``k`` drawn from the family mix ``phases[k]``.

    Each phase has its own seed (``seed * 1000 + k``) so adding a phase never changes earlier ones.
    """
    if not phases:
        raise ValueError("a shift schedule needs at least one phase")
    out = []
    for k, mix in enumerate(phases):
        if not isinstance(mix, Mapping):
            raise ValueError(f"phase {k}: expected a mapping family -> weight, got {mix!r}")
        out.append(Phase(k, {f: float(w) for f, w in mix.items()},
                         generate(dict(mix), n_per_phase, seed * 1000 + k, difficulties)))
    return out


def phases_by_family(items: Sequence[WorkItem], groups: Sequence[Sequence[str]]) -> list[Phase]:
    """Split ``items`` into phases, phase ``k`` holding the items of the families ``groups[k]`` (order
    kept).  A distribution shift over one fixed pool: the routing workload's cached outcomes serve
    the forgetting phases too.  ``ValueError`` when a family is in two groups or a phase is empty."""
    seen: set[str] = set()
    out = []
    for k, group in enumerate(groups):
        group = list(group)
        twice = seen.intersection(group)
        if twice:
            raise ValueError(f"family {sorted(twice)} is in more than one phase")
        seen.update(group)
        phase_items = [it for it in items if it.family in group]
        if not phase_items:
            raise ValueError(f"phase {k} ({'+'.join(group)}) has no items")
        out.append(Phase(k, {f: 1.0 for f in group}, phase_items))
    return out


# ---- gold match -------------------------------------------------------------------------
# One strict matcher.  A lenient one ("the gold anywhere in the output", "the first or the last
# number") gives a rambling tier more chances than a terse one and so biases every router
# comparison; here an answer states one value or it is wrong.

_ANSWER_LINE = re.compile(r"^\W*(?:final\s+)?answer\s*(?:is\s*)?[:：=]\s*(.*)$", re.IGNORECASE)
_ISO_DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b")
# a number not glued to a word ("3rd", "x2"); thousands commas ("1,000"); no sign after a digit
# ("40-50" is two numbers, a range)
_NUMBER_TOKEN = re.compile(r"(?<![\w.,])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?![\d\w])")
# an unevaluated expression ("1 * 7", "37+45", "6 x 7"): the answer echoes the question
_EXPRESSION = re.compile(r"\d\s*[+*/×÷^]\s*-?\d|\d\s+[-x]\s+\d")
_ASIDE = re.compile(r"\([^()]*\)|\[[^\[\]]*\]")
_EXPLANATION = re.compile(r"\b(?:because|since)\b", re.IGNORECASE)
_QUOTED = re.compile(r'"([^"]*)"|\u201c([^\u201d]*)\u201d')
QUOTED_QUESTION_MIN_WORDS = 3  # shorter quotes ("68") are answers, not the question restated


def _drop_quoted_question(span: str, query: str) -> str:
    """Remove a quoted restatement of the question (`The answer to "What is 90 - 22?" is 68`):
    context, like the numbers the question states; a span that only echoes it is left empty."""
    folded_query = f" {_fold(query)} "

    def context(m: re.Match) -> bool:
        quoted = _fold(m.group(1) if m.group(1) is not None else m.group(2))
        return len(quoted.split()) >= QUOTED_QUESTION_MIN_WORDS and f" {quoted} " in folded_query
    return _QUOTED.sub(lambda m: " " if context(m) else m.group(0), span)
_ALTERNATIVE = re.compile(r"\bor\b|\w\s*/\s*\w", re.IGNORECASE)
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")


def answer_span(answer: str) -> str:
    """The part of a generation that is the answer: the last explicit ``Answer:`` line if there
    is one, else the first non-empty line (with an ``Answer:`` prefix removed)."""
    lines = [ln.strip() for ln in (answer or "").splitlines() if ln.strip()]
    if not lines:
        return ""
    explicit = [m.group(1).strip() for ln in lines if (m := _ANSWER_LINE.match(ln))]
    return explicit[-1] if explicit else lines[0]


def _to_number(token: str) -> float:
    return float(token.replace(",", ""))


def _number_tokens(text: str) -> list[float]:
    return [_to_number(t) for t in _NUMBER_TOKEN.findall(_ISO_DATE.sub(" ", text))]


def _close(a: float, b: float, rel_tol: float, abs_tol: float) -> bool:
    return abs(a - b) <= max(rel_tol * max(abs(a), abs(b)), abs_tol)


def _number_matches(span: str, gold: float, query: str, rel_tol: float, abs_tol: float) -> bool:
    span = _ASIDE.sub(" ", span)  # "82 (37 + 45)": the aside is working, not a candidate
    span = _EXPLANATION.split(span, maxsplit=1)[0]  # "4, since 2 plus 2"
    if "=" in span:  # "37 + 45 = 82": the value after the last '=' is the answer
        span = span.rsplit("=", 1)[1]
    if _EXPRESSION.search(_ISO_DATE.sub(" ", span)):
        return False
    values = _number_tokens(span)
    # a number the question itself states ("5 kilometres is 5000 metres") is context, not a candidate
    # -- unless it equals the gold, so an echo still counts as stating the gold
    given = [v for v in _number_tokens(query) if not _close(v, gold, rel_tol, abs_tol)]
    candidates = [v for v in values if not any(_close(v, g, rel_tol, abs_tol) for g in given)]
    return bool(candidates) and all(_close(v, gold, rel_tol, abs_tol) for v in candidates)


def _typed_candidates(gold: str, span: str, query: str) -> tuple[set[str], set[str]] | None:
    """For golds of a closed type (weekday, month, ISO date): (candidates stated in the span,
    candidates stated in the query), casefolded; ``None`` for an open-ended text gold."""
    for vocabulary in (_WEEKDAYS, _MONTHS):
        if gold.strip().casefold() in {w.casefold() for w in vocabulary}:
            def found(text: str, vocab=vocabulary) -> set[str]:
                return {w.casefold() for w in vocab if re.search(rf"\b{w}\b", text, re.IGNORECASE)}
            return found(span), found(query)
    if _ISO_DATE.fullmatch(gold.strip()):
        return set(_ISO_DATE.findall(span)), set(_ISO_DATE.findall(query))
    return None


def is_number_gold(gold: str) -> bool:
    """Whether a gold answer is one number ("82", "1,000", "-2.5"): ``answer_matches``' auto mode."""
    return _NUMBER_TOKEN.fullmatch(gold.strip()) is not None


def answer_matches(answer: str, gold: str, *, match: str = "auto", aliases: Sequence[str] = (), query: str = "",
                   rel_tol: float = 1e-9, abs_tol: float = 1e-9) -> bool:
    """Whether ``answer`` states ``gold`` -- and only ``gold``.

    * Only the answer span counts (``answer_span``): the first non-empty line, or an explicit
      final ``Answer:`` line.
    * ``number`` (``auto``: when the gold is one number): numbers are compared as numbers
      ("1,000" = "1000" = "1000.0"); the value after the last ``=`` is the answer ("37 + 45 = 82");
      asides in brackets and an explanation after "because"/"since" are ignored; every other
      number left in the span is a candidate, except numbers the question states that differ
      from the gold.  Correct iff at least one candidate remains and all equal the gold.  So
      "40 or 45 or 50" and "40-50" are wrong, and so is an unevaluated expression ("1 * 7").
      A quoted restatement of the question (three words or more) is context, not an expression.
    * ``text``: the gold or one of its ``aliases`` occurs, accent-stripped, casefolded and without
      punctuation, as a whole-word sequence.  Closed-type golds (weekday, month, ISO date) are wrong
      when the span names another value of that type than those in the question (a list of all
      seven weekdays); open-ended golds are wrong when the span offers alternatives ("Paris or
      Lyon", "Paris/Lyon").
    * ``case``: as ``text`` but case-sensitive, so echoing 'garden' does not pass for 'GARDEN'.

    ``rel_tol``/``abs_tol``: numeric tolerance (exact by default: the built-in golds are integers).
    """
    if match not in MATCH_MODES + ("auto",):
        raise ValueError(f"match = {match!r}: allowed values are auto, {', '.join(MATCH_MODES)}")
    span = _drop_quoted_question(answer_span(answer), query or "")
    if not span.strip() or not gold.strip():
        return False
    if match == "auto":
        match = "number" if is_number_gold(gold) else "text"
    if match == "number":
        return _number_matches(span, _to_number(gold.strip()), query or "", rel_tol, abs_tol)
    case = match == "case"
    hay = f" {_fold(span, case)} "
    if not any(f" {_fold(g, case)} " in hay for g in (gold, *aliases) if _fold(g, case)):
        return False
    typed = _typed_candidates(gold, span, query or "")
    if typed is not None:
        stated, given = typed
        target = gold.strip().casefold()
        return stated - (given - {target}) == {target}
    if _ALTERNATIVE.search(span) and not any(_ALTERNATIVE.search(g) for g in (gold, *aliases)):
        return False
    return True


def _fold(text: str, case: bool = False) -> str:
    """Strip accents and punctuation, collapse spaces; casefold unless ``case``."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    if not case:
        text = text.casefold()
    text = re.sub(r"[^\w\s-]", " ", text)  # keep '-' so ISO dates survive
    return " ".join(text.split())


def is_correct(item: WorkItem, answer: str) -> bool:
    """Whether ``answer`` states the gold answer of ``item`` (``answer_matches`` with the item's
    match mode, aliases and query)."""
    return answer_matches(answer or "", item.answer, match=item.match, aliases=item.aliases, query=item.query)


def family_counts(items: Iterable[WorkItem]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for it in items:
        counts[it.family] = counts.get(it.family, 0) + 1
    return counts
