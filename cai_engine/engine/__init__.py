"""The sampler: turns prompts into tokens on the live weights (`LLM`). Knows nothing of CAI."""
from .llm import LLM, Completion, RequestOutput
from .sampling import SamplingParams

__all__ = ["LLM", "Completion", "RequestOutput", "SamplingParams"]
