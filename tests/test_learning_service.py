"""LearningService: labels, cycles, replay + EWC vs naive forgetting, atomic swap, persistence,
memory reinforcement and attention training with the real memory store."""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pytest
import torch

from ruvllm_lab.config import STATE_FILES, Config
from ruvllm_lab.errors import RequestNotFound
from ruvllm_lab.learning.metrics import AccuracyMatrix, average_forgetting
from ruvllm_lab.learning.service import Interaction, LearningService
from ruvllm_lab.router import RouterInput, make_router

D = 16
TIERS = ["smollm2-135m", "qwen2.5-coder-0.5b"]
SMALL_OK = {TIERS[0]: 0.9, TIERS[1]: 0.95}  # the small tier is good enough -> label small
NEEDS_LARGE = {TIERS[0]: 0.2, TIERS[1]: 0.9}  # only the large tier is good -> label large


def _config(tmp_path, **overrides) -> Config:
    # router.sparsity 0.8: at the default 0.95 a 16-unit cell keeps ~23 input weights, too few to hold
    # both phases of the forgetting task (measured: ewc+replay then cannot learn phase 1)
    base = {"inference.models": TIERS, "system.data_dir": str(tmp_path / "state"), "router.hidden_dim": 16,
            "router.sparsity": 0.8,
            "learning.min_examples": 8, "learning.steps_per_cycle": 50, "learning.learning_rate": 0.01,
            "learning.ewc_lambda": 100.0, "learning.replay_ratio": 0.5, "memory.db_path": str(tmp_path / "m.db")}
    base.update(overrides)
    return Config.from_dict({}, base)


def _x(vec) -> RouterInput:
    return RouterInput(np.asarray(vec, np.float32), 10, 0.0, 0, 0.0, 0, {}, None, None)


def phase_data(phase: int, n: int, rng: np.random.Generator):
    """Two clusters per phase (dims 0/1 pick the cluster, dim 2+phase marks the phase).

    Phase 1 flips phase 0's cluster -> tier mapping, so a router that ignores the phase
    marker and follows only the newest data forgets phase 0 completely."""
    out = []
    for i in range(n):
        c = i % 2
        v = rng.normal(0, 0.3, D).astype(np.float32)
        v[c] += 2.0
        v[2 + phase] += 2.0
        label = c if phase == 0 else 1 - c
        out.append((_x(v), label, dict(SMALL_OK if label == 0 else NEEDS_LARGE)))
    return out


def _accuracy(router, data) -> float:
    return float(np.mean([router.route(x).tier_probs[TIERS[label]] > 0.5 for x, label, _ in data]))


def _two_phase_forgetting(tmp_path, seed=0, cycles=4, **overrides):
    cfg = _config(tmp_path, **{"system.seed": seed, **overrides})
    svc = LearningService(cfg, make_router("fastgrnn", TIERS, cfg.router, D, seed=seed), resume=False)
    rng = np.random.default_rng(seed)
    train = [phase_data(p, 32 * cycles, rng) for p in range(2)]
    test = [phase_data(p, 200, rng) for p in range(2)]
    acc = AccuracyMatrix(n_phases=2)
    for p in range(2):
        for c in range(cycles):
            for j, (x, _, scores) in enumerate(train[p][c * 32:(c + 1) * 32]):
                svc.record(Interaction(f"p{p}-c{c}-{j}", x, tier_scores=scores))
            report = svc.learn()
            assert report["swapped"], report
        for q in range(2):
            acc.record(p, q, _accuracy(svc.router, test[q]))
    return acc, svc


# ---- unit ---------------------------------------------------------------------------------------------
def test_full_information_scores_pin_the_cheapest_adequate_tier(tmp_path):
    cfg = _config(tmp_path)
    svc = LearningService(cfg, make_router("fastgrnn", TIERS, cfg.router, D), resume=False)
    x = _x(np.ones(D))
    small = svc.example_of(Interaction("s", x, tier_scores=dict(SMALL_OK)))
    large = svc.example_of(Interaction("l", x, tier_scores=dict(NEEDS_LARGE)))
    assert small.outcomes == {TIERS[0]: 1.0, TIERS[1]: 1.0} and small.exact_tier(TIERS) == TIERS[0]
    assert large.outcomes == {TIERS[0]: 0.0, TIERS[1]: 1.0} and large.exact_tier(TIERS) == TIERS[1]
    # a middling score (rating 3 on the rating scale) is no label at all
    assert svc.example_of(Interaction("m", x, tier_scores={TIERS[0]: 0.5})) is None


