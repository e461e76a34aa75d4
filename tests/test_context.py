"""The context builder's gate: trust, relevance, provenance, budgets (issue: memory that helps or stays silent)."""
from __future__ import annotations

import numpy as np
import pytest

from ruvllm_lab.config import Config, RetrievalConfig
from ruvllm_lab.context import (ContextBuilder, calibrate_threshold, key_terms_agree, note_question, proper_nouns,
                                provenance, trusted, verification_of)
from ruvllm_lab.errors import ConfigError
from ruvllm_lab.types import Source
from ruvllm_lab.relevance import gate_scores, load_memory_eval, question_pairs


@pytest.mark.parametrize("a, b, same", [
    ("What is the capital of Portugal?", "Which city is the capital of Portugal?", True),
    ("What is the capital of Portugal?", "Portugal has which city as its capital?", True),
    ("What is the capital of Greece?", "What is the capital of Portugal?", False),
    ("What is 12 + 30?", "What is 12 + 31?", False),
    ("What is 47 + 38?", "Compute 47 plus 38.", True),
    ("In Python, what does len([1, 2, 3]) return?", "What is 12 + 30?", False),
    ("How many days are there in a leap year?", "What is the capital of France?", False),
    ("What is the freezing point of water in degrees Fahrenheit?",
     "Water freezes at what temperature in Fahrenheit?", True),
    ("Who wrote Romeo and Juliet?", "Who wrote Hamlet?", False),
])
def test_key_terms_agree(a, b, same):
    assert key_terms_agree(a, b) is same
    assert key_terms_agree(b, a) is same


def test_proper_nouns_skip_sentence_starts():
    assert proper_nouns("Portugal has which city as its capital?") == set()
    assert proper_nouns("In Python, what is 2 ** 5? Python: yes") == {"python"}


def test_note_question_from_metadata_or_text():
    assert note_question("Q: What is 2 + 2?\nA: 4", {}) == "What is 2 + 2?"
    assert note_question("anything", {"question": "Why?"}) == "Why?"


@pytest.mark.parametrize("policy, kind, meta, quality, shown", [
    ("verified", "interaction", {"verification": "unverified"}, 0.9, False),
    ("verified", "interaction", {"verification": "gold"}, 1.0, True),
    ("verified", "interaction", {"verification": "gold"}, 0.0, False),  # checked and wrong
    ("verified", "interaction", {"verification": "rated", "rating": 5}, 1.0, True),
    ("verified", "interaction", {"verification": "rated", "rating": 3}, 0.5, False),
    ("verified", "interaction", {"verification": "corrected"}, 1.0, False),
    ("verified", "interaction", {"verification": "judged"}, 0.9, False),
    ("verified", "concept", {}, 0.9, False),
    ("verified", "correction", {}, 1.0, True),
    ("all", "interaction", {"verification": "unverified"}, 0.9, True),
    ("all", "interaction", {"verification": "unverified"}, 0.2, True),
    ("all", "interaction", {"verification": "gold"}, 0.0, False),
    ("all", "interaction", {"verification": "corrected"}, 0.9, False),
    ("all", "concept", {}, 0.9, True),
    ("off", "correction", {}, 1.0, False),
])
def test_trust_policy(policy, kind, meta, quality, shown):
    assert trusted(kind, meta, quality, RetrievalConfig(note_policy=policy)) is shown


def test_verification_from_judge_signals():
    assert verification_of({"gold": 1.0, "logprob": 0.2}, 0.8) == ("gold", 1.0, {})
    assert verification_of({"gold": 0.4}, 0.4) == ("gold", 0.0, {})
    assert verification_of({"llm": 0.75}, 0.75)[0] == "judged"
    assert verification_of({"logprob": 0.9}, 0.9) == ("unverified", 0.9, {})
    assert verification_of({}, None) == ("unverified", 0.5, {})
    assert "rated 4/5" in provenance("interaction", {"verification": "rated", "rating": 4})
    assert "unverified" in provenance("interaction", {})


