// bf16 linear layers for the sampling engine on AMX CPUs: y = x W^T (+ bias) (+ residual), and the gated MLP
// input silu(x Wg^T) * (x Wu^T), fp32 accumulation, one rounding of the result.
//
// Why not BLAS: oneDNN's bf16 GEMM re-lays out the weight on every call, which at the few rows of a decode step
// costs more than the product (measured: 12-20 GB/s of weight at one row, the fp32 GEMM streams 45). Here the
// product is computed transposed, as in the fused log-prob kernel: the weight [N, K] in its own row-major layout
// is the A operand (a tile is 16 rows x 32 columns at the row stride, no repacking, so the engine keeps no second
// copy of the weights to refresh after an optimizer step) and the step's tokens are packed as the VNNI B operand
// (tiny: M x K). A 32 x 32 accumulator block holds 32 outputs for 32 tokens; the epilogue transposes it into y's
// rows, adding bias and residual in fp32 before the single rounding.
#include "linear_bf16.h"

#include <vector>

#include "bf16_tiles.h"
#include "rms_norm.h"
#include "vecmath.h"

using namespace bf16_tiles;

namespace {

constexpr int64_t kTokens = 256;  // tokens per job: the block's [32, kTokens] fp32 accumulators stay in L1/L2

struct Output {
  void* data;
  bool bf16;
  int64_t cols;
};

struct Layer {  // one weight of the call, its output
  Head head;
  Output out;
};

// silu(v) = v * sigmoid(v), sigmoid from exp(-|v|) so the exponent is never positive.
CAI_AMX inline __m512 silu16(__m512 v) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 e = exp_nonpositive16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(v)));
  const __m512 inv = _mm512_div_ps(one, _mm512_add_ps(one, e));
  const __m512 sig = _mm512_mask_mul_ps(inv, _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ), e, inv);
  return _mm512_mul_ps(v, sig);
}

CAI_AMX inline __m512 load_bias(const float* b, int64_t n, __mmask16 mask) {
  return b ? _mm512_maskz_loadu_ps(mask, b + n) : _mm512_setzero_ps();
}

// The [32 outputs, mm tokens] accumulator block (row stride kTokens) into y's rows: 16 outputs of one token at a
// time, gathered down a column of the block, plus bias (and residual), rounded once.
CAI_AMX void epilogue(const float* z, const float* zu, const Layer& layer, const Layer* up, int64_t v0, int64_t rows,
                      int64_t m0, int64_t mm, const uint16_t* residual) {
  const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(int(kTokens)));
  const int64_t N = layer.out.cols;
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const __mmask16 mask = rows - r0 >= 16 ? __mmask16(0xffff) : __mmask16((1u << (rows - r0)) - 1);
    const int64_t n0 = v0 + r0;
    const __m512 bias = load_bias(layer.head.bias, n0, mask);
    const __m512 bias_up = up ? load_bias(up->head.bias, n0, mask) : _mm512_setzero_ps();
    for (int64_t i = 0; i < mm; ++i) {
      const int64_t m = m0 + i;
      __m512 v = _mm512_add_ps(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, column, z + r0 * kTokens + i, 4), bias);
      if (up)
        v = _mm512_mul_ps(silu16(v), _mm512_add_ps(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, column,
                                                                             zu + r0 * kTokens + i, 4), bias_up));
      if (residual) {
        const __m256i bits = _mm256_maskz_loadu_epi16(mask, residual + m * N + n0);
        v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)));
      }
      if (layer.out.bf16)
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(layer.out.data) + m * N + n0, mask,
                                 (__m256i)_mm512_cvtneps_pbh(v));
      else
        _mm512_mask_storeu_ps(static_cast<float*>(layer.out.data) + m * N + n0, mask, v);
    }
  }
}

// Every (token chunk, 32-row block) job of every weight, split over the threads. With `gated`, layers[0] is the
// gate and layers[1] the up projection: one job computes both blocks and writes silu(gate) * up to layers[0].out.
struct Norm {  // an RMSNorm of x before the product (the layer's input norm), or none
  const float* weight = nullptr;
  float eps = 0.f;
};

CAI_AMX void run(const uint16_t* x, int64_t M, int64_t K, std::vector<Layer>& layers, bool gated,
                 const uint16_t* residual, Norm norm) {
  const int64_t Kp = layers[0].head.Kp, Mp = round_up(M, kTile);
  Buffer<uint16_t> normed;
  if (norm.weight) {  // the standalone norm's arithmetic (the same bits), rounded to bf16 as the product reads it
    normed = zeroed<uint16_t>(M * K);
    auto rstd = zeroed<float>(M);
    rms_norm_rows({x, true}, norm.weight, norm.eps, M, K, normed.get(), true, rstd.get());
    x = normed.get();
  }
  auto xk = pack_tokens_by_k(x, M, K, Mp, Kp);
  struct Job {
    int layer;
    int64_t v0, m0;
  };
  std::vector<Job> jobs;
  for (int64_t m0 = 0; m0 < M; m0 += kTokens)
    for (int l = 0; l < (gated ? 1 : int(layers.size())); ++l)
      for (int64_t v0 = 0; v0 < layers[l].head.V; v0 += kTile) jobs.push_back({l, v0, m0});
  const int64_t n_jobs = int64_t(jobs.size());
#pragma omp parallel if (n_jobs > 1)
  {
    configure_tiles();
    auto z = zeroed<float>(2 * kTile * kTokens);
    float* zu = z.get() + kTile * kTokens;
#pragma omp for schedule(static)
    for (int64_t j = 0; j < n_jobs; ++j) {
      const Job job = jobs[j];
      const Layer& layer = layers[job.layer];
      const int64_t mm = std::min(kTokens, M - job.m0), rows = std::min(kTile, layer.head.V - job.v0);
      for (int l = 0; l < (gated ? 2 : 1); ++l) {
        const Head& head = gated ? layers[l].head : layer.head;
        const uint16_t* a = head.rows(job.v0);
        float* c = l ? zu : z.get();
        for (int64_t i = 0; i < mm; i += kTile) {
          const uint32_t* b = xk.get() + (job.m0 + i) / 16 * (Kp / 2) * 16;
          if (mm - i <= 16)  // the last 16 or fewer tokens: half the tile products
            tile_2x1(a, Kp * 2, 64, b, Kp * 32, 64, 1024, Kp / kTile, c + i, kTokens * 4);
          else
            tile_2x2(a, Kp * 2, 64, b, Kp * 32, 64, 1024, Kp / kTile, c + i, kTokens * 4, false);
        }
      }
      epilogue(z.get(), zu, layer, gated ? &layers[1] : nullptr, job.v0, rows, job.m0, mm, residual);
    }
    release_tiles();
  }
}

