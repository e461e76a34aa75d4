"""Router: features, FastGRNN policy, three-phase training, baselines, persistence."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ruvllm_lab.config import RouterConfig
from ruvllm_lab.errors import ConfigError, DimensionMismatch, ModelNotFound
from ruvllm_lab.router import (ROUTERS, FastGRNNPolicy, FastGRNNRouter, NumpyFastGRNN, RouterExample, RouterInput,
                               accuracy, build_model, feature_dim, featurise, featurise_input, hard_threshold_,
                               label_loss,
                               load_router, make_router, router_loss, save_router, size_report, sparsify_,
                               three_phase_fit, tier_costs, train_epochs, train_steps)
from ruvllm_lab.router.features import SCALAR_FEATURES, context_bucket_index

TIERS = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]
DIM = 16


def make_input(vec, top_similarity=0.3, session_turn=0, forced=None, quality=None, **kw) -> RouterInput:
    return RouterInput(query_vec=np.asarray(vec, np.float32), query_tokens=kw.get("tokens", 24),
                       top_similarity=top_similarity, hit_count=kw.get("hits", 3), mean_degree=1.5,
                       session_turn=session_turn, tier_quality=quality or {}, max_latency_ms=kw.get("latency"),
                       max_tokens=kw.get("max_tokens"), forced_tier=forced)


def separable_task(n: int, seed: int) -> list[RouterExample]:
    """Label = the query's topic cluster (3 clusters), except that a strong memory hit
    (top_similarity > 0.7) makes the smallest tier enough.  Separable, but needs both kinds of feature."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(123).normal(size=(3, DIM))
    out = []
    for _ in range(n):
        c = int(rng.integers(3))
        v = centers[c] + 0.35 * rng.normal(size=DIM)
        sim = float(rng.uniform(0.0, 1.0))
        if 0.6 < sim < 0.8:  # keep a margin around the rule's threshold
            sim = 0.9 if sim > 0.7 else 0.5
        label = TIERS[0] if sim > 0.7 else TIERS[c]
        out.append(RouterExample(make_input(v / np.linalg.norm(v), top_similarity=sim), label,
                                 context_items=2 if sim > 0.7 else 8, temperature=0.3, top_p=0.8))
    return out


def config(**kw) -> RouterConfig:
    base = dict(hidden_dim=16, epochs=30, batch_size=32, learning_rate=0.02, sparsity=0.9)
    base.update(kw)
    return RouterConfig(**base)


@pytest.fixture(scope="module")
def trained_policy():
    policy = make_router("fastgrnn", TIERS, config(), DIM, seed=0)
    report = policy.fit(separable_task(600, seed=1))
    return policy, report


