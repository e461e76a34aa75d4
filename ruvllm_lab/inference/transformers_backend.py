"""transformers + torch backend: the GPU path, and what research needs that llama.cpp hides.

Loading a GGUF through transformers (`from_pretrained(dir, gguf_file=name)`) dequantises
every tensor, which takes about a minute, so the first load converts once and saves a
regular HF checkpoint under ``models.model_dir()/hf/<tier>``; later loads read that
directory with ``local_files_only=True``.

Device: CUDA when `inference.device` is "auto"/"cuda" and a GPU is visible, else CPU
(float32).  On CUDA the dtype follows `inference.quantization` (fp16/bf16/fp32; a GGUF
quantization name means bf16).

Besides generation this backend exposes exact token log-probabilities and mean-pooled
final hidden states (`embed`): the seed's "LFM2 encoder wrapper".
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .. import models
from ..config import InferenceConfig
from ..errors import ModelLoadError
from ..models import TierSpec
from .base import (Backend, GenerationLoop, GenerationRequest, TokenDecoder, common_prefix_len, decode_loop,
                   fit_prompt)
from .prompts import ChatTemplate, build_prompt

log = logging.getLogger(__name__)

_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>", "</s>")


def hf_cache_dir(tier: str) -> Path:
    """Where the converted checkpoint of `tier` lives (paths are hashed into a safe name)."""
    if tier in models.LADDER:
        name = tier
    else:
        digest = hashlib.sha1(str(Path(tier).expanduser().resolve()).encode()).hexdigest()[:10]
        name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(tier).stem) + "-" + digest
    return models.model_dir() / "hf" / name


def _source_marker(path: Path) -> dict:
    st = path.stat()
    return {"gguf": str(path.resolve()), "size": st.st_size}


def convert_gguf(tier: str, path: Path, target: Path) -> Path:
    """Dequantise `path` into an HF checkpoint at `target` (atomic rename); reuse it when up to date."""
    marker = target / "ruvllm_source.json"
    if marker.exists() and json.loads(marker.read_text()) == _source_marker(path):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("converting %s to a transformers checkpoint (once; ~1 min)", path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        extra = {}
        try:  # newer transformers can keep GGUF blocks packed; we want a plain dense checkpoint
            from transformers import GgufConfig
            extra["quantization_config"] = GgufConfig(gguf_file=str(path), dequantize=True)
        except ImportError:
            pass
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **extra)
        # the weights are dense now: save them as an ordinary checkpoint, not as "gguf-quantized"
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        if hasattr(model, "is_quantized"):
            model.is_quantized = False
    except Exception as e:
        raise ModelLoadError(f"tier {tier!r}: transformers could not read {path} ({type(e).__name__}: {e}); "
                             f"the file is truncated, corrupt, or of an architecture transformers cannot convert") from e
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "ruvllm_source.json").write_text(json.dumps(_source_marker(path)))
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def pick_device(setting: str) -> str:
    import torch
    if setting in ("auto", "cuda") and torch.cuda.is_available():
        return "cuda"
    if setting == "cuda":
        log.warning("inference.device='cuda' but no GPU is visible; using the CPU")
    return "cpu"


def pick_dtype(quantization: str, device: str):
    import torch
    if device == "cpu":
        return torch.float32
    return {"fp16": torch.float16, "fp32": torch.float32}.get(quantization, torch.bfloat16)


class TransformersBackend(Backend):
    def __init__(self, tier: str, path: str | os.PathLike, spec: TierSpec, config: InferenceConfig, seed: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .llama_cpp_backend import check_gguf_file

        self.tier, self.path, self.spec, self.config = tier, Path(path), spec, config
        check_gguf_file(tier, self.path, spec.size_bytes if not spec.path_override else None)
        if config.n_threads > 0:
            torch.set_num_threads(config.n_threads)
        self.device = pick_device(config.device)
        self.n_ctx = config.max_context
        cache = convert_gguf(tier, self.path, hf_cache_dir(tier))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(cache), local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(
                str(cache), local_files_only=True, dtype=pick_dtype(config.quantization, self.device))
        except Exception as e:
            raise ModelLoadError(f"tier {tier!r}: cannot load the converted checkpoint {cache} ({e}); delete it to reconvert") from e
        self.model.to(self.device).eval()
        self._torch = torch
        # transformers renamed `past_key_values` to `cache` (5.x); speak whichever this version knows
        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._rng = np.random.default_rng(seed)
        self.template = self._chat_template()
        self._eog = self._end_token_ids()
        self._sessions: OrderedDict[str, tuple[list[int], object]] = OrderedDict()

    def _chat_template(self) -> ChatTemplate | None:
        if self.spec.prompt_format != "chat":
            return None
        source = getattr(self.tokenizer, "chat_template", None)
        if not source:
            try:
                from gguf import GGUFReader
                field = GGUFReader(str(self.path), "r").fields.get("tokenizer.chat_template")
                source = field.contents() if field is not None else None
            except Exception:
                source = None
        if not source:
            return None
        return ChatTemplate(source, bos_token=self.tokenizer.bos_token or "", eos_token=self.tokenizer.eos_token or "")

    def _end_token_ids(self) -> set[int]:
        ids = set()
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        for e in (eos if isinstance(eos, list) else [eos]) + [self.tokenizer.eos_token_id]:
            if e is not None:
                ids.add(int(e))
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[t] for t in _END_TOKENS if t in vocab)
        return ids

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def _forward(self, token_ids: list[int], cache):
        torch = self._torch
        ids = torch.tensor([token_ids], device=self.device)
        with torch.inference_mode():
            out = self.model(input_ids=ids, use_cache=True, **{self._cache_kwarg: cache})
        new_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return out.logits[0, -1].float().cpu().numpy(), new_cache

    def run(self, request: GenerationRequest) -> GenerationLoop:
        from transformers import DynamicCache

        prompt_text, format_stop = build_prompt(request.messages, self.spec.prompt_format, self.template)
        tokens = self.tokenizer.encode(prompt_text, add_special_tokens=True)
        tokens, truncated = fit_prompt(tokens, self.n_ctx, request.max_tokens, self.config.on_context_overflow,
                                       keep_first=tokens[:1] == [self.tokenizer.bos_token_id])
        emitted = [b""]  # bytes of the completion already handed to the decoder

        def new_bytes(completion: list[int]) -> bytes:
            decoded = self.tokenizer.decode(completion, skip_special_tokens=True)
            if decoded.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                return b""
            raw = decoded.encode("utf-8")
            piece, emitted[0] = raw[len(emitted[0]):], raw
            return piece

        decoder = TokenDecoder(request, len(tokens), min(request.max_tokens, self.n_ctx - len(tokens)),
                               list(request.stop) + format_stop, self._eog.__contains__, new_bytes, self._rng,
                               self.tier, truncated)
        sid = request.session_id if self.config.kv_cache_sessions > 0 else None
        state = {"cache": DynamicCache()}

        def prefill() -> np.ndarray:
            reuse, cache = 0, DynamicCache()
            if sid is not None and sid in self._sessions:
                seen, cache = self._sessions.pop(sid)
                reuse = max(0, min(common_prefix_len(seen, tokens), len(tokens) - 1))
                surplus = cache.get_seq_length() - reuse
                try:
                    if surplus > 0:
                        cache.crop(-surplus)  # drop the cached tokens past the shared prefix
                except (ValueError, NotImplementedError, AttributeError):
                    reuse, cache = 0, DynamicCache()  # a windowed cache cannot be cropped: start cold
            logits, state["cache"] = self._forward(tokens[reuse:], cache)
            decoder.evaluated = len(tokens) - reuse
            return logits

        def feed_token(token: int) -> np.ndarray:
            logits, state["cache"] = self._forward([token], state["cache"])
            return logits

        result = yield from decode_loop(decoder, prefill, feed_token)
        if sid is not None and decoder.evaluated:
            # every listed token is in the cache (the last sampled one may not be); crop() trims the rest on reuse
            self._sessions[sid] = (tokens + decoder.completion[:-1], state["cache"])
            while len(self._sessions) > self.config.kv_cache_sessions:
                self._sessions.popitem(last=False)
        return result

    def embed(self, texts: list[str]) -> np.ndarray:
        """Mean over tokens of the base model's final (normalised) hidden states; one text at a time, no padding."""
        torch = self._torch
        hidden = self.model.config.hidden_size
        rows = []
        for text in texts:
            ids = self.tokenizer.encode(text, add_special_tokens=True)[: self.n_ctx] or [self.tokenizer.bos_token_id or 0]
            with torch.inference_mode():
                out = self.model.base_model(input_ids=torch.tensor([ids], device=self.device))
            rows.append(out.last_hidden_state[0].float().mean(dim=0).cpu().numpy())  # (hidden,)
        return np.asarray(rows, dtype=np.float32).reshape(len(texts), hidden)

    def close(self) -> None:
        self._sessions.clear()
        self.model = None
        if self.device == "cuda":
            self._torch.cuda.empty_cache()


class HFTokenCounter:
    """Counts tokens with the tier's HF tokenizer (from the converted checkpoint, or straight from the GGUF)."""

    def __init__(self, tier: str, path: str | os.PathLike, spec: TierSpec):
        from transformers import AutoTokenizer
        path = Path(path)
        cache = hf_cache_dir(tier)
        try:
            if (cache / "ruvllm_source.json").exists():
                self._tok = AutoTokenizer.from_pretrained(str(cache), local_files_only=True)
            else:
                self._tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as e:
            raise ModelLoadError(f"tier {tier!r}: cannot load its tokenizer ({e})") from e

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False)) if text else 0
