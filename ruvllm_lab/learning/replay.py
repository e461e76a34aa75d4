"""Replay buffer: a uniform sample of everything seen, in bounded memory.

Reservoir sampling (Vitter's Algorithm R): the n-th item offered (1-based) replaces a
uniformly chosen slot with probability capacity / n once the reservoir is full, so after n
items every one of them is held with the same probability min(1, capacity / n).

With ``balance_by_tier=True`` each tier (the router label) keeps its own reservoir so a
rare tier is not drowned by a frequent one; the capacity is split evenly over the tiers
seen so far (when a new tier appears, existing reservoirs shrink by a uniform random
subset, which keeps each one a uniform sample of its stream) and :meth:`ReplayBuffer.sample`
draws evenly from the tiers.

Persistence never pickles objects: :meth:`save` encodes every item as plain data (numbers,
strings, lists, string-keyed dicts, tensors; ``RouterExample``/``RouterInput`` and numpy arrays
as tagged dicts) and writes it atomically with ``torch.save``; :meth:`load` reads it back with
``torch.load(weights_only=True)``, whose unpickler refuses any other object, so a tampered
``replay_buffer.pt`` (e.g. a pickle with a ``__reduce__`` payload from a restored backup) is
rejected with an error and never executed.  An item the codec cannot express is refused at
save time, with its type named.
"""
from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

_TAG = "__replay_type__"


def encode_item(item: Any) -> Any:
    """An item as plain data loadable with ``torch.load(weights_only=True)`` (module docstring)."""
    from ..router.base import RouterExample, RouterInput

    if item is None or isinstance(item, (bool, int, float, str)):
        return item
    if isinstance(item, np.generic):
        return item.item()
    if isinstance(item, np.ndarray):
        return {_TAG: "ndarray", "data": torch.from_numpy(np.ascontiguousarray(item).copy())}
    if isinstance(item, torch.Tensor):
        return item.detach().cpu().clone()
    if isinstance(item, (RouterExample, RouterInput)):
        kind = "router_example" if isinstance(item, RouterExample) else "router_input"
        return {_TAG: kind, **{f.name: encode_item(getattr(item, f.name)) for f in dataclasses.fields(item)}}
    if isinstance(item, (list, tuple)):
        return {_TAG: "tuple", "items": [encode_item(v) for v in item]} if isinstance(item, tuple) \
            else [encode_item(v) for v in item]
    if isinstance(item, dict):
        if not all(isinstance(k, str) for k in item) or _TAG in item:
            raise TypeError("a replay item dict needs string keys (and not the reserved key "
                            f"{_TAG!r}) to be saved without pickle")
        return {k: encode_item(v) for k, v in item.items()}
    raise TypeError(f"a replay item of type {type(item).__name__} cannot be saved without pickle; "
                    "store RouterExample, numbers, strings, lists, dicts or arrays")


