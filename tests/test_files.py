"""One file mode (lorakit.files): everything lorakit writes has the modes of a normal file and folder
under the umask, 0666 / 0777 & ~umask, although safetensors writes 0600 and mkdtemp makes 0700."""

import os
import stat
import tempfile
from pathlib import Path

import pytest

from lorakit.files import current_umask, normal_modes
from tests.helpers_cli import invoke, tiny_recipe, tiny_world, write_recipe  # noqa: F401 (tiny_world: a fixture)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """{relative path: permission bits} of every file and folder under ``root`` (root itself as ".")."""
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            item = Path(folder) / name
            found[str(item.relative_to(root))] = stat.S_IMODE(item.lstat().st_mode)
    return found


def test_current_umask(umask_027):
    assert current_umask() == 0o027


def test_normal_modes_of_a_folder_leaves_links_alone(tmp_path, umask_027):
    folder = Path(tempfile.mkdtemp(dir=tmp_path))  # 0700
    fd, name = tempfile.mkstemp(dir=folder)  # 0600
    os.close(fd)
    (folder / "sub").mkdir(mode=0o700)
    outside = tmp_path / "outside"
    outside.write_text("x")
    os.chmod(outside, 0o600)
    (folder / "sub" / "link").symlink_to(outside)
    normal_modes(folder)
    assert modes(folder)["."] == 0o750 and modes(folder)[Path(name).name] == 0o640
    assert modes(folder)["sub"] == 0o750
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600  # a link's target is not changed


def test_everything_a_run_merge_and_export_write_has_one_mode(tiny_world, tmp_path, umask_027):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_world, tmp_path / "run", train={"save_every": 2}))
    assert invoke("train", recipe).exit_code == 0
    assert invoke("merge", tmp_path / "run", "-o", tmp_path / "merged").exit_code == 0
    assert invoke("export", tmp_path / "run", "-o", tmp_path / "exported", "--no-check").exit_code == 0
    for folder in ("run", "merged", "exported"):
        found = modes(tmp_path / folder)
        wrong = {k: oct(v) for k, v in found.items()
                 if v != (0o750 if (tmp_path / folder / k).is_dir() else 0o640)}
        assert not wrong, (folder, wrong)
    run = modes(tmp_path / "run")
    for name in ("final/adapter.safetensors", "final/peft/adapter_model.safetensors", "curves.png",
                 "checkpoints/step-000002/adapter.safetensors", "metrics.jsonl", "summary.json"):
        assert name in run, name
