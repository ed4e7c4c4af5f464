"""``s3://`` and ``gs://`` objects as a source, through obstore.

obstore moves the bytes in Rust (its own Tokio runtime, no GIL on the data
path). Its async API answers with asyncio futures, so on asyncio the source
awaits them directly; on trio, which has no asyncio loop to resolve them, it
runs obstore's blocking twin of each call in a worker thread (one hop per
chunk of ``chunk_size``, like the hand-off to the extraction thread).

Endpoint and credentials come from each store's standard environment, read by
obstore itself when a bucket's store is made (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``,
``AWS_ALLOW_HTTP``, …; ``GOOGLE_BASE_URL``, ``GOOGLE_SERVICE_ACCOUNT``,
``GOOGLE_SKIP_SIGNATURE``, …), plus the hub's ``s3_options``/``gcs_options``.
``STORAGE_EMULATOR_HOST``, which obstore ignores, is translated for GCS.

Retries are the hub's, not obstore's (its own are turned off), so an object
store handle is retried, timed out and given up on exactly as an http one.
A body cut mid-stream is resumed from the byte it stopped at, with
``If-Match`` on the first answer's ETag: an object replaced meanwhile fails
the precondition and the attempt starts over rather than splicing two versions.

A prefix is copied from one listing: each object's size and ETag as listed
(:class:`Listed`) go with every GET of it (``If-Match``) and are checked again
on each answer, since not every store honours the header (fake-gcs-server
ignores it). Folder markers (``m/``, ``m/variables/``, the zero-byte objects
consoles write for "create folder") are directories, not files.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
from anyio import to_thread

from .._config import Retries, Timeouts
from .._handles import split_object_url
from .._retry import retry_delay
from ..errors import DownloadError, HTTPStatusError, HubError, MissingDependencyError, NetworkError
from .base import OnResume, RangesRefused, Retry, Split, Transfer, Validators

__all__ = [
    "Listed",
    "ObjectPrefix",
    "ObjectSource",
    "ObjectStores",
    "Snapshot",
    "classify",
    "client_env",
    "describe",
    "import_obstore",
    "put_file",
    "same_etag",
    "split_listing",
]

#: obstore's ClientConfig keys: read from ``AWS_*``/``GOOGLE_*`` by obstore only when
#: no client options are given, so the hub reads them itself (it always gives some).
CLIENT_KEYS = frozenset(
    {
        "allow_http",
        "allow_invalid_certificates",
        "connect_timeout",
        "default_content_type",
        "http1_only",
        "http2_keep_alive_interval",
        "http2_keep_alive_timeout",
        "http2_keep_alive_while_idle",
        "http2_only",
        "pool_idle_timeout",
        "pool_max_idle_per_host",
        "proxy_ca_certificate",
        "proxy_excludes",
        "proxy_url",
        "randomize_addresses",
        "read_timeout",
        "root_certificate",
        "timeout",
        "user_agent",
    }
)
_ENV_PREFIX = {"s3": "AWS_", "gs": "GOOGLE_"}
_STATUS = re.compile(r"status code: (\d{3})")
_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")
#: Mid-body failures worth resuming: the connection or a read broke.
_CUT = ("error decoding response body", "connection", "body", "timed out", "timeout", "reset")


def import_obstore() -> Any:
    try:
        import obstore
        import obstore.exceptions
        import obstore.store
    except ImportError as exc:
        raise MissingDependencyError(
            f's3:// and gs:// handles need obstore ({exc}): pip install "asynchub[objstore]"'
        ) from exc
    return obstore


def client_env(scheme: str, environ: Mapping[str, str]) -> dict[str, str]:
    """Client options set in the environment for ``scheme`` (``AWS_ALLOW_HTTP=true``, …)."""
    prefix = _ENV_PREFIX[scheme]
    out = {}
    for name, value in environ.items():
        if name.startswith(prefix) and (key := name[len(prefix) :].lower()) in CLIENT_KEYS:
            out[key] = value
    return out


def gcs_emulator(environ: Mapping[str, str]) -> dict[str, Any]:
    """GCS options from ``STORAGE_EMULATOR_HOST``, the emulators' convention, unless overridden.

    obstore reads ``GOOGLE_BASE_URL`` only; an emulator checks no signatures, and
    without ``skip_signature`` obstore would ask a metadata server for a token.
    """
    host = environ.get("STORAGE_EMULATOR_HOST", "").strip()
    if not host or environ.get("GOOGLE_BASE_URL"):
        return {}
    if "://" not in host:
        host = f"http://{host}"
    options: dict[str, Any] = {"base_url": host.rstrip("/"), "skip_signature": True}
    if host.startswith("http://"):
        options["allow_http"] = True
    return options


class ObjectStores:
    """A hub's obstore stores: one per (scheme, bucket), made on first use and kept.

    The environment's client options are read once, when the hub makes this.
    """

    def __init__(
        self,
        *,
        s3: Mapping[str, Any],
        gcs: Mapping[str, Any],
        timeouts: Timeouts,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        self._options = {"s3": dict(s3), "gs": {**gcs_emulator(env), **gcs}}
        self._client_env = {scheme: client_env(scheme, env) for scheme in ("s3", "gs")}
        self._timeouts = timeouts
        self._stores: dict[tuple[str, str], Any] = {}

    def get(self, scheme: str, bucket: str) -> Any:
        store = self._stores.get((scheme, bucket))
        if store is None:
            store = self._make(scheme, bucket)
            self._stores[(scheme, bucket)] = store
        return store

    def _make(self, scheme: str, bucket: str) -> Any:
        obstore = import_obstore()
        t = self._timeouts
        client: dict[str, Any] = {
            "connect_timeout": timedelta(seconds=t.connect),
            "read_timeout": timedelta(seconds=t.read),
            # A whole body may take long; stalls are caught by read_timeout instead.
            "timeout": timedelta(days=1),
            **self._client_env[scheme],
        }
        config: dict[str, Any] = {}
        for key, value in self._options[scheme].items():
            (client if key in CLIENT_KEYS else config)[key] = value
        cls = obstore.store.S3Store if scheme == "s3" else obstore.store.GCSStore
        try:
            return cls(
                bucket,
                config=config,
                client_options=client,
                retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=t.connect)},
            )
        except (obstore.exceptions.BaseError, ValueError, TypeError) as exc:
            raise DownloadError(
                f"cannot configure the {scheme}:// store for bucket {bucket!r}: "
                f"{_first_line(exc)}; check s3_options/gcs_options and the environment"
            ) from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def describe(exc: BaseException) -> str:
    """obstore's message, cut to its first line, plus the store's error code if it gave one."""
    text = str(exc)
    line = _first_line(exc)
    # The first line ends with the start of the store's XML error body.
    line = line.split(": <?xml", 1)[0]
    code = _CODE.search(text)
    return f"{line} ({code.group(1)})" if code else line


def _on_asyncio() -> bool:
    """Whether obstore's async calls can be awaited here: they need a running asyncio loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def _get(store: Any, path: str, options: dict[str, Any]) -> Any:
    obstore = import_obstore()
    if _on_asyncio():
        return await obstore.get_async(store, path, options=options)
    return await to_thread.run_sync(
        functools.partial(obstore.get, store, path, options=options), abandon_on_cancel=True
    )


