"""Weights in and out (HF directories, GGUF), the decoder and its heads. Knows nothing of training."""
from .config import ModelConfig
from .decoder import KVCache, Transformer
from .loading import DEFAULT_MODEL, load_model, save_model
from .tokenizer import Tokenizer

__all__ = ["DEFAULT_MODEL", "KVCache", "ModelConfig", "Tokenizer", "Transformer", "load_model", "save_model"]
