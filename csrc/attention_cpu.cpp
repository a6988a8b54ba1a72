// Varlen flash-style attention over a CA-task list on the CPU: forward and backward with LSE.
//
// Layouts: q (Nq, Hq, D), k/v (Nk, Hkv, D), contiguous; Hq = G * Hkv (GQA, query head h reads
// kv head h / G). Tiles are converted to float32 and all arithmetic accumulates in float32, so
// bf16/fp16 inputs get fp32 accumulation. Memory is O(tokens): per thread a few tiles, never a
// score matrix larger than kQueryTile x kKeyTile.
//
// Forward: one work item per (query block, head) runs an online softmax over the keys of every
// task covering the block, so a row's tasks are merged in the same pass. Backward (given the
// merged lse and delta = rowsum(dO * O) - dlse, the ring-attention identity): one work item
// per (independent task group, kv head) walks the group's key blocks, keeps dk/dv of the block
// in a tile and adds dq into a float32 buffer; groups share no rows, so threads never share a
// write. Parallelism is groups x kv heads (packed documents: documents x kv heads).
#include <omp.h>

#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "tile_math.h"
#include "varlen_tasks.h"

namespace distca {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Shape {
  int64_t heads, kv_heads, dim;
  int64_t group() const { return heads / kv_heads; }
};

// p[i][:] = exp(s[i][:] - shift[i]) on each row's visible keys, exact 0 elsewhere.
// Visible keys of row i: [0, clamp(task.key_end(row0 + i) - j0, 0, nk)).
inline void masked_exp(float* s, int64_t n, int64_t nk, const Task& task, int64_t row0,
                       int64_t j0, const float* shift) {
  for (int64_t i = 0; i < n; ++i) {
    float* si = s + i * kKeyTile;
    const int64_t lim = std::clamp<int64_t>(task.key_end(row0 + i) - j0, 0, nk);
    const float m = shift[i];
    if (m == kNegInf) {
      std::fill(si, si + kKeyTile, 0.0f);
      continue;
    }
    if (lim > 0) exp_tile_row(si, m);
    std::fill(si + lim, si + kKeyTile, 0.0f);
  }
}

// One backward tile: p = softmax probabilities (recomputed from the merged lse) and, in dp,
// ds = p * (dO V^T - delta). Scores come from the pre-scaled query tile qf.
inline void scores_and_grads(const float* qf, const float* dof, int64_t n, int64_t D,
                             const float* kt, const float* vt, const Task& task, int64_t row0,
                             int64_t j0, int64_t nk, const float* lse, const float* delta,
                             float* p, float* dp) {
  std::fill(p, p + n * kKeyTile, 0.0f);
  std::fill(dp, dp + n * kKeyTile, 0.0f);
  gemm_acc(n, kKeyTile, D, qf, D, 1, kt, kKeyTile, p, kKeyTile);
  masked_exp(p, n, nk, task, row0, j0, lse);
  gemm_acc(n, kKeyTile, D, dof, D, 1, vt, kKeyTile, dp, kKeyTile);
  for (int64_t i = 0; i < n; ++i) {
    const float* pi = p + i * kKeyTile;
    float* di = dp + i * kKeyTile;
    const float dl = delta[i];
#pragma omp simd
    for (int64_t j = 0; j < kKeyTile; ++j) di[j] = pi[j] * (di[j] - dl);
  }
}

template <typename scalar_t>
void forward_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t* out,
                    float* lse, const std::vector<Task>& tasks, const std::vector<Block>& blocks,
                    Shape sh, float scale) {
  const int64_t D = sh.dim, qs = sh.heads * D, ks = sh.kv_heads * D;
  const int64_t items = static_cast<int64_t>(blocks.size()) * sh.heads;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> qf(kQueryTile * D), kt(D * kKeyTile), vr(kKeyTile * D),
        s(kQueryTile * kKeyTile), acc(kQueryTile * D), m(kQueryTile), l(kQueryTile),
        mx(kQueryTile);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const Block& blk = blocks[item / sh.heads];
      const int64_t h = item % sh.heads, kvh = h / sh.group(), n = blk.end - blk.start;
      load_rows(q + blk.start * qs + h * D, qs, n, D, scale, qf.data());
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.0f);
      for (int32_t t : blk.tasks) {
        const Task& task = tasks[t];
        const int64_t kv_end = std::min(task.kb, task.key_end(blk.end - 1));
        for (int64_t j0 = task.ka; j0 < kv_end; j0 += kKeyTile) {
          const int64_t nk = std::min(kKeyTile, kv_end - j0);
          load_transposed(k + j0 * ks + kvh * D, ks, nk, D, kt.data());
          load_rows(v + j0 * ks + kvh * D, ks, nk, D, 1.0f, vr.data());
          std::fill(s.begin(), s.end(), 0.0f);
          gemm_acc(n, kKeyTile, D, qf.data(), D, 1, kt.data(), kKeyTile, s.data(), kKeyTile);
          for (int64_t i = 0; i < n; ++i) {  // new running max per row, rescale what we had
            const int64_t lim = std::clamp<int64_t>(task.key_end(blk.start + i) - j0, 0, nk);
            float row_max = m[i];
            for (int64_t j = 0; j < lim; ++j) row_max = std::max(row_max, s[i * kKeyTile + j]);
            mx[i] = row_max;
            if (row_max != m[i] && m[i] != kNegInf) {
              const float alpha = std::exp(m[i] - row_max);
              l[i] *= alpha;
              for (int64_t d = 0; d < D; ++d) acc[i * D + d] *= alpha;
            }
            m[i] = row_max;
          }
          masked_exp(s.data(), n, nk, task, blk.start, j0, mx.data());
          for (int64_t i = 0; i < n; ++i) {
            const float* pi = s.data() + i * kKeyTile;
            float sum = 0.0f;
            for (int64_t j = 0; j < nk; ++j) sum += pi[j];
            l[i] += sum;
          }
          gemm_acc(n, D, nk, s.data(), kKeyTile, 1, vr.data(), D, acc.data(), D);
        }
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = blk.start + i;
        const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
        store_rows(acc.data() + i * D, 1, D, inv, out + r * qs + h * D, qs);
        lse[r * sh.heads + h] = l[i] > 0.0f ? m[i] + std::log(l[i]) : kNegInf;
      }
    }
  }
}

