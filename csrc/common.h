#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

using f32_array = py::array_t<float, py::array::c_style | py::array::forcecast>;
using i64_array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
// Outputs are written in place: no forcecast, so a wrong dtype is an error instead of a silent copy.
using f32_out = py::array_t<float, 0>;
using i64_array_out = py::array_t<int64_t, 0>;

inline void check_ndim(const py::array& a, int ndim, const char* name) {
  if (a.ndim() != ndim)
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(ndim) +
                                " dimensions, got " + std::to_string(a.ndim()));
}

inline void check_dim(const py::array& a, int axis, py::ssize_t size, const char* name) {
  if (a.shape(axis) != size)
    throw std::invalid_argument(std::string(name) + ": expected size " + std::to_string(size) +
                                " on axis " + std::to_string(axis) + ", got " +
                                std::to_string(a.shape(axis)));
}

// A float32 or bfloat16 buffer (bf16 arrives as its 16-bit patterns: numpy has no bfloat16). The kernels that
// take either convert a row at a time into float scratch, so their arithmetic is float32 whatever the storage.
struct FloatOrBf16 {
  const void* data;
  bool bf16;
};

inline FloatOrBf16 float_or_bf16(const py::array& a, py::ssize_t size, const char* name) {
  if (!(a.flags() & py::array::c_style)) throw std::invalid_argument(std::string(name) + ": must be contiguous");
  if (a.size() != size)
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(size) + " elements, got " +
                                std::to_string(a.size()));
  const auto kind = a.dtype().kind();
  if (a.itemsize() == 4 && kind == 'f') return {a.data(), false};
  if (a.itemsize() == 2 && (kind == 'i' || kind == 'u')) return {a.data(), true};
  throw std::invalid_argument(std::string(name) + ": expected float32 or bfloat16 (as 16-bit integers), got dtype " +
                              std::string(py::str(a.dtype())));
}

inline void* writable(py::array& a, const char* name) {
  if (!a.writeable()) throw std::invalid_argument(std::string(name) + ": must be writable");
  return a.mutable_data();
}

// A bfloat16 buffer (its 16-bit patterns), C-contiguous, of this shape (-1: any size on that axis); else an error
// naming it and what was expected.
inline const uint16_t* bf16_buffer(const py::array& a, const std::vector<int64_t>& shape, const std::string& name) {
  check_ndim(a, int(shape.size()), name.c_str());
  for (size_t i = 0; i < shape.size(); ++i)
    if (shape[i] >= 0) check_dim(a, int(i), shape[i], name.c_str());
  if (!(a.flags() & py::array::c_style)) throw std::invalid_argument(name + ": must be contiguous");
  if (a.itemsize() != 2 || a.dtype().kind() == 'f')
    throw std::invalid_argument(name + ": expected bfloat16 (as 16-bit integers), got dtype " +
                                std::string(py::str(a.dtype())));
  return static_cast<const uint16_t*>(a.data());
}

// A float32 buffer, C-contiguous, of this shape (-1: any size on that axis); else an error naming it.
inline const float* f32_buffer(const py::array& a, const std::vector<int64_t>& shape, const std::string& name) {
  check_ndim(a, int(shape.size()), name.c_str());
  for (size_t i = 0; i < shape.size(); ++i)
    if (shape[i] >= 0) check_dim(a, int(i), shape[i], name.c_str());
  if (!(a.flags() & py::array::c_style)) throw std::invalid_argument(name + ": must be contiguous");
  if (!a.dtype().is(py::dtype::of<float>()))
    throw std::invalid_argument(name + ": expected float32, got dtype " + std::string(py::str(a.dtype())));
  return static_cast<const float*>(a.data());
}
