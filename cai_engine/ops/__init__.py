"""Public ops: autograd + backend dispatch (Triton on CUDA, native C++ on CPU, torch reference)."""
from .kl import full_kl, kl_penalty
from .logprob import token_logprobs

__all__ = ["full_kl", "kl_penalty", "token_logprobs"]
