"""The ``serve`` command: host modules over HTTP, and with ``--infer`` answer predictions.

The server, uvicorn and TensorFlow are imported when the command runs, not before.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import click

from ..errors import MissingDependencyError
from .common import cache_dir_option, errors_as_exit

__all__ = ["serve"]

_UNITS = {"": 1, "b": 1, "kb": 1000, "kib": 1 << 10, "mb": 1000**2, "mib": 1 << 20}
_UNITS |= {"gb": 1000**3, "gib": 1 << 30}


class _Size(click.ParamType[int]):
    """A number of bytes: ``67108864``, ``64MiB``, ``500kB``."""

    name = "bytes"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip()
        digits = text.rstrip("BbKkMmGgIi ")
        unit = _UNITS.get(text[len(digits) :].strip().lower())
        if not digits.isdigit() or not digits.isascii() or unit is None or int(digits) < 1:
            self.fail(f"{value!r} is not a size in bytes, like 67108864 or 64MiB", param, ctx)
        return int(digits) * unit


@click.command()
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to listen on.")
@cache_dir_option.with_help(
    "Where directories packed on demand are kept (default: a temp dir, removed on exit)."
)
@click.option(
    "--infer", is_flag=True, help="Also answer predictions: the Open Inference Protocol under /v2."
)
@click.option("--preload", is_flag=True, help="With --infer: load every module at start-up.")
@click.option(
    "--max-batch-size",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="With --infer: the most rows joined into one call of a model.",
)
@click.option(
    "--max-delay-ms",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="With --infer: how long a request waits for others to join its batch.",
)
@click.option(
    "--max-queue",
    type=click.IntRange(min=1),
    default=4096,
    show_default=True,
    help="With --infer: rows waiting per model and signature before requests get 503.",
)
@click.option(
    "--no-batching", is_flag=True, help="With --infer: run each request alone (no batches)."
)
@click.option(
    "--max-input-size",
    type=_Size(),
    default="64MiB",
    show_default=True,
    help="With --infer: the most bytes a request body may hold, compressed and inflated (413).",
)
@click.option(
    "--max-request-rows",
    type=click.IntRange(min=1),
    default=65536,
    show_default=True,
    help="With --infer: the most rows (first dimension) of an input in one request (413).",
)
@click.option(
    "--max-request-elements",
    type=click.IntRange(min=1),
    default=1 << 24,
    show_default=True,
    help="With --infer: the most values all inputs of one request may hold (413).",
)
@click.option(
    "--body-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="With --infer: seconds a request body may take to arrive in full (408).",
)
@click.option(
    "--loop",
    type=click.Choice(["auto", "uvloop", "asyncio"]),
    default="auto",
    show_default=True,
    help="The event loop: auto takes uvloop when it is installed (the server extra has it).",
)
@click.option(
    "--http",
    type=click.Choice(["auto", "httptools", "h11"]),
    default="auto",
    show_default=True,
    help="The HTTP parser: auto takes httptools when it is installed (the server extra has it).",
)
@click.option(  # drain hook
    "--drain-timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="On SIGTERM or Ctrl-C: seconds in-flight requests get to finish (new ones get 503).",
)
@click.option(
    "--access-log/--no-access-log",
    default=True,
    show_default=True,
    help="Log every request on stdout.",
)
def serve(
    root: Path,
    host: str,
    port: int,
    cache_dir: Path | None,
    infer: bool,
    preload: bool,
    max_batch_size: int,
    max_delay_ms: float,
    max_queue: int,
    no_batching: bool,
    max_input_size: int,
    max_request_rows: int,
    max_request_elements: int,
    body_timeout: float,
    loop: str,
    http: str,
    access_log: bool,
    drain_timeout: float,
) -> None:
    """Serve the modules under ROOT over HTTP, the TF Hub way.

    ROOT holds NAME/VERSION/ SavedModel directories and/or prebuilt NAME/VERSION.tar.gz
    archives; NAME may contain slashes. A client fetches NAME/VERSION with
    ?tf-hub-format=compressed; a browser gets a page about the module. With --infer,
    model NAME answers predictions at /v2/models/NAME[/versions/VERSION]/infer
    (docs/serving.md). GET /metrics is for Prometheus.

    SIGTERM or Ctrl-C drains first: new requests get 503, the ones in flight finish
    (up to --drain-timeout), then the server exits 0 (1 if it cut requests off).
    """
    ctx = click.get_current_context()
    infer_only = (
        "preload",
        "max_batch_size",
        "max_delay_ms",
        "max_queue",
        "no_batching",
        "max_input_size",
        "max_request_rows",
        "max_request_elements",
        "body_timeout",
    )
    given = [
        f"--{name.replace('_', '-')}"
        for name in infer_only
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
    ]
    if given and not infer:
        raise click.UsageError(f"{', '.join(given)} only apply with --infer")
    with errors_as_exit():
        try:
            import uvicorn

            from .._serving.drain import run as run_server  # drain hook
            from ..server import InferOptions, create_app
        except ImportError as exc:
            raise MissingDependencyError(
                f'serving needs the server extra ({exc}): pip install "asynchub[server]"'
            ) from exc
    options = None
    if infer:
        options = InferOptions(
            preload=preload,
            batching=not no_batching,
            max_batch_size=max_batch_size,
            max_delay=max_delay_ms / 1000,
            max_queue=max_queue,
            max_input_size=max_input_size,
            max_request_rows=max_request_rows,
            max_request_elements=max_request_elements,
            body_timeout=body_timeout,
        )
    with errors_as_exit():
        app = create_app(root, cache_dir=cache_dir, infer=options or False)
    # uvicorn's own logging, plus asynchub's (a model loaded, a module that cannot be packed).
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["asynchub"] = {"handlers": ["default"], "level": "INFO"}
    # drain hook: uvicorn.run, but SIGTERM drains the server first (docs/serving.md).
    status = run_server(
        app,
        drain_timeout=drain_timeout,
        host=host,
        port=port,
        loop=loop,
        http=http,
        log_config=log_config,
        access_log=access_log,
    )
    if status:
        ctx.exit(status)
