// Zero-filled float32 tensors on transparent huge pages, for the kernels' large outputs.
//
// A fresh (S, H, D) float32 output is tens of MiB of new memory every call: glibc maps it
// with mmap and the kernel faults it in 4 KiB at a time. Under a hypervisor each of those
// faults is expensive (measured on the 2-core dev VM: 35 ms to first-touch 32 MiB of 4 KiB
// pages, 5 ms on 2 MiB pages, 3.7 ms to rewrite it warm), which for a batch of short
// documents is a quarter of a forward+backward. Mapping these buffers ourselves, aligned to
// 2 MiB and marked MADV_HUGEPAGE, lets the kernel back them with huge pages where the
// system allows it (THP "madvise" mode is the common default). Fresh anonymous pages read as
// zero, so the tensors need no fill pass either.
#pragma once

#include <cstdint>

#include <torch/extension.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace distca {

constexpr size_t kHugePage = size_t{2} << 20;

// A float32 tensor of `sizes`, all zeros. Buffers of at least one huge page get their own
// 2 MiB-aligned MADV_HUGEPAGE mapping (unmapped when the tensor's storage is freed);
// smaller ones, other systems, or a failed mapping fall back to torch::zeros.
inline torch::Tensor zeros_on_huge_pages(at::IntArrayRef sizes) {
  const auto fallback = [&] { return torch::zeros(sizes, torch::kFloat); };
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * sizeof(float);
  if (bytes < kHugePage) return fallback();
  const size_t span = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  // Map one huge page more than needed, then trim both ends to a 2 MiB-aligned span.
  void* raw = mmap(nullptr, span + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
  if (raw == MAP_FAILED) return fallback();
  const uintptr_t base = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t start = (base + kHugePage - 1) / kHugePage * kHugePage;
  if (start > base) munmap(raw, start - base);
  if (base + kHugePage > start) munmap(reinterpret_cast<void*>(start + span), base + kHugePage - start);
  void* data = reinterpret_cast<void*>(start);
  madvise(data, span, MADV_HUGEPAGE);  // advice only: without THP the pages are 4 KiB
  return torch::from_blob(
      data, sizes, [span](void* p) { munmap(p, span); }, torch::TensorOptions().dtype(torch::kFloat));
#else
  return fallback();
#endif
}

}  // namespace distca
