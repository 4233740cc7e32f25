// One decoder layer of a sampling-engine decode step in a single call (CPU): every row of x is one sequence's newest
// token. The same kernels the layer otherwise reaches one Python call at a time:
//   q, k, v = linear(rms_norm(x))  ->  RoPE + KV-cache write  ->  paged attention (cascade over shared blocks)
//   x += o_proj(attention)         ->  h = silu(gate(rms_norm(x))) * up(...)  ->  x += down(h)
// At a decode step's few rows those calls cost as much in Python as in arithmetic; here the layer's
// intermediates live in buffers of this call and x is updated in place. Two precisions, as the engine samples:
// bf16 weights and cache on AMX tiles, or float32 ones on AVX2 (CPUs without bf16 units).
#include "decode_layer.h"

#include <cmath>
#include <limits>
#include <vector>

#include "bf16_tiles.h"
#include "attention_f32.h"
#include "linear_bf16.h"
#include "linear_f32.h"
#include "rms_norm.h"
#include "tile_attention.h"
#include "rope.h"
#include "swiglu.h"
#include "vecmath.h"

namespace {

const float* f32_of(const py::object& o, std::vector<int64_t> shape, const std::string& name,
                    std::vector<f32_array>& keep) {
  if (o.is_none()) return nullptr;
  keep.push_back(o.cast<f32_array>());
  check_ndim(keep.back(), int(shape.size()), name.c_str());
  for (size_t i = 0; i < shape.size(); ++i) check_dim(keep.back(), int(i), shape[i], name.c_str());
  return keep.back().data();
}

// A float32 or bfloat16 vector (a norm weight, a bias) as float32, or null for None.
const float* floats_of(const py::object& o, int64_t n, const std::string& name, std::vector<std::vector<float>>& keep) {
  if (o.is_none()) return nullptr;
  const py::array a = o.cast<py::array>();
  check_ndim(a, 1, name.c_str());
  const FloatOrBf16 f = float_or_bf16(a, n, name.c_str());
  keep.emplace_back(n);
  load_floats(f.data, f.bf16, 0, n, keep.back().data());
  return keep.back().data();
}

// (o1, l1) and (o2, l2): attention over two disjoint key sets, each normalised, merged through the log-sum-exps
// into o1 (fp32), the way merge_partials does it.
void merge_into(float* o1, const float* l1, const float* o2, const float* l2, int64_t rows, int64_t D) {
  for (int64_t r = 0; r < rows; ++r) {
    const float m = std::max(l1[r], l2[r]);
    if (m == -std::numeric_limits<float>::infinity()) {
      std::fill(o1 + r * D, o1 + (r + 1) * D, 0.f);
      continue;
    }
    const float e1 = std::exp(l1[r] - m), e2 = std::exp(l2[r] - m), inv = 1.f / (e1 + e2);
    for (int64_t d = 0; d < D; ++d) o1[r * D + d] = (o1[r * D + d] * e1 + o2[r * D + d] * e2) * inv;
  }
}

// The layer's operands, checked: x, weights and caches in the layer's precision (bf16 bit patterns or float32),
// biases and norms as float32, the step's rotations, slots and block tables.
struct Layer {
  bool bf16;
  int64_t T, d, H, KV, D, BS, I, W, shared_blocks;
  void* x;
  const void* w[7];
  const float* b[3];
  const float *n1, *n2, *cos, *sin;
  void *k_cache, *v_cache;
  const int64_t* slots;
  const int32_t *tables, *lens;
};

void run_bf16(const Layer& L, float eps, float scale) {
  const int64_t T = L.T, d = L.d, H = L.H, KV = L.KV, D = L.D, I = L.I, HD = H * D, KD = KV * D;
  auto* xp = static_cast<uint16_t*>(L.x);
  auto* kc = static_cast<uint16_t*>(L.k_cache);
  auto* vc = static_cast<uint16_t*>(L.v_cache);
  auto w = [&](int j) { return static_cast<const uint16_t*>(L.w[j]); };
  std::vector<uint16_t> q(T * HD), k(T * KD), v(T * KD), attn(T * HD), h(T * I);
  std::vector<float> out(T * HD), lse(T * H), own(L.shared_blocks ? T * HD : 0), own_lse(L.shared_blocks ? T * H : 0);
  const LinearTarget qkv[3] = {{w(0), L.b[0], HD, q.data(), true}, {w(1), L.b[1], KD, k.data(), true},
                               {w(2), L.b[2], KD, v.data(), true}};
  linear_tiles(xp, T, d, qkv, 3, nullptr, L.n1, eps);
  rope_store_rows({q.data(), true}, q.data(), {k.data(), true}, k.data(), {v.data(), true}, T, H, KV, D, L.cos, L.sin,
                  kc, true, vc, true, L.slots);
  if (L.shared_blocks) {  // cascade: the shared blocks once for every row, each row's own blocks, merged
    prefix_attention_tiles(q.data(), kc, vc, L.tables, L.shared_blocks, T, H, D, KV, scale, out.data(), lse.data());
    paged_decode_tiles(q.data(), kc, vc, L.tables, L.lens, L.W, L.shared_blocks, T, H, D, KV, scale, own.data(),
                       own_lse.data());
    merge_into(out.data(), lse.data(), own.data(), own_lse.data(), T * H, D);
  } else {
    paged_decode_tiles(q.data(), kc, vc, L.tables, L.lens, L.W, 0, T, H, D, KV, scale, out.data(), lse.data());
  }
  for (int64_t i = 0; i < T * HD; ++i) attn[i] = float_to_bf16(out[i]);
  const LinearTarget o_proj{w(3), nullptr, d, xp, true};
  linear_tiles(attn.data(), T, HD, &o_proj, 1, xp, nullptr, 0.f);  // x += o_proj(attn), in place
  gated_linear_tiles(xp, T, d, w(4), w(5), I, h.data(), L.n2, eps);
  const LinearTarget down{w(6), nullptr, d, xp, true};
  linear_tiles(h.data(), T, I, &down, 1, xp, nullptr, 0.f);  // x += down(h), in place
}

void run_f32(const Layer& L, float eps, float scale) {
  const int64_t T = L.T, d = L.d, H = L.H, KV = L.KV, D = L.D, BS = L.BS, I = L.I, HD = H * D, KD = KV * D;
  auto* xp = static_cast<float*>(L.x);
  const auto* kc = static_cast<const float*>(L.k_cache);
  const auto* vc = static_cast<const float*>(L.v_cache);
  auto w = [&](int j) { return static_cast<const float*>(L.w[j]); };
  std::vector<float> normed(T * d), rstd(T), q(T * HD), k(T * KD), v(T * KD), gate(T * I), up(T * I);
  std::vector<float> out(T * HD), lse(T * H), own(L.shared_blocks ? T * HD : 0), own_lse(L.shared_blocks ? T * H : 0);
  rms_norm_rows({xp, false}, L.n1, eps, T, d, normed.data(), false, rstd.data());
  linear_f32_rows(normed.data(), T, d, w(0), L.b[0], HD, q.data(), false);
  linear_f32_rows(normed.data(), T, d, w(1), L.b[1], KD, k.data(), false);
  linear_f32_rows(normed.data(), T, d, w(2), L.b[2], KD, v.data(), false);
  rope_store_rows({q.data(), false}, q.data(), {k.data(), false}, k.data(), {v.data(), false}, T, H, KV, D, L.cos,
                  L.sin, L.k_cache, false, L.v_cache, false, L.slots);
  if (L.shared_blocks) {  // cascade, as above
    prefix_attention_f32_rows(q.data(), kc, vc, L.tables, L.shared_blocks, T, H, D, KV, BS, scale, out.data(),
                              lse.data());
    paged_decode_f32_rows(q.data(), kc, vc, L.tables, L.lens, L.W, L.shared_blocks, T, H, D, KV, BS, scale,
                          own.data(), own_lse.data());
    merge_into(out.data(), lse.data(), own.data(), own_lse.data(), T * H, D);
  } else {
    paged_decode_f32_rows(q.data(), kc, vc, L.tables, L.lens, L.W, 0, T, H, D, KV, BS, scale, out.data(), lse.data());
  }
  linear_f32_rows(out.data(), T, HD, w(3), nullptr, d, xp, true);  // x += o_proj(attention), in place
  rms_norm_rows({xp, false}, L.n2, eps, T, d, normed.data(), false, rstd.data());
  linear_f32_rows(normed.data(), T, d, w(4), nullptr, I, gate.data(), false);
  linear_f32_rows(normed.data(), T, d, w(5), nullptr, I, up.data(), false);
  swiglu_rows({gate.data(), false}, {up.data(), false}, T * I, gate.data(), false);  // h = silu(gate) * up
  linear_f32_rows(gate.data(), T, I, w(6), nullptr, d, xp, true);  // x += down(h), in place
}

}  // namespace

