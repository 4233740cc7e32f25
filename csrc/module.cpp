#include "common.h"
#include "rowstats.h"

PYBIND11_MODULE(_native, m) {
  m.doc() = "cai-engine CPU kernels (no libtorch: plain buffers in, buffers out)";
  m.def("logsumexp_rows", &logsumexp_rows, py::arg("x"),
        "log(sum(exp(x), axis=1)) of a float32 [rows, cols] array, computed stably.");
}
