"""One decoder for the Llama family (Llama 2/3, Mistral, Qwen2, SmolLM).

Parameter names follow the Hugging Face layout minus the leading "model." so checkpoints map 1:1.
`forward` returns final hidden states; the LM head is a separate weight consumed by the fused ops.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from ..ops.attention import attention
from ..ops.decode_layer import decode_layer_, fusable
from ..ops.linear import gated_linear, linear, linears
from ..ops.paged_attention import PagedBatch, paged_attention
from ..ops.projection import project
from ..ops.rms_norm import rms_norm
from ..ops.rope import rope, rope_store_
from ..ops.swiglu import swiglu

try:  # optional GPU extra
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # our fused op: fp32 arithmetic, one rounding; in training it saves x and one rstd per row and hands the
        # projections their matmul dtype (bf16 under autocast) instead of an fp32 result each of them casts and
        # keeps. Training, evaluation and sampling all run it, so the three score a token with the same bits.
        return rms_norm(x, self.weight, self.eps, out_dtype=compute_dtype(x))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls run in: autocast's where it is on (bf16-mixed training), else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


@dataclass(slots=True)
class AttentionInputs:
    """Per-forward attention context shared by every layer."""
    cos: torch.Tensor                     # [B, T, head_dim] ([T, head_dim], float32, in the engine's step)
    sin: torch.Tensor                     # sin with its first half negated (see ops.rope.apply_rope)
    mask: torch.Tensor | None = None      # [B, 1, T, S]: bool (True = attend) or additive; None = causal
    varlen: tuple | None = None           # (token index, cu_seqlens, max_len) for flash-attn
    cache: "KVCache | None" = None
    paged: "PagedBatch | None" = None     # the sampling engine's paged KV cache
    fused_decode: bool = False            # the engine's step runs each layer as one native call (ops.decode_layer)


class KVCache:
    """Dense per-layer KV cache for simple generation (the paged engine has its own)."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > max_len={self.max_len}")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        d, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(self, x: torch.Tensor, ctx: AttentionInputs) -> torch.Tensor:
        B, T, _ = x.shape
        q = project(x, self.q_proj).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = project(x, self.k_proj).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = project(x, self.v_proj).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = rope(q, ctx.cos, ctx.sin), rope(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer, k, v)
        if ctx.varlen is not None:
            out = self._flash_varlen(q, k, v, ctx.varlen)
        else:
            causal = ctx.mask is None and T > 1
            out = attention(q, k, v, mask=ctx.mask, causal=causal)
        return project(out.transpose(1, 2).reshape(B, T, -1), self.o_proj)

    def paged(self, x: torch.Tensor, ctx: AttentionInputs, norm: RMSNorm) -> torch.Tensor:
        """The engine's step: x [T, d] (the residual stream) holds the new tokens of every sequence, flattened
        (heads stay [T, heads, D]); returns x + attention(norm(x)), the norm made inside the q/k/v projections and
        the sum inside the output projection."""
        T, paged = x.shape[0], ctx.paged
        projections = (self.q_proj, self.k_proj, self.v_proj)
        q, k, v = linears(x, [p.weight for p in projections], [p.bias for p in projections],
                          norm=(norm.weight, norm.eps))
        q, k = q.view(T, self.n_heads, self.head_dim), k.view(T, self.n_kv, self.head_dim)
        v = v.view(T, self.n_kv, self.head_dim)
        k_cache, v_cache = paged.cache.k[self.layer], paged.cache.v[self.layer]
        q, k = rope_store_(q, k, v, ctx.cos, ctx.sin, k_cache, v_cache, paged.slots)
        out = paged_attention(q, k_cache, v_cache, paged.block_tables, paged.context_lens, paged.query_lens,
                              plan=paged.plan, new_kv=(k, v))
        return linear(out.view(T, -1), self.o_proj.weight, residual=x)

    @staticmethod
    def _flash_varlen(q, k, v, varlen) -> torch.Tensor:
        index, cu, max_len = varlen
        B, H, T, D = q.shape
        flat = lambda t: t.transpose(1, 2).reshape(B * T, t.shape[1], D)[index]
        o = flash_attn_varlen_func(flat(q), flat(k), flat(v), cu, cu, max_len, max_len, causal=True)
        out = q.new_zeros(B * T, H, D)
        out[index] = o
        return out.view(B, T, H, D).transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # our fused op (one rounding; in training it keeps gate and up only, not silu(gate) too)
        return project(swiglu(project(x, self.gate_proj), project(x, self.up_proj)), self.down_proj)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, ctx: AttentionInputs) -> torch.Tensor:
        if ctx.paged is not None:
            return self._paged(x, ctx)
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))

    def _paged(self, x: torch.Tensor, ctx: AttentionInputs) -> torch.Tensor:
        """The engine's step (no autograd): the same layer with the norms, the residual adds and the SwiGLU inside
        the projections (ops.linear: on AMX CPUs one bf16 kernel call each, rounding once); a pure decode step
        there, or in fp32 on AVX2 CPUs, runs the whole layer as one native call (ops.decode_layer), the same kernels
        chained in C++."""
        attn, mlp = self.self_attn, self.mlp
        if ctx.fused_decode:
            projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                           mlp.down_proj)
            return decode_layer_(x, [p.weight for p in projections], [p.bias for p in projections[:3]],
                                 self.input_layernorm.weight, self.post_attention_layernorm.weight,
                                 self.input_layernorm.eps, ctx.cos, ctx.sin, ctx.paged, attn.layer, attn.n_heads)
        x = self.self_attn.paged(x, ctx, norm=self.input_layernorm)
        norm = self.post_attention_layernorm
        h = gated_linear(x, mlp.gate_proj.weight, mlp.up_proj.weight, norm=(norm.weight, norm.eps))
        return linear(h, mlp.down_proj.weight, residual=x)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head_weight = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.use_flash_attn = True
        # Training only: keep each layer's input and recompute the layer during backward (one more forward's
        # compute for activations of one layer instead of all). Set by the trainer loop (run.activation_checkpointing).
        self.activation_checkpointing = False

    @property
    def lm_head(self) -> torch.Tensor:
        """The [vocab, hidden] output projection (the embedding matrix when tied)."""
        return self.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head_weight

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        paged: PagedBatch | None = None,
    ) -> torch.Tensor:
        """Final hidden states [B, T, d].

        attention_mask: [B, T], 1 for real tokens, 0 for (right) padding.
        segment_ids: [B, T], packed sequences; tokens attend only within their segment.
        attn_mask: [B, T, T] bool, an extra restriction (True = may attend), e.g. prefix sharing.
        cache: dense KV cache; new tokens are appended after `cache.length`.
        paged: the engine's step (input_ids [1, T] holds several sequences' new tokens, position_ids given).
        """
        squeeze = input_ids.dim() == 1
        if squeeze:
            input_ids = input_ids.unsqueeze(0)
        B, T = input_ids.shape
        offset = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(offset, offset + T, device=input_ids.device).expand(B, T)
        elif position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0).expand(B, T)
        x = self.embed_tokens(input_ids)
        if paged is not None:  # no mask to build; the step rotates in fp32 as it writes the KV cache
            cos, sin = self._rotations(position_ids[0], torch.float32)
            x = x[0]  # the layers take the step's flattened [T, d] rows
            ctx = AttentionInputs(cos=cos, sin=sin, paged=paged,
                                  fused_decode=fusable(x, paged, self.config.num_attention_heads,
                                                       self.config.intermediate_size))
        else:
            ctx = self._attention_inputs(x, position_ids, attention_mask, segment_ids, attn_mask, cache)
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and cache is None and paged is None
        for layer in self.layers:
            # no randomness inside a layer, so no RNG state to save for the recomputation
            x = checkpoint(layer, x, ctx, use_reentrant=False, preserve_rng_state=False) if recompute else layer(x, ctx)
        if cache is not None:
            cache.length += T
        x = self.norm(x if paged is None else x[None])
        return x[0] if squeeze else x

    def logits(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Dense [.., vocab] logits: for tests and small cases only (the fused ops never build them)."""
        return F.linear(self(input_ids, **kwargs), self.lm_head)

    def _rotations(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos and signed sin (see apply_rope) for every position: [..., head_dim]."""
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        sin = emb.sin()
        sin[..., :freqs.shape[-1]] *= -1
        return emb.cos().to(dtype), sin.to(dtype)

    def _attention_inputs(self, x, position_ids, attention_mask, segment_ids, attn_mask, cache) -> AttentionInputs:
        # fp32: ops.rope rotates in fp32 and rounds once to q's and k's dtype (bf16 under autocast), as the engine does
        cos, sin = self._rotations(position_ids, torch.float32)
        ctx = AttentionInputs(cos=cos, sin=sin, cache=cache)
        B, T = position_ids.shape
        if cache is None and attention_mask is None and segment_ids is None and attn_mask is None and T == 1:
            return ctx
        window = self.config.sliding_window
        needs_window = window is not None and T + (cache.length if cache else 0) > window
        if attention_mask is None and segment_ids is None and attn_mask is None and not needs_window:
            if cache is not None and cache.length > 0 and T > 1:  # chunk after a cached prefix
                ctx.mask = _causal(T, cache.length + T, cache.length, x.device).expand(B, 1, T, -1)
            return ctx
        if cache is not None and (attention_mask is not None or segment_ids is not None or attn_mask is not None):
            raise ValueError("padding, packing and custom masks are not supported together with a dense KV cache")
        if (self.use_flash_attn and flash_attn_varlen_func is not None and x.is_cuda and attn_mask is None
                and not needs_window and x.dtype in (torch.float16, torch.bfloat16) and cache is None):
            ctx.varlen = _varlen_index(attention_mask, segment_ids, B, T, x.device)
            return ctx
        offset = cache.length if cache is not None else 0
        mask = _causal(T, offset + T, offset, x.device).expand(B, 1, T, offset + T)
        if window is not None and cache is None:
            # by position, not column: in a packed row (pack_shared) an answer sits further right than its
            # distance to the prompt it continues, and each sequence's positions restart
            mask = mask & (position_ids[:, :, None] - position_ids[:, None, :] < window)[:, None]
        elif window is not None:
            q = torch.arange(offset, offset + T, device=x.device)[:, None]
            mask = mask & (q - torch.arange(offset + T, device=x.device)[None, :] < window)
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
        if segment_ids is not None:
            mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
        if attn_mask is not None:
            mask = mask & attn_mask[:, None].bool()
        # A padded query row would have nothing to attend to (SDPA gives NaN): let it see itself.
        diag = torch.arange(offset, offset + T, device=x.device)[:, None] == torch.arange(offset + T, device=x.device)
        # additive, in the matmul dtype, made once per forward: SDPA would convert a bool mask in every layer and
        # autograd would keep each layer's converted copy
        ctx.mask = torch.zeros(mask.shape, dtype=compute_dtype(x), device=x.device).masked_fill_(~(mask | diag), float("-inf"))
        return ctx


def _causal(T: int, S: int, offset: int, device) -> torch.Tensor:
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(offset)


def _varlen_index(attention_mask, segment_ids, B, T, device):
    valid = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
    seg = torch.zeros(B, T, dtype=torch.int64, device=device) if segment_ids is None else segment_ids.long()
    seg = seg + torch.arange(B, device=device)[:, None] * (seg.max() + 1)
    index = valid.flatten().nonzero().squeeze(1)
    seg = seg.flatten()[index]
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[1:] = seg[1:] != seg[:-1]
    cu = torch.cat([starts.nonzero().squeeze(1), seg.new_tensor([seg.numel()])]).to(torch.int32)
    return index, cu, int((cu[1:] - cu[:-1]).max())
