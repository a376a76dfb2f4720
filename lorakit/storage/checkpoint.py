"""Checkpoints: a folder per step, written atomically, loaded without unpickling untrusted data.

Layout of ``<output_dir>/checkpoints/step-000100/`` (and ``<output_dir>/final/``):
  - ``adapter.safetensors``: every adapter tensor (parameters and persistent buffers of the adapter
    layers, except the frozen ``base_layer``) and any other trainable tensor (a classification head);
  - ``method.json``: the method's own state (``Method.state_dict``);
  - ``recipe.yaml``: the resolved recipe;
  - ``trainer_state.pt`` and ``trainer.json`` (training checkpoints only): optimizer, scheduler and RNG
    state, loaded with ``torch.load(weights_only=True)``; the step reached (:mod:`.trainer_state`).

A folder is written under a temporary name and renamed into place, so a crash mid-write leaves the
previous checkpoint usable; ``latest`` names the newest one and is replaced atomically too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit import trust
from lorakit.errors import LorakitError
from lorakit.faults import kill_point
from lorakit.files import normal_modes
from lorakit.methods import AdapterLayer
from lorakit.storage import trainer_state

ADAPTER_FILE = trust.ADAPTER_FILE


class NoCheckpoint(LorakitError):
    """The folder holds no checkpoint at all (as opposed to a damaged or unsafe one)."""


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors by dotted name; a tensor shared by several layers is stored once. FSDP shards
    (``DTensor``) are gathered whole: under FSDP every rank must call this (a collective)."""
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def put(key: str, tensor: torch.Tensor) -> None:
        if key in out:
            return
        if isinstance(tensor, DTensor):  # the same calls on every rank: no pointer-based skipping
            out[key] = tensor.full_tensor().detach().contiguous().cpu()
            return
        if tensor.data_ptr() in seen:
            return
        seen.add(tensor.data_ptr())
        out[key] = tensor.detach().contiguous().cpu()

    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            for key, tensor in module.state_dict().items():
                if not key.startswith("base_layer."):
                    put(f"{name}.{key}", tensor)
    for name, param in model.named_parameters():
        if param.requires_grad:
            put(name, param)
    return out


def load_adapter_weights(model: nn.Module, path: Path) -> None:
    """Load ``adapter.safetensors`` into a model that already carries the adapter layers.

    A stored tensor outside the adapter layers was trainable when saved (a classification head, a PEFT
    folder's ``modules_to_save``), so it is made trainable again.

    Raises:
        LorakitError: a stored tensor has no place in the model, its shape differs, or an adapter
            tensor of the model is missing from the file (it would silently keep its initial value).
    """
    trust.adapter_metadata(path)  # a damaged or foreign file: one line naming it
    try:
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - truncated data, bad dtype...
        raise LorakitError(f"{path}: not a valid lorakit checkpoint file ({type(err).__name__})") from None
    own = model.state_dict()
    missing = sorted(set(adapter_state_dict(model)) - set(tensors))
    if missing:
        raise LorakitError(f"{path}: no tensor for {missing[0]} ({len(missing)} missing; was the adapter "
                           "trained with other target_modules or another method?)")
    for key, tensor in tensors.items():
        if key not in own:
            raise LorakitError(f"{path}: tensor {key} has no place in this model (was it trained on another base or method?)")
        if own[key].shape != tensor.shape:
            raise LorakitError(f"{path}: tensor {key} has shape {tuple(tensor.shape)}, the model expects {tuple(own[key].shape)}")
        if tensor.dtype.is_floating_point != own[key].dtype.is_floating_point:
            raise LorakitError(f"{path}: tensor {key} has dtype {tensor.dtype}, the model expects {own[key].dtype}")
    model.load_state_dict(tensors, strict=False)
    adapters = tuple(n + "." for n, m in model.named_modules() if isinstance(m, AdapterLayer))
    for name, param in model.named_parameters():
        if name in tensors and not name.startswith(adapters):
            param.requires_grad_(True)


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's entries to disk (a folder: its list of names, after a rename)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """fsync every file in ``path`` and then ``path`` itself."""
    for file in path.iterdir():
        if file.is_file():
            _fsync(file)
    _fsync(path)


