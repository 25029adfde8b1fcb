// How the sliding-window kernel shares its work items between torch's intra-op threads.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "micro_kernel.h"

namespace rnope_swa {

// Items taken from another thread's range since the library was loaded (a diagnostic:
// tests read it through torch.ops.rnope.sliding_window_cpu_stolen_items).
inline std::atomic<int64_t>& stolen_items() {
  static std::atomic<int64_t> count{0};
  return count;
}

// Work items 0..n-1 shared by `parts` threads: each thread owns a contiguous range and
// takes from its front, so consecutive items (neighbouring blocks of one head, whose K/V
// rows and panels overlap) stay on one core; a thread whose range is empty takes from the
// back of the fullest other range. Why not at::parallel_for: it splits statically, and on
// a shared machine one core can run markedly slower than the other through whole calls,
// which a static split waits for. Why not one shared counter: interleaving neighbouring
// blocks across cores cost time in the forward (both measured: docs/benchmarks.md).
// Which thread computes an item never changes its result: the tests force steals
// (RNOPE_SWA_FORCE_STEALS=1 gives range 0 every item, so every other thread's work is
// stolen from it) and compare bits.
class WorkRanges {
 public:
  WorkRanges(int64_t n_items, int64_t parts) : slots_(parts) {
    const bool skewed = forced_steals();
    for (int64_t p = 0; p < parts; ++p)
      slots_[p].word = skewed ? pack(p == 0 ? 0 : n_items, n_items)
                              : pack(n_items * p / parts, n_items * (p + 1) / parts);
  }
  static bool forced_steals() {
    const char* flag = std::getenv("RNOPE_SWA_FORCE_STEALS");
    return flag != nullptr && flag[0] == '1';
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
        if (slot.compare_exchange_weak(word, taken, std::memory_order_relaxed)) {
          if (!own) stolen_items().fetch_add(1, std::memory_order_relaxed);
          return item;
        }
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
inline int64_t segment_rows(int64_t bh, int64_t seq, int64_t window, int64_t block_q, int64_t width) {
  const int64_t wanted = (32 + bh - 1) / bh;  // segments per (batch, head)
  const int64_t shortest = std::max(4 * window, window + 2 * width);
  const int64_t segments = std::max<int64_t>(1, std::min(wanted, seq / shortest));
  return round_up(std::max((seq + segments - 1) / segments, shortest), block_q);
}

}  // namespace rnope_swa
