"""A whole ``lorakit train`` run in about a second: a tiny Llama + ChatML tokenizer saved offline, and small
chat / text data sets, written once per test session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from tests.helpers_data import make_tiny_tokenizer

QUESTIONS = ["What is AI?", "How are you today?", "What is the capital of France?", "Add 2 and 3.",
             "Name a colour.", "What does a fox do?", "Say hello.", "Is the dog lazy?"]


def write_model(folder: Path) -> Path:
    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_chat(path: Path, n: int = 32) -> Path:
    rows = [{"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]},
                          {"role": "assistant", "content": f"Answer number {i % 5}."}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> dict:
    """{"model": folder, "chat": jsonl path}."""
    root = tmp_path_factory.mktemp("tiny_world")
    return {"model": str(write_model(root / "model")), "chat": str(write_chat(root / "chat.jsonl"))}


def tiny_recipe(world: dict, run_dir: Path, **sections) -> dict:
    """A recipe mapping for a few CPU steps on the tiny model; ``sections`` update model/method/data/train."""
    recipe = {
        "model": {"name_or_path": world["model"]},
        "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        "data": {"source": world["chat"], "format": "chat", "max_seq_length": 48},
        "train": {"learning_rate": 1e-2, "batch_size": 4, "max_steps": 4, "num_samples": 0, "precision": "fp32",
                  "compile": False},
        "output_dir": str(run_dir),
    }
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values} if isinstance(values, dict) else values
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