def check_output_folder(path: Path, what: str, empty: bool = False) -> None:
    """Refuse, before anything loads, a folder lorakit is to write that is a file, is not empty (with
    ``empty``), or cannot be created or written: a folder is created and removed at once in it, or in
    its nearest existing parent; with ``empty`` (a folder written whole under a temporary name beside it
    and renamed into place) in its parent too.

    Raises LorakitError naming ``what`` (``output_dir``, ``--output``) and the reason."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LorakitError(f"{what} {path}: exists and is not a folder; choose another {what}")
    if empty and path.is_dir() and any(path.iterdir()):
        raise LorakitError(f"{what} {path}: folder exists and is not empty")
    for start in (path, path.parent) if empty else (path,):
        parent = start
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise LorakitError(f"{what} {path}: {parent} is a file, not a folder; choose another {what}")
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".lorakit-write-check-", dir=parent))
        except OSError as err:
            raise LorakitError(f"{what} {path}: cannot write in {parent} ({err.strerror}); choose another "
                               f"{what}") from None


def write_atomic_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsync'd, renamed into place, parent fsync'd."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _label_record(model: nn.Module, recipe: dict) -> dict[str, str]:
    """A classifier's label names in head order (safetensors metadata): evaluating it on other data maps
    that data's labels onto these, never onto a new order."""
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if recipe.get("model", {}).get("task") != "seq_cls" or not id2label:
        return {}
    return {"label_names": json.dumps([id2label[i] for i in sorted(id2label)])}


PRECISIONS = ("bf16", "fp32")


def read_precision(checkpoint: Path) -> str | None:
    """The resolved ``train.precision`` (bf16 or fp32) a checkpoint's run trained in, or None (a checkpoint
    written before it was recorded). Raises LorakitError for an unreadable adapter file or another value."""
    value = trust.adapter_metadata(Path(checkpoint) / ADAPTER_FILE).get("precision")
    if value is not None and value not in PRECISIONS:
        raise LorakitError(f"{Path(checkpoint) / ADAPTER_FILE}: not a valid lorakit checkpoint file (precision {value!r})")
    return value


def read_label_names(checkpoint: Path) -> list[str] | None:
    """The label names a classification checkpoint was trained with, or None (a causal LM, or a
    checkpoint written before they were recorded). Raises LorakitError for an unreadable adapter file."""
    names = trust.adapter_metadata(Path(checkpoint) / ADAPTER_FILE).get("label_names")
    try:
        value = json.loads(names) if names is not None else None
    except json.JSONDecodeError:
        value = None
    if names is not None and not (isinstance(value, list) and all(isinstance(n, str) for n in value)):
        raise LorakitError(f"{Path(checkpoint) / ADAPTER_FILE}: not a valid lorakit checkpoint file (label_names)")
    return value


def save_checkpoint(
    path: Path,
    model: nn.Module,
    method,
    recipe: dict,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    step: int | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    world_size: int = 1,
    best: dict | None = None,
    rank_rng: dict[str, torch.Tensor] | None = None,
    precision: str | None = None,
) -> Path:
    """Write a checkpoint folder at ``path`` atomically (temp folder, fsync, rename).

    ``optimizer``: the optimizer or its whole state dict; ``tensors``: the adapter tensors when gathered
    already (:func:`adapter_state_dict`); ``world_size``: processes of the run; ``best``: the best-evaluation
    tracker's state (:class:`lorakit.train.keep.BestTracker`); both go to ``trainer.json``; ``rank_rng``:
    every rank's RNG states (:meth:`lorakit.world.World.gather_rng`), kept as ``rng["ranks"]``.
    ``precision``: the resolved ``train.precision`` trained in (bf16 or fp32; ``recipe.yaml`` may only
    say auto), kept in the adapter file's metadata (:func:`read_precision`; ``merge`` saves in its dtype)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"format": "lorakit", **trust.base_record(recipe), **_label_record(model, recipe),
            **({"precision": precision} if precision else {})}
    save_file(adapter_state_dict(model) if tensors is None else tensors, str(tmp / ADAPTER_FILE), metadata=meta)
    (tmp / "method.json").write_text(json.dumps(method.state_dict(), indent=1))
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    if optimizer is not None:
        trainer_state.write(tmp, optimizer, scheduler, step, world_size, best, rank_rng)
    normal_modes(tmp)  # safetensors writes 0600
    _fsync_dir(tmp)
    kill_point(f"save:{path.name}:written")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
        kill_point(f"save:{path.name}:swapped")
    os.replace(tmp, path)
    _fsync(path.parent)
    kill_point(f"save:{path.name}:renamed")
    shutil.rmtree(old, ignore_errors=True)
    return path


STALE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|del)-(?P<pid>\d+)$")


def alive(pid: int) -> bool:
    """Whether another process ``pid`` is running (this process counts as not: its own leftovers are stale)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(run_dir: Path) -> list[str]:
    """Remove what interrupted writes of this run left: ``.NAME.tmp-PID`` (a write not finished),
    ``.NAME.del-PID`` (a deletion not finished, :mod:`lorakit.storage.retention`) and
    ``.NAME.old-PID`` (a replaced version); an ``.old`` whose NAME is missing (killed between the two
    renames) is put back instead. Entries of a live process are left alone. Returns what was done."""
    done = []
    run_dir = Path(run_dir)
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "final"):
        if not folder.is_dir() or folder.is_symlink():
            continue
        for entry in sorted(folder.iterdir()):
            match = STALE.match(entry.name)
            if match is None or alive(int(match["pid"])):
                continue
            original = folder / match["name"]
            if match["kind"] == "old" and not original.exists():
                os.replace(entry, original)
                done.append(f"restored {original}")
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
                done.append(f"removed {entry}")
            else:
                entry.unlink()
                done.append(f"removed {entry}")
    return done


