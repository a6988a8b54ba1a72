// Moving rows between the token-major tensors and the packed, transposed tiles of the CPU
// attention kernels (attention_cpu.cpp): gathers with prefetch, transposes, and the causal
// geometry (which keys a query column sees) that decides which micro-blocks to skip.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>

#include "tile_math.h"
#include "varlen_tasks.h"

namespace distca {

using Range = std::pair<int64_t, int64_t>;

// The first column (query i0 + c, of `cols`) of a transposed score tile that key j0 + j sees.
inline int64_t first_column(const Task& task, int64_t i0, int64_t j0, int64_t j, int64_t cols) {
  return task.causal ? std::clamp<int64_t>(task.first_query(j0 + j) - i0, 0, cols) : 0;
}

// How many of the nk keys starting at j0 query i0 + c sees.
inline int64_t visible_keys(const Task& task, int64_t i0, int64_t j0, int64_t c, int64_t nk) {
  return task.causal ? std::clamp<int64_t>(task.key_end(i0 + c) - j0, 0, nk) : nk;
}

// dst[r][0:n] = src[r][0:n] for `rows` rows, zero-padded to `width` columns. With ahead > 0,
// each row's n floats `ahead` floats on are fetched into L2 on the way: that is the next
// head's slice of the same tokens, which the next work item gathers. Paced by the copy, these
// prefetches hide the memory latency that otherwise stalls every row of a gather.
inline void pack_rows(float* dst, int64_t dst_rs, const float* src, int64_t src_rs,
                      int64_t rows, int64_t n, int64_t width, int64_t ahead = 0) {
  for (int64_t r = 0; r < rows; ++r) {
    float* d = dst + r * dst_rs;
    const float* s = src + r * src_rs;
    if (ahead > 0) {
      for (int64_t c = 0; c < n; c += 16) __builtin_prefetch(s + ahead + c, 0, 2);
    }
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) d[c] = s[c];
    std::fill(d + n, d + width, 0.0f);
  }
}

// Ask for `rows` rows of n floats (src_rs apart) ahead of use: tiles gather rows kilobytes
// apart from L3 or memory, and without this the copies stall on each row in turn.
inline void prefetch_rows(const float* src, int64_t src_rs, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < n; c += 16) __builtin_prefetch(src + r * src_rs + c);
  }
}

// st (nk x nq, row stride kQueryTile) = keys (nk x D, rows a_rs apart) times qt (D x nq), with
// the micro-blocks left of each key's first visible column skipped; callers mask those.
inline void transposed_scores(float* st, const float* keys, int64_t a_rs, const float* qt,
                              int64_t nk, int64_t nq, int64_t D, const Task& task, int64_t i0,
                              int64_t j0) {
  gemm_tiles<false>(nk, nq, keys, a_rs, 1, qt, kQueryTile, st, kQueryTile,
                    [&](int64_t j, int, int64_t c) {
                      const bool seen = c + kLanes2 > first_column(task, i0, j0, j, nq);
                      return seen ? Range{0, D} : Range{0, 0};
                    });
}

// Lane indices 0..7, to compare against a key's first visible column.
inline i32x8 lane_ids(int64_t c) {
  const int32_t b = static_cast<int32_t>(c);
  return i32x8{b, b + 1, b + 2, b + 3, b + 4, b + 5, b + 6, b + 7};
}

// dst (D x nq, row stride kQueryTile) = rows (nq x D, row stride rs) transposed, times mul.
// The rows must be zero past the n real queries and readable to a multiple of 8 columns.
inline void transpose_tile(float* dst, const float* rows, int64_t rs, int64_t nq, int64_t D,
                           float mul) {
  f32x8 cols[8];
  for (int64_t i = 0; i < nq; i += 8) {
    for (int64_t d = 0; d < D; d += 8) {
      transpose8(rows + i * rs + d, rs, cols);
      for (int64_t c = 0; c < std::min<int64_t>(8, D - d); ++c) {
        store8(dst + (d + c) * kQueryTile + i, cols[c] * mul);
      }
    }
  }
}

// Pack query rows [a, a + n) (rows rs floats apart) as an nq x Dp tile, zero past row n and
// column D, as transpose_tile wants them.
inline void pack_query_rows(float* dst, const float* src, int64_t rs, int64_t n, int64_t nq,
                            int64_t D, int64_t Dp, int64_t ahead) {
  pack_rows(dst, Dp, src, rs, n, D, Dp, ahead);
  std::fill(dst + n * Dp, dst + nq * Dp, 0.0f);
}

}  // namespace distca
