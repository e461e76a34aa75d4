"""Labelled question pairs for the relevance gate: calibration and note precision.

``data/memory_eval.jsonl`` holds held-out questions, each with two paraphrases.  From one split
of it (``calib`` to calibrate, ``eval`` to score) ``question_pairs`` builds

* **related** pairs: a question and each of its paraphrases, and the two paraphrases;
* **unrelated** pairs: question i against the first paraphrase of every other item j != i
  of the split — many of them "hard" (same family and template: "capital of Greece" vs
  "capital of Portugal", "47 + 38" vs "51 + 29") — and against its hand-written siblings
  (same template, another slot filler: "symbol for calcium" vs "symbol for sodium").

``calibrate`` sets ``retrieval.relevance_threshold`` for one embedding model from the calib
split (``context.calibrate_threshold``); ``gate_scores`` reports the precision / recall of the
whole gate (cosine and key terms) on a split — the note precision the README reports.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .context import calibrate_threshold, key_terms_agree

MEMORY_EVAL_PATH = Path(__file__).resolve().parent.parent / "data" / "memory_eval.jsonl"


def load_memory_eval(path: str | Path = MEMORY_EVAL_PATH, split: str | None = None) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if split is None or r["split"] == split]


@dataclass
class Pairs:
    a: list[str]
    b: list[str]
    related: np.ndarray  # (P,) bool


def question_pairs(rows: Sequence[dict[str, Any]]) -> Pairs:
    a, b, related = [], [], []
    for r in rows:
        p1, p2 = r["paraphrases"]
        for x, y in ((r["question"], p1), (r["question"], p2), (p1, p2)):
            a.append(x), b.append(y), related.append(True)
    for i, r in enumerate(rows):
        for j, other in enumerate(rows):
            if i != j:
                a.append(r["question"]), b.append(other["paraphrases"][0]), related.append(False)
        for sibling in r.get("siblings", ()):
            a.append(r["question"]), b.append(sibling), related.append(False)
    return Pairs(a, b, np.asarray(related))


def cosines(embed: Callable[[list[str]], np.ndarray], pairs: Pairs) -> np.ndarray:
    """(P,) cosine of each pair; ``embed`` returns L2-normalised rows."""
    texts = sorted(set(pairs.a) | set(pairs.b))
    vecs = dict(zip(texts, np.asarray(embed(texts), np.float32)))
    return np.asarray([float(vecs[x] @ vecs[y]) for x, y in zip(pairs.a, pairs.b)])


def calibrate(embed: Callable[[list[str]], np.ndarray], max_false_positive_rate: float = 0.01,
              path: str | Path = MEMORY_EVAL_PATH) -> dict[str, Any]:
    """The threshold for this embedding model from the calib split (see ``calibrate_threshold``)."""
    pairs = question_pairs(load_memory_eval(path, "calib"))
    cos = cosines(embed, pairs)
    return calibrate_threshold(cos[pairs.related], cos[~pairs.related], max_false_positive_rate)


def gate_scores(cos: np.ndarray, pairs: Pairs, threshold: float, match_key_terms: bool) -> dict[str, float]:
    """Precision / recall / false-positive rate of the gate "cosine >= threshold (and key terms agree)"."""
    admitted = cos >= threshold
    if match_key_terms:
        admitted &= np.asarray([key_terms_agree(x, y) for x, y in zip(pairs.a, pairs.b)])
    tp = int(np.sum(admitted & pairs.related))
    fp = int(np.sum(admitted & ~pairs.related))
    return {"precision": tp / (tp + fp) if tp + fp else float("nan"),
            "recall": tp / int(pairs.related.sum()),
            "false_positive_rate": fp / int((~pairs.related).sum()),
            "n_related": int(pairs.related.sum()), "n_unrelated": int((~pairs.related).sum())}
