// A checked, non-owning view of a DLPack capsule (`tensor.__dlpack__()`), so `_C`
// takes torch (or numpy, JAX, ...) CPU tensors without linking libtorch. The approach is
// the one the CPU-statistics bindings use (cpustats branch, python/bind_stats.cpp), kept
// in its own header so other bindings can share it once both are merged.
//
// The capsule is read, never consumed: its producer still owns (and frees) the memory,
// and the caller keeps the Python object alive for the duration of the call.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace geko::bindings::dlpack {

// The DLPack C ABI (unversioned "dltensor" capsules), declared here to avoid a dependency.
struct Device {
  int32_t device_type;
  int32_t device_id;
};
struct DataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct RawTensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct ManagedTensor {
  RawTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor*);
};

constexpr int32_t kCpu = 1;
constexpr uint8_t kInt = 0;
constexpr uint8_t kUInt = 1;
constexpr uint8_t kFloat = 2;
constexpr uint8_t kBfloat = 4;
constexpr uint8_t kBool = 6;

enum class Kind { kFloat32, kFloat64, kBFloat16, kFloat16, kInt64, kInt32, kInt8, kBool, kOther };

inline const char* kind_name(Kind kind) {
  switch (kind) {
    case Kind::kFloat32: return "float32";
    case Kind::kFloat64: return "float64";
    case Kind::kBFloat16: return "bfloat16";
    case Kind::kFloat16: return "float16";
    case Kind::kInt64: return "int64";
    case Kind::kInt32: return "int32";
    case Kind::kInt8: return "int8";
    case Kind::kBool: return "bool/uint8";
    default: return "an unsupported dtype";
  }
}

inline Kind kind_of(const DataType& t) {
  if (t.lanes != 1) return Kind::kOther;
  if (t.code == kFloat && t.bits == 32) return Kind::kFloat32;
  if (t.code == kFloat && t.bits == 64) return Kind::kFloat64;
  if (t.code == kFloat && t.bits == 16) return Kind::kFloat16;
  if (t.code == kBfloat && t.bits == 16) return Kind::kBFloat16;
  if (t.code == kInt && t.bits == 64) return Kind::kInt64;
  if (t.code == kInt && t.bits == 32) return Kind::kInt32;
  if (t.code == kInt && t.bits == 8) return Kind::kInt8;
  if ((t.code == kBool || t.code == kUInt) && t.bits == 8) return Kind::kBool;
  return Kind::kOther;
}

struct View {
  char* data = nullptr;
  Kind kind = Kind::kOther;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements

  bool contiguous() const {
    // An empty tensor addresses no element: torch gives it arbitrary strides (an expanded
    // [S, 0] tensor keeps stride 0) and calls it contiguous, and so do we.
    for (int64_t d : shape) {
      if (d == 0) return true;
    }
    int64_t expected = 1;
    for (size_t i = shape.size(); i-- > 0;) {
      if (shape[i] != 1 && strides[i] != expected) return false;
      expected *= shape[i];
    }
    return true;
  }
};

inline std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Reads a capsule into a View. Refuses non-capsules (TypeError), consumed capsules,
// non-CPU memory, negative sizes and negative strides (ValueError).
inline View from_capsule(const pybind11::handle& obj, const char* name) {
  if (!PyCapsule_CheckExact(obj.ptr()))
    throw pybind11::type_error(std::string(name) + ": expected a DLPack capsule (tensor.__dlpack__()), got " +
                               std::string(pybind11::str(pybind11::type::of(obj).attr("__name__"))));
  if (!PyCapsule_IsValid(obj.ptr(), "dltensor"))
    throw std::invalid_argument(std::string(name) + ": not an unconsumed 'dltensor' capsule");
  auto* managed = static_cast<ManagedTensor*>(PyCapsule_GetPointer(obj.ptr(), "dltensor"));
  if (managed == nullptr) throw pybind11::error_already_set();
  const RawTensor& t = managed->dl_tensor;
  if (t.device.device_type != kCpu)
    throw std::invalid_argument(std::string(name) + ": the C++ kernels need CPU tensors (DLPack device type " +
                                std::to_string(t.device.device_type) + ")");
  if (t.ndim < 0 || t.ndim > 8) throw std::invalid_argument(std::string(name) + ": unsupported number of dimensions");
  View view;
  view.kind = kind_of(t.dtype);
  view.shape.assign(t.shape, t.shape + t.ndim);
  view.strides.resize(static_cast<size_t>(t.ndim));
  if (t.strides != nullptr) {
    view.strides.assign(t.strides, t.strides + t.ndim);
  } else {  // null strides: compact row-major
    int64_t expected = 1;
    for (int32_t i = t.ndim - 1; i >= 0; --i) {
      view.strides[i] = expected;
      expected *= t.shape[i];
    }
  }
  for (int32_t i = 0; i < t.ndim; ++i) {
    if (view.shape[i] < 0) throw std::invalid_argument(std::string(name) + ": negative size");
    if (view.strides[i] < 0) throw std::invalid_argument(std::string(name) + ": negative strides are not supported");
  }
  view.data = static_cast<char*>(t.data) + t.byte_offset;
  return view;
}

inline void require_kind(const View& v, Kind kind, const char* name) {
  if (v.kind != kind)
    throw pybind11::type_error(std::string(name) + ": expected " + kind_name(kind) + ", got " + kind_name(v.kind));
}

inline void require_shape(const View& v, const std::vector<int64_t>& shape, const char* name) {
  if (v.shape != shape)
    throw std::invalid_argument(std::string(name) + ": expected shape " + shape_string(shape) + ", got " +
                                shape_string(v.shape));
}

// An output or side buffer: exactly `shape` and `kind`, compact row-major.
inline char* checked_buffer(const pybind11::handle& obj, Kind kind, const std::vector<int64_t>& shape,
                            const char* name) {
  View v = from_capsule(obj, name);
  require_kind(v, kind, name);
  require_shape(v, shape, name);
  if (!v.contiguous()) throw std::invalid_argument(std::string(name) + ": must be contiguous");
  return v.data;
}

}  // namespace geko::bindings::dlpack
