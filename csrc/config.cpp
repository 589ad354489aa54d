#include "geko/config.h"

#include <cmath>
#include <stdexcept>
#include <string>

namespace geko {

namespace {

// The message is built only when the check fails: validate() runs on every statistics
// call, and formatting a dozen numbers each time cost microseconds.
template <typename Message>
void require(bool ok, Message&& message) {
  if (!ok) throw std::invalid_argument("GekoConfig: " + std::string(message()));
}

bool in_unit(double x) { return std::isfinite(x) && x >= 0.0 && x <= 1.0; }

}  // namespace

void Config::validate() const {
  require(in_unit(freeze_confidence),
          [&] { return "freeze_confidence must be in [0, 1], got " + std::to_string(freeze_confidence); });
  require(in_unit(hard_confidence),
          [&] { return "hard_confidence must be in [0, 1], got " + std::to_string(hard_confidence); });
  require(hard_confidence < freeze_confidence, [&] {
    return "hard_confidence (" + std::to_string(hard_confidence) + ") must be below freeze_confidence (" +
           std::to_string(freeze_confidence) + ")";
  });
  require(in_unit(freeze_q), [&] { return "freeze_q must be in [0, 1], got " + std::to_string(freeze_q); });
  require(std::isfinite(correct_threshold) && correct_threshold > 0.0 && correct_threshold <= 1.0,
          [&] { return "correct_threshold must be in (0, 1], got " + std::to_string(correct_threshold); });
  require(std::isfinite(q_alpha) && q_alpha > 0.0 && q_alpha <= 1.0,
          [&] { return "q_alpha must be in (0, 1], got " + std::to_string(q_alpha); });
  require(in_unit(q_init), [&] { return "q_init must be in [0, 1], got " + std::to_string(q_init); });
  require(std::isfinite(loss_scale) && loss_scale > 0.0,
          [&] { return "loss_scale must be positive and finite, got " + std::to_string(loss_scale); });
  require(std::isfinite(loss_ema_beta) && loss_ema_beta >= 0.0 && loss_ema_beta < 1.0,
          [&] { return "loss_ema_beta must be in [0, 1), got " + std::to_string(loss_ema_beta); });
  require(std::isfinite(loss_diff_ema_beta) && loss_diff_ema_beta >= 0.0 && loss_diff_ema_beta < 1.0,
          [&] { return "loss_diff_ema_beta must be in [0, 1), got " + std::to_string(loss_diff_ema_beta); });
  require(std::isfinite(correct_margin) && correct_margin >= 0.0 && correct_margin <= 1.0,
          [&] { return "correct_margin must be in [0, 1] (0: no margin), got " + std::to_string(correct_margin); });
  require(noise_guard_visits >= 0 && noise_guard_visits <= 255,
          [&] { return "noise_guard_visits must be in [0, 255], got " + std::to_string(noise_guard_visits); });
}

}  // namespace geko
