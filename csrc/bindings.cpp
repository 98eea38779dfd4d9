// Torch bindings of the CUDA kernels: argument checks (flash-attention style, before any launch),
// device guard, output allocation, then the plain launchers of csrc/kernels/*.cu.
//
// The ops live in the `probprune_cuda` namespace of the dispatcher (TORCH_LIBRARY schemas with a
// CUDA implementation), so they are reached as torch.ops.probprune_cuda.<op>. The dispatching ops
// of probprune_kernels.ops (namespace `probprune`) call them through probprune_kernels._cuda.
// Full shape and value validation (index ranges, counts <= capacity) happens earlier, once, in
// probprune_kernels/_shapes.py; the checks here keep the kernels memory-safe on their own.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <climits>
#include <cmath>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>

#include "probprune/launchers.h"

#ifndef PROBPRUNE_CUDA_ARCHS
#define PROBPRUNE_CUDA_ARCHS "unknown"
#endif

namespace {

using at::Tensor;
using probprune::DType;

// A tensor argument and its name in the op's schema, for the messages.
struct Arg {
  const Tensor& t;
  const char* name;
};
#define PP_ARG(x) Arg{(x), #x}

void check_cuda(const Arg& a) {
  TORCH_CHECK(a.t.is_cuda(), "probprune_cuda: ", a.name, " must be a CUDA tensor, got ",
              a.t.device());
}

void check_rank(const Arg& a, int64_t rank, const char* layout) {
  TORCH_CHECK(a.t.dim() == rank, "probprune_cuda: ", a.name, " must have rank ", rank, " ",
              layout, ", got shape ", a.t.sizes());
}

void check_same_device(const Arg& a, const Arg& b) {
  TORCH_CHECK(a.t.device() == b.t.device(), "probprune_cuda: ", a.name, " is on ", a.t.device(),
              " but ", b.name, " is on ", b.t.device());
}

void check_same_dtype(const Arg& a, const Arg& b) {
  TORCH_CHECK(a.t.scalar_type() == b.t.scalar_type(), "probprune_cuda: ", a.name, " has dtype ",
              a.t.scalar_type(), " but ", b.name, " has dtype ", b.t.scalar_type());
}

void check_same_shape(const Arg& a, const Arg& b) {
  TORCH_CHECK(a.t.sizes() == b.t.sizes(), "probprune_cuda: ", a.name, " ", a.t.sizes(), " and ",
              b.name, " ", b.t.sizes(), " must have one shape");
}

void check_int32(const Arg& a) {
  TORCH_CHECK(a.t.scalar_type() == at::kInt, "probprune_cuda: ", a.name, " must be int32, got ",
              a.t.scalar_type());
}

int as_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= INT_MAX, "probprune_cuda: ", what, " = ", v,
              " is outside the 32-bit range of the CUDA kernels");
  return static_cast<int>(v);
}

DType float_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::F32;
    case at::kHalf:
      return DType::F16;
    case at::kBFloat16:
      return DType::BF16;
    default:
      TORCH_CHECK(false, "probprune_cuda: ", name, " must be float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
  return DType::F32;  // unreachable
}

// The tensors of one op: `first` a CUDA tensor and every other on its device; `first` and the
// `floats` in one float dtype, which is returned (`others`: indices and counts, checked by the op).
DType check_operands(const Arg& first, std::initializer_list<Arg> floats,
                     std::initializer_list<Arg> others) {
  check_cuda(first);
  for (const Arg& a : floats) {
    check_same_device(first, a);
    check_same_dtype(first, a);
  }
  for (const Arg& a : others) check_same_device(first, a);
  return float_dtype(first.t, first.name);
}

std::string tuple_str(at::IntArrayRef shape) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << (shape.size() == 1 ? ",)" : ")");
  return out.str();
}

// An optional operand (bias, residual): on the device and in the dtype of `like`, of `shape`.
void check_optional(const std::optional<Tensor>& t, const char* name, const Arg& like,
                    at::IntArrayRef shape) {
  if (!t.has_value()) return;
  const Arg a{*t, name};
  check_same_device(like, a);
  check_same_dtype(like, a);
  TORCH_CHECK(t->sizes() == shape, "probprune_cuda: ", name, " must have shape ", tuple_str(shape),
              ", got ", t->sizes());
}

