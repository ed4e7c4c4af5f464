"""The public face: __all__ is explicit, sorted, complete, and import is light."""

from __future__ import annotations

import subprocess
import sys

import asynchub


def test_all_is_sorted_and_importable() -> None:
    names = asynchub.__all__
    assert names == sorted(names, key=str.lower) or names == sorted(names)
    for name in names:
        assert hasattr(asynchub, name), name


def test_every_public_attribute_is_in_all() -> None:
    public = {
        name
        for name, value in vars(asynchub).items()
        if not name.startswith("_") and not isinstance(value, type(sys)) and name != "annotations"
    }
    assert public <= set(asynchub.__all__), public - set(asynchub.__all__)


def test_every_error_derives_from_huberror() -> None:
    from asynchub import errors

    for name in errors.__all__:
        cls = getattr(errors, name)
        if name == "HubClosedError":
            assert issubclass(cls, RuntimeError)
            assert not issubclass(cls, errors.HubError)
        else:
            assert issubclass(cls, errors.HubError), name


def test_import_does_not_import_tensorflow_or_read_env() -> None:
    code = (
        "import sys, os; os.environ['TFHUB_CACHE_DIR'] = '/nonexistent/x'; import asynchub; "
        "print(*(m in sys.modules for m in ('tensorflow', 'keras', 'uvicorn', 'starlette')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # (httpx itself imports click and rich when they are installed; that is not ours.)
    assert out.stdout.split() == ["False"] * 4
