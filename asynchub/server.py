"""Host modules over HTTP the TF Hub way: an ASGI app (starlette), served by ``asynchub serve``.

``create_app(ROOT)`` serves the modules under ``ROOT`` (``NAME/VERSION/`` SavedModel
directories and/or ``NAME/VERSION.tar.gz`` archives) as TF Hub does:
``GET /NAME/VERSION?tf-hub-format=compressed`` sends the archive, ``GET /NAME/VERSION``
a page about the module, ``GET /`` an index. With ``infer=InferOptions(...)``
(``asynchub serve --infer``) it also answers predictions over the Open Inference Protocol
under ``/v2``. ``serve_in_thread`` runs an app for notebooks, tests and demos.

This module is the public face: the code is in ``asynchub._serving`` (its docstring says
which module holds what). Importing it imports starlette, not TensorFlow or uvicorn.
"""

from ._serving import (
    ARCHIVE_MEDIA_TYPE,
    FORMATS,
    InferOptions,
    ModuleSource,
    create_app,
    etag_matches,
    locate,
    requested_formats,
    scan,
    serve_in_thread,
    split_module_path,
)

__all__ = [
    "ARCHIVE_MEDIA_TYPE",
    "FORMATS",
    "InferOptions",
    "ModuleSource",
    "create_app",
    "etag_matches",
    "locate",
    "requested_formats",
    "scan",
    "serve_in_thread",
    "split_module_path",
]
