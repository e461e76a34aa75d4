"""RuvLLM lab: frozen small LMs reason; a living vector+graph memory, a FastGRNN router
and continual-learning loops adapt.  ``from ruvllm_lab import RuvLLM, Config, Request, Constraints, Feedback``.
"""
from __future__ import annotations

from .config import Config, ConfigBuilder
from .errors import ConfigError, ModelNotFound, RuvLLMError
from .types import Constraints, Feedback, Request, Response, Session

__version__ = "0.1.0"

__all__ = ["RuvLLM", "Config", "ConfigBuilder", "Request", "Response", "Session", "Constraints", "Feedback",
           "RuvLLMError", "ConfigError", "ModelNotFound", "__version__"]


def __getattr__(name: str):
    # The orchestrator pulls in torch, faiss and llama.cpp: import it only when asked for.
    if name == "RuvLLM":
        from .orchestrator import RuvLLM
        return RuvLLM
    raise AttributeError(f"module 'ruvllm_lab' has no attribute {name!r}")
