"""trainer_state.pt / trainer.json: written and read back; what torch or Python would reject is one line."""

import json
import random

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.storage import trainer_state as tstate


def written(tmp_path, **extra):
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(3)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    tstate.write(tmp_path, opt, sched, step=7, world_size=2, best={"best_value": 1.5}, **extra)
    return tmp_path


def test_write_then_read_back(tmp_path):
    ranks = {"torch": torch.stack([torch.get_rng_state()] * 2)}
    folder = written(tmp_path, rank_rng=ranks)
    state = tstate.load(folder)
    assert state["optimizer"]["state"][0]["step"] == 1 and torch.equal(state["rng"]["ranks"]["torch"], ranks["torch"])
    assert (tstate.read_step(folder), tstate.read_world_size(folder), tstate.read_best(folder)) == (7, 2, {"best_value": 1.5})
    drawn = random.random(), torch.rand(2)  # the draws right after the checkpoint
    random.seed(0), torch.manual_seed(0)
    tstate.restore_rng(state["rng"])
    assert random.random() == drawn[0] and torch.equal(torch.rand(2), drawn[1])


@pytest.mark.parametrize("change", [{"python": "not a state"}, {"python": (3, tuple(range(5)), None)},
                                    {"torch": torch.zeros(4, dtype=torch.uint8)}])
def test_a_state_torch_or_python_would_reject_is_one_line(tmp_path, change):
    folder = written(tmp_path)
    state = torch.load(folder / "trainer_state.pt", weights_only=True)
    state["rng"].update(change)
    torch.save(state, folder / "trainer_state.pt")
    with pytest.raises(LorakitError, match=r"trainer_state.pt: not a valid lorakit checkpoint file \(rng state\)"):
        tstate.load(folder)


def test_trainer_json_without_a_step_is_one_line(tmp_path):
    (tmp_path / "trainer.json").write_text(json.dumps({"step": -1}))
    with pytest.raises(LorakitError, match="trainer.json: not a valid lorakit checkpoint file"):
        tstate.read_step(tmp_path)
