// Bindings of the CPU statistics kernels. Tensors arrive as DLPack capsules
// (`tensor.__dlpack__()`), so _C needs no libtorch: every shape, stride and dtype
// the kernels index with is read from the capsule and checked here first.
#include "bindings.h"

#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "geko/config.h"
#include "geko/cpu_stats.h"
#include "dlpack_view.h"

namespace py = pybind11;

namespace geko::bindings {

namespace {

// The DLPack consumer is shared with the angle bindings (dlpack_view.h).
using dlpack::checked_buffer;
using dlpack::from_capsule;
using dlpack::Kind;
using dlpack::kind_name;
using dlpack::require_kind;
using dlpack::require_shape;
using Tensor = dlpack::View;

struct Inputs {
  LogitsView logits;
  LabelsView labels;
};

Inputs checked_inputs(const py::handle& logits_obj, const py::handle& labels_obj) {
  Tensor x = from_capsule(logits_obj, "logits");
  Tensor y = from_capsule(labels_obj, "labels");
  Inputs in;
  switch (x.kind) {
    case Kind::kFloat32: in.logits.dtype = ScalarType::kFloat32; break;
    case Kind::kFloat64: in.logits.dtype = ScalarType::kFloat64; break;
    case Kind::kBFloat16: in.logits.dtype = ScalarType::kBFloat16; break;
    case Kind::kFloat16: in.logits.dtype = ScalarType::kFloat16; break;
    default:
      throw py::type_error(std::string("logits: expected float32, float64, bfloat16 or float16, got ") +
                           kind_name(x.kind));
  }
  // [S, T, V] with [S, T] labels, or [N, V] with [N] labels read as [N, 1, V] / [N, 1].
  if (x.shape.size() != 3 && x.shape.size() != 2)
    throw std::invalid_argument("logits: expected a 3-D [S, T, V] or 2-D [N, V] view");
  const bool flat = x.shape.size() == 2;
  const int64_t V = x.shape.back();
  if (V < 2 || V > kMaxVocab)
    throw std::invalid_argument("logits: vocabulary size must be in [2, " + std::to_string(kMaxVocab) + "], got " +
                                std::to_string(V));
  if (x.strides.back() != 1) throw std::invalid_argument("logits: the last dimension must be contiguous (stride 1)");
  require_kind(y, Kind::kInt64, "labels");
  if (flat)
    require_shape(y, {x.shape[0]}, "labels");
  else
    require_shape(y, {x.shape[0], x.shape[1]}, "labels");
  in.logits.data = x.data;
  in.logits.samples = x.shape[0];
  in.logits.tokens = flat ? 1 : x.shape[1];
  in.logits.vocab = V;
  in.logits.sample_stride = x.strides[0];
  in.logits.token_stride = flat ? 0 : x.strides[1];
  in.labels.data = reinterpret_cast<const int64_t*>(y.data);
  in.labels.sample_stride = y.strides[0];
  in.labels.token_stride = flat ? 0 : y.strides[1];
  return in;
}

// The loss options of a call, checked (std::invalid_argument naming the option; a class_weight
// capsule that is not float32 [V]: TypeError / ValueError). class_weight's storage is the
// caller's tensor, alive for the call.
LossOptions checked_options(double temperature, double softcap, double label_smoothing, double z_loss,
                            const py::object& class_weight, int64_t vocab) {
  LossOptions o;
  o.temperature = temperature;
  o.softcap = softcap;
  o.label_smoothing = label_smoothing;
  o.z_loss = z_loss;
  if (!class_weight.is_none()) {
    Tensor w = from_capsule(class_weight, "class_weight");
    require_kind(w, Kind::kFloat32, "class_weight");
    if (w.shape.size() != 1 || w.shape[0] != vocab)
      throw std::invalid_argument("class_weight: expected shape [" + std::to_string(vocab) +
                                  "] (one weight per class), got " + dlpack::shape_string(w.shape));
    o.class_weight = reinterpret_cast<const float*>(w.data);
    o.class_weight_stride = w.strides[0];
  }
  o.validate(vocab);
  return o;
}

void stats_forward(const py::object& logits, const py::object& labels, int64_t ignore_index, const Config& config,
                   const py::sequence& sample_out, const py::object& token_out, const py::object& lse_out,
                   const py::object& loss_out, double temperature, double softcap, double label_smoothing,
                   double z_loss, const py::object& class_weight) {
  config.validate();
  Inputs in = checked_inputs(logits, labels);
  const LossOptions options =
      checked_options(temperature, softcap, label_smoothing, z_loss, class_weight, in.logits.vocab);
  const int64_t S = in.logits.samples;
  const int64_t T = in.logits.tokens;
  SampleStatsOutput out;
  const std::vector<int64_t> sample_shape{S};
  const size_t sample_parts = py::len(sample_out);
  if (sample_parts == 3) {
    // One float32 [6, S] block (loss, confidence, label_prob, correct, entropy, el2n rows),
    // valid_tokens and bucket: three capsules instead of eight.
    float* values = reinterpret_cast<float*>(checked_buffer(sample_out[0], Kind::kFloat32, {6, S}, "sample values"));
    float** fields[6] = {&out.loss, &out.confidence, &out.label_prob, &out.correct, &out.entropy, &out.el2n};
    for (int k = 0; k < 6; ++k) *fields[k] = values + k * S;
    out.valid_tokens =
        reinterpret_cast<int32_t*>(checked_buffer(sample_out[1], Kind::kInt32, sample_shape, "valid_tokens"));
    out.bucket = reinterpret_cast<int8_t*>(checked_buffer(sample_out[2], Kind::kInt8, sample_shape, "bucket"));
  } else if (sample_parts == 8) {
    out.loss = reinterpret_cast<float*>(checked_buffer(sample_out[0], Kind::kFloat32, sample_shape, "loss"));
    out.confidence =
        reinterpret_cast<float*>(checked_buffer(sample_out[1], Kind::kFloat32, sample_shape, "confidence"));
    out.label_prob =
        reinterpret_cast<float*>(checked_buffer(sample_out[2], Kind::kFloat32, sample_shape, "label_prob"));
    out.correct = reinterpret_cast<float*>(checked_buffer(sample_out[3], Kind::kFloat32, sample_shape, "correct"));
    out.entropy = reinterpret_cast<float*>(checked_buffer(sample_out[4], Kind::kFloat32, sample_shape, "entropy"));
    out.el2n = reinterpret_cast<float*>(checked_buffer(sample_out[5], Kind::kFloat32, sample_shape, "el2n"));
    out.valid_tokens =
        reinterpret_cast<int32_t*>(checked_buffer(sample_out[6], Kind::kInt32, sample_shape, "valid_tokens"));
    out.bucket = reinterpret_cast<int8_t*>(checked_buffer(sample_out[7], Kind::kInt8, sample_shape, "bucket"));
  } else {
    throw std::invalid_argument("sample_out: expected 8 tensors (loss, confidence, label_prob, correct, entropy, "
                                "el2n, valid_tokens, bucket) or 3 (a float32 [6, S] block of the first six, "
                                "valid_tokens, bucket)");
  }

  TokenStatsOutput tokens;
  const std::vector<int64_t> token_shape{S, T};
  float** token_fields[6] = {&tokens.loss, &tokens.confidence, &tokens.label_prob,
                             &tokens.correct, &tokens.entropy, &tokens.el2n};
  if (!token_out.is_none()) {
    py::sequence seq = token_out.cast<py::sequence>();
    const size_t token_parts = py::len(seq);
    py::object valid;
    if (token_parts == 2) {
      // A float32 [K, S, T] block holding the first K fields (1 <= K <= 6), and valid.
      Tensor block = from_capsule(seq[0], "token values");
      require_kind(block, Kind::kFloat32, "token values");
      if (block.shape.size() != 3 || block.shape[0] < 1 || block.shape[0] > 6)
        throw std::invalid_argument("token values: expected a float32 [K, S, T] block with 1 <= K <= 6, got shape " +
                                    dlpack::shape_string(block.shape));
      require_shape(block, {block.shape[0], S, T}, "token values");
      if (!block.contiguous()) throw std::invalid_argument("token values: must be contiguous");
      float* base = reinterpret_cast<float*>(block.data);
      for (int64_t k = 0; k < block.shape[0]; ++k) *token_fields[k] = base + k * S * T;
      valid = seq[1];
    } else if (token_parts == 7) {
      const char* names[6] = {"token loss", "token confidence", "token label_prob",
                              "token correct", "token entropy", "token el2n"};
      for (int k = 0; k < 6; ++k) {
        py::object item = seq[k];
        if (!item.is_none())
          *token_fields[k] = reinterpret_cast<float*>(checked_buffer(item, Kind::kFloat32, token_shape, names[k]));
      }
      valid = seq[6];
    } else {
      throw std::invalid_argument("token_out: expected 7 tensors (loss, confidence, label_prob, correct, entropy, "
                                  "el2n, valid) or 2 (a float32 [K, S, T] block of the first K, valid)");
    }
    if (!valid.is_none())
      tokens.valid = reinterpret_cast<uint8_t*>(checked_buffer(valid, Kind::kBool, token_shape, "token valid"));
  }
  if (!lse_out.is_none())
    tokens.lse = reinterpret_cast<double*>(checked_buffer(lse_out, Kind::kFloat64, token_shape, "lse"));
  if (!loss_out.is_none())
    tokens.train_loss = reinterpret_cast<float*>(checked_buffer(loss_out, Kind::kFloat32, token_shape, "loss_out"));

  py::gil_scoped_release release;
  sample_stats_cpu(in.logits, in.labels, ignore_index, config, out, tokens, options);
}

// Where a backward writes d loss / d logits: a capsule of the logits' dtype, [S, T, V] (or
// [N, V] like flat logits) with a contiguous last dimension; None: the logits storage itself.
struct GradTarget {
  void* data;
  int64_t sample_stride;
  int64_t token_stride;
};

GradTarget checked_grad(const py::object& grad, const Inputs& in) {
  const int64_t S = in.logits.samples;
  const int64_t T = in.logits.tokens;
  if (grad.is_none()) return {const_cast<void*>(in.logits.data), in.logits.sample_stride, in.logits.token_stride};
  Tensor g = from_capsule(grad, "grad");
  Kind want = Kind::kOther;
  switch (in.logits.dtype) {
    case ScalarType::kFloat32: want = Kind::kFloat32; break;
    case ScalarType::kFloat64: want = Kind::kFloat64; break;
    case ScalarType::kBFloat16: want = Kind::kBFloat16; break;
    case ScalarType::kFloat16: want = Kind::kFloat16; break;
  }
  require_kind(g, want, "grad");
  int64_t token_stride = 0;
  if (g.shape.size() == 2 && T == 1) {  // [N, V], as the logits may be
    require_shape(g, {S, in.logits.vocab}, "grad");
  } else {
    require_shape(g, {S, T, in.logits.vocab}, "grad");
    token_stride = g.strides[1];
  }
  if (g.strides.back() != 1) throw std::invalid_argument("grad: the last dimension must be contiguous (stride 1)");
  return {g.data, g.strides[0], token_stride};
}

void ce_backward(const py::object& logits, const py::object& labels, const py::object& lse,
                 const py::object& token_scale, const py::object& grad, int64_t ignore_index, float scale_factor,
                 double temperature, double softcap, double label_smoothing, double z_loss,
                 const py::object& class_weight) {
  Inputs in = checked_inputs(logits, labels);
  const LossOptions options =
      checked_options(temperature, softcap, label_smoothing, z_loss, class_weight, in.logits.vocab);
  const int64_t S = in.logits.samples;
  const int64_t T = in.logits.tokens;
  const std::vector<int64_t> token_shape{S, T};
  const double* lse_data = reinterpret_cast<const double*>(checked_buffer(lse, Kind::kFloat64, token_shape, "lse"));
  // token_scale: [S, T], or [S] (one scale per sample, the usual case) widened here;
  // times scale_factor (the reduction's common factor, so callers need no tensor op for it).
  std::vector<float> widened;
  const float* scale_data = nullptr;
  {
    Tensor sc = from_capsule(token_scale, "token_scale");
    require_kind(sc, Kind::kFloat32, "token_scale");
    if (sc.shape.size() == 1) {
      require_shape(sc, {S}, "token_scale");
      widened.resize(static_cast<size_t>(S * T));
      const float* per_sample = reinterpret_cast<const float*>(sc.data);
      for (int64_t s = 0; s < S; ++s) {
        const float v = per_sample[s * sc.strides[0]] * scale_factor;
        for (int64_t t = 0; t < T; ++t) widened[static_cast<size_t>(s * T + t)] = v;
      }
      scale_data = widened.data();
    } else {
      require_shape(sc, token_shape, "token_scale");
      if (!sc.contiguous()) throw std::invalid_argument("token_scale: must be contiguous");
      scale_data = reinterpret_cast<const float*>(sc.data);
      if (scale_factor != 1.0f) {
        widened.assign(scale_data, scale_data + S * T);
        for (float& v : widened) v *= scale_factor;
        scale_data = widened.data();
      }
    }
  }
  const GradTarget target = checked_grad(grad, in);
  py::gil_scoped_release release;
  cross_entropy_backward_cpu(in.logits, in.labels, lse_data, scale_data, ignore_index, target.data,
                             target.sample_stride, target.token_stride, options);
}

// Flat position (s * T + t) of the first label that is neither ignore_index nor in
// [0, vocab), or -1: the CPU check of the public entry points, one pass without temporaries.
int64_t first_bad_label(const py::object& labels, int64_t vocab, int64_t ignore_index) {
  Tensor y = from_capsule(labels, "labels");
  require_kind(y, Kind::kInt64, "labels");
  if (y.shape.size() != 2) throw std::invalid_argument("labels: expected a 2-D [S, T] view");
  const int64_t S = y.shape[0];
  const int64_t T = y.shape[1];
  const int64_t* data = reinterpret_cast<const int64_t*>(y.data);
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t v = data[s * y.strides[0] + t * y.strides[1]];
      if (v != ignore_index && (v < 0 || v >= vocab)) return s * T + t;
    }
  }
  return -1;
}