def mark_latest(output_dir: Path, checkpoint: Path) -> None:
    write_atomic_text(Path(output_dir) / "checkpoints" / "latest", checkpoint.name)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest training checkpoint of a run folder, or None.

    Raises:
        LorakitError: ``checkpoints/latest`` or a checkpoint folder points outside the run folder
            (:func:`lorakit.trust.inside`).
    """
    run = Path(output_dir)
    pointer = run / "checkpoints" / "latest"
    if pointer.is_file():
        name = pointer.read_text(errors="replace").strip()
        candidate = pointer.parent / name
        trust.inside(run / "checkpoints", candidate, f"{pointer} ({name!r})")
        if (candidate / ADAPTER_FILE).is_file():
            trust.check_checkpoint_files(run, candidate)
            return candidate
    numbered = [(int(m[1]), p) for p in (run / "checkpoints").glob("step-*")
                if (m := re.fullmatch(r"step-(\d+)", p.name)) and (p / ADAPTER_FILE).is_file()]
    steps = [p for _, p in sorted(numbered)]  # by number: step-1000000 after step-999999
    if steps:
        trust.check_checkpoint_files(run, steps[-1])
    return steps[-1] if steps else None


def resolve_checkpoint(run_or_checkpoint: str | Path) -> Path:
    """A checkpoint folder from a checkpoint path or a run folder (its ``final``, else its latest).

    Raises:
        NoCheckpoint: no such folder, or no checkpoint in it.
        LorakitError: a checkpoint that points outside the run folder.
    """
    path = Path(run_or_checkpoint)
    if not path.is_dir():
        raise NoCheckpoint(f"{path}: not a folder (a run folder or checkpoint folder was expected)" if path.exists()
                           else f"no such folder: {path}")
    if (path / ADAPTER_FILE).is_file():
        trust.check_checkpoint_files(path, path)
        return path
    if (path / "final" / ADAPTER_FILE).is_file():
        trust.check_checkpoint_files(path, path / "final")
        return path / "final"
    latest = latest_checkpoint(path)
    if latest is None:
        raise NoCheckpoint(f"{path}: not a lorakit run folder or checkpoint (no {ADAPTER_FILE} found)")
    return latest


def read_checkpoint_meta(checkpoint: Path) -> tuple[dict, dict]:
    """(recipe mapping, method state) stored in a checkpoint folder (``yaml.safe_load``, JSON).

    Raises:
        LorakitError: ``recipe.yaml`` or ``method.json`` is missing or not what lorakit writes.
    """
    checkpoint = Path(checkpoint)
    try:
        recipe = yaml.safe_load((checkpoint / "recipe.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise LorakitError(f"{checkpoint / 'recipe.yaml'}: not a valid lorakit checkpoint file "
                           f"({type(err).__name__})") from None
    if not isinstance(recipe, dict):
        raise LorakitError(f"{checkpoint / 'recipe.yaml'}: not a valid lorakit checkpoint file (not a mapping)")
    method_state = trust.read_json(checkpoint / "method.json", "lorakit checkpoint file")
    if not isinstance(method_state, dict):
        raise LorakitError(f"{checkpoint / 'method.json'}: not a valid lorakit checkpoint file (not a mapping)")
    return recipe, method_state
