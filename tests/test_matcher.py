"""The one strict gold matcher (``workloads.is_correct`` / ``answer_matches``): the tricky cases.

A lenient matcher gives a rambling tier extra chances; every row here is a case where the
old matchers ("gold anywhere", "first or last number") and this one disagree, or a case a strict
matcher must still accept.
"""
from __future__ import annotations

import pytest

from ruvllm_lab import workloads as W
from ruvllm_lab.learning.judge import gold_match


def item(query, gold, match, aliases=()):
    return W.WorkItem(query, gold, "f", 1, match, aliases=tuple(aliases))


CASES = [
    # query, gold, match, answer, expected, why
    ("What is 37 + 45?", "82", "number", "82", True, "bare number"),
    ("What is 37 + 45?", "82", "number", "The answer is 82.", True, "a sentence stating one number"),
    ("What is 37 + 45?", "82", "number", "37 + 45 = 82", True, "value after '='"),
    ("What is 37 + 45?", "82", "number", "82 (37 + 45)", True, "aside in brackets"),
    ("What is 37 + 45?", "82", "number", "82.0", True, "numbers compared as numbers"),
    ("What is 37 + 45?", "82", "number", "**82**", True, "markdown emphasis"),
    ("What is 37 + 45?", "82", "number", "81", False, "wrong number"),
    ("What is 37 + 45?", "82", "number", "37 + 45", False, "unevaluated echo"),
    ("What is 1 * 7?", "7", "number", "1 * 7", False, "echo of the question whose gold is an operand"),
    ("What is 1 * 7?", "7", "number", "1 * 7 = 7", True, "evaluated echo"),
    ("What is 5 * 9?", "45", "number", "40 or 45 or 50", False, "several candidates"),
    ("What is 5 * 9?", "45", "number", "40-50", False, "a range"),
    ("What is 5 * 9?", "45", "number", "45, 54", False, "two candidates"),
    ("What is 5 * 9?", "45", "number", "45\n54", True, "only the first line counts"),
    ("What is 5 * 9?", "45", "number", "Let me think.\nAnswer: 45", True, "explicit final Answer: line"),
    ("What is 5 * 9?", "45", "number", "Answer: 45\nAnswer: 54", False, "the last Answer: line wins"),
    ("What is 2 + 2?", "4", "number", "4, since 2 plus 2", True, "explanation after 'since'"),
    ("Convert 5 kilometres to metres.", "5000", "number", "5 kilometres is 5,000 metres", True,
     "a number the question states is context"),
    ("Convert 5 kilometres to metres.", "5000", "number", "5", False, "echo of the question's number"),
    ("Convert 5 kilometres to metres.", "5000", "number", "It is 1,000 metres.", False, "thousands comma, wrong value"),
    ("How many days are there from 2021-01-01 to 2021-02-15?", "45", "number", "45 days", True, "units word"),
    ("How many days are there from 2021-01-01 to 2021-02-15?", "45", "number",
     "From 2021-01-01 to 2021-02-15 there are 45 days.", True, "dates are not count candidates"),
    ("What is 37 + 45?", "82", "number", "", False, "empty"),
    ("What day of the week comes 3 days after Monday?", "Thursday", "text", "Thursday", True, "weekday"),
    ("What day of the week comes 3 days after Monday?", "Thursday", "text", "3 days after Monday is Thursday.",
     True, "the question's weekday is context"),
    ("What day of the week comes 3 days after Monday?", "Thursday", "text",
     "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday", False, "all seven weekdays"),
    ("What day of the week comes 3 days after Monday?", "Thursday", "text", "Thursday or Friday", False,
     "two weekdays"),
    ("What date is 10 days after 2024-01-20?", "2024-01-30", "text", "2024-01-30", True, "ISO date"),
    ("What date is 10 days after 2024-01-20?", "2024-01-30", "text", "2024-01-20 + 10 days = 2024-01-30", True,
     "the question's date is context"),
    ("What date is 10 days after 2024-01-20?", "2024-01-30", "text", "2024-01-30 or 2024-01-31", False,
     "two dates"),
    ("Who wrote Crime and Punishment?", "Dostoevsky", "text", "Fyodor Dostoyevsky", True, "alias"),
    ("Who wrote Crime and Punishment?", "Dostoevsky", "text", "Tolstoy", False, "wrong author"),
    ("Which country's astronauts first walked on the Moon?", "United States", "text", "The USA.", True, "alias"),
    ("What is the capital of Brazil?", "Brasilia", "text", "The capital is Brasília.", True, "accents stripped"),
    ("What is the capital of France?", "Paris", "text", "Paris or Lyon", False, "alternatives"),
    ("What is the capital of France?", "Paris", "text", "Paris/Lyon", False, "alternatives with a slash"),
    ("What is the capital of France?", "Paris", "text", "Lyon\nParis", False, "only the first line counts"),
    ("What is art?", "art", "text", "Let us start.", False, "whole words only"),
    ("Write 'garden' in uppercase.", "GARDEN", "case", "garden", False, "echo in the wrong case"),
    ("Write 'garden' in uppercase.", "GARDEN", "case", "GARDEN", True, "case-sensitive match"),
    ("What is the chemical symbol of gold?", "Au", "case", "The symbol is Au.", True, "symbol in a sentence"),
    ("What is 90 - 22?", "68", "number", 'The answer to the question "What is 90 - 22?" is "68".', True,
     "a quoted restatement of the question is context"),
    ("What is 90 - 22?", "68", "number", '"What is 90 - 22?"', False, "a quoted echo alone states nothing"),
    ("What is 90 - 22?", "68", "number", 'The answer to "What is 90 - 22?" is 90 - 22.', False,
     "still an unevaluated expression after the quote"),
    ("What is 68 + 0?", "68", "number", '"68"', True, "a short quote is the answer, not the question"),
]


