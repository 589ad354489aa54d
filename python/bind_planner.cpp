// Bindings of the curriculum and the planner. Arrays come in as 1-D
// C-contiguous numpy arrays of an exact dtype (the Python layer converts);
// results go out as numpy arrays that own the C++ vectors (no copy).
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <array>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "bindings.h"
#include "geko/curriculum.h"
#include "geko/planner.h"

namespace py = pybind11;

namespace geko::bindings {

namespace {

using PhaseTuple = std::tuple<std::string, double, double, double, double, double>;

template <class T>
py::array_t<T> to_numpy(std::vector<T>&& values) {
  auto* heap = new std::vector<T>(std::move(values));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>({static_cast<py::ssize_t>(heap->size())}, {static_cast<py::ssize_t>(sizeof(T))},
                        heap->data(), owner);
}

template <class T>
bool has_dtype(const py::array& a) {
  return py::isinstance<py::array_t<T>>(a);
}

// A 1-D C-contiguous array's data, refused with TypeError / ValueError otherwise.
template <class T>
const T* data_of(const py::array& a, const char* name, const char* dtype_name) {
  if (!has_dtype<T>(a)) {
    throw py::type_error(std::string(name) + " must have dtype " + dtype_name + ", got " +
                         py::str(a.dtype()).cast<std::string>());
  }
  if (a.ndim() != 1) throw py::value_error(std::string(name) + " must be 1-D, got " + std::to_string(a.ndim()) + "-D");
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + " must be contiguous");
  return static_cast<const T*>(a.data());
}

WeightedMethod parse_method(const std::string& method) {
  if (method == "systematic") return WeightedMethod::kSystematic;
  if (method == "exponential") return WeightedMethod::kExponential;
  throw py::value_error("method must be 'systematic' or 'exponential', got '" + method + "'");
}

ShardOptions shard_options(uint64_t seed, int64_t num_replicas, int64_t rank, bool shuffle, bool drop_last) {
  ShardOptions o;
  o.seed = seed;
  o.num_replicas = num_replicas;
  o.rank = rank;
  o.shuffle = shuffle;
  o.drop_last = drop_last;
  o.validate();
  return o;
}

py::dict to_dict(PlanResult&& r) {
  py::dict d;
  d["indices"] = to_numpy(std::move(r.indices));
  d["weights"] = to_numpy(std::move(r.weights));
  d["epoch_size"] = r.epoch_size;
  d["total_size"] = r.total_size;
  d["real"] = r.real;
  d["bucket_draws"] = py::cast(std::vector<int64_t>(r.bucket_draws.begin(), r.bucket_draws.end()));
  return d;
}

PhaseTuple phase_to_tuple(const CurriculumPhase& p) {
  return {p.name, p.end, p.hard, p.focus, p.light, p.lr_multiplier};
}

}  // namespace

