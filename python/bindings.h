// Each part of the core registers its bindings from its own file, so the parts
// can grow independently. std::invalid_argument -> ValueError and
// std::out_of_range -> IndexError are pybind11's built-in translations.
#pragma once

#include <pybind11/pybind11.h>

namespace geko::bindings {

void bind_config(pybind11::module_& m);   // bindings.cpp
void bind_table(pybind11::module_& m);    // bind_table.cpp
void bind_stats(pybind11::module_& m);    // bind_stats.cpp
void bind_planner(pybind11::module_& m);  // bind_planner.cpp
void bind_angle(pybind11::module_& m);    // bind_angle.cpp
void bind_visit_counters(pybind11::module_& m);  // bind_visit_counters.cpp
void bind_rollout_table(pybind11::module_& m);   // bind_rollout_table.cpp

}  // namespace geko::bindings
