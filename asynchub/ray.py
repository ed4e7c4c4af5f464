"""asynchub on Ray: warm every node's cache, batch inference with Ray Data, loaders for Serve.

Three pieces, each a thin layer over the hub (asynchub adds loaders, not scheduling):

- :func:`prefetch_on_nodes` runs one task pinned to each alive node (node affinity,
  not soft), each resolving the handles into *that node's* cache, and reports
  per node and handle, as :func:`asynchub.prefetch` does.
- :class:`Predictor` is a callable class for ``Dataset.map_batches``: each actor
  loads the module once, through the node's cache (the cache's lock makes the
  actors of one node download it once, and the nodes of a cache shared over a
  network file system once in all), and applies it to each batch.
- :func:`model_loader` makes the ``async`` loader that ``@serve.multiplexed``
  wants, from a handle template or an allow-list of handles.

Ray is imported where it is used, never by ``import asynchub`` (nor by
``import asynchub.ray``): a :class:`Predictor` in a Ray Data actor needs only
asynchub and TensorFlow. Install with ``pip install "asynchub[ray]"``. The guide
is docs/scale-out.md.
"""

from __future__ import annotations

import gc
import os
import re
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, overload

from ._config import HubConfig, HubOptions
from ._lookup import cached
from ._module import Module, default_signature, load_module
from ._tf import gc_paused
from ._types import Handle, Processes
from .errors import HandleError, HubError, MissingDependencyError, PrefetchError, SignatureError

# The hub, the download machinery and httpx are imported where they are needed: an
# actor whose node's cache holds its module (after prefetch_on_nodes) never needs
# them, and importing them would cost each actor ~0.15 s before TensorFlow's import.

if sys.version_info >= (3, 11):
    from typing import Unpack
elif TYPE_CHECKING:  # pragma: no cover
    from typing_extensions import Unpack

if TYPE_CHECKING:
    from types import ModuleType

__all__ = ["Predictor", "model_loader", "prefetch_on_nodes"]

INSTALL_HINT = 'pip install "asynchub[ray]"'
_SHOWN = 5  # failures named in a PrefetchError's message; .exceptions holds them all
#: What a model id may look like when it is put into a handle template: no "/", no
#: "..", nothing a URL or a path would read as structure.
_MODEL_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
#: The options of AsyncHub that HubConfig validates (the rest are objects, not values).
_CONFIG_OPTIONS = frozenset(HubConfig.options())


def _ray() -> ModuleType:
    try:
        import ray
    except ImportError as exc:
        raise MissingDependencyError(
            f"asynchub.ray needs Ray, which is not installed ({exc}); {INSTALL_HINT}"
        ) from exc
    return ray


# -- prefetch on every node ------------------------------------------------------------


@overload
def prefetch_on_nodes(
    handles: Iterable[Handle],
    *,
    return_exceptions: Literal[False] = ...,
    processes: Processes = ...,
    task_timeout: float | None = ...,
    **hub_options: Unpack[HubOptions],
) -> dict[str, list[str]]: ...


@overload
def prefetch_on_nodes(
    handles: Iterable[Handle],
    *,
    return_exceptions: bool,
    processes: Processes = ...,
    task_timeout: float | None = ...,
    **hub_options: Unpack[HubOptions],
) -> dict[str, list[str | HubError]]: ...