// The operands of a gather GEMM: activations a [K, M, *] and one or two weights [*, *] in one
// float dtype (returned), idx and counts on their device.
DType check_gemm_operands(const Arg& a, const char* a_layout, std::initializer_list<Arg> weights,
                          const char* w_layout, const Tensor& idx, const Tensor& counts) {
  const DType dt = check_operands(a, weights, {PP_ARG(idx), PP_ARG(counts)});
  check_rank(a, 3, a_layout);
  for (const Arg& w : weights) check_rank(w, 2, w_layout);
  return dt;
}

// Dimension `dim` of w holds whole units of `group` rows or columns.
void check_group(const Tensor& w, int dim, int64_t group) {
  TORCH_CHECK(group >= 1 && w.size(dim) % group == 0, "probprune_cuda: w.shape[", dim, "] (",
              w.size(dim), ") must be a positive multiple of group (", group, ")");
}

void check_in_features(const Tensor& x, const Arg& w) {
  TORCH_CHECK(w.t.size(1) == x.size(2), "probprune_cuda: x has in_features ", x.size(2), " but ",
              w.name, " has shape ", w.t.sizes());
}

// Tensor cores (fp16 / bf16 WMMA) need sm_80+; the build targets sm_80 and sm_90 anyway.
void check_arch(const Tensor& t) {
  int major = 0, minor = 0;
  const int dev = t.get_device();
  TORCH_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess,
              "probprune_cuda: cannot query the compute capability of device ", dev);
  TORCH_CHECK(major >= 8, "probprune_cuda: the CUDA kernels need compute capability 8.0 or "
              "newer (Ampere), this GPU is ", major, ".", minor,
              "; use backend='triton' or 'reference'");
}

// The kernels reach rows of M up to gridDim.y * BM and masks (x batch) up to gridDim.z.
void check_grid(int64_t K, int64_t M) {
  TORCH_CHECK(K <= 65535, "probprune_cuda: at most 65535 masks (K) per launch, got ", K);
  TORCH_CHECK(M <= 65535LL * 64, "probprune_cuda: at most ", 65535LL * 64,
              " rows (M) per launch, got ", M);
}

Tensor contig(const Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

std::optional<Tensor> contig(const std::optional<Tensor>& t) {
  if (!t.has_value()) return t;
  return contig(*t);
}

cudaStream_t stream_of(const Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.get_device()).stream();
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "probprune_cuda::", op, " launch failed: ",
              cudaGetErrorString(err));
}

// probs and uniforms for the sampling kernels: compared in the uniforms' dtype as the reference
// does; fp16 / bf16 values are compared exactly in fp32, float64 stays float64.
std::tuple<Tensor, Tensor, DType> sampling_inputs(const Tensor& probs, const Tensor& uniforms) {
  check_cuda(PP_ARG(probs));
  check_cuda(PP_ARG(uniforms));
  check_same_device(PP_ARG(probs), PP_ARG(uniforms));
  check_rank(PP_ARG(uniforms), 2, "[K, n]");
  TORCH_CHECK(probs.dim() == 1 && probs.size(0) == uniforms.size(1),
              "probprune_cuda: probs must have shape (", uniforms.size(1), ",), got ",
              probs.sizes());
  TORCH_CHECK(at::isFloatingType(uniforms.scalar_type()),
              "probprune_cuda: uniforms must be a floating tensor, got ", uniforms.scalar_type());
  Tensor p = probs.to(uniforms.scalar_type());
  if (uniforms.scalar_type() == at::kDouble) {
    return {contig(p), contig(uniforms), DType::F64};
  }
  return {contig(p.to(at::kFloat)), contig(uniforms.to(at::kFloat)), DType::F32};
}