Output output(py::array& a, int64_t rows, int64_t cols, const std::string& name) {
  check_ndim(a, 2, name.c_str());
  check_dim(a, 0, rows, name.c_str());
  check_dim(a, 1, cols, name.c_str());
  const FloatOrBf16 f = float_or_bf16(a, rows * cols, name.c_str());
  return {writable(a, name.c_str()), f.bf16, cols};
}

const float* bias_of(const py::object& b, int64_t N, const std::string& name, std::vector<f32_array>& keep) {
  if (b.is_none()) return nullptr;
  keep.push_back(b.cast<f32_array>());
  check_ndim(keep.back(), 1, name.c_str());
  check_dim(keep.back(), 0, N, name.c_str());
  return keep.back().data();
}

Norm norm_of(const py::object& weight, float eps, int64_t K, std::vector<f32_array>& keep) {
  if (weight.is_none()) return {};
  keep.push_back(weight.cast<f32_array>());
  check_ndim(keep.back(), 1, "norm_weight");
  check_dim(keep.back(), 0, K, "norm_weight");
  return {keep.back().data(), eps};
}

}  // namespace

void linear_tiles(const uint16_t* x, int64_t M, int64_t K, const LinearTarget* targets, int count,
                  const uint16_t* residual, const float* norm_weight, float eps) {
  std::vector<Layer> layers;
  for (int j = 0; j < count; ++j)
    layers.push_back({Head(targets[j].weight, targets[j].bias, targets[j].rows, K),
                      Output{targets[j].out, targets[j].out_bf16, targets[j].rows}});
  if (M > 0) run(x, M, K, layers, false, residual, Norm{norm_weight, eps});
}

void gated_linear_tiles(const uint16_t* x, int64_t M, int64_t K, const uint16_t* gate, const uint16_t* up, int64_t N,
                        uint16_t* out, const float* norm_weight, float eps) {
  std::vector<Layer> layers;
  layers.push_back({Head(gate, nullptr, N, K), Output{out, true, N}});
  layers.push_back({Head(up, nullptr, N, K), Output{nullptr, false, N}});
  if (M > 0) run(x, M, K, layers, true, nullptr, Norm{norm_weight, eps});
}

void linear_bf16(py::array x, py::list weights, py::list biases, py::list outs, py::object residual,
                 py::object norm_weight, float eps) {
  require_kernels();
  const uint16_t* xp = bf16_buffer(x, {-1, -1}, "x");
  const int64_t M = x.shape(0), K = x.shape(1);
  if (weights.size() == 0 || biases.size() != weights.size() || outs.size() != weights.size())
    throw std::invalid_argument("linear_bf16: weights, biases and outs must be non-empty lists of one length");
  if (!residual.is_none() && weights.size() != 1)
    throw std::invalid_argument("linear_bf16: a residual goes with exactly one weight");
  std::vector<f32_array> keep;
  std::vector<Layer> layers;
  for (size_t j = 0; j < weights.size(); ++j) {
    const std::string tag = "[" + std::to_string(j) + "]";
    py::array w = weights[j].cast<py::array>(), o = outs[j].cast<py::array>();
    const uint16_t* wp = bf16_buffer(w, {-1, K}, "weights" + tag);
    const int64_t N = w.shape(0);
    layers.push_back({Head(wp, bias_of(biases[j], N, "biases" + tag, keep), N, K), output(o, M, N, "outs" + tag)});
  }
  const uint16_t* rp = nullptr;
  if (!residual.is_none()) rp = bf16_buffer(residual.cast<py::array>(), {M, layers[0].out.cols}, "residual");
  const Norm norm = norm_of(norm_weight, eps, K, keep);
  py::gil_scoped_release nogil;
  if (M > 0) run(xp, M, K, layers, false, rp, norm);
}

void gated_linear_bf16(py::array x, py::array gate_weight, py::array up_weight, py::array out,
                       py::object norm_weight, float eps) {
  require_kernels();
  const uint16_t* xp = bf16_buffer(x, {-1, -1}, "x");
  const int64_t M = x.shape(0), K = x.shape(1);
  const uint16_t* gp = bf16_buffer(gate_weight, {-1, K}, "gate_weight");
  const int64_t N = gate_weight.shape(0);
  const uint16_t* up = bf16_buffer(up_weight, {N, K}, "up_weight");
  std::vector<Layer> layers;
  layers.push_back({Head(gp, nullptr, N, K), output(out, M, N, "out")});
  layers.push_back({Head(up, nullptr, N, K), Output{nullptr, false, N}});
  std::vector<f32_array> keep;
  const Norm norm = norm_of(norm_weight, eps, K, keep);
  py::gil_scoped_release nogil;
  if (M > 0) run(xp, M, K, layers, true, nullptr, norm);
}
