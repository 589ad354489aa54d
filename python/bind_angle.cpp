// Binding of the CPU angle-concentration kernel. Tensors arrive as DLPack capsules
// (python/dlpack_view.h); every shape, stride and dtype the kernel indexes with is checked
// here before the GIL is released.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings.h"
#include "dlpack_view.h"
#include "geko/angle.h"

namespace py = pybind11;

namespace geko::bindings {

namespace {

using dlpack::Kind;

void angle_forward(const py::object& hidden_obj, const py::object& mask_obj, const py::object& prefix_obj,
                   const py::object& concentration_obj, const py::object& valid_tokens_obj,
                   const py::object& cross_obj) {
  dlpack::View x = dlpack::from_capsule(hidden_obj, "hidden");
  HiddenView hidden;
  switch (x.kind) {
    case Kind::kFloat32: hidden.dtype = HiddenDtype::kFloat32; break;
    case Kind::kBFloat16: hidden.dtype = HiddenDtype::kBFloat16; break;
    case Kind::kFloat16: hidden.dtype = HiddenDtype::kFloat16; break;
    default:
      throw py::type_error(std::string("hidden: expected float32, bfloat16 or float16, got ") +
                           dlpack::kind_name(x.kind));
  }
  if (x.shape.size() != 3) throw std::invalid_argument("hidden: expected a 3-D [B, T, d] tensor");
  if (x.shape[2] < 1) throw std::invalid_argument("hidden: the hidden size d must be >= 1");
  if (x.strides[2] != 1 && x.shape[2] > 1)
    throw std::invalid_argument("hidden: the last dimension must be contiguous (stride 1)");
  hidden.data = x.data;
  hidden.batch = x.shape[0];
  hidden.tokens = x.shape[1];
  hidden.dim = x.shape[2];
  hidden.batch_stride = x.strides[0];
  hidden.token_stride = x.strides[1];
  const std::vector<int64_t> batch_shape{hidden.batch};

  TokenMaskView mask;
  if (!mask_obj.is_none()) {
    dlpack::View m = dlpack::from_capsule(mask_obj, "mask");
    dlpack::require_kind(m, Kind::kBool, "mask");
    dlpack::require_shape(m, {hidden.batch, hidden.tokens}, "mask");
    mask.data = reinterpret_cast<const uint8_t*>(m.data);
    mask.batch_stride = m.strides[0];
    mask.token_stride = m.strides[1];
  }
  const int64_t* prefix = nullptr;
  if (!prefix_obj.is_none())
    prefix = reinterpret_cast<const int64_t*>(
        dlpack::checked_buffer(prefix_obj, Kind::kInt64, batch_shape, "prefix_len"));

  AngleOutput out;
  out.concentration =
      reinterpret_cast<float*>(dlpack::checked_buffer(concentration_obj, Kind::kFloat32, batch_shape, "concentration"));
  out.valid_tokens =
      reinterpret_cast<int32_t*>(dlpack::checked_buffer(valid_tokens_obj, Kind::kInt32, batch_shape, "valid_tokens"));
  if (!cross_obj.is_none())
    out.cross = reinterpret_cast<float*>(dlpack::checked_buffer(cross_obj, Kind::kFloat32, batch_shape, "cross"));

  py::gil_scoped_release release;
  angle_concentration_cpu(hidden, mask, prefix, out);
}

}  // namespace

void bind_angle(py::module_& m) {
  m.def("angle_concentration", &angle_forward, py::arg("hidden"), py::arg("mask"), py::arg("prefix_len"),
        py::arg("concentration"), py::arg("valid_tokens"), py::arg("cross"),
        "Angle concentration of [B, T, d] hidden states (DLPack capsules of CPU tensors).\n\n"
        "hidden: float32/bfloat16/float16, last dimension contiguous; mask: bool [B, T] any strides\n"
        "or None; prefix_len: contiguous int64 [B] in [0, T] or None (no cross term). Writes\n"
        "concentration float32 [B], valid_tokens int32 [B] and, with a prefix, cross float32 [B].\n"
        "Releases the GIL.");
}

}  // namespace geko::bindings
