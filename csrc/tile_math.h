// Float32 tile arithmetic for the CPU attention kernels, written so that GCC/Clang vectorise it.
//
// Score tiles are (rows x kKeyTile) row-major. K and V also come transposed, (D x keys) per kv
// head, so that the score product Q K^T is a gemm_acc with contiguous rows of B.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace distca {

constexpr int64_t kQueryTile = 64;
constexpr int64_t kKeyTile = 64;

// 8 float lanes; GCC/Clang lower it to AVX, SSE or NEON as the target allows.
typedef float f32x8 __attribute__((vector_size(32)));

inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, f32x8 v) { std::memcpy(p, &v, sizeof(v)); }

typedef int32_t i32x8 __attribute__((vector_size(32)));

// exp(x) on 8 lanes for x <= 0, max relative error ~2e-7. Arguments below -87 return ~1e-38
// instead of a denormal; callers write exact zeros for masked keys themselves. Rounding uses
// the 1.5 * 2^23 trick so the whole function stays in vector registers.
inline f32x8 exp8(f32x8 x) {
  const f32x8 lo = x - x - 87.0f;
  x = x < lo ? lo : x;
  const f32x8 t = x * 1.44269504088896341f + 12582912.0f;
  const f32x8 n = t - 12582912.0f;
  const f32x8 r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  f32x8 p = r * (1.0f / 720.0f) + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const i32x8 bits = ((i32x8)t - 0x4B400000 + 127) << 23;
  return p * (f32x8)bits;
}

// s[0:kKeyTile] = exp(s - shift) in place.
inline void exp_tile_row(float* s, float shift) {
  for (int64_t j = 0; j < kKeyTile; j += 8) store8(s + j, exp8(load8(s + j) - shift));
}

// C (M x N, row stride c_rs) += A (M x K) * B (K x N, row stride b_rs), where A[i][k] is at
// a[i * a_rs + k * a_ks] (so A may be a transposed tile). Register-blocked 4 x 16 micro-kernel:
// per k, two vector loads of B and four broadcasts of A feed eight FMAs into named
// accumulators (arrays of vectors get spilled to the stack).
inline void gemm_acc(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_rs,
                     int64_t a_ks, const float* b, int64_t b_rs, float* c, int64_t c_rs) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) {
    const float* a0 = a + i * a_rs;
    const float* a1 = a0 + a_rs;
    const float* a2 = a1 + a_rs;
    const float* a3 = a2 + a_rs;
    float* c0 = c + i * c_rs;
    float* c1 = c0 + c_rs;
    float* c2 = c1 + c_rs;
    float* c3 = c2 + c_rs;
    int64_t j = 0;
    for (; j + 16 <= N; j += 16) {
      f32x8 x00 = load8(c0 + j), x01 = load8(c0 + j + 8), x10 = load8(c1 + j),
            x11 = load8(c1 + j + 8), x20 = load8(c2 + j), x21 = load8(c2 + j + 8),
            x30 = load8(c3 + j), x31 = load8(c3 + j + 8);
      for (int64_t k = 0; k < K; ++k) {
        const f32x8 b0 = load8(b + k * b_rs + j), b1 = load8(b + k * b_rs + j + 8);
        const float y0 = a0[k * a_ks], y1 = a1[k * a_ks], y2 = a2[k * a_ks], y3 = a3[k * a_ks];
        x00 += y0 * b0;
        x01 += y0 * b1;
        x10 += y1 * b0;
        x11 += y1 * b1;
        x20 += y2 * b0;
        x21 += y2 * b1;
        x30 += y3 * b0;
        x31 += y3 * b1;
      }
      store8(c0 + j, x00), store8(c0 + j + 8, x01), store8(c1 + j, x10);
      store8(c1 + j + 8, x11), store8(c2 + j, x20), store8(c2 + j + 8, x21);
      store8(c3 + j, x30), store8(c3 + j + 8, x31);
    }
    for (int r = 0; r < 4; ++r) {
      for (int64_t k = 0; k < K; ++k) {
        const float x = a[(i + r) * a_rs + k * a_ks];
        for (int64_t jj = j; jj < N; ++jj) c[(i + r) * c_rs + jj] += x * b[k * b_rs + jj];
      }
    }
  }
  for (; i < M; ++i) {
    for (int64_t k = 0; k < K; ++k) {
      const float x = a[i * a_rs + k * a_ks];
#pragma omp simd
      for (int64_t jj = 0; jj < N; ++jj) c[i * c_rs + jj] += x * b[k * b_rs + jj];
    }
  }
}

// Row max over the first lim lanes and, after exp, the row sum over all lanes of a score row.
inline float row_max(const float* s, int64_t lim, float init) {
  float m = init;
  for (int64_t j = 0; j < lim; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

inline float row_sum(const float* s) {
  f32x8 acc = load8(s);
  for (int64_t j = 8; j < kKeyTile; j += 8) acc += load8(s + j);
  float total = 0.0f;
  for (int lane = 0; lane < 8; ++lane) total += acc[lane];
  return total;
}

}  // namespace distca
