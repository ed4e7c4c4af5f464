"""Fetching modules over HTTP: many at once, one big one, and a cache hit.

Archives are served by ``python -m http.server`` on 127.0.0.1, a static server
that ignores the ``tf-hub-format`` query. Every timed run starts from an empty
cache (made outside the timed region) and is checked afterwards: each module
dir must hold its ``saved_model.pb`` and the expected number of bytes.

- prefetch: N handles to the same real archive (Keras MobileNetV2 alpha 1.4, TF
  Hub's mobilenet_v2_140_224, random weights, exported and packed by asynchub)
  under N names, so each is a distinct handle and a distinct download.
  ``AsyncHub.prefetch`` at concurrency c against the shell's ``curl -s URL |
  tar xz`` run by ``xargs -P c`` (the baseline), and tensorflow_hub's
  ``hub.resolve`` one handle after another.
- single archive: Keras ResNet101 (random weights, ~160 MB), one resolve.
- cache hit: resolving a handle already in the cache, µs per call, in-process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import _harness as h
from ._work import MB, Section, Work, log, run_checked, static_server, tree_bytes

CURL = "curl | tar xz"
QUERY = "?tf-hub-format=compressed"
#: What one `xargs` job runs: fetch URL $1 into the new dir $2, failing on any error.
_FETCH = 'set -euo pipefail; mkdir -p "$2"; curl -sSf "$1" | tar xzf - -C "$2"'


def _serve_copies(work: Work, archive: Path, n: int) -> Path:
    """A web root holding ``archive`` under ``n`` names (hard links: one file, one page cache)."""
    www = work.fresh_dir(f"www-{archive.stem}-{n}")
    for i in range(n):
        target = www / f"m{i}.tar.gz"
        try:
            os.link(archive, target)
        except OSError:
            shutil.copyfile(archive, target)
    return www


def _fresh(path: Path) -> None:
    """Remove ``path`` and flush the page cache's dirty pages (untimed, before a run).

    Every run writes hundreds of MB; left dirty, the kernel writes them back
    during a later run, on the same 2 cores, and whichever case runs then pays.
    """
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def _expect(paths: list[Path], size: int) -> None:
    for path in paths:
        got = tree_bytes(Path(path))
        if got != size:
            raise RuntimeError(f"{path} holds {got:,} bytes, expected {size:,}")


def curl_case(work: Work, urls: list[str], parallel: int, size: int) -> h.Measure:
    """``curl -s URL | tar xz`` for every URL, ``parallel`` at a time (``xargs -P``)."""
    dest = work.root / f"curl-{parallel}"
    dirs = [dest / str(i) for i in range(len(urls))]
    jobs = "".join(f"{url}{QUERY}\n{d}\n" for url, d in zip(urls, dirs, strict=True))

    def fetch() -> None:
        run_checked(
            ["xargs", "-P", str(parallel), "-n", "2", "bash", "-c", _FETCH, "fetch"],
            input=jobs,
        )

    def setup() -> None:
        _fresh(dest)

    return h.once(fetch, setup=setup, check=lambda _: _expect(dirs, size))


def asynchub_case(
    work: Work, urls: list[str], concurrency: int, size: int, processes: int | None = None
) -> h.Measure:
    """A fresh ``AsyncHub`` prefetching (or, for one URL, resolving) every URL."""
    import anyio

    import asynchub

    cache = work.root / f"asynchub-{concurrency}-{processes}"

    async def fetch() -> list[Path]:
        async with asynchub.AsyncHub(cache_dir=cache, max_concurrency=concurrency) as hub:
            if len(urls) == 1:
                return [await hub.resolve(urls[0])]
            return list(
                await hub.prefetch(urls, max_concurrency=concurrency, processes=processes)  # type: ignore[arg-type]
            )

    def setup() -> None:
        _fresh(cache)

    return h.once(lambda: anyio.run(fetch), setup=setup, check=lambda paths: _expect(paths, size))


def cli_case(
    work: Work, urls: list[str], jobs: int, size: int, processes: int | None = None
) -> h.Measure:
    """``asynchub prefetch -q -j JOBS [-p N] URL...``: a new process, start-up included."""
    cache = work.root / f"cli-{jobs}-{processes}"
    cmd = [sys.executable, "-m", "asynchub", "prefetch", "-q", "-j", str(jobs)]
    if processes is not None:
        cmd += ["--processes", str(processes)]
    cmd += ["--cache-dir", str(cache), *urls]

    def fetch() -> list[Path]:
        done = run_checked(cmd)
        return [Path(line.split("\t", 1)[0]) for line in done.stdout.splitlines()]

    def check(paths: list[Path]) -> None:
        if len(paths) != len(urls):
            raise RuntimeError(f"the CLI printed {len(paths)} paths for {len(urls)} handles")
        _expect(paths, size)

    def setup() -> None:
        _fresh(cache)

    return h.once(fetch, setup=setup, check=check)


def tfhub_case(work: Work, urls: list[str], size: int) -> h.Measure:
    """tensorflow_hub's ``hub.resolve`` for each URL in turn, into a fresh ``TFHUB_CACHE_DIR``."""
    import tensorflow_hub as thub

    cache = work.root / "tfhub"

    def fetch() -> list[Path]:
        return [Path(thub.resolve(url)) for url in urls]

    def setup() -> None:
        _fresh(cache)
        os.environ["TFHUB_CACHE_DIR"] = str(cache)

    return h.once(fetch, setup=setup, check=lambda paths: _expect(paths, size))


