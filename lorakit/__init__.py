"""lorakit: fine-tune language models with the whole LoRA family, from YAML recipes."""

__version__ = "0.1.0"
