// Float32 tile arithmetic for the CPU attention kernels, written so that GCC/Clang vectorise it.
//
// Tiles are kKeyTile keys wide. Score tiles are (rows x kKeyTile) row-major; "transposed" tiles
// hold a (kKeyTile x D) block of K or V as (D x kKeyTile), zero-padded past the valid keys, so
// that a score row is a sum of contiguous axpys.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace distca {

constexpr int64_t kQueryTile = 64;
constexpr int64_t kKeyTile = 64;
constexpr int64_t kChunk = 64;  // head-dim chunk kept in registers by weighted_rows_acc

// exp(x) for x <= 88, ~1 ulp, branch-free so loops over it vectorise. Arguments below -87
// return ~1e-38 instead of a denormal; callers pass score - row_max (or - lse) <= 0 and write
// exact zeros for masked keys themselves.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return p * scale;
}

// c (n x kKeyTile) = a (n x D, row-major) * bt (D x kKeyTile).
inline void matmul_nt(const float* a, int64_t n, int64_t D, const float* bt, float* c) {
  for (int64_t i = 0; i < n; ++i) {
    float row[kKeyTile] = {};
    const float* ai = a + i * D;
    for (int64_t d = 0; d < D; ++d) {
      const float x = ai[d];
      const float* b = bt + d * kKeyTile;
#pragma omp simd
      for (int64_t j = 0; j < kKeyTile; ++j) row[j] += x * b[j];
    }
    std::memcpy(c + i * kKeyTile, row, sizeof(row));
  }
}

// dst[0:D] += sum_{k < n} w[k * w_stride] * src[k * D : (k + 1) * D]; zero weights skipped.
inline void weighted_rows_acc(const float* w, int64_t w_stride, int64_t n, const float* src,
                              int64_t D, float* dst) {
  int64_t c0 = 0;
  for (; c0 + kChunk <= D; c0 += kChunk) {
    float acc[kChunk];
    std::memcpy(acc, dst + c0, sizeof(acc));
    for (int64_t k = 0; k < n; ++k) {
      const float x = w[k * w_stride];
      if (x == 0.0f) continue;
      const float* s = src + k * D + c0;
#pragma omp simd
      for (int64_t d = 0; d < kChunk; ++d) acc[d] += x * s[d];
    }
    std::memcpy(dst + c0, acc, sizeof(acc));
  }
  if (c0 < D) {
    for (int64_t k = 0; k < n; ++k) {
      const float x = w[k * w_stride];
      if (x == 0.0f) continue;
      const float* s = src + k * D;
#pragma omp simd
      for (int64_t d = c0; d < D; ++d) dst[d] += x * s[d];
    }
  }
}

// Rows [0, n) of a (n x D) tile; the source rows are `stride` elements apart. dst = src * mult.
template <typename scalar_t>
inline void load_rows(const scalar_t* src, int64_t stride, int64_t n, int64_t D, float mult,
                      float* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* s = src + i * stride;
    float* o = dst + i * D;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<float>(s[d]) * mult;
  }
}

// (D x kKeyTile) transposed tile of nk source rows, zero past nk.
template <typename scalar_t>
inline void load_transposed(const scalar_t* src, int64_t stride, int64_t nk, int64_t D,
                            float* dst) {
  if (nk < kKeyTile) std::fill(dst, dst + D * kKeyTile, 0.0f);
  for (int64_t j = 0; j < nk; ++j) {
    const scalar_t* s = src + j * stride;
    for (int64_t d = 0; d < D; ++d) dst[d * kKeyTile + j] = static_cast<float>(s[d]);
  }
}

template <typename scalar_t>
inline void store_rows(const float* src, int64_t n, int64_t D, float mult, scalar_t* dst,
                       int64_t stride) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t d = 0; d < D; ++d) dst[i * stride + d] = static_cast<scalar_t>(src[i * D + d] * mult);
  }
}

}  // namespace distca
