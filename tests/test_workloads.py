"""Workloads: determinism, exact gold answers, JSONL round trip, shift schedules, gold matching."""
from __future__ import annotations

import datetime as dt
import json
import re

import pytest

from ruvllm_lab import workloads as W


def test_generate_is_deterministic_and_seed_sensitive():
    a = W.generate(n=60, seed=3)
    b = W.generate(n=60, seed=3)
    c = W.generate(n=60, seed=4)
    assert a == b
    assert a != c
    assert len(a) == 60
    assert {it.family for it in a} == set(W.FAMILIES)


def test_difficulties_and_family_weights_are_respected():
    items = W.generate(["arithmetic", "string"], n=40, seed=0, difficulties=[2])
    assert {it.difficulty for it in items} == {2}
    assert {it.family for it in items} <= {"arithmetic", "string"}
    only = W.generate({"units": 1.0, "date": 0.0}, n=30, seed=1)
    assert {it.family for it in only} == {"units"}


@pytest.mark.parametrize("difficulty,digits", [(1, 1), (2, 2), (3, 3)])
def test_arithmetic_gold_is_the_computed_result(difficulty, digits):
    items = W.generate(["arithmetic"], n=50, seed=difficulty, difficulties=[difficulty])
    for it in items:
        m = re.match(r"What is (\d+) ([+\-*]) (\d+)\?", it.query)
        assert m, it.query
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        assert len(str(a)) == digits and len(str(b)) == digits
        assert int(it.answer) == {"+": a + b, "-": a - b, "*": a * b}[op]
        assert it.match == "number"


def test_unit_string_date_gold_answers_are_exact():
    for it in W.generate(["units"], n=40, seed=2):
        value, src, dst = re.match(r"Convert (\d+) (\w+) to (\w+)\.", it.query).groups()
        factor = {f[0] + f[1]: f[2] for fs in W._UNITS.values() for f in fs}[src + dst]
        assert int(it.answer) == int(value) * factor
    for it in W.generate(["string"], n=60, seed=5):
        word = re.search(r"word '(\w+)'", it.query).group(1)
        if it.difficulty == 1:
            assert it.answer == word.upper()
        elif it.difficulty == 2:
            assert it.answer == word[::-1]
        else:
            letter = re.search(r"letter '(\w)'", it.query).group(1)
            assert int(it.answer) == word.count(letter)
    for it in W.generate(["date"], n=60, seed=6):
        if it.difficulty == 1:
            n, start = re.search(r"comes (\d+) days? after (\w+)", it.query).groups()
            assert it.answer == W._WEEKDAYS[(W._WEEKDAYS.index(start) + int(n)) % 7]
        elif it.difficulty == 2:
            n, start = re.search(r"What date is (\d+) days after ([\d-]+)", it.query).groups()
            assert it.answer == (dt.date.fromisoformat(start) + dt.timedelta(days=int(n))).isoformat()
        else:
            a, b = re.findall(r"\d{4}-\d{2}-\d{2}", it.query)
            assert int(it.answer) == (dt.date.fromisoformat(b) - dt.date.fromisoformat(a)).days


def test_factual_items_come_from_the_knowledge_corpus():
    facts = {f.question: f for f in W.load_knowledge()}
    assert len(facts) >= 60
    for it in W.generate(["factual"], n=40, seed=7):
        question = next(q for q in facts if it.query.startswith(q))
        assert it.answer == facts[question].answer
        assert it.difficulty == facts[question].difficulty
        assert it.answer in it.context  # the supporting fact states the answer


def test_jsonl_round_trip_and_errors(tmp_path):
    items = W.generate(n=25, seed=9)
    path = W.save_jsonl(items, tmp_path / "set.jsonl")
    assert W.load_jsonl(path) == items
    minimal = tmp_path / "minimal.jsonl"
    minimal.write_text(json.dumps({"query": "What is 2 + 2?", "answer": 4}) + "\n\n")
    (it,) = W.load_jsonl(minimal)
    assert (it.answer, it.family, it.difficulty, it.match) == ("4", "custom", 1, "text")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "answer": "a"}\n{"query": "q2"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing key\(s\) answer"):
        W.load_jsonl(bad)
    bad.write_text('{"query": "q", "answer": "a", "colour": 1}\n')
    with pytest.raises(ValueError, match="unknown key"):
        W.load_jsonl(bad)
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="invalid JSON"):
        W.load_jsonl(bad)
    with pytest.raises(FileNotFoundError):
        W.load_jsonl(tmp_path / "missing.jsonl")


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown workload family 'poetry'"):
        W.generate(["poetry"], n=3)
    with pytest.raises(ValueError, match="difficulties"):
        W.generate(n=3, difficulties=[4])
    with pytest.raises(ValueError, match="n must be"):
        W.generate(n=-1)
    with pytest.raises(ValueError, match="match"):
        W.WorkItem("q", "a", "f", 1, match="fuzzy")


def test_shift_schedule_phases_follow_their_mix_and_are_stable():
    phases = W.shift_schedule([{"arithmetic": 1}, {"factual": 1}, {"string": 1, "date": 1}], n_per_phase=30, seed=1)
    assert [len(p.items) for p in phases] == [30, 30, 30]
    assert {it.family for it in phases[0].items} == {"arithmetic"}
    assert {it.family for it in phases[1].items} == {"factual"}
    assert {it.family for it in phases[2].items} == {"string", "date"}
    assert phases[1].name == "phase1:factual"
    two = W.shift_schedule([{"arithmetic": 1}, {"factual": 1}], n_per_phase=30, seed=1)
    assert two[0].items == phases[0].items and two[1].items == phases[1].items  # adding a phase changes nothing before
    with pytest.raises(ValueError):
        W.shift_schedule([], 10)


@pytest.mark.parametrize("match,gold,answer,expected", [
    ("number", "82", "37 + 45 = 82", True),
    ("number", "82", "82 (because 37 + 45)", True),
    ("number", "82", "The answer is 81.", False),
    ("number", "1000", "It is 1,000 metres.", True),
    ("number", "45", "", False),
    ("text", "Brasilia", "The capital is Brasília.", True),
    ("text", "art", "Let us start.", False),
    ("text", "2024-01-30", "2024-01-30", True),
    ("case", "GARDEN", "garden", False),
    ("case", "GARDEN", "GARDEN", True),
    ("text", "Paris", "Lyon\nParis", False),  # only the first line counts
])
def test_is_correct(match, gold, answer, expected):
    assert W.is_correct(W.WorkItem("q", gold, "f", 1, match), answer) is expected
