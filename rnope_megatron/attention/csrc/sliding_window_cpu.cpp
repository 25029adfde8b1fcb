// Banded (sliding-window) causal attention for CPU: forward and backward.
//
// Why a kernel of our own: torch's fused CPU flash kernel only knows "full" and
// "causal". Feeding it short query tiles against their window (the pure-torch path in
// sliding_window.py) pays 1.3-2x per score over one long causal call, which is the
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
// Tried and dropped, by A/B timing at L = 2k, W = 64: score tiles starting at half-panel
// boundaries, or 8 x 1-vector score tiles (fewer masked columns; the extra loads cost
// more: +6%), at::vec transposes for the packing (3.5x faster alone, no change in place),
// half-width tiles at band edges (< 0.5%), prefetching the whole next block at a block's
// start (no change; spread over the softmax loop it pays, see prefetch_row), dot-product score tiles that need no packing (2.3x slower per flop: horizontal
// sums), and one shared work counter (neighbouring blocks on different cores: +10-20%).

// Layout: q, k, v, out, grads are contiguous [BH, L, D] (K/V already repeated for GQA);
// lse is [BH, L]. Window semantics are Hugging Face's: query i sees key j iff
// i - W < j <= i.
//
// Registered as torch.ops.rnope.sliding_window_cpu_{forward,backward}; built and loaded
// by rnope_megatron/attention/native_cpu.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------
// Micro-kernel: C[4, cols] (=|+=) A[4, k0:k1] · B[k0:k1, cols]. B and C are row-major;
// A is addressed as a[i * a_row + p * a_k], so a transposed operand (a_row = 1) is read in
// place instead of being copied.

template <typename T>
struct Simd {
  typedef T vec __attribute__((vector_size(32)));
  static constexpr int64_t lanes = 32 / sizeof(T);
  static constexpr int64_t width = 2 * lanes;  // columns of one register tile
  static vec load(const T* p) {
    vec v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(T* p, vec v) { std::memcpy(p, &v, sizeof(v)); }
  // Broadcast (one vbroadcastss). Not `vec{} + x`, which keeps a scalar add (x + 0.0 is
  // not x for -0.0), nor a lane loop, which compiles to lane inserts.
  static vec splat(T x) {
    if constexpr (lanes == 8) {
      return vec{x, x, x, x, x, x, x, x};
    } else {
      return vec{x, x, x, x};
    }
  }
};

// One full-width tile: 8 vector accumulators, 2 loads + 4 broadcasts per k.
template <typename T>
inline void tile4(int64_t k0, int64_t k1, const T* a, int64_t a_row, int64_t a_k, const T* b,
                  int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  using S = Simd<T>;
  using V = typename S::vec;
  V c00 = {}, c01 = {}, c10 = {}, c11 = {}, c20 = {}, c21 = {}, c30 = {}, c31 = {};
  const T *a0 = a, *a1 = a + a_row, *a2 = a + 2 * a_row, *a3 = a + 3 * a_row;
  for (int64_t p = k0; p < k1; ++p) {
    const V b0 = S::load(b + p * ldb), b1 = S::load(b + p * ldb + S::lanes);
    const int64_t pa = p * a_k;
    const V x0 = S::splat(a0[pa]), x1 = S::splat(a1[pa]), x2 = S::splat(a2[pa]), x3 = S::splat(a3[pa]);
    c00 += x0 * b0; c01 += x0 * b1;
    c10 += x1 * b0; c11 += x1 * b1;
    c20 += x2 * b0; c21 += x2 * b1;
    c30 += x3 * b0; c31 += x3 * b1;
  }
  if (accumulate) {
    c00 += S::load(c), c01 += S::load(c + S::lanes);
    c10 += S::load(c + ldc), c11 += S::load(c + ldc + S::lanes);
    c20 += S::load(c + 2 * ldc), c21 += S::load(c + 2 * ldc + S::lanes);
    c30 += S::load(c + 3 * ldc), c31 += S::load(c + 3 * ldc + S::lanes);
  }
  S::store(c, c00), S::store(c + S::lanes, c01);
  S::store(c + ldc, c10), S::store(c + ldc + S::lanes, c11);
  S::store(c + 2 * ldc, c20), S::store(c + 2 * ldc + S::lanes, c21);
  S::store(c + 3 * ldc, c30), S::store(c + 3 * ldc + S::lanes, c31);
}

// Narrow tail (< one tile of columns), plain loops.
template <typename T>
inline void tile4_tail(int64_t cols, int64_t k0, int64_t k1, const T* a, int64_t a_row,
                       int64_t a_k, const T* b, int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  for (int r = 0; r < 4; ++r) {
    for (int64_t j = 0; j < cols; ++j) {
      T sum = 0;
      for (int64_t p = k0; p < k1; ++p) sum += a[r * a_row + p * a_k] * b[p * ldb + j];
      c[r * ldc + j] = accumulate ? c[r * ldc + j] + sum : sum;
    }
  }
}

// C[4, c0:c1] for one row group; c0 is a multiple of the tile width.
template <typename T>
inline void row_group(int64_t c0, int64_t c1, int64_t k0, int64_t k1, const T* a, int64_t a_row,
                      int64_t a_k, const T* b, int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  constexpr int64_t w = Simd<T>::width;
  int64_t j = c0;
  for (; j + w <= c1; j += w) tile4(k0, k1, a, a_row, a_k, b + j, ldb, c + j, ldc, accumulate);
  if (j < c1) tile4_tail(c1 - j, k0, k1, a, a_row, a_k, b + j, ldb, c + j, ldc, accumulate);
}

// ---------------------------------------------------------------------------------
// Softmax helpers.

// x[j] = exp(scale * x[j] - shift) for j in [0, n); returns the sum. Vectorised for float.
template <typename T>
T exp_sum(T* x, int64_t n, T scale, T shift) {
  T total = 0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(scale * x[j] - shift);
    total += x[j];
  }
  return total;
}

