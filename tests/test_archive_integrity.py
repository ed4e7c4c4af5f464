"""Archive integrity: a cut archive is TruncatedArchiveError, clashing members are
refused before they touch the disk, and the manifest carries the archive's sha256."""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import shutil
import subprocess
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from asynchub import _archive
from asynchub._archive import Manifest, check_conflict
from asynchub._pack import pack
from asynchub.errors import ArchiveError, TruncatedArchiveError, UnsafeArchiveError
from tests._archives import make_module, tar_bytes, tree

BLOCK = 512


def _pull_from(data: bytes, size: int | Callable[[], int] = 1000) -> Callable[[], bytes]:
    """A ``pull`` handing out ``data`` in pieces of ``size`` (a number, or drawn per piece)."""
    view = memoryview(data)
    pos = 0

    def pull() -> bytes:
        nonlocal pos
        n = size() if callable(size) else size
        piece = bytes(view[pos : pos + n])
        pos += len(piece)
        return piece

    return pull


def _dest(tmp_path: Path) -> Iterator[Path]:
    """Fresh, empty destination dirs below tmp_path."""
    n = 0
    while True:
        n += 1
        d = tmp_path / f"dest{n}"
        d.mkdir()
        yield d


def _extract(data: bytes, dest: Path, size: int = 1000) -> Manifest:
    return _archive.extract(_pull_from(data, size), dest, limit=10**9)


def _members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        return tar.getmembers()


