"""Off-policy estimates of a deterministic routing policy from logged, explored decisions.

Each logged decision i has the tier a_i actually served, the probability p_i with which the
logging policy chose it (``RoutingDecision.propensity``; < 1 only because of exploration), the
observed reward r_i (1 adequate / 0 not; None when no label arrived), the cost c_i of serving it,
and the tier pi(x_i) the *target* policy would pick.  With w_i = 1[a_i = pi(x_i)] / p_i:

* IPS (Horvitz-Thompson)::           V_ips   = 1/n sum_i w_i r_i
* self-normalised IPS (SNIPS)::      V_snips = sum_i w_i r_i / sum_i w_i
* doubly robust (Dudik et al. 2011), given a reward model r^(x, t)::

      V_dr = 1/n sum_i [ r^(x_i, pi(x_i)) + w_i (r_i - r^(x_i, a_i)) ]

Quality uses the rows with a reward; cost uses every row (the cost of what was served is always
known).  ``coverage`` is the share of rows where the target agrees with what was served: the
estimate only sees those, so a target that often picks tiers the logs never tried (p = 0 there)
is reported with low coverage rather than a confident number.  Rows whose reward is missing
are assumed missing at random with respect to the tier (document this when quoting numbers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class LoggedDecision:
    served: int  # tier index actually served
    propensity: float  # P(logging policy served this tier | x), in (0, 1]
    target: int  # tier index the evaluated (deterministic) policy picks for the same x
    reward: float | None = None  # observed adequacy of the served answer; None = unlabelled
    cost: float | None = None  # cost of the served answer
    predicted_target: float | None = None  # r^(x, target) for the doubly robust estimate
    predicted_served: float | None = None  # r^(x, served)


def off_policy_estimate(rows: Sequence[LoggedDecision]) -> dict[str, float | int]:
    """IPS / SNIPS / DR estimates of quality and cost (module docstring); nan where undefined."""
    nan = float("nan")
    for r in rows:
        if not 0.0 < r.propensity <= 1.0:
            raise ValueError(f"propensity must be in (0, 1], got {r.propensity!r}")
    labelled = [r for r in rows if r.reward is not None]
    costed = [r for r in rows if r.cost is not None]
    out: dict[str, float | int] = {"n": len(rows), "n_labelled": len(labelled),
                                   "coverage": (sum(r.served == r.target for r in rows) / len(rows)) if rows else nan}

    def weight(r: LoggedDecision) -> float:
        return (1.0 / r.propensity) if r.served == r.target else 0.0

    def ips(sample: Sequence[LoggedDecision], value) -> tuple[float, float]:
        if not sample:
            return nan, nan
        w = [weight(r) for r in sample]
        total = sum(wi * value(r) for wi, r in zip(w, sample))
        return total / len(sample), (total / sum(w) if sum(w) > 0 else nan)

    out["quality_ips"], out["quality_snips"] = ips(labelled, lambda r: float(r.reward))
    out["cost_ips"], out["cost_snips"] = ips(costed, lambda r: float(r.cost))
    dr_rows = [r for r in labelled if r.predicted_target is not None and r.predicted_served is not None]
    if dr_rows and len(dr_rows) == len(labelled):
        out["quality_dr"] = sum(r.predicted_target + weight(r) * (float(r.reward) - r.predicted_served)
                                for r in dr_rows) / len(dr_rows)
    else:
        out["quality_dr"] = nan
    # On-policy view for comparison: what the served decisions scored (not an estimate of the target).
    out["quality_logged"] = (sum(float(r.reward) for r in labelled) / len(labelled)) if labelled else nan
    out["cost_logged"] = (sum(float(r.cost) for r in costed) / len(costed)) if costed else nan
    return {k: (v if not (isinstance(v, float) and math.isinf(v)) else nan) for k, v in out.items()}
