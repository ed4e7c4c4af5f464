"""Hosting modules and answering predictions: ``asynchub serve`` and ``serve --infer``.

:mod:`asynchub.server` is the public face; the code is here, one concern a module, each
importing only the ones below it (``hosting`` -> ``infer`` -> ``repository``, ``oip``):

- ``hosting``: the ASGI app (starlette) of ``asynchub serve``: ``create_app`` with its
  routes, the pack cache, ETags and RFC 9110's conditionals and ranges, and
  ``serve_in_thread``.
- ``pages``: what the pages show (signatures, the README as a model card) and their HTML.
- ``infer``: :class:`~asynchub._serving.infer.Inference`, the ``/v2`` routes of
  ``serve --infer`` (the Open Inference Protocol over ``Module.batched``).
- ``options``: ``InferOptions``, which both of them take.
- ``ops``: what operators need: the app's Prometheus metrics (``/metrics``), and the
  middleware that counts requests and refuses new ones while the server drains.
- ``drain``: ``asynchub serve``'s uvicorn server, which drains on SIGTERM before it stops.
- ``repository``: a ROOT on disk: ``NAME/VERSION`` directories and archives, found
  (``locate``, ``scan``, ``versions``), sorted (``version_key``) and checked to stay inside.
- ``oip``: the Open Inference Protocol's codec, plain functions: model paths, requests
  decoded, bound to a signature, responses encoded.

Importing this imports starlette, not ``infer`` and ``oip``: they bring numpy and the
module loader, and ``create_app`` imports them only when asked to serve predictions;
nor ``ops`` (prometheus_client), which ``create_app`` imports.
"""

from .hosting import (
    ARCHIVE_MEDIA_TYPE,
    FORMATS,
    create_app,
    etag_matches,
    requested_formats,
    serve_in_thread,
)
from .options import InferOptions
from .repository import (
    ARCHIVE_SUFFIX,
    ModuleSource,
    latest,
    locate,
    scan,
    split_module_path,
    version_key,
    versions,
)

__all__ = [
    "ARCHIVE_MEDIA_TYPE",
    "ARCHIVE_SUFFIX",
    "FORMATS",
    "InferOptions",
    "ModuleSource",
    "create_app",
    "etag_matches",
    "latest",
    "locate",
    "requested_formats",
    "scan",
    "serve_in_thread",
    "split_module_path",
    "version_key",
    "versions",
]
