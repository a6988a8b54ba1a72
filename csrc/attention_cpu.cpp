// Varlen flash-style attention over a CA-task list on the CPU: forward and backward with LSE.
//
// Layouts: q (Nq, Hq, D), k/v (Nk, Hkv, D); Hq = G * Hkv (GQA, query head h reads kv head
// h / G). The entry points convert bf16/fp16 operands once to float32 (no copy for float32),
// so every product accumulates in fp32. Memory is O(tokens): those copies and a few tiles per
// thread; never a score matrix larger than kKeyTile x kQueryTile.
//
// Score tiles are transposed, S^T = K Q^T (keys x queries), so that the queries lie along the
// vector lanes (see tile_math.h). Q is pre-multiplied by scale * log2(e), so probabilities are
// exp2(S^T - m); lse goes back to natural log at the end.
//
// Forward: one work item per (query block, head) runs an online softmax over the keys of every
// task covering the block, so a row's tasks are merged in the same pass; each packed key/value
// tile serves the block's kSpan query tiles. Backward (given the
// merged lse and delta = rowsum(dO * O) - dlse, the ring-attention identity): one work item
// per (independent task group, kv head) walks the group's key blocks, keeps dk/dv of the block's
// kSpan key tiles in tiles, packs each query tile once per block and adds dq into the output; groups share no rows, so threads never share a write.
// Causal tasks skip the micro-blocks (6 rows x 16 columns) that their mask hides entirely,
// and the exp of 8-query groups it hides. Tiles move between row-major and transposed
// layouts in 8 x 8 register blocks (transpose8).
#include <omp.h>

#include <limits>
#include <utility>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "huge_pages.h"
#include "tile_math.h"
#include "tile_packing.h"
#include "varlen_tasks.h"

