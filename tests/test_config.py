"""Config: profiles load, every error path names its key, TOML round trip, overrides, builder."""
from __future__ import annotations

import pytest

from ruvllm_lab.cli import main
from ruvllm_lab.config import SECTIONS, Config
from ruvllm_lab.errors import ConfigError

from .conftest import ROOT

PROFILES = ["edge", "server-cpu", "server-gpu"]


@pytest.mark.parametrize("name", PROFILES)
def test_profiles_load_and_keep_seed_values(name):
    cfg = Config.load(ROOT / "configs" / f"{name}.toml")
    seed = {"edge": (16, 100, 32, 32, 0.95, 1024, 1),
            "server-cpu": (32, 200, 64, 64, 0.9, 4096, 2),
            "server-gpu": (48, 300, 128, 64, 0.85, 8192, 2)}[name]
    assert (cfg.memory.hnsw_m, cfg.memory.hnsw_ef_construction, cfg.memory.hnsw_ef_search,
            cfg.router.hidden_dim, cfg.router.sparsity, cfg.inference.max_context,
            cfg.inference.max_loaded_models) == seed


def test_profile_tiers_map_to_the_ladder():
    assert Config.load(ROOT / "configs/edge.toml").inference.models == ["smollm2-135m"]
    cpu = Config.load(ROOT / "configs/server-cpu.toml").inference
    assert len(cpu.models) == 4 and cpu.max_loaded_models == 2
    gpu = Config.load(ROOT / "configs/server-gpu.toml").inference
    assert gpu.models == ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"] and gpu.backend == "transformers"


@pytest.mark.parametrize("name", PROFILES)
def test_toml_round_trip(name, tmp_path):
    cfg = Config.load(ROOT / "configs" / f"{name}.toml")
    cfg.save(tmp_path / "c.toml")
    assert Config.load(tmp_path / "c.toml") == cfg


def test_unknown_key_names_key_and_known_keys():
    with pytest.raises(ConfigError) as e:
        Config.from_dict({"memory": {"foo": 1}})
    msg = str(e.value)
    assert "memory.foo" in msg and "hnsw_m" in msg


def test_unknown_section():
    with pytest.raises(ConfigError, match=r"unknown section \[memroy\]"):
        Config.from_dict({"memroy": {}})


@pytest.mark.parametrize("section,key,value,fragment", [
    ("memory", "hnsw_m", -1, "must be >= 2"),
    ("memory", "hnsw_m", "16", "expected an integer"),
    ("memory", "hnsw_m", True, "expected an integer"),
    ("router", "sparsity", 1.5, "must be <= 0.999"),
    ("router", "sparsity", "high", "expected a number"),
    ("inference", "backend", "onnx", "allowed values"),
    ("learning", "enabled", "yes", "expected true or false"),
    ("inference", "models", "smollm2-135m", "expected a list"),
    ("learning", "judge_weights", 3, "expected a table"),
    ("embedding", "model", 7, "expected a string"),
])
def test_bad_values_name_key_value_and_rule(section, key, value, fragment):
    with pytest.raises(ConfigError) as e:
        Config.from_dict({section: {key: value}})
    msg = str(e.value)
    assert f"{section}.{key}" in msg and fragment in msg and repr(value) in msg


def test_every_problem_is_collected():
    with pytest.raises(ConfigError) as e:
        Config.from_dict({"memory": {"hnsw_m": -1, "foo": 2}, "router": {"sparsity": 2.0}})
    assert len(e.value.problems) == 3


def test_cross_checks():
    with pytest.raises(ConfigError, match="k_min"):
        Config.from_dict({"compression": {"k_min": 9, "k_max": 3}})
    with pytest.raises(ConfigError, match="inference.models is empty"):
        Config.from_dict({"inference": {"models": []}})
    with pytest.raises(ConfigError, match="judge_weights.bogus"):
        Config.from_dict({"learning": {"judge_weights": {"bogus": 1.0}}})
    with pytest.raises(ConfigError, match="context_buckets"):
        Config.from_dict({"router": {"context_buckets": [4, 2]}})


def test_section_must_be_a_table():
    with pytest.raises(ConfigError, match=r"\[router\] must be a table"):
        Config.from_dict({"router": 5})


