"""Memory ablation: does the living memory make a frozen model's answers better, or stay silent?

Held-out questions (``data/memory_eval.jsonl``, eval split: none of them in ``knowledge.jsonl``
or the calibration split of the relevance gate) go through the whole ``RuvLLM`` loop — embed,
retrieve, gate, route (the tier is forced), generate at temperature 0, judge, write back — with
each ``retrieval.note_policy``:

* ``off``       — no note reaches the prompt (memory still written: the baseline);
* ``all``       — every relevant memory, unverified answers included (the pre-trust behaviour);
* ``verified``  — corrections and answers verified by a gold check or a rating only (default).

Per seed the eval items are shuffled and split into disjoint sets; one *seeding* phase, shared
by all policies (the store is copied), then every policy replays the same phases, the policies
taking turns question by question so that latencies are measured under the same machine load:

1. seeding: ``seed_tier`` (default the largest) answers the ``seeded`` questions with their gold
   answer given to the judge (so those answers are *verified*, right or wrong); the smallest tier
   answers the ``corrected`` questions and a user corrects each one through ``feedback``;
2. per tier, smallest first: its own ``fresh`` questions (never asked before: memory can only
   hurt), the shared ``cross`` questions (asked first by every smaller tier, whose unverified
   answers are then in memory: the cross-tier case), an exact ``repeat`` and a ``paraphrase`` of
   every seeded question;
3. the smallest tier answers a paraphrase of every corrected question (``corrected`` case;
   ``correction_recalled`` = the user's correction node was among the notes).

Correctness is ``workloads.is_correct`` (the project's strict matcher) against the gold answer and
its aliases; the evaluation requests carry no gold, so nothing asked in phases 2-3 is verified.
The summary is per (policy, tier, case): mean over seeds of the per-seed accuracy with a 95 %
t-interval over seeds (n = number of seeds), mean latency and prompt tokens, and notes per
query.  ``criteria`` checks the issue's targets against that table.
"""
from __future__ import annotations

import random
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..config import Config
from ..relevance import MEMORY_EVAL_PATH, load_memory_eval
from ..types import Constraints, Feedback, Request
from ..workloads import WorkItem, is_correct
from .progress import step_progress
from .results import t_interval
from .tracking import NullTracker, Tracker, log_experiment, mark_underpowered

POLICIES = ("off", "all", "verified")
CASES = ("fresh", "cross", "repeat", "paraphrase", "corrected")
MIN_SEEDS = 3  # below this a 95 % interval over seeds means little: the run is tagged underpowered
MIN_PER_CASE = 4  # questions per seed in a case below which its per-seed accuracy is too coarse


def work_item(row: dict[str, Any]) -> WorkItem:
    """A memory_eval row as a WorkItem; the matcher accepts its aliases too."""
    return WorkItem(query=row["question"], answer=row["answer"], family=row["family"], difficulty=1,
                    match=row["match"], aliases=tuple(row.get("aliases", ())))


def correct_any(row: dict[str, Any], answer: str) -> bool:
    """Strict match against the gold answer or any alias (``workloads.is_correct``)."""
    return is_correct(work_item(row), answer)


def correction_text(row: dict[str, Any]) -> str:
    return f"The correct answer is {row['answer']}."


@dataclass
class Split:
    seeded: list[dict]
    fresh: dict[str, list[dict]]  # tier -> its own never-asked questions
    cross: list[dict]
    corrected: list[dict]


def split_items(rows: Sequence[dict], tiers: Sequence[str], seed: int, n_seeded: int, n_fresh: int,
                n_cross: int, n_corrected: int) -> Split:
    need = n_seeded + n_fresh * len(tiers) + n_cross + n_corrected
    if need > len(rows):
        raise ValueError(f"the workload needs {need} distinct questions, the eval split has {len(rows)}: "
                         f"lower n_seeded / n_fresh / n_cross / n_corrected")
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    take = iter(rows)

    def nxt(n: int) -> list[dict]:
        return [next(take) for _ in range(n)]
    return Split(seeded=nxt(n_seeded), fresh={t: nxt(n_fresh) for t in tiers}, cross=nxt(n_cross),
                 corrected=nxt(n_corrected))