def _end_marker(plain: bytes) -> int:
    """The offset of a plain tar's first end-of-archive block."""
    last = _members(plain)[-1]
    end = last.offset_data + -(-last.size // BLOCK) * BLOCK
    assert plain[end : end + 2 * BLOCK] == bytes(2 * BLOCK)
    return end


def _hand_tar(*members: tuple[str, bytes | None], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    """A plain tar of (name, data) members; data None makes a directory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def small(tmp_path: Path) -> Path:
    """A small module: a few files and dirs, one weights file of several blocks."""
    return make_module(tmp_path / "src", weights=5000)


def _extended_tar(fmt: int) -> bytes:
    """A plain tar whose members need extended headers: a long name, a non-ASCII name."""
    long = "variables/" + "d" * 90 + "/" + "n" * 120
    return _hand_tar(
        ("saved_model.pb", b"pb" * 300),
        (long, b"w" * 1500),
        ("assets/vöcab-ü.txt", b"a\nb\n"),
        fmt=fmt,
    )


# -- 1. a tar must reach its end-of-archive block ---------------------------------


def test_truncated_is_an_archive_error() -> None:
    assert issubclass(TruncatedArchiveError, ArchiveError)
    assert not issubclass(TruncatedArchiveError, UnsafeArchiveError)


def test_plain_tar_cut_at_every_block_boundary(small: Path, tmp_path: Path) -> None:
    plain = tar_bytes(small, gz=False)
    end = _end_marker(plain)
    dests = _dest(tmp_path)
    for cut in range(BLOCK, end + 1, BLOCK):
        with pytest.raises(TruncatedArchiveError, match="truncated"):
            _extract(plain[:cut], next(dests))
    # From one end block on the archive is whole: some writers write only one.
    for cut in range(end + BLOCK, len(plain) + 1, BLOCK):
        _extract(plain[:cut], dest := next(dests))
        assert tree(dest) == tree(small)


def test_gzip_of_a_tar_cut_at_every_block_boundary(small: Path, tmp_path: Path) -> None:
    # A complete gzip stream around a cut tar: only the tar layer can tell.
    plain = tar_bytes(small, gz=False)
    dests = _dest(tmp_path)
    for cut in range(0, _end_marker(plain) + 1, BLOCK):
        with pytest.raises(TruncatedArchiveError, match="truncated"):
            _extract(gzip.compress(plain[:cut]), next(dests))


def test_gzip_stream_cut_anywhere(small: Path, tmp_path: Path) -> None:
    gz = tar_bytes(small)
    cuts = [*range(BLOCK, len(gz), BLOCK), *range(len(gz) - 9, len(gz))]
    dests = _dest(tmp_path)
    for cut in cuts:
        with pytest.raises(TruncatedArchiveError, match="gzip stream ends early"):
            _extract(gz[:cut], next(dests))


def test_plain_tar_cut_at_every_byte(tmp_path: Path) -> None:
    plain = _hand_tar(("a", b"x" * 700), ("d", None), ("d/b", b""), ("d/c", b"y" * 1024))
    dests = _dest(tmp_path)
    for cut in range(BLOCK, _end_marker(plain) + BLOCK):
        with pytest.raises(TruncatedArchiveError):
            _extract(plain[:cut], next(dests), size=333)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_cut_inside_extended_headers(tmp_path: Path, fmt: int) -> None:
    plain = _extended_tar(fmt)
    dests = _dest(tmp_path)
    _extract(plain, next(dests))
    for cut in range(BLOCK, _end_marker(plain) + BLOCK, 37):
        with pytest.raises(TruncatedArchiveError):
            _extract(plain[:cut], next(dests))
        with pytest.raises(TruncatedArchiveError):
            _extract(gzip.compress(plain[:cut]), next(dests))


def test_member_data_cut(small: Path, tmp_path: Path) -> None:
    plain = tar_bytes(small, gz=False)
    weights = next(m for m in _members(plain) if m.name.endswith("00001"))
    dests = _dest(tmp_path)
    for cut in (weights.offset_data, weights.offset_data + 1, weights.offset_data + 4999):
        for data in (plain[:cut], gzip.compress(plain[:cut])):
            with pytest.raises(TruncatedArchiveError, match="truncated"):
                _extract(data, next(dests), size=4096)


@pytest.mark.parametrize(
    "fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=str
)
@pytest.mark.parametrize("gz", [False, True], ids=["tar", "gz"])
def test_complete_python_tarfile_archives(small: Path, tmp_path: Path, fmt: int, gz: bool) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w", format=fmt) as tar:
        tar.add(small, arcname=".")
    dest = tmp_path / "dest"
    dest.mkdir()
    _extract(buf.getvalue(), dest)
    assert tree(dest) == tree(small)
    if fmt == tarfile.USTAR_FORMAT:
        return  # no long names in ustar
    for data in (_extended_tar(fmt), gzip.compress(_extended_tar(fmt))):
        dest = tmp_path / f"ext-{len(data)}"
        dest.mkdir()
        manifest = _extract(data, dest)
        assert manifest.files["assets/vöcab-ü.txt"] == 4


@pytest.mark.skipif(shutil.which("tar") is None, reason="no tar command")
@pytest.mark.parametrize("fmt", ["gnu", "posix", "ustar", "v7"])
@pytest.mark.parametrize("flags", ["-cf", "-czf"])
def test_complete_tar_cli_archives(small: Path, tmp_path: Path, fmt: str, flags: str) -> None:
    archive = tmp_path / "m.tar"
    subprocess.run(
        ["tar", f"--format={fmt}", flags, str(archive), "-C", str(small), "."],
        check=True,
        capture_output=True,
    )
    data = archive.read_bytes()
    dest = tmp_path / "dest"
    dest.mkdir()
    manifest = _extract(data, dest, size=8192)
    assert tree(dest) == tree(small)
    assert manifest.compressed == (flags == "-czf")
    assert manifest.archive_bytes == len(data)


def test_complete_pack_archive(small: Path, tmp_path: Path) -> None:
    data = pack(small, tmp_path / "m.tar.gz").read_bytes()
    dest = tmp_path / "dest"
    dest.mkdir()
    manifest = _extract(data, dest)
    assert tree(dest) == tree(small)
    assert manifest.sha256 == hashlib.sha256(data).hexdigest()


def test_one_end_block_without_record_padding_is_complete(tmp_path: Path) -> None:
    plain = _hand_tar(("a", b"x" * 10))
    dest = tmp_path / "dest"
    dest.mkdir()
    assert _extract(plain[: _end_marker(plain) + BLOCK], dest).files == {"a": 10}


def test_empty_gzipped_tar_is_complete(tmp_path: Path) -> None:
    assert _extract(gzip.compress(bytes(2 * BLOCK)), tmp_path).files == {}


def _is_plain(exc: pytest.ExceptionInfo[ArchiveError]) -> bool:
    return not isinstance(exc.value, (TruncatedArchiveError, UnsafeArchiveError))


def test_corrupt_but_complete_is_a_plain_archive_error(small: Path, tmp_path: Path) -> None:
    plain = tar_bytes(small, gz=False)
    dests = _dest(tmp_path)
    # A member header with a bad checksum in the middle of the archive.
    second = _members(plain)[1].offset
    bad = bytearray(plain)
    bad[second + 10] ^= 0xFF
    for data in (bytes(bad), gzip.compress(bad)):
        with pytest.raises(ArchiveError, match="corrupt tar archive") as info:
            _extract(data, next(dests))
        assert _is_plain(info)
    # Garbage where the end-of-archive block should be.
    end = _end_marker(plain)
    junk = plain[:end] + random.Random(0).randbytes(BLOCK) + bytes(BLOCK)
    with pytest.raises(ArchiveError, match="corrupt tar archive") as info:
        _extract(junk, next(dests))
    assert _is_plain(info)
    # A tar header at offset 0 that is whole but wrong.
    with pytest.raises(ArchiveError, match="corrupt tar archive") as info:
        _extract(gzip.compress(b"x" * 2 * BLOCK), next(dests))
    assert _is_plain(info)


def _backend_or_skip(name: str) -> str:
    try:
        _archive.gzip_backend(name)
    except ImportError:
        pytest.skip(f"gzip back-end {name} is not installed")
    return name


@pytest.mark.parametrize("backend", _archive.GZIP_BACKENDS)
def test_corrupt_gzip_is_the_same_error_with_every_backend(tmp_path: Path, backend: str) -> None:
    # zlib's error raised inside tarfile came out as a tar ReadError, isal's did not.
    _backend_or_skip(backend)
    # Stored deflate blocks: byte 11 is the first block's LEN, which must match NLEN.
    gz = gzip.compress(_hand_tar(("a", b"x" * 5000)), compresslevel=0, mtime=0)
    dests = _dest(tmp_path)
    # The first block's length, the trailer's CRC, and the trailer's length.
    for pos in (11, len(gz) - 8, len(gz) - 1):
        broken = bytearray(gz)
        broken[pos] ^= 0x01
        with pytest.raises(ArchiveError, match="corrupt gzip data") as info:
            _archive.extract(_pull_from(bytes(broken)), next(dests), limit=10**9, backend=backend)
        assert _is_plain(info)


def test_existing_messages_are_kept(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="not a tar archive") as info:
        _archive.extract(
            _pull_from(b"<html>" + b" " * 600), tmp_path, limit=10, content_type="text/html"
        )
    assert _is_plain(info)
    with pytest.raises(ArchiveError, match="trailing garbage") as info:
        _extract(gzip.compress(_hand_tar(("a", b"x"))) + b"junk", tmp_path)
    assert _is_plain(info)


@pytest.mark.parametrize("backend", _archive.GZIP_BACKENDS)
@pytest.mark.parametrize("size", [1, 2, 3, 100, 10**9])
def test_gzip_members_and_padding_across_chunks(
    small: Path, tmp_path: Path, backend: str, size: int
) -> None:
    # Zero padding that arrives with the end of the gzip stream once looped forever.
    _backend_or_skip(backend)
    plain = tar_bytes(small, gz=False)
    half = len(plain) // 2
    whole = gzip.compress(plain[:half]) + gzip.compress(plain[half:])
    dests = _dest(tmp_path)
    for data in (whole, whole + bytes(1), whole + bytes(5000)):
        dest = next(dests)
        manifest = _archive.extract(_pull_from(data, size), dest, limit=10**9, backend=backend)
        assert tree(dest) == tree(small)
        assert manifest.archive_bytes == len(data)
    for junk in (b"\x1f", b"junk", bytes(700) + b"\x1f\x8b"):
        with pytest.raises(ArchiveError, match="trailing garbage") as info:
            _archive.extract(_pull_from(whole + junk, size), next(dests), limit=10**9)
        assert _is_plain(info)


# -- 2. member conflicts ----------------------------------------------------------


@pytest.mark.parametrize(
    ("rel", "is_dir", "files", "dirs", "names"),
    [
        ("a", True, {"a"}, {}, ["'a'"]),
        ("a", False, set(), {"a": "a"}, ["'a'"]),
        ("a", False, set(), {"a": "a/b/c", "a/b": "a/b/c"}, ["'a'", "'a/b/c'"]),
        ("a/b", False, {"a"}, {}, ["'a/b'", "'a'"]),
        ("a/b", True, {"a"}, {}, ["'a/b'", "'a'"]),
        ("a/b/c/d", False, {"a/b"}, {"a": "a/b"}, ["'a/b/c/d'", "'a/b'"]),
        ("a/b", False, set(), {"a": "a/x", "a/b": "a/b/y"}, ["'a/b'", "'a/b/y'"]),
    ],
)
def test_check_conflict_refuses(
    rel: str, is_dir: bool, files: set[str], dirs: dict[str, str], names: list[str]
) -> None:
    with pytest.raises(UnsafeArchiveError) as info:
        check_conflict(rel, is_dir=is_dir, files=files, dirs=dirs)
    for name in names:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("rel", "is_dir", "files", "dirs"),
    [
        ("a", False, {"a"}, {}),  # a repeated file: the later one wins
        ("a", True, set(), {"a": "a"}),  # a repeated directory
        ("a", True, set(), {"a": "a/b"}),  # made explicit after being implied
        ("a/c", False, {"a/b"}, {"a": "a/b"}),
        ("ab", False, {"a"}, {}),  # a prefix is not a parent
        ("a/b", False, {"a/bc", "b"}, {"a": "a/bc"}),
        ("x/y/z", False, set(), {}),
    ],
)
def test_check_conflict_allows(
    rel: str, is_dir: bool, files: set[str], dirs: dict[str, str]
) -> None:
    check_conflict(rel, is_dir=is_dir, files=files, dirs=dirs)


@pytest.mark.parametrize(
    ("members", "files", "dirs"),
    [
        ([("a/", None), ("a", b"file")], {}, {"a"}),
        ([("a", b"file"), ("a/b", b"below")], {"a": b"file"}, set()),
        ([("a", b"file"), ("a/", None)], {"a": b"file"}, set()),
        ([("a", b"file"), ("a/b/", None)], {"a": b"file"}, set()),
        ([("a/b/c", b"deep"), ("a", b"file")], {"a/b/c": b"deep"}, {"a", "a/b"}),
        ([("a/b/c", b"deep"), ("./a/b", b"file")], {"a/b/c": b"deep"}, {"a", "a/b"}),
        ([("./a", b"file"), ("a/b", b"x")], {"a": b"file"}, set()),
        ([("a", b"file"), ("x", b"ok"), ("a/b/c/d", b"x")], {"a": b"file", "x": b"ok"}, set()),
    ],
)
@pytest.mark.parametrize("gz", [False, True], ids=["tar", "gz"])
def test_extract_refuses_conflicts(
    tmp_path: Path,
    members: list[tuple[str, bytes | None]],
    files: dict[str, bytes],
    dirs: set[str],
    gz: bool,
) -> None:
    plain = _hand_tar(*members)
    with pytest.raises(UnsafeArchiveError, match=r"clashes|lies below") as info:
        _extract(gzip.compress(plain) if gz else plain, tmp_path)
    assert not isinstance(info.value.__cause__, OSError)
    # What earlier members wrote is as they wrote it: nothing of the refused one landed.
    assert tree(tmp_path) == files
    assert {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_dir()} == dirs


def test_extract_repeated_file_later_wins(tmp_path: Path) -> None:
    plain = _hand_tar(("d/", None), ("d/a", b"first, longer"), ("d/", None), ("./d/a", b"2nd"))
    manifest = _extract(plain, tmp_path)
    assert (tmp_path / "d" / "a").read_bytes() == b"2nd"
    assert manifest.files == {"d/a": 3}
    assert manifest.total_bytes == 3
    assert manifest.dirs == {"d"}


def test_extract_implied_then_explicit_directory(tmp_path: Path) -> None:
    plain = _hand_tar(("x/y/z", b"z"), ("x/", None), ("x/y/", None), ("x/w", b"w"))
    manifest = _extract(plain, tmp_path)
    assert tree(tmp_path) == {"x/y/z": b"z", "x/w": b"w"}
    assert manifest.dirs == {"x", "x/y"}


# -- 3. the archive's sha256 and byte count -----------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["tar", "gz"])
@pytest.mark.parametrize("size", [1, 7, 511, 512, 4096, 65_536, 10**9, "random"])
def test_manifest_hashes_the_archive_as_pulled(
    small: Path, tmp_path: Path, gz: bool, size: int | str
) -> None:
    data = tar_bytes(small, gz=gz)
    if gz:
        data += bytes(3000)  # zero padding after the gzip stream counts too
    rng = random.Random(0)
    chunk: int | Callable[[], int] = (
        (lambda: rng.choice([1, 13, 512, 1000, 70_000])) if size == "random" else int(size)
    )
    dest = tmp_path / "dest"
    dest.mkdir()
    manifest = _archive.extract(_pull_from(data, chunk), dest, limit=10**9)
    assert tree(dest) == tree(small)
    assert manifest.sha256 == hashlib.sha256(data).hexdigest()
    assert manifest.archive_bytes == len(data)
    assert manifest.compressed == gz


def test_manifest_hash_counts_bytes_after_the_end_block(small: Path, tmp_path: Path) -> None:
    # Bytes after the tar's end (more zero records, or anything) are drained and hashed.
    data = tar_bytes(small, gz=False) + bytes(20 * BLOCK) + b"trailer"
    dest = tmp_path / "dest"
    dest.mkdir()
    manifest = _extract(data, dest, size=777)
    assert manifest.archive_bytes == len(data)
    assert manifest.sha256 == hashlib.sha256(data).hexdigest()


def test_manifest_defaults() -> None:
    manifest = Manifest()
    assert (manifest.sha256, manifest.archive_bytes) == ("", 0)


# -- tar formats through the forward-only reader (_archive._Forward) ---------------------


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_long_names_pax_records_and_odd_sizes_extract_in_every_format(
    fmt: int, tmp_path: Path
) -> None:
    # Long names are extra header members (GNU ././@LongLink, pax records) that
    # tarfile reads ahead of their member; sizes off the 512-byte grid leave
    # padding to skip; an empty file has no data block at all.
    deep = "/".join(["d" * 40] * 3) if fmt != tarfile.USTAR_FORMAT else "dir/sub"
    files = {
        "saved_model.pb": b"\x08\x01" * 7,
        f"{deep}/weights.bin": bytes(range(256)) * 1001,
        "variables/empty": b"",
        "variables/variables.index": b"i" * 511,
        "variables/variables.data-00000-of-00001": b"w" * 513,
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if fmt == tarfile.PAX_FORMAT:
                info.pax_headers = {"comment": "x" * 300}
            tar.addfile(info, io.BytesIO(data))
    dests = _dest(tmp_path)
    for data in (buf.getvalue(), gzip.compress(buf.getvalue())):
        dest = next(dests)
        manifest = _extract(data, dest, size=1 << 20)
        assert {rel: (dest / rel).read_bytes() for rel in files} == files
        assert manifest.files == {rel: len(b) for rel, b in files.items()}


def test_a_tar_that_seeks_back_is_refused_not_reread(small: Path) -> None:
    plain = tar_bytes(small, gz=False)
    source = _archive._Inflater(iter([plain, b""]).__next__, zlib, None)
    forward = _archive._Forward(source)
    forward.seek(1024)
    assert forward.tell() == 1024
    with pytest.raises(ArchiveError, match="go back"):
        forward.seek(512)
    source.close()