def test_example_imitates_sampling_settings_of_good_answers_only(tmp_path):
    cfg = _config(tmp_path)
    router = make_router("fastgrnn", TIERS, cfg.router, D)
    svc = LearningService(cfg, router, resume=False)
    x = _x(np.ones(D))
    decision = router.route(x)
    good = svc.example_of(Interaction("a", x, decision, {decision.tier: 0.95}))
    bad = svc.example_of(Interaction("b", x, decision, {decision.tier: 0.1}))
    assert good.outcomes == {decision.tier: 1.0} and good.temperature == pytest.approx(decision.temperature)
    assert good.context_items == decision.context_items
    assert bad.outcomes == {decision.tier: 0.0} and bad.temperature is None and bad.context_items is None
    assert svc.example_of(Interaction("c", x, decision)) is None


def test_record_validates_scores_and_late_feedback(tmp_path):
    svc = LearningService(_config(tmp_path), make_router("fastgrnn", TIERS, _config(tmp_path).router, D),
                          resume=False)
    with pytest.raises(ValueError, match="unknown tier"):
        svc.record(Interaction("a", _x(np.zeros(D)), tier_scores={"gpt-99": 1.0}))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        svc.record(Interaction("a", _x(np.zeros(D)), tier_scores={TIERS[0]: 1.5}))
    svc.record(Interaction("b", _x(np.zeros(D))))
    assert svc.example_of(svc._recent["b"]) is None
    svc.add_score("b", TIERS[1], 0.9)
    assert svc.pending == 1
    assert svc.example_of(svc._recent["b"]).outcomes == {TIERS[1]: 1.0}  # only the tier that was judged
    assert svc.tier_quality() == {TIERS[1]: pytest.approx(0.9)}
    with pytest.raises(RequestNotFound):
        svc.add_score("nope", TIERS[0], 0.5)


def test_learn_waits_for_min_examples_then_trains(tmp_path):
    cfg = _config(tmp_path, **{"learning.min_examples": 10})
    svc = LearningService(cfg, make_router("fastgrnn", TIERS, cfg.router, D), resume=False)
    rng = np.random.default_rng(0)
    data = phase_data(0, 12, rng)
    for j, (x, _, s) in enumerate(data[:6]):
        svc.record(Interaction(f"a{j}", x, tier_scores=s))
    first = svc.learn()
    assert not first["trained"] and "min_examples" in first["reason"] and first["new_examples"] == 6
    for j, (x, _, s) in enumerate(data[6:]):
        svc.record(Interaction(f"b{j}", x, tier_scores=s))
    second = svc.learn()
    assert second["trained"] and second["swapped"] and second["fresh_examples"] == 12
    assert second["loss_last"] < second["loss_first"]
    assert svc.updates == cfg.learning.steps_per_cycle and len(svc.replay) == 12
    assert svc.ewc.consolidations == 1 and second["fisher_mean"] > 0


def test_failing_step_keeps_old_router_and_drops_the_poisoned_cycle(tmp_path, caplog):
    cfg = _config(tmp_path)
    svc = LearningService(cfg, make_router("fastgrnn", TIERS, cfg.router, D), resume=False)
    old = svc.router
    probe = _x(np.ones(D))
    before = old.route(probe).tier_probs
    for j in range(8):
        svc.record(Interaction(f"n{j}", _x(np.full(D, np.nan)), tier_scores=dict(SMALL_OK)))
    report = svc.learn()
    assert not report["swapped"] and "non-finite" in report["error"] and report["dropped_examples"] == 8
    assert svc.router is old and old.route(probe).tier_probs == before
    assert "keeps its weights" in caplog.text
    assert len(svc.replay) == 0 and not svc.ewc.active
    # the next healthy cycle trains normally
    for j, (x, _, s) in enumerate(phase_data(0, 8, np.random.default_rng(1))):
        svc.record(Interaction(f"g{j}", x, tier_scores=s))
    assert svc.learn()["swapped"] and svc.router is not old


