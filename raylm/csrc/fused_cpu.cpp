// Fused fp32 CPU kernels for raylm's eager training step (raylm/cpu_kernels.py builds and loads them).
//
// On a CPU, the elementwise parts of a Llama block (SwiGLU, RMSNorm, the rotary embedding) cost what
// their passes over memory cost. Separate PyTorch ops each read and write whole activations; these
// kernels do each part, forward or backward, in one pass per row, with PyTorch's own vector type (and
// its exp), spread over PyTorch's intra-op threads. Same formulas as PyTorch's kernels (silu, its
// backward, rms_norm), so the results agree to rounding.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kGrainElements = 32768;  // elements per parallel task at least: a task must outweigh its start

int64_t grain_rows(int64_t row_elements) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, row_elements)); }

void check_fp32_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "raylm fused CPU kernels: ", name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat, "raylm fused CPU kernels: ", name, " must be float32, got ", t.scalar_type());
}

void check_float_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "raylm fused CPU kernels: ", name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              "raylm fused CPU kernels: ", name, " must be float32 or bfloat16, got ", t.scalar_type());
}

// Storage in float32 or bfloat16, arithmetic in float32 (as PyTorch's own bf16 kernels do): one vector of
// Vec::size() values loaded as floats, stored back rounded to nearest even.
template <typename T> inline Vec load_f(const T* p);
template <> inline Vec load_f<float>(const float* p) { return Vec::loadu(p); }
template <> inline Vec load_f<at::BFloat16>(const at::BFloat16* p) {
  Vec out;
  at::vec::load_to_float<at::BFloat16>(p, out);
  return out;
}
template <typename T> inline void store_f(T* p, const Vec& v);
template <> inline void store_f<float>(float* p, const Vec& v) { v.store(p); }
template <> inline void store_f<at::BFloat16>(at::BFloat16* p, const Vec& v) {
  at::vec::convert_from_float<at::BFloat16>(v, v).store(p, Vec::size());
}

// body(T{}) with T the storage type of t: float or at::BFloat16.
template <typename Body> auto by_dtype(const at::Tensor& t, Body body) {
  if (t.scalar_type() == at::kBFloat16) return body(at::BFloat16{});
  return body(float{});
}

// ---------------------------------------------------------------------------------------- SwiGLU
// h = [gate | up] (rows, 2 I) -> silu(gate) * up (rows, I), in h's dtype
at::Tensor swiglu_forward(const at::Tensor& h_in) {
  check_float_cpu(h_in, "h");
  at::Tensor h = h_in.contiguous();
  const int64_t width = h.size(-1);
  TORCH_CHECK(width % 2 == 0, "swiglu: the last dimension (gate | up) must be even");
  const int64_t I = width / 2, rows = h.numel() / std::max<int64_t>(1, width);
  std::vector<int64_t> shape = h.sizes().vec();
  shape.back() = I;
  at::Tensor out = at::empty(shape, h.options());
  by_dtype(h, [&](auto zero) {
    using T = decltype(zero);
    const T* hp = h.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    at::parallel_for(0, rows, grain_rows(width), [&](int64_t begin, int64_t end) {
      const Vec one(1.f);
      for (int64_t r = begin; r < end; ++r) {
        const T* g = hp + r * width;
        const T* u = g + I;
        T* o = op + r * I;
        int64_t j = 0;
        for (; j + Vec::size() <= I; j += Vec::size()) {
          Vec x = load_f(g + j);
          Vec silu = x / (one + x.neg().exp());
          store_f(o + j, silu * load_f(u + j));
        }
        for (; j < I; ++j) {
          const float x = static_cast<float>(g[j]);
          o[j] = static_cast<T>(x / (1.f + std::exp(-x)) * static_cast<float>(u[j]));
        }
      }
    });
    return 0;
  });
  return out;
}

