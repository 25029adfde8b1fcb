// Banded (sliding-window) causal attention for CPU: forward and backward.
//
// Why a kernel of our own: torch's fused CPU flash kernel only knows "full" and
// "causal". Feeding it short query tiles against their window (the pure-torch path in
// sliding_window.py) pays 1.3-2x per score over one long causal call, which is the
// baseline a sliding-window layer is compared against. This kernel walks exactly the
// band: for a block of Bq queries starting at `a`, the keys [a-W+1, a+Bq), in a few key
// chunks, with an online (flash) softmax. Masking touches only the rows/columns at the
// two band edges; everything else is two GEMMs (forward) or four (backward) through
// the BLAS that torch itself links (MKL on x86), plus one vectorised exp pass.
//
// Layout: q, k, v, out, grads are contiguous [BH, L, D] (K/V already repeated for GQA);
// lse is [BH, L]. Window semantics are Hugging Face's: query i sees key j iff
// i - W < j <= i.
//
// Registered as torch.ops.rnope.sliding_window_cpu_{forward,backward}; built and loaded
// by rnope_megatron/attention/native_cpu.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

// Fortran BLAS exported by libtorch_cpu (ATen's own cpublas::gemm is not exported).
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc);
}

namespace {

enum class TransposeType { NoTranspose, Transpose };

// Column-major C[m, n] = alpha * op(A)[m, k] * op(B)[k, n] + beta * C. Row-major callers
// pass transposed problems (Cᵀ = op(B)ᵀ op(A)ᵀ); every size here is far below 2^31.
inline void gemm(TransposeType ta, TransposeType tb, int64_t m, int64_t n, int64_t k, float alpha,
                 const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                 int64_t ldc) {
  const char cta = ta == TransposeType::Transpose ? 'T' : 'N', ctb = tb == TransposeType::Transpose ? 'T' : 'N';
  const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
  sgemm_(&cta, &ctb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
}

inline void gemm(TransposeType ta, TransposeType tb, int64_t m, int64_t n, int64_t k, double alpha,
                 const double* a, int64_t lda, const double* b, int64_t ldb, double beta, double* c,
                 int64_t ldc) {
  const char cta = ta == TransposeType::Transpose ? 'T' : 'N', ctb = tb == TransposeType::Transpose ? 'T' : 'N';
  const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
  dgemm_(&cta, &ctb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
}

// The slice of a query block's band that one key chunk covers.
struct Chunk {
  int64_t start;  // first key of the chunk
  int64_t size;   // number of keys
};

// Key chunks covering the band [lo, hi): evenly sized, at most max_chunk keys each, so
// that no chunk degenerates into a sliver (a 3-key GEMM costs as much as a 64-key one).
std::vector<Chunk> band_chunks(int64_t lo, int64_t hi, int64_t max_chunk) {
  const int64_t band = hi - lo;
  const int64_t count = (band + max_chunk - 1) / max_chunk;
  const int64_t size = (band + count - 1) / count;
  std::vector<Chunk> chunks;
  for (int64_t s = lo; s < hi; s += size) chunks.push_back({s, std::min(size, hi - s)});
  return chunks;
}

// Columns [c0, c1) of a chunk that query `i` may see.
inline void visible_columns(int64_t i, int64_t window, const Chunk& ch, int64_t& c0, int64_t& c1) {
  c0 = std::max<int64_t>(0, i - window + 1 - ch.start);
  c1 = std::min<int64_t>(ch.size, i - ch.start + 1);
}

// x[j] = exp(x[j] - shift) for j in [0, n); returns the sum. Vectorised for float.
template <typename T>
T exp_shifted_sum(T* x, int64_t n, T shift) {
  T total = 0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    total += x[j];
  }
  return total;
}

template <>
float exp_shifted_sum<float>(float* x, int64_t n, float shift) {
  using Vec = at::vec::Vectorized<float>;
  const Vec vshift(shift);
  Vec vtotal(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec e = (Vec::loadu(x + j) - vshift).exp_u20();
    e.store(x + j);
    vtotal = vtotal + e;
  }
  float total = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vtotal);
  for (; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    total += x[j];
  }
  return total;
}

// Zero the columns of a row outside [c0, c1).
template <typename T>
inline void zero_outside(T* row, int64_t n, int64_t c0, int64_t c1) {
  if (c0 > 0) std::fill(row, row + std::min(c0, n), T(0));
  if (c1 < n) std::fill(row + std::max<int64_t>(c1, 0), row + n, T(0));
}

template <typename T>
void forward_kernel(const T* q, const T* k, const T* v, T* out, T* lse, int64_t bh,
                    int64_t seq, int64_t dim, int64_t window, double scale, int64_t block_q,
                    int64_t max_chunk) {
  const int64_t n_blocks = (seq + block_q - 1) / block_q;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, bh * n_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scores(block_q * max_chunk), acc(block_q * dim), row_max(block_q),
        row_sum(block_q);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t head = item / n_blocks, a = (item % n_blocks) * block_q;
      const int64_t rows = std::min(block_q, seq - a);
      const T* qh = q + head * seq * dim;
      const T* kh = k + head * seq * dim;
      const T* vh = v + head * seq * dim;
      std::fill(acc.begin(), acc.begin() + rows * dim, T(0));
      std::fill(row_max.begin(), row_max.begin() + rows, neg_inf);
      std::fill(row_sum.begin(), row_sum.begin() + rows, T(0));
      for (const Chunk& ch : band_chunks(std::max<int64_t>(0, a - window + 1), a + rows, max_chunk)) {
        const int64_t n = ch.size;
        // scores[rows, n] = scale * Q_block · K_chunkᵀ (column-major BLAS: Sᵀ = K · Qᵀ)
        gemm(TransposeType::Transpose, TransposeType::NoTranspose, n, rows, dim,
                   static_cast<T>(scale), kh + ch.start * dim, dim, qh + a * dim, dim, T(0),
                   scores.data(), n);
        for (int64_t r = 0; r < rows; ++r) {
          T* s = scores.data() + r * n;
          int64_t c0, c1;
          visible_columns(a + r, window, ch, c0, c1);
          if (c1 <= c0) {  // this chunk lies wholly outside the row's window
            std::fill(s, s + n, T(0));
            continue;
          }
          const T chunk_max = *std::max_element(s + c0, s + c1);
          const T new_max = std::max(row_max[r], chunk_max);
          const T rescale = std::exp(row_max[r] - new_max);  // 0 on the first visit
          row_sum[r] = row_sum[r] * rescale + exp_shifted_sum(s + c0, c1 - c0, new_max);
          row_max[r] = new_max;
          zero_outside(s, n, c0, c1);
          if (rescale != T(1)) {
            T* o = acc.data() + r * dim;
            for (int64_t d = 0; d < dim; ++d) o[d] *= rescale;
          }
        }
        // acc[rows, D] += P · V_chunk  (column-major: accᵀ += V_chunkᵀ · Pᵀ)
        gemm(TransposeType::NoTranspose, TransposeType::NoTranspose, dim, rows, n, T(1),
                   vh + ch.start * dim, dim, scores.data(), n, T(1), acc.data(), dim);
      }
      T* oh = out + head * seq * dim;
      for (int64_t r = 0; r < rows; ++r) {
        const T inv = T(1) / row_sum[r];
        for (int64_t d = 0; d < dim; ++d) oh[(a + r) * dim + d] = acc[r * dim + d] * inv;
        lse[head * seq + a + r] = row_max[r] + std::log(row_sum[r]);
      }
    }
  });
}

