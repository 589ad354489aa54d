#include "bindings.h"

namespace geko::bindings {

void bind_table(pybind11::module_& m) { (void)m; }

}  // namespace geko::bindings
