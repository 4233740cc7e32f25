// One decoder layer of a sampling-engine decode step in a single call (CPU, bf16, AMX tiles): every row of x is
// one sequence's newest token. The same kernels the layer otherwise reaches one Python call at a time:
//   q, k, v = linear(rms_norm(x))  ->  RoPE + KV-cache write  ->  paged attention (cascade over shared blocks)
//   x += o_proj(attention)         ->  h = silu(gate(rms_norm(x))) * up(...)  ->  x += down(h)
// At a decode step's few rows those calls cost as much in Python as in arithmetic; here the layer's
// intermediates live in buffers of this call and x is updated in place.
#include "decode_layer.h"

#include <cmath>
#include <limits>
#include <vector>

#include "bf16_tiles.h"
#include "linear_bf16.h"
#include "tile_attention.h"
#include "rope.h"
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

}  // namespace

void decode_layer(py::array x, py::list weights, py::list biases, py::array input_norm, py::array post_norm,
                  float eps, f32_array cos, f32_array sin_signed, py::array k_cache, py::array v_cache, i64_array slots,
                  i32_array block_tables, i32_array context_lens, int64_t shared_blocks, int64_t heads, float scale) {
  bf16_tiles::require_kernels();
  check_ndim(x, 2, "x");
  check_ndim(k_cache, 4, "k_cache");
  const int64_t T = x.shape(0), d = x.shape(1), KV = k_cache.shape(2), D = k_cache.shape(3), H = heads;
  const int64_t NB = k_cache.shape(0), BS = k_cache.shape(1);
  if (weights.size() != 7 || biases.size() != 3)
    throw std::invalid_argument("decode_layer: expected 7 weights (q, k, v, o, gate, up, down) and 3 biases (q, k, v)");
  if (BS != 16 || D % 32 || H % KV || H / KV > 32 || d % 32)
    throw std::invalid_argument("decode_layer: needs 16-token blocks, head_dim and hidden size multiples of 32, "
                                "at most 32 query heads per KV head");
  const int64_t I = weights[4].cast<py::array>().shape(0), HD = H * D, KD = KV * D;
  uint16_t* xp = const_cast<uint16_t*>(bf16_buffer(x, {T, d}, "x"));
  if (!x.writeable()) throw std::invalid_argument("x: must be writable");
  const char* names[7] = {"q_weight", "k_weight", "v_weight", "o_weight", "gate_weight", "up_weight", "down_weight"};
  const std::vector<int64_t> shapes[7] = {{HD, d}, {KD, d}, {KD, d}, {d, HD}, {I, d}, {I, d}, {d, I}};
  const uint16_t* w[7];
  for (int j = 0; j < 7; ++j) w[j] = bf16_buffer(weights[j].cast<py::array>(), shapes[j], names[j]);
  std::vector<f32_array> keep;
  std::vector<std::vector<float>> converted;
  const float* b[3] = {floats_of(biases[0], HD, "q_bias", converted), floats_of(biases[1], KD, "k_bias", converted),
                       floats_of(biases[2], KD, "v_bias", converted)};
  const float* n1 = floats_of(input_norm, d, "input_norm", converted);
  const float* n2 = floats_of(post_norm, d, "post_norm", converted);
  const float* cp = f32_of(cos, {T, D}, "cos", keep);
  const float* sp = f32_of(sin_signed, {T, D}, "sin_signed", keep);
  uint16_t* kc = const_cast<uint16_t*>(bf16_buffer(k_cache, {NB, BS, KV, D}, "k_cache"));
  uint16_t* vc = const_cast<uint16_t*>(bf16_buffer(v_cache, {NB, BS, KV, D}, "v_cache"));
  check_ndim(slots, 1, "slots");
  check_dim(slots, 0, T, "slots");
  check_ndim(block_tables, 2, "block_tables");
  check_dim(block_tables, 0, T, "block_tables");
  check_ndim(context_lens, 1, "context_lens");
  check_dim(context_lens, 0, T, "context_lens");
  const int64_t W = block_tables.shape(1);
  const int64_t* sl = slots.data();
  const int32_t *tab = block_tables.data(), *lens = context_lens.data();
  check_block_tables(tab, lens, T, W, NB, BS, 0);
  for (int64_t t = 0; t < T; ++t) {
    if (sl[t] < 0 || sl[t] >= NB * BS)
      throw std::invalid_argument("slots[" + std::to_string(t) + "] = " + std::to_string(sl[t]) +
                                  " is not a row of the cache");
    bool shares = shared_blocks * BS <= lens[t];
    for (int64_t i = 0; shares && i < shared_blocks; ++i) shares = tab[t * W + i] == tab[i];
    if (!shares) throw std::invalid_argument("shared_blocks: row " + std::to_string(t) + " does not share them");
  }
  py::gil_scoped_release nogil;
  std::vector<uint16_t> q(T * HD), k(T * KD), v(T * KD), attn(T * HD), h(T * I);
  std::vector<float> out(T * HD), lse(T * H), own(shared_blocks ? T * HD : 0), own_lse(shared_blocks ? T * H : 0);
  const LinearTarget qkv[3] = {{w[0], b[0], HD, q.data(), true}, {w[1], b[1], KD, k.data(), true},
                               {w[2], b[2], KD, v.data(), true}};
  linear_tiles(xp, T, d, qkv, 3, nullptr, n1, eps);
  rope_store_rows({q.data(), true}, q.data(), {k.data(), true}, k.data(), {v.data(), true}, T, H, KV, D, cp, sp, kc,
                  true, vc, true, sl);
  if (shared_blocks) {  // cascade: the shared blocks once for every row, each row's own blocks, merged
    prefix_attention_tiles(q.data(), kc, vc, tab, shared_blocks, T, H, D, KV, scale, out.data(), lse.data());
    paged_decode_tiles(q.data(), kc, vc, tab, lens, W, shared_blocks, T, H, D, KV, scale, own.data(), own_lse.data());
    merge_into(out.data(), lse.data(), own.data(), own_lse.data(), T * H, D);
  } else {
    paged_decode_tiles(q.data(), kc, vc, tab, lens, W, 0, T, H, D, KV, scale, out.data(), lse.data());
  }
  for (int64_t i = 0; i < T * HD; ++i) attn[i] = float_to_bf16(out[i]);
  const LinearTarget o_proj{w[3], nullptr, d, xp, true};
  linear_tiles(attn.data(), T, HD, &o_proj, 1, xp, nullptr, 0.f);  // x += o_proj(attn), in place
  gated_linear_tiles(xp, T, d, w[4], w[5], I, h.data(), n2, eps);
  const LinearTarget down{w[6], nullptr, d, xp, true};
  linear_tiles(h.data(), T, I, &down, 1, xp, nullptr, 0.f);  // x += down(h), in place
}
