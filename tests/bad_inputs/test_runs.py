"""Bad run folders, tampered checkpoint files and bad arguments to the commands that read a run: one line
naming the file or argument, exit 1 or 2, and the run folder byte for byte as before."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tests.bad_inputs.corpus import check_fails
from tests.helpers_cli import copy_run, trained_run  # noqa: F401 (fixture)
from tests.tiny_run import tiny_world  # noqa: F401 (fixture)

FINAL = "final"
LAST = "checkpoints/step-000004"


def write(rel: str, content):
    def apply(run):
        path = run / rel
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return apply


def remove(rel: str):
    return lambda run: (run / rel).unlink()


def edit_yaml(rel: str, **model):
    def apply(run):
        data = yaml.safe_load((run / rel).read_text())
        data["model"].update(model)
        (run / rel).write_text(yaml.safe_dump(data))
    return apply


def edit_tensors(rel: str, change):
    def apply(run):
        tensors = load_file(run / rel)
        change(tensors)
        save_file(tensors, run / rel, metadata={"format": "lorakit"})
    return apply


def first_key(tensors: dict) -> str:
    return sorted(tensors)[0]


class Exploit:
    """A pickle that would run a shell command when unpickled without weights_only."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/lorakit-pwned",))


def pickled_exploit() -> bytes:
    buffer = io.BytesIO()
    torch.save({"optimizer": Exploit()}, buffer)
    return buffer.getvalue()


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# Read by `lorakit eval RUN` (final/): (id, tampering, exit status, what the line must name)
EVAL = [
    ("recipe-not-yaml", write(f"{FINAL}/recipe.yaml", "model: [x\n"), 1, "final/recipe.yaml"),
    ("recipe-a-list", write(f"{FINAL}/recipe.yaml", "- a\n- b\n"), 1, "final/recipe.yaml"),
    ("recipe-empty", write(f"{FINAL}/recipe.yaml", ""), 1, "final/recipe.yaml"),
    ("recipe-python-tag", write(f"{FINAL}/recipe.yaml", "model: !!python/object/apply:os.system ['true']\n"), 1,
     "final/recipe.yaml"),
    ("recipe-not-utf8", write(f"{FINAL}/recipe.yaml", b"model:\n  name_or_path: caf\xe9\n"), 1, "final/recipe.yaml"),
    ("recipe-unknown-field", edit_yaml(f"{FINAL}/recipe.yaml", colour="red"), 2, ("final/recipe.yaml", "colour")),
    ("recipe-missing", remove(f"{FINAL}/recipe.yaml"), 1, "final/recipe.yaml"),
    ("method-not-json", write(f"{FINAL}/method.json", "{'r': 4"), 1, "final/method.json"),
    ("method-a-list", write(f"{FINAL}/method.json", "[1, 2]"), 1, "final/method.json"),
    ("method-missing", remove(f"{FINAL}/method.json"), 1, "final/method.json"),
    ("adapter-garbage", write(f"{FINAL}/adapter.safetensors", os.urandom(4096)), 1, "final/adapter.safetensors"),
    ("adapter-truncated", lambda run: (run / FINAL / "adapter.safetensors").write_bytes(
        (run / FINAL / "adapter.safetensors").read_bytes()[:600]), 1, "final/adapter.safetensors"),
    ("adapter-tensor-missing", edit_tensors(f"{FINAL}/adapter.safetensors", lambda t: t.pop(first_key(t))), 1,
     ("final/adapter.safetensors", "no tensor")),
    ("adapter-wrong-shape", edit_tensors(f"{FINAL}/adapter.safetensors",
                                         lambda t: t.update({first_key(t): torch.zeros(3, 3)})), 1,
     ("final/adapter.safetensors", "shape")),
    ("adapter-extra-tensor", edit_tensors(f"{FINAL}/adapter.safetensors",
                                          lambda t: t.update({"model.evil.weight": torch.zeros(2)})), 1,
     ("final/adapter.safetensors", "model.evil.weight")),
    ("adapter-wrong-dtype", edit_tensors(f"{FINAL}/adapter.safetensors",
                                         lambda t: t.update({first_key(t): t[first_key(t)].to(torch.int64)})), 1,
     ("final/adapter.safetensors", "dtype")),
    ("base-swapped", edit_yaml(f"{FINAL}/recipe.yaml", name_or_path="smollm2-135m-instruct"), 1, "trained on"),
    ("asks-remote-code", edit_yaml(f"{FINAL}/recipe.yaml", trust_remote_code=True), 1, "--trust-remote-code"),
    ("latest-outside", lambda run: (_no_final(run), (run / "checkpoints" / "latest").write_text("../../x")), 1,
     "points outside"),
    ("steps-link-outside", lambda run: (_no_final(run), _link_step_outside(run)), 1, "points outside"),
]


