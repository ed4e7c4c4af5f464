"""The house's rules, checked: one option list that reaches worker processes whole, and
no private name taken from another module (import-linter checks the layers, the private
modules and the circles: ``lint-imports``, in ``python3 dev.py test``)."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

import asynchub
from asynchub._config import HubConfig, Retries, Timeouts
from asynchub._workers.wire import config_line, read_config

PACKAGE = Path(asynchub.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def test_no_module_imports_a_private_name_of_another() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):  # function-level and TYPE_CHECKING imports count too
            if not isinstance(node, ast.ImportFrom):
                continue
            source = _imported_from(node, module, path.name == "__init__.py")
            if not source.startswith("asynchub") or source == module:
                continue
            for alias in node.names:
                # A private module of one's own package is its business (import-linter
                # checks that); a private *name* of another module is not.
                submodule = f"{source}.{alias.name}"
                is_module = (PACKAGE.parent / submodule.replace(".", "/")).exists() or (
                    PACKAGE.parent / (submodule.replace(".", "/") + ".py")
                ).exists()
                if alias.name.startswith("_") and alias.name != "__version__" and not is_module:
                    found.append(f"{module}: from {source} import {alias.name}")
    assert found == []


def _not_default(f: dataclasses.Field[Any]) -> Any:
    """A value for every field of HubConfig that differs from its default."""
    values: dict[str, Any] = {
        "cache_dir": Path("/srv/cache"),
        "timeouts": Timeouts(connect=1.5, read=2.5, stalled=7.0),
        "retries": Retries(total=7, backoff=0.25, max_backoff=3.0, max_retry_after=9.0),
        "headers": {"Authorization": "Bearer t"},
        "offline": True,
        "max_concurrency": 11,
        "connections": 6,
        "max_extract_bytes": 12345,
        "max_extract_members": 321,
        "lock_stale_after": 42.0,
        "lock_timeout": 17.5,
        "chunk_size": 65536,
        "progress": True,
        "gzip_backend": "zlib",
        "mirrors": ("s3://mirror/m", "/srv/mirror"),
        "lockfile": Path("/srv/asynchub.lock"),
        "on_mirror_mismatch": "origin",
        "s3_options": {"endpoint": "http://127.0.0.1:9000", "allow_http": True},
        "gcs_options": {"bucket": "b"},
        "file_digests": True,
    }
    return values[f.name]  # a new field fails here until the test names a value for it


def test_every_option_reaches_worker_processes() -> None:
    """The wire carries the whole config: every field set otherwise comes back equal."""
    given = HubConfig(**{f.name: _not_default(f) for f in dataclasses.fields(HubConfig)})
    default = HubConfig(cache_dir=Path())
    for f in dataclasses.fields(HubConfig):
        assert getattr(given, f.name) != getattr(default, f.name), f.name
    # JSON and back, as the parent writes it and the child reads it.
    assert HubConfig.from_json(json.loads(json.dumps(given.to_json()))) == given
    child, events = read_config(config_line(given, 3, events=True))
    # The child gets its share of the concurrency, and sends events rather than drawing.
    assert child == dataclasses.replace(given, max_concurrency=3, progress=False)
    assert events


def test_options_are_declared_once() -> None:
    """from_env takes exactly the options, and refuses others by name."""
    config = HubConfig.from_env(
        cache_dir="/c", timeout=3, retries=2, mirrors="s3://a/b, /m", lockfile=""
    )
    assert config.timeouts == Timeouts.coerce(3) and config.retries.total == 2
    assert config.mirrors == ("s3://a/b", "/m") and config.lockfile is None
    with pytest.raises(TypeError, match=r"unknown hub option.*timeouts"):
        HubConfig.from_env(timeouts=3)
    with pytest.raises(ValueError, match="max_concurrency must be >= 1"):
        HubConfig.from_env(max_concurrency=0)