// grad (rows, I), h = [gate | up] -> d/dh = [grad * up * silu'(gate) | grad * silu(gate)] (rows, 2 I)
at::Tensor swiglu_backward(const at::Tensor& grad_in, const at::Tensor& h_in) {
  check_float_cpu(grad_in, "grad");
  check_float_cpu(h_in, "h");
  TORCH_CHECK(grad_in.scalar_type() == h_in.scalar_type(), "swiglu_backward: grad and h must have one dtype");
  at::Tensor grad = grad_in.contiguous(), h = h_in.contiguous();
  const int64_t width = h.size(-1), I = width / 2, rows = h.numel() / std::max<int64_t>(1, width);
  TORCH_CHECK(width % 2 == 0, "swiglu_backward: the last dimension of h (gate | up) must be even");
  TORCH_CHECK(grad.numel() == rows * I, "swiglu_backward: grad has ", grad.numel(), " elements, expected ", rows * I);
  at::Tensor out = at::empty_like(h);
  by_dtype(h, [&](auto zero) {
    using T = decltype(zero);
    const T* hp = h.const_data_ptr<T>();
    const T* gp = grad.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    at::parallel_for(0, rows, grain_rows(width), [&](int64_t begin, int64_t end) {
      const Vec one(1.f);
      for (int64_t r = begin; r < end; ++r) {
        const T* gate = hp + r * width;
        const T* up = gate + I;
        const T* dy = gp + r * I;
        T* d_gate = op + r * width;
        T* d_up = d_gate + I;
        int64_t j = 0;
        for (; j + Vec::size() <= I; j += Vec::size()) {
          Vec x = load_f(gate + j), u = load_f(up + j), g = load_f(dy + j);
          Vec sig = one / (one + x.neg().exp());
          store_f(d_up + j, g * (x * sig));
          store_f(d_gate + j, (g * u) * sig * (one + x * (one - sig)));
        }
        for (; j < I; ++j) {
          const float x = static_cast<float>(gate[j]), sig = 1.f / (1.f + std::exp(-x));
          const float g = static_cast<float>(dy[j]);
          d_up[j] = static_cast<T>(g * (x * sig));
          d_gate[j] = static_cast<T>((g * static_cast<float>(up[j])) * sig * (1.f + x * (1.f - sig)));
        }
      }
    });
    return 0;
  });
  return out;
}

// --------------------------------------------------------------------------------------- RMSNorm
float horizontal_sum(const Vec& v) {
  float lanes[Vec::size()];
  v.store(lanes);
  float total = 0.f;
  for (int i = 0; i < Vec::size(); ++i) total += lanes[i];
  return total;
}

float sum_of_squares(const float* x, int64_t n) {
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec v = Vec::loadu(x + j);
    acc = at::vec::fmadd(v, v, acc);
  }
  float total = horizontal_sum(acc);
  for (; j < n; ++j) total += x[j] * x[j];
  return total;
}

// x (rows, H), weight (H) -> (weight * (x * rstd), rstd (rows)) with rstd = 1 / sqrt(mean(x^2) + eps)
std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  check_fp32_cpu(x_in, "x");
  check_fp32_cpu(weight_in, "weight");
  at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const int64_t H = x.size(-1), rows = x.numel() / std::max<int64_t>(1, H);
  TORCH_CHECK(weight.numel() == H, "rms_norm: weight has ", weight.numel(), " elements for rows of ", H);
  at::Tensor out = at::empty_like(x);
  std::vector<int64_t> rshape = x.sizes().vec();
  rshape.back() = 1;
  at::Tensor rstd = at::empty(rshape, x.options());
  const float* xp = x.const_data_ptr<float>();
  const float* wp = weight.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  float* rp = rstd.mutable_data_ptr<float>();
  at::parallel_for(0, rows, grain_rows(H), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * H;
      float* o = op + r * H;
      const float rs = 1.f / std::sqrt(sum_of_squares(xr, H) / static_cast<float>(H) + static_cast<float>(eps));
      rp[r] = rs;
      const Vec vr(rs);
      int64_t j = 0;
      for (; j + Vec::size() <= H; j += Vec::size()) (Vec::loadu(wp + j) * (Vec::loadu(xr + j) * vr)).store(o + j);
      for (; j < H; ++j) o[j] = wp[j] * (xr[j] * rs);
    }
  });
  return {out, rstd};
}