def _link_step_outside(run) -> None:
    """checkpoints/step-000009 → a checkpoint folder next to the run, and no latest: the newest step links out."""
    import shutil

    shutil.copytree(run / LAST, run.parent / "elsewhere")
    os.symlink(run.parent / "elsewhere", run / "checkpoints" / "step-000009")
    (run / "checkpoints" / "latest").unlink()


def _no_final(run) -> None:
    import shutil

    shutil.rmtree(run / FINAL)


@pytest.mark.parametrize("case, tamper, code, expect", EVAL, ids=[c[0] for c in EVAL])
def test_tampered_run_on_eval(tmp_path, trained_run, case, tamper, code, expect):
    run = copy_run(trained_run, tmp_path / "run")
    tamper(run)
    check_fails(["eval", run], code, expect, [run])


# Read by `lorakit train --resume` (the latest checkpoint, step 4; final/ removed so the run is unfinished)
RESUME = [
    ("state-garbage", write(f"{LAST}/trainer_state.pt", os.urandom(512)), "trainer_state.pt"),
    ("state-exploit", write(f"{LAST}/trainer_state.pt", pickled_exploit()), "trainer_state.pt"),
    ("state-wrong-shape", write(f"{LAST}/trainer_state.pt", torch_bytes({"weights": torch.zeros(2)})),
     "trainer_state.pt"),
    ("state-missing", remove(f"{LAST}/trainer_state.pt"), "trainer_state.pt"),
    ("state-rng-float", lambda run: _edit_rng(run, torch=torch.zeros(5056)), "trainer_state.pt"),
    ("state-rng-short", lambda run: _edit_rng(run, torch=torch.zeros(7, dtype=torch.uint8)), "trainer_state.pt"),
    ("state-rng-python", lambda run: _edit_rng(run, python=(3, (1, 2), None)), "trainer_state.pt"),
    ("state-ranks-ragged", lambda run: _edit_rng(run, ranks={"torch": torch.zeros(2, 3, dtype=torch.uint8)}),
     "trainer_state.pt"),
    ("trainer-json-broken", write(f"{LAST}/trainer.json", '{"step": '), "trainer.json"),
    ("trainer-json-no-step", write(f"{LAST}/trainer.json", '{"stage": 4}'), "trainer.json"),
    ("trainer-json-negative", write(f"{LAST}/trainer.json", '{"step": -3}'), "trainer.json"),
    ("trainer-json-missing", remove(f"{LAST}/trainer.json"), "trainer.json"),
    ("trainer-json-best-garbage", write(f"{LAST}/trainer.json", json.dumps({"step": 4, "best": {
        "metric": "eval_loss", "greater_is_better": False, "best_value": "low", "best_step": 2, "bad_evals": 0}})),
     "trainer.json"),
    ("trainer-json-best-a-list", write(f"{LAST}/trainer.json", '{"step": 4, "best": [1, 2]}'), "trainer.json"),
    ("resume-recipe-broken", write(f"{LAST}/recipe.yaml", "train: {max_steps: [\n"), "recipe.yaml"),
    ("resume-adapter-garbage", write(f"{LAST}/adapter.safetensors", os.urandom(1024)), "adapter.safetensors"),
]


def _edit_rng(run, **changes) -> None:
    """trainer_state.pt whose RNG state torch would refuse with a traceback (the rest left valid)."""
    file = run / LAST / "trainer_state.pt"
    state = torch.load(file, weights_only=True)
    state["rng"].update(changes)
    torch.save(state, file)


