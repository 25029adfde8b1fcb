// Banded (sliding-window) causal attention for CPU: forward and backward.
//
// Why a kernel of our own: torch's fused CPU flash kernel only knows "full" and
// "causal". Feeding it short query tiles against their window (the pure-torch path in
// sliding_window.py) pays more per score than one long causal call, which is the
// baseline a sliding-window layer is compared against. This kernel computes only the
// band. For a block of Bq queries starting at `a` it holds the block's whole band
// [a-W+1, a+Bq) in a score buffer, so the softmax is exact in one pass (no online
// rescaling). All products go through one register-tiled micro-kernel (4 rows x 2 SIMD
// vectors, GCC/Clang vector extensions: AVX2+FMA when compiled for it, portable code
// elsewhere) that skips every 4x(2 vector) tile lying wholly outside the band, so the
// masked work per row is a few tiles, not Bq. No BLAS: small band GEMMs paid as much in
// MKL's per-call packing and threading as in arithmetic, and the kernel stays
// self-contained (torch headers only). Instead Kᵀ (and Vᵀ for dO·Vᵀ) is packed into 4 KB
// panels block by block as the bands reach it, into a per-thread ring of O(W·D), and the
// transposed products of the backward (Pᵀ·dO, dSᵀ·Q) read P and dS through strides rather
// than copies. Loop orders keep the operand being reused in L1 (panel-outer for scores,
// 64-key chunks for the P·V reductions). The backward writes dS·K straight into dq and
// stores (rather than adds) the first contribution to each dK/dV row: no zero fills.
//
// Parallel work: forward items are (batch·head, block); backward items are segments of a
// (batch·head)'s blocks (segment_rows), so the backward is not limited to B·H threads.
// Threads take items from contiguous ranges and steal from others' ends (WorkRanges).
//
// One translation unit, split by concern:
//   micro_kernel.h    register tiles, softmax and vector helpers
//   band.h            band geometry, K/V panels, band-restricted products
//   work_scheduler.h  work ranges with stealing, backward segments
//   this file         the forward and backward drivers and the torch operators
// What was tried and dropped, with measurements, is in docs/benchmarks.md.
//
// Layout: q, out, dq are contiguous [BH, Lq, D], k, v, dk, dv [BH, Lk, D] with Lk >= Lq
// (K/V already repeated for GQA); lse is [BH, Lq]. Queries are the last Lq keys' positions.
// Window semantics are Hugging Face's: the query at key position i sees key j iff
// i - W < j <= i.
//
// Registered as torch.ops.rnope.sliding_window_cpu_{forward,backward}; built and loaded
// by rnope_megatron/attention/native_cpu.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <tuple>

#include "band.h"
#include "micro_kernel.h"
#include "work_scheduler.h"

