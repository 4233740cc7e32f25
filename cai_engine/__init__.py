"""cai-engine: a minimal native engine for Constitutional AI training."""
from .config import ModelConfig
from .engine import LLM, Completion, RequestOutput
from .errors import CheckpointError
from .loading import DEFAULT_MODEL, load_model
from .model import KVCache, Transformer
from .sampling import SamplingParams
from .tokenizer import Tokenizer

__all__ = ["CheckpointError", "Completion", "DEFAULT_MODEL", "KVCache", "LLM", "ModelConfig", "RequestOutput",
           "SamplingParams", "Tokenizer", "Transformer", "load_model"]
__version__ = "0.1.0"