@pytest.mark.parametrize("query,gold,match,answer,expected,why", CASES, ids=[c[-1] for c in CASES])
def test_strict_matcher(query, gold, match, answer, expected, why):
    aliases = {"Dostoevsky": ["Dostoyevsky"], "United States": ["USA", "United States of America"]}.get(gold, [])
    assert W.is_correct(item(query, gold, match, aliases), answer) is expected, why


def test_knowledge_aliases_reach_the_work_items():
    facts = {f.answer: f for f in W.load_knowledge()}
    assert "Dostoyevsky" in facts["Dostoevsky"].aliases
    assert "USA" in facts["United States"].aliases
    items = [it for it in W.generate(["factual"], n=400, seed=0) if it.answer == "Dostoevsky"]
    assert items and W.is_correct(items[0], "Dostoyevsky")


def test_judge_gold_match_shares_the_strict_core():
    # the judge's serving path has no query: the same rules minus the question's context
    assert not gold_match("40 or 45 or 50", "45").matched
    assert not gold_match("Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday", "Thursday").matched
    assert not gold_match("1 * 7", "7").matched
    assert gold_match("The answer is 1,000", "1000").matched
    assert gold_match("It is Paris, of course", "paris").matched


def test_distinct_generation_has_no_repeated_query():
    items = W.generate(n=300, seed=0, distinct=True)
    assert len({it.query for it in items}) == 300
    assert len({it.query for it in W.generate(n=300, seed=0)}) < 300  # without it, queries repeat
    with pytest.raises(ValueError, match="distinct"):
        W.generate(["string"], n=200, seed=0, difficulties=[1], distinct=True)


def test_unknown_match_mode_and_bad_aliases_raise():
    with pytest.raises(ValueError, match="match"):
        W.answer_matches("x", "x", match="fuzzy")
    with pytest.raises(ValueError, match="aliases"):
        W.WorkItem("q", "a", "f", 1, aliases=("",))