namespace rnope_swa {

// Queries are the last seq_q of seq_k keys ("bottom-right" alignment): query row i sits at
// key position q_offset + i, q_offset = seq_k - seq_q. Without an offset both are the same
// sequence; with one, the keys start with a halo of earlier tokens (a context-parallel
// chunk's W-1 predecessors held by other ranks). Bands, packing and dK/dV run in key
// coordinates; q, out, lse, dO and dq are indexed by key position - q_offset.
struct Lengths {
  int64_t seq_q, seq_k, q_offset;
  Lengths(int64_t q_rows, int64_t k_rows) : seq_q(q_rows), seq_k(k_rows), q_offset(k_rows - q_rows) {}
};

template <typename T>
void forward_kernel(const T* q, const T* k, const T* v, T* out, T* lse, int64_t bh,
                    Lengths len, int64_t dim, int64_t window, T scale, int64_t block_q) {
  constexpr int64_t w = Simd<T>::width;
  const int64_t n_blocks = (len.seq_q + block_q - 1) / block_q;
  run_balanced(bh * n_blocks, [&](const auto& next) {
    const int64_t bq = round_up(block_q, 4), ld = score_ld(window, block_q, w);
    const int64_t ring = panel_ring(window, block_q, w);
    // k_panels: Kᵀ of the head being worked on, packed as its blocks' bands reach it.
    const Scratch<T, 5> scratch({bq * dim, bq * ld, bq * dim, bq, ring * w * dim});
    const auto [qb, scores, acc, row_sum, k_panels] = scratch.parts;
    int64_t previous = -1, packed = 0;
    for (int64_t item; (item = next()) >= 0; previous = item) {
      const int64_t head = item / n_blocks;
      const Band band(len.q_offset + item % n_blocks * block_q, block_q, len.seq_k, window, w);
      const int64_t row = band.a - len.q_offset;  // the block's first query row
      const T* k_head = k + head * len.seq_k * dim;
      const T* v_head = v + head * len.seq_k * dim;
      const T* q_head = q + head * len.seq_q * dim;
      if (item != previous + 1 || row == 0) packed = band.lo / w;  // not a continuation
      const int64_t needed = (band.a + band.rows + w - 1) / w;
      pack_panels(k_head, len.seq_k, dim, k_panels, ring, packed, needed);
      packed = needed;
      const T* q_block = block_rows(q_head, row, band.rows, bq, dim, qb);
      band_scores(band, q_block, k_panels, ring, dim, ld, scores);
      for (int64_t r = 0; r < band.rows; ++r) {
        prefetch_row({q_head}, row + block_q + r, len.seq_q, dim);
        prefetch_row({k_head, v_head}, band.a + block_q + r, len.seq_k, dim);
        T* s = scores + r * ld;
        int64_t c0, c1;
        mask_row(band, r, ld, s, c0, c1);
        const T row_max = max_of(s + c0, c1 - c0);
        row_sum[r] = exp_sum(s + c0, c1 - c0, scale, scale * row_max);
        lse[head * len.seq_q + row + r] = scale * row_max + std::log(row_sum[r]);
      }
      // Unnormalised P · V, then one division per output element instead of per score.
      band_times_rows(band, scores, ld, v_head, dim, acc);
      for (int64_t r = 0; r < band.rows; ++r) {
        const T inv = T(1) / row_sum[r];
        T* o = out + (head * len.seq_q + row + r) * dim;
        for (int64_t j = 0; j < dim; ++j) o[j] = acc[r * dim + j] * inv;
      }
    }
  });
}

// Gradients given the forward's output and log-sum-exp. Work items are segments of a
// (batch, head)'s query blocks (segment_rows), run in order within a segment. A
// segment's first blocks reach up to W-1 keys back into the previous segment's dK/dV
// rows, so even segments run first and store their rows, odd ones second and add where
// a neighbour already stored: no two threads write one row, and every row's sum has one
// fixed order, whatever the threads. With a key offset, the first segment's first block
// stores the halo keys' rows: its band reaches all of them (q_offset < W is checked).
template <typename T>
void backward_kernel(const T* grad_out, const T* q, const T* k, const T* v, const T* out,
                     const T* lse, T* dq, T* dk, T* dv, int64_t bh, Lengths len, int64_t dim,
                     int64_t window, T scale, int64_t block_q) {
  constexpr int64_t w = Simd<T>::width;
  constexpr int64_t none = INT64_MAX;
  const int64_t seg = segment_rows(bh, len.seq_q, window, block_q, w);
  const int64_t n_segments = (len.seq_q + seg - 1) / seg;
  for (int64_t parity = 0; parity < 2; ++parity) {
    const int64_t per_head = (n_segments + 1 - parity) / 2;  // segments of this parity
    if (per_head == 0) continue;
    run_balanced(bh * per_head, [&](const auto& next) {
      const int64_t bq = round_up(block_q, 4), ld = score_ld(window, block_q, w);
      const int64_t ring = panel_ring(window, block_q, w);
      const Scratch<T, 8> scratch(
          {bq * dim, bq * dim, bq * ld, bq * ld, bq * dim, 4 * dim, ring * w * dim, ring * w * dim});
      const auto [qb, gob, probs, dscores, dq_block, edge, k_panels, v_panels] = scratch.parts;
      for (int64_t item; (item = next()) >= 0;) {
        const int64_t head = item / per_head;
        const int64_t first = len.q_offset + (2 * (item % per_head) + parity) * seg;  // key coordinates
        const int64_t last = std::min(len.seq_k, first + seg);
        const int64_t kh = head * len.seq_k * dim, qh = head * len.seq_q * dim;
        // Keys from `stored` on were already stored by the next (even) segment: from the
        // 4-key group of the first key its first block sees (unseen groups are skipped).
        const int64_t stored =
            parity == 1 && last < len.seq_k ? std::max<int64_t>(0, last - window + 1) / 4 * 4 : none;
        int64_t packed = Band(first, block_q, len.seq_k, window, w).lo / w;  // panels packed so
        // far: each block adds those its band reaches, while their K/V rows are read anyway
        for (int64_t a = first; a < last; a += block_q) {
          const Band band(a, block_q, len.seq_k, window, w);
          const int64_t row = a - len.q_offset;
          const int64_t needed = (band.a + band.rows + w - 1) / w;
          pack_panels(k + kh, len.seq_k, dim, k_panels, ring, packed, needed);
          pack_panels(v + kh, len.seq_k, dim, v_panels, ring, packed, needed);
          packed = needed;
          const T* q_block = block_rows(q + qh, row, band.rows, bq, dim, qb);
          const T* go_block = block_rows(grad_out + qh, row, band.rows, bq, dim, gob);
          band_scores(band, q_block, k_panels, ring, dim, ld, probs);
          band_scores(band, go_block, v_panels, ring, dim, ld, dscores);  // dO · Vᵀ
          for (int64_t r = 0; r < band.rows; ++r) {
            prefetch_row({q + qh, grad_out + qh, out + qh}, row + block_q + r, len.seq_q, dim);
            prefetch_row({k + kh, v + kh}, a + block_q + r, len.seq_k, dim);
            const T delta = dot(go_block + r * dim, out + qh + (row + r) * dim, dim);
            T* p = probs + r * ld;
            T* g = dscores + r * ld;
            int64_t c0, c1;
            mask_row(band, r, ld, p, c0, c1);
            mask_row(band, r, ld, g, c0, c1);
            exp_sum(p + c0, c1 - c0, scale, lse[head * len.seq_q + row + r]);  // P = exp(S - lse)
            for (int64_t c = c0; c < c1; ++c) g[c] = scale * p[c] * (g[c] - delta);  // dS, scaled
          }
          if (band.rows == bq) {  // dS · K straight into dq; a short block via scratch
            band_times_rows(band, dscores, ld, k + kh, dim, dq + qh + row * dim);
          } else {
            band_times_rows(band, dscores, ld, k + kh, dim, dq_block);
            std::memcpy(dq + qh + row * dim, dq_block, band.rows * dim * sizeof(T));
          }
          // Keys below `a` were written by earlier blocks (their bands end at a) or, at an
          // odd segment's start, by the previous segment; an even segment's first block
          // finds its whole band empty (its predecessor runs later and adds).
          const int64_t fresh_from = parity == 0 && a == first ? 0 : a;
          band_transposed_accumulate(band, probs, ld, go_block, dim, dv + kh, len.seq_k, edge,
                                     fresh_from, stored);
          band_transposed_accumulate(band, dscores, ld, q_block, dim, dk + kh, len.seq_k, edge,
                                     fresh_from, stored);
        }
      }
    });
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "sliding_window_cpu expects [BH, L, D] tensors, got ", q.sizes());
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(2) &&
                  q.size(1) <= k.size(1),
              "sliding_window_cpu: q, k, v must have one shape but for the keys' length: q [BH, Lq, D], "
              "k and v [BH, Lk >= Lq, D] (repeat K/V for GQA first)");
  TORCH_CHECK(q.device().is_cpu(), "sliding_window_cpu runs on CPU tensors only");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(),
              "sliding_window_cpu: inputs must be contiguous");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "sliding_window_cpu supports float32 and float64, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "sliding_window_cpu: q, k, v must have one dtype");
}

