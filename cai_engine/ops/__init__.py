"""Public ops: autograd + backend dispatch (Triton on CUDA, native C++ on CPU, torch reference)."""
from .attention import attention
from .kl import full_kl, kl_penalty
from .logprob import token_logprobs
from .projection import project
from .pm_loss import pairs_from_chosen_rejected, pairs_from_ranking, pairs_from_soft_matrix, pairwise_pm_loss
from .rms_norm import rms_norm
from .rope import rope
from .swiglu import swiglu

__all__ = ["attention", "full_kl", "kl_penalty", "pairs_from_chosen_rejected", "pairs_from_ranking", "pairs_from_soft_matrix",
           "pairwise_pm_loss", "project", "rms_norm", "rope", "swiglu", "token_logprobs"]
