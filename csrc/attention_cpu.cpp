// Varlen flash-style attention over a CA-task list on the CPU: forward and backward with LSE.
//
// Layouts: q (Nq, Hq, D), k/v (Nk, Hkv, D); Hq = G * Hkv (GQA, query head h reads kv head
// h / G). The entry points convert the operands once to float32 (no copy for float32 inputs)
// and transpose K and V per head, so bf16/fp16 inputs get fp32 accumulation. Memory is
// O(tokens): those copies plus a few tiles per thread, never a score matrix larger than
// kQueryTile x kKeyTile.
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
  int64_t heads, kv_heads, dim, kv_pitch;  // kv_pitch: row length of the transposed K/V
  int64_t group() const { return heads / kv_heads; }
};

// p[i][:] = exp(s[i][:] - shift[i]) on each row's visible keys, exact 0 elsewhere.
// Visible keys of row i: [0, clamp(task.key_end(row0 + i) - j0, 0, nk)).
inline void masked_exp(float* s, int64_t n, int64_t nk, const Task& task, int64_t row0,
                       int64_t j0, const float* shift) {
  for (int64_t i = 0; i < n; ++i) {
    float* si = s + i * kKeyTile;
    const int64_t lim = std::clamp<int64_t>(task.key_end(row0 + i) - j0, 0, nk);
    if (lim > 0 && shift[i] != kNegInf) exp_tile_row(si, shift[i]);
    std::fill(si + (shift[i] == kNegInf ? 0 : lim), si + kKeyTile, 0.0f);
  }
}

inline void scale_tile(float* s, int64_t n, float scale) {
#pragma omp simd
  for (int64_t j = 0; j < n * kKeyTile; ++j) s[j] *= scale;
}

// One backward tile: p = probabilities recomputed from the merged lse and, in dp,
// ds = p * (dO V^T - delta); kt/vt point at (D x keys) rows `pitch` apart.
inline void scores_and_grads(const float* q, const float* dout, int64_t row_stride, int64_t n,
                             int64_t D, const float* kt, const float* vt, int64_t pitch,
                             float scale, const Task& task, int64_t row0, int64_t j0, int64_t nk,
                             const float* lse, const float* delta, float* p, float* dp) {
  std::fill(p, p + n * kKeyTile, 0.0f);
  std::fill(dp, dp + n * kKeyTile, 0.0f);
  gemm_acc(n, kKeyTile, D, q, row_stride, 1, kt, pitch, p, kKeyTile);
  scale_tile(p, n, scale);
  masked_exp(p, n, nk, task, row0, j0, lse);
  gemm_acc(n, kKeyTile, D, dout, row_stride, 1, vt, pitch, dp, kKeyTile);
  for (int64_t i = 0; i < n; ++i) {
    const float* pi = p + i * kKeyTile;
    float* di = dp + i * kKeyTile;
    const float dl = delta[i];
#pragma omp simd
    for (int64_t j = 0; j < kKeyTile; ++j) di[j] = pi[j] * (di[j] - dl);
  }
}