// dq accumulates in float32 (dq_acc, (Nq, Hq, D)); dk/dv per key block in registers-sized tiles.
template <typename scalar_t>
void backward_kernel(const scalar_t* dout, const scalar_t* q, const scalar_t* k,
                     const scalar_t* v, const float* lse, const float* delta, float* dq_acc,
                     scalar_t* dk, scalar_t* dv, const std::vector<Task>& tasks,
                     const std::vector<std::vector<Block>>& group_blocks, Shape sh,
                     float scale) {
  const int64_t D = sh.dim, qs = sh.heads * D, ks = sh.kv_heads * D;
  const int64_t items = static_cast<int64_t>(group_blocks.size()) * sh.kv_heads;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> qf(kQueryTile * D), dof(kQueryTile * D), kt(D * kKeyTile),
        vt(D * kKeyTile), kr(kKeyTile * D), p(kQueryTile * kKeyTile),
        dp(kQueryTile * kKeyTile), dk_tile(kKeyTile * D), dv_tile(kKeyTile * D),
        L(kQueryTile), dl(kQueryTile);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t kvh = item % sh.kv_heads;
      for (const Block& blk : group_blocks[item / sh.kv_heads]) {
        const int64_t j0 = blk.start, nk = blk.end - blk.start;
        load_transposed(k + j0 * ks + kvh * D, ks, nk, D, kt.data());
        load_transposed(v + j0 * ks + kvh * D, ks, nk, D, vt.data());
        load_rows(k + j0 * ks + kvh * D, ks, nk, D, scale, kr.data());
        std::fill(dk_tile.begin(), dk_tile.end(), 0.0f);
        std::fill(dv_tile.begin(), dv_tile.end(), 0.0f);
        for (int64_t h = kvh * sh.group(); h < (kvh + 1) * sh.group(); ++h) {
          for (int32_t t : blk.tasks) {
            const Task& task = tasks[t];
            for (int64_t i0 = task.first_query(j0); i0 < task.qb; i0 += kQueryTile) {
              const int64_t n = std::min(kQueryTile, task.qb - i0);
              load_rows(q + i0 * qs + h * D, qs, n, D, scale, qf.data());
              load_rows(dout + i0 * qs + h * D, qs, n, D, 1.0f, dof.data());
              for (int64_t i = 0; i < n; ++i) {
                L[i] = lse[(i0 + i) * sh.heads + h];
                dl[i] = delta[(i0 + i) * sh.heads + h];
              }
              scores_and_grads(qf.data(), dof.data(), n, D, kt.data(), vt.data(), task, i0,
                               j0, nk, L.data(), dl.data(), p.data(), dp.data());
              // dV += P^T dO, dK += dS^T (scale Q) (A is the transposed score tile), and
              // dQ += dS (scale K) into this group's own rows.
              gemm_acc(nk, D, n, p.data(), 1, kKeyTile, dof.data(), D, dv_tile.data(), D);
              gemm_acc(nk, D, n, dp.data(), 1, kKeyTile, qf.data(), D, dk_tile.data(), D);
              gemm_acc(n, D, nk, dp.data(), kKeyTile, 1, kr.data(), D, dq_acc + i0 * qs + h * D,
                       qs);
            }
          }
        }
        store_rows(dk_tile.data(), nk, D, 1.0f, dk + j0 * ks + kvh * D, ks);
        store_rows(dv_tile.data(), nk, D, 1.0f, dv + j0 * ks + kvh * D, ks);
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

#define DISTCA_DISPATCH(dtype, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "distca_attention", __VA_ARGS__)

std::vector<torch::Tensor> forward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                   torch::Tensor q_ranges, torch::Tensor kv_ranges,
                                   torch::Tensor causal, double scale) {
  const Shape sh = check_inputs(q, k, v);
  q = q.contiguous(), k = k.contiguous(), v = v.contiguous();
  const auto tasks = read_tasks(q_ranges, kv_ranges, causal);
  const auto blocks = make_blocks(tasks, /*by_kv=*/false, kQueryTile);
  auto out = torch::zeros_like(q);
  auto lse = torch::full({q.size(0), sh.heads}, kNegInf, q.options().dtype(at::kFloat));
  DISTCA_DISPATCH(q.scalar_type(), [&] {
    forward_kernel<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                             v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                             lse.data_ptr<float>(), tasks, blocks, sh, static_cast<float>(scale));
  });
  return {out, lse};
}

