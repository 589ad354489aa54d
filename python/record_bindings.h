// Bindings shared by the compiled tables (SampleTable, RolloutTable): bucket reads, field
// copies, the read-only record view and the layout description. Every array is checked for
// dtype, rank, contiguity and alignment, every index against the table size.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "array_checks.h"
#include "geko/record_table.h"

namespace geko::bindings {

inline bool is_int32(const pybind11::array& a) { return pybind11::isinstance<pybind11::array_t<int32_t>>(a); }

// Length of a checked int32/int64 index vector.
inline size_t index_count(const pybind11::array& indices) {
  namespace py = pybind11;
  if (!is_int32(indices) && !py::isinstance<py::array_t<int64_t>>(indices)) {
    throw py::type_error("indices must have dtype int32 or int64, got " + py::str(indices.dtype()).cast<std::string>());
  }
  return is_int32(indices) ? require_vector<int32_t>(indices, "indices", "int32")
                           : require_vector<int64_t>(indices, "indices", "int64");
}

// Calls f(pointer) with the checked indices as const int32_t* or const int64_t*.
template <typename F>
void with_indices(const pybind11::array& indices, F&& f) {
  if (is_int32(indices)) {
    f(static_cast<const int32_t*>(indices.data()));
  } else {
    f(static_cast<const int64_t*>(indices.data()));
  }
}

inline pybind11::dtype field_dtype(const FieldInfo& field) {
  return pybind11::dtype(std::string(1, field.kind) + std::to_string(field.size));
}

// [(name, numpy dtype str, byte offset)] of the record fields.
inline pybind11::list layout(const std::vector<FieldInfo>& fields) {
  pybind11::list out;
  for (const FieldInfo& field : fields) {
    out.append(pybind11::make_tuple(field.name, pybind11::str(field_dtype(field).attr("str")), field.offset));
  }
  return out;
}

template <typename Table>
pybind11::array_t<int8_t> buckets(const Table& table, const pybind11::array& indices) {
  const size_t count = index_count(indices);
  pybind11::array_t<int8_t> out(static_cast<pybind11::ssize_t>(count));
  int8_t* dst = out.mutable_data();
  pybind11::gil_scoped_release release;
  with_indices(indices, [&](auto index) { table.buckets(index, count, dst); });
  return out;
}

template <typename Table>
pybind11::array_t<int64_t> bucket_counts(const Table& table) {
  BucketCounts counts;
  {
    pybind11::gil_scoped_release release;
    counts = table.bucket_counts();
  }
  pybind11::array_t<int64_t> out(kNumBuckets);
  for (int b = 0; b < kNumBuckets; ++b) out.mutable_at(b) = counts[b];
  return out;
}

template <typename Table>
pybind11::array copy_field(const Table& table, const std::string& name, const std::vector<FieldInfo>& fields) {
  for (const FieldInfo& field : fields) {
    if (name != field.name) continue;
    pybind11::array out(field_dtype(field),
                        std::vector<pybind11::ssize_t>{static_cast<pybind11::ssize_t>(table.num_samples())});
    void* dst = out.mutable_data();
    pybind11::gil_scoped_release release;
    table.copy_field(name, dst);
    return out;
  }
  std::string known;
  for (const FieldInfo& field : fields) known += (known.empty() ? "" : ", ") + std::string(field.name);
  throw std::invalid_argument("unknown field '" + name + "'; the fields are " + known);
}

// Read-only [num_samples, 32] uint8 view of the records, keeping the table alive.
template <typename Table>
pybind11::array records_view(const pybind11::object& self) {
  namespace py = pybind11;
  const auto& table = self.cast<const Table&>();
  py::array view(py::dtype::of<uint8_t>(),
                 {static_cast<py::ssize_t>(table.num_samples()), static_cast<py::ssize_t>(kRecordSize)},
                 {static_cast<py::ssize_t>(kRecordSize), py::ssize_t{1}}, table.data(), self);
  view.attr("setflags")(py::arg("write") = false);
  return view;
}

}  // namespace geko::bindings