async def _next(stream: Any) -> bytes | None:
    if _on_asyncio():
        try:
            chunk: bytes = await stream.__anext__()
        except StopAsyncIteration:
            return None
        return chunk
    result: bytes | None = await to_thread.run_sync(next, stream, None, abandon_on_cancel=True)
    return result


async def _list(store: Any, prefix: str) -> list[dict[str, Any]]:
    obstore = import_obstore()
    if _on_asyncio():
        listing = await obstore.list(store, prefix).collect_async()
    else:
        listing = await to_thread.run_sync(
            lambda: obstore.list(store, prefix).collect(), abandon_on_cancel=True
        )
    return list(listing)


async def _head(store: Any, path: str) -> Any:
    obstore = import_obstore()
    if _on_asyncio():
        return await obstore.head_async(store, path)
    return await to_thread.run_sync(
        functools.partial(obstore.head, store, path), abandon_on_cancel=True
    )


def _etag(value: object) -> str | None:
    """An ETag without its quotes or weak mark, or None: listings and answers quote differently."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    text = text.removeprefix("W/")
    return text.strip('"') or None


def same_etag(listed: str | None, answered: object) -> bool:
    """Whether an answer's ETag is the listed one (unknown on either side: nothing to compare)."""
    now = _etag(answered)
    return listed is None or now is None or listed == now