template <>
float exp_sum<float>(float* x, int64_t n, float scale, float shift) {
  using Vec = at::vec::Vectorized<float>;
  const Vec vscale(scale), vshift(shift);
  Vec vtotal(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec e = (Vec::loadu(x + j) * vscale - vshift).exp_u20();
    e.store(x + j);
    vtotal = vtotal + e;
  }
  float total = at::vec::vec_reduce_all<float>([](Vec& l, Vec& r) { return l + r; }, vtotal);
  for (; j < n; ++j) {
    x[j] = std::exp(scale * x[j] - shift);
    total += x[j];
  }
  return total;
}

// max of x[0, n), n >= 1. std::max_element does not vectorise.
template <typename T>
T max_of(const T* x, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  int64_t j = 0;
  T best = x[0];
  if (n >= Vec::size()) {
    Vec vbest = Vec::loadu(x);
    for (j = Vec::size(); j + Vec::size() <= n; j += Vec::size())
      vbest = at::vec::maximum(vbest, Vec::loadu(x + j));
    best = at::vec::vec_reduce_all<T>([](Vec& l, Vec& r) { return at::vec::maximum(l, r); }, vbest);
  }
  for (; j < n; ++j) best = std::max(best, x[j]);
  return best;
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// One query block and its band, in band coordinates: column c is key `lo + c`, row r is
// query `a + r`; row r sees columns [a+r-W+1-lo, a+r-lo] clipped to [0, nb).
// Buffers are sized by score_ld(); nb <= W + Bq - 1 + align - 1.
struct Band {
  int64_t a, rows, lo, nb, window;
  // lo is rounded down to a multiple of `align` (the tile width) so that band tiles are
  // whole panels of the packed K/V; the extra columns are masked like any other.
  Band(int64_t start, int64_t block_q, int64_t seq, int64_t w, int64_t align)
      : a(start), rows(std::min(block_q, seq - start)),
        lo(std::max<int64_t>(0, start - w + 1) / align * align), nb(start + rows - lo), window(w) {}
  int64_t first_col(int64_t r) const { return std::max<int64_t>(0, a + r - window + 1 - lo); }
  int64_t end_col(int64_t r) const { return a + r - lo + 1; }
  // Columns that any row of group g (rows 4g..4g+3) sees, widened to whole tiles.
  void group_cols(int64_t g, int64_t width, int64_t& c0, int64_t& c1) const {
    c0 = first_col(4 * g) / width * width;
    c1 = round_up(end_col(std::min(4 * g + 3, rows - 1)), width);
  }
  // Rows that see any key column in [c0, c1).
  void tile_rows(int64_t c0, int64_t c1, int64_t& r0, int64_t& r1) const {
    r0 = std::max<int64_t>(0, lo + c0 - a);
    r1 = std::min<int64_t>(rows, lo + c1 - 1 + window - a);
  }
};

// Score-buffer row length for a window and block: the widest band plus tile rounding.
int64_t score_ld(int64_t window, int64_t block_q, int64_t width) {
  return round_up(window + block_q + 2 * width, width);
}

// Panels of Kᵀ a block's band can span, plus one: the ring that pack_panels fills and
// band_scores reads, so that packing the next block's panels never overwrites the band
// in use. Scratch is O(W·D) per thread, not O(L·D).
int64_t panel_ring(int64_t window, int64_t block_q, int64_t width) {
  return score_ld(window, block_q, width) / width + 1;
}

// Panels [p0, p1) of Kᵀ for one [L, D] head: panel p is columns [p·w, p·w + w) as a
// contiguous [D, w] block (zero past L), stored in slot p % ring. A band tile of the score
// product then reads one 4 KB panel sequentially instead of D rows a whole sequence apart
// (one TLB entry, not D).
template <typename T>
void pack_panels(const T* x, int64_t seq, int64_t dim, T* dst, int64_t ring, int64_t p0, int64_t p1) {
  constexpr int64_t w = Simd<T>::width;
  for (int64_t p = p0; p < p1; ++p) {
    T* panel = dst + p % ring * dim * w;
    const int64_t cols = std::min(w, seq - p * w);
    for (int64_t d = 0; d < dim; ++d)  // contiguous writes; the w source rows stay in L1
      for (int64_t c = 0; c < cols; ++c) panel[d * w + c] = x[(p * w + c) * dim + d];
    for (int64_t d = 0; d < dim; ++d) std::fill(panel + d * w + cols, panel + (d + 1) * w, T(0));
  }
}

// Rows [row0, row0+rows) of x ([L, D]) as a block of `padded` (a multiple of 4) rows:
// x itself when the block is full, else a copy into `scratch` with zero rows appended
// (the micro-kernel always reads 4 rows).
template <typename T>
const T* block_rows(const T* x, int64_t row0, int64_t rows, int64_t padded, int64_t dim,
                    T* scratch) {
  if (rows == padded) return x + row0 * dim;
  std::memcpy(scratch, x + row0 * dim, rows * dim * sizeof(T));
  std::fill(scratch + rows * dim, scratch + padded * dim, T(0));
  return scratch;
}

// One worker's scratch: a single allocation cut into arrays of the given sizes (each
// starting on a 64-byte boundary of it), not zero-filled: every array is written before
// it is read.
template <typename T, size_t N>
struct Scratch {
  explicit Scratch(const std::array<int64_t, N>& sizes) {
    constexpr int64_t line = 64 / sizeof(T);
    int64_t total = 0;
    for (const int64_t n : sizes) total += round_up(n, line);
    storage.reset(new T[total]);
    T* next = storage.get();
    for (size_t i = 0; i < N; ++i) parts[i] = next, next += round_up(sizes[i], line);
  }
  std::unique_ptr<T[]> storage;
  std::array<T*, N> parts;
};

// scores[r, c] = x_block[r] · y[lo + c] on the tiles each row group needs (raw, unscaled);
// y_panels is the head's ring of panels (pack_panels). Panel-outer: one 4 KB panel stays in L1
// while every row group that needs it uses it (group-outer re-streamed the whole band
// from L2 once per group, which capped large windows).
template <typename T>
void band_scores(const Band& band, const T* xb, const T* y_panels, int64_t ring, int64_t dim,
                 int64_t ld, T* out) {
  constexpr int64_t w = Simd<T>::width;
  const int64_t groups = (band.rows + 3) / 4;
  int64_t first, last, unused;
  band.group_cols(0, w, first, unused);
  band.group_cols(groups - 1, w, unused, last);
  for (int64_t j = first; j < last; j += w) {
    const T* panel = y_panels + (band.lo + j) / w % ring * dim * w;
    for (int64_t g = 0; g < groups; ++g) {
      int64_t c0, c1;
      band.group_cols(g, w, c0, c1);
      if (j >= c0 && j < c1)
        tile4(0, dim, xb + 4 * g * dim, dim, 1, panel, w, out + 4 * g * ld + j, ld, false);
    }
  }
}

// out[r, :] = Σ_c probs[r, c] · y[lo + c, :], summing each row group over exactly the
// columns its rows see (c is the reduction index, so no tile rounding). The reduction
// runs in chunks of y rows that stay in L1 across all row groups.
template <typename T>
void band_times_rows(const Band& band, const T* probs, int64_t ld, const T* y, int64_t dim,
                     T* out) {
  constexpr int64_t chunk = 64;
  const int64_t groups = (band.rows + 3) / 4;
  const T* yb = y + band.lo * dim;
  for (int64_t k0 = band.first_col(0); k0 < band.end_col(band.rows - 1); k0 += chunk) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c0 = band.first_col(4 * g), c1 = band.end_col(std::min(4 * g + 3, band.rows - 1));
      const int64_t lo = std::max(k0, c0), hi = std::min(k0 + chunk, c1);
      if (hi > lo)  // the chunk holding c0 is the group's first: it writes, later ones add
        row_group<T>(0, dim, lo, hi, probs + 4 * g * ld, ld, 1, yb, dim, out + 4 * g * dim, dim,
                     lo > c0);
    }
  }
}

