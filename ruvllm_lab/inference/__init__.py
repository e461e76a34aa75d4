"""The frozen "cortex": every answer is generated here, by real GGUF models.

    from ruvllm_lab.inference import InferencePool, Generation
    pool = InferencePool(cfg.inference, cfg.system)
    g = pool.generate("smollm2-135m", "What is the capital of France?", temperature=0.0, max_tokens=16)

Backends: llama.cpp (CPU default), transformers (+torch, CUDA when available), and vLLM
(optional, GPU hosts only; falls back to transformers with a warning).
"""
from .base import Backend, Generation, GenerationRequest
from .pool import GenerationStream, InferencePool

__all__ = ["Backend", "Generation", "GenerationRequest", "GenerationStream", "InferencePool"]
