"""The ``asynchub`` command line: prefetch, resolve, lock, mirror, cache, pack and serve.

Heavy parts (the server, uvicorn, TensorFlow) are imported inside the commands, so
``asynchub --help`` stays fast. Failures exit with status 1 and print a one-line
``error: ...`` on stderr.
"""

from __future__ import annotations

import copy
from pathlib import Path

from . import __version__
from .errors import HubError, MissingDependencyError

try:
    import click
except ImportError as exc:  # pragma: no cover - exercised without the cli extra only
    raise MissingDependencyError(
        f'the asynchub command line needs click ({exc}): pip install "asynchub[cli]"'
    ) from exc

__all__ = ["main"]


def _fail(exc: BaseException) -> click.exceptions.Exit:
    """Print ``error: <message on one line>`` to stderr; return the exit to raise (status 1).

    The same form as the hub commands (``_cli_hub``), so scripts parse one shape.
    """
    click.echo(f"error: {' '.join(str(exc).split())}", err=True)
    return click.exceptions.Exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, message="%(prog)s %(version)s")
def main() -> None:
    """Create, host and load TensorFlow Hub-style modules."""


@main.command()
@click.argument("src_dir", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
def pack(src_dir: Path, out: Path) -> None:
    """Pack the module directory SRC_DIR into the tar.gz archive OUT.

    The same directory always gives byte-identical archives (sorted members, owner 0,
    fixed mtimes and modes). Serve the archive as NAME/VERSION.tar.gz, or anywhere a
    hub handle can point.
    """
    from ._pack import pack as pack_dir

    try:
        archive = pack_dir(src_dir, out)
    except HubError as exc:
        raise _fail(exc) from exc
    click.echo(f"{out} ({archive.stat().st_size} bytes)")


@main.command()
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to listen on.")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where directories packed on demand are kept (default: a temp dir, removed on exit).",
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
    access_log: bool,
) -> None:
    """Serve the modules under ROOT over HTTP, the TF Hub way.

    ROOT holds NAME/VERSION/ SavedModel directories and/or prebuilt NAME/VERSION.tar.gz
    archives; NAME may contain slashes. A client fetches NAME/VERSION with
    ?tf-hub-format=compressed; a browser gets a page about the module. With --infer,
    model NAME answers predictions at /v2/models/NAME[/versions/VERSION]/infer
    (docs/serving.md).
    """
    ctx = click.get_current_context()
    infer_only = ("preload", "max_batch_size", "max_delay_ms", "max_queue", "no_batching")
    given = [
        f"--{name.replace('_', '-')}"
        for name in infer_only
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
    ]
    if given and not infer:
        raise click.UsageError(f"{', '.join(given)} only apply with --infer")
    try:
        import uvicorn

        from .server import InferOptions, create_app
    except ImportError as exc:
        raise _fail(
            MissingDependencyError(
                f'serving needs the server extra ({exc}): pip install "asynchub[server]"'
            )
        ) from exc
    options = None
    if infer:
        options = InferOptions(
            preload=preload,
            batching=not no_batching,
            max_batch_size=max_batch_size,
            max_delay=max_delay_ms / 1000,
            max_queue=max_queue,
        )
    try:
        app = create_app(root, cache_dir=cache_dir, infer=options or False)
    except HubError as exc:
        raise _fail(exc) from exc
    # uvicorn's own logging, plus asynchub's (a model loaded, a module that cannot be packed).
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["asynchub"] = {"handlers": ["default"], "level": "INFO"}
    uvicorn.run(app, host=host, port=port, log_config=log_config, access_log=access_log)


from ._cli_hub import COMMANDS as _HUB_COMMANDS  # noqa: E402  (after main is defined)

for _command in _HUB_COMMANDS:
    main.add_command(_command)

if __name__ == "__main__":
    main(prog_name="asynchub")