void decode_layer(py::array x, py::list weights, py::list biases, py::array input_norm, py::array post_norm,
                  float eps, f32_array cos, f32_array sin_signed, py::array k_cache, py::array v_cache, i64_array slots,
                  i32_array block_tables, i32_array context_lens, int64_t shared_blocks, int64_t heads, float scale) {
  check_ndim(x, 2, "x");
  check_ndim(k_cache, 4, "k_cache");
  Layer L{};
  L.bf16 = x.itemsize() == 2;
  L.T = x.shape(0), L.d = x.shape(1), L.KV = k_cache.shape(2), L.D = k_cache.shape(3), L.H = heads;
  L.BS = k_cache.shape(1), L.shared_blocks = shared_blocks;
  const int64_t T = L.T, d = L.d, KV = L.KV, D = L.D, H = L.H, NB = k_cache.shape(0), BS = L.BS;
  if (BS < 1 || KV < 1 || H < 1 || shared_blocks < 0)
    throw std::invalid_argument("decode_layer: block size, KV heads and heads must be >= 1 and shared_blocks >= 0");
  if (weights.size() != 7 || biases.size() != 3)
    throw std::invalid_argument("decode_layer: expected 7 weights (q, k, v, o, gate, up, down) and 3 biases (q, k, v)");
  L.I = weights[4].cast<py::array>().shape(0);
  const int64_t HD = H * D, KD = KV * D, I = L.I;
  if (L.bf16) {
    bf16_tiles::require_kernels();
    if (BS != 16 || D % 32 || H % KV || H / KV > 32 || d % 32)
      throw std::invalid_argument("decode_layer: bf16 needs 16-token blocks, head_dim and hidden size multiples of "
                                  "32, at most 32 query heads per KV head");
  } else {
    if (!linear_f32_available()) throw std::runtime_error("decode_layer: float32 needs AVX2 and FMA");
    if (D % 16 || H % KV || H / KV > 48 || d % 8 || I % 8)
      throw std::invalid_argument("decode_layer: float32 needs head_dim a multiple of 16, hidden and intermediate "
                                  "sizes multiples of 8, at most 48 query heads per KV head");
  }
  auto buffer = [&](const py::array& a, const std::vector<int64_t>& shape, const std::string& name) -> const void* {
    return L.bf16 ? static_cast<const void*>(bf16_buffer(a, shape, name)) : f32_buffer(a, shape, name);
  };
  L.x = const_cast<void*>(buffer(x, {T, d}, "x"));
  if (!x.writeable()) throw std::invalid_argument("x: must be writable");
  const char* names[7] = {"q_weight", "k_weight", "v_weight", "o_weight", "gate_weight", "up_weight", "down_weight"};
  const std::vector<int64_t> shapes[7] = {{HD, d}, {KD, d}, {KD, d}, {d, HD}, {I, d}, {I, d}, {d, I}};
  for (int j = 0; j < 7; ++j) L.w[j] = buffer(weights[j].cast<py::array>(), shapes[j], names[j]);
  std::vector<f32_array> keep;
  std::vector<std::vector<float>> converted;
  L.b[0] = floats_of(biases[0], HD, "q_bias", converted);
  L.b[1] = floats_of(biases[1], KD, "k_bias", converted);
  L.b[2] = floats_of(biases[2], KD, "v_bias", converted);
  L.n1 = floats_of(input_norm, d, "input_norm", converted);
  L.n2 = floats_of(post_norm, d, "post_norm", converted);
  L.cos = f32_of(cos, {T, D}, "cos", keep);
  L.sin = f32_of(sin_signed, {T, D}, "sin_signed", keep);
  L.k_cache = const_cast<void*>(buffer(k_cache, {NB, BS, KV, D}, "k_cache"));
  L.v_cache = const_cast<void*>(buffer(v_cache, {NB, BS, KV, D}, "v_cache"));
  check_ndim(slots, 1, "slots");
  check_dim(slots, 0, T, "slots");
  check_ndim(block_tables, 2, "block_tables");
  check_dim(block_tables, 0, T, "block_tables");
  check_ndim(context_lens, 1, "context_lens");
  check_dim(context_lens, 0, T, "context_lens");
  L.W = block_tables.shape(1);
  L.slots = slots.data();
  L.tables = block_tables.data(), L.lens = context_lens.data();
  check_block_tables(L.tables, L.lens, T, L.W, NB, BS, 0);
  for (int64_t t = 0; t < T; ++t) {
    if (L.slots[t] < 0 || L.slots[t] >= NB * BS)
      throw std::invalid_argument("slots[" + std::to_string(t) + "] = " + std::to_string(L.slots[t]) +
                                  " is not a row of the cache");
    bool shares = shared_blocks * BS <= L.lens[t];
    for (int64_t i = 0; shares && i < shared_blocks; ++i) shares = L.tables[t * L.W + i] == L.tables[i];
    if (!shares) throw std::invalid_argument("shared_blocks: row " + std::to_string(t) + " does not share them");
  }
  py::gil_scoped_release nogil;
  if (L.bf16)
    run_bf16(L, eps, scale);
  else
    run_f32(L, eps, scale);
}