// grad, x (rows, H), weight (H), rstd (rows) -> (d/dx, d/dweight):
// d/dx = rstd * (grad * weight - normed * mean(grad * weight * normed)), normed = x * rstd;
// d/dweight = sum over rows of grad * normed (each block of rows sums its own, then the blocks' sums are added)
std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                     const at::Tensor& weight_in, const at::Tensor& rstd_in,
                                                     bool weight_grad) {
  for (auto& [t, name] : {std::pair{&grad_in, "grad"}, {&x_in, "x"}, {&weight_in, "weight"}, {&rstd_in, "rstd"}})
    check_fp32_cpu(*t, name);
  at::Tensor grad = grad_in.contiguous(), x = x_in.contiguous(), weight = weight_in.contiguous(),
             rstd = rstd_in.contiguous();
  const int64_t H = x.size(-1), rows = x.numel() / std::max<int64_t>(1, H);
  TORCH_CHECK(grad.numel() == x.numel() && rstd.numel() == rows, "rms_norm_backward: shapes do not match");
  at::Tensor grad_x = at::empty_like(x);
  // The weight's gradient is a sum over rows: the rows are cut into a fixed number of blocks, each summing
  // its own rows into its own row of `partial` (no thread ids: the OpenMP team may differ from torch's count)
  const int64_t grain = grain_rows(H);
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (rows + grain - 1) / grain));
  const int64_t per_block = (rows + blocks - 1) / blocks;
  at::Tensor partial = weight_grad ? at::zeros({blocks, H}, x.options()) : at::Tensor();
  const float* gp = grad.const_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  const float* wp = weight.const_data_ptr<float>();
  const float* rp = rstd.const_data_ptr<float>();
  float* dxp = grad_x.mutable_data_ptr<float>();
  float* pp = weight_grad ? partial.mutable_data_ptr<float>() : nullptr;
  const float inv_h = 1.f / static_cast<float>(H);
  at::parallel_for(0, blocks, 1, [&](int64_t first_block, int64_t end_block) {
    for (int64_t block = first_block; block < end_block; ++block) {
      float* acc = weight_grad ? pp + block * H : nullptr;
      const int64_t begin = block * per_block, end = std::min(rows, begin + per_block);
      for (int64_t r = begin; r < end; ++r) {
        const float* g = gp + r * H;
        const float* xr = xp + r * H;
        float* dx = dxp + r * H;
        const float rs = rp[r];
        const Vec vr(rs);
        // pass 1 (one row, in cache): the dot product, and the weight's gradient
        Vec dot_acc(0.f);
        int64_t j = 0;
        for (; j + Vec::size() <= H; j += Vec::size()) {
          Vec gv = Vec::loadu(g + j), normed = Vec::loadu(xr + j) * vr;
          dot_acc = at::vec::fmadd(gv * Vec::loadu(wp + j), normed, dot_acc);
          if (acc) at::vec::fmadd(gv, normed, Vec::loadu(acc + j)).store(acc + j);
        }
        float dot = horizontal_sum(dot_acc);
        for (int64_t k = j; k < H; ++k) {
          const float normed = xr[k] * rs;
          dot += g[k] * wp[k] * normed;
          if (acc) acc[k] += g[k] * normed;
        }
        const float mean = dot * inv_h;
        const Vec vmean(mean);
        j = 0;
        for (; j + Vec::size() <= H; j += Vec::size()) {
          Vec normed = Vec::loadu(xr + j) * vr;
          ((Vec::loadu(g + j) * Vec::loadu(wp + j) - normed * vmean) * vr).store(dx + j);
        }
        for (; j < H; ++j) dx[j] = (g[j] * wp[j] - xr[j] * rs * mean) * rs;
      }
    }
  });
  at::Tensor grad_weight = weight_grad ? partial.sum(0) : at::Tensor();
  return {grad_x, grad_weight};
}

