"""Attention over a paged KV cache: the decoder's view of one engine step (`PagedBatch`) and the decode /
prefill / cascade attention that reads the cache through block tables (Triton, native C++ and torch).

Precision: q and the cache may be bfloat16, but scores, softmax, log-sum-exps and the merge of partials
are float32 on every path (a bf16 score rounds to 3 significant digits, which a softmax over a long
context turns into visible weight errors); the output is cast back to q's dtype once, at the end.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dataclasses import dataclass, field

from .backend import as_buffer, choose_backend
from .linear import f32_kernel_preferred, tiles_preferred


@dataclass(slots=True)
class PagedBatch:
    """One engine step: the new tokens of several sequences, flattened, and where their KV lives."""
    cache: "PagedKVCache"        # cai_engine.engine.kv_cache.PagedKVCache (k, v lists per layer, store())
    slots: torch.Tensor          # [T] slot of every new token
    block_tables: torch.Tensor   # [B, max_blocks] int32
    context_lens: torch.Tensor   # [B] tokens with KV after this step (cached + new)
    query_lens: list[int]        # new tokens per sequence, in order
    plan: dict = field(default_factory=dict)  # attention metadata built by the first layer, reused by the rest


MIN_SHARED_BLOCKS = 4  # below this, reading the shared prefix once per sequence costs little


def common_prefix_blocks(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> int:
    """How many leading blocks every sequence of the batch shares (the same physical blocks)."""
    full = int(context_lens.min()) // block_size
    same = (block_tables[:, :full] == block_tables[:1, :full]).all(0)
    return full if bool(same.all()) else int(same.long().cumprod(0).sum())


def softmax_(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis in place; returns the log-sum-exp. A row with every score -inf (no
    visible key) becomes zeros with log-sum-exp -inf, so it weighs nothing when partials merge."""
    if choose_backend(scores) == "native" and scores.dtype == torch.float32 and scores.is_contiguous():
        from .. import _native
        lse = scores.new_empty(scores.shape[:-1])
        _native.softmax_rows_(scores.view(-1, scores.shape[-1]).numpy(), lse.view(-1).numpy())
        return lse
    m = scores.amax(-1, keepdim=True)
    m = torch.where(m.isfinite(), m, 0.0)
    total = scores.sub_(m).exp_().sum(-1, keepdim=True)
    scores.div_(total.clamp_min(torch.finfo(total.dtype).tiny))
    return (m + total.log()).squeeze(-1)


def _partial(scores: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(scores) @ values, log-sum-exp of the scores), float32 (scores are float32)."""
    lse = softmax_(scores)
    return torch.matmul(scores, values.float()), lse


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q @ k as float32 scores whatever the inputs' dtype (bf16 operands are exact in float32)."""
    return torch.matmul(q.float(), k.float())


