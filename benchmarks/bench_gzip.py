"""Gzip back-ends: stdlib zlib against ISA-L (``isal``) and zlib-ng on real archive bytes.

Three stages, each a ratio to zlib in the same round:

- inflate: ``decompressobj(wbits=31)`` over the archive in memory, 1 MiB at a time;
- extract: asynchub's ``extract(pull, dest, backend=...)`` from memory to disk
  (gunzip, tar parsing, member checks, file writes);
- resolve: ``AsyncHub.resolve`` of an http URL on 127.0.0.1, end to end. The hub
  has no option to pick a back-end yet, so the benchmark narrows
  ``asynchub._archive.GZIP_BACKENDS`` to the one measured (see README for the
  proposed ``gzip_backend=`` / ``ASYNCHUB_GZIP``).
"""

from __future__ import annotations

import contextlib
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path

from . import _harness as h
from ._work import MB, Section, Work, log, run_checked, static_server, tree_bytes
from .bench_resolve import asynchub_case

_CHUNK = 1024 * 1024


@contextlib.contextmanager
def forced_backend(name: str) -> Iterator[None]:
    """Make the hub's extractor use the gzip back-end ``name`` (and fail if it cannot)."""
    from asynchub import _archive

    saved = _archive.GZIP_BACKENDS
    _archive.GZIP_BACKENDS = (name,)
    try:
        if _archive.gzip_backend()[0] != name:
            raise RuntimeError(f"could not make the extractor use {name}")
        yield
    finally:
        _archive.GZIP_BACKENDS = saved


def _inflate_case(data: bytes, module: object, size: int) -> h.Measure:
    view = memoryview(data)

    def inflate() -> int:
        d = module.decompressobj(wbits=31)  # type: ignore[attr-defined]
        return sum(len(d.decompress(view[i : i + _CHUNK])) for i in range(0, len(view), _CHUNK))

    def check(out: int) -> None:
        if out != size:
            raise RuntimeError(f"inflated {out:,} bytes, expected {size:,}")

    return h.once(inflate, check=check)


def _extract_case(work: Work, chunks: list[bytes], backend: str, size: int) -> h.Measure:
    from asynchub._archive import extract

    dest = work.root / f"extract-{backend}"

    def run() -> object:
        # `chunks` ends with b"", and the extractor never pulls past the end.
        return extract(iter(chunks).__next__, dest, limit=2**40, backend=backend)

    def setup() -> None:
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()

    return h.once(run, setup=setup, check=lambda _: _check_tree(dest, size))


def _check_tree(dest: Path, size: int) -> None:
    if tree_bytes(dest) != size:
        raise RuntimeError(f"{dest} holds {tree_bytes(dest):,} bytes, expected {size:,}")


def _forced(measure: h.Measure, backend: str) -> h.Measure:
    def run() -> float:
        with forced_backend(backend):
            return measure()

    return run


def run(work: Work) -> list[Section]:
    from asynchub._archive import GZIP_BACKENDS, gzip_backend

    modules = {name: gzip_backend(name)[1] for name in GZIP_BACKENDS}  # ImportError: loud
    if work.quick:
        archives = {"random 24 MB": work.random_archive(24 * MB, seed=1)}
        rounds = 2
    else:
        archives = {
            "MobileNetV2": work.keras_archive("MobileNetV2"),
            "ResNet101": work.keras_archive("ResNet101"),
        }
        rounds = 5
    section = Section(
        title="Gzip back-ends",
        note=(
            "MB/s of module bytes (uncompressed tar for inflate, extracted files otherwise); "
            "ratio = speed ÷ stdlib zlib's in the same round, median [min, max]. Archives as "
            "`asynchub.pack` writes them (zlib level 6)."
        ),
        columns=["archive", "stage", "back-end", "MB/s", "ratio vs zlib", "rounds"],
    )
    for label, archive in archives.items():
        data = archive.read_bytes()
        dest = work.fresh_dir("gzip-reference")
        run_checked(["tar", "xzf", str(archive), "-C", str(dest)])
        size = tree_bytes(dest)
        tar_size = len(zlib.decompress(data, wbits=31))
        inflate = {b: _inflate_case(data, modules[b], tar_size) for b in GZIP_BACKENDS}
        _stage(section, label, "inflate", inflate, tar_size, rounds)
        # The archive as the network would hand it over, cut outside the timed region.
        chunks = [data[i : i + _CHUNK] for i in range(0, len(data), _CHUNK)] + [b""]
        extract = {b: _extract_case(work, chunks, b, size) for b in GZIP_BACKENDS}
        _stage(section, label, "extract", extract, size, max(2, rounds - 2))
    # End to end on the largest archive only: the network adds noise, not information.
    www = work.fresh_dir("www-gzip")
    (www / "m.tar.gz").hardlink_to(archive)
    with static_server(www) as base:
        url = [f"{base}/m.tar.gz"]
        resolve = {b: _forced(asynchub_case(work, url, 1, size), b) for b in GZIP_BACKENDS}
        _stage(section, label, "resolve", resolve, size, max(2, rounds - 2))
    shutil.rmtree(www)
    return [section]


def _stage(
    section: Section,
    label: str,
    stage: str,
    cases: dict[str, h.Measure],
    nbytes: int,
    rounds: int,
) -> None:
    log(f"gzip: {label} {stage}, {rounds} rounds")
    samples = h.interleave(cases, rounds=rounds)
    ratios = h.ratio_to(samples, "zlib")
    for backend, seconds in samples.items():
        mbps = h.Spread.of([nbytes / MB / s for s in seconds])
        section.rows.append(
            [label, stage, backend, mbps.fmt(0), ratios[backend].fmt(), str(rounds)]
        )
        section.data.setdefault(label, {}).setdefault(stage, {})[backend] = {
            "seconds": seconds,
            "mb_per_s": mbps.as_json(),
            "ratio": ratios[backend].as_json(),
        }