// dst[lo + c, :] += Σ_r probs[r, c] · x_block[r, :] (i.e. probsᵀ · x_block) for every
// band column, in groups of 4 keys; probsᵀ is read in place (a_row = 1, a_k = ld) and
// each group sums over only the rows that see it. dst is the head's [L, D] gradient.
// Keys in [fresh_from, fresh_to) hold nothing yet: their first write stores instead of
// adding, so dst needs no zero fill. fresh_to is a multiple of 4; fresh_from (a block
// start) may not be, and a group starting before it was written whole (zeros included)
// by the block that holds its first key's own query, so adding is right for all of it.
template <typename T>
void band_transposed_accumulate(const Band& band, const T* probs, int64_t ld, const T* xb,
                                int64_t dim, T* dst, int64_t seq, T* edge, int64_t fresh_from,
                                int64_t fresh_to) {
  for (int64_t c = 0; c < band.nb; c += 4) {
    int64_t r0, r1;
    band.tile_rows(c, c + 4, r0, r1);
    if (r1 <= r0) continue;
    const int64_t key = band.lo + c;
    T* out = dst + key * dim;
    const bool add = key < fresh_from || key >= fresh_to;
    if (key + 4 <= seq) {
      row_group<T>(0, dim, r0, r1, probs + c, 1, ld, xb, dim, out, dim, add);
    } else {  // the group runs past the sequence end: sum into scratch, keep the real rows
      row_group<T>(0, dim, r0, r1, probs + c, 1, ld, xb, dim, edge, dim, false);
      for (int64_t i = 0; i < (seq - key) * dim; ++i) out[i] = add ? out[i] + edge[i] : edge[i];
    }
  }
}

