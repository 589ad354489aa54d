// Bindings of geko::RolloutTable and rollout_group_stats. The public API is
// geko_core.rollouts, which converts user input first; these bindings still trust nothing:
// every array is checked for dtype, shape, contiguity and alignment before the core sees a
// pointer, and the compiled work runs with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "array_checks.h"
#include "bindings.h"
#include "geko/rollout_table.h"
#include "record_bindings.h"

namespace py = pybind11;

namespace geko::bindings {

namespace {

struct Groups {
  const float* rewards;
  const float* lengths;  // nullptr when None
  size_t count;
  size_t group;
};

// rewards: float32 [B, G], C-contiguous and aligned; lengths: None or the same.
size_t require_matrix(const py::array& array, const char* name, size_t* cols) {
  if (!py::isinstance<py::array_t<float>>(array)) {
    throw py::type_error(std::string(name) + " must have dtype float32, got " + py::str(array.dtype()).cast<std::string>());
  }
  if (array.ndim() != 2) {
    throw std::invalid_argument(std::string(name) + " must be 2-D [B, G], got " + std::to_string(array.ndim()) +
                                " dimensions");
  }
  const size_t rows = static_cast<size_t>(array.shape(0));
  *cols = static_cast<size_t>(array.shape(1));
  const auto item = static_cast<py::ssize_t>(sizeof(float));
  // An empty array has no layout to check (numpy gives it zero strides).
  if (rows > 0 && ((*cols > 1 && array.strides(1) != item) || (rows > 1 && array.strides(0) != item * array.shape(1)))) {
    throw std::invalid_argument(std::string(name) + " must be C-contiguous");
  }
  if (reinterpret_cast<uintptr_t>(array.data()) % alignof(float) != 0) {
    throw std::invalid_argument(std::string(name) + " must be aligned");
  }
  return rows;
}

Groups checked_groups(const py::array& rewards, const py::object& lengths) {
  Groups g;
  g.count = require_matrix(rewards, "rewards", &g.group);
  g.rewards = static_cast<const float*>(rewards.data());
  g.lengths = nullptr;
  if (!lengths.is_none()) {
    if (!py::isinstance<py::array>(lengths)) throw py::type_error("lengths must be a numpy array or None");
    const auto array = py::reinterpret_borrow<py::array>(lengths);
    size_t cols = 0;
    const size_t rows = require_matrix(array, "lengths", &cols);
    if (rows != g.count || cols != g.group) {
      throw std::invalid_argument("lengths must have the shape of rewards (" + std::to_string(g.count) + ", " +
                                  std::to_string(g.group) + "), got (" + std::to_string(rows) + ", " +
                                  std::to_string(cols) + ")");
    }
    g.lengths = static_cast<const float*>(array.data());
  }
  return g;
}

// Fresh output arrays and the core's view of them.
struct StatsArrays {
  explicit StatsArrays(size_t count)
      : pass_rate(count), spread(count), zero_variance(count), all_right(count), all_wrong(count),
        mean_length(count) {}
  py::array_t<float> pass_rate, spread;
  py::array_t<bool> zero_variance, all_right, all_wrong;
  py::array_t<float> mean_length;