def test_non_torch_router_learns_by_partial_fit(tmp_path):
    cfg = _config(tmp_path)
    svc = LearningService(cfg, make_router("knn", TIERS, cfg.router, D), resume=False)
    data = phase_data(0, 16, np.random.default_rng(0))
    for j, (x, _, s) in enumerate(data):
        svc.record(Interaction(f"k{j}", x, tier_scores=s))
    report = svc.learn()
    assert report["swapped"] and report["steps"] == 1
    assert _accuracy(svc.router, phase_data(0, 50, np.random.default_rng(5))) > 0.9


# ---- integration ----------------------------------------------------------------------------------------
def test_ewc_and_replay_forget_less_than_naive_fine_tuning(tmp_path):
    naive, _ = _two_phase_forgetting(tmp_path / "naive", **{"learning.ewc_lambda": 0.0, "learning.replay_ratio": 0.0})
    ewc_only, _ = _two_phase_forgetting(tmp_path / "ewc", **{"learning.replay_ratio": 0.0})
    both, svc = _two_phase_forgetting(tmp_path / "both")
    f_naive, f_ewc, f_both = (average_forgetting(a) for a in (naive, ewc_only, both))
    print("\nnaive\n" + naive.to_markdown() + "\newc+replay\n" + both.to_markdown())
    # every variant learned each phase when it was current
    for a in (naive, ewc_only, both):
        arr = a.as_array()
        assert arr[0, 0] >= 0.9 and arr[1, 1] >= 0.9
    assert f_naive >= 0.3  # the task really causes forgetting
    assert f_naive - f_both >= 0.3, (f_naive, f_both)
    assert f_ewc < f_naive - 0.1, (f_ewc, f_naive)  # EWC alone helps too
    assert svc.ewc.consolidations == 8 and svc.updates == 8 * 50


def test_background_training_swaps_router_while_concurrent_route_is_unaffected(tmp_path):
    cfg = _config(tmp_path, **{"learning.training_interval_ms": 100, "learning.steps_per_cycle": 100})
    svc = LearningService(cfg, make_router("fastgrnn", TIERS, cfg.router, D), resume=False)
    old = svc.router
    probe = _x(phase_data(0, 1, np.random.default_rng(3))[0][0].query_vec)
    expected = old.route(probe).tier_probs
    for j, (x, _, s) in enumerate(phase_data(0, 32, np.random.default_rng(0))):
        svc.record(Interaction(f"bg{j}", x, tier_scores=s))
    svc.start()
    calls = 0
    deadline = time.monotonic() + 600  # a hang guard, not a speed assertion
    try:
        # route with the router that was serving when training began, as an in-flight request would
        while svc.swaps == 0 and time.monotonic() < deadline:
            assert old.route(probe).tier_probs == expected
            calls += 1
            time.sleep(0.001)  # leave the GIL to the trainer
        assert svc.running
    finally:
        svc.stop()
    assert not svc.running
    assert svc.swaps >= 1 and calls > 0
    assert old.route(probe).tier_probs == expected  # the old object was never trained in place
    new = svc.router
    assert new is not old and new.route(probe).tier_probs != expected
    assert svc.last_report["swapped"] and svc.last_report["cycle"] >= 1


def test_state_persists_and_resumes(tmp_path):
    acc, svc = _two_phase_forgetting(tmp_path, cycles=1)
    paths = svc.state_paths()
    for key in ("router_weights", "ewc_state", "replay_buffer"):
        assert paths[key].exists() and paths[key].name == STATE_FILES[key]
    cfg = svc.config
    resumed = LearningService(cfg, make_router("fastgrnn", TIERS, cfg.router, D, seed=123))
    probe = _x(phase_data(1, 1, np.random.default_rng(9))[0][0].query_vec)
    np.testing.assert_allclose(list(resumed.router.route(probe).tier_probs.values()),
                               list(svc.router.route(probe).tier_probs.values()), rtol=1e-5)
    assert len(resumed.replay) == len(svc.replay) == 64
    assert resumed.ewc.consolidations == svc.ewc.consolidations
    for n, f in svc.ewc.fisher.items():
        torch.testing.assert_close(resumed.ewc.fisher[n], f)