def merge_partials(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Attention over two disjoint key sets from each one's normalised output and log-sum-exp [.., H]."""
    lse = torch.logaddexp(lse1, lse2)
    return o1 * (lse1 - lse).exp().unsqueeze(-1) + o2 * (lse2 - lse).exp().unsqueeze(-1)


def _prefix_partial(q: torch.Tensor, k_cache, v_cache, prefix: torch.Tensor, scale: float):
    """Every query of the batch, q [B, H, D], against the shared blocks `prefix`: (out [B, H, D], lse [B, H]),
    float32. Native, the blocks read in place, where a kernel takes the cache (`_native_kernels`); else one gathered
    fp32 GEMM per KV head."""
    (B, H, D), n_kv = q.shape, k_cache.shape[2]
    kernels = _native_kernels(q, k_cache, v_cache)
    if kernels:
        out, lse = torch.empty(B, H, D, dtype=torch.float32), torch.empty(B, H, dtype=torch.float32)
        kernels[0](as_buffer(q.contiguous()), as_buffer(k_cache), as_buffer(v_cache), prefix.to(torch.int32).numpy(),
                   scale, out.numpy(), lse.numpy())
        return out, lse
    G = H // n_kv
    # one gathered float32 copy each, viewed [n_kv, Lp, D] with strides BLAS takes as they are
    kp = k_cache.index_select(0, prefix).float().view(-1, n_kv, D).transpose(0, 1)
    vp = v_cache.index_select(0, prefix).float().view(-1, n_kv, D).transpose(0, 1)
    s = (q.float() * scale).view(B, n_kv, G, D).transpose(0, 1).reshape(n_kv, B * G, D) @ kp.transpose(1, 2)
    o, lse = _partial(s, vp)                                              # [n_kv, B * G, D], [n_kv, B * G]
    return o.view(n_kv, B, G, D).transpose(0, 1).reshape(B, H, D), lse.view(n_kv, B, G).transpose(0, 1).reshape(B, H)


def decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, first_block=0, shared_blocks=0):
    """One query per sequence, q [B, H, D], over its blocks from `first_block` on: (out [B, H, D], lse [B, H]),
    both float32 whatever the dtype of q and the cache.

    Blocks below `shared_blocks` are the same physical blocks for every sequence (block_tables[0]'s):
    they are read once and scored for the whole batch (cascade).
    """
    if shared_blocks > first_block:
        prefix = block_tables[0, first_block:shared_blocks].long()
        o1, lse1 = _prefix_partial(q, k_cache, v_cache, prefix, scale)
        o2, lse2 = decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, shared_blocks)
        return merge_partials(o1, lse1, o2, lse2), torch.logaddexp(lse1, lse2)
    backend, kernels = choose_backend(q), _native_kernels(q, k_cache, v_cache)
    if kernels:
        out, lse = torch.empty(q.shape, dtype=torch.float32), torch.empty(q.shape[:2], dtype=torch.float32)
        kernels[1](as_buffer(q.contiguous()), as_buffer(k_cache), as_buffer(v_cache), block_tables.to(torch.int32).numpy(),
                   context_lens.to(torch.int32).numpy(), scale, out.numpy(), lse.numpy(), first_block)
        return out, lse
    if backend == "native" and k_cache.dtype in (torch.float32, torch.bfloat16) and k_cache.is_contiguous():
        from .. import _native
        out = torch.empty(q.shape, dtype=torch.float32)
        lse = torch.empty(q.shape[:2], dtype=torch.float32)
        _native.paged_decode(q.detach().float().contiguous().numpy(), as_buffer(k_cache), as_buffer(v_cache),
                             block_tables.to(torch.int32).numpy(), context_lens.to(torch.int32).numpy(), scale,
                             out.numpy(), lse.numpy(), first_block)
        return out, lse
    if backend == "triton":
        from ..kernels.paged_attention import paged_decode
        return paged_decode(q, k_cache, v_cache, block_tables, context_lens.to(torch.int32), scale,
                            first_block=first_block, return_lse=True, out_dtype=torch.float32)
    return _decode_attention_torch(q, k_cache, v_cache, block_tables, context_lens, scale, first_block)


