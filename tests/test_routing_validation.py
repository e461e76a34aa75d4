"""The validation workload the routing hyper-parameters are chosen on never shares a query with the
reported workload (the generator reuses templates and facts, so two workload seeds overlap)."""
from __future__ import annotations

import pytest

from ruvllm_lab.experiments.routing import main, validation_workload
from ruvllm_lab.workloads import FAMILIES, generate


def test_validation_workload_is_disjoint_from_the_reported_one():
    reported = {it.query for it in generate(FAMILIES, 300, 0, distinct=True)}
    plain = validation_workload(300, 1)
    val = validation_workload(300, 1, exclude_seed=0)
    assert len(plain) == 300 and {it.query for it in plain} & reported  # the seeds do overlap ...
    assert val and not {it.query for it in val} & reported  # ... and the exclusion removes exactly that
    assert [it.query for it in val] == [it.query for it in plain if it.query not in reported]


def test_validation_workload_refuses_to_exclude_itself():
    with pytest.raises(ValueError, match="differ"):
        validation_workload(50, 1, exclude_seed=1)


def test_routing_cli_rejects_an_unknown_override():
    from ruvllm_lab.errors import ConfigError
    with pytest.raises(ConfigError, match="no_such_key"):
        main(["--config", "configs/server-cpu.toml", "--set", "router.no_such_key=1", "--n", "10"])
