"""ContinualTrainer: replay mix, label-only Fisher, IHT sparsity kept through updates, optimiser state."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from ruvllm_lab.config import Config
from ruvllm_lab.learning.ewc import fisher_diag
from ruvllm_lab.learning.trainer import ContinualTrainer
from ruvllm_lab.router import RouterExample, RouterInput, label_loss, make_router, router_loss

from .conftest import ROOT

D = 12
TIERS = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]


def _config(**overrides) -> Config:
    base = {"inference.models": TIERS, "router.hidden_dim": 16, "router.sparsity": 0.9, "learning.batch_size": 8,
            "learning.steps_per_cycle": 10, "learning.replay_ratio": 0.25}
    base.update(overrides)
    return Config.load(ROOT / "configs" / "edge.toml", overrides=base)


def _examples(n: int, seed: int, censored: bool = False) -> list[RouterExample]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(3))
        v = rng.normal(0, 0.3, D).astype(np.float32)
        v[k] += 2.0
        x = RouterInput(v, 8, 0.0, 0, 0.0, 0, {}, None, None)
        if censored:  # bandit: only one tier's outcome
            t = int(rng.integers(3))
            out.append(RouterExample(x=x, outcomes={TIERS[t]: float(t >= k)}, context_items=4))
        else:
            out.append(RouterExample(x=x, best_tier=TIERS[k], context_items=4, temperature=0.5, top_p=0.9))
    return out


def _policy(cfg):
    return make_router("fastgrnn", TIERS, cfg.router, D, seed=0)


def test_update_mixes_replay_at_the_configured_ratio_and_counts_updates():
    cfg = _config()
    trainer, policy = ContinualTrainer.from_config(cfg), _policy(cfg)
    first = trainer.update(policy, _examples(20, 0))
    assert first["replay_per_step"] == 0 and first["fresh_per_step"] == 8  # nothing to replay yet
    trainer.end_task(policy, _examples(20, 0))
    second = trainer.update(policy, _examples(20, 1))
    assert second["replay_per_step"] == round(0.25 * 8) == 2 and second["fresh_per_step"] == 6
    assert trainer.updates == 20 and second["updates_total"] == 20
    third = trainer.update(policy, _examples(12, 2), epochs=2)
    assert third["steps"] == 2 * math.ceil(12 / 6)
    with pytest.raises(ValueError, match="steps or epochs"):
        trainer.update(policy, _examples(4, 3), steps=1, epochs=1)
    with pytest.raises(TypeError, match="unknown ContinualTrainer override"):
        ContinualTrainer.from_config(cfg, replay=0.5)


def test_every_update_leaves_the_serving_router_at_the_configured_sparsity():
    cfg = _config()
    trainer, policy = ContinualTrainer.from_config(cfg), _policy(cfg)
    for seed in range(3):
        report = trainer.update(policy, _examples(16, seed, censored=True))
        assert report["cell_matrix_sparsity"] == pytest.approx(0.9, abs=0.002)
        params = dict(policy.model.named_parameters())
        assert set(policy.masks) == {f"cell.{n}" for n in policy.model.cell.matrix_names()}
        for name, mask in policy.masks.items():
            assert torch.all(params[name][mask == 0] == 0)
            assert float(mask.mean()) == pytest.approx(0.1, abs=0.002)
        trainer.end_task(policy, _examples(16, seed, censored=True))
    # what serves (the numpy snapshot) is the sparse model
    x = _examples(1, 9)[0].x
    np.testing.assert_allclose(list(policy.route(x).tier_probs.values()),
                               policy.model(torch.from_numpy(policy.featurise([_examples(1, 9)[0]]).x.numpy()))
                               .tier_probs[0].detach().numpy(), atol=1e-5)


def test_fisher_is_of_the_label_log_likelihood_only():
    cfg = _config()
    trainer, policy = ContinualTrainer.from_config(cfg), _policy(cfg)
    trainer.update(policy, _examples(16, 0))
    x = _examples(1, 0)[0].x
    unlabelled = [RouterExample(x=x, context_items=0, temperature=1.2, top_p=0.5)] * 4  # targets, but no tier outcome
    assert float(router_loss(policy.model, policy.featurise(unlabelled))) > 0  # the full objective has a gradient
    report = trainer.consolidate(policy, unlabelled)
    assert report["fisher_mean"] == 0.0  # ... the label likelihood has none
    fresh = ContinualTrainer.from_config(cfg)
    labelled = _examples(8, 1)
    fresh.consolidate(policy, labelled)
    batch = policy.featurise(labelled)
    want = fisher_diag(policy.model, [{f: getattr(batch, f) for f in batch.__dataclass_fields__}],
                       lambda m, d: label_loss(m, type(batch)(**d)), per_sample=True, method="loop")
    for name, f in fresh.ewc.fisher.items():
        torch.testing.assert_close(f, want[name])
    assert fresh.ewc.consolidations == 1


def test_adam_moments_carry_across_updates_and_a_failed_update_commits_nothing():
    cfg = _config()
    trainer, policy = ContinualTrainer.from_config(cfg), _policy(cfg)
    trainer.update(policy, _examples(16, 0))
    steps = {n: float(s["step"]) for n, s in trainer._optimizer_state.items()}
    assert set(steps) == {n for n, _ in policy.model.named_parameters()} and set(steps.values()) == {10.0}
    candidate = copy.deepcopy(policy)  # the service trains a copy: parameter objects differ, names do not
    trainer.update(candidate, _examples(16, 1))
    assert {float(s["step"]) for s in trainer._optimizer_state.values()} == {20.0}
    saved = {n: {k: v.clone() for k, v in s.items()} for n, s in trainer._optimizer_state.items()}
    poisoned = [RouterExample(x=RouterInput(np.full(D, np.nan, np.float32), 8, 0.0, 0, 0.0, 0, {}, None, None),
                              best_tier=TIERS[0])] * 4
    with pytest.raises(FloatingPointError, match="non-finite"):
        trainer.update(copy.deepcopy(candidate), poisoned)
    assert trainer.updates == 20
    for n, s in trainer._optimizer_state.items():
        for k, v in s.items():
            torch.testing.assert_close(v, saved[n][k])
    # the state round-trips through torch.load(weights_only=True)
    restored = ContinualTrainer.from_config(cfg)
    buf = __import__("io").BytesIO()
    torch.save(trainer.state_dict(), buf)
    buf.seek(0)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.updates == 20 and set(restored._optimizer_state) == set(saved)


def test_ewc_and_replay_through_the_trainer_forget_less_than_naive():
    """Two phases with opposite cluster -> tier maps (a phase marker tells them apart): naive
    fine-tuning forgets phase 0; the same trainer with online EWC and replay keeps it."""
    tiers = TIERS[:2]

    def phase(p, n, seed):
        rng = np.random.default_rng(seed)
        out = []
        for i in range(n):
            c = i % 2
            v = rng.normal(0, 0.3, D).astype(np.float32)
            v[c] += 2.0
            v[2 + p] += 2.0
            out.append(RouterExample(x=RouterInput(v, 8, 0.0, 0, 0.0, 0, {}, None, None),
                                     best_tier=tiers[c if p == 0 else 1 - c]))
        return out

    def accuracy(policy, data):
        return float(np.mean([policy.route(e.x).tier == e.best_tier for e in data]))

    forgetting = {}
    for name, kw in {"naive": dict(replay_ratio=0.0, ewc_lambda=0.0), "ewc+replay": {}}.items():
        # 80 % sparsity: at 95 % a 16-unit cell keeps ~23 input weights, too few to hold both phases
        cfg = _config(**{"inference.models": tiers, "router.sparsity": 0.8, "learning.batch_size": 32,
                         "learning.replay_ratio": 0.5, "learning.ewc_lambda": 100.0})
        trainer = ContinualTrainer.from_config(cfg, **kw)
        policy = make_router("fastgrnn", tiers, cfg.router, D, seed=0)
        diagonal = []
        for p in range(2):
            train = phase(p, 128, p)
            for c in range(4):  # four serving-sized cycles per phase, each consolidated
                chunk = train[32 * c:32 * (c + 1)]
                trainer.update(policy, chunk, steps=50)
                trainer.end_task(policy, chunk)
            diagonal.append(accuracy(policy, phase(p, 100, 10 + p)))
            if p == 0:
                first = diagonal[0]
        assert min(diagonal) >= 0.9, (name, diagonal)  # each phase learned while current
        forgetting[name] = first - accuracy(policy, phase(0, 100, 10))
    assert forgetting["naive"] >= 0.3 and forgetting["naive"] - forgetting["ewc+replay"] >= 0.3, forgetting
