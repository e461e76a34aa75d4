"""Client-disconnect handling shared by the seed's routes (app.py) and the OpenAI routes (openai_api.py)."""
from __future__ import annotations

import asyncio
import threading

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse


async def until_disconnect(request: Request, fn, cancel: threading.Event):
    """Run blocking `fn` in a worker thread; set `cancel` if the client disconnects meanwhile."""
    async def watch():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                cancel.set()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await run_in_threadpool(fn)
    finally:
        watcher.cancel()


async def answer(request: Request, llm, query):
    """``llm.query_with(query)`` in a worker thread, cancelled if the client disconnects meanwhile."""
    cancel = threading.Event()
    return await until_disconnect(request, lambda: llm.query_with(query, cancel), cancel)


async def open_stream(request: Request, llm, query):
    """``(stream, first chunk)``: admission errors surface here, before any header is sent; the stream
    is closed if getting its first chunk fails or the client leaves."""
    stream = llm.query_stream(query)
    try:
        return stream, await until_disconnect(request, lambda: next(stream, None), stream.cancel)
    except BaseException:
        stream.close()
        raise


class CancellingStream(StreamingResponse):
    """A streaming response that calls `on_end` however it ends: finished, failed, or the client gone."""

    def __init__(self, content, on_end, **kwargs):
        super().__init__(content, **kwargs)
        self._on_end = on_end

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_end()