def decode_item(data: Any) -> Any:
    """Inverse of :func:`encode_item`."""
    from ..router.base import RouterExample, RouterInput

    if isinstance(data, list):
        return [decode_item(v) for v in data]
    if isinstance(data, dict):
        kind = data.get(_TAG)
        if kind is None:
            return {k: decode_item(v) for k, v in data.items()}
        if kind == "ndarray":
            return data["data"].numpy()
        if kind == "tuple":
            return tuple(decode_item(v) for v in data["items"])
        cls = {"router_example": RouterExample, "router_input": RouterInput}.get(kind)
        if cls is None:
            raise ValueError(f"unknown replay item type {kind!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: decode_item(v) for k, v in data.items() if k in names})
    return data

_UNBALANCED = "__all__"


class _Reservoir:
    """Algorithm R over one stream."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.items: list[Any] = []
        self.seen = 0  # items offered so far

    def offer(self, item: Any, rng: random.Random) -> None:
        self.seen += 1
        if len(self.items) < self.capacity:
            self.items.append(item)
            return
        j = rng.randrange(self.seen)  # uniform in [0, seen)
        if j < self.capacity:
            self.items[j] = item

    def shrink(self, capacity: int, rng: random.Random) -> None:
        """Keep a uniform random subset of size `capacity` (still a uniform sample of the stream)."""
        self.capacity = capacity
        if len(self.items) > capacity:
            self.items = rng.sample(self.items, capacity)


class ReplayBuffer:
    """Bounded uniform replay of past examples, optionally one reservoir per tier.

    ``add(item, tier=None)``: ``tier`` is required when balancing; otherwise it is read
    from ``item.best_tier`` when absent and only used for statistics.
    """

    def __init__(self, capacity: int, balance_by_tier: bool = False, seed: int = 0):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"replay capacity must be a positive integer, got {capacity!r}")
        self.capacity = capacity
        self.balance_by_tier = balance_by_tier
        self._rng = random.Random(seed)
        self._reservoirs: dict[str, _Reservoir] = {}
        if not balance_by_tier:
            self._reservoirs[_UNBALANCED] = _Reservoir(capacity)

    # ---- writing --------------------------------------------------------------------
    def add(self, item: Any, tier: str | None = None) -> None:
        if not self.balance_by_tier:
            self._reservoirs[_UNBALANCED].offer(item, self._rng)
            return
        if tier is None:
            tier = getattr(item, "best_tier", None)
        if tier is None:
            raise ValueError("a tier-balanced replay buffer needs add(item, tier=...) "
                             "or an item with a .best_tier attribute")
        if tier not in self._reservoirs:
            self._reservoirs[tier] = _Reservoir(0)
            self._rebalance()
        self._reservoirs[tier].offer(item, self._rng)

    def extend(self, items: Iterable[Any], tier: str | None = None) -> None:
        for item in items:
            self.add(item, tier)

    def _rebalance(self) -> None:
        # Split capacity evenly; the first `capacity % T` tiers (in insertion order) get one more.
        tiers = list(self._reservoirs)
        base, extra = divmod(self.capacity, len(tiers))
        for i, t in enumerate(tiers):
            self._reservoirs[t].shrink(max(base + (1 if i < extra else 0), 0), self._rng)

    # ---- reading --------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(len(r.items) for r in self._reservoirs.values())

    @property
    def seen(self) -> int:
        """Items offered since creation (not just those kept)."""
        return sum(r.seen for r in self._reservoirs.values())

    @property
    def tiers(self) -> dict[str, int]:
        """Items held per tier (balanced buffers only; otherwise one '__all__' entry)."""
        return {t: len(r.items) for t, r in self._reservoirs.items()}

    def items(self) -> list[Any]:
        return [x for r in self._reservoirs.values() for x in r.items]

    def sample(self, n: int) -> list[Any]:
        """Up to `n` distinct held items, uniformly at random (evenly over tiers when balanced)."""
        if n < 0:
            raise ValueError(f"sample size must be >= 0, got {n}")
        if not self.balance_by_tier:
            pool = self._reservoirs[_UNBALANCED].items
            return self._rng.sample(pool, min(n, len(pool)))
        # Even split over tiers; a tier with fewer items than its share gives all it has and
        # the remainder is re-split among the others.
        remaining = {t: list(r.items) for t, r in self._reservoirs.items() if r.items}
        out: list[Any] = []
        want = min(n, len(self))
        while want > 0 and remaining:
            tiers = list(remaining)
            self._rng.shuffle(tiers)  # who gets the remainder is random, not insertion order
            base, extra = divmod(want, len(tiers))
            for i, t in enumerate(tiers):
                share = base + (1 if i < extra else 0)
                pool = remaining[t]
                take = min(share, len(pool))
                picked = self._rng.sample(range(len(pool)), take)
                out.extend(pool[j] for j in picked)
                keep = set(picked)
                remaining[t] = [x for j, x in enumerate(pool) if j not in keep]
                want -= take
            remaining = {t: p for t, p in remaining.items() if p}
        self._rng.shuffle(out)
        return out

    # ---- persistence -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "capacity": self.capacity,
            "balance_by_tier": self.balance_by_tier,
            "reservoirs": {t: {"capacity": r.capacity, "seen": r.seen, "items": list(r.items)}
                           for t, r in self._reservoirs.items()},
            "rng_state": self._rng.getstate(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != 1:
            raise ValueError(f"unknown replay buffer state version {state.get('version')!r}")
        self.capacity = int(state["capacity"])
        self.balance_by_tier = bool(state["balance_by_tier"])
        self._reservoirs = {}
        for t, r in state["reservoirs"].items():
            res = _Reservoir(int(r["capacity"]))
            res.seen, res.items = int(r["seen"]), list(r["items"])
            self._reservoirs[t] = res
        self._rng.setstate(state["rng_state"])

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        state["reservoirs"] = {t: {**r, "items": [encode_item(x) for x in r["items"]]}
                               for t, r in state["reservoirs"].items()}
        version, internal, gauss = state["rng_state"]
        state["rng_state"] = [int(version), list(internal), gauss]
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written buffer
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReplayBuffer":
        try:
            state = torch.load(Path(path), map_location="cpu", weights_only=True)
        except Exception as e:  # the restricted unpickler refuses code-carrying payloads
            raise ValueError(f"{path}: not a replay buffer this system wrote; refusing to load it "
                             f"(only plain data and tensors are accepted): {e}") from None
        if not isinstance(state, dict) or "reservoirs" not in state:
            raise ValueError(f"{path}: not a replay buffer state")
        state["reservoirs"] = {t: {**r, "items": [decode_item(x) for x in r["items"]]}
                               for t, r in state["reservoirs"].items()}
        version, internal, gauss = state["rng_state"]
        state["rng_state"] = (int(version), tuple(int(v) for v in internal), gauss)
        buf = cls(int(state["capacity"]), bool(state["balance_by_tier"]))
        buf.load_state_dict(state)
        return buf