@dataclass
class MemoryAblationResult:
    rows: pd.DataFrame  # one row per answered query
    summary: pd.DataFrame  # per (policy, tier, case)
    criteria: pd.DataFrame  # the targets, measured
    params: dict[str, Any]
    figures: dict[str, Any] = field(default_factory=dict)
    underpowered: bool = False

    def to_markdown(self) -> str:
        cols = ["policy", "tier", "case", "n_seeds", "n_per_seed", "accuracy", "ci95", "latency_ms",
                "prompt_tokens", "notes"]
        table = self.summary.assign(
            ci95=[f"[{lo:.3f}, {hi:.3f}]" for lo, hi in zip(self.summary.acc_low, self.summary.acc_high)],
            accuracy=self.summary.accuracy.map("{:.3f}".format),
            latency_ms=self.summary.latency_ms.map("{:.0f}".format),
            prompt_tokens=self.summary.prompt_tokens.map("{:.0f}".format),
            notes=self.summary.notes.map("{:.2f}".format))[cols]
        text = _markdown(table) + "\n\n" + _markdown(self.criteria)
        if self.underpowered:
            text = f"**underpowered**: {self.params['n_seeds']} seed(s) < {MIN_SEEDS}\n\n" + text
        return text


def _markdown(df: pd.DataFrame) -> str:
    head = "| " + " | ".join(map(str, df.columns)) + " |\n|" + "---|" * len(df.columns)
    return head + "".join("\n| " + " | ".join(map(str, r)) + " |" for r in df.itertuples(index=False))


def _ask(llm: Any, text: str, tier: str, max_tokens: int, gold: str | None = None):
    return llm.query_with(Request(query=text, gold_answer=gold,
                                  constraints=Constraints(model=tier, max_tokens=max_tokens, temperature=0.0)))


