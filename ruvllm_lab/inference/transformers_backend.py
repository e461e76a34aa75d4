"""transformers + torch backend: the GPU path, and what research needs that llama.cpp hides.

Loading a GGUF through transformers (`from_pretrained(dir, gguf_file=name)`) dequantises
every tensor, which takes about a minute, so the first load converts once and saves a
regular HF checkpoint under ``models.model_dir()/hf/<tier>``; later loads read that
directory with ``local_files_only=True``.

Device: CUDA when `inference.device` is "auto"/"cuda" and a GPU is visible, else CPU
(float32).  On CUDA the dtype follows `inference.quantization` (fp16/bf16/fp32; a GGUF
quantization name means bf16).

Batching.  Like the llama.cpp backend, concurrent requests for one tier are decoded together:
a scheduler thread owns the model and keeps up to `inference.max_batch_sequences` sequences in
one left-padded KV cache (a `DynamicCache` of shape (B, heads, L, dim) per layer) with a (B, L)
attention mask.  A joining request is prefilled alone (batch 1, no padding: exactly the
unbatched computation, and its session prefix is reused), then its row is merged into the
batch, left-padded to the common length.  Each step feeds every sequence's next token in one
forward pass, with position ids counted per row (its real tokens so far), so padding never
shifts a position.  A request that ends (stop, length, deadline, cancel, error, consumer gone)
leaves at that step: its row is dropped, and leading columns that are padding in every row
left are trimmed.  The per-request logic is the shared `TokenDecoder` (base.py).

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
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import models
from ..config import InferenceConfig
from ..errors import ModelLoadError
from ..models import TierSpec
from .base import (GenerationLoop, GenerationRequest, ScheduledBackend, ScheduledJob, TokenDecoder,
                   common_prefix_len, fit_prompt)
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


def _kv(cache) -> list[tuple]:
    """Per layer (keys, values), each (batch, kv_heads, length, head_dim)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # transformers < 4.56


def _cache_from(kv: list[tuple]):
    from transformers import DynamicCache
    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


def _left_pad(t, width: int):
    """Prepend `width` zero columns on the sequence axis (-2 for KV, -1 for a mask)."""
    if width <= 0:
        return t
    import torch
    axis = -2 if t.dim() == 4 else -1
    shape = list(t.shape)
    shape[axis] = width
    return torch.cat([t.new_zeros(shape), t], dim=axis)


@dataclass(eq=False)
class _Job(ScheduledJob):
    """One request inside the scheduler, and how many cells its batch row holds."""
    length: int = 0  # tokens of this request in the KV cache (its row's real cells)


class _Batch:
    """The sequences decoding together: one left-padded KV cache, its attention mask, a job per row.

    Row i holds `mask.shape[1] - jobs[i].length` padding cells, then its real cells, contiguous."""

    def __init__(self):
        self.jobs: list[_Job] = []
        self.cache = None
        self.mask = None  # (B, L) int64, 1 = a real cell

    def add(self, job: _Job, cache) -> None:
        """Merge a prefilled single-sequence cache (no padding) as a new last row."""
        import torch
        kv = _kv(cache)
        row_mask = torch.ones((1, job.length), dtype=torch.long, device=kv[0][0].device)
        if not self.jobs:
            self.jobs, self.cache, self.mask = [job], cache, row_mask
            return
        length = max(self.mask.shape[1], job.length)
        merged = [(torch.cat([_left_pad(bk, length - bk.shape[-2]), _left_pad(k, length - k.shape[-2])]),
                   torch.cat([_left_pad(bv, length - bv.shape[-2]), _left_pad(v, length - v.shape[-2])]))
                  for (bk, bv), (k, v) in zip(_kv(self.cache), kv)]
        self.mask = torch.cat([_left_pad(self.mask, length - self.mask.shape[1]), _left_pad(row_mask, length - job.length)])
        self.cache = _cache_from(merged)
        self.jobs.append(job)

    def row_cache(self, job: _Job):
        """A single-sequence cache of `job`'s real cells (for the session LRU)."""
        i = self.jobs.index(job)
        start = self.mask.shape[1] - job.length
        return _cache_from([(k[i:i + 1, :, start:].clone(), v[i:i + 1, :, start:].clone()) for k, v in _kv(self.cache)])

    def drop(self, leaving: list[_Job]) -> None:
        """Remove rows; then trim leading columns that are padding in every remaining row."""
        keep = [i for i, j in enumerate(self.jobs) if j not in leaving]
        if not keep:
            self.jobs, self.cache, self.mask = [], None, None
            return
        self.jobs = [self.jobs[i] for i in keep]
        trim = self.mask.shape[1] - max(j.length for j in self.jobs)
        import torch
        idx = torch.tensor(keep, device=self.mask.device)
        self.cache = _cache_from([(k[idx, :, trim:], v[idx, :, trim:]) for k, v in _kv(self.cache)])
        self.mask = self.mask[idx, trim:]


