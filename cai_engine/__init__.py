"""cai-engine: a minimal native engine for Constitutional AI training."""
from .config import ModelConfig
from .errors import CheckpointError
from .loading import DEFAULT_MODEL, load_model
from .model import KVCache, Transformer
from .tokenizer import Tokenizer

__all__ = ["CheckpointError", "DEFAULT_MODEL", "KVCache", "ModelConfig", "Tokenizer", "Transformer", "load_model"]
__version__ = "0.1.0"

