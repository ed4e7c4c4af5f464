"""http(s) archives as a source: streaming, redirects, Range resume, origin-scoped headers."""

from __future__ import annotations

import base64
import binascii
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import cast

import anyio
import httpx

from .._config import Retries, Timeouts
from .._retry import is_retryable_status, parse_retry_after, retry_delay
from ..errors import HTTPStatusError, NetworkError
from .base import OnResume, Retry, Transfer

__all__ = ["HttpSource", "Validators", "origin", "resume_ok", "server_md5"]

MAX_REDIRECTS = 20


def origin(url: httpx.URL | str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port made explicit."""
    u = httpx.URL(url)
    port = u.port or {"http": 80, "https": 443}.get(u.scheme)
    return (u.scheme, u.host, port)


@dataclass(frozen=True)
class Validators:
    """What identifies the bytes of a first (200) response, to check a resume against."""

    etag: str | None = None  #: a strong ETag
    last_modified: str | None = None
    total: int | None = None  #: Content-Length
    ranges: bool = False  #: Accept-Ranges: bytes

    @classmethod
    def of(cls, headers: Mapping[str, str]) -> Validators:
        etag = headers.get("etag")
        length = headers.get("content-length")
        return cls(
            etag=etag if etag and not etag.startswith("W/") else None,
            last_modified=headers.get("last-modified"),
            total=int(length) if length and length.isdigit() else None,
            ranges=headers.get("accept-ranges", "").strip().lower() == "bytes",
        )

    @property
    def if_range(self) -> str | None:
        return self.etag or self.last_modified

    @property
    def resumable(self) -> bool:
        """A cut body may be resumed only if a resume can be proved to be the same bytes."""
        return self.ranges and self.if_range is not None and self.total is not None


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

    def headers_for(self, url: httpx.URL) -> dict[str, str]:
        """The request headers for ``url``: configured ones only on the handle's own origin."""
        headers = {"Accept-Encoding": "identity"}
        if origin(url) == self._origin:
            headers.update(self._headers)
        return headers

    async def _open(self, extra: Mapping[str, str]) -> httpx.Response:
        """Send the GET, following redirects by hand so headers stay on their origin."""
        url = httpx.URL(self.url)
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

    async def stream(self, transfer: Transfer, on_resume: OnResume) -> AsyncIterator[bytes]:
        first = Validators()
        resumes = 0
        while True:
            extra: dict[str, str] = {}
            if transfer.received:
                extra["Range"] = f"bytes={transfer.received}-"
                if first.if_range:
                    extra["If-Range"] = first.if_range
            pending: list[bytes] = []
            try:
                response = await self._open(extra)
                try:
                    if transfer.received == 0:
                        self._check_status(response)
                        first = Validators.of(response.headers)
                        transfer.content_type = response.headers.get("content-type")
                        transfer.total = first.total
                        transfer.md5 = server_md5(response.headers)
                    elif not resume_ok(
                        first, response.status_code, response.headers, transfer.received
                    ):
                        raise Retry(
                            NetworkError(
                                f"{self._handle}: the connection to {self.url} was cut after "
                                f"{transfer.received:,} bytes and the server would not resume "
                                "the same bytes (no 206 with the first response's validator "
                                "and length); starting again",
                                handle=self._handle,
                                url=self.url,
                            )
                        )
                    raw = cast("AsyncGenerator[bytes, None]", response.aiter_raw())
                    size = 0
                    async with aclosing(raw) as body:
                        async for chunk in body:
                            pending.append(chunk)
                            size += len(chunk)
                            # ~64 KiB network reads joined into ~chunk_size pieces: each
                            # piece costs a hand-off to the extraction thread.
                            if size >= self._chunk_size:
                                yield self._take(pending, transfer)
                                size = 0
                finally:
                    await response.aclose()
                if pending:
                    yield self._take(pending, transfer)
                return
            except (httpx.TransportError, httpx.StreamError) as exc:
                error = self._network_error(exc, transfer.received)
                if isinstance(exc, httpx.TimeoutException):
                    waited = (
                        self._timeouts.connect
                        if isinstance(exc, httpx.ConnectTimeout)
                        else self._timeouts.read
                    )
                    transfer.stalled += waited
                    if transfer.stalled >= self._timeouts.stalled:
                        raise NetworkError(
                            f"{self._handle}: {self.url} stalled for {transfer.stalled:g}s in "
                            f"all (no bytes for {waited:g}s at a time); giving up. Raise "
                            "timeout=Timeouts(stalled=...) for a very slow server",
                            handle=self._handle,
                            url=self.url,
                        ) from exc
                # Bytes that arrived before the cut are good: pass them on first, so
                # the resume starts exactly where they end.
                if pending:
                    yield self._take(pending, transfer)
                mid_body = transfer.received > 0 and isinstance(
                    exc, (httpx.ReadError, httpx.ReadTimeout, httpx.RemoteProtocolError)
                )
                if mid_body and first.resumable and resumes < self._retries.total:
                    resumes += 1
                    on_resume(error)
                    await anyio.sleep(retry_delay(resumes - 1, self._retries))
                    continue
                raise Retry(error) from exc

    @staticmethod
    def _take(pending: list[bytes], transfer: Transfer) -> bytes:
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        transfer.received += len(data)
        return data

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
