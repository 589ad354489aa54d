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

#include "array_checks.h"
#include "record_bindings.h"
#include "bindings.h"
#include "geko/sample_table.h"

namespace py = pybind11;

namespace geko::bindings {

namespace {

// Applies one batch. before/after (None or writable int8 arrays, one entry per row) receive
// each row's bucket before and after the batch, in the same locked call (the report a
// policy with state of its own needs). Bad input raises before anything is written.
void update(SampleTable& table, const py::array& indices, const py::array& loss, const py::array& confidence,
            const py::array& correct, int64_t step, const py::object& before, const py::object& after) {
  const Batch b = checked_batch(indices, loss, confidence, correct);
  int8_t* before_out = writable_vector<int8_t>(before, "before", "int8", b.count, "one entry per row");
  int8_t* after_out = writable_vector<int8_t>(after, "after", "int8", b.count, "one entry per row");
  py::gil_scoped_release release;
  if (b.narrow) {
    table.update(static_cast<const int32_t*>(b.indices), b.loss, b.confidence, b.correct, b.count, step, before_out,
                 after_out);
  } else {
    table.update(static_cast<const int64_t*>(b.indices), b.loss, b.confidence, b.correct, b.count, step, before_out,
                 after_out);
  }
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

}  // namespace

void bind_table(py::module_& m) {
  py::class_<SampleTable>(m, "SampleTable",
                          "Per-sample state, one 32-byte record per sample (use geko_core.SampleTable).")
      .def(py::init<int64_t, const Config&, int>(), py::arg("num_samples"), py::arg("config"), py::arg("num_threads") = 1,
           py::call_guard<py::gil_scoped_release>())
      .def("update", &update, py::arg("indices"), py::arg("loss"), py::arg("confidence"), py::arg("correct"),
           py::arg("step"), py::arg("before") = py::none(), py::arg("after") = py::none(),
           "Apply one batch: indices int32/int64, loss/confidence/correct float32, all 1-D contiguous, same length.\n"
           "before/after: None or writable int8 arrays of the batch's length, filled with each row's bucket\n"
           "before and after the batch.")
      .def("buckets", &buckets<SampleTable>, py::arg("indices"), "Bucket code (int8) of each index.")
      .def("bucket_counts", &bucket_counts<SampleTable>,
          "int64[5]: number of samples in FREEZE, LIGHT, FOCUS, HARD, UNSEEN.")
      .def(
          "copy_field",
          [](const SampleTable& table, const std::string& name) { return copy_field(table, name, record_fields()); },
          py::arg("name"), "A copy of one field of every record.")
      .def("load", &load, py::arg("records"), py::arg("config"), py::arg("updates"), py::arg("nonfinite_skipped"),
           "Replace config, counters and records (uint8, num_samples * 32 bytes) after validating them.")
      .def("records_view", &records_view<SampleTable>, "Read-only [num_samples, 32] uint8 view of the records.")
      // Getters wait for the table's mutex: let other Python threads run meanwhile.
      .def_property("num_threads",
                    py::cpp_function(py::method_adaptor<SampleTable>(&SampleTable::num_threads),
                                     py::call_guard<py::gil_scoped_release>()),
                    py::cpp_function(py::method_adaptor<SampleTable>(&SampleTable::set_num_threads),
                                     py::call_guard<py::gil_scoped_release>()),
                    "OpenMP threads of updates and scans (0: OpenMP's default).")
      .def_property_readonly("num_samples", &SampleTable::num_samples)
      .def_property_readonly("nbytes", &SampleTable::nbytes)
      .def_property_readonly("config", py::cpp_function(py::method_adaptor<SampleTable>(&SampleTable::config),
                                     py::call_guard<py::gil_scoped_release>()))
      .def_property_readonly(
          "updates", py::cpp_function([](const SampleTable& t) { return t.counters().updates; },
                                      py::call_guard<py::gil_scoped_release>()))
      .def_property_readonly(
          "nonfinite_skipped", py::cpp_function([](const SampleTable& t) { return t.counters().nonfinite_skipped; },
                                                py::call_guard<py::gil_scoped_release>()))
      .def_static("layout", [] { return layout(record_fields()); }, "[(name, numpy dtype str, byte offset)] of the record fields.");
  m.attr("SAMPLE_RECORD_SIZE") = sizeof(SampleRecord);
  m.attr("TABLE_FORMAT_VERSION") = kTableFormatVersion;
  m.attr("MAX_STEP") = kMaxStep;
  m.attr("FLAG_SUSPECTED_NOISY") = static_cast<int>(kFlagSuspectedNoisy);
}

}  // namespace geko::bindings
