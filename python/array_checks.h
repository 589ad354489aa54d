// Checks shared by the bindings that take a batch of per-sample statistics (the table's
// update, GEKO's visit counters): every array is checked for dtype, rank, contiguity and
// alignment before the core sees a pointer.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace geko::bindings {

// A readable 1-D, contiguous, aligned, native-endian array of T; returns its length.
template <typename T>
size_t require_vector(const pybind11::array& array, const char* name, const char* dtype_name) {
  namespace py = pybind11;
  if (!py::isinstance<py::array_t<T>>(array)) {
    throw py::type_error(std::string(name) + " must have dtype " + dtype_name + ", got " +
                         py::str(array.dtype()).cast<std::string>());
  }
  if (array.ndim() != 1) {
    throw std::invalid_argument(std::string(name) + " must be 1-D, got " + std::to_string(array.ndim()) +
                                " dimensions");
  }
  const size_t count = static_cast<size_t>(array.shape(0));
  if (count > 1 && array.strides(0) != static_cast<py::ssize_t>(sizeof(T))) {
    throw std::invalid_argument(std::string(name) + " must be contiguous");
  }
  if (reinterpret_cast<uintptr_t>(array.data()) % alignof(T) != 0) {
    throw std::invalid_argument(std::string(name) + " must be aligned");
  }
  return count;
}

// A writable array of T (checked as require_vector) of `length` entries, or nullptr for None.
template <typename T>
T* writable_vector(const pybind11::object& object, const char* name, const char* dtype_name, size_t length,
                   const char* what) {
  namespace py = pybind11;
  if (object.is_none()) return nullptr;
  if (!py::isinstance<py::array>(object)) throw py::type_error(std::string(name) + " must be a numpy array or None");
  const py::array array = py::reinterpret_borrow<py::array>(object);
  const size_t count = require_vector<T>(array, name, dtype_name);
  if (count != length) {
    throw std::invalid_argument(std::string(name) + " must have " + what + " (" + std::to_string(length) + "), got " +
                                std::to_string(count));
  }
  if (!array.writeable()) throw std::invalid_argument(std::string(name) + " must be writable");
  return static_cast<T*>(const_cast<void*>(array.data()));
}

// A batch of statistics, checked: indices int32/int64, loss/confidence/correct float32, all
// 1-D, contiguous, one length.
struct Batch {
  const void* indices;
  bool narrow;  // int32 indices
  size_t count;
  const float* loss;
  const float* confidence;
  const float* correct;
};

inline Batch checked_batch(const pybind11::array& indices, const pybind11::array& loss,
                           const pybind11::array& confidence, const pybind11::array& correct) {
  namespace py = pybind11;
  Batch b;
  b.narrow = py::isinstance<py::array_t<int32_t>>(indices);
  if (!b.narrow && !py::isinstance<py::array_t<int64_t>>(indices)) {
    throw py::type_error("indices must have dtype int32 or int64, got " + py::str(indices.dtype()).cast<std::string>());
  }
  b.count = b.narrow ? require_vector<int32_t>(indices, "indices", "int32")
                     : require_vector<int64_t>(indices, "indices", "int64");
  const size_t n_loss = require_vector<float>(loss, "loss", "float32");
  const size_t n_conf = require_vector<float>(confidence, "confidence", "float32");
  const size_t n_correct = require_vector<float>(correct, "correct", "float32");
  if (n_loss != b.count || n_conf != b.count || n_correct != b.count) {
    throw std::invalid_argument("indices, loss, confidence and correct must have the same length, got " +
                                std::to_string(b.count) + ", " + std::to_string(n_loss) + ", " +
                                std::to_string(n_conf) + " and " + std::to_string(n_correct));
  }
  b.indices = indices.data();
  b.loss = static_cast<const float*>(loss.data());
  b.confidence = static_cast<const float*>(confidence.data());
  b.correct = static_cast<const float*>(correct.data());
  return b;
}

}  // namespace geko::bindings