def prefetch_on_nodes(
    handles: Iterable[Handle],
    *,
    return_exceptions: bool = False,
    processes: Processes = None,
    task_timeout: float | None = None,
    **hub_options: Unpack[HubOptions],
) -> dict[str, list[str]] | dict[str, list[str | HubError]]:
    """Resolve ``handles`` into the cache of every alive node of the Ray cluster.

    One task is pinned to each node (``NodeAffinitySchedulingStrategy(soft=False)``,
    ``num_cpus=0`` so that it never waits behind a busy node's work) and runs
    :func:`asynchub.prefetch` there with a hub made on that node from
    ``hub_options``: without ``cache_dir=``, each node uses its own
    ``TFHUB_CACHE_DIR`` (or temp dir). Returns ``{node_id: [path, ...]}``, the
    paths as seen on that node, in input order. Connects to Ray first
    (``ray.init()``) if this process is not connected yet, as Ray's own calls do.

    Failures are reported per node and handle: when every task is done, a
    :class:`PrefetchError` holds one error per failed (node, handle), each the
    same asynchub error class as on the node, its message starting with the
    node; with ``return_exceptions=True`` the errors stand in the lists in place
    of paths instead. A node whose task could not run or finish (the node died,
    its worker crashed, ``task_timeout`` seconds passed) fails each of its handles
    with a :class:`HubError` that says so. A misspelt or invalid hub option is a
    ``TypeError``/``ValueError`` here, before any task starts.
    """
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ._prefetch import check_processes

    items = list(handles)
    _check_hub_options(hub_options)
    check_processes(processes)
    if not ray.is_initialized():
        ray.init()
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    task = ray.remote(_prefetch_here)
    refs = {
        node["NodeID"]: task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
            num_cpus=0,
            max_retries=0,
            name="asynchub.prefetch_on_nodes",
        ).remote(items, dict(hub_options), processes)
        for node in nodes
    }
    labels = {node["NodeID"]: _label(node) for node in nodes}
    if refs:
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=task_timeout)
    results: dict[str, list[str | HubError]] = {}
    failed: list[HubError] = []
    for node_id, ref in refs.items():
        label = labels[node_id]
        outcomes: list[str | HubError]
        try:
            raw = ray.get(ref, timeout=0)
        except ray.exceptions.GetTimeoutError as exc:
            # Not force=True: the task gets a KeyboardInterrupt, which cancels its
            # downloads, and their cleanup removes their tmp dirs and locks.
            ray.cancel(ref)
            outcomes = _node_failed(items, label, f"did not finish within {task_timeout:g}s", exc)
        except ray.exceptions.RayError as exc:
            outcomes = _node_failed(items, label, "its prefetch task failed", exc)
        else:
            outcomes = [_outcome(item, label) for item in raw]
        results[node_id] = outcomes
        failed.extend(r for r in outcomes if isinstance(r, HubError))
    if failed and not return_exceptions:
        total = len(items) * len(refs)
        shown = ", ".join(f"{e} ({type(e).__name__})" for e in failed[:_SHOWN])
        more = f", and {len(failed) - _SHOWN} more" if len(failed) > _SHOWN else ""
        raise PrefetchError(
            f"{len(failed)} of {total} prefetches on {len(refs)} nodes failed: {shown}{more}",
            failed,
        )
    return results


def _check_hub_options(options: Mapping[str, Any]) -> None:
    """Misspelt names and bad values fail here, once, not on every node."""
    unknown = sorted(set(options) - set(HubOptions.__annotations__))
    if unknown:
        raise TypeError(f"unknown hub option(s): {', '.join(unknown)}")
    HubConfig.from_env(**{k: v for k, v in options.items() if k in _CONFIG_OPTIONS})


def _label(node: Mapping[str, Any]) -> str:
    address = node.get("NodeManagerAddress") or node.get("NodeManagerHostname") or "?"
    return f"node {str(node['NodeID'])[:8]} ({address})"


def _prefetch_here(
    handles: list[Handle], options: dict[str, Any], processes: Processes
) -> list[str | dict[str, Any]]:
    """The task on one node: prefetch into its cache; paths as text, errors as data.

    Errors travel as data because not every asynchub error survives pickling (their
    keyword-only fields), and so that the driver can name the node in each.
    """
    import anyio

    from ._hub import AsyncHub
    from ._workers import error_to_json

    async def run() -> list[Any]:
        async with AsyncHub(**options) as hub:
            return await hub.prefetch(handles, return_exceptions=True, processes=processes)

    results = anyio.run(run)
    return [error_to_json(r) if isinstance(r, BaseException) else os.fspath(r) for r in results]


def _outcome(item: str | Mapping[str, Any], label: str) -> str | HubError:
    if isinstance(item, str):
        return item
    from ._workers import error_from_json

    return error_from_json({**item, "message": f"on {label}: {item.get('message', '')}"})


def _node_failed(
    handles: list[Handle], label: str, what: str, exc: BaseException
) -> list[str | HubError]:
    out: list[str | HubError] = []
    for handle in handles:
        text = os.fspath(handle) if isinstance(handle, (str, os.PathLike)) else repr(handle)
        error = HubError(f"on {label}: {text}: {what}: {exc}", handle=str(text))
        error.__cause__ = exc
        out.append(error)
    return out


# -- Ray Data ---------------------------------------------------------------------------


