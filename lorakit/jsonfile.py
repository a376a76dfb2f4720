"""Reading a JSON object from a file a user handed over, with one line naming it when it is not one."""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.errors import LorakitError


def read_json_object(file: Path, where: str) -> dict:
    """A JSON object a user handed over (a model's ``config.json``, a PEFT ``adapter_config.json``).

    Raises:
        LorakitError: ``{where}: {file} is not valid JSON (...)`` or ``... is not a JSON object``.
    """
    try:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LorakitError(f"{where}: {file} is not valid JSON ({type(err).__name__})") from None
    if not isinstance(data, dict):
        raise LorakitError(f"{where}: {file} is not a JSON object")
    return data
