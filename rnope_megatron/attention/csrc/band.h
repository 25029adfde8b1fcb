// Band geometry of the sliding-window kernel: which keys a block of queries sees, the
// packed K/V panels, and the band-restricted products built on the micro-kernel.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>

#include "micro_kernel.h"

namespace rnope_swa {

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
inline int64_t score_ld(int64_t window, int64_t block_q, int64_t width) {
  return round_up(window + block_q + 2 * width, width);
}

// Panels of Kᵀ a block's band can span, plus one: the ring that pack_panels fills and
// band_scores reads, so that packing the next block's panels never overwrites the band
// in use. Scratch is O(W·D) per thread, not O(L·D).
inline int64_t panel_ring(int64_t window, int64_t block_q, int64_t width) {
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

// Asks for the rows `row` of the given [L, D] tensors (one offset, already in elements)
// ahead of use. Called once per row of the current block's softmax loop for the same row
// of the next block, so the next block's first touches are in flight while this block
// computes, a few cache lines at a time. Why: each block starts on rows nobody read yet
// (16 KB per tensor at Bq = 64, D = 64), and the hardware prefetcher alone left those
// reads exposed; prefetching the whole next block at its start gained nothing (measured:
// docs/benchmarks.md).
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


}  // namespace rnope_swa