// ------------------------------------------------------------------------------- rotary embedding
// Rotate `heads` heads of head_dim D at src (row stride of heads: src_head_stride) into dst, by cos/sin
// (D / 2 each, float32) of this position: (x1, x2) -> (x1 cos - sign x2 sin, x2 cos + sign x1 sin).
template <typename T>
inline void rotate_heads(const T* src, int64_t src_head_stride, T* dst, int64_t dst_head_stride,
                         int64_t heads, int64_t D, const float* cos, const float* sin, float sign) {
  const int64_t half = D / 2;
  const Vec vsign(sign);
  for (int64_t h = 0; h < heads; ++h) {
    const T* x1 = src + h * src_head_stride;
    const T* x2 = x1 + half;
    T* o1 = dst + h * dst_head_stride;
    T* o2 = o1 + half;
    int64_t j = 0;
    for (; j + Vec::size() <= half; j += Vec::size()) {
      Vec a = load_f(x1 + j), b = load_f(x2 + j), c = Vec::loadu(cos + j), s = Vec::loadu(sin + j) * vsign;
      store_f(o1 + j, a * c - b * s);
      store_f(o2 + j, b * c + a * s);
    }
    for (; j < half; ++j) {
      const float a = static_cast<float>(x1[j]), b = static_cast<float>(x2[j]), c = cos[j], s = sin[j] * sign;
      o1[j] = static_cast<T>(a * c - b * s);
      o2[j] = static_cast<T>(b * c + a * s);
    }
  }
}

// qkv (B, T, n_q + 2 n_kv, D), cos/sin (T, D / 2) float32 -> q and k rotated: (B, T, n_q + n_kv, D), in
// qkv's dtype (bfloat16: computed in float32, rounded once, as PyTorch's rotary in float32 then cast back)
at::Tensor rotary_qk_forward(const at::Tensor& qkv_in, const at::Tensor& cos_in, const at::Tensor& sin_in,
                             int64_t n_rotated) {
  check_float_cpu(qkv_in, "qkv");
  at::Tensor qkv = qkv_in.contiguous(), cos = cos_in.contiguous(), sin = sin_in.contiguous();
  TORCH_CHECK(qkv.dim() == 4, "rotary: qkv must be (B, T, heads, head_dim)");
  const int64_t B = qkv.size(0), T = qkv.size(1), n = qkv.size(2), D = qkv.size(3);
  TORCH_CHECK(D % 2 == 0, "rotary: head_dim must be even, got ", D);
  TORCH_CHECK(0 <= n_rotated && n_rotated <= n, "rotary: n_rotated must be in [0, ", n, "], got ", n_rotated);
  check_fp32_cpu(cos, "cos");
  check_fp32_cpu(sin, "sin");
  TORCH_CHECK(cos.numel() == T * (D / 2) && sin.numel() == T * (D / 2), "rotary: cos/sin must be (T, head_dim / 2)");
  at::Tensor out = at::empty({B, T, n_rotated, D}, qkv.options());
  const float* cp = cos.const_data_ptr<float>();
  const float* sp = sin.const_data_ptr<float>();
  by_dtype(qkv, [&](auto zero) {
    using T_ = decltype(zero);
    const T_* xp = qkv.const_data_ptr<T_>();
    T_* op = out.mutable_data_ptr<T_>();
    at::parallel_for(0, B * T, grain_rows(n_rotated * D), [&](int64_t begin, int64_t end) {
      for (int64_t bt = begin; bt < end; ++bt) {
        const int64_t t = bt % T;
        rotate_heads(xp + bt * n * D, D, op + bt * n_rotated * D, D, n_rotated, D, cp + t * (D / 2),
                     sp + t * (D / 2), 1.f);
      }
    });
    return 0;
  });
  return out;
}

