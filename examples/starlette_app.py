"""Serve a module over HTTP with Starlette, joining concurrent requests into batches.

Run it with any handle asynchub loads (a URL, an archive, a SavedModel directory)::

    ASYNCHUB_EXAMPLE_MODULE=path/to/module uvicorn --app-dir examples starlette_app:app

    curl -s localhost:8000/predict -d '{"inputs": [[1.0, 2.0, 3.0]]}'
    # {"outputs": [[2.0, 4.0, 6.0]]}

The module is loaded once, at start-up, with ``asynchub.aload``. Each request goes
through ``m.batched(...)``: requests that arrive together run as one call in a
worker thread, and the event loop keeps serving meanwhile.

- ``POST /predict`` ``{"inputs": [[...], ...]}`` (one or more rows) answers
  ``{"outputs": [[...], ...]}``: 400 if the body is not such JSON, 422 if the
  inputs do not fit the module (the message says why), 503 when the batcher's
  queue is full (shed load; the client should retry later).
- ``GET /`` describes the module.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import asynchub


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    handle = os.environ.get("ASYNCHUB_EXAMPLE_MODULE")
    if not handle:
        raise RuntimeError("set ASYNCHUB_EXAMPLE_MODULE to the handle of the module to serve")
    module = await asynchub.aload(handle)
    app.state.module = module
    # 64 rows per call, at most 2 ms of waiting for company; past 4096 waiting rows
    # the server answers 503 at once rather than letting every latency grow.
    app.state.predict = module.batched(max_batch_size=64, max_delay=0.002, max_queue=4096)
    # What is loaded now lives as long as the process. Frozen, it is skipped by the
    # collector's full passes, which otherwise stall the loop for ~200 ms with TensorFlow.
    gc.collect()
    gc.freeze()
    yield


async def describe(request: Request) -> JSONResponse:
    module = request.app.state.module
    signatures = {name: str(info) for name, info in module.signatures.items()}
    return JSONResponse({"handle": module.handle, "signatures": signatures})


async def predict(request: Request) -> JSONResponse:
    try:
        inputs: Any = (await request.json())["inputs"]
    except (ValueError, KeyError, TypeError):
        return JSONResponse({"error": 'send JSON: {"inputs": [[...], ...]}'}, status_code=400)
    try:
        outputs = await request.app.state.predict(inputs)
    except asynchub.SignatureError as exc:  # the inputs do not fit the module
        return JSONResponse({"error": str(exc)}, status_code=422)
    except asynchub.HubError as exc:  # the queue is full: overloaded, come back later
        return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "1"})
    return JSONResponse({"outputs": outputs.numpy().tolist()})


app = Starlette(
    routes=[Route("/", describe), Route("/predict", predict, methods=["POST"])],
    lifespan=lifespan,
)