class Predictor:
    """Apply a module to Ray Data batches: ``ds.map_batches(Predictor, ...)``.

    ::

        ds.map_batches(
            asynchub.ray.Predictor,
            fn_constructor_kwargs={"handle": url, "input_column": "x", "output_column": "y"},
            batch_size=256,
            compute=ray.data.ActorPoolStrategy(size=4),  # or concurrency=4
            num_cpus=1,
        )

    Each actor loads the module once, in its constructor, resolving ``handle``
    through the cache of the node it runs on (``TFHUB_CACHE_DIR`` there, or
    ``cache_dir=`` among the hub options), so the actors of a node download it
    once between them. Batches are dicts of numpy arrays (``batch_format="numpy"``,
    Ray Data's default).

    ``input_column`` names the column that is the module's one input, or maps each
    input name of the signature to its column (``{"apples": "a", "oranges": "o"}``).
    ``output_column`` names the column the module's output goes to, or maps output
    names to columns (then every output is asked for by name, as ``as_dict=True``).
    The batch is returned with the output columns added, or only them with
    ``keep_columns=False``. ``signature``, ``tags`` and the hub options (``cache_dir``,
    ``headers``, ``timeout``, ...) are those of :func:`asynchub.load`.
    """

    def __init__(
        self,
        handle: Handle,
        *,
        signature: str | None = None,
        input_column: str | Mapping[str, str] = "x",
        output_column: str | Mapping[str, str] = "y",
        keep_columns: bool = True,
        tags: Iterable[str] | None = None,
        **hub_options: Unpack[HubOptions],
    ) -> None:
        # The collector stays paused up to the freeze: TensorFlow's import and the
        # load make ~450,000 objects that a frozen actor need never scan (a download
        # meanwhile makes little cyclic garbage).
        with gc_paused():
            # A cache hit (every actor after the node's first, or after prefetch_on_nodes)
            # is answered in this thread, without a hub: no event loop, no httpx.
            path = cached(handle, hub_options)
            if path is not None:
                module = load_module(path, handle=os.fspath(handle), tags=tags)
            else:
                # A download: the hub's load imports TensorFlow while it downloads.
                from ._sync import Hub

                with Hub(**hub_options) as hub:
                    module = hub.load(handle, tags=tags)
            _freeze_in_actor()
        #: The loaded module (one per actor).
        self.module: Module = module
        self.signature = signature
        self.input_column = input_column if isinstance(input_column, str) else dict(input_column)
        self.output_column = (
            output_column if isinstance(output_column, str) else dict(output_column)
        )
        self.keep_columns = keep_columns
        self._check_columns()

    def _check_columns(self) -> None:
        """Check the column mappings against the signature."""
        module, signature = self.module, self.signature
        if signature is None and callable(module.obj):
            return  # the callable object's inputs are known only when called
        name = signature or default_signature(list(module.signatures), handle=module.handle)
        info = module.signatures.get(name)
        if info is None:
            known = ", ".join(sorted(module.signatures)) or "none"
            raise SignatureError(
                f"module {module.handle!r} has no signature {name!r}; it has: {known}",
                handle=module.handle,
            )
        where = f"signature {name!r} of module {module.handle!r}"
        names = set(info.input_names)
        if isinstance(self.input_column, dict):
            missing = sorted(names - set(self.input_column))
            unknown = sorted(set(self.input_column) - names)
            if missing or unknown:
                raise SignatureError(
                    f"{where}: input_column must map each of its inputs "
                    f"({', '.join(info.input_names)}) to a column; "
                    f"missing: {missing or 'none'}, unknown: {unknown or 'none'}",
                    handle=module.handle,
                )
        elif len(names) != 1:
            raise SignatureError(
                f"{where} takes {len(names)} inputs ({', '.join(info.input_names)}); "
                "pass input_column as a dict that maps each input name to its column",
                handle=module.handle,
            )
        if isinstance(self.output_column, dict):
            unknown = sorted(set(self.output_column) - set(info.output_names))
            if unknown:
                raise SignatureError(
                    f"{where} has no output(s) {unknown}; it has: {', '.join(info.output_names)}",
                    handle=module.handle,
                )

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Apply the module to one batch; returns the batch with the output column(s)."""
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"Predictor takes batches as dicts of numpy arrays, got {type(batch).__name__}; "
                'call map_batches(..., batch_format="numpy")'
            )
        columns = self.input_column
        inputs: Any
        # The columns go in as numpy: the module converts each once, to the dtype its
        # signature (or callable object) takes, and takes its fast path.
        if isinstance(columns, str):
            inputs = array = _column(batch, columns)
        else:
            inputs = {name: _column(batch, column) for name, column in columns.items()}
            array = next(iter(inputs.values()))
        as_dict = not isinstance(self.output_column, str)
        result = self.module(inputs, signature=self.signature, as_dict=as_dict)
        rows = len(array)
        out = dict(batch) if self.keep_columns else {}
        if isinstance(self.output_column, str):
            out[self.output_column] = self._rows(result, rows, self.output_column)
        else:
            for name, column in self.output_column.items():
                if name not in result:
                    known = ", ".join(sorted(result))
                    raise SignatureError(
                        f"module {self.module.handle!r} returned no output {name!r} "
                        f"(it returned: {known})",
                        handle=self.module.handle,
                    )
                out[column] = self._rows(result[name], rows, column)
        return out

    def _rows(self, value: Any, rows: int, column: str) -> Any:
        array = value.numpy() if hasattr(value, "numpy") else value
        shape = getattr(array, "shape", ())
        if not shape or shape[0] != rows:
            raise SignatureError(
                f"module {self.module.handle!r} returned {tuple(shape)} for column {column!r} "
                f"from a batch of {rows} rows; Predictor needs one output row per input row",
                handle=self.module.handle,
            )
        return array

    def __repr__(self) -> str:
        return (
            f"Predictor(handle={self.module.handle!r}, signature={self.signature!r}, "
            f"input_column={self.input_column!r}, output_column={self.output_column!r})"
        )


def _freeze_in_actor() -> None:
    """In a Ray actor, freeze every object made so far (see :class:`Predictor`).

    The actor lives to apply its module: what TensorFlow, Ray and the module made
    lives as long. Frozen, it is never scanned again; else the collector's next full
    passes over it (~0.2-0.5 s each with TensorFlow and Ray loaded) would land in the
    first batches. Elsewhere (a test, a notebook) the process is not ours to freeze.
    """
    if _in_ray_actor():
        gc.freeze()


def _in_ray_actor() -> bool:
    """Whether this process is a Ray actor's (Ray imported, connected, an actor id)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    try:
        return ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # a Ray without the call, or not quite connected
        return False


