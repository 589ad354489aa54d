// Bindings of geko::SampleTable. The public class is geko_core.table.SampleTable,
// which converts user input (torch tensors, float64, bool, strided arrays) before
// calling in here; these bindings still trust nothing: every array is checked for
// dtype, rank, contiguity and alignment, and every index against the table size.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings.h"
#include "geko/sample_table.h"
#include "geko/visit_counters.h"

namespace py = pybind11;

namespace geko::bindings {

namespace {

// A readable 1-D, contiguous, aligned, native-endian array of T; returns its length.
template <typename T>
size_t require_vector(const py::array& array, const char* name, const char* dtype_name) {
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

bool is_int32(const py::array& a) { return py::isinstance<py::array_t<int32_t>>(a); }

void require_int_indices(const py::array& indices) {
  if (!is_int32(indices) && !py::isinstance<py::array_t<int64_t>>(indices)) {
    throw py::type_error("indices must have dtype int32 or int64, got " + py::str(indices.dtype()).cast<std::string>());
  }
}

// A batch for update(), checked: indices int32/int64, the rest float32, all 1-D, contiguous,
// one length.
struct Batch {
  const void* indices;
  bool narrow;
  size_t count;
  const float* loss;
  const float* confidence;
  const float* correct;
};

Batch checked_batch(const py::array& indices, const py::array& loss, const py::array& confidence,
                    const py::array& correct) {
  require_int_indices(indices);
  Batch b;
  b.narrow = is_int32(indices);
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

void apply_batch(SampleTable& table, const Batch& b, int64_t step) {
  if (b.narrow) {
    table.update(static_cast<const int32_t*>(b.indices), b.loss, b.confidence, b.correct, b.count, step);
  } else {
    table.update(static_cast<const int64_t*>(b.indices), b.loss, b.confidence, b.correct, b.count, step);
  }
}

void bucket_codes(const SampleTable& table, const Batch& b, int8_t* out) {
  if (b.narrow) {
    table.buckets(static_cast<const int32_t*>(b.indices), b.count, out);
  } else {
    table.buckets(static_cast<const int64_t*>(b.indices), b.count, out);
  }
}

void update(SampleTable& table, const py::array& indices, const py::array& loss, const py::array& confidence,
            const py::array& correct, int64_t step) {
  const Batch b = checked_batch(indices, loss, confidence, correct);
  py::gil_scoped_release release;
  apply_batch(table, b, step);
}

// update() that also reports the batch's FREEZE revisits: (revisits, failed), where a
// revisit is an index whose bucket was FREEZE before the batch and whose correct value is
// finite, and a failed one is a revisit whose bucket is FOCUS or HARD after the batch (the
// sample is no longer right). Bad input raises before anything changes, as update().
py::tuple update_revisits(SampleTable& table, const py::array& indices, const py::array& loss,
                          const py::array& confidence, const py::array& correct, int64_t step) {
  const Batch b = checked_batch(indices, loss, confidence, correct);
  int64_t revisits = 0;
  int64_t failed = 0;
  {
    py::gil_scoped_release release;
    std::vector<int8_t> before(b.count), after(b.count);
    bucket_codes(table, b, before.data());  // checks every index before anything changes
    apply_batch(table, b, step);
    bucket_codes(table, b, after.data());
    for (size_t i = 0; i < b.count; ++i) {
      if (before[i] != kFreeze || !std::isfinite(b.correct[i])) continue;
      ++revisits;
      failed += (after[i] == kFocus || after[i] == kHard) ? 1 : 0;
    }
  }
  return py::make_tuple(revisits, failed);
}

// A writable counter array of T with one entry per sample, or nullptr for None.
template <typename T>
T* counter_array(const py::object& object, const char* name, const char* dtype_name, size_t num_samples) {
  if (object.is_none()) return nullptr;
  if (!py::isinstance<py::array>(object)) {
    throw py::type_error(std::string(name) + " must be a numpy array or None");
  }
  const py::array array = py::reinterpret_borrow<py::array>(object);
  const size_t count = require_vector<T>(array, name, dtype_name);
  if (count != num_samples) {
    throw std::invalid_argument(std::string(name) + " must have one entry per sample (" + std::to_string(num_samples) +
                                "), got " + std::to_string(count));
  }
  if (!array.writeable()) throw std::invalid_argument(std::string(name) + " must be writable");
  return static_cast<T*>(const_cast<void*>(array.data()));
}

// update() followed by GEKO's visit counters (geko/visit_counters.h) in the same call:
// returns the batch's FREEZE revisits as (revisits, failed), a revisit being a row frozen
// before the batch (FREEZE, or LIGHT with a streak of at least freeze_streak) with a finite
// correct value. Every array and index is checked before the table or a counter changes.
py::tuple update_counted(SampleTable& table, const py::array& indices, const py::array& loss,
                         const py::array& confidence, const py::array& correct, int64_t step, int64_t epoch,
                         const py::object& seen_epoch, const py::object& streak, const py::object& stall,
                         const py::object& ref_loss, int64_t freeze_streak, double stall_drop) {
  const Batch b = checked_batch(indices, loss, confidence, correct);
  const size_t n = static_cast<size_t>(table.num_samples());
  VisitCounters counters;
  counters.num_samples = n;
  counters.seen_epoch = counter_array<int32_t>(seen_epoch, "seen_epoch", "int32", n);
  counters.streak = counter_array<uint8_t>(streak, "streak", "uint8", n);
  counters.stall = counter_array<uint8_t>(stall, "stall", "uint8", n);
  counters.ref_loss = counter_array<float>(ref_loss, "ref_loss", "float32", n);
  if (counters.seen_epoch == nullptr) throw std::invalid_argument("seen_epoch is required");
  if (counters.stall != nullptr && counters.ref_loss == nullptr) {
    throw std::invalid_argument("ref_loss is required when stall is given");
  }
  if (epoch < 0 || epoch > INT32_MAX) throw std::invalid_argument("epoch must lie in [0, 2**31 - 1], got " + std::to_string(epoch));
  if (freeze_streak < 0 || freeze_streak > 255) {
    throw std::invalid_argument("freeze_streak must lie in [0, 255], got " + std::to_string(freeze_streak));
  }
  if (!(stall_drop >= 0.0 && stall_drop <= 1.0)) throw std::invalid_argument("stall_drop must lie in [0, 1]");
  VisitCounterParams params;
  params.freeze_streak = static_cast<int32_t>(freeze_streak);
  params.freeze_confidence = static_cast<float>(table.config().freeze_confidence);
  params.stall_drop = static_cast<float>(stall_drop);
  RevisitCount result;
  {
    py::gil_scoped_release release;
    std::vector<int8_t> before(b.count), after(b.count);
    bucket_codes(table, b, before.data());  // checks every index before anything changes
    apply_batch(table, b, step);
    bucket_codes(table, b, after.data());
    if (b.narrow) {
      result = count_visits(counters, params, static_cast<const int32_t*>(b.indices), b.loss, b.confidence,
                            b.correct, before.data(), after.data(), b.count, static_cast<int32_t>(epoch));
    } else {
      result = count_visits(counters, params, static_cast<const int64_t*>(b.indices), b.loss, b.confidence,
                            b.correct, before.data(), after.data(), b.count, static_cast<int32_t>(epoch));
    }
  }
  return py::make_tuple(result.revisits, result.failed);
}

py::array_t<int8_t> buckets(const SampleTable& table, const py::array& indices) {
  require_int_indices(indices);
  const bool narrow = is_int32(indices);
  const size_t count = narrow ? require_vector<int32_t>(indices, "indices", "int32")
                              : require_vector<int64_t>(indices, "indices", "int64");
  py::array_t<int8_t> out(static_cast<py::ssize_t>(count));
  int8_t* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    if (narrow) {
      table.buckets(static_cast<const int32_t*>(indices.data()), count, dst);
    } else {
      table.buckets(static_cast<const int64_t*>(indices.data()), count, dst);
    }
  }
  return out;
}

py::dtype field_dtype(const FieldInfo& field) {
  return py::dtype(std::string(1, field.kind) + std::to_string(field.size));
}

py::array copy_field(const SampleTable& table, const std::string& name) {
  const auto& fields = record_fields();
  for (const FieldInfo& field : fields) {
    if (name != field.name) continue;
    py::array out(field_dtype(field), std::vector<py::ssize_t>{static_cast<py::ssize_t>(table.num_samples())});
    void* dst = out.mutable_data();
    py::gil_scoped_release release;
    table.copy_field(name, dst);
    return out;
  }
  std::string known;
  for (const FieldInfo& field : fields) known += (known.empty() ? "" : ", ") + std::string(field.name);
  throw std::invalid_argument("unknown field '" + name + "'; the fields are " + known);
}

void load(SampleTable& table, const py::array& records, const Config& config, uint64_t updates,
          uint64_t nonfinite_skipped) {
  const size_t nbytes = require_vector<uint8_t>(records, "records", "uint8");
  const void* src = records.data();
  TableCounters counters;
  counters.updates = updates;
  counters.nonfinite_skipped = nonfinite_skipped;
  py::gil_scoped_release release;
  table.load(src, nbytes, config, counters);
}

// Read-only [num_samples, 32] uint8 view of the records, keeping the table alive.
py::array records_view(const py::object& self) {
  const auto& table = self.cast<const SampleTable&>();
  py::array view(py::dtype::of<uint8_t>(),
                 {static_cast<py::ssize_t>(table.num_samples()), static_cast<py::ssize_t>(sizeof(SampleRecord))},
                 {static_cast<py::ssize_t>(sizeof(SampleRecord)), py::ssize_t{1}}, table.data(), self);
  view.attr("setflags")(py::arg("write") = false);
  return view;
}

py::list layout() {
  py::list out;
  for (const FieldInfo& field : record_fields()) {
    out.append(py::make_tuple(field.name, py::str(field_dtype(field).attr("str")), field.offset));
  }
  return out;
}

}  // namespace

void bind_table(py::module_& m) {
  py::class_<SampleTable>(m, "SampleTable",
                          "Per-sample state, one 32-byte record per sample (use geko_core.SampleTable).")
      .def(py::init<int64_t, const Config&, int>(), py::arg("num_samples"), py::arg("config"), py::arg("num_threads") = 1,
           py::call_guard<py::gil_scoped_release>())
      .def("update", &update, py::arg("indices"), py::arg("loss"), py::arg("confidence"), py::arg("correct"),
           py::arg("step"),
           "Apply one batch: indices int32/int64, loss/confidence/correct float32, all 1-D contiguous, same length.")
      .def("update_revisits", &update_revisits, py::arg("indices"), py::arg("loss"), py::arg("confidence"),
           py::arg("correct"), py::arg("step"),
           "update() that returns the batch's FREEZE revisits as (revisits, failed): indices that were FREEZE\n"
           "before the batch with a finite correct value, and those of them that are FOCUS or HARD after it.")
      .def("update_counted", &update_counted, py::arg("indices"), py::arg("loss"), py::arg("confidence"),
           py::arg("correct"), py::arg("step"), py::arg("epoch"), py::arg("seen_epoch"), py::arg("streak"),
           py::arg("stall"), py::arg("ref_loss"), py::arg("freeze_streak"), py::arg("stall_drop"),
           "update() followed by GEKO's streak and stall counters (arrays owned by the caller, one entry per\n"
           "sample, written in place); returns the batch's FREEZE revisits as (revisits, failed).")
      .def("buckets", &buckets, py::arg("indices"), "Bucket code (int8) of each index.")
      .def(
          "bucket_counts",
          [](const SampleTable& table) {
            BucketCounts counts;
            {
              py::gil_scoped_release release;
              counts = table.bucket_counts();
            }
            py::array_t<int64_t> out(kNumBuckets);
            for (int b = 0; b < kNumBuckets; ++b) out.mutable_at(b) = counts[b];
            return out;
          },
          "int64[5]: number of samples in FREEZE, LIGHT, FOCUS, HARD, UNSEEN.")
      .def("copy_field", &copy_field, py::arg("name"), "A copy of one field of every record.")
      .def("load", &load, py::arg("records"), py::arg("config"), py::arg("updates"), py::arg("nonfinite_skipped"),
           "Replace config, counters and records (uint8, num_samples * 32 bytes) after validating them.")
      .def("records_view", &records_view, "Read-only [num_samples, 32] uint8 view of the records.")
      // Getters wait for the table's mutex: let other Python threads run meanwhile.
      .def_property("num_threads",
                    py::cpp_function(&SampleTable::num_threads, py::call_guard<py::gil_scoped_release>()),
                    py::cpp_function(&SampleTable::set_num_threads, py::call_guard<py::gil_scoped_release>()),
                    "OpenMP threads of updates and scans (0: OpenMP's default).")
      .def_property_readonly("num_samples", &SampleTable::num_samples)
      .def_property_readonly("nbytes", &SampleTable::nbytes)
      .def_property_readonly("config", py::cpp_function(&SampleTable::config, py::call_guard<py::gil_scoped_release>()))
      .def_property_readonly(
          "updates", py::cpp_function([](const SampleTable& t) { return t.counters().updates; },
                                      py::call_guard<py::gil_scoped_release>()))
      .def_property_readonly(
          "nonfinite_skipped", py::cpp_function([](const SampleTable& t) { return t.counters().nonfinite_skipped; },
                                                py::call_guard<py::gil_scoped_release>()))
      .def_static("layout", &layout, "[(name, numpy dtype str, byte offset)] of the record fields.");
  m.attr("SAMPLE_RECORD_SIZE") = sizeof(SampleRecord);
  m.attr("MAX_STEP") = kMaxStep;
  m.attr("FLAG_SUSPECTED_NOISY") = static_cast<int>(kFlagSuspectedNoisy);
}

}  // namespace geko::bindings
