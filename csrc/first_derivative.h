// The extension's closed-form backwards (csrc/ops.cpp, csrc/unit_gradients.cpp) give first
// derivatives only. One run with create_graph=True (grad mode on) would return gradients that
// carry no second derivative, and a gradient penalty built on them would come out silently
// wrong; they refuse instead, with the message of the Python backwards
// (elogitnorm_fast/validation.py, check_first_derivative).
#pragma once

#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

namespace elogitnorm_fast {

inline void check_first_derivative(c10::string_view backend, c10::string_view loss) {
  TORCH_CHECK(!at::GradMode::is_enabled(), "backend='", backend,
              "' computes first derivatives of ", loss,
              " only, so backward with create_graph=True cannot go through it; use "
              "backend='reference' for higher derivatives");
}

}  // namespace elogitnorm_fast