def test_memory_edges_and_attention_learn_from_outcomes(tmp_path):
    from ruvllm_lab.attention import GraphAttentionEngine
    from ruvllm_lab.memory import MemoryService

    cfg = _config(tmp_path, **{"memory.similar_edges_k": 0})
    rng = np.random.default_rng(0)
    with MemoryService(cfg.memory, dimension=D) as memory:
        def vec():
            v = rng.normal(size=D).astype(np.float32)
            return v / np.linalg.norm(v)

        good = [memory.add(f"good fact {i}", vector=vec()) for i in range(2)]
        bad = [memory.add(f"bad fact {i}", vector=vec()) for i in range(2)]
        other = [memory.add(f"other {i}", vector=vec()) for i in range(3)]
        memory.add_edge(good[0], good[1], "similar", 0.5)
        memory.add_edge(bad[0], bad[1], "similar", 0.5)
        for o in other:
            memory.add_edge(good[0], o, "similar", 0.4)
        attention = GraphAttentionEngine(cfg.attention, D)
        svc = LearningService(cfg, make_router("fastgrnn", TIERS, cfg.router, D), memory=memory,
                              attention=attention, resume=False)
        q = vec()
        decision = svc.router.route(_x(q))
        svc.record(Interaction("g", _x(q), decision, {decision.tier: 1.0}, node_ids=good))
        svc.record(Interaction("b", _x(q), decision, {decision.tier: 0.0}, node_ids=bad))
        report = svc.learn()
        weight = {(e.src, e.dst): e.weight for e in memory.edges()}
        assert weight[(good[0], good[1])] > 0.5 > weight.get((bad[0], bad[1]), 0.0)
        assert report["memory_reinforced"] == 2
        assert report["attention_steps"] == 1 and attention.trained and math.isfinite(report["attention_loss"])
        assert memory.get(good[0]).quality > memory.get(bad[0]).quality


def test_feedback_rating_and_correction_become_outcomes(tmp_path):
    cfg = _config(tmp_path)
    svc = LearningService(cfg, make_router("fastgrnn", TIERS, cfg.router, D), resume=False)
    x = _x(np.ones(D))
    d = svc.route(x)
    svc.record(Interaction("r", x, d, signals={d.tier: {"logprob": 0.2}}))  # weak: a low log-prob
    weak = svc.example_of(svc._recent["r"])
    assert weak.outcomes == {d.tier: 0.0} and weak.weights[d.tier] == cfg.learning.logprob_weight
    svc.add_feedback("r", d.tier, rating=4)  # the user's rating overrules the log-prob
    rated = svc.example_of(svc._recent["r"])
    assert rated.outcomes == {d.tier: 1.0} and rated.weights[d.tier] == 1.0
    svc.add_feedback("r", d.tier, rating=5, correction="It is 42.")  # a correction means it was wrong
    assert svc.example_of(svc._recent["r"]).outcomes == {d.tier: 0.0}
    with pytest.raises(ValueError, match="rating"):
        svc.add_feedback("r", d.tier)


def test_observe_feeds_a_bandit_outcome_through_the_serving_path(tmp_path):
    cfg = _config(tmp_path, **{"learning.min_examples": 4})
    svc = LearningService(cfg, make_router("fastgrnn", TIERS, cfg.router, D), resume=False, persist=False)
    for j in range(4):
        x = _x(np.full(D, j / 4))
        d = svc.route(x)
        inter = svc.observe(x, d, adequate=True, cost=1.0)
        assert set(inter.signals) == {d.tier}
    report = svc.learn()
    assert report["swapped"] and not svc.state_paths()["router_weights"].exists()  # persist=False
    assert report["offpolicy"]["serving_router"]["n"] == 4
    with pytest.raises(ValueError, match="exactly one"):
        svc.observe(x, d)