// x · y over n elements (the backward's dO_r · O_r), vectorised.
template <typename T>
T dot(const T* x, const T* y, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  Vec acc(T(0));
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size())
    acc = at::vec::fmadd(Vec::loadu(x + j), Vec::loadu(y + j), acc);
  T total = at::vec::vec_reduce_all<T>([](Vec& l, Vec& r) { return l + r; }, acc);
  for (; j < n; ++j) total += x[j] * y[j];
  return total;
}

// Asks for the rows `row` of the given [L, D] tensors (one offset, already in elements)
// ahead of use. Called once per row of the current block's softmax loop for the same row
// of the next block, so the next block's first touches are in flight while this block
// computes, a few cache lines at a time. Why: each block starts on rows nobody read yet
// (16 KB per tensor at Bq = 64, D = 64), and the hardware prefetcher alone left those
// reads exposed. Measured at L = 2k, W = 64 (median of 100 paired calls, 1 and 2
// threads): forward -13 to -16%, forward + backward -9 to -12%. Prefetching the whole next
// block at once, at the block's start, gained nothing.
template <typename T>
inline void prefetch_row(std::initializer_list<const T*> tensors, int64_t row, int64_t seq,
                         int64_t dim) {
  if (row >= seq) return;  // the last block has no next one
  for (const T* x : tensors)
    for (int64_t j = 0; j < dim; j += 64 / sizeof(T)) __builtin_prefetch(x + row * dim + j, 0, 3);
}

