"""Run the benchmark suite: ``python -m benchmarks [--only PART ...] [--quick]``.

Writes ``benchmarks/results/latest.md`` and ``latest.json`` (``quick.*`` with
``--quick``; ``latest-PART.*`` with ``--only PART``) and prints the table. A part
that fails is reported as failed, with no figures, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from ._work import Section, Work, loadavg, log, machine

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
_MARKERS = (
    "<!-- latest: written by python -m benchmarks after a complete run -->",
    "<!-- /latest -->",
)


def _parts() -> dict[str, Callable[[Work], list[Section]]]:
    from . import (
        bench_apply,
        bench_batched,
        bench_far,
        bench_gzip,
        bench_infer,
        bench_memory,
        bench_resolve,
        bench_startup,
    )

    return {
        "apply": bench_apply.run,
        "batched": bench_batched.run,
        "infer": bench_infer.run,
        "resolve": bench_resolve.run,
        "prefetch": bench_resolve.run_prefetch,
        "memory": bench_memory.run,
        "gzip": bench_gzip.run,
        "far": bench_far.run,
        "startup": bench_startup.run,
    }


def _render(info: dict[str, object], sections: list[Section], failures: dict[str, str]) -> str:
    versions = info["versions"]
    assert isinstance(versions, dict)
    lines = [
        "## asynchub benchmarks",
        "",
        f"`{info['command']}` — {info['date']}, {info['seconds']:.0f} s, commit {info['commit']}",
        "",
        f"Machine: {info['cpu']}, {info['usable_cores']} cores usable of {info['cores']}, "
        f"{info['memory']}; {info['os']}; Python {info['python']}; load average "
        f"{info['loadavg_start']} at start, {info['loadavg_end']} at end (other work "
        "on the machine shows here).",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "",
    ]
    lines += [section.markdown() for section in sections]
    for part, error in failures.items():
        lines += [f"### {part}: FAILED", "", "```", error.rstrip(), "```", ""]
    return "\n".join(lines)


def _update_readme(text: str) -> None:
    """Put a complete run's table at the end of benchmarks/README.md, between the markers."""
    readme = HERE / "README.md"
    page = readme.read_text()
    start, end = page.find(_MARKERS[0]), page.find(_MARKERS[1])
    if start < 0 or end < start:
        raise RuntimeError(f"{readme} lost its markers {_MARKERS}")
    body = text.split("\n", 1)[1].strip()  # the table's own title is the section's
    head = page[: start + len(_MARKERS[0])]
    readme.write_text(f"{head}\n\n{body}\n\n{page[end:]}")


def _compile_package() -> None:
    """Byte-compile asynchub, as pip does when it installs a package.

    The project is installed editable, and with PYTHONDONTWRITEBYTECODE set
    (as on these machines) every new process (the CLI rows, worker processes)
    would compile asynchub's sources again: about 35 ms a start that no
    installed copy pays.
    """
    import compileall

    import asynchub

    compileall.compile_dir(Path(asynchub.__file__).parent, quiet=1)


def main(argv: list[str] | None = None) -> int:
    parts = _parts()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--only", action="append", choices=list(parts), help="run only this part (repeatable)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="small models and archives, few rounds: a smoke test"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="directory for the .md and .json results"
    )
    args = parser.parse_args(argv)
    chosen = args.only or list(parts)
    info = machine()
    info["command"] = shlex.join(["python", "-m", "benchmarks", *(argv or sys.argv[1:])])
    started = time.perf_counter()
    sections: list[Section] = []
    failures: dict[str, str] = {}
    work = Work(quick=args.quick)
    _compile_package()
    try:
        for name in chosen:
            log(f"part {name}")
            part_started = time.perf_counter()
            try:
                sections += parts[name](work)
            except Exception:
                failures[name] = traceback.format_exc()
                log(f"part {name} FAILED:\n{failures[name]}")
            log(f"part {name} took {time.perf_counter() - part_started:.0f}s")
    finally:
        work.close()
    info["seconds"] = time.perf_counter() - started
    info["loadavg_end"] = loadavg()
    text = _render(info, sections, failures)
    # A partial run gets a name of its own, so it never passes for the whole suite's table.
    stem = "-".join(["quick" if args.quick else "latest", *(args.only or [])])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text(text)
    payload = {
        "machine": info,
        "parts": chosen,
        "failed": failures,
        "sections": {s.title: s.data for s in sections},
    }
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    print(text)
    if not (failures or args.quick or args.only):
        _update_readme(text)
    if failures:
        print(f"FAILED: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