def test_attention_trains_on_a_copy_and_the_served_engine_adopts_it(tmp_path):
    from ruvllm_lab.attention import GraphAttentionEngine
    from ruvllm_lab.memory import MemoryService

    cfg = _config(tmp_path, **{"memory.similar_edges_k": 0})
    rng = np.random.default_rng(0)
    with MemoryService(cfg.memory, dimension=D) as memory:
        ids = []
        for i in range(4):
            v = rng.normal(size=D).astype(np.float32)
            ids.append(memory.add(f"fact {i}", vector=v / np.linalg.norm(v)))
        memory.add_edge(ids[0], ids[1], "similar", 0.5)
        memory.add_edge(ids[0], ids[2], "similar", 0.5)
        attention = GraphAttentionEngine(cfg.attention, D)
        serving_net = attention.net
        before = {k: v.clone() for k, v in serving_net.state_dict().items()}
        svc = LearningService(cfg, make_router("fastgrnn", TIERS, cfg.router, D), memory=memory,
                              attention=attention, resume=False)
        q = rng.normal(size=D).astype(np.float32)
        d = svc.route(_x(q))
        svc.record(Interaction("g", _x(q), d, {d.tier: 1.0}, node_ids=[ids[0]]))
        report = svc.learn()
        assert report["attention_steps"] == 1
        # the network that was serving was never trained in place; the engine now serves the trained copy
        for k, v in serving_net.state_dict().items():
            torch.testing.assert_close(v, before[k])
        assert attention.net is not serving_net and attention.trained and not attention.net.training


def test_learned_state_is_never_unpickled(tmp_path):
    """A pickle with a code payload in any learned-state file is refused and never executed (issue 14)."""
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    acc, svc = _two_phase_forgetting(tmp_path, cycles=1)
    attention_path = svc.state_paths()["attention_weights"]
    for path in list(svc.state_paths().values()) + [attention_path]:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            pickle.dump({"state": Payload()}, f)
    from ruvllm_lab.attention import GraphAttentionEngine
    attention = GraphAttentionEngine(svc.config.attention, D)
    resumed = LearningService(svc.config, make_router("fastgrnn", TIERS, svc.config.router, D), attention=attention)
    assert not marker.exists()
    assert resumed.load_state() == []  # every file refused, the service starts fresh
    assert not marker.exists()


@pytest.mark.model
def test_shadow_evaluation_answers_a_neighbour_tier_when_idle_and_yields_to_a_request(tmp_path):
    """Real model: a rated-good answer of the 0.5B tier is re-answered by the resident 135M tier.
    A request arriving mid-generation stops the shadow answer at the next token (the job is kept);
    once idle again it completes and becomes a two-tier full-information row."""
    from ruvllm_lab import RuvLLM

    cfg = _config(tmp_path, **{"learning.shadow_rate": 1.0, "inference.max_tokens": 16,
                               "embedding.dimension": 384, "router.hidden_dim": 16})
    with RuvLLM(cfg) as llm:
        llm.pool.generate(TIERS[0], "Hello", max_tokens=1)  # resident: shadow evaluation never loads a model
        x = RouterInput(np.ones(384, np.float32) / np.sqrt(384), 8, 0.0, 0, 0.0, 0, {}, None, None)
        d = llm.learning.route(dataclasses.replace(x, forced_tier=TIERS[1]))
        llm.learning.record(Interaction("s1", x, d, signals={TIERS[1]: {"rating": 5}},
                                        query="What is the capital of France?", answer="Paris"))
        assert llm.learning.shadow_stats["queued"] == 1
        calls = []

        def request_arrives():  # idle when the job starts, a request in flight from the next check on
            calls.append(1)
            return len(calls) > 1

        assert llm.learning.shadow_step(llm._shadow_answer, request_arrives, llm.pool.loaded_models) == "preempted"
        assert len(calls) == 2 and llm.learning.shadow_stats["preempted"] == 1  # stopped after one token
        assert llm.shadow_evaluate() == {"answered": 1, "idle-queue": 1}
        report = llm.learn()
        assert report["shadow_examples"] == 1
        rows = [e for e in llm.learning._waiting if len(e.outcomes or {}) == 2]  # fewer than min_examples: waiting
        assert len(rows) == 1 and rows[0].outcomes[TIERS[1]] == 1.0 and rows[0].outcomes[TIERS[0]] in (0.0, 1.0)
        assert rows[0].weights[TIERS[0]] == cfg.learning.shadow_weight  # judged by agreement with "Paris"