namespace distca {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Tiles of one side that share each packed tile of the other side: query tiles per forward
// block, key tiles per backward block. Reuse cuts the gathers of rows kilobytes apart (costly
// in L3 and TLB misses) by this factor.
constexpr int64_t kSpan = 4;

struct Shape {
  int64_t heads, kv_heads, dim;
  int64_t group() const { return heads / kv_heads; }
};

// Running state of one query tile in the forward: queries transposed and scaled, the output
// accumulator transposed, and the per-query running max (log2 units) and sum.
struct QueryTile {
  std::vector<float> qt, acc, m, l;  // acc has Dp rows, so that 8 x 8 blocks can read it
  QueryTile(int64_t D, int64_t Dp)
      : qt(D * kQueryTile), acc(Dp * kQueryTile), m(kQueryTile), l(kQueryTile) {}
};

// Fold one key tile (keys/vals: nk x D) of `task` into query tile s (queries i0.., nq lanes).
void forward_tile(QueryTile& s, float* st, float* alpha, const float* keys, const float* vals,
                  int64_t nk, int64_t nq, int64_t D, const Task& task, int64_t i0, int64_t j0) {
  transposed_scores(st, keys, D, s.qt.data(), nk, nq, D, task, i0, j0);
  // Online softmax down the columns: mask, running max, rescale, exponentiate.
  for (int64_t c = 0; c < nq; c += 8) {
    const i32x8 lanes = lane_ids(c);
    const f32x8 m_old = load8(s.m.data() + c);
    f32x8 mx = m_old;
    for (int64_t j = 0; j < nk; ++j) {
      float* sc = st + j * kQueryTile + c;
      const int32_t first = static_cast<int32_t>(first_column(task, i0, j0, j, nq));
      const f32x8 v = lanes < first ? splat8(kNegInf) : load8(sc);
      store8(sc, v);
      mx = v > mx ? v : mx;
    }
    const f32x8 shift = mx == kNegInf ? f32x8{} : mx;  // nothing seen yet: p = 0
    const f32x8 a = exp2_8(m_old - shift);
    f32x8 sum = load8(s.l.data() + c) * a;
    for (int64_t j = 0; j < nk; ++j) {
      float* sc = st + j * kQueryTile + c;
      if (c + 8 <= first_column(task, i0, j0, j, nq)) {  // causally hidden: no exp needed
        store8(sc, f32x8{});
        continue;
      }
      const f32x8 p = exp2_8(load8(sc) - shift);
      store8(sc, p);
      sum += p;
    }
    store8(s.m.data() + c, mx);
    store8(s.l.data() + c, sum);
    store8(alpha + c, a);
  }
  for (int64_t d = 0; d < D; ++d) {
    float* row = s.acc.data() + d * kQueryTile;
    for (int64_t c = 0; c < nq; c += 8) store8(row + c, load8(row + c) * load8(alpha + c));
  }
  // acc (D x nq) += V^T P^T; a column block stops at the last key its queries see.
  gemm_tiles<true>(D, nq, vals, 1, D, st, kQueryTile, s.acc.data(), kQueryTile,
                   [&](int64_t, int, int64_t c) {
                     return Range{0, visible_keys(task, i0, j0, c + kLanes2 - 1, nk)};
                   });
}

// qf: (Nq, Hq, D) queries; kf/vf: (Nk, Hkv, D) keys and values, all float32. Blocks have up
// to kSpan query tiles, which share each packed key/value tile.
void forward_kernel(const float* qf, const float* kf, const float* vf, float* out, float* lse,
                    const std::vector<Task>& tasks, const std::vector<Block>& blocks, Shape sh,
                    float scale) {
  const int64_t D = sh.dim, Dp = round_up16(D), qs = sh.heads * D, ks = sh.kv_heads * D;
  const int64_t items = static_cast<int64_t>(blocks.size()) * sh.heads;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<QueryTile> tiles(kSpan, QueryTile(D, Dp));
    std::vector<float> st(kKeyTile * kQueryTile), rows(kQueryTile * Dp), keys(kKeyTile * D),
        vals(kKeyTile * D), alpha(kQueryTile);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const Block& blk = blocks[item / sh.heads];
      const int64_t h = item % sh.heads, kvh = h / sh.group();
      const int64_t n_tiles = (blk.end - blk.start + kQueryTile - 1) / kQueryTile;
      // The next item is likely this block's next head: prefetch its rows (pack_rows).
      const int64_t next_q = h + 1 < sh.heads ? D : 0;
      const int64_t next_kv = h % sh.group() == sh.group() - 1 && kvh + 1 < sh.kv_heads ? D : 0;
      auto tile_rows = [&](int64_t s) {  // [first, end) query rows of tile s
        const int64_t a = blk.start + s * kQueryTile;
        return Range{a, std::min(a + kQueryTile, blk.end)};
      };
      for (int64_t s = 0; s < n_tiles; ++s) {
        const auto [a, e] = tile_rows(s);
        const int64_t nq = round_up16(e - a);
        pack_query_rows(rows.data(), qf + a * qs + h * D, qs, e - a, nq, D, Dp, next_q);
        transpose_tile(tiles[s].qt.data(), rows.data(), Dp, nq, D, scale * kLog2e);
        std::fill(tiles[s].acc.begin(), tiles[s].acc.end(), 0.0f);
        std::fill(tiles[s].m.begin(), tiles[s].m.end(), kNegInf);
        std::fill(tiles[s].l.begin(), tiles[s].l.end(), 0.0f);
      }
      for (int32_t t : blk.tasks) {
        const Task& task = tasks[t];
        const int64_t kv_end = std::min(task.kb, task.key_end(blk.end - 1));
        for (int64_t j0 = task.ka; j0 < kv_end; j0 += kKeyTile) {
          const int64_t nk = std::min(kKeyTile, kv_end - j0);
          // Contiguous copies: rows ks floats apart would map a tile onto a few L1 sets.
          pack_rows(keys.data(), D, kf + j0 * ks + kvh * D, ks, nk, D, D, next_kv);
          pack_rows(vals.data(), D, vf + j0 * ks + kvh * D, ks, nk, D, D, next_kv);
          const int64_t next = std::clamp<int64_t>(kv_end - j0 - kKeyTile, 0, kKeyTile);
          prefetch_rows(kf + (j0 + kKeyTile) * ks + kvh * D, ks, next, D);
          prefetch_rows(vf + (j0 + kKeyTile) * ks + kvh * D, ks, next, D);
          for (int64_t s = 0; s < n_tiles; ++s) {
            const auto [a, e] = tile_rows(s);
            const int64_t seen = std::min(nk, std::min(task.kb, task.key_end(e - 1)) - j0);
            if (seen <= 0) continue;
            forward_tile(tiles[s], st.data(), alpha.data(), keys.data(), vals.data(), seen,
                         round_up16(e - a), D, task, a, j0);
          }
        }
      }
      for (int64_t s = 0; s < n_tiles; ++s) {
        const auto [a, e] = tile_rows(s);
        const QueryTile& qt = tiles[s];
        f32x8 rows8[8];
        for (int64_t i = 0; i < e - a; i += 8) {
          const f32x8 l = load8(qt.l.data() + i);
          const f32x8 inv = l > 0.0f ? 1.0f / l : f32x8{};
          const int64_t n8 = std::min<int64_t>(8, e - a - i);
          for (int64_t d = 0; d < D; d += 8) {
            transpose8(qt.acc.data() + d * kQueryTile + i, kQueryTile, rows8);
            for (int64_t c = 0; c < n8; ++c) {
              const f32x8 o = rows8[c] * inv[c];
              float* dst = out + (a + i + c) * qs + h * D + d;
              if (d + 8 <= D) {
                store8(dst, o);
              } else {
                for (int64_t x = 0; x < D - d; ++x) dst[x] = o[x];
              }
            }
          }
        }
        for (int64_t i = 0; i < e - a; ++i) {
          lse[(a + i) * sh.heads + h] =
              qt.l[i] > 0.0f ? (qt.m[i] + std::log2(qt.l[i])) * kLn2 : kNegInf;
        }
      }
    }
  }
}

