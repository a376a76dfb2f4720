"""What a run folder may make lorakit do: the checks between a run folder and the loaders.

A run folder (or checkpoint folder) is something users download and share, so everything in it is
untrusted input. Loading one (``eval``, ``merge``, ``export``, ``generate``, ``chat``, ``train --resume``):

- never turns on remote code: ``model.trust_remote_code`` comes from the user's own recipe or the
  ``--trust-remote-code`` flag; a stored recipe that asks for it is refused (:func:`stored_recipe`);
- never leaves the folder: ``checkpoints/latest``, the checkpoint folders and every file in them must
  resolve (symbolic links followed) inside the run folder (:func:`inside`, :func:`check_checkpoint_files`);
- never swaps the base model silently: each adapter file records the base it was trained on
  (``base_model`` and the SHA-256 of its ``config.json`` in the safetensors metadata,
  :func:`base_record`); a stored recipe naming another base is refused, one naming a copy of the same
  base (same ``config.json``) is loaded and the change is reported (:func:`check_base`).

Every check raises :class:`~lorakit.errors.LorakitError` with one line naming the file and what to do.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lorakit.errors import LorakitError

TRUST_FLAG = "--trust-remote-code"
ADAPTER_FILE = "adapter.safetensors"  # a checkpoint's adapter weights (lorakit.storage.checkpoint)


def inside(root: Path, path: Path, what: str) -> Path:
    """``path`` resolved (links followed); raises LorakitError unless it lies inside ``root``."""
    real_root, real = Path(root).resolve(), Path(path).resolve()
    if real != real_root and real_root not in real.parents:
        raise LorakitError(f"{what} points outside {root} (to {real}); a run folder may only "
                           "refer to files inside itself: restore the file, or pass the intended checkpoint folder")
    return real


def check_checkpoint_files(root: Path, checkpoint: Path) -> Path:
    """The checkpoint folder resolved inside ``root``, with every entry in it resolving inside too."""
    real = inside(root, checkpoint, str(checkpoint))
    for entry in Path(checkpoint).iterdir():
        inside(root, entry, str(entry))
    return real


def _config_sha(name_or_path: str) -> str | None:
    """SHA-256 of ``config.json`` of a local model folder (a built-in's cached folder), else None.

    Reads a file only (a built-in resolves to its cached folder)."""
    from lorakit.models import BUILTIN_MODELS, resolve_model_path

    folder = Path(resolve_model_path(name_or_path) if name_or_path in BUILTIN_MODELS else name_or_path).expanduser()
    config = folder / "config.json"
    if not config.is_file():
        return None
    return hashlib.sha256(config.read_bytes()).hexdigest()


def base_record(recipe: dict) -> dict[str, str]:
    """Safetensors metadata naming the base a checkpoint's adapter was trained on (strings only)."""
    name = str(recipe.get("model", {}).get("name_or_path", ""))
    sha = _config_sha(name)
    return {"base_model": name, **({"base_config_sha256": sha} if sha else {})}


def adapter_metadata(adapter_file: Path) -> dict[str, str]:
    """The safetensors header metadata of an adapter file (reads the header only).

    Raises LorakitError when the file is not a readable safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(adapter_file), "pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as err:  # noqa: BLE001 - any header problem is a damaged or foreign file
        raise LorakitError(f"{adapter_file}: not a valid lorakit checkpoint file (unreadable safetensors: "
                           f"{str(err).splitlines()[0] if str(err) else type(err).__name__})") from None


def check_base(checkpoint: Path, recipe: dict, console=None) -> None:
    """Refuse a stored recipe whose ``model.name_or_path`` is not the base the adapter was trained on.

    A copy of the same base (same ``config.json`` bytes) is accepted and reported on ``console``.
    Checkpoints written before the record existed are not checked."""
    record = adapter_metadata(Path(checkpoint) / ADAPTER_FILE)
    trained = record.get("base_model")
    named = str(recipe.get("model", {}).get("name_or_path", ""))
    if trained is None or named == trained:
        return
    sha = record.get("base_config_sha256")
    where = Path(checkpoint) / "recipe.yaml"
    if sha is not None and _config_sha(named) == sha:
        if console is not None:
            console.print(f"note: {where} names model.name_or_path {named!r}; the run was trained on "
                          f"{trained!r}, and {named!r} has the same config.json: loading it", soft_wrap=True,
                          markup=False, highlight=False)
        return
    raise LorakitError(f"{where}: model.name_or_path is {named!r}, but the adapter in {checkpoint} was trained "
                       f"on {trained!r}; a run folder does not choose the base model: set it back to {trained!r} "
                       "(or to a copy of that model with the same config.json)")


def stored_recipe(checkpoint: Path, recipe: dict, trust_remote_code: bool, console=None) -> dict:
    """A checkpoint's stored recipe, made safe to load: remote code only with the user's flag.

    Raises LorakitError when the stored recipe asks for ``trust_remote_code`` without the flag, or names
    another base model than the adapter was trained on (:func:`check_base`)."""
    model = recipe.get("model")
    if model is not None and not isinstance(model, dict):
        return recipe  # the recipe's own validation reports it
    model = dict(model or {})
    if model.get("trust_remote_code") not in (None, False) and not trust_remote_code:
        raise LorakitError(f"{Path(checkpoint) / 'recipe.yaml'} asks for model.trust_remote_code, which would run "
                           f"code from the model folder; a run folder cannot turn that on: pass {TRUST_FLAG} "
                           "if you trust that code")
    check_base(checkpoint, recipe, console)
    model["trust_remote_code"] = bool(trust_remote_code)
    return {**recipe, "model": model}


def read_json(path: Path, what: str) -> object:
    """JSON of a run-folder file; raises LorakitError naming it when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LorakitError(f"{path}: not a valid {what} ({type(err).__name__})") from None