// Zero every column of row r outside what it sees; returns the visible [c0, c1).
template <typename T>
inline void mask_row(const Band& band, int64_t r, int64_t ld, T* row, int64_t& c0, int64_t& c1) {
  c0 = band.first_col(r);
  c1 = band.end_col(r);
  std::fill(row, row + c0, T(0));
  std::fill(row + c1, row + ld, T(0));
}

// Work items 0..n-1 shared by `parts` threads: each thread owns a contiguous range and
// takes from its front, so consecutive items (neighbouring blocks of one head, whose K/V
// rows and panels overlap) stay on one core; a thread whose range is empty takes from the
// back of the fullest other range. Why not at::parallel_for: it splits statically, and on
// a shared machine one core ran 13-31% slower than the other through whole calls
// (measured on this project's 2-core CI machines), which a static split waits for. Why
// not one shared counter: interleaving neighbouring blocks across cores cost 10-20% in
// the forward. Which thread computes an item never changes its result.
class WorkRanges {
 public:
  WorkRanges(int64_t n_items, int64_t parts) : slots_(parts) {
    for (int64_t p = 0; p < parts; ++p) slots_[p].word = pack(n_items * p / parts, n_items * (p + 1) / parts);
  }
  // The next item for the thread owning range `part`, or -1 when every range is empty.
  int64_t take(int64_t part) {
    for (bool own = true;; own = false) {
      int64_t victim = part;
      if (!own) {  // the fullest other range
        int64_t most = 0;
        for (int64_t p = 0; p < static_cast<int64_t>(slots_.size()); ++p) {
          const uint64_t word = slots_[p].word.load(std::memory_order_relaxed);
          if (p != part && end_of(word) - next_of(word) > most) most = end_of(word) - next_of(word), victim = p;
        }
        if (most == 0) return -1;
      }
      std::atomic<uint64_t>& slot = slots_[victim].word;
      uint64_t word = slot.load(std::memory_order_relaxed);
      while (next_of(word) < end_of(word)) {
        const int64_t item = own ? next_of(word) : end_of(word) - 1;
        const uint64_t taken = own ? pack(item + 1, end_of(word)) : pack(next_of(word), item);
        if (slot.compare_exchange_weak(word, taken, std::memory_order_relaxed)) return item;
      }
      // empty (or emptied meanwhile): look elsewhere; the loop ends when all are empty
    }
  }

 private:
  static uint64_t pack(int64_t next, int64_t end) { return uint64_t(next) | uint64_t(end) << 32; }
  static int64_t next_of(uint64_t word) { return int64_t(word & 0xffffffffu); }
  static int64_t end_of(uint64_t word) { return int64_t(word >> 32); }
  struct alignas(64) Slot {  // one cache line each: owners do not contend on a line
    std::atomic<uint64_t> word{0};
  };
  std::vector<Slot> slots_;
};

// Runs worker(next) once on each intra-op thread; next() returns that thread's next item
// of 0..n_items-1 (see WorkRanges), then -1.
template <typename Worker>
void run_balanced(int64_t n_items, const Worker& worker) {
  TORCH_CHECK(n_items < (int64_t(1) << 31), "sliding_window_cpu: too many work items");
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(n_items, at::get_num_threads()));
  WorkRanges ranges(n_items, parts);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) worker([&ranges, part] { return ranges.take(part); });
  });
}

// Query rows of one backward work item: a whole number of blocks. Enough segments that
// all (batch, head)s together give ~32 items (the backward's parallelism was B·H, which is
// small for batch 1 or few heads per TP rank), but each at least 4W long, so that packing
// each segment's first band again adds little, and longer than W + two tiles, so that a
// segment's bands never reach back past the previous segment. Depends on shapes only,
// never on the thread count: the segmentation fixes the order of the dK/dV sums.
int64_t segment_rows(int64_t bh, int64_t seq, int64_t window, int64_t block_q, int64_t width) {
  const int64_t wanted = (32 + bh - 1) / bh;  // segments per (batch, head)
  const int64_t shortest = std::max(4 * window, window + 2 * width);
  const int64_t segments = std::max<int64_t>(1, std::min(wanted, seq / shortest));
  return round_up(std::max((seq + segments - 1) / segments, shortest), block_q);
}