Tensor sample_masks(const Tensor& probs, const Tensor& uniforms) {
  c10::cuda::CUDAGuard guard(uniforms.device());
  auto [p, u, dt] = sampling_inputs(probs, uniforms);
  const int K = as_int(uniforms.size(0), "K"), n = as_int(uniforms.size(1), "n");
  Tensor masks = at::empty(uniforms.sizes(), uniforms.options().dtype(at::kBool));
  check_launch(probprune::launch_sample_masks(dt, p.data_ptr(), u.data_ptr(),
                                              masks.data_ptr<bool>(), K, n, stream_of(masks)),
               "sample_masks");
  return masks;
}

int capacity_of(std::optional<int64_t> capacity, int64_t n) {
  const int64_t cap = capacity.value_or(n);
  TORCH_CHECK(cap >= 0 && cap <= n, "probprune_cuda: capacity must lie in [0, ", n, "], got ", cap);
  return static_cast<int>(cap);
}

std::tuple<Tensor, Tensor> compact_masks(const Tensor& masks, std::optional<int64_t> capacity) {
  check_cuda(PP_ARG(masks));
  check_rank(PP_ARG(masks), 2, "[K, n]");
  TORCH_CHECK(masks.scalar_type() == at::kBool, "probprune_cuda: masks must be bool, got ",
              masks.scalar_type());
  c10::cuda::CUDAGuard guard(masks.device());
  const int K = as_int(masks.size(0), "K"), n = as_int(masks.size(1), "n");
  const int cap = capacity_of(capacity, n);
  Tensor m = contig(masks);
  Tensor idx = at::empty({K, cap}, masks.options().dtype(at::kInt));
  Tensor counts = at::empty({K}, masks.options().dtype(at::kInt));
  check_launch(probprune::launch_compact_masks(m.data_ptr<bool>(), K, n, cap, idx.data_ptr<int>(),
                                               counts.data_ptr<int>(), stream_of(m)),
               "compact_masks");
  return {idx, counts};
}

std::tuple<Tensor, Tensor, Tensor> sample_and_compact(const Tensor& probs, const Tensor& uniforms,
                                                  std::optional<int64_t> capacity) {
  c10::cuda::CUDAGuard guard(uniforms.device());
  auto [p, u, dt] = sampling_inputs(probs, uniforms);
  const int K = as_int(uniforms.size(0), "K"), n = as_int(uniforms.size(1), "n");
  const int cap = capacity_of(capacity, n);
  Tensor masks = at::empty(uniforms.sizes(), uniforms.options().dtype(at::kBool));
  Tensor idx = at::empty({K, cap}, uniforms.options().dtype(at::kInt));
  Tensor counts = at::empty({K}, uniforms.options().dtype(at::kInt));
  check_launch(probprune::launch_sample_compact(dt, p.data_ptr(), u.data_ptr(),
                                                masks.data_ptr<bool>(), K, n, cap,
                                                idx.data_ptr<int>(), counts.data_ptr<int>(),
                                                stream_of(masks)),
               "sample_and_compact");
  return {masks, idx, counts};
}

// Shared checks of idx [K, cap] / counts [K] against K and the number of units.
int check_compacted(const Tensor& idx, const Tensor& counts, int64_t K, int64_t n_units) {
  check_rank(PP_ARG(idx), 2, "[K, n_cap]");
  check_rank(PP_ARG(counts), 1, "[K]");
  check_int32(PP_ARG(idx));
  check_int32(PP_ARG(counts));
  TORCH_CHECK(idx.size(0) == K && counts.size(0) == K, "probprune_cuda: idx ", idx.sizes(),
              " and counts ", counts.sizes(), " must have K=", K, " rows");
  TORCH_CHECK(idx.size(1) <= n_units, "probprune_cuda: idx capacity ", idx.size(1),
              " exceeds the number of units ", n_units);
  return as_int(idx.size(1), "capacity");
}