// One packed key tile of the backward with its dk/dv accumulators, (nk x Dp) row-major.
struct KeyTile {
  std::vector<float> keys, vals, dk, dv;
  explicit KeyTile(int64_t Dp) : keys(kKeyTile * Dp), vals(kKeyTile * Dp), dk(kKeyTile * Dp), dv(kKeyTile * Dp) {}
};

// The packed query tile of the backward and the scratch score tiles; row-major tiles are
// padded to Dp (a multiple of 16) columns.
struct QueryGrads {
  std::vector<float> qt, dot, qrows, dorows, p, ds, dq, lse2, delta;
  QueryGrads(int64_t D, int64_t Dp)
      : qt(D * kQueryTile), dot(D * kQueryTile), qrows(kQueryTile * Dp),
        dorows(kQueryTile * Dp), p(kKeyTile * kQueryTile), ds(kKeyTile * kQueryTile),
        dq(kQueryTile * Dp), lse2(kQueryTile), delta(kQueryTile) {}
};

struct BackwardInputs {
  const float *q, *dout, *k, *v, *lse, *delta;
  float *dq, *dk, *dv;
  Shape sh;
  float scale;
};

// Pack query rows [i0, i0 + n) of head h: rows, transposes (queries scaled by scale * log2 e),
// lse in log2 units and delta; the padding lanes get values that keep the products finite.
void pack_query_tile(const BackwardInputs& in, QueryGrads& w, int64_t h, int64_t i0, int64_t n,
                     int64_t next) {
  const int64_t D = in.sh.dim, Dp = round_up16(D), nq = round_up16(n), qs = in.sh.heads * D;
  const int64_t ahead = h + 1 < in.sh.heads ? D : 0;  // the next head's rows (pack_rows)
  pack_query_rows(w.qrows.data(), in.q + i0 * qs + h * D, qs, n, nq, D, Dp, ahead);
  pack_query_rows(w.dorows.data(), in.dout + i0 * qs + h * D, qs, n, nq, D, Dp, ahead);
  prefetch_rows(in.q + (i0 + kQueryTile) * qs + h * D, qs, next, D);
  prefetch_rows(in.dout + (i0 + kQueryTile) * qs + h * D, qs, next, D);
  transpose_tile(w.qt.data(), w.qrows.data(), Dp, nq, D, in.scale * kLog2e);
  transpose_tile(w.dot.data(), w.dorows.data(), Dp, nq, D, 1.0f);
  for (int64_t i = 0; i < nq; ++i) {
    const float l = i < n ? in.lse[(i0 + i) * in.sh.heads + h] : kNegInf;
    w.lse2[i] = l == kNegInf ? 0.0f : l * kLog2e;  // rows that see nothing are masked anyway
    w.delta[i] = i < n ? in.delta[(i0 + i) * in.sh.heads + h] : 0.0f;
  }
}

