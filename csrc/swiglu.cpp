// SwiGLU (CPU): out = silu(gate) * up elementwise, and its gradients, without the silu(gate) intermediate that
// eager autograd keeps. Any mix of float32 and bfloat16 storage; the arithmetic is float32 in fixed chunks.
//   d/dup = dy * silu(g);  d/dgate = dy * up * s * (1 + g * (1 - s)) with s = sigmoid(g).
#include "swiglu.h"

#include <algorithm>

#include "vecmath.h"

namespace {

constexpr int64_t kChunk = 2048;

CAI_MULTIVERSION void forward_chunk(FloatOrBf16 gate, FloatOrBf16 up, int64_t offset, int64_t n, void* out,
                                    bool out_bf16) {
  float g[kChunk], u[kChunk];
  load_floats(gate.data, gate.bf16, offset, n, g);
  load_floats(up.data, up.bf16, offset, n, u);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) g[i] = g[i] * sigmoid(g[i]) * u[i];
  store_floats(g, n, out, out_bf16, offset);
}

CAI_MULTIVERSION void backward_chunk(FloatOrBf16 gate, FloatOrBf16 up, FloatOrBf16 grad_out, int64_t offset,
                                     int64_t n, void* grad_gate, bool gate_bf16, void* grad_up, bool up_bf16) {
  float g[kChunk], u[kChunk], dy[kChunk];
  load_floats(gate.data, gate.bf16, offset, n, g);
  load_floats(up.data, up.bf16, offset, n, u);
  load_floats(grad_out.data, grad_out.bf16, offset, n, dy);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float s = sigmoid(g[i]), silu = g[i] * s;
    const float d_gate = dy[i] * u[i] * s * (1.f + g[i] * (1.f - s));
    u[i] = dy[i] * silu;
    g[i] = d_gate;
  }
  store_floats(g, n, grad_gate, gate_bf16, offset);
  store_floats(u, n, grad_up, up_bf16, offset);
}

}  // namespace

void swiglu_rows(FloatOrBf16 gate, FloatOrBf16 up, int64_t n, void* out, bool out_bf16) {
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < n; c += kChunk) forward_chunk(gate, up, c, std::min(kChunk, n - c), out, out_bf16);
}

void swiglu_forward(py::array gate, py::array up, py::array out) {
  const int64_t n = gate.size();
  const FloatOrBf16 g = float_or_bf16(gate, n, "gate"), u = float_or_bf16(up, n, "up"), o = float_or_bf16(out, n, "out");
  void* op = writable(out, "out");
  py::gil_scoped_release nogil;
  swiglu_rows(g, u, n, op, o.bf16);
}

void swiglu_backward(py::array gate, py::array up, py::array grad_out, py::array grad_gate, py::array grad_up) {
  const int64_t n = gate.size();
  const FloatOrBf16 g = float_or_bf16(gate, n, "gate"), u = float_or_bf16(up, n, "up"),
                    dy = float_or_bf16(grad_out, n, "grad_out"), dg = float_or_bf16(grad_gate, n, "grad_gate"),
                    du = float_or_bf16(grad_up, n, "grad_up");
  void *dgp = writable(grad_gate, "grad_gate"), *dup = writable(grad_up, "grad_up");
  py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < n; c += kChunk)
    backward_chunk(g, u, dy, c, std::min(kChunk, n - c), dgp, dg.bf16, dup, du.bf16);
}