def test_dotted_overrides_mapping_and_strings():
    cfg = Config.load(ROOT / "configs/edge.toml", overrides={"router.hidden_dim": 16})
    assert cfg.router.hidden_dim == 16
    cfg = Config.load(ROOT / "configs/edge.toml",
                      overrides=["router.hidden_dim=8", "learning.enabled=false", 'inference.models=["gemma3-270m"]',
                                 "memory.db_path=/tmp/x.db", "router.sparsity=0.5"])
    assert (cfg.router.hidden_dim, cfg.learning.enabled, cfg.inference.models, cfg.memory.db_path,
            cfg.router.sparsity) == (8, False, ["gemma3-270m"], "/tmp/x.db", 0.5)


def test_bad_overrides_are_rejected():
    with pytest.raises(ConfigError, match="router.hiden_dim"):
        Config.load(ROOT / "configs/edge.toml", overrides=["router.hiden_dim=8"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        Config.load(ROOT / "configs/edge.toml", overrides=["router.hidden_dim"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        Config.from_dict({}, {"hidden_dim": 3})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        Config.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[memory\nhnsw_m = 3")
    with pytest.raises(ConfigError, match="invalid TOML"):
        Config.load(bad)


def test_flat_dict_has_every_field():
    flat = Config().to_flat_dict()
    n_fields = sum(len(cls.__dataclass_fields__) for cls in SECTIONS.values())
    assert len(flat) == n_fields and flat["router.hidden_dim"] == 32


def test_builder():
    cfg = Config.builder().db_path("./memory.db").models(["smollm2-135m", "gemma3-270m"]).set("router.hidden_dim", 8).build()
    assert cfg.memory.db_path == "./memory.db" and cfg.inference.models[1] == "gemma3-270m" and cfg.router.hidden_dim == 8
    with pytest.raises(ConfigError, match="exists in"):
        Config.builder().hidden_dim(3)
    with pytest.raises(ConfigError, match="no config field"):
        Config.builder().nonsense(3)
    with pytest.raises(ConfigError, match="memory.hnsw_m"):
        Config.builder().hnsw_m(0).build()


def test_cli_validate(tmp_path, capsys):
    assert main(["validate", "--config", str(ROOT / "configs/edge.toml")]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("[memory]\nhnsw_m = -1\nfoo = 3\n")
    assert main(["validate", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "memory.hnsw_m" in err and "memory.foo" in err


def test_cli_version(capsys):
    from ruvllm_lab import __version__
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == __version__


# ---- tiers against the ladder, suggestions for typos ----------------------------------------------

def test_unknown_tiers_are_rejected_naming_the_known_ones():
    from ruvllm_lab.models import LADDER
    with pytest.raises(ConfigError) as e:
        Config.from_dict({"inference": {"models": ["smollm2-135m", "llama-70b", "gemma3-207m"]},
                          "embedding": {"encoder_tier": "qwen-0.5b"}})
    msg = str(e.value)
    assert "inference.models[1] = 'llama-70b': unknown tier" in msg
    assert "inference.models[2] = 'gemma3-207m': unknown tier (did you mean 'gemma3-270m'?)" in msg
    assert "embedding.encoder_tier = 'qwen-0.5b'" in msg
    assert all(t in msg for t in LADDER)
    assert "inference.models[0]" not in msg  # the known tier is fine
    # a user GGUF file stands for itself
    assert Config.from_dict({"inference": {"models": ["/models/mine.gguf"]}}).inference.models == ["/models/mine.gguf"]


def test_typos_get_the_nearest_key_section_or_value():
    with pytest.raises(ConfigError) as e:
        Config.from_dict({"routr": {}, "router": {"hiden_dim": 8}, "inference": {"backend": "llama-cpp"}})
    msg = str(e.value)
    assert "unknown section [routr] (did you mean [router]?)" in msg
    assert "unknown key router.hiden_dim (did you mean router.hidden_dim?)" in msg
    assert "(did you mean 'llama_cpp'?)" in msg
    with pytest.raises(ConfigError) as e:
        Config.from_dict({"memory": {"zzzz": 1}})
    assert "did you mean" not in str(e.value)  # nothing close: no guess


def test_cli_validate_rejects_unknown_tiers_and_router_kinds(tmp_path, capsys):
    bad = tmp_path / "tier.toml"
    bad.write_text('[inference]\nmodels = ["llama-70b"]\n')
    assert main(["validate", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "llama-70b" in err and "smollm2-135m" in err
    assert main(["validate", "--config", str(ROOT / "configs/edge.toml"), "--set", 'router.kind="fastgrn"']) == 2
    assert "did you mean 'fastgrnn'?" in capsys.readouterr().err
    assert main(["validate", "--config", str(ROOT / "configs/edge.toml"), "--set",
                 'router.kind="examples.custom_router:NoSuchRouter"']) == 2
    assert "has no attribute 'NoSuchRouter'" in capsys.readouterr().err
    assert main(["validate", "--config", str(ROOT / "configs/edge.toml"), "--set",
                 'router.kind="examples.custom_router:LengthRouter"']) == 0
    assert "router: examples.custom_router:LengthRouter" in capsys.readouterr().out


def test_a_router_of_your_own_by_import_path():
    import numpy as np

    from ruvllm_lab.config import RouterConfig
    from ruvllm_lab.router import RouterExample, RouterInput, make_router

    tiers = ["smollm2-135m", "gemma3-270m"]
    router = make_router("examples.custom_router:LengthRouter", tiers, RouterConfig(), input_dim=8)
    assert router.name == "examples.custom_router:LengthRouter"

    def x(tokens):
        return RouterInput(np.zeros(8, np.float32), tokens, 0.0, 0, 0.0, 0, {}, None, None)
    assert router.route(x(5)).tier == tiers[0]  # nothing learned: the cheapest tier
    router.partial_fit([RouterExample(x(4), best_tier=tiers[0]), RouterExample(x(40), best_tier=tiers[1])])
    assert router.route(x(35)).tier == tiers[1] and router.route(x(6)).tier == tiers[0]
    with pytest.raises(ConfigError, match="not a subclass"):
        make_router("examples.custom_router:np", tiers, RouterConfig(), input_dim=8)
    with pytest.raises(ConfigError, match="cannot import"):
        make_router("no_such_pkg.mod:Router", tiers, RouterConfig(), input_dim=8)


# ---- every experiment builds its components on every shipped profile (no generation) -----------------

@pytest.mark.parametrize("name", PROFILES)
def test_experiment_components_build_on_every_profile(name, tmp_path):
    """The server profiles embed with an LLM tier (embedding.model = llm-encoder), which needs an
    inference pool: each experiment's embedder, routers, pools and memory must still build."""
    import dataclasses

    from ruvllm_lab.experiments import routing
    from ruvllm_lab.experiments.outcomes import make_pool
    from ruvllm_lab.memory import MemoryService
    from ruvllm_lab.router import make_router

    cfg = Config.load(ROOT / "configs" / f"{name}.toml", overrides={"memory.db_path": str(tmp_path / "m.db"),
                                                                   "system.data_dir": str(tmp_path / "state")})
    tiers = cfg.inference.models if len(cfg.inference.models) >= 2 else ["smollm2-135m", "gemma3-270m"]
    embedder = routing.make_embedder(cfg)  # routing, forgetting and compression all build it this way
    assert embedder.dimension == cfg.embedding.dimension
    assert embedder.backend_name.startswith(cfg.embedding.model)
    if cfg.embedding.model == "llm-encoder":
        assert embedder.pool is not None and cfg.embedding.encoder_tier in embedder.pool.tiers
    for router_name in routing.DEFAULT_ROUTERS:  # routing (online) and forgetting (fastgrnn)
        router = make_router(router_name, tiers, cfg.router, input_dim=cfg.embedding.dimension, seed=0)
        assert router.tiers == list(tiers)
    pool = make_pool(cfg, tiers)  # outcome collection and compression answers; lazy: nothing loads
    try:
        assert list(pool.tiers) == list(tiers)
    finally:
        pool.close()
    mem = MemoryService(dataclasses.replace(cfg.memory, db_path=str(tmp_path / "compress.db")),
                        dimension=cfg.embedding.dimension, embedder=embedder)
    try:
        assert mem.count() == 0
    finally:
        mem.close()
    embedder.pool and embedder.pool.close()