void bind_planner(py::module_& m) {
  m.attr("MAX_RATE") = kMaxRate;
  m.attr("DEFAULT_MIN_RATE") = kDefaultMinRate;
  m.attr("DEFAULT_FREEZE_REVISIT") = kDefaultFreezeRevisit;

  m.def("default_curriculum_phases", []() {
    std::vector<PhaseTuple> out;
    for (const auto& p : default_curriculum_phases()) out.push_back(phase_to_tuple(p));
    return out;
  }, "The five phases of docs/design.md §3 as (name, end, hard, focus, light, lr_multiplier).");

  py::class_<MountainCurriculum>(m, "MountainCurriculum")
      .def(py::init([](const std::vector<PhaseTuple>& phases, bool smooth, double max_rate, double min_rate,
                       double freeze_revisit) {
             std::vector<CurriculumPhase> ps;
             for (const auto& [name, end, hard, focus, light, lr] : phases) ps.push_back({name, end, hard, focus, light, lr});
             return MountainCurriculum(std::move(ps), smooth, max_rate, min_rate, freeze_revisit);
           }),
           py::arg("phases"), py::arg("smooth"), py::arg("max_rate"), py::arg("min_rate"), py::arg("freeze_revisit"))
      .def("weights", [](const MountainCurriculum& c, double p) {
        const CurriculumWeights w = c.weights(p);
        return std::make_tuple(w.hard, w.focus, w.light);
      }, py::arg("p"))
      .def("phase_index", &MountainCurriculum::phase_index, py::arg("p"))
      .def("lr_multiplier", &MountainCurriculum::lr_multiplier, py::arg("p"))
      .def("rates", [](const MountainCurriculum& c, double p) {
        const auto r = c.rates(p);
        return std::vector<double>(r.begin(), r.end());
      }, py::arg("p"))
      .def_property_readonly("phases", [](const MountainCurriculum& c) {
        std::vector<PhaseTuple> out;
        for (const auto& p : c.phases()) out.push_back(phase_to_tuple(p));
        return out;
      })
      .def_property_readonly("smooth", &MountainCurriculum::smooth)
      .def_property_readonly("max_rate", &MountainCurriculum::max_rate)
      .def_property_readonly("min_rate", &MountainCurriculum::min_rate)
      .def_property_readonly("freeze_revisit", &MountainCurriculum::freeze_revisit);

  m.def("curriculum_progress", &curriculum_progress, py::arg("step"), py::arg("total_steps"));
  m.def("gainrl_update_mu", &gainrl_update_mu, py::arg("mu"), py::arg("accuracy"), py::arg("angle"), py::arg("n"),
        py::arg("alpha"), py::arg("beta"), py::arg("acc_scale"), py::arg("adj_min"), py::arg("adj_max"),
        py::arg("num_positions"));
  m.def("freeze_revisit_count", &freeze_revisit_count, py::arg("fraction"), py::arg("n_freeze"));

  py::class_<EpochPlanner>(m, "EpochPlanner")
      .def(py::init([](int64_t num_samples, uint64_t seed, int64_t num_replicas, int64_t rank, bool shuffle,
                       bool drop_last) {
             return EpochPlanner(num_samples, shard_options(seed, num_replicas, rank, shuffle, drop_last));
           }),
           py::arg("num_samples"), py::arg("seed"), py::arg("num_replicas"), py::arg("rank"), py::arg("shuffle"),
           py::arg("drop_last"))
      .def_property_readonly("num_samples", &EpochPlanner::num_samples)
      .def("plan", [](const EpochPlanner& planner, const py::array& buckets, const std::array<double, kNumBuckets>& rates,
                      int64_t epoch, const py::object& last_visit, int64_t chunk_size) {
        const int8_t* b = data_of<int8_t>(buckets, "buckets", "int8");
        const int64_t* lv64 = nullptr;
        const int32_t* lv32 = nullptr;
        py::array lv;
        if (!last_visit.is_none()) {
          if (!py::isinstance<py::array>(last_visit)) throw py::type_error("last_visit_step must be a numpy array or None");
          lv = py::reinterpret_borrow<py::array>(last_visit);
          if (has_dtype<int32_t>(lv)) {
            lv32 = data_of<int32_t>(lv, "last_visit_step", "int32 or int64");
          } else {
            lv64 = data_of<int64_t>(lv, "last_visit_step", "int32 or int64");
          }
          if (lv.shape(0) != buckets.shape(0)) {
            throw py::value_error("last_visit_step has " + std::to_string(lv.shape(0)) + " entries, buckets has " +
                                  std::to_string(buckets.shape(0)));
          }
        }
        const int64_t n = buckets.shape(0);
        PlanResult r;
        {
          py::gil_scoped_release release;
          r = planner.plan(b, n, rates, epoch, lv64, lv32, chunk_size);
        }
        return to_dict(std::move(r));
      }, py::arg("buckets"), py::arg("rates"), py::arg("epoch"), py::arg("last_visit_step"),
         py::arg("chunk_size") = -1);

  m.def("infobatch_plan", [](const py::array& scores, int64_t epoch, int64_t num_epochs, double prune_ratio, double delta,
                             uint64_t seed, int64_t num_replicas, int64_t rank, bool shuffle, bool drop_last) {
    const ShardOptions o = shard_options(seed, num_replicas, rank, shuffle, drop_last);
    PlanResult r;
    if (has_dtype<float>(scores)) {
      const float* s = data_of<float>(scores, "scores", "float32 or float64");
      py::gil_scoped_release release;
      r = infobatch_plan(s, scores.shape(0), epoch, num_epochs, prune_ratio, delta, o);
    } else {
      const double* s = data_of<double>(scores, "scores", "float32 or float64");
      py::gil_scoped_release release;
      r = infobatch_plan(s, scores.shape(0), epoch, num_epochs, prune_ratio, delta, o);
    }
    return to_dict(std::move(r));
  }, py::arg("scores"), py::arg("epoch"), py::arg("num_epochs"), py::arg("prune_ratio"), py::arg("delta"),
     py::arg("seed"), py::arg("num_replicas"), py::arg("rank"), py::arg("shuffle"), py::arg("drop_last"));

  m.def("weighted_sample", [](const py::array& weights, int64_t k, uint64_t seed, uint64_t epoch,
                              const std::string& method) {
    const WeightedMethod how = parse_method(method);
    WeightedSampleResult r;
    if (has_dtype<float>(weights)) {
      const float* w = data_of<float>(weights, "weights", "float32 or float64");
      py::gil_scoped_release release;
      r = weighted_sample(w, weights.shape(0), k, seed, epoch, how);
    } else {
      const double* w = data_of<double>(weights, "weights", "float32 or float64");
      py::gil_scoped_release release;
      r = weighted_sample(w, weights.shape(0), k, seed, epoch, how);
    }
    return std::make_pair(to_numpy(std::move(r.indices)), to_numpy(std::move(r.inclusion)));
  }, py::arg("weights"), py::arg("k"), py::arg("seed"), py::arg("epoch"), py::arg("method"));

  m.def("gaussian_window_plan", [](const py::array& order, double mu, double sigma, int64_t k, int64_t epoch,
                                   const std::string& method, uint64_t seed, int64_t num_replicas, int64_t rank,
                                   bool shuffle, bool drop_last) {
    const WeightedMethod how = parse_method(method);
    const ShardOptions o = shard_options(seed, num_replicas, rank, shuffle, drop_last);
    const int64_t* ord = data_of<int64_t>(order, "order", "int64");
    PlanResult r;
    {
      py::gil_scoped_release release;
      r = gaussian_window_plan(ord, order.shape(0), mu, sigma, k, epoch, how, o);
    }
    return to_dict(std::move(r));
  }, py::arg("order"), py::arg("mu"), py::arg("sigma"), py::arg("k"), py::arg("epoch"), py::arg("method"),
     py::arg("seed"), py::arg("num_replicas"), py::arg("rank"), py::arg("shuffle"), py::arg("drop_last"));

  m.def("shard_plan", [](const py::array& indices, const py::array& weights, int64_t num_replicas, int64_t rank,
                         bool drop_last) {
    const int64_t* idx = data_of<int64_t>(indices, "indices", "int64");
    const float* w = data_of<float>(weights, "weights", "float32");
    if (weights.shape(0) != indices.shape(0)) {
      throw py::value_error("weights has " + std::to_string(weights.shape(0)) + " entries, indices has " +
                            std::to_string(indices.shape(0)));
    }
    Shard r;
    {
      py::gil_scoped_release release;
      r = shard_plan(idx, w, indices.shape(0), num_replicas, rank, drop_last);
    }
    return py::make_tuple(to_numpy(std::move(r.indices)), to_numpy(std::move(r.weights)), r.total_size, r.real);
  }, py::arg("indices"), py::arg("weights"), py::arg("num_replicas"), py::arg("rank"), py::arg("drop_last"),
     "This rank's share of a global plan: (indices, weights, total_size, real entries).");

  m.def("random_permutation", [](int64_t n, uint64_t seed, uint64_t epoch) {
    if (n < 0) throw py::value_error("n must be >= 0, got " + std::to_string(n));
    std::vector<int64_t> v(static_cast<size_t>(n));
    {
      py::gil_scoped_release release;
      for (int64_t i = 0; i < n; ++i) v[i] = i;
      shuffle_in_place(v, seed, epoch, 0);
    }
    return to_numpy(std::move(v));
  }, py::arg("n"), py::arg("seed"), py::arg("epoch"),
     "A uniformly random permutation of range(n), O(n), deterministic for (seed, epoch).");
}

}  // namespace geko::bindings
