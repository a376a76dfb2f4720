"""lorakit.data.mix: data.sources mixed by weight, each source with its own held-out split and errors."""

from __future__ import annotations

from collections import Counter

import pytest
from pydantic import ValidationError

from lorakit.config import DataConfig
from lorakit.data import load_raw, tokenize
from lorakit.data.mix import draw, shares
from lorakit.errors import LorakitError
from tests.helpers_data import cfg, supervised, tiny_tokenizer, write_jsonl  # noqa: F401 - fixture
from tests.tiny_run import tiny_world  # noqa: F401 - fixture

ALPACA = [{"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)} for i in range(100)]
SHAREGPT = [{"conversations": [{"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": f"{i}"}]}
            for i in range(40)]


@pytest.fixture
def files(tmp_path) -> dict:
    return {"alpaca": write_jsonl(tmp_path / "alpaca.jsonl", ALPACA),
            "share": write_jsonl(tmp_path / "share.jsonl", SHAREGPT)}


def mix(*sources, **data) -> DataConfig:
    return DataConfig(sources=list(sources), **data)


def test_a_single_source_says_what_was_read(files, tmp_path):
    raw = load_raw(cfg(files["share"]), "causal_lm", 0, describe=True)  # format auto
    assert raw.notes[0] == "data: share.jsonl (sharegpt, auto-detected, read as chat), 36 training examples, 4 held out"
    raw = load_raw(cfg(files["alpaca"], format="instruction"), "causal_lm", 0, describe=True)
    assert raw.notes[0] == "data: alpaca.jsonl (instruction), 90 training examples, 10 held out"
    news = tmp_path / "news.csv"
    news.write_text("headline,topic\n" + "".join(f"story {i},{'ab'[i % 2]}\n" for i in range(20)))
    raw = load_raw(cfg(str(news), text_field="headline", label_field="topic"), "seq_cls", 0, describe=True)
    assert raw.notes[0] == "data: news.csv (classification, auto-detected, 2 labels: a, b), 18 training examples, 2 held out"
    assert load_raw(cfg(files["share"]), "causal_lm", 0, whole_for_eval=True, describe=True).notes == []
    assert load_raw(cfg(files["share"]), "causal_lm", 0).notes == []  # eval, merge, export: not described


def test_shares_follow_the_weights_and_add_up():
    assert shares([2, 1], 1200) == [800, 400]
    assert shares([1, 1, 1], 100) == [34, 33, 33]  # largest remainder, ties to the earlier source
    assert shares([0.5, 0.25, 0.25], 7) == [3, 2, 2]  # 3.5, 1.75, 1.75
    assert sum(shares([3.3, 1.7, 0.01], 999)) == 999


def test_draw_samples_without_repeats_then_repeats_every_row(files):
    ds = load_raw(cfg(files["share"]), "causal_lm", 0).train  # 36 rows
    few = draw(ds, 10, [0, 1])
    assert len(few) == 10 and len({str(m) for m in few["messages"]}) == 10
    many = Counter(str(m) for m in draw(ds, 80, [0, 1])["messages"])
    assert sorted(set(many.values())) == [2, 3] and sum(v == 3 for v in many.values()) == 8  # 80 = 2·36 + 8


def test_weights_set_each_sources_share(files):
    raw = load_raw(mix({"source": files["alpaca"], "weight": 2}, {"source": files["share"], "weight": 1}),
                   "causal_lm", 0)
    a, s = raw.parts
    assert (a.name, s.name) == ("alpaca.jsonl", "share.jsonl")
    assert (len(a.eval), len(s.eval)) == (10, 4)  # each source's own held-out split (eval_fraction 0.1)
    assert (len(a.train), len(s.train)) == (84, 42)  # 126 = 90 + 36 rows, shared 2:1
    assert raw.format == "mixed" and a.format == "instruction" and s.format == "chat"
    assert raw.notes[0] == ("data: 2 sources, 126 training examples: alpaca.jsonl 84 of 90 (67%), share.jsonl 42 "
                            "from 36, repeated (33%); held out: alpaca.jsonl 10, share.jsonl 4")
    capped = load_raw(mix({"source": files["alpaca"], "weight": 3}, {"source": files["share"], "weight": 1,
                                                                         "max_examples": 20}, max_examples=60), "causal_lm", 0)
    assert [len(p.train) for p in capped.parts] == [45, 15]
    assert "share.jsonl 15 of 20 (25%)" in capped.notes[0]


def test_without_weights_every_row_of_each_source_is_taken_once(files):
    raw = load_raw(mix(files["alpaca"], {"source": files["share"]}), "causal_lm", 0)
    assert [len(p.train) for p in raw.parts] == [90, 36]
    assert all(len(set(map(str, p.train.to_list()))) == len(p.train) for p in raw.parts)  # no row repeated
    assert raw.notes[0].startswith("data: 2 sources, 126 training examples: alpaca.jsonl 90 (71%), share.jsonl 36 (29%)")
    capped = load_raw(mix(files["alpaca"], files["share"], max_examples=63), "causal_lm", 0)
    assert [len(p.train) for p in capped.parts] == [45, 18]  # in proportion to the rows
    with pytest.raises(ValidationError, match=r"data.sources\[1\] has no weight while data.sources\[0\] has one"):
        mix({"source": files["alpaca"], "weight": 2}, files["share"])


def test_the_same_recipe_gives_the_same_mix_and_another_seed_another(files):
    sources = ({"source": files["alpaca"], "weight": 1}, {"source": files["share"], "weight": 3})
    first, again = (load_raw(mix(*sources), "causal_lm", 7) for _ in range(2))
    for p, q in zip(first.parts, again.parts):
        assert p.train.to_list() == q.train.to_list() and p.eval.to_list() == q.eval.to_list()
    other = load_raw(mix(*sources), "causal_lm", 8)
    assert first.parts[0].train.to_list() != other.parts[0].train.to_list()


def test_each_held_out_split_is_the_one_the_source_gives_alone(files):
    raw = load_raw(mix(files["alpaca"], files["share"], eval_max_examples=3), "causal_lm", 5)
    for part, source in zip(raw.parts, (files["alpaca"], files["share"])):
        alone = load_raw(cfg(source, eval_max_examples=3), "causal_lm", 5)
        assert part.eval.to_list() == alone.eval.to_list() and len(part.eval) == 3
        assert not {str(r) for r in part.eval.to_list()} & {str(r) for r in part.train.to_list()}


def test_per_source_fields_default_to_the_data_sections(tmp_path, files):
    body = write_jsonl(tmp_path / "body.jsonl", [{"body": f"w{i} w{i + 1} w{i + 2}"} for i in range(20)])
    raw = load_raw(mix({"source": body, "text_field": "body"}, files["alpaca"]), "causal_lm", 0)
    assert [p.format for p in raw.parts] == ["text", "instruction"]
    with pytest.raises(LorakitError, match=r"^data.sources\[0\] '.*body.jsonl': data.text_field 'text' not in"):
        load_raw(mix(body, files["alpaca"]), "causal_lm", 0)
    with pytest.raises(LorakitError, match=r"^data.sources\[1\] '.*share.jsonl': data.messages_field 'messages' not in"):
        load_raw(mix({"source": files["alpaca"], "format": "instruction"}, files["share"], format="chat",
                     messages_field="messages"), "causal_lm", 0)


def test_errors_and_notes_name_the_source_by_its_place(tmp_path, files):
    with pytest.raises(LorakitError, match=r"^data.sources\[1\] '.*nope.jsonl': not a built-in .* no such file"):
        load_raw(mix(files["alpaca"], str(tmp_path / "nope.jsonl")), "causal_lm", 0)
    bad = write_jsonl(tmp_path / "bad.jsonl", SHAREGPT[:5] + [{"conversations": [{"from": "human", "value": "x"}]}])
    with pytest.raises(LorakitError, match=r"^data.sources\[2\] '.*bad.jsonl' row 6: no gpt .*\(1 bad row of 6\)"):
        load_raw(mix(files["alpaca"], files["share"], bad), "causal_lm", 0)
    raw = load_raw(mix(files["alpaca"], bad, skip_bad_rows=True), "causal_lm", 0)
    assert raw.notes[1].startswith(f"data.sources[1] '{bad}': skipped 1 bad row of 6")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a b"}\n{"text": \n')
    with pytest.raises(LorakitError, match=r"^data.sources\[0\] '.*broken.jsonl': line 2 is not valid JSON"):
        load_raw(mix(str(broken), files["alpaca"]), "causal_lm", 0)


def test_classification_sources_need_one_label_set(tmp_path):
    def labelled(name, labels):
        return write_jsonl(tmp_path / name, [{"text": f"w{i} w{i + 1}", "label": labels[i % len(labels)]}
                                             for i in range(30)])

    same = load_raw(mix(labelled("a.jsonl", ["x", "y"]), labelled("b.jsonl", ["y", "x"])),
                    "seq_cls", 0)
    assert same.format == "classification" and same.label_names == ["x", "y"]
    with pytest.raises(LorakitError, match=r"^data.sources\[1\] '.*c.jsonl' has labels \['x', 'y', 'z'\], data.sources"
                                           r"\[0\] '.*a.jsonl' has \['x', 'y'\]: classification sources need the same"):
        load_raw(mix(str(tmp_path / "a.jsonl"), labelled("c.jsonl", ["x", "y", "z"])), "seq_cls", 0)


def test_a_mix_of_formats_tokenizes_each_with_its_own_loss_mask(files, tiny_tokenizer):
    tok = tiny_tokenizer
    raw = load_raw(mix({"source": files["alpaca"], "weight": 1}, {"source": files["share"], "weight": 1}),
                   "causal_lm", 0)
    bundle = tokenize(raw, cfg("x"), tok, "causal_lm")
    assert len(bundle.train) == 126 and len(bundle.eval) == 14
    assert bundle.stats["eval_sources"] == {"alpaca.jsonl": 10, "share.jsonl": 4}
    for row in bundle.train:
        text = tok.decode(row["input_ids"])
        (answer,) = supervised(row["input_ids"], row["labels"])  # one answer each: the output / the gpt turn
        prompt = "Add " if "Add " in text else "Say "
        assert text.startswith("<|im_start|>user\n" + prompt) and tok.decode(answer).endswith("<|im_end|>")
        assert prompt not in tok.decode(answer)
    assert {"Add", "Say"} <= {p[0]["content"].split()[0] for p in bundle.sample_prompts}  # samples from both


def test_lorakit_train_on_a_mix_then_eval(tmp_path, tiny_world, files):
    import json

    from tests.helpers_cli import invoke
    from tests.tiny_run import tiny_recipe, write_recipe

    data = {"source": None, "format": "auto",
            "sources": [{"source": tiny_world["chat"], "weight": 1}, {"source": files["share"], "weight": 3}]}
    recipe = write_recipe(tmp_path / "mix.yaml", tiny_recipe(tiny_world, tmp_path / "run", data=data,
                                                             train={"max_steps": 2}))
    result = invoke("train", recipe)
    assert result.exit_code == 0, result.output
    assert ("data: 2 sources, 65 training examples: chat.jsonl 16 of 29 (25%), share.jsonl 49 from 36, repeated "
            "(75%); held out: chat.jsonl 3, share.jsonl 4") in result.stderr  # 32 and 40 rows, 10% held out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())  # the end's eval, per source too
    assert [m["eval_tokens"] for m in summary["after_by_source"].values()] and list(summary["after_by_source"]) == [
        "chat.jsonl", "share.jsonl"] and "  share.jsonl: eval_loss " in result.stderr
    stored = (tmp_path / "run" / "final" / "recipe.yaml").read_text()
    assert "share.jsonl" in stored and "source: null" in stored
    evaluated = invoke("eval", tmp_path / "run", "--json")  # the stored recipe loads again: the same 7 held out
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.stdout)
    assert metrics["eval_examples"] == 7 and list(metrics["sources"]) == ["chat.jsonl", "share.jsonl"]
    parts = metrics["sources"].values()
    assert [m["eval_examples"] for m in parts] == [3, 4]
    tokens = sum(m["eval_tokens"] for m in parts)  # the whole is the sources together, token-weighted
    assert tokens == metrics["eval_tokens"]
    assert sum(m["eval_loss"] * m["eval_tokens"] for m in parts) / tokens == pytest.approx(metrics["eval_loss"], rel=1e-5)
    table = invoke("eval", tmp_path / "run")
    assert table.exit_code == 0 and "held-out metrics by source" in table.stdout and "share.jsonl" in table.stdout
    other = invoke("eval", tmp_path / "run", "--data", tiny_world["chat"], "--json")  # --data replaces the mix
    assert other.exit_code == 0 and json.loads(other.stdout)["eval_examples"] == 32, other.output


def test_a_resumed_mixed_run_ends_where_an_uninterrupted_one_ends(tmp_path, tiny_world, files):
    """The mix and its order depend on the recipe alone: stopped at step 2 and resumed, the adapter is
    the one of the run trained straight through."""
    from safetensors.torch import load_file

    from tests.helpers_cli import invoke, lorakit_process, max_difference
    from tests.tiny_run import tiny_recipe, write_recipe

    data = {"source": None, "format": "auto", "sources": [{"source": tiny_world["chat"], "weight": 1}, {"source": files["share"], "weight": 2}]}
    adapters = []
    for name, stop in (("straight", None), ("resumed", "step:2=INT")):
        recipe = write_recipe(tmp_path / f"{name}.yaml", tiny_recipe(tiny_world, tmp_path / name, data=data,
                                                                     train={"max_steps": 4, "save_every": 2}))
        if stop:
            assert lorakit_process("train", recipe, kill_at=stop).returncode == 130
            result = invoke("train", recipe, "--resume")
        else:
            result = invoke("train", recipe)
        assert result.exit_code == 0, result.output
        adapters.append(load_file(tmp_path / name / "final" / "adapter.safetensors"))
    assert max_difference(*adapters) <= 1e-6
