"""Hub ids checked before transformers loads them: one request, no retries, no network (mocked)."""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub.errors import RepositoryNotFoundError

from lorakit.errors import LorakitError
from lorakit.hub import check_hub_id, nearest_builtin
from lorakit.models import BUILTIN_MODELS, resolve_model_path
from tests.helpers_cli import clean_error, invoke
from tests.tiny_run import tiny_recipe, tiny_world, write_recipe  # noqa: F401 (fixture)


@pytest.fixture
def hub(monkeypatch):
    """The hub's metadata request, mocked: ``hub.answer`` is raised (an exception) or returned; ``hub.calls``
    counts the requests."""
    state = SimpleNamespace(calls=0, answer=OSError("[Errno -2] Name or service not known"))

    def metadata(url, timeout=None, **kwargs):
        state.calls += 1
        if isinstance(state.answer, BaseException):
            raise state.answer
        return state.answer

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", metadata)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    return state


def test_nearest_builtin_name():
    assert nearest_builtin("smollm3", BUILTIN_MODELS) == " (did you mean `smollm2-135m-instruct`?)"
    assert "smollm2-135m-instruct" in nearest_builtin("HuggingFaceTB/SmolLM2-135M-Instruct", BUILTIN_MODELS)
    assert "all-minilm-l6-v2" in nearest_builtin("all-MiniLM-L6", BUILTIN_MODELS)
    assert nearest_builtin("meta-llama/Llama-3.1-8B", BUILTIN_MODELS) == ""


def test_unreachable_hub_is_one_line_at_once(hub):
    start = time.monotonic()
    with pytest.raises(LorakitError, match=r"^model.name_or_path 'smollm3': not a built-in \(smollm2-135m-instruct, "
                       r"all-minilm-l6-v2\), not a local folder, and the hub could not be reached to look for it "
                       r"\(\[Errno -2\] Name or service not known\) \(did you mean `smollm2-135m-instruct`\?\)$"):
        resolve_model_path("smollm3")
    assert hub.calls == 1 and time.monotonic() - start < 2  # no retries


def test_model_not_on_the_hub(hub):
    hub.answer = RepositoryNotFoundError("404", response=SimpleNamespace(headers={}, request=None))
    with pytest.raises(LorakitError, match=r"no such model on the hub \(or a private one.*\(did you mean `smollm2"):
        resolve_model_path("HuggingFaceTB/SmolLM3-135M")


def test_invalid_hub_id(hub):
    with pytest.raises(LorakitError, match=r"'my model': .* not a valid hub id$"):
        resolve_model_path("my model")
    assert hub.calls == 0


def test_hub_id_on_the_hub_goes_on_to_transformers(hub):
    hub.answer = SimpleNamespace(etag="x", commit_hash="y")
    assert resolve_model_path("someorg/some-model") == "someorg/some-model"
    assert hub.calls == 1


def test_cached_or_offline_hub_id_is_not_asked(hub, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: "/cache/config.json")
    check_hub_id("someorg/cached", BUILTIN_MODELS)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    check_hub_id("someorg/offline", BUILTIN_MODELS)
    assert hub.calls == 0


def test_train_with_a_misspelt_model_name(hub, tiny_world, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_world, tmp_path / "run"))
    line = clean_error(invoke("train", recipe, "model.name_or_path=smollm3"), 1)
    assert "did you mean `smollm2-135m-instruct`?" in line and not (tmp_path / "run").exists()


def test_hub_retry_lines_are_quiet():
    """huggingface_hub logs through its own handler ("Retrying in 8s [Retry 5/5]." offline)."""
    code = ("from lorakit.output import quiet_third_party; quiet_third_party(False); "
            "from huggingface_hub.utils import _http; _http.logger.warning('Retrying in 1s [Retry 1/5].')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Retrying" not in result.stderr, result.stderr