Tensor gather_rows_gemm(const Tensor& x, const Tensor& w, const Tensor& idx, const Tensor& counts,
                        int64_t group, const std::optional<Tensor>& bias) {
  const DType dt = check_gemm_operands(PP_ARG(x), "[K, M, in_features]", {PP_ARG(w)},
                                       "[out_features, in_features]", idx, counts);
  check_group(w, 0, group);
  check_in_features(x, PP_ARG(w));
  check_optional(bias, "bias", PP_ARG(x), {w.size(0)});
  const int64_t K = x.size(0), M = x.size(1);
  const int cap = check_compacted(idx, counts, K, w.size(0) / group);
  check_grid(K, M);
  c10::cuda::CUDAGuard guard(x.device());
  check_arch(x);
  const Tensor xc = contig(x), wc = contig(w), ic = contig(idx), cc = contig(counts);
  const auto bc = contig(bias);
  Tensor y = at::empty({K, M, static_cast<int64_t>(cap) * group}, x.options());
  check_launch(probprune::launch_gather_rows_gemm(
                   dt, xc.data_ptr(), wc.data_ptr(), ic.data_ptr<int>(), cc.data_ptr<int>(),
                   bc.has_value() ? bc->data_ptr() : nullptr, y.data_ptr(), as_int(K, "K"),
                   as_int(M, "M"), as_int(x.size(2), "in_features"), cap, as_int(group, "group"),
                   stream_of(x)),
               "gather_rows_gemm");
  return y;
}

Tensor gather_rows_swiglu(const Tensor& x, const Tensor& w_gate, const Tensor& w_up,
                          const Tensor& idx, const Tensor& counts) {
  const DType dt = check_gemm_operands(PP_ARG(x), "[K, M, in_features]",
                                       {PP_ARG(w_gate), PP_ARG(w_up)}, "[F, in_features]", idx,
                                       counts);
  check_same_shape(PP_ARG(w_gate), PP_ARG(w_up));
  check_in_features(x, PP_ARG(w_gate));
  const int64_t K = x.size(0), M = x.size(1);
  const int cap = check_compacted(idx, counts, K, w_gate.size(0));
  check_grid(K, M);
  c10::cuda::CUDAGuard guard(x.device());
  check_arch(x);
  const Tensor xc = contig(x), gc = contig(w_gate), uc = contig(w_up), ic = contig(idx),
               cc = contig(counts);
  Tensor y = at::empty({K, M, cap}, x.options());
  check_launch(probprune::launch_gather_rows_swiglu(
                   dt, xc.data_ptr(), gc.data_ptr(), uc.data_ptr(), ic.data_ptr<int>(),
                   cc.data_ptr<int>(), y.data_ptr(), as_int(K, "K"), as_int(M, "M"),
                   as_int(x.size(2), "in_features"), cap, stream_of(x)),
               "gather_rows_swiglu");
  return y;
}

Tensor gather_cols_gemm(const Tensor& h, const Tensor& w, const Tensor& idx, const Tensor& counts,
                        int64_t group, const std::optional<Tensor>& residual) {
  const DType dt = check_gemm_operands(PP_ARG(h), "[K, M, n_cap * group]", {PP_ARG(w)},
                                       "[out_features, in_features]", idx, counts);
  check_group(w, 1, group);
  const int64_t K = h.size(0), M = h.size(1), dout = w.size(0);
  const int cap = check_compacted(idx, counts, K, w.size(1) / group);
  TORCH_CHECK(h.size(2) == static_cast<int64_t>(cap) * group, "probprune_cuda: h has ", h.size(2),
              " columns but idx capacity ", cap, " x group ", group, " = ",
              static_cast<int64_t>(cap) * group);
  check_optional(residual, "residual", PP_ARG(h), {K, M, dout});
  check_grid(K, M);
  c10::cuda::CUDAGuard guard(h.device());
  check_arch(h);
  // A column-major w (the view wt.t() of a contiguous wt) is read as it is: its gathered
  // columns are contiguous, the layout group 1 needs for vector loads.
  const bool w_t = !w.is_contiguous() && w.t().is_contiguous();
  const Tensor hc = contig(h), wc = w_t ? w : contig(w), ic = contig(idx), cc = contig(counts);
  const auto rc = contig(residual);
  Tensor y = at::empty({K, M, dout}, h.options());
  check_launch(probprune::launch_gather_cols_gemm(
                   dt, hc.data_ptr(), wc.data_ptr(), w_t, ic.data_ptr<int>(), cc.data_ptr<int>(),
                   rc.has_value() ? rc->data_ptr() : nullptr, y.data_ptr(), as_int(K, "K"),
                   as_int(M, "M"), as_int(dout, "out_features"), as_int(w.size(1), "in_features"),
                   cap, as_int(group, "group"), stream_of(h)),
               "gather_cols_gemm");
  return y;
}