// The fused loss's whole CPU forward in one call (the small-step path of the loss and the
// Selector): the label check, the statistics (a float32 [6, S] block, valid_tokens, bucket),
// the reduction of the token losses and, with grad_out, the loss's gradient; without it, the
// per-token log-sum-exp a later backward reads (lse_out).
// Returns (bad, loss, valid_total), or with return_totals (bad, loss, valid_total,
// weight_total, z_loss): bad is the flat position s * T + t of the first label that is
// neither ignore_index nor in [0, V), or -1; when bad >= 0 nothing is written, loss is 0 and
// so are the totals. loss is the sum over samples of weight[s] (1 without weights) times the
// sample's token losses (the options' l) added in token order in double; "mean" divides it by
// the denominator: the sum of the valid tokens' class weights w_y, weight_total (a float;
// valid_total without class weights), NaN for 0 / 0 as F.cross_entropy. z_loss is the part of
// loss that the z-loss adds (weight[s] times zeta lse^2 summed like the loss, divided by the
// same denominator for "mean"; 0 without z-loss). grad_out receives d loss / d logits: the
// token gradients (softmax - onehot without options) times weight[s] (/ the denominator for
// "mean"), 0 on tokens that are not valid.
py::tuple loss_forward(const py::object& logits, const py::object& labels, int64_t ignore_index, const Config& config,
                       const py::object& weight, const std::string& reduction, const py::object& values_out,
                       const py::object& valid_out, const py::object& bucket_out, const py::object& lse_out,
                       const py::object& grad_out, double temperature, double softcap, double label_smoothing,
                       double z_loss, const py::object& class_weight, bool return_totals) {
  config.validate();
  if (reduction != "sum" && reduction != "mean")
    throw std::invalid_argument("reduction: expected 'sum' or 'mean', got '" + reduction + "'");
  Inputs in = checked_inputs(logits, labels);
  const int64_t S = in.logits.samples;
  const int64_t T = in.logits.tokens;
  const int64_t V = in.logits.vocab;
  const LossOptions options = checked_options(temperature, softcap, label_smoothing, z_loss, class_weight, V);
  const bool plain = options.plain();
  SampleStatsOutput out;
  float* values = reinterpret_cast<float*>(checked_buffer(values_out, Kind::kFloat32, {6, S}, "sample values"));
  float** fields[6] = {&out.loss, &out.confidence, &out.label_prob, &out.correct, &out.entropy, &out.el2n};
  for (int k = 0; k < 6; ++k) *fields[k] = values + k * S;
  out.valid_tokens = reinterpret_cast<int32_t*>(checked_buffer(valid_out, Kind::kInt32, {S}, "valid_tokens"));
  out.bucket = reinterpret_cast<int8_t*>(checked_buffer(bucket_out, Kind::kInt8, {S}, "bucket"));
  TokenStatsOutput tokens;
  std::vector<double> lse_scratch;
  if (!lse_out.is_none()) {
    tokens.lse = reinterpret_cast<double*>(checked_buffer(lse_out, Kind::kFloat64, {S, T}, "lse"));
  } else if (!grad_out.is_none() || options.z_loss != 0.0) {
    lse_scratch.resize(static_cast<size_t>(S * T));
    tokens.lse = lse_scratch.data();
  }
  GradTarget grad{nullptr, 0, 0};
  if (!grad_out.is_none()) grad = checked_grad(grad_out, in);
  const float* w = nullptr;
  int64_t w_stride = 0;
  if (!weight.is_none()) {
    Tensor wt = from_capsule(weight, "weight");
    require_kind(wt, Kind::kFloat32, "weight");
    require_shape(wt, {S}, "weight");
    w = reinterpret_cast<const float*>(wt.data);
    w_stride = wt.strides[0];
  }
  const auto result = [return_totals](int64_t bad, double loss, int64_t valid_total, double weight_total,
                                      double z_part) -> py::tuple {
    if (return_totals) return py::make_tuple(bad, loss, valid_total, weight_total, z_part);
    return py::make_tuple(bad, loss, valid_total);
  };
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t v = in.labels.data[s * in.labels.sample_stride + t * in.labels.token_stride];
      if (v != ignore_index && (v < 0 || v >= V)) return result(s * T + t, 0.0, 0, 0.0, 0.0);
    }
  }
  std::vector<float> token_loss(static_cast<size_t>(S * T));
  // Without options the statistic -logp_y is the token loss itself: written once.
  if (plain)
    tokens.loss = token_loss.data();
  else
    tokens.train_loss = token_loss.data();
  double total_loss = 0.0;
  int64_t valid_total = 0;
  double weight_total = 0.0;  // the valid tokens' w_y (with class weights only)
  double z_total = 0.0;
  {
    py::gil_scoped_release release;
    sample_stats_cpu(in.logits, in.labels, ignore_index, config, out, tokens, options);
    for (int64_t s = 0; s < S; ++s) {
      double sample = 0.0;
      const float* row = token_loss.data() + s * T;
      for (int64_t t = 0; t < T; ++t) sample += static_cast<double>(row[t]);
      total_loss += w == nullptr ? sample : sample * static_cast<double>(w[s * w_stride]);
      valid_total += out.valid_tokens[s];
    }
    if (!plain) {
      const double zeta = options.z_loss;
      for (int64_t s = 0; s < S; ++s) {
        double z_sample = 0.0;
        for (int64_t t = 0; t < T; ++t) {
          const int64_t y = in.labels.data[s * in.labels.sample_stride + t * in.labels.token_stride];
          if (y == ignore_index) continue;  // labels were checked: the others are in [0, V)
          if (options.class_weight != nullptr)
            weight_total += static_cast<double>(options.class_weight[y * options.class_weight_stride]);
          if (zeta != 0.0) {
            // As the token loss adds it: zeta lse^2 in float.
            const float lse = static_cast<float>(tokens.lse[s * T + t]);
            z_sample += static_cast<double>(static_cast<float>(zeta) * lse * lse);
          }
        }
        z_total += w == nullptr ? z_sample : z_sample * static_cast<double>(w[s * w_stride]);
      }
    }
    if (options.class_weight == nullptr) weight_total = static_cast<double>(valid_total);
    if (grad.data != nullptr) {
      // The scale of each token's row: its sample's weight, over the denominator for "mean"
      // (the backward of a later call multiplies by the incoming gradient).
      const float factor = reduction == "sum" ? 1.0f
                           : weight_total > 0.0 ? 1.0f / static_cast<float>(weight_total)
                                                : std::numeric_limits<float>::quiet_NaN();
      std::vector<float> scale(static_cast<size_t>(S * T));
      for (int64_t s = 0; s < S; ++s) {
        const float v = w == nullptr ? factor : w[s * w_stride] * factor;
        for (int64_t t = 0; t < T; ++t) scale[static_cast<size_t>(s * T + t)] = v;
      }
      cross_entropy_backward_cpu(in.logits, in.labels, tokens.lse, scale.data(), ignore_index, grad.data,
                                 grad.sample_stride, grad.token_stride, options);
    }
  }
  if (reduction == "mean") {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    total_loss = weight_total > 0.0 ? total_loss / weight_total : nan;
    z_total = weight_total > 0.0 ? z_total / weight_total : nan;
  }
  return result(int64_t{-1}, total_loss, valid_total, weight_total, z_total);
}

}  // namespace