// ---------------------------------------------------------------------------------

template <typename T>
void forward_kernel(const T* q, const T* k, const T* v, T* out, T* lse, int64_t bh,
                    int64_t seq, int64_t dim, int64_t window, T scale, int64_t block_q) {
  constexpr int64_t w = Simd<T>::width;
  const int64_t n_blocks = (seq + block_q - 1) / block_q;
  run_balanced(bh * n_blocks, [&](const auto& next) {
    const int64_t bq = round_up(block_q, 4), ld = score_ld(window, block_q, w);
    const int64_t ring = panel_ring(window, block_q, w);
    // k_panels: Kᵀ of the head being worked on, packed as its blocks' bands reach it.
    const Scratch<T, 5> scratch({bq * dim, bq * ld, bq * dim, bq, ring * w * dim});
    const auto [qb, scores, acc, row_sum, k_panels] = scratch.parts;
    int64_t previous = -1, packed = 0;
    for (int64_t item; (item = next()) >= 0; previous = item) {
      const int64_t head = item / n_blocks;
      const Band band(item % n_blocks * block_q, block_q, seq, window, w);
      const int64_t off = head * seq * dim;
      if (item != previous + 1 || band.a == 0) packed = band.lo / w;  // not a continuation
      const int64_t needed = (band.a + band.rows + w - 1) / w;
      pack_panels(k + off, seq, dim, k_panels, ring, packed, needed);
      packed = needed;
      const T* q_block = block_rows(q + off, band.a, band.rows, bq, dim, qb);
      band_scores(band, q_block, k_panels, ring, dim, ld, scores);
      for (int64_t r = 0; r < band.rows; ++r) {
        prefetch_row({q + off, k + off, v + off}, band.a + block_q + r, seq, dim);
        T* s = scores + r * ld;
        int64_t c0, c1;
        mask_row(band, r, ld, s, c0, c1);
        const T row_max = max_of(s + c0, c1 - c0);
        row_sum[r] = exp_sum(s + c0, c1 - c0, scale, scale * row_max);
        lse[head * seq + band.a + r] = scale * row_max + std::log(row_sum[r]);
      }
      // Unnormalised P · V, then one division per output element instead of per score.
      band_times_rows(band, scores, ld, v + off, dim, acc);
      for (int64_t r = 0; r < band.rows; ++r) {
        const T inv = T(1) / row_sum[r];
        T* o = out + off + (band.a + r) * dim;
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
// fixed order, whatever the threads.
template <typename T>
void backward_kernel(const T* grad_out, const T* q, const T* k, const T* v, const T* out,
                     const T* lse, T* dq, T* dk, T* dv, int64_t bh, int64_t seq, int64_t dim,
                     int64_t window, T scale, int64_t block_q) {
  constexpr int64_t w = Simd<T>::width;
  constexpr int64_t none = INT64_MAX;
  const int64_t seg = segment_rows(bh, seq, window, block_q, w), n_segments = (seq + seg - 1) / seg;
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
        const int64_t head = item / per_head, first = (2 * (item % per_head) + parity) * seg;
        const int64_t last = std::min(seq, first + seg), off = head * seq * dim;
        // Keys from `stored` on were already stored by the next (even) segment: from the
        // 4-key group of the first key its first block sees (unseen groups are skipped).
        const int64_t stored = parity == 1 && last < seq ? std::max<int64_t>(0, last - window + 1) / 4 * 4 : none;
        int64_t packed = Band(first, block_q, seq, window, w).lo / w;  // panels packed so
        // far: each block adds those its band reaches, while their K/V rows are read anyway
        for (int64_t a = first; a < last; a += block_q) {
          const Band band(a, block_q, seq, window, w);
          const int64_t needed = (band.a + band.rows + w - 1) / w;
          pack_panels(k + off, seq, dim, k_panels, ring, packed, needed);
          pack_panels(v + off, seq, dim, v_panels, ring, packed, needed);
          packed = needed;
          const T* q_block = block_rows(q + off, a, band.rows, bq, dim, qb);
          const T* go_block = block_rows(grad_out + off, a, band.rows, bq, dim, gob);
          band_scores(band, q_block, k_panels, ring, dim, ld, probs);
          band_scores(band, go_block, v_panels, ring, dim, ld, dscores);  // dO · Vᵀ
          for (int64_t r = 0; r < band.rows; ++r) {
            prefetch_row({q + off, grad_out + off, out + off, k + off, v + off}, a + block_q + r, seq, dim);
            const T delta = dot(go_block + r * dim, out + off + (a + r) * dim, dim);
            T* p = probs + r * ld;
            T* g = dscores + r * ld;
            int64_t c0, c1;
            mask_row(band, r, ld, p, c0, c1);
            mask_row(band, r, ld, g, c0, c1);
            exp_sum(p + c0, c1 - c0, scale, lse[head * seq + a + r]);  // P = exp(S - lse)
            for (int64_t c = c0; c < c1; ++c) g[c] = scale * p[c] * (g[c] - delta);  // dS, scaled
          }
          if (band.rows == bq) {  // dS · K straight into dq; a short block via scratch
            band_times_rows(band, dscores, ld, k + off, dim, dq + off + a * dim);
          } else {
            band_times_rows(band, dscores, ld, k + off, dim, dq_block);
            std::memcpy(dq + off + a * dim, dq_block, band.rows * dim * sizeof(T));
          }
          // Keys below `a` were written by earlier blocks (their bands end at a) or, at an
          // odd segment's start, by the previous segment; an even segment's first block
          // finds its whole band empty (its predecessor runs later and adds).
          const int64_t fresh_from = parity == 0 && a == first ? 0 : a;
          band_transposed_accumulate(band, probs, ld, go_block, dim, dv + off, seq, edge,
                                     fresh_from, stored);
          band_transposed_accumulate(band, dscores, ld, q_block, dim, dk + off, seq, edge,
                                     fresh_from, stored);
        }
      }
    });
  }
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
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "sliding_window_cpu: q, k, v must have one dtype");
}

