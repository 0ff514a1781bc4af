// Torch-side launcher of the CUDA loss kernels (csrc/cuda/*.cu): checks and allocations, the
// current CUDA stream, and the weight-gradient GEMMs through ATen (cuBLAS; they follow the
// user's TF32 setting, the distance rows never use TF32). No host synchronisation anywhere.
// Compiled only when the extension is built with CUDA (ELOGITNORM_FAST_WITH_CUDA).
#ifdef ELOGITNORM_FAST_WITH_CUDA

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>

#include "cuda/loss_kernels.cuh"

namespace elogitnorm_fast::cuda {
namespace {

constexpr const char* kElogitForward = "elogitnorm_forward (CUDA)";
constexpr const char* kElogitBackward = "elogitnorm_backward (CUDA)";
constexpr const char* kLogitForward = "logitnorm_forward (CUDA)";
constexpr const char* kLogitBackward = "logitnorm_backward (CUDA)";

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(status));
}

ScalarKind kind_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return ScalarKind::Float32;
    case at::kDouble:
      return ScalarKind::Float64;
    case at::kHalf:
      return ScalarKind::Float16;
    case at::kBFloat16:
      return ScalarKind::BFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, op, ": expected a float16 / bfloat16 / float32 / float64 tensor, got ",
              t.scalar_type());
  return ScalarKind::Float32;  // unreachable
}

int reduction_of(c10::string_view name, const char* op) {
  if (name == "mean") return kReduceMean;
  if (name == "sum") return kReduceSum;
  TORCH_CHECK(name == "none", op, ": reduction must be 'mean', 'sum' or 'none', got '",
              std::string(name), "'");
  return kReduceNone;
}

at::ScalarType accumulation_type(const at::Tensor& a, const at::Tensor& b) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble
                                                                           : at::kFloat;
}

// Logits as the kernels read them: contiguous, and double when the accumulation is double.
at::Tensor kernel_logits(const at::Tensor& logits, at::ScalarType acc_type) {
  at::Tensor z = logits.contiguous();
  if (acc_type == at::kDouble && z.scalar_type() != at::kDouble) z = z.to(at::kDouble);
  return z;
}