def _column(batch: Mapping[str, Any], name: str) -> Any:
    try:
        return batch[name]
    except KeyError:
        known = ", ".join(sorted(map(str, batch))) or "none"
        raise KeyError(f"the batch has no column {name!r}; it has: {known}") from None


# -- Ray Serve ----------------------------------------------------------------------------


def model_loader(
    handles: str | Mapping[str, Handle],
    *,
    tags: Iterable[str] | None = None,
    **hub_options: Unpack[HubOptions],
) -> Callable[[str], Awaitable[Module]]:
    """An ``async`` loader from model id to :class:`Module`, for ``@serve.multiplexed``.

    ``handles`` is a template such as ``"https://models.example.com/{model_id}/1"``,
    or a mapping from model id to handle (an allow-list). A model id comes from
    the request (``serve.get_multiplexed_model_id()``), so a template accepts only
    ids of letters, digits, ``_``, ``-`` and ``.`` (no ``/``, no ``..``): a request
    cannot point the replica at another URL or at a local file. An unknown or
    refused id is a :class:`HandleError`.

    The module is loaded with :func:`asynchub.aload` (resolve on the replica's event
    loop, ``tf.saved_model.load`` in a worker thread), through the node's cache::

        @serve.deployment
        class Models:
            def __init__(self) -> None:
                load = asynchub.ray.model_loader("https://models.example.com/{model_id}/1")
                self.model = serve.multiplexed(max_num_models_per_replica=4)(load)

            async def __call__(self, x):
                m = await self.model(serve.get_multiplexed_model_id())
                return await m.acall(x)
    """
    if isinstance(handles, str):
        if "{model_id}" not in handles:
            raise ValueError(f"the handle template {handles!r} has no '{{model_id}}' in it")
        template: str | None = handles
        table: dict[str, Handle] = {}
    else:
        template, table = None, dict(handles)
    tag_list = None if tags is None else list(tags)

    def handle_for(model_id: str) -> Handle:
        if template is None:
            try:
                return table[model_id]
            except KeyError:
                known = ", ".join(sorted(table)[:10]) or "none"
                raise HandleError(
                    f"unknown model id {model_id!r}; known ids: {known}", handle=None
                ) from None
        if not isinstance(model_id, str) or not _MODEL_ID.fullmatch(model_id) or ".." in model_id:
            raise HandleError(
                f"model id {model_id!r} refused: a model id put into the handle template "
                f"{template!r} may hold only letters, digits, '_', '-' and '.' (no '..')",
                handle=None,
            )
        return template.replace("{model_id}", model_id)

    async def load_multiplexed_model(model_id: str) -> Module:
        from ._sync import aload

        return await aload(handle_for(model_id), tags=tag_list, **hub_options)

    return load_multiplexed_model
