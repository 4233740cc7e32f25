#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

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