// qs_: (Nq, Hq, D) queries; kt: (Hkv, D, kv_pitch) keys transposed; vf: (Nk, Hkv, D).
void forward_kernel(const float* qs_, const float* kt, const float* vf, float* out, float* lse,
                    const std::vector<Task>& tasks, const std::vector<Block>& blocks, Shape sh,
                    float scale) {
  const int64_t D = sh.dim, qs = sh.heads * D, ks = sh.kv_heads * D;
  const int64_t items = static_cast<int64_t>(blocks.size()) * sh.heads;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> s(kQueryTile * kKeyTile), acc(kQueryTile * D), m(kQueryTile),
        l(kQueryTile), mx(kQueryTile), vtile(kKeyTile * D), qtile(kQueryTile * D),
        ktile(D * kKeyTile);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const Block& blk = blocks[item / sh.heads];
      const int64_t h = item % sh.heads, kvh = h / sh.group(), n = blk.end - blk.start;
      for (int64_t i = 0; i < n; ++i) {
        std::copy_n(qs_ + (blk.start + i) * qs + h * D, D, qtile.data() + i * D);
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.0f);
      for (int32_t t : blk.tasks) {
        const Task& task = tasks[t];
        const int64_t kv_end = std::min(task.kb, task.key_end(blk.end - 1));
        for (int64_t j0 = task.ka; j0 < kv_end; j0 += kKeyTile) {
          const int64_t nk = std::min(kKeyTile, kv_end - j0);
          std::fill(s.begin(), s.end(), 0.0f);
          const float* kt_src = kt + kvh * D * sh.kv_pitch + j0;
          for (int64_t d = 0; d < D; ++d) {
            std::copy_n(kt_src + d * sh.kv_pitch, kKeyTile, ktile.data() + d * kKeyTile);
          }
          gemm_acc(n, kKeyTile, D, qtile.data(), D, 1, ktile.data(), kKeyTile, s.data(),
                   kKeyTile);
          scale_tile(s.data(), n, scale);
          for (int64_t i = 0; i < n; ++i) {  // new running max per row; rescale what we had
            const int64_t lim = std::clamp<int64_t>(task.key_end(blk.start + i) - j0, 0, nk);
            mx[i] = row_max(s.data() + i * kKeyTile, lim, m[i]);
            if (mx[i] != m[i] && m[i] != kNegInf) {
              const float alpha = std::exp(m[i] - mx[i]);
              l[i] *= alpha;
#pragma omp simd
              for (int64_t d = 0; d < D; ++d) acc[i * D + d] *= alpha;
            }
            m[i] = mx[i];
          }
          masked_exp(s.data(), n, nk, task, blk.start, j0, mx.data());
          for (int64_t i = 0; i < n; ++i) l[i] += row_sum(s.data() + i * kKeyTile);
          // A contiguous copy of the V tile: its rows are ks floats apart in vf, a stride that
          // maps the whole tile onto a few L1 sets.
          for (int64_t j = 0; j < nk; ++j) std::copy_n(vf + (j0 + j) * ks + kvh * D, D, vtile.data() + j * D);
          gemm_acc(n, D, nk, s.data(), kKeyTile, 1, vtile.data(), D, acc.data(), D);
        }
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = blk.start + i;
        const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
        for (int64_t d = 0; d < D; ++d) out[r * qs + h * D + d] = acc[i * D + d] * inv;
        lse[r * sh.heads + h] = l[i] > 0.0f ? m[i] + std::log(l[i]) : kNegInf;
      }
    }
  }
}

