// Varlen CA-task lists for the CPU attention kernels: tasks, visibility and row blocks.
//
// A task lets query rows [qa, qb) see key rows [ka, kb), fully or causally; causal masks are
// aligned bottom-right, so query row r sees keys [ka, kb - qb + r + 1). The kernels never loop
// over tasks in parallel (two tasks may share query or key rows); they loop over *blocks*: runs
// of at most kBlock rows on one side (query rows for the forward and dq, key rows for dk/dv)
// that are covered by the same set of tasks. Blocks are disjoint, so each parallel work item
// owns its output rows and no two threads ever write the same row.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include <torch/extension.h>

namespace distca {

struct Task {
  int64_t qa, qb, ka, kb;
  bool causal;

  // Exclusive end of the keys query row r sees (<= ka: none).
  int64_t key_end(int64_t r) const { return causal ? kb - qb + r + 1 : kb; }
  // First query row that sees key row j (rows [first_query(j), qb) see it).
  int64_t first_query(int64_t j) const { return causal ? std::max(qa, j - kb + qb) : qa; }
};

struct Block {
  int64_t start, end;           // rows [start, end) on the blocked side
  std::vector<int32_t> tasks;   // every task covering those rows
};

inline std::vector<Task> read_tasks(const torch::Tensor& q_ranges, const torch::Tensor& kv_ranges,
                                    const torch::Tensor& causal) {
  auto q = q_ranges.accessor<int64_t, 2>();
  auto kv = kv_ranges.accessor<int64_t, 2>();
  auto c = causal.accessor<bool, 1>();
  std::vector<Task> tasks;
  tasks.reserve(q.size(0));
  for (int64_t t = 0; t < q.size(0); ++t) {
    tasks.push_back({q[t][0], q[t][1], kv[t][0], kv[t][1], c[t]});
  }
  return tasks;
}

// Cut the query side (by_kv = false) or key side (by_kv = true) into blocks of at most
// block_rows rows, each covered by one fixed set of non-empty tasks (of `subset`, if given).
// O(T log T + blocks * cover).
inline std::vector<Block> make_blocks(const std::vector<Task>& tasks, bool by_kv,
                                      int64_t block_rows, const std::vector<int32_t>* subset = nullptr) {
  auto lo = [&](int32_t t) { return by_kv ? tasks[t].ka : tasks[t].qa; };
  auto hi = [&](int32_t t) { return by_kv ? tasks[t].kb : tasks[t].qb; };
  std::vector<int32_t> order;
  std::vector<int64_t> cuts;
  const int32_t T = static_cast<int32_t>(subset ? subset->size() : tasks.size());
  for (int32_t i = 0; i < T; ++i) {
    const int32_t t = subset ? (*subset)[i] : i;
    const Task& k = tasks[t];
    if (k.qb > k.qa && k.kb > k.ka) {
      order.push_back(t);
      cuts.push_back(lo(t));
      cuts.push_back(hi(t));
    }
  }
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return lo(a) < lo(b); });
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());

  std::vector<Block> blocks;
  std::vector<int32_t> active;
  size_t next = 0;
  for (size_t s = 0; s + 1 < cuts.size(); ++s) {
    const int64_t begin = cuts[s], end = cuts[s + 1];
    while (next < order.size() && lo(order[next]) <= begin) active.push_back(order[next++]);
    active.erase(std::remove_if(active.begin(), active.end(),
                                [&](int32_t t) { return hi(t) <= begin; }),
                 active.end());
    if (active.empty()) continue;
    for (int64_t b = begin; b < end; b += block_rows) {
      blocks.push_back({b, std::min(b + block_rows, end), active});
    }
  }
  return blocks;
}

// Groups of tasks that share no query row and no key row with any other group (for packed
// documents: one group per document), largest first by score pairs. Work on different groups
// never writes the same dq, dk or dv row, so the backward runs one group per work item.
inline std::vector<std::vector<int32_t>> independent_groups(const std::vector<Task>& tasks) {
  const int32_t T = static_cast<int32_t>(tasks.size());
  std::vector<int32_t> parent(T);
  for (int32_t t = 0; t < T; ++t) parent[t] = t;
  auto find = [&](int32_t t) {
    while (parent[t] != t) t = parent[t] = parent[parent[t]];
    return t;
  };
  std::vector<int32_t> live;
  for (int32_t t = 0; t < T; ++t) {
    if (tasks[t].qb > tasks[t].qa && tasks[t].kb > tasks[t].ka) live.push_back(t);
  }
  for (bool by_kv : {false, true}) {  // union tasks whose ranges overlap on this side
    auto lo = [&](int32_t t) { return by_kv ? tasks[t].ka : tasks[t].qa; };
    auto hi = [&](int32_t t) { return by_kv ? tasks[t].kb : tasks[t].qb; };
    std::vector<int32_t> order = live;
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return lo(a) < lo(b); });
    int64_t reach = std::numeric_limits<int64_t>::min();
    int32_t owner = -1;
    for (int32_t t : order) {
      if (owner >= 0 && lo(t) < reach) {
        parent[find(t)] = find(owner);
      } else {
        owner = t;
      }
      reach = std::max(reach, hi(t));
    }
  }
  std::vector<std::vector<int32_t>> groups;
  std::vector<int32_t> slot(T, -1);
  std::vector<double> cost;
  for (int32_t t : live) {
    const int32_t root = find(t);
    if (slot[root] < 0) {
      slot[root] = static_cast<int32_t>(groups.size());
      groups.emplace_back();
      cost.push_back(0.0);
    }
    groups[slot[root]].push_back(t);
    cost[slot[root]] += double(tasks[t].qb - tasks[t].qa) * double(tasks[t].kb - tasks[t].ka);
  }
  std::vector<int32_t> order(groups.size());
  for (size_t g = 0; g < order.size(); ++g) order[g] = static_cast<int32_t>(g);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return cost[a] > cost[b]; });
  std::vector<std::vector<int32_t>> sorted;
  for (int32_t g : order) sorted.push_back(std::move(groups[g]));
  return sorted;
}

}  // namespace distca
