"""A ``model.name_or_path`` that is neither a built-in nor a local folder is a hub id: one metadata request
(no retries) tells before transformers tries whether the hub can be reached and holds that model, so a
misspelt name or an offline machine is one line at once, with the nearest built-in name, instead of
huggingface_hub's retries (about a minute offline).
"""

from __future__ import annotations

import difflib

from lorakit.errors import LorakitError


def nearest_builtin(name: str, builtins) -> str:
    """`` (did you mean `NAME`?)`` for the built-in model name closest to ``name`` (its part after the last
    ``/``, any case), or ``""`` when none is close."""
    close = difflib.get_close_matches(name.rsplit("/", 1)[-1].lower(), list(builtins), n=1, cutoff=0.4)
    return f" (did you mean `{close[0]}`?)" if close else ""


def check_hub_id(name: str, builtins, timeout: float = 10.0) -> None:
    """Refuse a hub id that cannot load: not a valid id, not on the hub (or private), or the hub not
    reachable while the id is not in the local hub cache. Nothing is checked when the id is cached or
    the user set ``HF_HUB_OFFLINE`` (transformers then answers from the cache); a gated model or any
    other answer of the hub is left to transformers.

    Raises:
        LorakitError: one line naming the built-ins, the nearest of them, and why the hub id cannot load.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError

    start = f"model.name_or_path {name!r}: not a built-in ({', '.join(builtins)}), not a local folder"
    hint = nearest_builtin(name, builtins)
    try:
        if constants.is_offline_mode() or isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
        get_hf_file_metadata(hf_hub_url(name, "config.json"), timeout=timeout)
    except HFValidationError:
        raise LorakitError(f"{start}, and not a valid hub id{hint}") from None
    except GatedRepoError:
        return
    except RepositoryNotFoundError:
        raise LorakitError(f"{start}, and no such model on the hub (or a private one: log in with "
                           f"`hf auth login`){hint}") from None
    except HfHubHTTPError:
        return
    except Exception as err:  # noqa: BLE001 - a network error of huggingface_hub's HTTP client
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LorakitError(f"{start}, and the hub could not be reached to look for it ({reason}){hint}") from None