@dataclass(frozen=True)
class Listed:
    """One object as a prefix's listing saw it: what every GET of it must still be."""

    key: str  #: the object's key in its bucket
    size: int
    etag: str | None  #: unquoted (:func:`same_etag` compares)


@dataclass(frozen=True)
class Snapshot:
    """A prefix's listing: its files (relative path -> the object) and its marked directories."""

    files: dict[str, Listed]
    dirs: frozenset[str]


def split_listing(
    prefix: str, listing: Iterable[Mapping[str, Any]]
) -> tuple[dict[str, Listed], set[str], dict[str, Listed]]:
    """A flat listing of ``prefix`` as files, directories, and names only the store can settle.

    obstore lists a folder marker (``m/variables/``) without its ``/``, so it
    looks like a zero-byte file named ``m/variables``. A zero-byte name is a
    directory when it is the prefix itself or when other objects lie below it;
    one with nothing below it (an empty folder, or an empty file) is returned
    as undecided: a HEAD of the name tells (a marker's real key ends in ``/``).
    """
    base = prefix.rstrip("/")
    entries = []
    for meta in listing:
        path = str(meta["path"])
        if path in (base, prefix) or not path.startswith(prefix):
            continue  # the prefix's own marker (``m/``)
        entries.append((path, int(meta["size"]), _etag(meta.get("e_tag"))))
    parents = set()
    for path, _, _ in entries:
        parent = path.rpartition("/")[0]
        while parent.startswith(prefix) and parent not in parents:
            parents.add(parent)
            parent = parent.rpartition("/")[0]
    files: dict[str, Listed] = {}
    dirs: set[str] = set()
    undecided: dict[str, Listed] = {}
    for path, size, etag in entries:
        rel = path[len(prefix) :]
        if size == 0 and path in parents:
            dirs.add(rel)
        elif size == 0:
            undecided[rel] = Listed(path, size, etag)
        else:
            files[rel] = Listed(path, size, etag)
    return files, dirs, undecided


async def put_file(store: Any, path: str, file: Path) -> None:
    """Upload ``file`` to ``path`` (multipart for large files, by obstore)."""
    obstore = import_obstore()
    if _on_asyncio():
        await obstore.put_async(store, path, file)
    else:
        await to_thread.run_sync(functools.partial(obstore.put, store, path, file))


class _Failure:
    """How one obstore failure is met: the HubError, and whether a retry may help."""

    def __init__(self, error: HubError, *, retry: bool, cut: bool = False) -> None:
        self.error = error
        self.retry = retry
        self.cut = cut  #: the body broke mid-stream: worth a resume


def classify(exc: BaseException, *, handle: str, url: str, received: int) -> _Failure:
    """The HubError an obstore failure stands for, and whether another attempt may fix it.

    A missing object or bucket is a 404, refused credentials a 403 (401 when
    none were accepted at all); both final. Server errors, throttling, broken
    connections and timeouts are retried.
    """
    obstore = import_obstore()
    errors = obstore.exceptions
    detail = describe(exc)
    where = f"{handle}: {url}" if handle != url else url
    if isinstance(exc, FileNotFoundError):
        bucket = "NoSuchBucket" in str(exc)
        what = "bucket" if bucket else "object"
        advice = (
            "check the bucket's name and the endpoint"
            if bucket
            else "check the handle: nothing is stored at that key"
        )
        error: HubError = HTTPStatusError(
            f"{where}: no such {what} (404); {advice} ({detail})",
            handle=handle,
            url=url,
            status=404,
        )
        return _Failure(error, retry=False)
    if isinstance(exc, (errors.PermissionDeniedError, errors.UnauthenticatedError)):
        status = 401 if isinstance(exc, errors.UnauthenticatedError) else 403
        scheme = url.split("://", 1)[0]
        names = (
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or s3_options=)"
            if scheme == "s3"
            else "GOOGLE_SERVICE_ACCOUNT or GOOGLE_APPLICATION_CREDENTIALS (or gcs_options=)"
        )
        error = HTTPStatusError(
            f"{where}: the store refused the credentials ({status}); check {names} ({detail})",
            handle=handle,
            url=url,
            status=status,
        )
        return _Failure(error, retry=False)
    if isinstance(exc, errors.PreconditionError):
        error = NetworkError(
            f"{where}: the object changed while it was read (its ETag no longer matches); "
            "starting again",
            handle=handle,
            url=url,
        )
        return _Failure(error, retry=True)
    if isinstance(
        exc,
        (
            errors.InvalidPathError,
            errors.NotSupportedError,
            errors.UnknownConfigurationKeyError,
            ValueError,
            TypeError,
        ),
    ):
        error = DownloadError(f"{where}: {detail}", handle=handle, url=url)
        return _Failure(error, retry=False)
    status_match = _STATUS.search(str(exc))
    if status_match:
        status = int(status_match.group(1))
        retry = status >= 500 or status in (408, 429)
        error = HTTPStatusError(
            f"{where}: the store answered {status} ({detail})",
            handle=handle,
            url=url,
            status=status,
        )
        return _Failure(error, retry=retry)
    lowered = str(exc).lower()
    what = f"was cut after {received:,} bytes" if received else "failed"
    error = NetworkError(f"{where}: the request {what} ({detail})", handle=handle, url=url)
    return _Failure(error, retry=True, cut=received > 0 and any(w in lowered for w in _CUT))


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


