"""Models used to train and benchmark the optimizers."""

from .llama import MODEL_CONFIGS, Llama, LlamaConfig, get_config

__all__ = ["LlamaConfig", "Llama", "MODEL_CONFIGS", "get_config"]