// The gradients of q (B, T, n_q, D), k (B, T, n_kv, D) and v (B, T, n_kv, D) -- any strides with a
// contiguous last dim; undefined for an unused output; one dtype -- into one (B, T, n_q + 2 n_kv, D)
// gradient for qkv, in their dtype: q's and k's rotated back, v's copied.
at::Tensor rotary_qkv_backward(const std::optional<at::Tensor>& grad_q, const std::optional<at::Tensor>& grad_k,
                               const std::optional<at::Tensor>& grad_v, const at::Tensor& cos_in,
                               const at::Tensor& sin_in, int64_t B, int64_t T, int64_t n_q, int64_t n_kv, int64_t D) {
  at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  check_fp32_cpu(cos, "cos");
  check_fp32_cpu(sin, "sin");
  TORCH_CHECK(D % 2 == 0 && B >= 0 && T >= 0 && n_q >= 0 && n_kv >= 0, "rotary_qkv_backward: bad sizes");
  TORCH_CHECK(cos.numel() == T * (D / 2) && sin.numel() == T * (D / 2),
              "rotary_qkv_backward: cos/sin must be (T, head_dim / 2)");
  const std::pair<const std::optional<at::Tensor>*, int64_t> inputs[3] = {{&grad_q, n_q}, {&grad_k, n_kv}, {&grad_v, n_kv}};
  std::optional<at::ScalarType> dtype;
  for (const auto& [g, heads] : inputs) {
    if (g->has_value() && (*g)->defined()) {
      check_float_cpu(**g, "grad");
      TORCH_CHECK(!dtype || *dtype == (*g)->scalar_type(), "rotary_qkv_backward: the gradients differ in dtype");
      dtype = (*g)->scalar_type();
    }
  }
  const int64_t n = n_q + 2 * n_kv;
  at::Tensor out = at::empty({B, T, n, D}, cos.options().dtype(dtype.value_or(at::kFloat)));
  by_dtype(out, [&](auto zero) {
    using T_ = decltype(zero);
    struct Part { const T_* data; int64_t sb, st, sh; int64_t heads, offset; bool rotate; };
    std::vector<Part> parts;
    std::vector<at::Tensor> keep;
    int64_t offset = 0;
    for (int i = 0; i < 3; ++i) {
      const auto& g = *inputs[i].first;
      const int64_t heads = inputs[i].second;
      if (g.has_value() && g->defined()) {
        TORCH_CHECK(g->dim() == 4 && g->size(0) == B && g->size(1) == T && g->size(2) == heads && g->size(3) == D,
                    "rotary_qkv_backward: a gradient has shape ", g->sizes());
        at::Tensor t = g->stride(3) == 1 ? *g : g->contiguous();
        keep.push_back(t);
        parts.push_back({t.const_data_ptr<T_>(), t.stride(0), t.stride(1), t.stride(2), heads, offset, i < 2});
      } else {
        parts.push_back({nullptr, 0, 0, 0, heads, offset, i < 2});
      }
      offset += heads;
    }
    const float* cp = cos.const_data_ptr<float>();
    const float* sp = sin.const_data_ptr<float>();
    T_* op = out.mutable_data_ptr<T_>();
    at::parallel_for(0, B * T, grain_rows(n * D), [&](int64_t begin, int64_t end) {
      for (int64_t bt = begin; bt < end; ++bt) {
        const int64_t b = bt / T, t = bt % T;
        T_* row = op + bt * n * D;
        for (const Part& p : parts) {
          T_* dst = row + p.offset * D;
          if (p.data == nullptr) {
            std::fill(dst, dst + p.heads * D, static_cast<T_>(0.f));
            continue;
          }
          const T_* src = p.data + b * p.sb + t * p.st;
          if (p.rotate) {
            rotate_heads(src, p.sh, dst, D, p.heads, D, cp + t * (D / 2), sp + t * (D / 2), -1.f);
          } else {
            for (int64_t h = 0; h < p.heads; ++h) std::copy(src + h * p.sh, src + h * p.sh + D, dst + h * D);
          }
        }
      }
    });
    return 0;
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(raylm_cpu, m) {
  m.def("swiglu_forward(Tensor h) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor h) -> Tensor");
  m.def("rms_norm_forward(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor grad, Tensor x, Tensor weight, Tensor rstd, bool weight_grad) -> (Tensor, Tensor)");
  m.def("rotary_qk_forward(Tensor qkv, Tensor cos, Tensor sin, int n_rotated) -> Tensor");
  m.def("rotary_qkv_backward(Tensor? grad_q, Tensor? grad_k, Tensor? grad_v, Tensor cos, Tensor sin, int B, int T, "
        "int n_q, int n_kv, int D) -> Tensor");
}

TORCH_LIBRARY_IMPL(raylm_cpu, CPU, m) {
  m.impl("swiglu_forward", swiglu_forward);
  m.impl("swiglu_backward", swiglu_backward);
  m.impl("rms_norm_forward", rms_norm_forward);
  m.impl("rms_norm_backward", rms_norm_backward);
  m.impl("rotary_qk_forward", rotary_qk_forward);
  m.impl("rotary_qkv_backward", rotary_qkv_backward);
}