class ObjectSource:
    """One ``s3://``/``gs://`` object's bytes: an archive, or one file of a prefix.

    Given ``listed`` (the object as its prefix's listing saw it), every GET
    carries ``If-Match`` on the listed ETag and every answer must have the
    listed size and ETag: an object replaced, resized or deleted since the
    listing is a :class:`Retry` whose error names it, never a mix of versions.
    Such a stream counts its bytes into the prefix's one Transfer (it leaves
    ``total`` alone) and draws on its one stall budget.
    """

    retry_truncated = True

    def __init__(
        self,
        stores: ObjectStores,
        url: str,
        *,
        handle: str,
        retries: Retries,
        timeouts: Timeouts,
        chunk_size: int,
        listed: Listed | None = None,
    ) -> None:
        scheme, bucket, self._path = split_object_url(url)
        self._store = stores.get(scheme, bucket)
        self.url = url
        self.where = url
        self._handle = handle
        self._retries = retries
        self._timeouts = timeouts
        self._chunk_size = chunk_size
        self._listed = listed

    async def stream(
        self, transfer: Transfer, on_resume: OnResume, split: Split | None = None
    ) -> AsyncIterator[bytes]:
        """Yield the object from its first byte; with ``split``, stop where it says."""
        obstore = import_obstore()
        failures = (obstore.exceptions.BaseError, OSError, ValueError, TypeError)
        listed = self._listed
        etag = listed.etag if listed is not None else None
        size = listed.size if listed is not None else None
        done = 0  # bytes of this object yielded: where a resume starts
        resumes = 0
        while True:
            options: dict[str, Any] = {}
            if done:
                options["range"] = {"offset": done}
            if etag is not None and (done or listed is not None):
                options["if_match"] = etag
            try:
                result = await _get(self._store, self._path, options)
                meta = result.meta
                if listed is not None:
                    self._check_listed(meta)
                elif done == 0:
                    transfer.total = size = int(meta["size"])
                    transfer.content_type = result.attributes.get("Content-Type")
                    etag = _etag(meta.get("e_tag"))
                    if split is not None:
                        # An object store does ranges; the ETag proves the bytes.
                        split.first = Validators(etag=etag, total=size, ranges=True)
                        split.on_first(split.first)
                if done and (
                    result.range[0] != done
                    or int(meta["size"]) != size
                    or not same_etag(etag, meta.get("e_tag"))
                ):
                    raise Retry(
                        NetworkError(
                            f"{self._handle}: {self.url} would not resume at byte "
                            f"{done:,} of the same object; starting again",
                            handle=self._handle,
                            url=self.url,
                        )
                    )
                chunks = result.stream(min_chunk_size=self._chunk_size)
                while (chunk := await _next(chunks)) is not None:
                    end = None if split is None else split.end
                    if end is not None and done + len(chunk) >= end:
                        chunk = chunk[: end - done]  # the rest is fetched as ranges
                        done += len(chunk)
                        transfer.received += len(chunk)
                        if chunk:
                            yield chunk
                        return
                    done += len(chunk)
                    transfer.received += len(chunk)
                    yield chunk
                if listed is not None and done != listed.size:
                    raise Retry(self._changed(f"{done:,} bytes arrived, {listed.size:,} listed"))
                return
            except failures as exc:
                if listed is not None:
                    changed = self._changed_by(exc)
                    if changed is not None:
                        raise Retry(changed) from exc
                failure = classify(exc, handle=self._handle, url=self.url, received=done)
                if _is_timeout(exc):
                    _stall(transfer, self._timeouts, self._handle, self.url, exc)
                if not failure.retry:
                    raise failure.error from exc
                if split is not None and split.end is not None and done >= split.end:
                    return  # cut just as our part was done
                if failure.cut and etag is not None and resumes < self._retries.total:
                    resumes += 1
                    on_resume(failure.error)
                    await anyio.sleep(retry_delay(resumes - 1, self._retries))
                    continue
                raise Retry(failure.error) from exc

    async def fetch_range(
        self, start: int, end: int, first: Validators, transfer: Transfer, on_resume: OnResume
    ) -> AsyncIterator[bytes]:
        """Bytes ``[start, end)`` of the object ``first`` described, ``if_match`` its ETag.

        A replaced object fails the precondition (or answers with another ETag
        or size, for a store that ignores it): a :class:`Retry` of the whole
        download. A cut or failing range is resumed alone, up to the retries.
        """
        obstore = import_obstore()
        failures = (obstore.exceptions.BaseError, OSError, ValueError, TypeError)
        pos = start
        resumes = 0
        while True:
            options: dict[str, Any] = {"range": (pos, end)}
            if first.etag is not None:
                options["if_match"] = first.etag
            try:
                result = await _get(self._store, self._path, options)
                meta = result.meta
                if int(meta["size"]) != first.total or not same_etag(first.etag, meta.get("e_tag")):
                    raise Retry(
                        NetworkError(
                            f"{self._handle}: {self.url} changed during the download (another "
                            "ETag or size); starting again rather than splicing two versions",
                            handle=self._handle,
                            url=self.url,
                        )
                    )
                if tuple(result.range) != (pos, end):
                    raise RangesRefused(
                        NetworkError(
                            f"{self._handle}: {self.url} answered bytes {tuple(result.range)} "
                            f"to a request for {(pos, end)}; starting again with one connection",
                            handle=self._handle,
                            url=self.url,
                        )
                    )
                chunks = result.stream(min_chunk_size=self._chunk_size)
                while (chunk := await _next(chunks)) is not None:
                    chunk = chunk[: end - pos]
                    pos += len(chunk)
                    transfer.received += len(chunk)
                    yield chunk
                    if pos >= end:
                        return
                raise OSError(f"connection closed: the range ended at byte {pos:,} of {end:,}")
            except failures as exc:
                failure = classify(exc, handle=self._handle, url=self.url, received=pos)
                if _is_timeout(exc):
                    _stall(transfer, self._timeouts, self._handle, self.url, exc)
                if isinstance(exc, obstore.exceptions.PreconditionError):
                    raise Retry(failure.error) from exc  # another version: start again
                if not failure.retry:
                    raise failure.error from exc
                if resumes >= self._retries.total:
                    raise Retry(failure.error) from exc
                resumes += 1
                on_resume(failure.error)
                await anyio.sleep(retry_delay(resumes - 1, self._retries))

    def _check_listed(self, meta: Mapping[str, Any]) -> None:
        """Refuse an answer that is not the listed object (a store that ignored If-Match)."""
        assert self._listed is not None
        listed = self._listed
        now_size, now_etag = int(meta["size"]), _etag(meta.get("e_tag"))
        if now_size != listed.size or not same_etag(listed.etag, now_etag):
            raise Retry(
                self._changed(
                    f"listed: {listed.size:,} bytes, ETag {listed.etag}; "
                    f"now: {now_size:,} bytes, ETag {now_etag}"
                )
            )

    def _changed(self, detail: str) -> HubError:
        return HTTPStatusError(
            f"{self._handle}: {self.url} changed after the prefix was listed ({detail}); "
            "a prefix is copied from one listing, so this copy is dropped and a retry "
            "lists the prefix again",
            handle=self._handle,
            url=self.url,
            status=412,
        )

    def _changed_by(self, exc: BaseException) -> HubError | None:
        """The error for a listed object that a GET found replaced (412) or deleted (404)."""
        errors = import_obstore().exceptions
        assert self._listed is not None
        if isinstance(exc, errors.PreconditionError):
            return self._changed(f"its ETag is no longer {self._listed.etag}")
        if isinstance(exc, FileNotFoundError):
            return HTTPStatusError(
                f"{self._handle}: {self.url}: no such object (404): it was deleted after the "
                f"prefix was listed; a retry lists the prefix again ({describe(exc)})",
                handle=self._handle,
                url=self.url,
                status=404,
            )
        return None


