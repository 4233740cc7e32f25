// The weight gradient of a bf16 linear layer on AMX tiles, for bf16-mixed training: dW = dY^T X with fp32
// accumulation, written in fp32 (the master weight's gradient dtype).
//
// Why not oneDNN: with the tokens as the reduction dimension (dW [out, in] sums over every token of the batch),
// its bf16 GEMM runs at about half its forward speed on this project's CPUs (0.7-1.2 against 1.9-2.5 TFLOP/s at a
// SmolLM2 micro-batch of 1,392 tokens), and it returns bf16, which autocast then casts to fp32 for the master's
// gradient (one more pass over dW, and a bf16 rounding of a sum of ~1,000 products). Here: 1.3-1.7x faster,
// cast included (bench/bench_projection.py).
//
// Layout: both operands are laid out once per call. dY [N, O] is transposed into token-contiguous rows (the A
// tiles: 16 outputs x 32 tokens), X [N, I] interleaved by token pairs (the VNNI B tiles: 16 token pairs x 16
// inputs); tokens past N read as zeros. Each 32 x 32 block of dW then accumulates all tokens in the tile
// registers. Jobs run over panels of B columns small enough to stay in the core's L2 while every block row of A
// passes over them.
#include "linear_grad_bf16.h"

#include "bf16_tiles.h"

using namespace bf16_tiles;

namespace {

constexpr int64_t kPanelBytes = 768 << 10;  // a B panel's share of a 2 MiB L2, beside the A rows streaming past

// dY [N, O] -> a, block by block: for each 32 outputs, for each 32 tokens, a 32 x 32 tile pair (row = one output's
// 32 tokens) stored contiguously, so the tile loads of one block walk memory in order. Per 32 tokens x 16 outputs:
// token pairs interleaved into 32-bit words (even token in the low half, as the tiles read pairs), then one
// register transpose puts each output's 32 tokens in a row.
CAI_AMX void transpose_tokens(const uint16_t* dy, int64_t N, int64_t O, int64_t Np, uint16_t* a) {
  const int64_t ksteps = Np / kTile, groups = O / 16;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t ks = 0; ks < ksteps; ++ks)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t n0 = ks * kTile, o0 = g * 16;
      __m512i r[16];
      for (int64_t p = 0; p < 16; ++p) {
        const int64_t n = n0 + 2 * p;
        const __m512i even =
            n < N ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(dy + n * O + o0))) : _mm512_setzero_si512();
        const __m512i odd = n + 1 < N ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(dy + (n + 1) * O + o0)))
                                      : _mm512_setzero_si512();
        r[p] = _mm512_or_si512(even, _mm512_slli_epi32(odd, 16));
      }
      transpose16(r);
      uint16_t* block = a + ((o0 / kTile) * ksteps + ks) * kTile * kTile + (o0 % kTile) * kTile;
      for (int64_t j = 0; j < 16; ++j) _mm512_storeu_si512(block + j * kTile, r[j]);
    }
}

// X [N, I] -> b, block by block: for each 32 inputs, Np / 2 rows of 32 words; word (p, i) holds X[2p, i] (low
// half) and X[2p + 1, i].
CAI_AMX void pair_tokens(const uint16_t* x, int64_t N, int64_t I, int64_t Np, uint32_t* b) {
  const int64_t pairs = Np / 2;
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t n = 2 * p;
    for (int64_t i0 = 0; i0 < I; i0 += 16) {
      const __m512i even =
          n < N ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(x + n * I + i0))) : _mm512_setzero_si512();
      const __m512i odd = n + 1 < N ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(x + (n + 1) * I + i0)))
                                    : _mm512_setzero_si512();
      _mm512_storeu_si512(b + ((i0 / kTile) * pairs + p) * kTile + i0 % kTile,
                          _mm512_or_si512(even, _mm512_slli_epi32(odd, 16)));
    }
  }
}

CAI_AMX void weight_grad(const uint16_t* dy, const uint16_t* x, int64_t N, int64_t O, int64_t I, float* out) {
  const int64_t Np = round_up(std::max<int64_t>(N, 1), kTile);
  auto a = uninitialized<uint16_t>(O * Np);
  auto b = uninitialized<uint32_t>(Np / 2 * I);
  transpose_tokens(dy, N, O, Np, a.get());
  pair_tokens(x, N, I, Np, b.get());
  const int64_t panel = std::max<int64_t>(kTile, kPanelBytes / (Np * 2) / kTile * kTile);  // B columns per panel
  const int64_t blocks_o = O / kTile, ksteps = Np / kTile;
  for (int64_t i0 = 0; i0 < I; i0 += panel) {
    const int64_t blocks_i = (std::min(panel, I - i0)) / kTile;
#pragma omp parallel
    {
      configure_tiles();
#pragma omp for collapse(2) schedule(static)
      for (int64_t bo = 0; bo < blocks_o; ++bo)
        for (int64_t bi = 0; bi < blocks_i; ++bi) {
          const int64_t o = bo * kTile, i = i0 + bi * kTile;
          tile_2x2(a.get() + o * Np, 64, 2048, b.get() + i * (Np / 2), 64, 128, 2048, ksteps, out + o * I + i, I * 4,
                   false, nullptr, 1024);
        }
      release_tiles();
    }
  }
}

}  // namespace

void linear_weight_grad_bf16(py::array grad_out, py::array x, py::array out) {
  require_kernels();
  const uint16_t* dy = bf16_buffer(grad_out, {-1, -1}, "grad_out");
  const int64_t N = grad_out.shape(0), O = grad_out.shape(1);
  const uint16_t* xp = bf16_buffer(x, {N, -1}, "x");
  const int64_t I = x.shape(1);
  if (O % kTile || I % kTile)
    throw std::invalid_argument("linear_weight_grad_bf16: out and in features must be multiples of 32, got " +
                                std::to_string(O) + " and " + std::to_string(I));
  check_ndim(out, 2, "out");
  check_dim(out, 0, O, "out");
  check_dim(out, 1, I, "out");
  if (float_or_bf16(out, O * I, "out").bf16) throw std::invalid_argument("out: expected float32");
  float* op = static_cast<float*>(writable(out, "out"));
  py::gil_scoped_release nogil;
  if (N == 0)
    std::fill(op, op + O * I, 0.f);
  else
    weight_grad(dy, xp, N, O, I, op);
}