// The general (query-head) form; probprune_kernels/_cuda.py converts the KV-group form to it.
Tensor masked_attention_heads(const Tensor& q, const Tensor& k, const Tensor& v,
                              const Tensor& q_counts, const Tensor& kv_slot,
                              std::optional<double> scale) {
  const DType dt =
      check_operands(PP_ARG(q), {PP_ARG(k), PP_ARG(v)}, {PP_ARG(q_counts), PP_ARG(kv_slot)});
  check_rank(PP_ARG(q), 5, "[K, B, T, Hq_cap, head_dim]");
  check_rank(PP_ARG(k), 5, "[K, B, T, Hkv_cap, head_dim]");
  check_int32(PP_ARG(q_counts));
  check_int32(PP_ARG(kv_slot));
  check_same_shape(PP_ARG(k), PP_ARG(v));
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(2) == q.size(2) &&
                  k.size(4) == q.size(4),
              "probprune_cuda: k/v ", k.sizes(), " do not match q ", q.sizes(),
              " in K, B, T or head_dim");
  const int64_t K = q.size(0), B = q.size(1), T = q.size(2), hq = q.size(3), hkv = k.size(3),
                D = q.size(4);
  TORCH_CHECK(q_counts.dim() == 1 && q_counts.size(0) == K,
              "probprune_cuda: q_counts must be [K=", K, "], got ", q_counts.sizes());
  TORCH_CHECK(kv_slot.dim() == 2 && kv_slot.size(0) == K && kv_slot.size(1) == hq,
              "probprune_cuda: kv_slot must be [K=", K, ", Hq_cap=", hq, "], got ",
              kv_slot.sizes());
  TORCH_CHECK(D <= probprune::kMaxHeadDim, "probprune_cuda: masked_attention supports head_dim <= ",
              probprune::kMaxHeadDim, " (tensor cores up to 128), got ", D);
  TORCH_CHECK(K * B <= 65535 && hq <= 65535, "probprune_cuda: K * B (", K * B,
              ") and query heads (", hq, ") must be at most 65535");
  c10::cuda::CUDAGuard guard(q.device());
  check_arch(q);
  const Tensor qc = contig(q), kc = contig(k), vc = contig(v), cc = contig(q_counts),
               sc = contig(kv_slot);
  Tensor o = at::empty(q.sizes(), q.options());
  const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D > 0 ? D : 1));
  check_launch(probprune::launch_masked_attention(
                   dt, qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), cc.data_ptr<int>(),
                   sc.data_ptr<int>(), o.data_ptr(), as_int(K, "K"), as_int(B, "B"),
                   as_int(T, "T"), as_int(hq, "q heads"), as_int(hkv, "k/v heads"),
                   as_int(D, "head_dim"), static_cast<float>(s), stream_of(q)),
               "masked_attention_heads");
  return o;
}