// qs_/dof: (Nq, Hq, D) queries and output gradients; kt/vt: (Hkv, D, kv_pitch); kf:
// (Nk, Hkv, D) keys. dq/dk/dv are float32, written only in the group's rows; dq comes out
// unscaled (the caller multiplies by the softmax scale), dk is scaled here.
void backward_kernel(const float* qs_, const float* dof, const float* kt, const float* vt,
                     const float* kf, const float* lse, const float* delta, float* dq,
                     float* dk, float* dv, const std::vector<Task>& tasks,
                     const std::vector<std::vector<Block>>& group_blocks, Shape sh,
                     float scale) {
  const int64_t D = sh.dim, qs = sh.heads * D, ks = sh.kv_heads * D;
  const int64_t items = static_cast<int64_t>(group_blocks.size()) * sh.kv_heads;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> p(kQueryTile * kKeyTile), dp(kQueryTile * kKeyTile),
        dk_tile(kKeyTile * D), dv_tile(kKeyTile * D), L(kQueryTile), dl(kQueryTile),
        ktile(D * kKeyTile), vtile(D * kKeyTile), krows(kKeyTile * D), qtile(kQueryTile * D),
        gtile(kQueryTile * D), dq_tile(kQueryTile * D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t kvh = item % sh.kv_heads;
      for (const Block& blk : group_blocks[item / sh.kv_heads]) {
        const int64_t j0 = blk.start, nk = blk.end - blk.start;
        // Contiguous tiles: the strides of the full tensors map a tile onto few L1 sets.
        for (int64_t d = 0; d < D; ++d) {
          std::copy_n(kt + (kvh * D + d) * sh.kv_pitch + j0, kKeyTile, ktile.data() + d * kKeyTile);
          std::copy_n(vt + (kvh * D + d) * sh.kv_pitch + j0, kKeyTile, vtile.data() + d * kKeyTile);
        }
        for (int64_t j = 0; j < nk; ++j) {
          std::copy_n(kf + (j0 + j) * ks + kvh * D, D, krows.data() + j * D);
        }
        std::fill(dk_tile.begin(), dk_tile.end(), 0.0f);
        std::fill(dv_tile.begin(), dv_tile.end(), 0.0f);
        for (int64_t h = kvh * sh.group(); h < (kvh + 1) * sh.group(); ++h) {
          for (int32_t t : blk.tasks) {
            const Task& task = tasks[t];
            for (int64_t i0 = task.first_query(j0); i0 < task.qb; i0 += kQueryTile) {
              const int64_t n = std::min(kQueryTile, task.qb - i0);
              for (int64_t i = 0; i < n; ++i) {
                std::copy_n(qs_ + (i0 + i) * qs + h * D, D, qtile.data() + i * D);
                std::copy_n(dof + (i0 + i) * qs + h * D, D, gtile.data() + i * D);
                L[i] = lse[(i0 + i) * sh.heads + h];
                dl[i] = delta[(i0 + i) * sh.heads + h];
              }
              std::fill(dq_tile.begin(), dq_tile.end(), 0.0f);
              scores_and_grads(qtile.data(), gtile.data(), D, n, D, ktile.data(), vtile.data(),
                               kKeyTile, scale, task, i0, j0, nk, L.data(), dl.data(), p.data(),
                               dp.data());
              // dV += P^T dO, dK += dS^T Q (A is the transposed score tile), and dQ += dS K
              // into this group's own rows; both still lack the softmax scale.
              gemm_acc(nk, D, n, p.data(), 1, kKeyTile, gtile.data(), D, dv_tile.data(), D);
              gemm_acc(nk, D, n, dp.data(), 1, kKeyTile, qtile.data(), D, dk_tile.data(), D);
              gemm_acc(n, D, nk, dp.data(), kKeyTile, 1, krows.data(), D, dq_tile.data(), D);
              for (int64_t i = 0; i < n; ++i) {
                float* dst = dq + (i0 + i) * qs + h * D;
                const float* src = dq_tile.data() + i * D;
#pragma omp simd
                for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
              }
            }
          }
        }
        for (int64_t j = 0; j < nk; ++j) {
          float* dst = dk + (j0 + j) * ks + kvh * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = dk_tile[j * D + d] * scale;
          std::copy_n(dv_tile.data() + j * D, D, dv + (j0 + j) * ks + kvh * D);
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
  return {q.size(1), k.size(1), q.size(2), k.size(0) + kKeyTile};
}

// (Nk, Hkv, D) -> float32 (Hkv, D, Nk + kKeyTile): tiles may read past the last key (masked).
torch::Tensor transposed_padded(const torch::Tensor& x) {
  auto t = torch::zeros({x.size(1), x.size(2), x.size(0) + kKeyTile}, x.options().dtype(at::kFloat));
  t.narrow(2, 0, x.size(0)).copy_(x.permute({1, 2, 0}));
  return t;
}

// float32 and contiguous; no copy when it already is.
torch::Tensor as_float(const torch::Tensor& x) { return x.to(at::kFloat).contiguous(); }

std::vector<torch::Tensor> forward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                   torch::Tensor q_ranges, torch::Tensor kv_ranges,
                                   torch::Tensor causal, double scale) {
  const Shape sh = check_inputs(q, k, v);
  const auto tasks = read_tasks(q_ranges, kv_ranges, causal);
  const auto blocks = make_blocks(tasks, /*by_kv=*/false, kQueryTile);
  const auto qf = as_float(q), kt = transposed_padded(k), vf = as_float(v);
  auto out = torch::zeros(q.sizes(), q.options().dtype(at::kFloat));
  auto lse = torch::full({q.size(0), sh.heads}, kNegInf, q.options().dtype(at::kFloat));
  forward_kernel(qf.data_ptr<float>(), kt.data_ptr<float>(), vf.data_ptr<float>(),
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
    group_blocks.push_back(make_blocks(tasks, /*by_kv=*/true, kKeyTile, &group));
  }
  const auto qf = as_float(q), dof = as_float(dout), kf = as_float(k);
  const auto kt = transposed_padded(k), vt = transposed_padded(v);
  const auto f32 = q.options().dtype(at::kFloat);
  auto dq = torch::zeros(q.sizes(), f32), dk = torch::zeros(k.sizes(), f32),
       dv = torch::zeros(v.sizes(), f32);
  backward_kernel(qf.data_ptr<float>(), dof.data_ptr<float>(), kt.data_ptr<float>(),
                  vt.data_ptr<float>(), kf.data_ptr<float>(), lse.data_ptr<float>(),
                  delta.data_ptr<float>(), dq.data_ptr<float>(), dk.data_ptr<float>(),
                  dv.data_ptr<float>(), tasks, group_blocks, sh, static_cast<float>(scale));
  dq.mul_(scale);
  const auto dt = q.scalar_type();
  return {dq.to(dt), dk.to(dt), dv.to(dt)};
}

}  // namespace
}  // namespace distca

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "distca varlen CA-task attention for the CPU (forward/backward with LSE)";
  m.def("forward", &distca::forward, "(out, lse) of a varlen task list");
  m.def("backward", &distca::backward, "(dq, dk, dv) given merged lse and delta");
}
