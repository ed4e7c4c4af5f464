"""http(s) archives as a source: streaming, redirects, Range resume, origin-scoped headers."""

from __future__ import annotations

import base64
import binascii
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing
from typing import Literal, cast

import anyio
import httpx

from .._config import Retries, Timeouts
from .._retry import is_retryable_status, parse_retry_after, retry_delay
from ..errors import HTTPStatusError, HubError, NetworkError
from .base import OnResume, RangesRefused, Retry, Split, Transfer, Validators

__all__ = [
    "HttpSource",
    "Validators",
    "origin",
    "range_answer",
    "resume_ok",
    "server_md5",
]

MAX_REDIRECTS = 20


def origin(url: httpx.URL | str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port made explicit."""
    u = httpx.URL(url)
    port = u.port or {"http": 80, "https": 443}.get(u.scheme)
    return (u.scheme, u.host, port)


def resume_ok(first: Validators, status: int, headers: Mapping[str, str], offset: int) -> bool:
    """Whether a response to ``Range: bytes=offset-`` continues the first response's bytes.

    It must be a 206 for exactly that offset, with the first response's total
    length and validator (a server that ignores If-Range and sends a newer
    version's bytes must not be spliced onto the old one's).
    """
    if status != 206 or first.total is None:
        return False
    try:
        unit, spec = headers.get("content-range", "").split(" ", 1)
        span, total = spec.split("/", 1)
        start = int(span.split("-", 1)[0])
    except ValueError:
        return False
    if unit.lower() != "bytes" or start != offset or total.strip() != str(first.total):
        return False
    if first.etag is not None:
        return headers.get("etag") == first.etag
    return first.last_modified is not None and headers.get("last-modified") == first.last_modified


def range_answer(
    first: Validators, status: int, headers: Mapping[str, str], start: int, end: int
) -> Literal["ok", "changed", "ignored", "wrong"]:
    """What an answer to ``Range: bytes=start-(end-1)`` (with ``If-Range``) is.

    ``ok``: a 206 for exactly those bytes of the version ``first`` described
    (its validator and total length). ``changed``: another version (another
    validator or length; a server honouring If-Range answers a changed archive
    with a 200 of the new one). ``ignored``: a 200 of the same version: the
    server does not do ranges after all. ``wrong``: anything else (an error
    status, a 206 for other bytes).
    """
    etag = headers.get("etag")
    if first.etag is not None:
        same = etag == first.etag
    else:
        same = (
            first.last_modified is not None and headers.get("last-modified") == first.last_modified
        )
    if status == 200:
        length = headers.get("content-length")
        whole = length is not None and length.isdigit() and int(length) == first.total
        return "ignored" if same and whole else "changed"
    if status != 206:
        return "changed" if status == 412 else "wrong"
    try:
        unit, spec = headers.get("content-range", "").split(" ", 1)
        span, total = spec.split("/", 1)
        low, high = (int(x) for x in span.split("-", 1))
    except ValueError:
        return "wrong"
    if not same or total.strip() != str(first.total):
        return "changed"
    if unit.lower() != "bytes" or (low, high) != (start, end - 1):
        return "wrong"
    return "ok"


def server_md5(headers: Mapping[str, str]) -> bytes | None:
    """The MD5 a response vouches for its body with (``x-goog-hash: md5=``, ``Content-MD5``).

    None when there is none, or when it may describe other bytes than the body:
    a body sent with a Content-Encoding, or a GCS object stored compressed
    (``x-goog-stored-content-encoding``), which GCS may decompress on the way.
    """
    if headers.get("content-encoding", "identity").strip().lower() != "identity":
        return None
    stored = headers.get("x-goog-stored-content-encoding", "identity").strip().lower()
    values = []
    for part in headers.get("x-goog-hash", "").split(","):
        name, _, value = part.strip().partition("=")
        if name.lower() == "md5" and stored == "identity":
            values.append(value)
    if not values and "content-md5" in headers:
        values.append(headers["content-md5"])
    for value in values:
        try:
            digest = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(digest) == 16:
            return digest
    return None


class _RangeFailed(Exception):
    """A range's answer worth asking again (429, 5xx), after ``retry_after`` if given."""

    def __init__(self, error: HubError, retry_after: float | None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


def _take(pending: list[bytes], transfer: Transfer) -> bytes:
    data = pending[0] if len(pending) == 1 else b"".join(pending)
    pending.clear()
    transfer.received += len(data)
    return data


class HttpSource:
    retry_truncated = True

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        *,
        handle: str,
        headers: Mapping[str, str],
        timeouts: Timeouts,
        retries: Retries,
        chunk_size: int,
    ) -> None:
        self._client = client
        self.url = url
        self.where = url
        self._handle = handle
        self._headers = dict(headers)
        self._origin = origin(url)
        self._timeouts = timeouts
        self._retries = retries
        self._chunk_size = chunk_size
        #: Where the first answer came from, after redirects: ranges are asked there.
        self._answered_at: httpx.URL | None = None

    def headers_for(self, url: httpx.URL) -> dict[str, str]:
        """The request headers for ``url``: configured ones only on the handle's own origin."""
        headers = {"Accept-Encoding": "identity"}
        if origin(url) == self._origin:
            headers.update(self._headers)
        return headers

    async def _open(self, extra: Mapping[str, str], at: httpx.URL | None = None) -> httpx.Response:
        """Send the GET (to ``at``, else the handle's URL), following redirects by hand.

        Redirects are followed here, not by httpx, so that headers stay on their origin.
        """
        url = httpx.URL(self.url) if at is None else at
        for _ in range(MAX_REDIRECTS + 1):
            request = self._client.build_request(
                "GET", url, headers={**self.headers_for(url), **extra}
            )
            response = await self._client.send(request, stream=True, follow_redirects=False)
            if response.next_request is None:
                return response
            await response.aclose()
            url = response.next_request.url
        raise NetworkError(
            f"{self._handle}: more than {MAX_REDIRECTS} redirects from {self.url}",
            handle=self._handle,
            url=self.url,
        )

    async def stream(
        self, transfer: Transfer, on_resume: OnResume, split: Split | None = None
    ) -> AsyncIterator[bytes]:
        """Yield the archive from its first byte; with ``split``, stop where it says.

        ``split.first`` is set at the first answer (before its first byte is
        yielded) and ``split.on_first`` called; from then on, whenever
        ``split.end`` is set, the stream stops there and the rest is someone
        else's (:mod:`asynchub._fetch.ranged` fetches it as ranges).
        """
        first = Validators()
        answered = False
        pos = 0  # bytes yielded: where a resume starts
        resumes = 0
        while True:
            extra: dict[str, str] = {}
            if pos:
                extra["Range"] = f"bytes={pos}-"
                if first.if_range:
                    extra["If-Range"] = first.if_range
            pending: list[bytes] = []
            size = 0
            try:
                response = await self._open(extra)
                try:
                    if not answered:
                        self._check_status(response)
                        first = Validators.of(response.headers)
                        transfer.content_type = response.headers.get("content-type")
                        transfer.total = first.total
                        transfer.md5 = server_md5(response.headers)
                        answered = True
                        # Ranges go where the redirects ended, not through them again.
                        self._answered_at = response.url
                        if split is not None:
                            split.first = first
                            split.on_first(first)
                    elif not resume_ok(first, response.status_code, response.headers, pos):
                        raise Retry(
                            NetworkError(
                                f"{self._handle}: the connection to {self.url} was cut after "
                                f"{pos:,} bytes and the server would not resume "
                                "the same bytes (no 206 with the first response's validator "
                                "and length); starting again",
                                handle=self._handle,
                                url=self.url,
                            )
                        )
                    raw = cast("AsyncGenerator[bytes, None]", response.aiter_raw())
                    async with aclosing(raw) as body:
                        async for chunk in body:
                            end = None if split is None else split.end
                            if end is not None and pos + size + len(chunk) >= end:
                                # The rest is fetched as ranges: keep only ours.
                                pending.append(chunk)
                                ours = b"".join(pending)[: max(0, end - pos)]
                                pending[:] = [ours] if ours else []
                                break
                            pending.append(chunk)
                            size += len(chunk)
                            # ~64 KiB network reads joined into ~chunk_size pieces: each
                            # piece costs a hand-off to the extraction thread.
                            if size >= self._chunk_size:
                                data = _take(pending, transfer)
                                pos += len(data)
                                size = 0
                                yield data
                                if split is not None and split.end is not None and split.end <= pos:
                                    return
                finally:
                    await response.aclose()
                if pending:
                    yield _take(pending, transfer)
                return
            except (httpx.TransportError, httpx.StreamError) as exc:
                error = self._network_error(exc, pos)
                if isinstance(exc, httpx.TimeoutException):
                    self._stalled(exc, transfer)
                # Bytes that arrived before the cut are good: pass them on first, so
                # the resume starts exactly where they end.
                if pending:
                    data = _take(pending, transfer)
                    pos += len(data)
                    yield data
                mid_body = pos > 0 and isinstance(
                    exc, (httpx.ReadError, httpx.ReadTimeout, httpx.RemoteProtocolError)
                )
                if split is not None and split.end is not None and pos >= split.end:
                    return  # cut just as our part was done
                if mid_body and first.resumable and resumes < self._retries.total:
                    resumes += 1
                    on_resume(error)
                    await anyio.sleep(retry_delay(resumes - 1, self._retries))
                    continue
                raise Retry(error) from exc

    async def fetch_range(
        self, start: int, end: int, first: Validators, transfer: Transfer, on_resume: OnResume
    ) -> AsyncIterator[bytes]:
        """Yield bytes ``[start, end)`` of the archive ``first`` described, as ``Range`` GETs.

        Every answer must be a 206 for exactly the bytes asked, with the first
        answer's validator and length (:func:`range_answer`). A cut or failing
        range is resumed alone, from the byte it stopped at, up to the
        configured retries; another version is a :class:`Retry` of the whole
        download, a server that ignores ``Range`` a :class:`RangesRefused`:
        the bytes of two versions are never spliced.
        """
        pos = start
        resumes = 0
        while True:
            extra = {"Range": f"bytes={pos}-{end - 1}"}
            if first.if_range:
                extra["If-Range"] = first.if_range
            pending: list[bytes] = []
            size = 0
            try:
                response = await self._open(extra, self._answered_at)
                try:
                    self._check_range(response, first, pos, end)
                    raw = cast("AsyncGenerator[bytes, None]", response.aiter_raw())
                    async with aclosing(raw) as body:
                        async for chunk in body:
                            if pos + size + len(chunk) > end:
                                chunk = chunk[: end - pos - size]  # never past what was asked
                            pending.append(chunk)
                            size += len(chunk)
                            if size >= self._chunk_size:
                                data = _take(pending, transfer)
                                pos += len(data)
                                size = 0
                                yield data
                finally:
                    await response.aclose()
                if pending:
                    data = _take(pending, transfer)
                    pos += len(data)
                    yield data
                if pos >= end:
                    return
                raise httpx.RemoteProtocolError(f"the range ended at byte {pos:,} of {end:,}")
            except _RangeFailed as failed:
                error, retry_after = failed.error, failed.retry_after
            except (httpx.TransportError, httpx.StreamError) as exc:
                error, retry_after = self._network_error(exc, pos - start), None
                if isinstance(exc, httpx.TimeoutException):
                    self._stalled(exc, transfer)
                if pending:
                    data = _take(pending, transfer)
                    pos += len(data)
                    yield data
                if pos >= end:
                    return
            if resumes >= self._retries.total:
                raise Retry(error, retry_after)
            resumes += 1
            on_resume(error)
            await anyio.sleep(retry_delay(resumes - 1, self._retries, retry_after=retry_after))

    def _check_range(
        self, response: httpx.Response, first: Validators, start: int, end: int
    ) -> None:
        """Refuse an answer to ``Range: bytes=start-(end-1)`` that is not exactly those bytes."""
        status = response.status_code
        verdict = range_answer(first, status, response.headers, start, end)
        if verdict == "ok":
            return
        asked = f"bytes {start:,}-{end - 1:,}"
        if verdict == "changed":
            raise Retry(
                NetworkError(
                    f"{self._handle}: {self.url} changed during the download (asked for "
                    f"{asked} of the version first answered, got another version's); "
                    "starting again rather than splicing two versions",
                    handle=self._handle,
                    url=self.url,
                )
            )
        if verdict == "ignored":
            raise RangesRefused(
                NetworkError(
                    f"{self._handle}: {self.url} answered {status} to a Range request "
                    f"({asked}); starting again with one connection",
                    handle=self._handle,
                    url=self.url,
                )
            )
        if not 200 <= status < 300:
            try:
                self._check_status(response)
            except Retry as retry:  # 429, 5xx: this range again, after a wait
                raise _RangeFailed(retry.error, retry.retry_after) from None
            except HTTPStatusError as error:
                if str(response.url) == self.url:
                    raise
                # Refused where a redirect led (a signed URL that expired, say):
                # the whole download again, from the handle's own URL.
                raise Retry(error) from None
        raise Retry(
            NetworkError(
                f"{self._handle}: {self.url} answered {status} "
                f"{response.headers.get('content-range', '(no Content-Range)')} to a "
                f"request for {asked}; starting again",
                handle=self._handle,
                url=self.url,
            )
        )

    def _stalled(self, exc: httpx.TimeoutException, transfer: Transfer) -> None:
        """Count a timed-out wait against the download's stall budget; past it, give up."""
        waited = (
            self._timeouts.connect if isinstance(exc, httpx.ConnectTimeout) else self._timeouts.read
        )
        # Ranges stalled at the same time count once (Transfer.stall).
        stalled = transfer.stall(waited)
        if stalled >= self._timeouts.stalled:
            raise NetworkError(
                f"{self._handle}: {self.url} stalled for {stalled:g}s in "
                f"all (no bytes for {waited:g}s at a time); giving up. Raise "
                "timeout=Timeouts(stalled=...) for a very slow server",
                handle=self._handle,
                url=self.url,
            ) from exc

    def _check_status(self, response: httpx.Response) -> None:
        status = response.status_code
        if 200 <= status < 300 and status not in (204, 206):
            return
        url = str(response.url)
        reason = response.reason_phrase or ""
        if status == 404:
            advice = "check the handle: no module is published at that URL"
        elif status in (401, 403):
            advice = (
                "the server refused access; pass headers={'Authorization': ...} for private servers"
            )
        elif is_retryable_status(status):
            advice = "the server is failing or busy; try again later"
        else:
            advice = "the server did not return the archive"
        error = HTTPStatusError(
            f"{self._handle}: {url} answered {status} {reason}; {advice}",
            handle=self._handle,
            url=url,
            status=status,
        )
        if is_retryable_status(status):
            raise Retry(error, parse_retry_after(response.headers.get("retry-after")))
        raise error

    def _network_error(self, exc: Exception, received: int) -> NetworkError:
        if isinstance(exc, httpx.TimeoutException):
            what = "timed out"
        elif isinstance(exc, httpx.ConnectError):
            what = "could not connect"
        elif received:
            what = f"was cut after {received:,} bytes"
        else:
            what = "failed"
        detail = _detail(exc)
        return NetworkError(
            f"{self._handle}: the request to {self.url} {what} ({detail})",
            handle=self._handle,
            url=self.url,
        )


def _detail(exc: BaseException) -> str:
    """What went wrong, for a message: a TLS error anywhere in the chain, else the error's text.

    On trio a failed certificate check arrives as an httpx.ConnectError with no
    text, its ssl error two causes down.
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLError):
            return f"TLS: {cause}"
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__
