// Binding of GEKO's visit counters (geko/visit_counters.h): a free function of the policy,
// run on the report of SampleTable.update (each row's bucket before and after the batch).
#include <pybind11/numpy.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "array_checks.h"
#include "bindings.h"
#include "geko/visit_counters.h"

namespace py = pybind11;

namespace geko::bindings {

namespace {

py::tuple count_visits_binding(const py::array& indices, const py::array& loss, const py::array& confidence,
                               const py::array& correct, const py::array& before, const py::array& after,
                               int64_t epoch, const py::object& seen_epoch, const py::object& streak,
                               const py::object& stall, const py::object& ref_loss, int64_t freeze_streak,
                               double freeze_confidence, double stall_drop) {
  const Batch b = checked_batch(indices, loss, confidence, correct);
  if (require_vector<int8_t>(before, "before", "int8") != b.count ||
      require_vector<int8_t>(after, "after", "int8") != b.count) {
    throw std::invalid_argument("before and after must have one entry per row (" + std::to_string(b.count) + ")");
  }
  if (seen_epoch.is_none()) throw std::invalid_argument("seen_epoch is required");
  if (!py::isinstance<py::array>(seen_epoch)) throw py::type_error("seen_epoch must be a numpy array or None");
  const size_t n = require_vector<int32_t>(py::reinterpret_borrow<py::array>(seen_epoch), "seen_epoch", "int32");
  VisitCounters counters;
  counters.num_samples = n;
  const char* per_sample = "one entry per sample";
  counters.seen_epoch = writable_vector<int32_t>(seen_epoch, "seen_epoch", "int32", n, per_sample);
  counters.streak = writable_vector<uint8_t>(streak, "streak", "uint8", n, per_sample);
  counters.stall = writable_vector<uint8_t>(stall, "stall", "uint8", n, per_sample);
  counters.ref_loss = writable_vector<float>(ref_loss, "ref_loss", "float32", n, per_sample);
  if (freeze_streak < 0 || freeze_streak > 255) {
    throw std::invalid_argument("freeze_streak must lie in [0, 255], got " + std::to_string(freeze_streak));
  }
  if (!(freeze_confidence >= 0.0 && freeze_confidence <= 1.0)) {
    throw std::invalid_argument("freeze_confidence must lie in [0, 1]");
  }
  if (!(stall_drop >= 0.0 && stall_drop <= 1.0)) throw std::invalid_argument("stall_drop must lie in [0, 1]");
  VisitCounterParams params;
  params.freeze_streak = static_cast<int32_t>(freeze_streak);
  params.freeze_confidence = static_cast<float>(freeze_confidence);
  params.stall_drop = static_cast<float>(stall_drop);
  const auto* before_codes = static_cast<const int8_t*>(before.data());
  const auto* after_codes = static_cast<const int8_t*>(after.data());
  RevisitCount result;
  {
    py::gil_scoped_release release;
    if (b.narrow) {
      result = count_visits(counters, params, static_cast<const int32_t*>(b.indices), b.loss, b.confidence, b.correct,
                            before_codes, after_codes, b.count, epoch);
    } else {
      result = count_visits(counters, params, static_cast<const int64_t*>(b.indices), b.loss, b.confidence, b.correct,
                            before_codes, after_codes, b.count, epoch);
    }
  }
  return py::make_tuple(result.revisits, result.failed);
}

}  // namespace

void bind_visit_counters(py::module_& m) {
  m.def("count_visits", &count_visits_binding, py::arg("indices"), py::arg("loss"), py::arg("confidence"),
        py::arg("correct"), py::arg("before"), py::arg("after"), py::arg("epoch"), py::arg("seen_epoch"),
        py::arg("streak"), py::arg("stall"), py::arg("ref_loss"), py::arg("freeze_streak"),
        py::arg("freeze_confidence"), py::arg("stall_drop"),
        "GEKO's visit counters and revisit count for one batch the table applied (before/after: each row's\n"
        "bucket around SampleTable.update). The counter arrays (one entry per sample, owned by the policy)\n"
        "are written in place; returns the batch's FREEZE revisits as (revisits, failed). Everything is\n"
        "checked before anything is written.");
}

}  // namespace geko::bindings