def _native_kernels(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
    """(prefix kernel, decode kernel) of the native module that take these operands, or None: the AMX tiles for bf16
    (`_tiles_ok`); the AVX2 fp32 kernels (csrc/attention_f32.cpp) for float32 queries and cache on CPUs that sample
    in fp32 (AVX2, no bf16 units: where the engine's decode attention was measured), head_dim a multiple of 16, at
    most 48 query heads per KV head."""
    if choose_backend(q) != "native":
        return None
    from .. import _native
    if _tiles_ok(q, k_cache, v_cache):
        return _native.prefix_attention, _native.paged_attention_bf16
    if (q.dtype == k_cache.dtype == v_cache.dtype == torch.float32 and q.shape[-1] % 16 == 0
            and q.shape[1] // k_cache.shape[2] <= 48 and k_cache.is_contiguous() and v_cache.is_contiguous()
            and f32_kernel_preferred()):
        return _native.prefix_attention_f32, _native.paged_decode_f32
    return None


def _tiles_ok(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the AMX attention kernels take these: bf16 queries and cache, 16-token blocks (one tile of keys),
    head_dim a multiple of 32, at most 32 query heads per KV head, on a CPU where the tile kernels are preferred."""
    return (q.dtype == k_cache.dtype == v_cache.dtype == torch.bfloat16 and k_cache.shape[1] == 16
            and q.shape[-1] % 32 == 0 and q.shape[1] // k_cache.shape[2] <= 32 and k_cache.is_contiguous()
            and v_cache.is_contiguous() and tiles_preferred())


def _decode_attention_torch(q, k_cache, v_cache, block_tables, context_lens, scale, first_block):
    bs, n_kv, D = k_cache.shape[1:]
    B, H = q.shape[:2]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full((B, H), float("-inf"), device=q.device)
    for b, n in enumerate(context_lens.tolist()):
        if n <= first_block * bs:
            continue
        k = gather_kv(k_cache, block_tables[b], n)[first_block * bs:].float()   # [L, n_kv, D]
        v = gather_kv(v_cache, block_tables[b], n)[first_block * bs:]
        s = torch.einsum("kgd,lkd->kgl", q[b].float().view(n_kv, H // n_kv, D), k).mul_(scale)
        o, l = _partial(s, v.transpose(0, 1))
        out[b], lse[b] = o.reshape(H, D), l.reshape(H)
    return out, lse


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` positions of one sequence as [length, n_kv, D]."""
    n_blocks = -(-length // cache.shape[1])
    return cache[block_table[:n_blocks].long()].flatten(0, 1)[:length]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, query_lens: list[int], scale: float | None = None,
                    plan: dict | None = None, new_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Attention of each sequence's newest `query_lens[b]` tokens over its whole cached context.

    q [sum(query_lens), H, D] (sequences concatenated); returns the same shape. Decoding sequences (one
    new token) go through the paged decode kernels, and each group of them that shares its first blocks
    (a few-shot prefix, n samples of a prompt) has those blocks scored once for the whole group (cascade);
    prefill chunks gather their blocks and run SDPA, causal within the new tokens, and chunks that all
    start past blocks they share score those once too. `plan` caches the step's metadata across layers.
    new_kv: this step's K/V rows [T, n_kv, D] (already stored): a chunk that is its sequence's whole
    context (a fresh prompt) attends them as they are instead of gathering them back from the blocks.
    """
    scale = scale if scale is not None else q.shape[2] ** -0.5
    plan = {} if plan is None else plan
    if "decode" not in plan:
        plan.update(_step_plan(block_tables, context_lens, query_lens, k_cache.shape[1], q.device))
    if plan["all_decode"]:
        return decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                shared_blocks=plan["decode"][0][2])[0].to(q.dtype)
    out = torch.empty_like(q)
    for rows, q_index, shared in plan["decode"]:
        out[q_index] = decode_attention(q[q_index], k_cache, v_cache, block_tables[rows], context_lens[rows], scale,
                                        shared_blocks=shared)[0].to(q.dtype)
    for members, shared, spans in plan["prefill"]:
        if shared:
            _cascade_prefill(q, out, k_cache, v_cache, block_tables[members[0], :shared].long(), spans,
                             [block_tables[b] for b in members], shared * k_cache.shape[1], scale)
        else:
            (start, n_q, n_ctx), = spans
            kv = (new_kv[0][start:start + n_q], new_kv[1][start:start + n_q]) if new_kv and n_q == n_ctx else None
            out[start:start + n_q] = _prefill_attention(q[start:start + n_q], k_cache, v_cache,
                                                        block_tables[members[0]], n_ctx, scale, kv)
    return out


def step_plan(paged: PagedBatch, block_size: int) -> dict:
    """The step's attention plan (built once, kept in paged.plan for every layer)."""
    if "decode" not in paged.plan:
        paged.plan.update(_step_plan(paged.block_tables, paged.context_lens, paged.query_lens, block_size,
                                     paged.slots.device))
    return paged.plan


def _step_plan(block_tables, context_lens, query_lens: list[int], block_size: int, device) -> dict:
    """How a step's sequences are attended, the same for every layer.

    decode: (rows, their query indices, shared blocks): each group of decoding sequences that shares at
    least MIN_SHARED_BLOCKS leading blocks is a cascade; the rest go together with none shared.
    prefill: (rows, shared blocks, (query start, query len, context len) per row): chunks that all start
    past the blocks they share form a cascade; any other chunk stands alone.
    all_decode: one decode group holds every sequence (no indexing needed).
    """
    lens, starts = context_lens.tolist(), [0]
    for n in query_lens[:-1]:
        starts.append(starts[-1] + n)
    decode_rows = [b for b, n in enumerate(query_lens) if n == 1]
    decode, alone = [], []
    for members, shared in _by_shared_prefix(decode_rows, block_tables, context_lens, block_size):
        if shared:
            decode.append((members, shared))
        else:
            alone += members
    if alone:
        decode.append((alone, 0))
    plan = {"all_decode": len(decode) == 1 and len(decode_rows) == len(query_lens)}
    plan["decode"] = [(torch.tensor(m, device=block_tables.device), torch.tensor([starts[b] for b in m], device=device),
                       shared) for m, shared in decode]
    prefill = []
    for members, shared in _by_shared_prefix([b for b, n in enumerate(query_lens) if n > 1], block_tables,
                                             context_lens, block_size):
        past = [b for b in members if lens[b] - query_lens[b] >= shared * block_size] if shared else []
        if len(past) > 1:
            prefill.append((past, shared))
            members = [b for b in members if b not in past]
        prefill += [([b], 0) for b in members]
    plan["prefill"] = [(m, shared, [(starts[b], query_lens[b], lens[b]) for b in m]) for m, shared in prefill]
    return plan


def _by_shared_prefix(rows: list[int], block_tables, context_lens, block_size: int) -> list[tuple[list[int], int]]:
    """`rows` grouped by their first physical block, each group with the leading blocks all its members
    share, or 0 when that is fewer than MIN_SHARED_BLOCKS (or the group has one member)."""
    by_first: dict[int, list[int]] = {}
    for b, first in zip(rows, block_tables[rows, 0].tolist() if rows else []):
        by_first.setdefault(first, []).append(b)
    groups = []
    for members in by_first.values():
        shared = 0
        if len(members) > 1:
            idx = torch.tensor(members, device=block_tables.device)
            shared = common_prefix_blocks(block_tables[idx], context_lens[idx], block_size)
        groups.append((members, shared if shared >= MIN_SHARED_BLOCKS else 0))
    return groups


PREFIX_ROWS_PER_GEMM = 256  # query rows scored against the shared prefix at once: bounds the score buffer


def _cascade_prefill(q, out, k_cache, v_cache, prefix, spans, tables, first: int, scale) -> None:
    """Prefill chunks that all start past the shared blocks `prefix` (tokens [0, first)): every chunk's
    queries meet the prefix keys together (the prefix is read once, not once per chunk), each chunk its own
    later keys causally; the partials merge through their log-sum-exps. On AMX CPUs both parts are one tile kernel
    call each for all the chunks."""
    index = torch.cat([torch.arange(start, start + n, device=q.device) for start, n, _ in spans])
    if choose_backend(q) == "native" and _tiles_ok(q, k_cache, v_cache):
        from .. import _native
        q_rows = q[index]
        o_pre, lse_pre = _prefix_partial(q_rows, k_cache, v_cache, prefix, scale)
        o_own, lse_own = torch.empty(q_rows.shape), torch.empty(q_rows.shape[:2])
        _native.paged_attention_bf16(as_buffer(q_rows), as_buffer(k_cache), as_buffer(v_cache),
                                     torch.stack(tables).to(torch.int32).numpy(),
                                     torch.tensor([n_ctx for _, _, n_ctx in spans], dtype=torch.int32).numpy(), scale,
                                     o_own.numpy(), lse_own.numpy(), first // k_cache.shape[1],
                                     torch.tensor([n_q for _, n_q, _ in spans], dtype=torch.int32).numpy())
        out[index] = merge_partials(o_pre, lse_pre, o_own, lse_own).to(out.dtype)
        return
    parts = [_prefix_partial(q[index[i:i + PREFIX_ROWS_PER_GEMM]], k_cache, v_cache, prefix, scale)
             for i in range(0, len(index), PREFIX_ROWS_PER_GEMM)]
    o_pre, lse_pre = torch.cat([o for o, _ in parts]), torch.cat([lse for _, lse in parts])
    row = 0
    for table, (start, n_q, n_ctx) in zip(tables, spans):
        o_own, lse_own = _own_partial(q[start:start + n_q], k_cache, v_cache, table, first, n_ctx, scale)
        out[start:start + n_q] = merge_partials(o_pre[row:row + n_q], lse_pre[row:row + n_q], o_own, lse_own).to(out.dtype)
        row += n_q


def _own_partial(q, k_cache, v_cache, block_table, first: int, n_ctx: int, scale: float):
    """The last n_q = len(q) tokens of a sequence over its keys [first, n_ctx), causal: (out, lse), float32."""
    n_q, (H, D), n_kv = q.shape[0], q.shape[1:], k_cache.shape[2]
    k = gather_kv(k_cache, block_table, n_ctx)[first:]                            # [L, n_kv, D]
    v = gather_kv(v_cache, block_table, n_ctx)[first:]
    qg = (q.float() * scale).view(n_q, n_kv, H // n_kv, D).permute(1, 2, 0, 3)   # [n_kv, G, n_q, D]
    s = _scores(qg, k.permute(1, 2, 0).unsqueeze(1))                              # [n_kv, G, n_q, L]
    hide = torch.ones(n_q, n_ctx - first, dtype=torch.bool, device=q.device).triu(n_ctx - first - n_q + 1)
    s.masked_fill_(hide, float("-inf"))
    o, lse = _partial(s, v.transpose(0, 1).unsqueeze(1))                          # [n_kv, G, n_q, D]
    return o.permute(2, 0, 1, 3).reshape(n_q, H, D), lse.permute(2, 0, 1).reshape(n_q, H)


def _prefill_attention(q: torch.Tensor, k_cache, v_cache, block_table, n_ctx: int, scale: float,
                       kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The last n_q = len(q) tokens of one sequence over its n_ctx cached tokens (or `kv`, its whole
    context as [n_ctx, n_kv, D] rows), causal among themselves."""
    n_q = q.shape[0]
    k, v = kv if kv is not None else (gather_kv(k_cache, block_table, n_ctx), gather_kv(v_cache, block_table, n_ctx))
    k, v = k.transpose(0, 1).to(q.dtype), v.transpose(0, 1).to(q.dtype)       # [n_kv, ctx, D]
    mask = None
    if n_q < n_ctx:  # new token i sits at position n_ctx - n_q + i and sees everything up to it
        mask = torch.ones(n_q, n_ctx, dtype=torch.bool, device=q.device).tril(n_ctx - n_q)
    # 4-D inputs: with 3-D ones (or GQA) CPU SDPA falls back to its slow math kernel
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask,
                                       is_causal=mask is None, scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1)
