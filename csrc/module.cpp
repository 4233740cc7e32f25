#include <pybind11/stl.h>

#include "dense_attention.h"
#include "block_manager.h"
#include "common.h"
#include "decode_layer.h"
#include "logprob.h"
#include "linear_bf16.h"
#include "linear_f32.h"
#include "attention_f32.h"
#include "linear_grad_bf16.h"
#include "logprob_bf16.h"
#include "paged_attention.h"
#include "pm_loss.h"
#include "tile_attention.h"
#include "rms_norm.h"
#include "rope.h"
#include "rowstats.h"
#include "swiglu.h"

PYBIND11_MODULE(_native, m) {
  m.doc() = "cai-engine CPU kernels (no libtorch: plain buffers in, buffers out)";
  m.def("logsumexp_rows", &logsumexp_rows, py::arg("x"),
        "log(sum(exp(x), axis=1)) of a float32 [rows, cols] array, computed stably.");
  m.def("softmax_rows_", &softmax_rows_, py::arg("x"), py::arg("lse"),
        "Softmax of each row of x [rows, cols] in place; lse [rows] receives the rows' log-sum-exp.");
  m.def("top_p_threshold", &top_p_threshold, py::arg("probs"), py::arg("top_p"), py::arg("iterations") = 32,
        "Per row of probs [rows, V]: the largest t with sum(p[p >= t]) >= top_p[row], by bisection (keeping "
        "p >= t is the top-p nucleus).");
  m.def("sample_rows", &sample_rows, py::arg("logprobs"), py::arg("uniforms"),
        "One draw per row of exp(logprobs) [rows, V] by inverting its CDF at uniforms[row] (in [0, 1)): one pass "
        "for the row's mass, a second that stops at the chunk the running mass passes; never a token of zero mass.");
  m.def("sample_nucleus", &sample_nucleus, py::arg("logits"), py::arg("inv_temp"), py::arg("top_p"),
        py::arg("uniforms"), py::arg("tokens"), py::arg("raw_logprob"), py::arg("processed_logprob"),
        "Temperature + top-p sampling per row of float32 logits [rows, V]: the token at uniforms[row] of the nucleus' "
        "CDF (vocabulary order), and its raw and processed log-probs; no [rows, V] intermediate.");
  m.def("logprob_forward", &logprob_forward, py::arg("logits"), py::arg("labels"), py::arg("inv_temp"),
        py::arg("ignore_index"), py::arg("logp"), py::arg("lse"), py::arg("entropy") = py::none(),
        "Row statistics of softmax(logits * inv_temp): writes log p(label), log-sum-exp and (optionally) entropy.");
  m.def("logprob_backward", &logprob_backward, py::arg("logits"), py::arg("labels"), py::arg("inv_temp"),
        py::arg("lse"), py::arg("entropy"), py::arg("grad_logp"), py::arg("grad_entropy"),
        "Overwrites a [rows, cols] block of raw logits in place with d(loss)/d(logits); labels are relative to the "
        "block's first column (outside [0, cols) adds nothing); ignored rows come with zero upstream gradients.");
  m.def("kl_forward", &kl_forward, py::arg("logits"), py::arg("ref_logits"), py::arg("inv_temp"), py::arg("kl"),
        py::arg("lse"), py::arg("mean_diff"), "Per-row KL(softmax(logits) || softmax(ref_logits)) at a temperature.");
  m.def("kl_backward", &kl_backward, py::arg("logits"), py::arg("ref_logits"), py::arg("inv_temp"), py::arg("lse"),
        py::arg("mean_diff"), py::arg("grad_kl"), "Overwrites logits in place with d(loss)/d(logits) of the KL.");
  m.def("bf16_kernels_available", &bf16_kernels_available,
        "True when this CPU and OS run the bf16 log-prob and KL kernels (the *_bf16 functions): AVX512-BF16.");
  m.def("amx_available", &amx_available,
        "True when those kernels use AMX-BF16 tiles (else VDPBF16PS vectors; CAI_ENGINE_AMX=0 forces the vectors).");
  m.def("bf16_kernels_preferred", &bf16_kernels_preferred,
        "True where the bf16 kernels beat converting bf16 operands to fp32 for BLAS: AMX tiles, or VDPBF16PS on "
        "AMD CPUs (Intel cores without AMX issue it at half the flops of fp32 FMAs).");
  m.def("linear_bf16", &linear_bf16, py::arg("x"), py::arg("weights"), py::arg("biases"), py::arg("outs"),
        py::arg("residual") = py::none(), py::arg("norm_weight") = py::none(), py::arg("eps") = 0.f,
        "bf16 linear layers on AMX tiles: outs[j] = rms_norm?(x) @ weights[j].T (+ biases[j]) (+ residual), fp32 "
        "accumulation, one rounding; x normalised (with norm_weight) and packed once for every weight.");
  m.def("gated_linear_bf16", &gated_linear_bf16, py::arg("x"), py::arg("gate_weight"), py::arg("up_weight"),
        py::arg("out"), py::arg("norm_weight") = py::none(), py::arg("eps") = 0.f,
        "out = silu(h @ gate_weight.T) * (h @ up_weight.T) from bf16 operands, rounded once; h = rms_norm(x) with "
        "norm_weight, else x.");
  m.def("linear_f32", &linear_f32, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("out"),
        "out = x @ weight.T (+ bias) in float32 on AVX2 + FMA, each weight row streamed once for all of x's rows: "
        "the sampling engine's decode steps on CPUs that sample in fp32.");
  m.def("linear_f32_available", &linear_f32_available, "Whether linear_f32 runs here (AVX2 and FMA).");
  m.def("linear_weight_grad_bf16", &linear_weight_grad_bf16, py::arg("grad_out"), py::arg("x"), py::arg("out"),
        "out = grad_out.T @ x on AMX tiles (VDPBF16PS without): the weight gradient of a bf16 linear layer, "
        "accumulated and written in float32.");
  m.def("rope_rows", &rope_rows, py::arg("x"), py::arg("cos"), py::arg("sin_signed"), py::arg("out"),
        py::arg("inverse") = false,
        "Rotate x [N, heads, D] (RoPE, rotate-half layout; sin's first half negated) into out by the float32 cos and "
        "sin_signed [N, D]; inverse rotates back (the rotation's gradient). fp32 arithmetic, one rounding.");
  m.def("rope_store", &rope_store, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cos"), py::arg("sin_signed"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("slots"),
        "Rotate q [T, H, D] and k [T, KV, D] in place (RoPE, rotate-half layout; sin's first half negated) and write "
        "k and v to rows `slots` of the caches [blocks, block_size, KV, D].");
  m.def("prefix_attention", &prefix_attention, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("prefix"), py::arg("scale"), py::arg("out"), py::arg("lse"),
        "Cascade attention's shared part: every query row against the same prefix blocks of a bf16 cache (16-token "
        "blocks), read in place; writes each row's normalised partial output and log-sum-exp (float32).");
  m.def("prefix_attention_f32", &prefix_attention_f32, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("prefix"), py::arg("scale"), py::arg("out"), py::arg("lse"),
        "Cascade attention's shared part for a float32 cache on AVX2 + FMA: every query row against the same prefix "
        "blocks, read in place; writes each row's normalised partial output and log-sum-exp.");
  m.def("paged_decode_f32", &paged_decode_f32, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"), py::arg("out"), py::arg("lse"),
        py::arg("first_block") = 0,
        "Decode attention for a float32 cache on AVX2 + FMA: q [B, H, D] over each sequence's blocks from first_block "
        "on; writes float32 outputs and log-sum-exps (zeros and -inf for a sequence with no key there).");
  m.def("paged_attention_bf16", &paged_attention_bf16, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"), py::arg("out"), py::arg("lse"),
        py::arg("first_block") = 0, py::arg("query_lens") = py::none(),
        "Paged attention for a bf16 cache of 16-token blocks and bf16 queries: each sequence's newest query_lens[b] "
        "tokens (default 1, a decode step) over its blocks from first_block on, causal among them; scores on AMX "
        "tiles (or VDPBF16PS), fp32 softmax and P V; writes float32 outputs and log-sum-exps.");
  m.def("attention_forward_bf16", &attention_forward_bf16, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask"),
        py::arg("causal"), py::arg("scale"), py::arg("out"), py::arg("lse"),
        "Attention for training (bf16 q [B, T, H, D], k / v [B, S, KV, D]; additive mask [1 or B, T, S] or none, causal "
        "or not): writes out (bf16) and the rows' log-sum-exp lse [B, T, H] (float32), which the backward takes.");
  m.def("attention_backward_bf16", &attention_backward_bf16, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("grad_out"), py::arg("lse"), py::arg("mask"), py::arg("causal"), py::arg("scale"), py::arg("grad_q"),
        py::arg("grad_k"), py::arg("grad_v"),
        "Attention backward for training (bf16 q [B, T, H, D], k / v [B, S, KV, D], the forward's out and float32 "
        "lse [B, T, H]; additive mask [1 or B, T, S] or none, causal or not): writes grad_q, grad_k, grad_v (bf16). "
        "Probabilities recomputed per 32 x 32 tile on AMX (or VDPBF16PS), fp32 accumulation.");
  m.def("decode_layer", &decode_layer, py::arg("x"), py::arg("weights"), py::arg("biases"), py::arg("input_norm"),
        py::arg("post_norm"), py::arg("eps"), py::arg("cos"), py::arg("sin_signed"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("slots"), py::arg("block_tables"), py::arg("context_lens"),
        py::arg("shared_blocks"), py::arg("heads"), py::arg("scale"),
        "One decoder layer of an engine decode step in one call (bf16 on AMX tiles, or float32 on AVX2): norm + q/k/v, RoPE + KV write, "
        "paged (cascade) attention, o_proj + residual, norm + SwiGLU MLP + residual; x [T, d] updated in place.");
  m.def("logprob_forward_bf16", &logprob_forward_bf16, py::arg("hidden"), py::arg("weight"), py::arg("bias"),
        py::arg("labels"), py::arg("inv_temp"), py::arg("ignore_index"), py::arg("logp"), py::arg("lse"),
        py::arg("entropy") = py::none(),
        "Fused token log-probs from bf16 hidden [N, d] and head [V, d] (int16 views; bias fp32 or None): writes "
        "log p(label), log-sum-exp and (optionally) entropy without materialising the logits.");
  m.def("logprob_backward_bf16", &logprob_backward_bf16, py::arg("hidden"), py::arg("weight"), py::arg("bias"),
        py::arg("labels"), py::arg("inv_temp"), py::arg("lse"), py::arg("entropy"), py::arg("grad_logp"),
        py::arg("grad_entropy"), py::arg("grad_hidden"), py::arg("grad_weight"), py::arg("grad_bias"),
        "Gradients of the fused log-prob op into bf16 grad_hidden / grad_weight and fp32 grad_bias (each optional).");
  m.def("kl_forward_bf16", &kl_forward_bf16, py::arg("hidden"), py::arg("weight"), py::arg("bias"),
        py::arg("ref_hidden"), py::arg("ref_weight"), py::arg("ref_bias"), py::arg("inv_temp"), py::arg("kl"),
        py::arg("lse"), py::arg("mean_diff"), "Per-token full-vocabulary KL(policy || reference) from bf16 operands.");
  m.def("kl_backward_bf16", &kl_backward_bf16, py::arg("hidden"), py::arg("weight"), py::arg("bias"),
        py::arg("ref_hidden"), py::arg("ref_weight"), py::arg("ref_bias"), py::arg("inv_temp"), py::arg("lse"),
        py::arg("mean_diff"), py::arg("grad_kl"), py::arg("grad_hidden"), py::arg("grad_weight"),
        py::arg("grad_bias"), "Gradients of the bf16 full KL for the policy side.");
  m.def("pm_pairs", &pm_pairs, py::arg("rewards"), py::arg("pairs"), py::arg("prob"), py::arg("weight"),
        py::arg("margin"), py::arg("group"), py::arg("pair_loss"), py::arg("pair_grad"), py::arg("resp_grad"),
        py::arg("group_stats"), py::arg("resp_group"),
        "Soft-label pairwise PM loss over all pairs: per-pair loss and d/d(gap), per-response and per-group sums.");
  m.def("rms_norm_forward", &rms_norm_forward, py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("y"),
        py::arg("rstd"), "RMSNorm of x [rows, d] (float32 or bfloat16 bits) into y (either): y = x * rstd * weight, "
        "rstd [rows] = 1 / sqrt(mean(x^2) + eps); float32 arithmetic.");
  m.def("rms_norm_backward", &rms_norm_backward, py::arg("x"), py::arg("weight"), py::arg("rstd"),
        py::arg("grad_y"), py::arg("grad_x"), py::arg("grad_weight"),
        "Gradients of rms_norm_forward: grad_x (float32 or bfloat16 bits) and grad_weight [d] (a sum over rows in "
        "a fixed order).");
  m.def("swiglu_forward", &swiglu_forward, py::arg("gate"), py::arg("up"), py::arg("out"),
        "out = silu(gate) * up elementwise (each float32 or bfloat16 bits; float32 arithmetic).");
  m.def("swiglu_backward", &swiglu_backward, py::arg("gate"), py::arg("up"), py::arg("grad_out"),
        py::arg("grad_gate"), py::arg("grad_up"), "Gradients of swiglu_forward, from gate and up.");

  m.def("paged_decode", &paged_decode, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
        py::arg("context_lens"), py::arg("scale"), py::arg("out"), py::arg("lse") = py::none(),
        py::arg("first_block") = 0,
        "Decode attention: q [B, H, D] against caches [blocks, block_size, kv_heads, D] (float32, or bfloat16 "
        "passed as its 16-bit patterns) through block tables, from block first_block on; out [B, H, D] float32; "
        "lse [B, H] (optional) receives each row's log-sum-exp of scores.");
  py::class_<BlockManager>(m, "BlockManager",
                           "Paged KV-cache blocks: free list, reference counts, block tables, copy-on-write forks and "
                           "prefix caching (chained block hashes, verified on a hit, LRU eviction).")
      .def(py::init<int32_t, int32_t, bool>(), py::arg("num_blocks"), py::arg("block_size"),
           py::arg("prefix_caching") = true)
      .def("can_allocate", &BlockManager::can_allocate, py::arg("tokens"))
      .def("allocate", &BlockManager::allocate, py::arg("seq"), py::arg("tokens"),
           "Blocks for a new sequence; returns the number of leading tokens whose KV is already cached.")
      .def("can_append", &BlockManager::can_append, py::arg("seq"))
      .def("append", &BlockManager::append, py::arg("seq"), py::arg("token"),
           "Room for one more token at the end of the sequence; returns its slot (block * block_size + offset).")
      .def("fork", &BlockManager::fork, py::arg("parent"), py::arg("child"),
           "Child shares the parent's full blocks and gets a copy of its partial last block; returns the copies.")
      .def("mark_computed", &BlockManager::mark_computed, py::arg("seq"), py::arg("num_tokens"),
           "The first num_tokens tokens now have KV: their full blocks enter the prefix cache.")
      .def("free", &BlockManager::free, py::arg("seq"))
      .def("reset_prefix_cache", &BlockManager::reset_prefix_cache,
           "Forget every cached prefix (after a weight update the cached KV is stale).")
      .def("block_table", &BlockManager::block_table, py::arg("seq"))
      .def("num_tokens", &BlockManager::num_tokens, py::arg("seq"))
      .def("slot", &BlockManager::slot, py::arg("seq"), py::arg("position"))
      .def("has", &BlockManager::has, py::arg("seq"))
      .def("ref_count", &BlockManager::ref_count, py::arg("block"))
      .def_property_readonly("num_blocks", &BlockManager::num_blocks)
      .def_property_readonly("block_size", &BlockManager::block_size)
      .def_property_readonly("num_free", &BlockManager::num_free)
      .def_property_readonly("num_cached_free", &BlockManager::num_cached_free)
      .def_property_readonly("hit_tokens", &BlockManager::hit_tokens)
      .def_property_readonly("queried_tokens", &BlockManager::queried_tokens);
}
