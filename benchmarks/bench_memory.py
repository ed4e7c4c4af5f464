"""Peak memory while resolving: it must not grow with the archive.

Each resolve runs in a fresh subprocess (``AsyncHub.resolve`` of an http URL on
127.0.0.1 into an empty cache) that reports its own peak resident set size: the
kernel's high-water mark ``VmHWM`` from ``/proc/self/status``, which starts from
zero in the new process image (``ru_maxrss`` does not: Linux carries it over
from the forking parent across ``exec``, and this parent holds TensorFlow). A
tiny archive gives the floor: the interpreter, httpx and anyio; then a real
~160 MB archive and a >= 1 GB one.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from . import _harness as h
from ._work import MB, Section, Work, log, run_checked, static_server, tree_bytes

_CHILD = """
import json, resource, sys, time
import anyio, asynchub

async def main():
    async with asynchub.AsyncHub(cache_dir=sys.argv[1]) as hub:
        return await hub.resolve(sys.argv[2])

started = time.perf_counter()
path = anyio.run(main)
seconds = time.perf_counter() - started
try:  # Linux: the high-water mark of this process image (ru_maxrss survives exec)
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
except OSError:  # macOS: bytes, and a fresh process image counts from zero
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print(json.dumps({"path": str(path), "seconds": seconds, "peak_kib": kib}))
"""
#: How much the peak may rise from the mid-size to the big archive and still count as flat.
_FLAT = 32 * 2**20


def _resolve_in_child(work: Work, url: str) -> dict[str, float]:
    cache = work.fresh_dir("memory-cache")
    proc = run_checked([sys.executable, "-c", _CHILD, str(cache), url])
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["bytes"] = tree_bytes(Path(report["path"]))
    shutil.rmtree(cache)
    return report


def run(work: Work) -> list[Section]:
    if work.quick:
        archives = {
            "tiny: random (the floor)": work.random_archive(MB // 10, seed=7),
            "mid: random": work.random_archive(24 * MB, seed=1),
            "big: random": work.random_archive(120 * MB, seed=2),
        }
    else:
        archives = {
            "tiny: Keras MLP (the floor)": work.keras_archive("MLP"),
            "mid: Keras ResNet101": work.keras_archive("ResNet101"),
            "big: random": work.random_archive(1_200 * MB, seed=2),
        }
    tiny, mid, big = archives
    sizes = {label: archive.stat().st_size for label, archive in archives.items()}
    www = work.fresh_dir("www-memory")
    for label, archive in archives.items():
        (www / f"{label.split(':')[0]}.tar.gz").hardlink_to(archive)
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in archives}
    with static_server(www) as base:
        for r in range(2):
            for label in archives:
                log(f"memory: {label}, run {r + 1}")
                url = f"{base}/{label.split(':')[0]}.tar.gz"
                runs[label].append(_resolve_in_child(work, url))
    shutil.rmtree(www)
    work.drop(archives[big])  # a gigabyte of scratch need not wait for the end
    section = Section(
        title="Memory: peak RSS of a process resolving one archive",
        note=(
            "A fresh subprocess per run resolves one http URL into an empty cache and reports "
            "its own peak RSS (`VmHWM`); the largest of 2 runs is shown. `tiny` is the "
            "floor (interpreter, httpx, anyio); `random` archives are module-shaped trees of "
            "random float32 weights. Flat means the big archive's peak is within "
            f"{_FLAT // 2**20} MiB of the mid one's."
        ),
        columns=["archive", "archive MB", "module MB", "peak RSS MiB", "above floor MiB", "s"],
    )
    floor = max(r["peak_kib"] for r in runs[tiny]) / 1024
    for label, reports in runs.items():
        peak = max(r["peak_kib"] for r in reports) / 1024
        seconds = h.Spread.of([r["seconds"] for r in reports])
        section.rows.append(
            [
                label,
                f"{sizes[label] / MB:,.1f}",
                f"{reports[0]['bytes'] / MB:,.0f}",
                f"{peak:,.0f}",
                f"{peak - floor:,.0f}",
                seconds.fmt(1),
            ]
        )
        section.data[label] = {"runs": reports, "peak_mib": peak, "archive_bytes": sizes[label]}
    growth = section.data[big]["peak_mib"] - section.data[mid]["peak_mib"]
    flat = growth * 2**20 <= _FLAT
    section.data["big_minus_mid_mib"] = growth
    section.data["flat"] = flat
    section.note += f" Big minus mid: {growth:+.0f} MiB: {'flat' if flat else 'GROWS'}."
    if not flat:
        log(f"memory: peak RSS grows with the archive ({growth:+.0f} MiB)")
    return [section]