def _rows(
    section: Section,
    samples: dict[str, list[float]],
    nbytes: int,
    baselines: dict[str, str],
    extra: Callable[[str], list[str]] = lambda _: [],
) -> None:
    """Rows of MB/s and the ratio to each case's baseline (given per case)."""
    for label, seconds in samples.items():
        base = baselines[label]
        ratio = h.ratio_to({label: seconds, base: samples[base]}, base)[label]
        mbps = h.Spread.of([nbytes / MB / s for s in seconds])
        section.rows.append(
            [label, f"{h.Spread.of(seconds).median:.2f}", mbps.fmt(0), ratio.fmt(), *extra(label)]
        )
        section.data[label] = {
            "seconds": seconds,
            "mb_per_s": mbps.as_json(),
            "baseline": base,
            "ratio": ratio.as_json(),
        }


def _prime(urls: list[str]) -> None:
    """Read the served file once, so the first timed run does not pay for the disk."""
    run_checked(["curl", "-sSf", "-o", os.devnull, urls[0]])


def run_prefetch(work: Work) -> list[Section]:
    if work.quick:
        archive, n, levels, rounds = work.random_archive(4 * MB), 4, (1, 2, 4), 2
    else:
        archive, n, levels, rounds = work.keras_archive("MobileNetV2-1.4"), 16, (1, 2, 4, 8), 4
    nbytes = archive.stat().st_size
    size = tree_bytes(_extract_once(work, archive))
    www = _serve_copies(work, archive, n)
    with static_server(www) as base:
        urls = [f"{base}/m{i}.tar.gz" for i in range(n)]
        _prime(urls)
        cases: dict[str, h.Measure] = {}
        baselines: dict[str, str] = {}
        for c in levels:
            cases[f"{CURL}, xargs -P {c}"] = curl_case(work, urls, c, size)
            cases[f"asynchub prefetch, concurrency {c}"] = asynchub_case(work, urls, c, size)
            baselines[f"{CURL}, xargs -P {c}"] = f"{CURL}, xargs -P {c}"
            baselines[f"asynchub prefetch, concurrency {c}"] = f"{CURL}, xargs -P {c}"
        # Worker processes started by the library (new interpreters, their start-up
        # included), and the command line in both modes: its default (worker processes
        # forked before its event loop, as many as plan_forked says) and one process.
        from asynchub._workers import plan_forked, usable_cores

        c = 4 if 4 in levels else levels[-1]
        forked = plan_forked(n, usable_cores(), c)
        default = f"{forked} forked worker processes" if forked else "one process"
        rows = {
            f"asynchub prefetch, concurrency {c}, 2 spawned processes": asynchub_case(
                work, urls, c, size, processes=2
            ),
            f"CLI asynchub prefetch -j {c} (default: {default})": cli_case(work, urls, c, size),
            f"CLI asynchub prefetch -j {c} -p 1 (one process)": cli_case(
                work, urls, c, size, processes=1
            ),
        }
        for label, case in rows.items():
            cases[label] = case
            baselines[label] = f"{CURL}, xargs -P {c}"
        cases["tensorflow_hub hub.resolve, sequential"] = tfhub_case(work, urls, size)
        baselines["tensorflow_hub hub.resolve, sequential"] = f"{CURL}, xargs -P 1"
        log(f"prefetch: {n} x {nbytes / MB:.1f} MB, {rounds} rounds of {len(cases)} cases")
        samples = h.interleave(cases, rounds=rounds, warmup=0)
    shutil.rmtree(www)
    peer = "tensorflow_hub hub.resolve, sequential"
    what = (
        "Random float32 module trees"
        if work.quick
        else "Keras MobileNetV2 (asynchub export + pack)"
    )
    section = Section(
        title=f"Prefetch: {n} archives of {nbytes / MB:.1f} MB ({n * nbytes / MB:.0f} MB in all)",
        note=(
            f"{what}, served by `python -m http.server` on 127.0.0.1 under {n} names. "
            "MB/s of archive bytes; ratio = speed ÷ the baseline's in the same round, median "
            "[min, max], where the baseline is `curl -s URL | tar xz` run by `xargs -P` at the "
            "same parallelism (at -P 1 for tensorflow_hub). `vs tensorflow_hub` = speed ÷ "
            "tensorflow_hub's sequential resolve in the same round. Library rows run in this "
            "process (imports done); `CLI` rows are the `asynchub` command in a new process, "
            "its start-up included, as are the spawned worker processes' in the `processes` row."
        ),
        columns=["case", "median s", "MB/s", "ratio vs curl", "vs tensorflow_hub"],
    )
    peer_ratio = h.ratio_to(samples, peer)
    _rows(
        section,
        samples,
        n * nbytes,
        baselines,
        extra=lambda label: [peer_ratio[label].fmt()],
    )
    for label in samples:
        section.data[label]["vs_tensorflow_hub"] = peer_ratio[label].as_json()
    return [section]


