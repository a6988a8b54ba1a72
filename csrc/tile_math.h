// Float32 tile arithmetic for the CPU attention kernels, written so that GCC/Clang vectorise it.
//
// The kernels keep score tiles transposed, (keys x queries) row-major, so that queries lie
// along the vector lanes: the per-query softmax bookkeeping (running max, row sum, rescale,
// causal masks) is then plain element-wise vector code with no horizontal reductions.
// Tile widths along queries and along the head dim are multiples of kLanes2 (16 floats).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace distca {

constexpr int64_t kQueryTile = 64;
constexpr int64_t kKeyTile = 64;
constexpr int64_t kLanes2 = 16;  // columns per micro-kernel block: two 8-float vectors

// 8 float lanes; GCC/Clang lower it to AVX, SSE or NEON as the target allows.
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, f32x8 v) { std::memcpy(p, &v, sizeof(v)); }

inline f32x8 splat8(float x) { return f32x8{} + x; }

// out[c] = column c of the 8 x 8 block at src (rows rs floats apart): a transpose in
// registers, replacing 64 strided scalar moves (which cost a quarter of the work on tiles of
// short documents) by 24 shuffles.
inline void transpose8(const float* src, int64_t rs, f32x8 out[8]) {
#if defined(__AVX__)
  __m256 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * rs);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);      // a0 b0 a1 b1 | a4 b4 a5 b5
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // a2 b2 a3 b3 | a6 b6 a7 b7
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);  // a0 b0 c0 d0 | a4 b4 c4 d4
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    out[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    out[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
#else
  for (int c = 0; c < 8; ++c) {
    for (int r = 0; r < 8; ++r) out[c][r] = src[r * rs + c];
  }
#endif
}

inline int64_t round_up16(int64_t n) { return (n + kLanes2 - 1) / kLanes2 * kLanes2; }

// 2^x on 8 lanes, max relative error ~2e-7. x <= -127 (and -inf) gives exactly 0, which is
// how masked scores vanish. Rounding uses the 1.5 * 2^23 trick so that the whole function
// stays in vector registers; r = x - round(x) is exact, so no two-part range reduction.
inline f32x8 exp2_8(f32x8 x) {
  const f32x8 lo = splat8(-127.0f);
  x = x < lo ? lo : x;
  const f32x8 t = x + 12582912.0f;
  const f32x8 r = x - (t - 12582912.0f);  // in [-0.5, 0.5]
  // Taylor series of e^(r ln 2) to degree 6: truncation error < 1.3e-7 on [-0.5, 0.5].
  f32x8 p = r * 1.5403530393381606e-4f + 1.3333558146428441e-3f;
  p = p * r + 9.6181291076284772e-3f;
  p = p * r + 5.5504108664821580e-2f;
  p = p * r + 2.4022650695910071e-1f;
  p = p * r + 6.9314718055994531e-1f;
  p = p * r + 1.0f;
  const i32x8 bits = ((i32x8)t - 0x4B400000 + 127) << 23;
  return p * (f32x8)bits;
}

// C[0:R][0:16] (+)= sum over k in [k0, k1) of A[r][k] * B[k][0:16], where A[r][k] is at
// a[r * a_rs + k * a_ks] (so A may be a transposed tile) and B rows are b_rs floats apart.
// Per k: two vector loads of B and R broadcasts of A feed 2R FMAs into accumulators that the
// full unroll keeps in registers (R <= 6 leaves room for the operands in 16 ymm registers).
template <int R, bool kAccumulate>
inline void micro_kernel(int64_t k0, int64_t k1, const float* a, int64_t a_rs, int64_t a_ks,
                         const float* b, int64_t b_rs, float* c, int64_t c_rs) {
  f32x8 x[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    x[r][0] = kAccumulate ? load8(c + r * c_rs) : f32x8{};
    x[r][1] = kAccumulate ? load8(c + r * c_rs + 8) : f32x8{};
  }
  for (int64_t k = k0; k < k1; ++k) {
    const f32x8 b0 = load8(b + k * b_rs), b1 = load8(b + k * b_rs + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float y = a[r * a_rs + k * a_ks];
      x[r][0] += y * b0;
      x[r][1] += y * b1;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    store8(c + r * c_rs, x[r][0]);
    store8(c + r * c_rs + 8, x[r][1]);
  }
}

// One band of R rows starting at row i: every 16-column block j gets the k range
// span(i, R, j) = {k0, k1}; an empty range skips the block (kAccumulate) or zeroes it.
template <int R, bool kAccumulate, class Span>
inline void gemm_band(int64_t i, int64_t N, const float* a, int64_t a_rs, int64_t a_ks,
                      const float* b, int64_t b_rs, float* c, int64_t c_rs, const Span& span) {
  for (int64_t j = 0; j < N; j += kLanes2) {
    const std::pair<int64_t, int64_t> k = span(i, R, j);
    if (k.second <= k.first && kAccumulate) continue;
    micro_kernel<R, kAccumulate>(k.first, std::max(k.first, k.second), a + i * a_rs, a_rs,
                                 a_ks, b + j, b_rs, c + i * c_rs + j, c_rs);
  }
}

// C (M x N, N a multiple of 16) (+)= A B over the k ranges that span(row, rows, col) gives
// for each block of rows x 16 columns: callers use it to skip causally masked blocks and to
// stop the reduction where the rest of A's row is known to be zero.
template <bool kAccumulate, class Span>
inline void gemm_tiles(int64_t M, int64_t N, const float* a, int64_t a_rs, int64_t a_ks,
                       const float* b, int64_t b_rs, float* c, int64_t c_rs, const Span& span) {
  constexpr int R = 6;  // measured 1.5x the throughput of 4-row bands on AVX2
  int64_t i = 0;
  for (; i + R <= M; i += R) gemm_band<R, kAccumulate>(i, N, a, a_rs, a_ks, b, b_rs, c, c_rs, span);
  switch (M - i) {
    case 5: gemm_band<5, kAccumulate>(i, N, a, a_rs, a_ks, b, b_rs, c, c_rs, span); break;
    case 4: gemm_band<4, kAccumulate>(i, N, a, a_rs, a_ks, b, b_rs, c, c_rs, span); break;
    case 3: gemm_band<3, kAccumulate>(i, N, a, a_rs, a_ks, b, b_rs, c, c_rs, span); break;
    case 2: gemm_band<2, kAccumulate>(i, N, a, a_rs, a_ks, b, b_rs, c, c_rs, span); break;
    case 1: gemm_band<1, kAccumulate>(i, N, a, a_rs, a_ks, b, b_rs, c, c_rs, span); break;
    default: break;
  }
}

}  // namespace distca