@pytest.mark.parametrize("case, tamper, expect", RESUME, ids=[c[0] for c in RESUME])
def test_tampered_checkpoint_on_resume(tmp_path, trained_run, case, tamper, expect):
    run = copy_run(trained_run, tmp_path / "run")
    _no_final(run)
    tamper(run)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((trained_run.parent / "recipe.yaml").read_text().replace(str(trained_run), str(run)))
    check_fails(["train", recipe, "train.max_steps=6", "--resume"], 1, (LAST, expect), [run])
    assert not os.path.exists("/tmp/lorakit-pwned")


def test_resume_with_another_learning_rate(tmp_path, trained_run):
    run = copy_run(trained_run, tmp_path / "run")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((trained_run.parent / "recipe.yaml").read_text().replace(str(trained_run), str(run)))
    check_fails(["train", recipe, "train.learning_rate=0.5", "--resume"], 1, ("train.learning_rate", "0.5"), [run])
    check_fails(["train", recipe], 1, "already holds a run", [run])


# Commands on a run with bad arguments: (id, argv after the run folder, exit status, what the line must name);
# a value an option does not take exits 2, like a bad recipe; a folder or file at fault exits 1
ARGS = [
    ("merge-output-not-empty", ["merge", "{run}", "--output", "{nonempty}"], 1, "--output"),
    ("merge-dtype", ["merge", "{run}", "--output", "{out}", "--dtype", "float8"], 2, "--dtype"),
    ("merge-onto", ["merge", "{run}", "--output", "{out}", "--onto", "somewhere"], 2, "--onto"),
    ("merge-rank-fixed", ["merge", "{run}", "--output", "{out}", "--rank", "2"], 2, "--rank"),
    ("export-format", ["export", "{run}", "--output", "{out}", "--format", "onnx"], 2, "--format"),
    ("merge-output-unwritable", ["merge", "{run}", "--output", "/proc/lorakit-merged"], 1, ("--output", "cannot write")),
    ("merge-output-a-file", ["merge", "{run}", "--output", "{broken}"], 1, ("--output", "not a folder")),
    ("export-output-unwritable", ["export", "{run}", "--output", "/proc/lorakit-peft"], 1, ("--output", "cannot write")),
    ("export-output-not-empty", ["export", "{run}", "--output", "{nonempty}"], 1, "--output"),
    ("eval-rank-fixed", ["eval", "{run}", "--rank", "2"], 2, "rank"),
    ("eval-held-out-alone", ["eval", "{run}", "--held-out"], 2, ("--held-out", "--data")),
    ("eval-data-missing", ["eval", "{run}", "--data", "{tmp}/nope.jsonl"], 1, "nope.jsonl"),
    ("eval-data-broken", ["eval", "{run}", "--data", "{broken}"], 1, ("broken.jsonl", "line 2")),
    ("eval-not-a-run", ["eval", "{tmp}/empty"], 1, "not a lorakit run folder"),
    ("eval-missing-folder", ["eval", "{tmp}/nowhere"], 1, ("no such folder: ", "/nowhere")),
    ("merge-missing-folder", ["merge", "{tmp}/nowhere", "--output", "{out}"], 1, ("no such folder: ", "/nowhere")),
    ("export-missing-folder", ["export", "{tmp}/nowhere", "--output", "{out}"], 1, ("no such folder: ", "/nowhere")),
    ("plot-missing-folder", ["plot", "{tmp}/nowhere"], 1, ("no such folder: ", "/nowhere")),
    ("eval-a-file", ["eval", "{broken}"], 1, ("broken.jsonl: not a folder", "run folder or checkpoint folder")),
    ("generate-no-prompt-target", ["generate", "{tmp}/nowhere", "-p", "hi"], 1, "nowhere"),
]


@pytest.mark.parametrize("case, argv, code, expect", ARGS, ids=[c[0] for c in ARGS])
def test_bad_arguments_on_a_run(tmp_path, trained_run, case, argv, code, expect):
    run = copy_run(trained_run, tmp_path / "run")
    (tmp_path / "nonempty").mkdir()
    (tmp_path / "nonempty" / "keep.txt").write_text("mine")
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.jsonl").write_text(json.dumps({"messages": []}) + "\n{oops\n")
    names = {"run": run, "out": tmp_path / "out", "nonempty": tmp_path / "nonempty", "tmp": tmp_path,
             "broken": tmp_path / "broken.jsonl"}
    args = [a.format(**names) for a in argv]
    check_fails(args, code, expect, [tmp_path])
