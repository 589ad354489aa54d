#include "bindings.h"

#include <pybind11/stl.h>

#include <string>
#include <thread>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "geko/config.h"

namespace py = pybind11;

namespace geko::bindings {

namespace {

py::dict cpu_features() {
  py::dict features;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  features["sse4.2"] = static_cast<bool>(__builtin_cpu_supports("sse4.2"));
  features["avx"] = static_cast<bool>(__builtin_cpu_supports("avx"));
  features["avx2"] = static_cast<bool>(__builtin_cpu_supports("avx2"));
  features["fma"] = static_cast<bool>(__builtin_cpu_supports("fma"));
  features["avx512f"] = static_cast<bool>(__builtin_cpu_supports("avx512f"));
  features["avx512bw"] = static_cast<bool>(__builtin_cpu_supports("avx512bw"));
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
  // 16-bit matrix instructions: torch's CPU matmuls in bfloat16/float16 are fast only with them
  features["avx512bf16"] = static_cast<bool>(__builtin_cpu_supports("avx512bf16"));
  features["amx-bf16"] = static_cast<bool>(__builtin_cpu_supports("amx-bf16"));
  features["avx512fp16"] = static_cast<bool>(__builtin_cpu_supports("avx512fp16"));
#endif
#endif
  return features;
}

py::dict compiled_features() {
  py::dict features;
#ifdef __AVX2__
  features["avx2"] = true;
#else
  features["avx2"] = false;
#endif
#ifdef __FMA__
  features["fma"] = true;
#else
  features["fma"] = false;
#endif
#ifdef __AVX512F__
  features["avx512f"] = true;
#else
  features["avx512f"] = false;
#endif
  return features;
}

}  // namespace

void bind_config(py::module_& m) {
  py::class_<Config>(m, "Config", "C++ mirror of geko_core.GekoConfig (defaults live here).")
      .def(py::init<>())
      .def_readwrite("freeze_confidence", &Config::freeze_confidence)
      .def_readwrite("freeze_q", &Config::freeze_q)
      .def_readwrite("hard_confidence", &Config::hard_confidence)
      .def_readwrite("correct_threshold", &Config::correct_threshold)
      .def_readwrite("q_alpha", &Config::q_alpha)
      .def_readwrite("q_init", &Config::q_init)
      .def_readwrite("loss_scale", &Config::loss_scale)
      .def_readwrite("loss_ema_beta", &Config::loss_ema_beta)
      .def_readwrite("loss_diff_ema_beta", &Config::loss_diff_ema_beta)
      .def_readwrite("noise_guard_visits", &Config::noise_guard_visits)
      .def_readwrite("correct_margin", &Config::correct_margin)
      .def("validate", &Config::validate);

  m.attr("BUCKET_INVALID") = static_cast<int>(kInvalid);
  m.attr("BUCKET_FREEZE") = static_cast<int>(kFreeze);
  m.attr("BUCKET_LIGHT") = static_cast<int>(kLight);
  m.attr("BUCKET_FOCUS") = static_cast<int>(kFocus);
  m.attr("BUCKET_HARD") = static_cast<int>(kHard);
  m.attr("BUCKET_UNSEEN") = static_cast<int>(kUnseen);
  m.attr("NUM_BUCKETS") = kNumBuckets;

  m.def("build_info", []() {
    py::dict info;
    info["version"] = GEKO_VERSION;
    info["compiler"] = __VERSION__;
    info["cxx_flags"] = GEKO_CXX_FLAGS;
    info["sanitize"] = static_cast<bool>(GEKO_SANITIZE);
#ifdef _OPENMP
    info["openmp"] = true;
    info["openmp_version"] = _OPENMP;
    info["omp_max_threads"] = omp_get_max_threads();
#else
    info["openmp"] = false;
    info["openmp_version"] = 0;
    info["omp_max_threads"] = 1;
#endif
    info["hardware_threads"] = std::thread::hardware_concurrency();
    info["cpu_features"] = cpu_features();
    info["compiled_for"] = compiled_features();
    return info;
  }, "Compiler, flags, OpenMP and CPU features of this build.");
}

}  // namespace geko::bindings

PYBIND11_MODULE(_C, m) {
  m.doc() = "geko_core compiled core: sample table, rollout table, CPU statistics kernels, curriculum and planner.";
  geko::bindings::bind_config(m);
  geko::bindings::bind_table(m);
  geko::bindings::bind_stats(m);
  geko::bindings::bind_planner(m);
  geko::bindings::bind_angle(m);
  geko::bindings::bind_visit_counters(m);
  geko::bindings::bind_rollout_table(m);
}