void bind_stats(py::module_& m) {
  m.attr("MAX_VOCAB") = kMaxVocab;
  m.def("stats_forward", &stats_forward, py::arg("logits"), py::arg("labels"), py::arg("ignore_index"),
        py::arg("config"), py::arg("sample_out"), py::arg("token_out") = py::none(), py::arg("lse_out") = py::none(),
        py::kw_only(), py::arg("loss_out") = py::none(), py::arg("temperature") = 1.0, py::arg("softcap") = 0.0,
        py::arg("label_smoothing") = 0.0, py::arg("z_loss") = 0.0, py::arg("class_weight") = py::none(),
        "Fused statistics of [S, T, V] logits and [S, T] int64 labels (DLPack capsules of CPU tensors).\n\n"
        "Writes the 8 per-sample outputs (float32 x6, int32 valid_tokens, int8 bucket; each [S]; or 3:\n"
        "a float32 [6, S] block of the six floats, valid_tokens, bucket), optionally the per-token\n"
        "outputs (7: float32 x6, bool valid; [S, T], entries may be None; or 2: a float32 [K, S, T]\n"
        "block of the first K fields, valid or None) and the per-token log-sum-exp (float64 [S, T]).\n\n"
        "The loss options (geko_core/loss_options.py): temperature (> 0), softcap (0: off), label_smoothing\n"
        "(in [0, 1]), z_loss (>= 0), class_weight (float32 [V] or None). Under options the statistics\n"
        "(and their token loss -logp_y) describe softmax(z) and lse is logsumexp(z); loss_out (float32\n"
        "[S, T] or None) receives the token loss a reduction sums (the options' l; -logp_y without\n"
        "options), 0 on tokens that are not valid. Releases the GIL.");
  m.def("cross_entropy_backward", &ce_backward, py::arg("logits"), py::arg("labels"), py::arg("lse"),
        py::arg("token_scale"), py::arg("grad"), py::arg("ignore_index"), py::arg("scale_factor") = 1.0f,
        py::kw_only(), py::arg("temperature") = 1.0, py::arg("softcap") = 0.0, py::arg("label_smoothing") = 0.0,
        py::arg("z_loss") = 0.0, py::arg("class_weight") = py::none(),
        "grad = (softmax(logits) - onehot(labels)) * token_scale[..., None] * scale_factor, 0 for non-valid\n"
        "tokens; lse is the forward's float64 [S, T]; token_scale is float32 [S, T] or [S] (one scale per sample).\n\n"
        "grad=None writes the gradient into the logits storage. Under the loss options (as stats_forward's;\n"
        "lse is then the forward's logsumexp(z)) grad is d l / d logits * token_scale * scale_factor, the\n"
        "options' token loss l differentiated through z. Releases the GIL.");
  m.def("loss_forward", &loss_forward, py::arg("logits"), py::arg("labels"), py::arg("ignore_index"), py::arg("config"),
        py::arg("weight"), py::arg("reduction"), py::arg("values_out"), py::arg("valid_out"), py::arg("bucket_out"),
        py::arg("lse_out") = py::none(), py::arg("grad_out") = py::none(), py::kw_only(),
        py::arg("temperature") = 1.0, py::arg("softcap") = 0.0, py::arg("label_smoothing") = 0.0,
        py::arg("z_loss") = 0.0, py::arg("class_weight") = py::none(), py::arg("return_totals") = false,
        "The fused loss's CPU forward in one call: label check, statistics (float32 [6, S] block, int32\n"
        "valid_tokens, int8 bucket), the reduction ('sum' or 'mean') of the token losses weighted per\n"
        "sample (float32 [S] or None), and either the loss's gradient (grad_out: the logits' dtype and\n"
        "shape) or the per-token log-sum-exp a later cross_entropy_backward reads (lse_out: float64\n"
        "[S, T]); each may be None.\n\n"
        "Returns (bad, loss, valid_total), with return_totals (bad, loss, valid_total, weight_total,\n"
        "z_loss): bad is the flat s * T + t of the first label neither ignore_index nor in [0, V) (then\n"
        "nothing is written and the rest is 0), else -1. Under the loss options (as stats_forward's) the\n"
        "token losses are the options' l; 'mean' divides by weight_total, the sum of the valid tokens'\n"
        "class weights w_y (float(valid_total) without class_weight; NaN loss when it is 0); z_loss is\n"
        "the part of loss the z-loss adds (reduced and divided the same way). Releases the GIL.");
  m.def("first_bad_label", &first_bad_label, py::arg("labels"), py::arg("vocab"), py::arg("ignore_index"),
        "Flat index s * T + t of the first [S, T] int64 label that is neither ignore_index nor in [0, vocab), "
        "or -1.");
  m.def("bf16_round", [](float v) { return bf16_to_float(float_to_bf16(v)); }, "float -> bfloat16 -> float (tests).");
  m.def("fp16_round", [](float v) { return fp16_to_float(float_to_fp16(v)); }, "float -> float16 -> float (tests).");
}

}  // namespace geko::bindings