def _extract_once(work: Work, archive: Path) -> Path:
    """The archive extracted by tar, to learn the module's size for the checks."""
    dest = work.fresh_dir(f"reference-{archive.stem}")
    run_checked(["tar", "xzf", str(archive), "-C", str(dest)])
    return dest


def run(work: Work) -> list[Section]:
    if work.quick:
        archive, title, rounds = work.random_archive(24 * MB, seed=1), "random float32 tree", 2
    else:
        archive, title, rounds = work.keras_archive("ResNet101"), "Keras ResNet101", 5
    nbytes = archive.stat().st_size
    size = tree_bytes(_extract_once(work, archive))
    www = _serve_copies(work, archive, 1)
    with static_server(www) as base:
        urls = [f"{base}/m0.tar.gz"]
        _prime(urls)
        cases = {
            CURL: curl_case(work, urls, 1, size),
            "asynchub AsyncHub.resolve": asynchub_case(work, urls, 1, size),
            "tensorflow_hub hub.resolve": tfhub_case(work, urls, size),
        }
        log(f"resolve: {nbytes / MB:.0f} MB, {rounds} rounds")
        samples = h.interleave(cases, rounds=rounds, warmup=0)
        single = Section(
            title=f"Resolve: one archive of {nbytes / MB:.0f} MB ({title})",
            note=(
                "Served by `python -m http.server` on 127.0.0.1; a fresh cache each run. MB/s "
                "of archive bytes; ratio = speed ÷ `curl -s URL | tar xz`'s in the same round, "
                "median [min, max]."
            ),
            columns=["case", "median s", "MB/s", "ratio vs curl"],
        )
        _rows(single, samples, nbytes, dict.fromkeys(samples, CURL))
        hit = _cache_hit(work, urls[0], rounds=5 if work.quick else 10)
    shutil.rmtree(www)
    return [single, hit]


@contextlib.contextmanager
def _open_async_hub(cache: Path) -> Iterator[tuple[Any, Any]]:
    """An entered ``AsyncHub`` on an event loop in a thread, and the portal to reach it."""
    from anyio.from_thread import start_blocking_portal

    import asynchub

    with start_blocking_portal() as portal:
        hub = asynchub.AsyncHub(cache_dir=cache)
        portal.call(hub.__aenter__)
        try:
            yield hub, portal
        finally:
            portal.call(hub.aclose)


def _cache_hit(work: Work, url: str, *, rounds: int) -> Section:
    """µs per ``resolve`` of a handle already in the cache, in-process, against tensorflow_hub's."""
    import tensorflow_hub as thub

    import asynchub

    peer_cache = work.fresh_dir("hit-tfhub")
    os.environ["TFHUB_CACHE_DIR"] = str(peer_cache)
    expected = Path(thub.resolve(url))
    mine = work.fresh_dir("hit-asynchub")
    baseline = "tensorflow_hub hub.resolve"
    with _open_async_hub(mine) as (ahub, portal), asynchub.Hub(cache_dir=mine) as sync_hub:
        fetched = portal.call(ahub.resolve, url)
        if sync_hub.resolve(url) != fetched or Path(thub.resolve(url)) != expected:
            raise RuntimeError("a cache hit returned another path than the first resolve")
        number, _ = h.calibrate(lambda: thub.resolve(url), 0.05)

        async def resolve_many(n: int) -> float:
            import time

            started = time.perf_counter()
            for _ in range(n):
                await ahub.resolve(url)
            return (time.perf_counter() - started) / n

        cases = {
            baseline: h.per_call(lambda: thub.resolve(url), number),
            "asynchub await AsyncHub.resolve": lambda: portal.call(resolve_many, number),
            "asynchub Hub.resolve (sync)": h.per_call(lambda: sync_hub.resolve(url), number),
        }
        samples = h.interleave(cases, rounds=rounds)
    section = Section(
        title="Resolve: cache hit",
        note=(
            "µs per `resolve` of a handle already in the cache, in-process (asynchub checks its "
            "completeness record: every file's size). Ratio = calls/s ÷ tensorflow_hub "
            "`hub.resolve`'s in the same round, median [min, max]. The async case runs on a loop "
            "in another thread, timed inside the loop."
        ),
        columns=["case", "µs/call", "ratio vs tensorflow_hub"],
    )
    ratios = h.ratio_to(samples, baseline)
    for label, seconds in samples.items():
        section.rows.append([label, h.Spread.of(seconds).scaled(1e6).fmt(0), ratios[label].fmt()])
        section.data[label] = {"seconds_per_call": seconds, "ratio": ratios[label].as_json()}
    return section
