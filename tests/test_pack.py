"""pack(): reproducible tar.gz archives of module directories, and `asynchub pack`."""

from __future__ import annotations

import gzip
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from asynchub._pack import fingerprint, is_module_dir, pack
from asynchub.errors import ModuleError

REPO = Path(__file__).resolve().parents[1]


def make_module(root: Path) -> Path:
    """A directory laid out like a SavedModel (contents need not be loadable to pack)."""
    (root / "variables").mkdir(parents=True)
    (root / "assets").mkdir()
    (root / "saved_model.pb").write_bytes(b"\x08\x01graph" * 100)
    (root / "fingerprint.pb").write_bytes(b"fp")
    (root / "variables" / "variables.index").write_bytes(b"index")
    (root / "variables" / "variables.data-00000-of-00001").write_bytes(os.urandom(5000))
    (root / ("z" * 120)).write_text("a long name needs a PAX header")
    return root


def members(archive: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(archive, "r:gz") as tar:
        return tar.getmembers()


def test_same_directory_same_bytes(tmp_path: Path) -> None:
    src = make_module(tmp_path / "m")
    first = pack(src, tmp_path / "a.tar.gz").read_bytes()
    # Other mtimes, modes and a re-created file: none of it reaches the archive.
    os.utime(src / "saved_model.pb", (1, 1))
    (src / "variables" / "variables.index").chmod(0o600)
    data = (src / "fingerprint.pb").read_bytes()
    (src / "fingerprint.pb").unlink()
    (src / "fingerprint.pb").write_bytes(data)
    second = pack(src, tmp_path / "b.tar.gz").read_bytes()
    assert first == second


def test_archive_layout_and_metadata(tmp_path: Path) -> None:
    src = make_module(tmp_path / "m")
    archive = pack(src, tmp_path / "m.tar.gz")
    infos = members(archive)
    names = [i.name for i in infos]
    assert names[0] == "."
    assert "./saved_model.pb" in names
    assert "./variables/variables.index" in names
    assert "./assets" in names  # empty dirs are kept
    # Depth-first, children sorted: parents come before their children.
    keys = [tuple(n.split("/")) for n in names]
    assert keys == sorted(keys)
    for info in infos:
        assert info.isdir() or info.isfile()
        assert (info.uid, info.gid, info.uname, info.gname) == (0, 0, "", "")
        assert info.mtime == 0
        assert info.mode == (0o755 if info.isdir() else 0o644)
    with tarfile.open(archive, "r:gz") as tar:
        f = tar.extractfile("./variables/variables.index")
        assert f is not None
        assert f.read() == b"index"


def test_raw_member_names_start_with_dot_slash(tmp_path: Path) -> None:
    archive = pack(make_module(tmp_path / "m"), tmp_path / "m.tar.gz")
    raw = gzip.decompress(archive.read_bytes())
    # The first header's name field, as `tar -tf` shows it.
    assert raw[:3] == b"./\x00"


def test_gzip_header_has_no_name_and_no_mtime(tmp_path: Path) -> None:
    data = pack(make_module(tmp_path / "m"), tmp_path / "m.tar.gz").read_bytes()
    assert data[:3] == b"\x1f\x8b\x08"
    flags = data[3]
    assert flags & 0x08 == 0  # FNAME
    assert data[4:8] == b"\x00\x00\x00\x00"  # MTIME


def test_hard_links_are_stored_as_files(tmp_path: Path) -> None:
    src = make_module(tmp_path / "m")
    os.link(src / "saved_model.pb", src / "copy.pb")
    infos = members(pack(src, tmp_path / "m.tar.gz"))
    assert all(i.isfile() or i.isdir() for i in infos)
    sizes = {i.name: i.size for i in infos}
    assert sizes["./copy.pb"] == sizes["./saved_model.pb"] > 0


def test_pbtxt_module_is_accepted(tmp_path: Path) -> None:
    src = tmp_path / "m"
    src.mkdir()
    (src / "saved_model.pbtxt").write_text("saved_model_schema_version: 1\n")
    assert is_module_dir(src)
    assert [i.name for i in members(pack(src, tmp_path / "m.tgz"))] == [".", "./saved_model.pbtxt"]


def test_directory_without_saved_model_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "m"
    (src / "variables").mkdir(parents=True)
    with pytest.raises(ModuleError, match=r"neither saved_model\.pb nor saved_model\.pbtxt"):
        pack(src, tmp_path / "m.tar.gz")
    with pytest.raises(ModuleError, match="not a directory"):
        pack(tmp_path / "missing", tmp_path / "m.tar.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("target", ["file", "dir", "outside"])
def test_symlinks_are_refused(tmp_path: Path, target: str) -> None:
    src = make_module(tmp_path / "m")
    outside = tmp_path / "secret"
    outside.write_text("not part of the module")
    link = src / "variables" / "link"
    link.symlink_to(
        {"file": src / "saved_model.pb", "dir": src / "assets", "outside": outside}[target]
    )
    with pytest.raises(ModuleError, match="symbolic link"):
        pack(src, tmp_path / "m.tar.gz")
    assert not (tmp_path / "m.tar.gz").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_module_dir_itself_may_be_a_symlink(tmp_path: Path) -> None:
    src = make_module(tmp_path / "m")
    (tmp_path / "alias").symlink_to(src)
    assert pack(tmp_path / "alias", tmp_path / "a.tar.gz").read_bytes() == (
        pack(src, tmp_path / "b.tar.gz").read_bytes()
    )


def test_archive_inside_the_module_is_refused(tmp_path: Path) -> None:
    src = make_module(tmp_path / "m")
    with pytest.raises(ModuleError, match="inside the module"):
        pack(src, src / "variables" / "m.tar.gz")


def test_fifo_is_refused(tmp_path: Path) -> None:
    src = make_module(tmp_path / "m")
    os.mkfifo(src / "pipe")
    with pytest.raises(ModuleError, match="not a regular file"):
        pack(src, tmp_path / "m.tar.gz")


def test_replaces_existing_archive_atomically(tmp_path: Path) -> None:
    src = make_module(tmp_path / "m")
    dst = tmp_path / "m.tar.gz"
    dst.write_bytes(b"old")
    pack(src, dst)
    assert dst.read_bytes()[:2] == b"\x1f\x8b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m.tar.gz"]


def test_fingerprint_tracks_names_sizes_and_mtimes(tmp_path: Path) -> None:
    src = make_module(tmp_path / "m")
    first = fingerprint(src)
    assert fingerprint(src) == first
    (src / "assets" / "vocab.txt").write_text("a\nb\n")
    second = fingerprint(src)
    assert second != first
    os.utime(src / "assets" / "vocab.txt", ns=(1, 1))
    assert fingerprint(src) != second


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "asynchub.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_cli_pack(tmp_path: Path) -> None:
    src = make_module(tmp_path / "m")
    out = tmp_path / "out.tar.gz"
    result = run_cli("pack", str(src), str(out))
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    assert out.read_bytes() == pack(src, tmp_path / "again.tar.gz").read_bytes()


def test_cli_pack_failure_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run_cli("pack", str(tmp_path / "empty"), str(tmp_path / "out.tar.gz"))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "saved_model.pb" in lines[0]
    assert not (tmp_path / "out.tar.gz").exists()


def test_pack_never_replaces_a_device_or_fifo(tmp_path: Path) -> None:
    src = make_module(tmp_path / "m")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ModuleError, match="not a regular file"):
        pack(src, fifo)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    result = run_cli("pack", str(src), str(fifo))  # like /dev/full: a rename replaced it
    assert result.returncode == 1 and "not a regular file" in result.stderr
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_cli_help() -> None:
    for args in (["--help"], ["pack", "--help"], ["serve", "--help"]):
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
        assert "Usage:" in result.stdout