std::vector<torch::Tensor> backward(torch::Tensor dout, torch::Tensor q, torch::Tensor k,
                                    torch::Tensor v, torch::Tensor lse, torch::Tensor delta,
                                    torch::Tensor q_ranges, torch::Tensor kv_ranges,
                                    torch::Tensor causal, double scale) {
  const Shape sh = check_inputs(q, k, v);
  TORCH_CHECK(dout.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type(), "bad dout");
  q = q.contiguous(), k = k.contiguous(), v = v.contiguous(), dout = dout.contiguous();
  lse = lse.to(at::kFloat).contiguous(), delta = delta.to(at::kFloat).contiguous();
  const auto tasks = read_tasks(q_ranges, kv_ranges, causal);
  std::vector<std::vector<Block>> group_blocks;
  for (const auto& group : independent_groups(tasks)) {
    group_blocks.push_back(make_blocks(tasks, /*by_kv=*/true, kKeyTile, &group));
  }
  auto dq_acc = torch::zeros(q.sizes(), q.options().dtype(at::kFloat));
  auto dk = torch::zeros_like(k), dv = torch::zeros_like(v);
  DISTCA_DISPATCH(q.scalar_type(), [&] {
    backward_kernel<scalar_t>(dout.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
                              k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                              lse.data_ptr<float>(), delta.data_ptr<float>(),
                              dq_acc.data_ptr<float>(), dk.data_ptr<scalar_t>(),
                              dv.data_ptr<scalar_t>(), tasks, group_blocks, sh,
                              static_cast<float>(scale));
  });
  auto dq = dq_acc.to(q.scalar_type());
  return {dq, dk, dv};
}

}  // namespace
}  // namespace distca

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "distca varlen CA-task attention for the CPU (forward/backward with LSE)";
  m.def("forward", &distca::forward, "(out, lse) of a varlen task list");
  m.def("backward", &distca::backward, "(dq, dk, dv) given merged lse and delta");
}