# ---- features -------------------------------------------------------------------------------------------
def test_feature_vector_layout():
    x = make_input(np.arange(DIM) / DIM, top_similarity=0.42, quality={"gemma3-270m": 0.9}, latency=500.0)
    f = featurise_input(x, TIERS, DIM)
    assert f.shape == (feature_dim(DIM, len(TIERS)),) == (DIM + len(SCALAR_FEATURES) + 2 * len(TIERS),)
    np.testing.assert_allclose(f[:DIM], np.arange(DIM) / DIM, rtol=1e-6)
    assert f[DIM + 1] == pytest.approx(0.42)
    assert f[DIM + SCALAR_FEATURES.index("has_latency_limit")] == 1.0
    assert f[DIM + SCALAR_FEATURES.index("has_token_limit")] == 0.0
    quality, known = f[-2 * len(TIERS):-len(TIERS)], f[-len(TIERS):]
    np.testing.assert_allclose(quality, [0.0, 0.9, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(known, [0.0, 1.0, 0.0])


def test_feature_dimension_mismatch_is_clear():
    with pytest.raises(DimensionMismatch, match="dimension 16, got 8"):
        featurise_input(make_input(np.zeros(8)), TIERS, DIM)


def test_featurise_masks_missing_targets_and_rejects_unknown_tiers():
    ex = separable_task(4, seed=0)
    ex[1] = dataclasses.replace(ex[1], context_items=None, temperature=None, top_p=None)
    batch = featurise(ex, TIERS, DIM, context_buckets=[0, 2, 4, 8], hidden_dim=5)
    assert batch.x.shape == (4, feature_dim(DIM, 3)) and batch.h0.shape == (4, 5)
    assert batch.context_bucket[1] == -1 and torch.isnan(batch.temperature[1]) and torch.isnan(batch.top_p[1])
    assert batch.context_bucket[0] >= 0 and not torch.isnan(batch.temperature[0])
    with pytest.raises(ValueError, match="not one of the router's tiers"):
        featurise([dataclasses.replace(ex[0], best_tier="nope")], TIERS, DIM)


def test_context_bucket_index_is_nearest():
    assert [context_bucket_index(i, [0, 2, 4, 8]) for i in (0, 1, 3, 5, 7, 100)] == [0, 0, 1, 2, 3, 3]


def test_tier_costs_use_the_ladder_or_rank():
    ladder = tier_costs(TIERS)
    assert ladder[-1] == pytest.approx(1.0) and torch.all(ladder[1:] > ladder[:-1])
    assert ladder[0] == pytest.approx(135 / 494, rel=1e-3)
    ranked = tier_costs(["a.gguf", "b.gguf"])
    assert ranked.tolist() == pytest.approx([0.5, 1.0])


# ---- hard thresholding ----------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.95])
def test_hard_threshold_leaves_exact_sparsity_and_keeps_largest(sparsity):
    w = torch.randn(37, 23, generator=torch.Generator().manual_seed(1))
    original = w.clone()
    mask = hard_threshold_(w, sparsity)
    n = w.numel()
    assert int((mask == 0).sum()) == round(sparsity * n)
    assert int((w == 0).sum()) == round(sparsity * n)
    kept = original.abs()[mask.bool()]
    dropped = original.abs()[~mask.bool()]
    if len(dropped) and len(kept):
        assert kept.min() >= dropped.max()
    torch.testing.assert_close(w[mask.bool()], original[mask.bool()])


def test_hard_threshold_rejects_bad_sparsity():
    with pytest.raises(ValueError):
        hard_threshold_(torch.ones(3), 1.0)


def test_sparsify_touches_only_cell_matrices():
    model = build_model(DIM, TIERS, config(w_rank=4), seed=0)
    head_before = model.head.weight.clone()
    masks = sparsify_(model, 0.9)
    assert set(masks) == {"cell.W1", "cell.W2", "cell.U"}
    for name, mask in masks.items():
        p = dict(model.named_parameters())[name]
        assert int((p == 0).sum()) == round(0.9 * p.numel())
    assert torch.equal(model.head.weight, head_before)


def test_three_phase_fit_reaches_target_sparsity_and_reports_size():
    cfg = config(sparsity=0.95, epochs=9)
    model = build_model(DIM, TIERS, cfg, seed=0)
    report = three_phase_fit(model, featurise(separable_task(128, 0), TIERS, DIM, hidden_dim=16), cfg)
    for name, mask in report["masks"].items():
        p = dict(model.named_parameters())[name]
        assert int((mask == 0).sum()) == round(0.95 * p.numel())
        assert torch.all(p[mask == 0] == 0)
    assert report["epochs"] == {"dense": 3, "iht": 3, "frozen": 3}
    assert report["nonzeros"] < report["param_count"]
    assert report["size_kb_int8"] < report["size_kb_float32"] < report["size_kb_float32_dense"]
    assert report["cell_matrix_sparsity"] == pytest.approx(0.95, abs=0.002)


def test_support_stays_frozen_in_phase_three():
    cfg = config(sparsity=0.9)
    model = build_model(DIM, TIERS, cfg, seed=0)
    batch = featurise(separable_task(96, 0), TIERS, DIM, hidden_dim=16)
    batch.h0 = torch.randn(batch.h0.shape, generator=torch.Generator().manual_seed(0))  # so U gets a gradient
    masks = sparsify_(model, 0.9)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_epochs(model, batch, 3, cfg, masks=masks)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.all(params[name][mask == 0] == 0), f"{name} grew outside its support"
        assert not torch.equal(params[name][mask == 1], before[name][mask == 1]), f"{name} did not train"


def test_size_report_counts():
    model = build_model(DIM, TIERS, config(), seed=0)
    rep = size_report(model)
    n = sum(p.numel() for p in model.parameters())
    assert rep["param_count"] == n and rep["size_kb_float32_dense"] == pytest.approx(n * 4 / 1024)
    assert rep["size_kb_float32"] == pytest.approx(n * 4 / 1024)  # dense: no index is charged
    sparsify_(model, 0.9)
    rep2 = size_report(model)
    # EdgeML's estimateNNZ: a cell matrix at density 0.1 costs value + index (4 + 4 bytes) per
    # non-zero; biases, ζ, ν and the heads stay dense at 4 bytes per entry
    cell = {f"cell.{m}" for m in model.cell.matrix_names()}
    params = dict(model.named_parameters())
    cell_nnz = sum(int((params[m] != 0).sum()) for m in cell)
    dense = sum(p.numel() for name, p in params.items() if name not in cell)
    assert rep2["nonzeros"] < rep["nonzeros"]
    assert rep2["size_kb_float32"] == pytest.approx((cell_nnz * 8 + dense * 4) / 1024)
    assert rep2["size_kb_int8"] == pytest.approx((cell_nnz * 3 + dense + 4 * len(params)) / 1024)


def test_edgeml_size_follows_estimate_nnz():
    from ruvllm_lab.router.train import edgeml_size_bytes
    assert edgeml_size_bytes(1000, 100, True) == 100 * 8  # sparse: value + index
    assert edgeml_size_bytes(1000, 600, True) == 1000 * 4  # density >= 0.5: stored dense
    assert edgeml_size_bytes(1000, 100, False) == 1000 * 4  # not a thresholded matrix: dense
    assert edgeml_size_bytes(1000, 100, True, 1, 2) == 100 * 3


# ---- loss and training hooks ---------------------------------------------------------------------------
def test_router_loss_reductions_agree():
    model = build_model(DIM, TIERS, config(), seed=0)
    batch = featurise(separable_task(20, 0), TIERS, DIM, hidden_dim=16)
    per = router_loss(model, batch, reduction="none")
    assert per.shape == (20,)
    torch.testing.assert_close(router_loss(model, batch, reduction="sum"), per.sum())
    # "mean": the label term per row that observed a head, the other heads per row
    label = label_loss(model, batch, reduction="none")
    want = label.sum() / (batch.cum_weight.sum(-1) > 0).sum().clamp(min=1) + (per - label).mean()
    torch.testing.assert_close(router_loss(model, batch), want)


def test_cost_weight_shifts_routing_to_cheaper_tiers():
    """On labels that are pure noise the only learnable signal is cost: a larger weight lowers expected cost."""
    rng = np.random.default_rng(0)
    ex = [RouterExample(make_input(rng.normal(size=DIM)), TIERS[int(rng.integers(3))]) for _ in range(120)]
    expected_cost = []
    for cw in (0.0, 3.0):
        cfg = config(cost_weight=cw, sparsity=0.0, epochs=15)
        model = build_model(DIM, TIERS, cfg, seed=0)
        batch = featurise(ex, TIERS, DIM, hidden_dim=16)
        train_epochs(model, batch, cfg.epochs, cfg)
        with torch.no_grad():
            p = model(batch.x).tier_probs
        expected_cost.append(float((p * model.tier_costs).sum(-1).mean()))
    assert expected_cost[1] < expected_cost[0] - 0.05


def test_extra_penalty_hook_is_added_to_the_loss():
    model = build_model(DIM, TIERS, config(), seed=0)
    batch = featurise(separable_task(32, 0), TIERS, DIM, hidden_dim=16)
    plain = router_loss(model, batch).item()
    losses = train_steps(model, [batch], lr=0.0, extra_penalty=lambda m: 10.0 + 0 * m.cell.zeta.sum())
    assert losses[0] == pytest.approx(plain + 10.0, rel=1e-5)
    # A strong L2 pull drives the cell weights towards zero.
    norm_before = model.cell.W.norm().item()
    train_steps(model, [batch] * 30, lr=0.02, extra_penalty=lambda m: 100.0 * m.cell.W.pow(2).sum())
    assert model.cell.W.norm().item() < 0.5 * norm_before


def test_sampling_and_context_heads_learn_their_targets(trained_policy):
    policy, _ = trained_policy
    batch = policy.featurise(separable_task(100, seed=5))
    with torch.no_grad():
        out = policy.model(batch.x)
    assert float((out.temperature - 0.3).abs().mean()) < 0.1
    assert float((out.top_p - 0.8).abs().mean()) < 0.1
    ctx_acc = float((out.context_logits.argmax(-1) == batch.context_bucket).float().mean())
    assert ctx_acc > 0.9


# ---- the FastGRNN policy ----------------------------------------------------------------------------------
def test_fastgrnn_reaches_95_percent_on_separable_task(trained_policy):
    policy, report = trained_policy
    held_out = separable_task(400, seed=99)
    assert accuracy(policy.model, policy.featurise(held_out)) >= 0.95
    routed = np.mean([policy.route(e.x).tier == e.best_tier for e in held_out])
    assert routed >= 0.95
    assert report["cell_matrix_sparsity"] == pytest.approx(0.9, abs=0.002)


def test_low_rank_router_also_learns():
    # 70 % sparsity of the rank-4 factors: at the default 90 % the 16 x 4 factor keeps 6 weights,
    # too few for three cumulative heads (measured: 0.60 accuracy; 1.0 at 70 %)
    policy = make_router("fastgrnn", TIERS, config(w_rank=4, u_rank=4, sparsity=0.7), DIM, seed=0)
    policy.fit(separable_task(600, seed=1))
    assert accuracy(policy.model, policy.featurise(separable_task(300, seed=98))) >= 0.9


def test_hidden_state_differs_between_first_and_second_turn(trained_policy):
    policy, _ = trained_policy
    x = separable_task(1, seed=3)[0].x
    first = policy.route(x, state=None)
    second = policy.route(dataclasses.replace(x, session_turn=1), state=first.state)
    assert first.state.shape == (16,) and second.state.shape == (16,)
    assert not np.allclose(first.state, second.state)
    # the carried state itself matters, not only the turn counter
    same_turn_fresh = policy.route(dataclasses.replace(x, session_turn=1), state=None)
    assert not np.allclose(second.state, same_turn_fresh.state)


def test_numpy_path_matches_torch(trained_policy):
    policy, _ = trained_policy
    fast = NumpyFastGRNN.from_model(policy.model)
    h = np.random.default_rng(0).normal(size=16).astype(np.float32)
    for e in separable_task(10, seed=4):
        f = featurise_input(e.x, TIERS, DIM)
        step = fast.step(f, h)
        with torch.no_grad():
            o = policy.model(torch.from_numpy(f)[None], torch.from_numpy(h)[None])
        np.testing.assert_allclose(step.h, o.h[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(step.tier_probs, o.tier_probs[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(step.cum_probs, o.cum_probs[0].numpy(), atol=1e-5)
        assert step.temperature == pytest.approx(float(o.temperature[0]), abs=1e-5)
        assert step.top_p == pytest.approx(float(o.top_p[0]), abs=1e-5)


def test_torch_and_numpy_backends_decide_the_same(trained_policy):
    policy, _ = trained_policy
    torch_policy = FastGRNNPolicy(TIERS, policy.config, DIM, backend="torch")
    torch_policy.load_state_dict(policy.state_dict())
    for e in separable_task(10, seed=6):
        a, b = policy.route(e.x), torch_policy.route(e.x)
        assert a.tier == b.tier and a.context_items == b.context_items
        assert a.confidence == pytest.approx(b.confidence, abs=1e-5)


def test_numpy_snapshot_follows_in_place_training():
    policy = make_router("fastgrnn", TIERS, config(confidence_threshold=0.0), DIM, seed=0)
    x = separable_task(1, seed=0)[0].x
    before = policy.route(x).tier_probs
    train_steps(policy.model, [policy.featurise(separable_task(64, 0))] * 5, lr=0.05)
    after = policy.route(x).tier_probs
    with torch.no_grad():
        want = policy.model(torch.from_numpy(featurise_input(x, TIERS, DIM))[None]).tier_probs[0]
    assert before != after
    np.testing.assert_allclose(list(after.values()), want.numpy(), atol=1e-5)


@pytest.mark.parametrize("fallback,default,expected", [("largest", "", TIERS[-1]), ("smallest", "", TIERS[0]),
                                                       ("default", "gemma3-270m", "gemma3-270m")])
def test_low_confidence_uses_the_configured_fallback(fallback, default, expected):
    policy = make_router("fastgrnn", TIERS, config(confidence_threshold=0.99, fallback=fallback,
                                                   default_tier=default), DIM, seed=0)
    d = policy.route(separable_task(1, 0)[0].x)  # untrained: every cumulative probability ~0.1-0.4
    assert d.fallback_used and d.tier == expected


def test_confident_router_does_not_fall_back(trained_policy):
    policy, _ = trained_policy
    cheap = [e for e in separable_task(20, seed=7) if e.best_tier != TIERS[-1]][:5]
    for e in cheap:  # a cheaper tier is confidently enough: no fallback, confidence = its C
        d = policy.route(e.x)
        assert not d.fallback_used and d.confidence >= policy.config.confidence_threshold


def test_default_fallback_needs_a_configured_tier():
    with pytest.raises(ConfigError, match="default_tier"):
        make_router("fastgrnn", TIERS, config(fallback="default", default_tier="missing"), DIM)


def test_forced_tier_bypasses_the_router(trained_policy):
    policy, _ = trained_policy
    x = separable_task(1, seed=8)[0].x
    d = policy.route(dataclasses.replace(x, forced_tier="gemma3-270m"))
    assert d.tier == "gemma3-270m" and d.confidence == 1.0 and not d.fallback_used and d.state is not None
    with pytest.raises(ModelNotFound, match="not configured"):
        policy.route(dataclasses.replace(x, forced_tier="qwen2.5-coder-1.5b"))


def test_wrong_sized_state_is_rejected(trained_policy):
    policy, _ = trained_policy
    with pytest.raises(ValueError, match="state=None"):
        policy.route(separable_task(1, 0)[0].x, state=np.zeros(3, np.float32))


def test_partial_fit_keeps_the_sparsity_support(trained_policy):
    policy, _ = trained_policy
    clone = make_router("fastgrnn", TIERS, policy.config, DIM, seed=0)
    clone.load_state_dict(policy.state_dict())
    report = clone.partial_fit(separable_task(64, seed=11))
    params = dict(clone.model.named_parameters())
    for name, mask in clone.masks.items():
        assert torch.all(params[name][mask == 0] == 0)
    assert report["train_accuracy"] >= 0.9


# ---- persistence ---------------------------------------------------------------------------------------------
def test_policy_save_load_round_trip(trained_policy, tmp_path):
    policy, _ = trained_policy
    path = policy.save(tmp_path / "router_weights.pt")
    fresh = make_router("fastgrnn", TIERS, policy.config, DIM, seed=5)
    fresh.load(path)
    for e in separable_task(5, seed=12):
        a, b = policy.route(e.x), fresh.route(e.x)
        assert a.tier == b.tier and a.tier_probs == pytest.approx(b.tier_probs)
        np.testing.assert_allclose(a.state, b.state)
    assert set(fresh.masks) == set(policy.masks)


def test_module_save_load_round_trip(trained_policy, tmp_path):
    policy, _ = trained_policy
    save_router(policy.model, tmp_path / "m.pt", masks=policy.masks)
    model, masks = load_router(tmp_path / "m.pt")
    assert isinstance(model, FastGRNNRouter) and set(masks) == set(policy.masks)
    batch = policy.featurise(separable_task(8, 0))
    with torch.no_grad():
        torch.testing.assert_close(model(batch.x).cum_logits, policy.model(batch.x).cum_logits)


def test_load_rejects_another_routers_file(trained_policy, tmp_path):
    policy, _ = trained_policy
    path = policy.save(tmp_path / "r.pt")
    with pytest.raises(ConfigError, match="holds router 'fastgrnn'"):
        make_router("knn", TIERS, config(), DIM).load(path)


# ---- baselines through the same interface ------------------------------------------------------------------
ALL_ROUTERS = sorted(ROUTERS) + ["always-gemma3-270m"]


@pytest.mark.parametrize("name", ALL_ROUTERS)
def test_every_router_keeps_the_contract(name):
    router = make_router(name, TIERS, config(), DIM, seed=0)
    train = separable_task(120, seed=1)
    report = router.fit(train)
    assert report["router"] == router.name and isinstance(report, dict)
    router.partial_fit(train[:10])
    state = None
    for e in train[:5]:
        d = router.route(e.x, state)
        assert d.tier in TIERS and set(d.tier_probs) == set(TIERS)
        assert sum(d.tier_probs.values()) == pytest.approx(1.0)
        assert d.context_items in router.config.context_buckets
        assert 0.0 <= d.confidence <= 1.0 and 0.0 < d.top_p <= 1.0 and d.temperature > 0
        assert d.router == router.name and "state" not in d.to_dict()
        state = d.state
    forced = router.route(dataclasses.replace(train[0].x, forced_tier=TIERS[1]))
    assert forced.tier == TIERS[1] and not forced.fallback_used


@pytest.mark.parametrize("name", ["knn", "logreg", "oracle"])
def test_learned_baselines_solve_the_separable_task(name):
    router = make_router(name, TIERS, config(confidence_threshold=0.0), DIM)
    train = separable_task(600, seed=1)
    router.fit(train)
    test = train[:200] if name == "oracle" else separable_task(300, seed=99)
    acc = np.mean([router.route(e.x).tier == e.best_tier for e in test])
    # kNN sees only the query vector, not the memory-hit rule: its ceiling here is 1/3 + 2/3 · 0.7 = 0.8.
    assert acc >= {"oracle": 1.0, "knn": 0.7, "logreg": 0.9}[name]


def test_fixed_baselines_choose_as_named():
    xs = [e.x for e in separable_task(30, 0)]
    assert {make_router("always-smallest", TIERS, config(), DIM).route(x).tier for x in xs} == {TIERS[0]}
    assert {make_router("always-largest", TIERS, config(), DIM).route(x).tier for x in xs} == {TIERS[-1]}
    r1, r2 = (make_router("random", TIERS, config(), DIM, seed=3) for _ in range(2))
    a, b = [r1.route(x).tier for x in xs], [r2.route(x).tier for x in xs]
    assert a == b and len(set(a)) == 3  # seeded, and it does use every tier


def test_unfitted_learned_baselines_fall_back():
    for name in ("knn", "logreg"):
        d = make_router(name, TIERS, config(fallback="smallest"), DIM).route(separable_task(1, 0)[0].x)
        assert d.fallback_used and d.tier == TIERS[0]


def test_oracle_refuses_unseen_queries():
    oracle = make_router("oracle", TIERS, config(), DIM)
    oracle.fit(separable_task(5, 0))
    with pytest.raises(ValueError, match="evaluation"):
        oracle.route(make_input(np.ones(DIM)))


def test_unknown_router_name_lists_known_ones():
    with pytest.raises(ConfigError, match="knn"):
        make_router("nope", TIERS, config(), DIM)
    with pytest.raises(ConfigError):
        make_router("fastgrnn", [], config(), DIM)


@pytest.mark.parametrize("name", ["knn", "logreg"])
def test_baseline_save_load_round_trip(name, tmp_path):
    router = make_router(name, TIERS, config(confidence_threshold=0.0), DIM)
    router.fit(separable_task(200, seed=1))
    path = router.save(tmp_path / f"{name}.pt")
    fresh = make_router(name, TIERS, config(confidence_threshold=0.0), DIM).load(path)
    for e in separable_task(20, seed=2):
        a, b = router.route(e.x), fresh.route(e.x)
        assert a.tier == b.tier and a.tier_probs == pytest.approx(b.tier_probs)


def test_deep_copy_trained_in_place_routes_with_its_own_weights():
    """The learning service deep-copies the serving router and trains the copy: the copy must not
    reuse a stale weight snapshot (tensor versions restart at 0 in a copy)."""
    import copy
    policy = make_router("fastgrnn", TIERS, config(confidence_threshold=0.0), DIM, seed=0)
    x = separable_task(1, seed=0)[0].x
    policy.route(x)  # snapshot taken at version 0
    train_steps(policy.model, [policy.featurise(separable_task(64, 0))] * 5, lr=0.05)
    clone = copy.deepcopy(policy)
    with torch.no_grad():
        want = clone.model(torch.from_numpy(featurise_input(x, TIERS, DIM))[None]).tier_probs[0]
    np.testing.assert_allclose(list(clone.route(x).tier_probs.values()), want.numpy(), atol=1e-5)
    np.testing.assert_allclose(list(policy.route(x).tier_probs.values()), want.numpy(), atol=1e-5)