// One (key tile x query tile) step: recompute P^T from lse, dS^T = P^T (dP^T - delta) * scale,
// then dV += P^T dO, dK += dS^T Q into the key tile and dQ += dS K into w.dq. Scaling dS by
// the softmax scale makes dq and dk come out final.
void backward_tile(KeyTile& kt, QueryGrads& w, const Task& task, int64_t i0, int64_t n,
                   int64_t j0, int64_t nk, int64_t D, float scale) {
  const int64_t Dp = round_up16(D), nq = round_up16(n);
  transposed_scores(w.p.data(), kt.keys.data(), Dp, w.qt.data(), nk, nq, D, task, i0, j0);
  transposed_scores(w.ds.data(), kt.vals.data(), Dp, w.dot.data(), nk, nq, D, task, i0, j0);
  for (int64_t j = 0; j < nk; ++j) {
    const int32_t first = static_cast<int32_t>(first_column(task, i0, j0, j, nq));
    float* pj = w.p.data() + j * kQueryTile;
    float* dj = w.ds.data() + j * kQueryTile;
    std::fill(pj, pj + std::min<int64_t>(first / 8 * 8, nq), 0.0f);  // hidden 8-lane groups
    std::fill(dj, dj + std::min<int64_t>(first / 8 * 8, nq), 0.0f);
    for (int64_t c = first / 8 * 8; c < nq; c += 8) {
      const i32x8 hidden = lane_ids(c) < first;
      const f32x8 p = hidden ? f32x8{} : exp2_8(load8(pj + c) - load8(w.lse2.data() + c));
      const f32x8 ds = p * (load8(dj + c) - load8(w.delta.data() + c)) * scale;
      store8(pj + c, p);
      store8(dj + c, hidden ? f32x8{} : ds);
    }
  }
  // dV (nk x Dp) += P^T dO and dK += dS^T Q: a key band starts at its first visible query.
  const auto from_first = [&](int64_t j, int, int64_t) {
    return Range{first_column(task, i0, j0, j, n), n};
  };
  gemm_tiles<true>(nk, Dp, w.p.data(), kQueryTile, 1, w.dorows.data(), Dp, kt.dv.data(), Dp,
                   from_first);
  gemm_tiles<true>(nk, Dp, w.ds.data(), kQueryTile, 1, w.qrows.data(), Dp, kt.dk.data(), Dp,
                   from_first);
  // dQ (n x Dp) += dS K (A is dS^T read transposed); a query band stops at its last key.
  gemm_tiles<true>(n, Dp, w.ds.data(), 1, kQueryTile, kt.keys.data(), Dp, w.dq.data(), Dp,
                   [&](int64_t i, int rows, int64_t) {
                     return Range{0, visible_keys(task, i0, j0, i + rows - 1, nk)};
                   });
}

// Blocks have up to kSpan key tiles, which share each packed query tile. dq/dk/dv are float32
// and written only in the rows of the group's blocks.
void backward_kernel(const BackwardInputs& in, const std::vector<Task>& tasks,
                     const std::vector<std::vector<Block>>& group_blocks) {
  const Shape sh = in.sh;
  const int64_t D = sh.dim, Dp = round_up16(D), qs = sh.heads * D, ks = sh.kv_heads * D;
  const int64_t items = static_cast<int64_t>(group_blocks.size()) * sh.kv_heads;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<KeyTile> tiles(kSpan, KeyTile(Dp));
    QueryGrads w(D, Dp);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t kvh = item % sh.kv_heads;
      for (const Block& blk : group_blocks[item / sh.kv_heads]) {
        const int64_t n_tiles = (blk.end - blk.start + kKeyTile - 1) / kKeyTile;
        for (int64_t u = 0; u < n_tiles; ++u) {
          const int64_t j0 = blk.start + u * kKeyTile, nk = std::min(kKeyTile, blk.end - j0);
          const int64_t ahead = kvh + 1 < sh.kv_heads ? D : 0;  // the next item's rows
          pack_rows(tiles[u].keys.data(), Dp, in.k + j0 * ks + kvh * D, ks, nk, D, Dp, ahead);
          pack_rows(tiles[u].vals.data(), Dp, in.v + j0 * ks + kvh * D, ks, nk, D, Dp, ahead);
          std::fill(tiles[u].dk.begin(), tiles[u].dk.end(), 0.0f);
          std::fill(tiles[u].dv.begin(), tiles[u].dv.end(), 0.0f);
        }
        for (int64_t h = kvh * sh.group(); h < (kvh + 1) * sh.group(); ++h) {
          for (int32_t t : blk.tasks) {
            const Task& task = tasks[t];
            for (int64_t i0 = task.first_query(blk.start); i0 < task.qb; i0 += kQueryTile) {
              const int64_t n = std::min(kQueryTile, task.qb - i0);
              pack_query_tile(in, w, h, i0, n,
                              std::clamp<int64_t>(task.qb - i0 - kQueryTile, 0, kQueryTile));
              std::fill(w.dq.begin(), w.dq.end(), 0.0f);
              for (int64_t u = 0; u < n_tiles; ++u) {
                const int64_t j0 = blk.start + u * kKeyTile;
                if (task.key_end(i0 + n - 1) <= j0) break;  // causal: later tiles unseen too
                backward_tile(tiles[u], w, task, i0, n, j0, std::min(kKeyTile, blk.end - j0), D,
                              in.scale);
              }
              for (int64_t i = 0; i < n; ++i) {
                float* dst = in.dq + (i0 + i) * qs + h * D;
                const float* src = w.dq.data() + i * Dp;
#pragma omp simd
                for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
              }
            }
          }
        }
        for (int64_t u = 0; u < n_tiles; ++u) {
          const int64_t j0 = blk.start + u * kKeyTile, nk = std::min(kKeyTile, blk.end - j0);
          for (int64_t j = 0; j < nk; ++j) {
            std::copy_n(tiles[u].dk.data() + j * Dp, D, in.dk + (j0 + j) * ks + kvh * D);
            std::copy_n(tiles[u].dv.data() + j * Dp, D, in.dv + (j0 + j) * ks + kvh * D);
          }
        }
      }
    }
  }
}