class TransformersBackend(ScheduledBackend):
    """One HF causal LM; concurrent requests are decoded together (see the module doc)."""

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
        self.n_seq = config.max_batch_sequences
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
        # only the last position's logits are used: skip the vocabulary projection of every prompt token
        self._last_logits = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._rng = np.random.default_rng(seed)
        self.template = self._chat_template()
        self._eog = self._end_token_ids()
        self._sessions: OrderedDict[str, tuple[list[int], object]] = OrderedDict()
        self._model_lock = threading.Lock()  # the scheduler's forward passes vs embed() from callers
        # scheduler
        self._batch = _Batch()
        self._pending: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.steps = self.step_sequences = self.peak_sequences = 0  # batch_stats()
        self._worker = threading.Thread(target=self._serve, name=f"hf-batch-{tier}", daemon=True)
        self._worker.start()

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

    def busy_sequences(self) -> int:
        """Sequences decoding right now, plus requests waiting to join."""
        with self._cond:
            return len(self._batch.jobs) + len(self._pending)

    def batch_stats(self) -> dict:
        """Decode steps so far, the mean and peak number of sequences they carried."""
        return {"steps": self.steps, "mean_sequences": self.step_sequences / max(self.steps, 1),
                "peak_sequences": self.peak_sequences}

    # ---- generation (caller's thread) ---------------------------------------------------------
    def run(self, request: GenerationRequest) -> GenerationLoop:
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
        job = _Job(decoder, tokens, request.session_id if self.config.kv_cache_sessions > 0 else None)
        return (yield from self._relay(job))

    # ---- scheduler (worker thread; the only thread that generates) ----------------------------
    def _active_jobs(self) -> list[_Job]:
        return list(self._batch.jobs)

    def _admit(self, job: _Job) -> None:
        self._join(job)

    def _forward(self, input_ids, cache, **kw):
        with self._model_lock, self._torch.inference_mode():
            out = self.model(input_ids=input_ids, use_cache=True, **{self._cache_kwarg: cache}, **self._last_logits, **kw)
        new_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return out.logits[:, -1].float().cpu().numpy(), new_cache  # (B, vocab)

    def _join(self, job: _Job) -> None:
        """Prefill `job` alone (reusing its session's cached prefix), accept its first token, then add its row."""
        from transformers import DynamicCache
        if job.abandoned or job.decoder.interrupt():
            return self._finish(job, "cancelled" if job.abandoned else None)
        tokens, reuse, cache = job.prompt, 0, DynamicCache()
        if job.session is not None and job.session in self._sessions:
            seen, cache = self._sessions.pop(job.session)
            reuse = max(0, min(common_prefix_len(seen, tokens), len(tokens) - 1))  # >= 1 token for logits
            surplus = cache.get_seq_length() - reuse
            try:
                if surplus > 0:
                    cache.crop(-surplus)  # drop the cached tokens past the shared prefix
            except (ValueError, NotImplementedError, AttributeError):
                reuse, cache = 0, DynamicCache()  # a windowed cache cannot be cropped: start cold
        try:
            ids = self._torch.tensor([tokens[reuse:]], device=self.device)
            logits, cache = self._forward(ids, cache)
            job.length, job.decoder.evaluated = len(tokens), len(tokens) - reuse
            text = job.decoder.accept(logits[0])
        except Exception as e:  # this request's failure; the batch is untouched
            job.decoder.finish("cancelled")
            job.events.put(("error", e))
            return
        if text:
            job.events.put(("text", text))
        if job.decoder.done:
            self._remember_session(job, cache)
            return self._finish(job)
        with self._cond:
            self._batch.add(job, cache)

    def _remember_session(self, job: _Job, cache) -> None:
        if job.session is None:
            return
        cached = (job.prompt + job.decoder.completion)[:job.length]  # exactly the tokens whose cells it holds
        self._sessions[job.session] = (cached, cache)
        self._sessions.move_to_end(job.session)
        while len(self._sessions) > self.config.kv_cache_sessions:
            self._sessions.popitem(last=False)

    def _end(self, job: _Job, error: BaseException | None = None) -> None:
        """Finish `job` and drop its row (its cells go to the session LRU when it has a session)."""
        if job in self._batch.jobs:
            if error is None and job.session is not None:
                self._remember_session(job, self._batch.row_cache(job))
            with self._cond:
                self._batch.drop([job])
        if error is not None:
            job.decoder.finish("cancelled")
            job.events.put(("error", error))
            with self._cond:
                self._cond.notify_all()
            return
        self._finish(job, "cancelled" if job.abandoned else None)

    def _step(self) -> None:
        """One forward pass: the next token of every sequence in the batch."""
        torch = self._torch
        for job in list(self._batch.jobs):
            if job.abandoned or job.decoder.interrupt() or job.decoder.next_token is None:
                self._end(job)
        batch = self._batch
        if not batch.jobs:
            return
        jobs = list(batch.jobs)
        ids = torch.tensor([[j.decoder.next_token] for j in jobs], device=self.device)
        positions = torch.tensor([[j.length] for j in jobs], device=self.device)  # real tokens before this one
        mask = torch.cat([batch.mask, batch.mask.new_ones((len(jobs), 1))], dim=1)
        logits, batch.cache = self._forward(ids, batch.cache, attention_mask=mask, position_ids=positions)
        batch.mask = mask
        self.steps += 1
        self.step_sequences += len(jobs)
        self.peak_sequences = max(self.peak_sequences, len(jobs))
        for job in jobs:  # every row gained a cell: lengths must agree with the mask before any row leaves
            job.length += 1
        for i, job in enumerate(jobs):
            try:
                text = job.decoder.accept(logits[i])
            except Exception as e:  # this request's failure frees its row; the others go on
                self._end(job, error=e)
                continue
            if text:
                job.events.put(("text", text))
            if job.decoder.done:
                self._end(job)

    def embed(self, texts: list[str]) -> np.ndarray:
        """Mean over tokens of the base model's final (normalised) hidden states; one text at a time, no padding."""
        torch = self._torch
        hidden = self.model.config.hidden_size
        rows = []
        for text in texts:
            ids = self.tokenizer.encode(text, add_special_tokens=True)[: self.n_ctx] or [self.tokenizer.bos_token_id or 0]
            with self._model_lock, torch.inference_mode():
                out = self.model.base_model(input_ids=torch.tensor([ids], device=self.device))
            rows.append(out.last_hidden_state[0].float().mean(dim=0).cpu().numpy())  # (hidden,)
        return np.asarray(rows, dtype=np.float32).reshape(len(texts), hidden)

    def close(self) -> None:
        """Stop the scheduler (requests still inside get an error), then free the model."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._worker.join()  # the model is freed only once no forward pass can be running
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