// chunk_size is the reference's working-set bound; the kernels' tiles bound theirs.
Tensor lm_head_ce(const Tensor& h, const Tensor& w, const Tensor& labels, int64_t ignore_index,
                  int64_t chunk_size) {
  (void)chunk_size;
  const DType dt = check_operands(PP_ARG(h), {PP_ARG(w)}, {PP_ARG(labels)});
  check_rank(PP_ARG(h), 3, "[K, M, hidden]");
  check_rank(PP_ARG(w), 2, "[vocab, hidden]");
  TORCH_CHECK(w.size(1) == h.size(2), "probprune_cuda: h has hidden size ", h.size(2),
              " but w has shape ", w.sizes());
  TORCH_CHECK(w.size(0) >= 1, "probprune_cuda: w has an empty vocabulary");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "probprune_cuda: labels must be int64, got ",
              labels.scalar_type());
  const int64_t K = h.size(0), M = h.size(1);
  const bool per_mask = labels.dim() == 2;
  TORCH_CHECK((labels.dim() == 1 && labels.size(0) == M) ||
                  (per_mask && labels.size(0) == K && labels.size(1) == M),
              "probprune_cuda: labels must have shape (", M, ",) or (", K, ", ", M, "), got ",
              labels.sizes());
  TORCH_CHECK(K <= 65535, "probprune_cuda: at most 65535 masks (K) per launch, got ", K);
  c10::cuda::CUDAGuard guard(h.device());
  check_arch(h);
  int sm_count = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount,
                                     h.get_device()) == cudaSuccess,
              "probprune_cuda: cannot query the SM count of device ", h.get_device());
  const int k = as_int(K, "K"), m = as_int(M, "M"), v = as_int(w.size(0), "vocab");
  const int splits = probprune::lm_head_ce_splits(k, m, v, sm_count);
  TORCH_CHECK(splits <= 65535, "probprune_cuda: ", splits, " vocabulary slices exceed the grid");
  const Tensor hc = contig(h), wc = contig(w), lc = contig(labels);
  Tensor workspace = at::empty({3, K, splits, M}, h.options().dtype(at::kFloat));
  Tensor loss = at::empty({K}, h.options().dtype(at::kFloat));
  check_launch(probprune::launch_lm_head_ce(
                   dt, hc.data_ptr(), wc.data_ptr(), lc.data_ptr<int64_t>(), per_mask ? M : 0,
                   ignore_index, workspace.data_ptr<float>(), loss.data_ptr<float>(), k, m,
                   as_int(h.size(2), "hidden"), v, splits, stream_of(h)),
               "lm_head_ce");
  return loss;
}

}  // namespace

TORCH_LIBRARY(probprune_cuda, m) {
  m.def("sample_masks(Tensor probs, Tensor uniforms) -> Tensor");
  m.def("compact_masks(Tensor masks, int? capacity=None) -> (Tensor, Tensor)");
  m.def("sample_and_compact(Tensor probs, Tensor uniforms, int? capacity=None) -> (Tensor, Tensor, Tensor)");
  m.def("gather_rows_gemm(Tensor x, Tensor w, Tensor idx, Tensor counts, int group, "
        "Tensor? bias=None) -> Tensor");
  m.def("gather_rows_swiglu(Tensor x, Tensor w_gate, Tensor w_up, Tensor idx, Tensor counts) "
        "-> Tensor");
  m.def("gather_cols_gemm(Tensor h, Tensor w, Tensor idx, Tensor counts, int group, "
        "Tensor? residual=None) -> Tensor");
  m.def("masked_attention_heads(Tensor q, Tensor k, Tensor v, Tensor q_counts, Tensor kv_slot, "
        "float? scale=None) -> Tensor");
  m.def("lm_head_ce(Tensor h, Tensor w, Tensor labels, int ignore_index=-100, "
        "int chunk_size=4096) -> Tensor");
}

TORCH_LIBRARY_IMPL(probprune_cuda, CUDA, m) {
  m.impl("sample_masks", &sample_masks);
  m.impl("compact_masks", &compact_masks);
  m.impl("sample_and_compact", &sample_and_compact);
  m.impl("gather_rows_gemm", &gather_rows_gemm);
  m.impl("gather_rows_swiglu", &gather_rows_swiglu);
  m.impl("gather_cols_gemm", &gather_cols_gemm);
  m.impl("masked_attention_heads", &masked_attention_heads);
  m.impl("lm_head_ce", &lm_head_ce);
}

// A Python module too, so that `import probprune_kernels._C` loads the library (and registers the
// ops above) and tells what it holds.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "probprune CUDA kernels; ops registered as torch.ops.probprune_cuda.<op>";
  m.attr("NAMESPACE") = "probprune_cuda";
  m.attr("OPS") = pybind11::make_tuple("sample_masks", "compact_masks", "sample_and_compact",
                                       "gather_rows_gemm", "gather_rows_swiglu",
                                       "gather_cols_gemm", "masked_attention_heads",
                                       "lm_head_ce");
  m.attr("CUDA_ARCHS") = PROBPRUNE_CUDA_ARCHS;
  m.attr("CUDART_VERSION") = CUDART_VERSION;
  m.attr("MAX_HEAD_DIM") = probprune::kMaxHeadDim;
}
