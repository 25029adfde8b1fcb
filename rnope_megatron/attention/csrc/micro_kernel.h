// Register-tiled products and vector helpers of the sliding-window kernel (one
// translation unit: included by sliding_window_cpu.cpp only).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace rnope_swa {

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

// Softmax and vector helpers.

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
inline float exp_sum<float>(float* x, int64_t n, float scale, float shift) {
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


}  // namespace rnope_swa
