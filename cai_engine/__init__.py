"""cai-engine: a minimal native engine for Constitutional AI training."""
from .engine import LLM, Completion, RequestOutput, SamplingParams
from .errors import CheckpointError
from .model import DEFAULT_MODEL, KVCache, ModelConfig, Tokenizer, Transformer, load_model, save_model

__all__ = ["CheckpointError", "Completion", "DEFAULT_MODEL", "KVCache", "LLM", "ModelConfig", "RequestOutput",
           "SamplingParams", "Tokenizer", "Transformer", "load_model", "save_model"]
__version__ = "0.1.0"
