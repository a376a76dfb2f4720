"""``lorakit generate`` / ``lorakit chat`` (lorakit.generate): stopping at the end-of-turn token, the
same greedy reply from a run, its PEFT export and its merged model, and an interactive chat on stdin."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.generate import GenerationOptions, generate_reply, load_for_generation, stop_token_ids
from tests.helpers_data import make_tiny_tokenizer

runner = CliRunner()
GREEDY = ["--greedy", "--max-new-tokens", "6"]
CHATS = [{"messages": [{"role": "user", "content": "Hello there, how are you today?"},
                       {"role": "assistant", "content": "I am fine, thank you."}]},
         {"messages": [{"role": "user", "content": "What is AI?"},
                       {"role": "assistant", "content": "Machines that think."}]}] * 8


def tiny_chat_model(folder, eos: str = "<|im_end|>", always: str | None = None):
    """A tiny Llama + ChatML tokenizer saved to ``folder``. With ``always`` the model emits that token
    at every step: the residual stream is the token embedding (o_proj, down_proj zeroed), every
    embedding has a large first coordinate, and only ``always``'s LM-head row reads it."""
    tok = make_tiny_tokenizer()
    tok.eos_token = eos
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=always is None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    if always is not None:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            model.model.embed_tokens.weight[:, 0] = 10.0
            model.lm_head.weight.zero_()
            model.lm_head.weight[tok.convert_tokens_to_ids(always), 0] = 1.0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_stops_at_end_of_turn_even_when_eos_differs(tmp_path):
    """Pain point 10: eos is <|endoftext|>, the chat model ends turns with <|im_end|>: still one token."""
    folder = tiny_chat_model(tmp_path, eos="<|endoftext|>", always="<|im_end|>")
    model, tok, device, _ = load_for_generation(str(folder))
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(model, tok)
    text, n = generate_reply(model, tok, device, "Hello", GenerationOptions(max_new_tokens=20, greedy=True), stream=False)
    assert (text, n) == ("", 1)
    sampled = generate_reply(model, tok, device, "Hello", GenerationOptions(max_new_tokens=20, seed=0), stream=False)
    assert sampled == ("", 1)


def test_streams_the_reply_it_returns(tmp_path):
    model, tok, device, _ = load_for_generation(str(tiny_chat_model(tmp_path)))
    pieces = []
    text, n = generate_reply(model, tok, device, "What is AI?", GenerationOptions(max_new_tokens=8, greedy=True),
                             stream=pieces.append)
    assert 1 <= n <= 8 and "".join(pieces).strip() == text


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-step LoRA run on a tiny chat model, through `lorakit train`."""
    root = tmp_path_factory.mktemp("gen_run")
    tiny_chat_model(root / "base")
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    (root / "r.yaml").write_text(json.dumps({
        "model": {"name_or_path": str(root / "base")},
        "method": {"name": "lora", "r": 4, "lora_alpha": 64, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj"]},
        "data": {"source": str(root / "chats.jsonl"), "format": "chat", "max_seq_length": 48},
        "train": {"learning_rate": 0.5, "batch_size": 4, "max_steps": 1, "num_samples": 0},
        "output_dir": str(root / "run"),
    }))
    result = runner.invoke(app, ["train", str(root / "r.yaml")])
    assert result.exit_code == 0, result.output
    return root


def reply(target, *extra) -> str:
    result = runner.invoke(app, ["generate", str(target), "--prompt", "What is AI?", *GREEDY, *extra])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_run_peft_export_and_merged_model_reply_alike(run):
    from_run = reply(run / "run")
    assert from_run.strip() and from_run != reply(run / "base")  # the adapter changed the reply
    assert reply(run / "run" / "final" / "peft") == from_run
    merged = runner.invoke(app, ["merge", str(run / "run"), "-o", str(run / "merged")])
    assert merged.exit_code == 0, merged.output
    assert reply(run / "merged") == from_run


def test_chat_reads_turns_until_exit(run):
    result = runner.invoke(app, ["chat", str(run / "run"), *GREEDY, "--system", "Be brief."],
                           input="hello\n/reset\nWhat is AI?\n/exit\nnever read\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("you> ") == 4 and result.stdout.count("assistant> ") == 2
    assert "history cleared" in result.output


def test_missing_target_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["generate", str(tmp_path / "nothing-here"), "-p", "hi"])
    assert result.exit_code != 0 and "Traceback" not in result.output


@pytest.mark.slow
def test_quickstart_run_generates(tmp_path):
    args = ["train", "recipes/quickstart.yaml", "train.max_steps=1", "train.batch_size=2", "data.max_examples=16",
            "data.eval_max_examples=4", "data.max_seq_length=48", "train.num_samples=0", f"output_dir={tmp_path / 'run'}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    text = reply(tmp_path / "run", "--max-new-tokens", "16")
    assert len(text.strip()) > 0