def test_calibrated_threshold_bounds_false_positives():
    rng = np.random.default_rng(0)
    unrelated, related = rng.normal(0.2, 0.1, 1000), rng.normal(0.8, 0.1, 100)
    cal = calibrate_threshold(related, unrelated, max_false_positive_rate=0.01)
    assert cal["false_positive_rate"] <= 0.01
    assert np.sum(unrelated >= cal["threshold"]) == 10  # exactly the allowed count passes
    assert 0.9 < cal["recall"] <= 1.0
    assert calibrate_threshold(related, unrelated, 0.0)["threshold"] > unrelated.max()
    with pytest.raises(ValueError):
        calibrate_threshold([], unrelated, 0.01)


def test_pairs_are_held_out_and_labelled():
    calib, eval_ = load_memory_eval(split="calib"), load_memory_eval(split="eval")
    assert not {r["question"] for r in calib} & {r["question"] for r in eval_}
    pairs = question_pairs(eval_)
    assert pairs.related.sum() == 3 * len(eval_)
    siblings = sum(len(r["siblings"]) for r in eval_)
    assert siblings >= 10  # hard negatives: same template, another slot filler
    assert (~pairs.related).sum() == len(eval_) * (len(eval_) - 1) + siblings


def test_gate_precision_on_held_out_pairs_with_minilm():
    """The shipped edge calibration, scored on the eval split it was not tuned on (real MiniLM)."""
    from ruvllm_lab.embedding import EmbeddingService
    from ruvllm_lab.relevance import cosines
    cfg = Config.load("configs/edge.toml")
    pairs = question_pairs(load_memory_eval(split="eval"))
    cos = cosines(EmbeddingService(cfg.embedding).embed, pairs)
    gate = gate_scores(cos, pairs, cfg.retrieval.relevance_threshold, match_key_terms=True)
    cosine_only = gate_scores(cos, pairs, cfg.retrieval.relevance_threshold, match_key_terms=False)
    assert gate["precision"] >= 0.95
    assert gate["false_positive_rate"] <= cosine_only["false_positive_rate"]
    assert gate["recall"] >= 0.5  # paraphrases still get through


@pytest.mark.parametrize("a, b", [
    ("What is the chemical symbol for calcium?", "What is the chemical symbol for sodium?"),
    ("How many legs does a spider have?", "How many legs does an ant have?"),
    ("How many sides does a hexagon have?", "How many sides does an octagon have?"),
    ("What organ pumps blood through the human body?", "What organ filters blood in the human body?"),
    ("Which keyword defines a function in Python?", "Which keyword defines a class in Python?"),
])
def test_sibling_questions_do_not_agree(a, b):
    assert not key_terms_agree(a, b) and not key_terms_agree(b, a)


def test_every_shipped_paraphrase_agrees_with_its_question():
    misses = [(r["question"], p) for r in load_memory_eval() for p in r["paraphrases"]
              if not key_terms_agree(r["question"], p)]
    assert len(misses) <= 0.1 * 2 * len(load_memory_eval()), misses


def test_prompt_shows_an_earlier_answer_with_the_question_it_answered():
    cfg = Config.from_dict({})
    builder = ContextBuilder(cfg.retrieval, cfg.prompt, memory=None, attention=None, count_tokens=len, dimension=4)
    note = Source(1, "Q: What is the capital of Greece?\nA: The capital of Greece is\n Athens.", 0.9,
                  provenance="Earlier answer, rated 5/5 by a user")
    correction = Source(2, "The correct answer is Athens.", 0.9, kind="correction", provenance="Correction from a user")
    user = builder.messages("Which city is the capital of Greece?", [correction, note], session=None)[-1]["content"]
    assert user.splitlines() == [
        cfg.prompt.notes_header,
        "- Correction from a user: The correct answer is Athens.",
        "- Earlier answer, rated 5/5 by a user: Q: What is the capital of Greece? A: The capital of Greece is Athens.",
        "", "Question: Which city is the capital of Greece?"]
    # no notes: the question alone, exactly as without memory
    assert builder.messages("Which city is the capital of Greece?", [], None)[-1]["content"] == \
        "Which city is the capital of Greece?"


@pytest.mark.parametrize("key, value", [("prompt.answer_note", "- {prov}: {answer}"),
                                        ("prompt.question_with_notes", "Q: {question}")])
def test_prompt_layouts_with_unknown_fields_are_refused(key, value):
    with pytest.raises(ConfigError, match=key):
        Config.from_dict({}, [f"{key}={value}"])