// grad_output in the accumulation type; keeps a stride-0 (expanded) layout for reduction none.
UpstreamView upstream_view(const at::Tensor& grad_acc, const at::Tensor& valid_count,
                           int reduction, int64_t rows, const char* op) {
  if (reduction == kReduceNone) {
    TORCH_CHECK(grad_acc.dim() == 1 && grad_acc.size(0) == rows, op,
                ": grad_output must have shape (", rows, ",) for reduction='none', got ",
                grad_acc.sizes());
  } else {
    TORCH_CHECK(grad_acc.numel() == 1, op, ": grad_output must be a scalar, got shape ",
                grad_acc.sizes());
  }
  return UpstreamView{grad_acc.const_data_ptr(), reduction == kReduceNone ? grad_acc.stride(0) : 0,
                      reduction, valid_count.const_data_ptr()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
elogitnorm_forward_cuda(const at::Tensor& logits_in, const at::Tensor& weight,
                        const at::Tensor& target_in, c10::string_view reduction_name,
                        int64_t ignore_index, double eps, double divisor, bool need_logits_grad,
                        bool need_weight_grad) {
  TORCH_CHECK(logits_in.dim() == 2 && logits_in.size(1) > 0, kElogitForward,
              ": logits must be 2-D (N, C) with C >= 1, got shape ", logits_in.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == logits_in.size(1), kElogitForward,
              ": weight must be (C, D) with C = ", logits_in.size(1), ", got ", weight.sizes());
  TORCH_CHECK(target_in.dim() == 1 && target_in.size(0) == logits_in.size(0), kElogitForward,
              ": target must have shape (", logits_in.size(0), ",), got ", target_in.sizes());
  TORCH_CHECK(weight.device() == logits_in.device() && target_in.device() == logits_in.device(),
              kElogitForward, ": logits, weight and target must be on one device");
  const int reduction = reduction_of(reduction_name, kElogitForward);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::ScalarType acc_type = accumulation_type(logits_in, weight);
  const bool acc_double = acc_type == at::kDouble;
  const at::Tensor logits = kernel_logits(logits_in, acc_type);
  const ScalarKind kind = kind_of(logits, kElogitForward);
  const at::Tensor target = target_in.to(at::kLong).contiguous();
  const int64_t rows = logits.size(0);
  const int64_t classes = logits.size(1);
  const int64_t dim = weight.size(1);
  const int64_t distance_rows = std::min(rows, classes);
  const auto long_options = logits.options().dtype(at::kLong);
  const auto acc_options = logits.options().dtype(acc_type);

  at::Tensor sample_slot = at::empty({rows}, long_options);
  at::Tensor row_class = at::empty({distance_rows}, long_options);
  check_launch(elogitnorm_predict(logits.const_data_ptr(), kind, target.const_data_ptr<int64_t>(),
                                  rows, classes, ignore_index, sample_slot.data_ptr<int64_t>(),
                                  row_class.data_ptr<int64_t>(), stream),
               kElogitForward);
  const at::Tensor w = weight.to(acc_type).contiguous();
  at::Tensor distances = at::empty({distance_rows, classes}, acc_options);
  check_launch(class_distances(w.const_data_ptr(), acc_double, row_class.const_data_ptr<int64_t>(),
                               distance_rows, classes, dim, distances.data_ptr(), stream),
               kElogitForward);
  at::Tensor row_loss = at::empty({rows}, acc_options);
  at::Tensor scale_grad = at::empty({need_weight_grad ? rows : 0}, acc_options);
  at::Tensor grad_unit =
      at::empty(need_logits_grad ? at::IntArrayRef{rows, classes} : at::IntArrayRef{0},
                acc_options);
  check_launch(
      elogitnorm_rows(logits.const_data_ptr(), kind, target.const_data_ptr<int64_t>(),
                      sample_slot.const_data_ptr<int64_t>(), row_class.const_data_ptr<int64_t>(),
                      distances.const_data_ptr(), rows, classes, eps, divisor,
                      row_loss.data_ptr(), need_weight_grad ? scale_grad.data_ptr() : nullptr,
                      need_logits_grad ? grad_unit.data_ptr() : nullptr, stream),
      kElogitForward);
  at::Tensor loss = reduction == kReduceNone ? at::empty({rows}, logits_in.options())
                                             : at::empty({}, logits_in.options());
  at::Tensor valid_count = at::empty({}, acc_options);
  check_launch(finalize_loss(row_loss.const_data_ptr(), acc_double,
                             sample_slot.const_data_ptr<int64_t>(), -1, rows, reduction,
                             loss.data_ptr(), kind_of(loss, kElogitForward),
                             valid_count.data_ptr(), stream),
               kElogitForward);
  if (!need_weight_grad) {
    row_class = at::empty({0}, long_options);
    distances = at::empty({0, classes}, acc_options);
  }
  return {loss, grad_unit, scale_grad, sample_slot, row_class, distances, valid_count};
}

at::Tensor elogitnorm_weight_gradient(const at::Tensor& logits, const at::Tensor& weight,
                                      const at::Tensor& scale_grad, const at::Tensor& sample_slot,
                                      const at::Tensor& row_class, const at::Tensor& distances,
                                      const UpstreamView& upstream, double eps,
                                      at::ScalarType acc_type, cudaStream_t stream) {
  const int64_t rows = logits.size(0);
  const int64_t classes = logits.size(1);
  const int64_t dim = weight.size(1);
  const int64_t row_count = row_class.size(0);
  TORCH_CHECK(distances.dim() == 2 && distances.size(0) == row_count &&
                  distances.size(1) == classes && distances.is_contiguous() &&
                  scale_grad.numel() == rows,
              kElogitBackward, ": inconsistent saved tensors (distances ", distances.sizes(),
              ", row_class ", row_class.sizes(), ", scale_grad ", scale_grad.sizes(), ")");
  const bool acc_double = acc_type == at::kDouble;
  at::Tensor pooled = at::zeros({row_count, classes}, distances.options());
  check_launch(elogitnorm_pool(logits.const_data_ptr(), kind_of(logits, kElogitBackward),
                               sample_slot.const_data_ptr<int64_t>(),
                               row_class.const_data_ptr<int64_t>(), distances.const_data_ptr(),
                               scale_grad.const_data_ptr(), upstream, rows, classes, eps,
                               pooled.data_ptr(), stream),
               kElogitBackward);
  const at::Tensor w = weight.to(acc_type).contiguous();
  const at::Tensor norms = (w * w).sum(1);
  at::Tensor grad = at::zeros({classes, dim}, w.options());
  check_launch(elogitnorm_close_pairs(w.const_data_ptr(), norms.const_data_ptr(),
                                      row_class.const_data_ptr<int64_t>(),
                                      distances.const_data_ptr(), pooled.data_ptr(), row_count,
                                      classes, dim, acc_double, grad.data_ptr(), stream),
               kElogitBackward);
  // dW = scatter_u(rowsum(P) W_u - P W) + colsum(P) W - P^T W_u.
  const at::Tensor w_rows = w.index_select(0, row_class);
  grad.addmm_(pooled.t(), w_rows, /*beta=*/1, /*alpha=*/-1);
  grad.addcmul_(pooled.sum(0).unsqueeze(1), w);
  // In place on the fresh product: at::addmm would first copy it into its result.
  const at::Tensor row_part = (pooled.sum(1, true) * w_rows).addmm_(pooled, w, 1, -1);
  grad.index_add_(0, row_class, row_part);
  return grad.to(weight.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> elogitnorm_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& logits_in, const at::Tensor& weight,
    const at::Tensor& grad_unit, const at::Tensor& scale_grad, const at::Tensor& sample_slot,
    const at::Tensor& row_class, const at::Tensor& distances, const at::Tensor& valid_count,
    c10::string_view reduction_name, double eps, bool need_logits_grad, bool need_weight_grad) {
  const int reduction = reduction_of(reduction_name, kElogitBackward);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::ScalarType acc_type = accumulation_type(logits_in, weight);
  const int64_t rows = logits_in.size(0);
  const int64_t classes = logits_in.size(1);
  TORCH_CHECK(sample_slot.scalar_type() == at::kLong && sample_slot.is_contiguous() &&
                  sample_slot.numel() == rows,
              kElogitBackward, ": sample_slot must be a contiguous int64 (N,) tensor");
  const at::Tensor grad_acc = grad_output.to(acc_type);
  const UpstreamView upstream = upstream_view(grad_acc, valid_count, reduction, rows,
                                              kElogitBackward);
  at::Tensor grad_logits = at::empty({0}, logits_in.options());
  at::Tensor grad_weight = at::empty({0}, weight.options());
  if (need_logits_grad) {
    TORCH_CHECK(grad_unit.dim() == 2 && grad_unit.size(0) == rows &&
                    grad_unit.size(1) == classes && grad_unit.is_contiguous(),
                kElogitBackward, ": grad_unit must be a contiguous (N, C) tensor, got ",
                grad_unit.sizes());
    grad_logits = at::empty({rows, classes}, logits_in.options());
    check_launch(rescale_rows(grad_unit.const_data_ptr(), acc_type == at::kDouble, upstream,
                              sample_slot.const_data_ptr<int64_t>(), -1, rows, classes,
                              grad_logits.data_ptr(), kind_of(grad_logits, kElogitBackward),
                              stream),
                 kElogitBackward);
  }
  if (need_weight_grad) {
    grad_weight = elogitnorm_weight_gradient(kernel_logits(logits_in, acc_type), weight,
                                             scale_grad, sample_slot, row_class, distances,
                                             upstream, eps, acc_type, stream);
  }
  return {grad_logits, grad_weight};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logitnorm_forward_cuda(
    const at::Tensor& logits_in, const at::Tensor& target_in, double tau,
    c10::string_view reduction_name, int64_t ignore_index, bool need_grad) {
  TORCH_CHECK(logits_in.dim() == 2 && logits_in.size(1) > 0, kLogitForward,
              ": logits must be 2-D (N, C) with C >= 1, got shape ", logits_in.sizes());
  TORCH_CHECK(target_in.dim() == 1 && target_in.size(0) == logits_in.size(0), kLogitForward,
              ": target must have shape (", logits_in.size(0), ",), got ", target_in.sizes());
  TORCH_CHECK(tau > 0, kLogitForward, ": tau must be > 0, got ", tau);
  const int reduction = reduction_of(reduction_name, kLogitForward);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = target_in.to(at::kLong).contiguous();
  const at::ScalarType acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_options = logits.options().dtype(acc_type);
  const int64_t rows = logits.size(0);
  const int64_t classes = logits.size(1);
  at::Tensor row_loss = at::empty({rows}, acc_options);
  at::Tensor grad_unit =
      at::empty(need_grad ? at::IntArrayRef{rows, classes} : at::IntArrayRef{0}, acc_options);
  check_launch(logitnorm_rows(logits.const_data_ptr(), kind_of(logits, kLogitForward),
                              target.const_data_ptr<int64_t>(), rows, classes, ignore_index, tau,
                              row_loss.data_ptr(), need_grad ? grad_unit.data_ptr() : nullptr,
                              stream),
               kLogitForward);
  at::Tensor loss = reduction == kReduceNone ? at::empty({rows}, logits.options())
                                             : at::empty({}, logits.options());
  at::Tensor valid_count = at::empty({}, acc_options);
  check_launch(finalize_loss(row_loss.const_data_ptr(), acc_type == at::kDouble,
                             target.const_data_ptr<int64_t>(), ignore_index, rows, reduction,
                             loss.data_ptr(), kind_of(loss, kLogitForward),
                             valid_count.data_ptr(), stream),
               kLogitForward);
  return {loss, grad_unit, valid_count};
}

at::Tensor logitnorm_backward_cuda(const at::Tensor& grad_output, const at::Tensor& logits,
                                   const at::Tensor& target_in, const at::Tensor& grad_unit,
                                   const at::Tensor& valid_count, c10::string_view reduction_name,
                                   int64_t ignore_index) {
  const int reduction = reduction_of(reduction_name, kLogitBackward);
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t rows = logits.size(0);
  const int64_t classes = logits.size(1);
  TORCH_CHECK(grad_unit.dim() == 2 && grad_unit.size(0) == rows && grad_unit.size(1) == classes &&
                  grad_unit.is_contiguous(),
              kLogitBackward, ": grad_unit must be a contiguous (N, C) tensor, got ",
              grad_unit.sizes());
  const at::Tensor target = target_in.to(at::kLong).contiguous();
  const at::Tensor grad_acc = grad_output.to(grad_unit.scalar_type());
  const UpstreamView upstream = upstream_view(grad_acc, valid_count, reduction, rows,
                                              kLogitBackward);
  at::Tensor out = at::empty({rows, classes}, logits.options());
  check_launch(rescale_rows(grad_unit.const_data_ptr(), grad_unit.scalar_type() == at::kDouble,
                            upstream, target.const_data_ptr<int64_t>(), ignore_index, rows,
                            classes, out.data_ptr(), kind_of(out, kLogitBackward), stream),
               kLogitBackward);
  return out;
}

}  // namespace
}  // namespace elogitnorm_fast::cuda

TORCH_LIBRARY_IMPL(elogitnorm_fast, CUDA, m) {
  m.impl("elogitnorm_forward", &elogitnorm_fast::cuda::elogitnorm_forward_cuda);
  m.impl("elogitnorm_backward", &elogitnorm_fast::cuda::elogitnorm_backward_cuda);
  m.impl("logitnorm_forward", &elogitnorm_fast::cuda::logitnorm_forward_cuda);
  m.impl("logitnorm_backward", &elogitnorm_fast::cuda::logitnorm_backward_cuda);
}

#endif  // ELOGITNORM_FAST_WITH_CUDA