def run(config: Config, tiers: Sequence[str] | None = None, seeds: Sequence[int] = (0, 1, 2, 3, 4), *,
        n_seeded: int = 8, n_fresh: int = 6, n_cross: int = 8, n_corrected: int = 4,
        policies: Sequence[str] = POLICIES, seed_tier: str | None = None, max_tokens: int = 32,
        data_path: str | Path = MEMORY_EVAL_PATH, work_dir: str | Path | None = None,
        tracker: Tracker | None = None, progress: bool = True) -> MemoryAblationResult:
    """The memory ablation (module docstring).  ``tiers`` default to every tier of the profile."""
    from ..embedding import EmbeddingService
    from ..inference import InferencePool
    from ..orchestrator import RuvLLM

    tracker = tracker or NullTracker()
    tiers = list(tiers or config.inference.models)
    unknown = [t for t in list(tiers) + [seed_tier] if t is not None and t not in config.inference.models]
    if unknown:
        raise ValueError(f"tiers {unknown} are not in inference.models {config.inference.models}")
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        raise ValueError(f"policies {bad}: allowed {POLICIES}")
    seed_tier = seed_tier or config.inference.models[-1]
    params = {"tiers": tiers, "seeds": list(seeds), "n_seeds": len(seeds), "n_seeded": n_seeded, "n_fresh": n_fresh,
              "n_cross": n_cross, "n_corrected": n_corrected, "policies": list(policies), "seed_tier": seed_tier,
              "max_tokens": max_tokens, "data_path": str(data_path)}
    # Without prefix reuse a greedy answer depends on its prompt alone, not on which prompt a KV slot
    # held before (llama.cpp's rounding changes with the evaluated chunk): identical prompts in two
    # arms then give identical answers, and every difference between arms is the memory's doing.
    # Answers are written before the next question is asked (a queued write might not be there yet).
    config = config.with_overrides({"inference.max_loaded_models": len(config.inference.models),
                                    "inference.prefix_reuse": False, "memory.answer_writeback": "request",
                                    "learning.enabled": False, "compression.enabled": False})
    config = log_experiment(tracker, config, {k: v for k, v in params.items() if k != "n_seeds"})
    rows_eval = load_memory_eval(data_path, "eval")
    pool = InferencePool(config.inference, config.system)
    embedder = EmbeddingService(config.embedding, pool=pool)
    root = Path(work_dir or tempfile.mkdtemp(prefix="ruvllm-memory-ablation-"))
    records: list[dict] = []
    total = len(seeds) * (n_seeded + n_corrected + len(policies) * (
        len(tiers) * (n_fresh + n_cross + 2 * n_seeded) + n_corrected))
    step = step_progress(total, progress, "memory ablation", unit="query")

    def instance(state: Path, policy: str) -> RuvLLM:
        cfg = config.with_overrides({"memory.db_path": str(state / "memory.db"), "system.data_dir": str(state),
                                     "retrieval.note_policy": policy})
        return RuvLLM(cfg, pool=pool, embedder=embedder)

    def record(seed: int, policy: str, tier: str, case: str, row: dict, response: Any, **extra: Any) -> None:
        records.append({"seed": seed, "policy": policy, "tier": tier, "case": case, "id": row["id"],
                        "correct": correct_any(row, response.text), "answer": response.text.strip()[:200],
                        "latency_ms": response.latency_ms.get("total", float("nan")),
                        "prompt_tokens": response.usage.prompt_tokens, "notes": len(response.sources), **extra})
        step()

    try:
        for tier in dict.fromkeys(list(tiers) + [seed_tier]):  # load every model before anything is timed
            pool.generate(tier, [{"role": "user", "content": "Hello."}], max_tokens=1, temperature=0.0)
        for seed in seeds:
            split = split_items(rows_eval, tiers, seed, n_seeded, n_fresh, n_cross, n_corrected)
            seeded_state = root / f"seed{seed}" / "seeded"
            corrections: dict[str, int] = {}
            with instance(seeded_state, "verified") as llm:
                for row in split.seeded:
                    _ask(llm, row["question"], seed_tier, max_tokens, gold=row["answer"])
                    step()
                for row in split.corrected:
                    r = _ask(llm, row["question"], tiers[0], max_tokens)
                    corrections[row["id"]] = llm.feedback(Feedback(r.request_id, correction=correction_text(row)))[
                        "correction_node"]
                    step()
            # Every policy replays the same questions in the same order on its own copy of the
            # seeded store; the policies take turns question by question (in a rotated order), so
            # a drift in machine load reaches all of them alike and latencies compare pairwise.
            rotation = seed % len(policies)
            order = list(policies)[rotation:] + list(policies)[:rotation]
            with ExitStack() as stack:
                llms = {}
                for policy in order:
                    state = root / f"seed{seed}" / policy
                    shutil.copytree(seeded_state, state)
                    llms[policy] = stack.enter_context(instance(state, policy))
                for tier in tiers:
                    for case, questions in (("fresh", [(r, r["question"]) for r in split.fresh[tier]]),
                                            ("cross", [(r, r["question"]) for r in split.cross]),
                                            ("repeat", [(r, r["question"]) for r in split.seeded]),
                                            ("paraphrase", [(r, r["paraphrases"][seed % 2]) for r in split.seeded])):
                        for row, text in questions:
                            for policy, llm in llms.items():
                                record(seed, policy, tier, case, row, _ask(llm, text, tier, max_tokens))
                for row in split.corrected:
                    for policy, llm in llms.items():
                        r = _ask(llm, row["paraphrases"][seed % 2], tiers[0], max_tokens)
                        record(seed, policy, tiers[0], "corrected", row, r,
                               correction_recalled=any(s.node_id == corrections[row["id"]] for s in r.sources))
    finally:
        pool.close()
    df = pd.DataFrame.from_records(records)
    result = MemoryAblationResult(df, summarise(df), pd.DataFrame(), params, underpowered=len(seeds) < MIN_SEEDS)
    result.criteria = criteria(result.summary, df, tiers)
    result.figures["accuracy"] = plot_accuracy(result.summary)
    _log(tracker, result)
    return result


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    out = []
    for (policy, tier, case), g in df.groupby(["policy", "tier", "case"], sort=False):
        per_seed = g.groupby("seed").correct.mean()
        _, m, lo, hi = t_interval(per_seed.tolist())
        out.append({"policy": policy, "tier": tier, "case": case, "n_seeds": len(per_seed),
                    "n_per_seed": int(len(g) / len(per_seed)), "accuracy": m, "acc_low": lo, "acc_high": hi,
                    "latency_ms": float(g.latency_ms.mean()), "prompt_tokens": float(g.prompt_tokens.mean()),
                    "notes": float(g.notes.mean()),
                    "correction_recall": (float(g.correction_recalled.mean()) if "correction_recalled" in g
                                          and g.correction_recalled.notna().any() else float("nan"))})
    return pd.DataFrame(out)