def _stall(
    transfer: Transfer, timeouts: Timeouts, handle: str, url: str, exc: BaseException
) -> None:
    """Count a read that timed out against the download's stall budget; past it, give up."""
    total = transfer.stall(timeouts.read)
    if total >= timeouts.stalled:
        raise NetworkError(
            f"{handle}: {url} stalled for {total:g}s in all; giving up. Raise "
            "timeout=Timeouts(stalled=...) for a very slow store",
            handle=handle,
            url=url,
        ) from exc


class ObjectPrefix:
    """A prefix holding an unpacked module: list it once, then fetch its objects as listed."""

    def __init__(
        self,
        stores: ObjectStores,
        url: str,
        *,
        handle: str,
        retries: Retries,
        timeouts: Timeouts,
        chunk_size: int,
    ) -> None:
        self._stores = stores
        scheme, bucket, self._prefix = split_object_url(url)
        self._scheme, self._bucket = scheme, bucket
        self.url = url
        self.where = url
        self._handle = handle
        self._retries = retries
        self._timeouts = timeouts
        self._chunk_size = chunk_size

    async def snapshot(self, transfer: Transfer) -> Snapshot:
        """:meth:`list`, with a listing that timed out counted in ``transfer``'s stall budget."""
        try:
            return await self.list()
        except Retry as retry:
            cause = retry.__cause__
            if cause is not None and _is_timeout(cause):
                _stall(transfer, self._timeouts, self._handle, self.url, cause)
            raise

    async def list(self) -> Snapshot:
        """Every object below the prefix (relative path, size, ETag), and its marked dirs."""
        obstore = import_obstore()
        store = self._stores.get(self._scheme, self._bucket)
        try:
            listing = await _list(store, self._prefix)
            files, dirs, undecided = split_listing(self._prefix, listing)
            for rel, listed in undecided.items():
                try:
                    await _head(store, listed.key)
                except FileNotFoundError:
                    dirs.add(rel)  # only ``<key>/`` exists: an empty folder's marker
                else:
                    files[rel] = listed
        except (obstore.exceptions.BaseError, OSError, ValueError, TypeError) as exc:
            failure = classify(exc, handle=self._handle, url=self.url, received=0)
            if "no bucket named" in str(exc) or "NoSuchBucket" in str(exc):
                failure = _Failure(
                    HTTPStatusError(
                        f"{self._handle}: {self.url}: no such bucket; check the bucket's name "
                        f"and the endpoint ({describe(exc)})",
                        handle=self._handle,
                        url=self.url,
                        status=404,
                    ),
                    retry=False,
                )
            if failure.retry:
                raise Retry(failure.error) from exc
            raise failure.error from exc
        if not files:
            raise HTTPStatusError(
                f"{self._handle}: no objects under {self.url} (404); check the handle: an "
                "unpacked module's prefix holds saved_model.pb",
                handle=self._handle,
                url=self.url,
                status=404,
            )
        return Snapshot(files=files, dirs=frozenset(dirs))

    def object(self, listed: Listed) -> ObjectSource:
        """The source of one listed object: read only as listed."""
        return ObjectSource(
            self._stores,
            f"{self._scheme}://{self._bucket}/{listed.key}",
            handle=self._handle,
            retries=self._retries,
            timeouts=self._timeouts,
            chunk_size=self._chunk_size,
            listed=listed,
        )
