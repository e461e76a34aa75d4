"""Replay buffer: reservoir uniformity (chi-square at a fixed seed), tier balance, persistence."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from scipy.stats import chisquare

from ruvllm_lab.learning.replay import ReplayBuffer

STREAM, CAPACITY, TRIALS = 100, 10, 2000


def _inclusion_counts(make_buffer) -> np.ndarray:
    counts = np.zeros(STREAM)
    for trial in range(TRIALS):
        buf = make_buffer(trial)
        for i in range(STREAM):
            buf.add(i)
        for i in buf.items():
            counts[i] += 1
    return counts


def test_reservoir_is_uniform_chi_square():
    counts = _inclusion_counts(lambda seed: ReplayBuffer(CAPACITY, seed=seed))
    expected = np.full(STREAM, TRIALS * CAPACITY / STREAM)
    assert counts.sum() == TRIALS * CAPACITY
    p = chisquare(counts, expected).pvalue
    assert p > 0.01, p


def test_chi_square_detects_a_biased_buffer():
    """The statistical test above can fail: a keep-the-newest buffer is rejected."""

    class KeepNewest(ReplayBuffer):
        def add(self, item, tier=None):
            res = self._reservoirs["__all__"]
            res.items = (res.items + [item])[-res.capacity:]

    counts = _inclusion_counts(lambda seed: KeepNewest(CAPACITY, seed=seed))
    p = chisquare(counts, np.full(STREAM, TRIALS * CAPACITY / STREAM)).pvalue
    assert p < 1e-6


def test_capacity_and_counts():
    buf = ReplayBuffer(5, seed=0)
    buf.extend(range(3))
    assert len(buf) == 3 and sorted(buf.items()) == [0, 1, 2]
    buf.extend(range(3, 50))
    assert len(buf) == 5 and buf.seen == 50
    assert len(set(buf.sample(3))) == 3
    assert sorted(buf.sample(100)) == sorted(buf.items())
    with pytest.raises(ValueError):
        ReplayBuffer(0)


def test_sample_is_uniform_over_held_items():
    buf = ReplayBuffer(10, seed=1)
    buf.extend(range(10))
    counts = Counter(x for _ in range(3000) for x in buf.sample(2))
    assert chisquare([counts[i] for i in range(10)]).pvalue > 0.01


def test_balanced_buffer_keeps_rare_tier_and_samples_evenly():
    buf = ReplayBuffer(40, balance_by_tier=True, seed=0)
    for i in range(1000):
        buf.add(("big", i), tier="big")
        if i % 50 == 0:
            buf.add(("small", i), tier="small")
    assert buf.tiers == {"big": 20, "small": 20}
    assert len(buf) == 40
    batch = buf.sample(10)
    assert Counter(t for t, _ in batch) == {"big": 5, "small": 5}
    # an unbalanced buffer on the same stream holds the rare tier in proportion (~2%)
    plain = ReplayBuffer(40, seed=0)
    for i in range(1000):
        plain.add(("big", i))
        if i % 50 == 0:
            plain.add(("small", i))
    assert sum(t == "small" for t, _ in plain.items()) < 10


def test_balanced_sample_redistributes_when_a_tier_is_short():
    buf = ReplayBuffer(30, balance_by_tier=True, seed=0)
    for i in range(2):
        buf.add(("a", i), tier="a")
    for i in range(50):
        buf.add(("b", i), tier="b")
    batch = buf.sample(10)
    assert len(batch) == 10
    assert Counter(t for t, _ in batch) == {"a": 2, "b": 8}


def test_balanced_needs_a_tier():
    buf = ReplayBuffer(4, balance_by_tier=True)
    with pytest.raises(ValueError, match="tier"):
        buf.add("x")


def test_new_tier_shrinks_existing_reservoirs_uniformly():
    buf = ReplayBuffer(10, balance_by_tier=True, seed=3)
    buf.extend(range(10), tier="a")
    buf.add(100, tier="b")
    assert buf.tiers == {"a": 5, "b": 1} and len(buf) <= 10


def test_state_roundtrip_and_save_load(tmp_path):
    buf = ReplayBuffer(8, balance_by_tier=True, seed=7)
    for i in range(40):
        buf.add({"x": np.arange(3) + i}, tier="t" + str(i % 3))
    path = buf.save(tmp_path / "replay_buffer.pt")
    loaded = ReplayBuffer.load(path)
    assert loaded.tiers == buf.tiers and loaded.seen == buf.seen
    # same RNG state: both draw the same next sample
    a, b = buf.sample(4), loaded.sample(4)
    assert [int(x["x"][0]) for x in a] == [int(x["x"][0]) for x in b]
    other = ReplayBuffer(1)
    other.load_state_dict(buf.state_dict())
    assert other.capacity == 8 and other.balance_by_tier


def test_router_examples_round_trip_without_pickle(tmp_path):
    from ruvllm_lab.router import RouterExample, RouterInput

    x = RouterInput(np.arange(4, dtype=np.float32), 7, 0.5, 2, 1.5, 1, {"a": 0.9}, 250.0, None, forced_tier=None)
    e = RouterExample(x=x, outcomes={"a": 1.0}, weights={"a": 0.25}, context_items=4, state=np.ones(3, np.float32))
    buf = ReplayBuffer(4, seed=1)
    buf.extend([e, 3, "text", (1, 2), {"k": [1.5, None]}])
    loaded = ReplayBuffer.load(buf.save(tmp_path / "replay_buffer.pt"))
    items = loaded.items()
    got = next(i for i in items if isinstance(i, RouterExample))
    np.testing.assert_array_equal(got.x.query_vec, x.query_vec)
    assert got.x.tier_quality == {"a": 0.9} and got.outcomes == {"a": 1.0} and got.weights == {"a": 0.25}
    np.testing.assert_array_equal(got.state, e.state)
    assert sorted(map(repr, items)) == sorted(map(repr, [got] + [i for i in buf.items()
                                                                 if not isinstance(i, RouterExample)]))
    bad = ReplayBuffer(2)
    bad.add(object())
    with pytest.raises(TypeError, match="without pickle"):
        bad.save(tmp_path / "x.pt")


def test_a_pickle_payload_in_the_replay_file_is_refused_not_executed(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "replay_buffer.pt"
    path.write_bytes(pickle.dumps({"version": 1, "capacity": 1, "reservoirs": Payload()}))
    with pytest.raises(ValueError, match="refusing to load"):
        ReplayBuffer.load(path)
    assert not marker.exists()