// Gradients of the banded softmax attention given the forward's output and log-sum-exp.
// One (batch, head) per task: key/value gradients of overlapping bands are accumulated
// in place, so a head's query blocks run in order on one thread.
template <typename T>
void backward_kernel(const T* grad_out, const T* q, const T* k, const T* v, const T* out,
                     const T* lse, T* dq, T* dk, T* dv, int64_t bh, int64_t seq, int64_t dim,
                     int64_t window, double scale, int64_t block_q, int64_t max_chunk) {
  at::parallel_for(0, bh, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> probs(block_q * max_chunk), dprobs(block_q * max_chunk), delta(block_q);
    for (int64_t head = begin; head < end; ++head) {
      const int64_t off = head * seq * dim;
      const T *qh = q + off, *kh = k + off, *vh = v + off, *goh = grad_out + off, *oh = out + off;
      T *dqh = dq + off, *dkh = dk + off, *dvh = dv + off;
      const T* lh = lse + head * seq;
      for (int64_t a = 0; a < seq; a += block_q) {
        const int64_t rows = std::min(block_q, seq - a);
        for (int64_t r = 0; r < rows; ++r) {  // delta_i = dO_i · O_i
          T s = 0;
          for (int64_t d = 0; d < dim; ++d) s += goh[(a + r) * dim + d] * oh[(a + r) * dim + d];
          delta[r] = s;
        }
        for (const Chunk& ch : band_chunks(std::max<int64_t>(0, a - window + 1), a + rows, max_chunk)) {
          const int64_t n = ch.size;
          const T* kc = kh + ch.start * dim;
          const T* vc = vh + ch.start * dim;
          gemm(TransposeType::Transpose, TransposeType::NoTranspose, n, rows, dim,
                     static_cast<T>(scale), kc, dim, qh + a * dim, dim, T(0), probs.data(), n);
          // dP[rows, n] = dO_block · V_chunkᵀ
          gemm(TransposeType::Transpose, TransposeType::NoTranspose, n, rows, dim, T(1),
                     vc, dim, goh + a * dim, dim, T(0), dprobs.data(), n);
          for (int64_t r = 0; r < rows; ++r) {
            T* p = probs.data() + r * n;
            T* g = dprobs.data() + r * n;
            int64_t c0, c1;
            visible_columns(a + r, window, ch, c0, c1);
            if (c1 > c0) {
              exp_shifted_sum(p + c0, c1 - c0, lh[a + r]);  // P = exp(S - lse)
              for (int64_t c = c0; c < c1; ++c) g[c] = p[c] * (g[c] - delta[r]);  // dS
            }
            zero_outside(p, n, c0, c1);
            zero_outside(g, n, c0, c1);
          }
          // dV_chunk += Pᵀ · dO_block
          gemm(TransposeType::NoTranspose, TransposeType::Transpose, dim, n, rows, T(1),
                     goh + a * dim, dim, probs.data(), n, T(1), dvh + ch.start * dim, dim);
          // dQ_block += scale · dS · K_chunk
          gemm(TransposeType::NoTranspose, TransposeType::NoTranspose, dim, rows, n,
                     static_cast<T>(scale), kc, dim, dprobs.data(), n, T(1), dqh + a * dim, dim);
          // dK_chunk += scale · dSᵀ · Q_block
          gemm(TransposeType::NoTranspose, TransposeType::Transpose, dim, n, rows,
                     static_cast<T>(scale), qh + a * dim, dim, dprobs.data(), n, T(1),
                     dkh + ch.start * dim, dim);
        }
      }
    }
  });
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 3, "sliding_window_cpu expects [BH, L, D] tensors, got ", q.sizes());
  TORCH_CHECK(q.sizes() == k.sizes() && q.sizes() == v.sizes(),
              "sliding_window_cpu: q, k, v must have one shape (repeat K/V for GQA first)");
  TORCH_CHECK(q.device().is_cpu(), "sliding_window_cpu runs on CPU tensors only");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(),
              "sliding_window_cpu: inputs must be contiguous");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "sliding_window_cpu supports float32 and float64, got ", q.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> sliding_window_forward(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, int64_t window,
                                                          double scale, int64_t block_q,
                                                          int64_t max_chunk) {
  check_inputs(q, k, v);
  TORCH_CHECK(window >= 1 && block_q >= 1 && max_chunk >= 1, "window/block sizes must be >= 1");
  const int64_t bh = q.size(0), seq = q.size(1), dim = q.size(2);
  auto out = at::empty_like(q);
  auto lse = at::empty({bh, seq}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sliding_window_cpu_forward", [&] {
    forward_kernel<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                             out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), bh, seq, dim,
                             window, scale, block_q, max_chunk);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sliding_window_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, int64_t window, double scale, int64_t block_q,
    int64_t max_chunk) {
  check_inputs(q, k, v);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && grad_out.is_contiguous() && out.is_contiguous() &&
                  lse.is_contiguous(),
              "sliding_window_cpu_backward: grad_out/out/lse must be contiguous and match q");
  const int64_t bh = q.size(0), seq = q.size(1), dim = q.size(2);
  auto dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sliding_window_cpu_backward", [&] {
    backward_kernel<scalar_t>(grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
                              k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                              out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                              dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                              dv.data_ptr<scalar_t>(), bh, seq, dim, window, scale, block_q,
                              max_chunk);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY(rnope, m) {
  m.def("sliding_window_cpu_forward(Tensor q, Tensor k, Tensor v, int window, float scale, "
        "int block_q, int max_chunk) -> (Tensor, Tensor)");
  m.def("sliding_window_cpu_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, int window, float scale, int block_q, int max_chunk) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rnope, CPU, m) {
  m.impl("sliding_window_cpu_forward", &sliding_window_forward);
  m.impl("sliding_window_cpu_backward", &sliding_window_backward);
}
