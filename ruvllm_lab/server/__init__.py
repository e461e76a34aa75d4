"""HTTP server for RuvLLM: `create_app(config)` (FastAPI) and `serve(config, host, port)` (uvicorn)."""
from .app import create_app, serve

__all__ = ["create_app", "serve"]