void check_sizes(const Lengths& len, int64_t window, double scale, int64_t block_q) {
  TORCH_CHECK(window >= 1 && block_q >= 1, "sliding_window_cpu: window and block_q must be >= 1");
  TORCH_CHECK(scale > 0, "sliding_window_cpu: softmax scale must be positive, got ", scale);
  // Keys more than W-1 before the first query are seen by none: pass only the halo.
  TORCH_CHECK(len.q_offset < window, "sliding_window_cpu: ", len.q_offset,
              " keys precede the queries but the window sees only ", window - 1, " of them");
}

std::tuple<at::Tensor, at::Tensor> sliding_window_forward(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, int64_t window,
                                                          double scale, int64_t block_q) {
  check_inputs(q, k, v);
  const Lengths len(q.size(1), k.size(1));
  check_sizes(len, window, scale, block_q);
  const int64_t bh = q.size(0), dim = q.size(2);
  auto out = at::empty_like(q);
  auto lse = at::empty({bh, len.seq_q}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sliding_window_cpu_forward", [&] {
    forward_kernel<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                             out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), bh, len, dim,
                             window, static_cast<scalar_t>(scale), block_q);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sliding_window_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, int64_t window, double scale, int64_t block_q) {
  check_inputs(q, k, v);
  const Lengths len(q.size(1), k.size(1));
  check_sizes(len, window, scale, block_q);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() &&
                  grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type() &&
                  lse.scalar_type() == q.scalar_type(),
              "sliding_window_cpu_backward: grad_out/out/lse must match q");
  TORCH_CHECK(grad_out.is_contiguous() && out.is_contiguous() && lse.is_contiguous(),
              "sliding_window_cpu_backward: grad_out/out/lse must be contiguous");
  const int64_t bh = q.size(0), dim = q.size(2);
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);  // all written
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sliding_window_cpu_backward", [&] {
    backward_kernel<scalar_t>(grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
                              k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                              out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                              dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                              dv.data_ptr<scalar_t>(), bh, len, dim, window,
                              static_cast<scalar_t>(scale), block_q);
  });
  return {dq, dk, dv};
}

int64_t stolen_item_count() { return stolen_items().load(); }

}  // namespace rnope_swa

TORCH_LIBRARY(rnope, m) {
  m.def("sliding_window_cpu_stolen_items() -> int", &rnope_swa::stolen_item_count);
  m.def("sliding_window_cpu_forward(Tensor q, Tensor k, Tensor v, int window, float scale, "
        "int block_q) -> (Tensor, Tensor)");
  m.def("sliding_window_cpu_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, int window, float scale, int block_q) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rnope, CPU, m) {
  m.impl("sliding_window_cpu_forward", &rnope_swa::sliding_window_forward);
  m.impl("sliding_window_cpu_backward", &rnope_swa::sliding_window_backward);
}