def criteria(summary: pd.DataFrame, df: pd.DataFrame, tiers: Sequence[str]) -> pd.DataFrame:
    """The issue's four targets, measured (verified policy against off)."""
    def cell(policy: str, tier: str, case: str, col: str = "accuracy") -> float:
        hit = summary[(summary.policy == policy) & (summary.tier == tier) & (summary.case == case)]
        return float(hit[col].iloc[0]) if len(hit) else float("nan")

    rows = []
    for tier in tiers:
        on, off = cell("verified", tier, "fresh"), cell("off", tier, "fresh")
        lat_on, lat_off = cell("verified", tier, "fresh", "latency_ms"), cell("off", tier, "fresh", "latency_ms")
        rows.append({"target": f"fresh, {tier}: accuracy(on) >= accuracy(off) - 0.01",
                     "measured": f"{on:.3f} vs {off:.3f}", "met": bool(on >= off - 0.01)})
        rows.append({"target": f"fresh, {tier}: notes add <= 15 % latency",
                     "measured": f"{lat_on:.0f} vs {lat_off:.0f} ms ({(lat_on / lat_off - 1) * 100:+.1f} %)",
                     "met": bool(lat_on <= 1.15 * lat_off)})
    small = tiers[0]
    for case in ("repeat", "paraphrase"):
        on, off = cell("verified", small, case), cell("off", small, case)
        rows.append({"target": f"{case} of verified questions, {small}: +20 points with memory",
                     "measured": f"{on:.3f} vs {off:.3f} ({(on - off) * 100:+.1f} points)",
                     "met": bool(on - off >= 0.20)})
    for tier in tiers[1:]:
        on, off = cell("verified", tier, "cross"), cell("off", tier, "cross")
        rows.append({"target": f"cross-tier, {tier} after smaller tiers: drop <= 1 point",
                     "measured": f"{on:.3f} vs {off:.3f} ({(on - off) * 100:+.1f} points)",
                     "met": bool(on >= off - 0.01)})
    recall = cell("verified", small, "corrected", "correction_recall")
    rows.append({"target": "correction recall on paraphrases >= 95 %", "measured": f"{recall:.3f}",
                 "met": bool(recall >= 0.95)})
    return pd.DataFrame(rows)


def plot_accuracy(summary: pd.DataFrame):
    import matplotlib.pyplot as plt
    cases = [c for c in CASES if c in set(summary.case)]
    tiers = list(dict.fromkeys(summary.tier))
    policies = list(dict.fromkeys(summary.policy))
    fig, axes = plt.subplots(1, len(cases), figsize=(3.2 * len(cases), 3.4), sharey=True, squeeze=False)
    width = 0.8 / max(1, len(policies))
    for ax, case in zip(axes[0], cases):
        sub = summary[summary.case == case]
        case_tiers = [t for t in tiers if t in set(sub.tier)]
        for k, policy in enumerate(policies):
            s = sub[sub.policy == policy].set_index("tier").reindex(case_tiers)
            err = np.vstack([s.accuracy - s.acc_low, s.acc_high - s.accuracy]).clip(min=0)
            ax.bar(np.arange(len(case_tiers)) + k * width, s.accuracy, width, yerr=np.nan_to_num(err),
                   capsize=2, label=policy)
        ax.set_xticks(np.arange(len(case_tiers)) + width * (len(policies) - 1) / 2)
        ax.set_xticklabels(case_tiers, rotation=30, ha="right", fontsize=7)
        ax.set_title(case)
        ax.set_ylim(0, 1.05)
    axes[0][0].set_ylabel("accuracy (mean over seeds, 95 % CI)")
    axes[0][-1].legend(title="note policy", fontsize=7)
    fig.suptitle("Memory ablation: accuracy by note policy")
    fig.tight_layout()
    plt.close(fig)  # returned, shown once by whoever displays it
    return fig


def _log(tracker: Tracker, result: MemoryAblationResult) -> None:
    for r in result.summary.itertuples(index=False):
        prefix = f"{r.policy}/{r.tier}/{r.case}"
        tracker.log_metrics({f"{prefix}/accuracy": r.accuracy, f"{prefix}/latency_ms": r.latency_ms,
                             f"{prefix}/notes": r.notes})
    tracker.log_metrics({"criteria_met": float(result.criteria.met.sum()),
                         "criteria_total": float(len(result.criteria))})
    tracker.log_table(result.summary, "summary.csv")
    tracker.log_table(result.criteria, "criteria.csv")
    tracker.log_table(result.rows, "answers.csv")
    tracker.log_figure(result.figures["accuracy"], "accuracy.png")
    reasons = [f"{result.params['n_seeds']} seed(s) < {MIN_SEEDS}"] if result.underpowered else []
    reasons += [f"{n} questions per seed in a case < {MIN_PER_CASE}" for n in
                sorted({int(v) for v in result.summary.n_per_seed if v < MIN_PER_CASE})]
    mark_underpowered(tracker, reasons, "memory ablation")
