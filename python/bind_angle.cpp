#include "bindings.h"

namespace geko::bindings {

void bind_angle(pybind11::module_& m) { (void)m; }

}  // namespace geko::bindings