Shape check_inputs(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "distca cpp attention runs on CPU tensors");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.sizes() == v.sizes(), "bad q/k/v shapes");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k, v must share one dtype");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "distca cpp attention supports float32, bfloat16 and float16, got ", dt);
  TORCH_CHECK(q.size(2) == k.size(2) && q.size(2) <= 256, "head dim must match and be <= 256");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "query heads must be a multiple of kv heads");
  return {q.size(1), k.size(1), q.size(2)};
}

// float32 and contiguous; no copy when it already is.
torch::Tensor as_float(const torch::Tensor& x) { return x.to(at::kFloat).contiguous(); }

std::vector<torch::Tensor> forward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                   torch::Tensor q_ranges, torch::Tensor kv_ranges,
                                   torch::Tensor causal, double scale) {
  const Shape sh = check_inputs(q, k, v);
  const auto tasks = read_tasks(q_ranges, kv_ranges, causal);
  const auto blocks = make_blocks(tasks, /*by_kv=*/false, kSpan * kQueryTile);
  const auto qf = as_float(q), kf = as_float(k), vf = as_float(v);
  auto out = zeros_on_huge_pages(q.sizes());
  auto lse = torch::full({q.size(0), sh.heads}, kNegInf, q.options().dtype(at::kFloat));
  forward_kernel(qf.data_ptr<float>(), kf.data_ptr<float>(), vf.data_ptr<float>(),
                 out.data_ptr<float>(), lse.data_ptr<float>(), tasks, blocks, sh,
                 static_cast<float>(scale));
  return {out.to(q.scalar_type()), lse};
}

std::vector<torch::Tensor> backward(torch::Tensor dout, torch::Tensor q, torch::Tensor k,
                                    torch::Tensor v, torch::Tensor lse, torch::Tensor delta,
                                    torch::Tensor q_ranges, torch::Tensor kv_ranges,
                                    torch::Tensor causal, double scale) {
  const Shape sh = check_inputs(q, k, v);
  TORCH_CHECK(dout.sizes() == q.sizes(), "dout must have the shape of q");
  lse = lse.to(at::kFloat).contiguous(), delta = delta.to(at::kFloat).contiguous();
  const auto tasks = read_tasks(q_ranges, kv_ranges, causal);
  std::vector<std::vector<Block>> group_blocks;
  for (const auto& group : independent_groups(tasks)) {
    group_blocks.push_back(make_blocks(tasks, /*by_kv=*/true, kSpan * kKeyTile, &group));
  }
  const auto qf = as_float(q), dof = as_float(dout), kf = as_float(k), vf = as_float(v);
  auto dq = zeros_on_huge_pages(q.sizes()), dk = zeros_on_huge_pages(k.sizes()),
       dv = zeros_on_huge_pages(v.sizes());
  const BackwardInputs in{qf.data_ptr<float>(),    dof.data_ptr<float>(), kf.data_ptr<float>(),
                          vf.data_ptr<float>(),    lse.data_ptr<float>(), delta.data_ptr<float>(),
                          dq.data_ptr<float>(),    dk.data_ptr<float>(),  dv.data_ptr<float>(),
                          sh,                      static_cast<float>(scale)};
  backward_kernel(in, tasks, group_blocks);
  const auto dt = q.scalar_type();
  return {dq.to(dt), dk.to(dt), dv.to(dt)};
}

}  // namespace
}  // namespace distca

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "distca varlen CA-task attention for the CPU (forward/backward with LSE)";
  m.def("forward", &distca::forward, "(out, lse) of a varlen task list");
  m.def("backward", &distca::backward, "(dq, dk, dv) given merged lse and delta");
  // the digest of the sources it was built from (setup.py), so a stale build is noticed
  m.attr("SOURCES_DIGEST") = DISTCA_SOURCES_DIGEST;
}