void check_sizes(int64_t window, double scale, int64_t block_q) {
  TORCH_CHECK(window >= 1 && block_q >= 1, "sliding_window_cpu: window and block_q must be >= 1");
  TORCH_CHECK(scale > 0, "sliding_window_cpu: softmax scale must be positive, got ", scale);
}

std::tuple<at::Tensor, at::Tensor> sliding_window_forward(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, int64_t window,
                                                          double scale, int64_t block_q) {
  check_inputs(q, k, v);
  check_sizes(window, scale, block_q);
  const int64_t bh = q.size(0), seq = q.size(1), dim = q.size(2);
  auto out = at::empty_like(q);
  auto lse = at::empty({bh, seq}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sliding_window_cpu_forward", [&] {
    forward_kernel<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                             out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), bh, seq, dim,
                             window, static_cast<scalar_t>(scale), block_q);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sliding_window_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, int64_t window, double scale, int64_t block_q) {
  check_inputs(q, k, v);
  check_sizes(window, scale, block_q);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() &&
                  grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type() &&
                  lse.scalar_type() == q.scalar_type(),
              "sliding_window_cpu_backward: grad_out/out/lse must match q");
  TORCH_CHECK(grad_out.is_contiguous() && out.is_contiguous() && lse.is_contiguous(),
              "sliding_window_cpu_backward: grad_out/out/lse must be contiguous");
  const int64_t bh = q.size(0), seq = q.size(1), dim = q.size(2);
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);  // all written
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sliding_window_cpu_backward", [&] {
    backward_kernel<scalar_t>(grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
                              k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                              out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                              dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                              dv.data_ptr<scalar_t>(), bh, seq, dim, window,
                              static_cast<scalar_t>(scale), block_q);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY(rnope, m) {
  m.def("sliding_window_cpu_forward(Tensor q, Tensor k, Tensor v, int window, float scale, "
        "int block_q) -> (Tensor, Tensor)");
  m.def("sliding_window_cpu_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, int window, float scale, int block_q) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rnope, CPU, m) {
  m.impl("sliding_window_cpu_forward", &sliding_window_forward);
  m.impl("sliding_window_cpu_backward", &sliding_window_backward);
}