  GroupStats view() {
    const auto flag = [](py::array_t<bool>& a) { return reinterpret_cast<uint8_t*>(a.mutable_data()); };
    return GroupStats{pass_rate.mutable_data(), spread.mutable_data(),  flag(zero_variance),
                      flag(all_right),          flag(all_wrong),        mean_length.mutable_data()};
  }
  py::tuple to_tuple() const {
    return py::make_tuple(pass_rate, spread, zero_variance, all_right, all_wrong, mean_length);
  }
};

py::tuple group_stats(const py::array& rewards, const py::object& lengths, const RolloutConfig& config,
                      int num_threads) {
  const Groups g = checked_groups(rewards, lengths);
  StatsArrays out(g.count);
  const GroupStats view = out.view();
  {
    py::gil_scoped_release release;
    rollout_group_stats(g.rewards, g.lengths, g.count, g.group, config, view, num_threads);
  }
  return out.to_tuple();
}

py::tuple update(RolloutTable& table, const py::array& indices, const py::array& rewards, const py::object& lengths,
                 int64_t step, const py::object& before, const py::object& after) {
  const size_t count = index_count(indices);
  const Groups g = checked_groups(rewards, lengths);
  if (g.count != count) {
    throw std::invalid_argument("indices and rewards must have the same length B, got " + std::to_string(count) +
                                " and " + std::to_string(g.count));
  }
  int8_t* before_out = writable_vector<int8_t>(before, "before", "int8", count, "one entry per row");
  int8_t* after_out = writable_vector<int8_t>(after, "after", "int8", count, "one entry per row");
  StatsArrays out(count);
  const GroupStats view = out.view();
  {
    py::gil_scoped_release release;
    with_indices(indices, [&](auto index) {
      table.update(index, g.rewards, g.lengths, count, g.group, step, view, before_out, after_out);
    });
  }
  return out.to_tuple();
}

void update_stats(RolloutTable& table, const py::array& indices, const py::array& pass_rate, const py::array& spread,
                  const py::array& zero_variance, const py::array& all_right, const py::array& all_wrong,
                  const py::array& mean_length, int64_t step, const py::object& before, const py::object& after) {
  const size_t count = index_count(indices);
  const size_t lengths[] = {
      require_vector<float>(pass_rate, "pass_rate", "float32"),   require_vector<float>(spread, "spread", "float32"),
      require_vector<bool>(zero_variance, "zero_variance", "bool"), require_vector<bool>(all_right, "all_right", "bool"),
      require_vector<bool>(all_wrong, "all_wrong", "bool"),        require_vector<float>(mean_length, "mean_length", "float32"),
  };
  for (const size_t n : lengths) {
    if (n != count) {
      throw std::invalid_argument("every statistic must have one entry per index (" + std::to_string(count) +
                                  "), got " + std::to_string(n));
    }
  }
  int8_t* before_out = writable_vector<int8_t>(before, "before", "int8", count, "one entry per row");
  int8_t* after_out = writable_vector<int8_t>(after, "after", "int8", count, "one entry per row");
  const auto flag = [](const py::array& a) { return static_cast<const uint8_t*>(a.data()); };
  const ConstGroupStats stats{static_cast<const float*>(pass_rate.data()), static_cast<const float*>(spread.data()),
                              flag(zero_variance),
                              flag(all_right),
                              flag(all_wrong),
                              static_cast<const float*>(mean_length.data())};
  py::gil_scoped_release release;
  with_indices(indices, [&](auto index) { table.update_stats(index, stats, count, step, before_out, after_out); });
}

void load(RolloutTable& table, const py::array& records, const RolloutConfig& config, uint64_t updates) {
  const size_t nbytes = require_vector<uint8_t>(records, "records", "uint8");
  const void* src = records.data();
  RolloutCounters counters;
  counters.updates = updates;
  py::gil_scoped_release release;
  table.load(src, nbytes, config, counters);
}

}  // namespace

void bind_rollout_table(py::module_& m) {
  py::class_<RolloutConfig>(m, "RolloutConfig", "C++ mirror of geko_core.RolloutConfig (defaults live here).")
      .def(py::init<>())
      .def_readwrite("right_at", &RolloutConfig::right_at)
      .def_readwrite("wrong_at", &RolloutConfig::wrong_at)
      .def_readwrite("alpha", &RolloutConfig::alpha)
      .def_readwrite("light_above", &RolloutConfig::light_above)
      .def_readwrite("flat_tol", &RolloutConfig::flat_tol)
      .def("validate", &RolloutConfig::validate);

  m.def("rollout_group_stats", &group_stats, py::arg("rewards"), py::arg("lengths"), py::arg("config"),
        py::arg("num_threads") = 1,
        "Per-group statistics of rewards float32 [B, G] (lengths None or float32 [B, G]): (pass_rate, spread,\n"
        "zero_variance, all_right, all_wrong, mean_length), each [B].");

  py::class_<RolloutTable>(m, "RolloutTable",
                           "Per-prompt reward history, one 32-byte record per prompt (use geko_core.RolloutTable).")
      .def(py::init<int64_t, const RolloutConfig&, int>(), py::arg("num_samples"), py::arg("config"),
           py::arg("num_threads") = 1, py::call_guard<py::gil_scoped_release>())
      .def("update", &update, py::arg("indices"), py::arg("rewards"), py::arg("lengths"), py::arg("step"),
           py::arg("before") = py::none(), py::arg("after") = py::none(),
           "Apply one rollout batch: indices int32/int64 [B], rewards float32 [B, G], lengths None or float32\n"
           "[B, G]. Returns the groups' statistics as rollout_group_stats.")
      .def("update_stats", &update_stats, py::arg("indices"), py::arg("pass_rate"), py::arg("spread"),
           py::arg("zero_variance"), py::arg("all_right"), py::arg("all_wrong"), py::arg("mean_length"),
           py::arg("step"), py::arg("before") = py::none(), py::arg("after") = py::none(),
           "Apply precomputed statistics (float32 / bool [B]) by the same rule.")
      .def("buckets", &buckets<RolloutTable>, py::arg("indices"), "Bucket code (int8) of each index.")
      .def("bucket_counts", &bucket_counts<RolloutTable>,
           "int64[5]: number of prompts in FREEZE, LIGHT, FOCUS, HARD, UNSEEN.")
      .def(
          "copy_field",
          [](const RolloutTable& table, const std::string& name) {
            return copy_field(table, name, rollout_record_fields());
          },
          py::arg("name"), "A copy of one field of every record.")
      .def("load", &load, py::arg("records"), py::arg("config"), py::arg("updates"),
           "Replace config, counters and records (uint8, num_samples * 32 bytes) after validating them.")
      .def("records_view", &records_view<RolloutTable>, "Read-only [num_samples, 32] uint8 view of the records.")
      .def_property("num_threads",
                    py::cpp_function(py::method_adaptor<RolloutTable>(&RolloutTable::num_threads),
                                     py::call_guard<py::gil_scoped_release>()),
                    py::cpp_function(py::method_adaptor<RolloutTable>(&RolloutTable::set_num_threads),
                                     py::call_guard<py::gil_scoped_release>()),
                    "OpenMP threads of updates and scans (0: OpenMP's default).")
      .def_property_readonly("num_samples", &RolloutTable::num_samples)
      .def_property_readonly("nbytes", &RolloutTable::nbytes)
      .def_property_readonly("config",
                             py::cpp_function(py::method_adaptor<RolloutTable>(&RolloutTable::config),
                                     py::call_guard<py::gil_scoped_release>()))
      .def_property_readonly("updates", py::cpp_function([](const RolloutTable& t) { return t.counters().updates; },
                                                         py::call_guard<py::gil_scoped_release>()))
      .def_static("layout", [] { return layout(rollout_record_fields()); },
                  "[(name, numpy dtype str, byte offset)] of the record fields.");
  m.attr("ROLLOUT_FORMAT_VERSION") = kRolloutFormatVersion;
}

}  // namespace geko::bindings
