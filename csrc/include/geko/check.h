// Small helpers for refusing bad input with a message that names the value.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace geko::detail {

// Shortest round-trippable-enough text of a number for error messages.
inline std::string fmt(double x) {
  std::ostringstream out;
  out << x;
  return out.str();
}

// Throws std::invalid_argument (ValueError in Python) when ok is false.
inline void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

}  // namespace geko::detail
