"""Model FLOPs of a training step and the device's peak: the numerator and denominator of MFU,
shared by ``distca profile train`` and the ``distca train`` step log.

Model FLOPs count forward + backward (3 × forward): linear layers ``6 × parameters`` per token
(LM head included, embeddings not) and attention ``3.5 × 4 · heads · head_dim`` per score pair
and layer (the scheduler's cost model).
"""

from __future__ import annotations

import time

from distca.config import DistcaConfig


def model_flops(cfg: DistcaConfig, batches) -> float:
    """Forward + backward FLOPs of one step over ``batches`` (a list of PackedBatch)."""
    from distca.scheduler.documents import build_segments, documents_from_batch
    from distca.scheduler.simulator import ModelSpec

    m = cfg.model
    spec = ModelSpec.of(m)
    linear_per_token = m.num_layers * spec.linear_flops_per_token \
        + 6.0 * m.hidden_size * m.vocab_size  # the LM head
    tokens = pairs = 0
    for b in batches:
        docs = documents_from_batch(b.doc_lengths, b.turn_lengths, b.turn_is_context)
        tokens += int(b.doc_lengths.sum())
        pairs += int(build_segments(docs, b.tokens_per_rank).pairs().sum())
    return tokens * linear_per_token + pairs * m.num_layers * spec.attention_flops_per_pair


def measure_peak_flops(device, size: int | None = None, reps: int = 3) -> float:
    """FLOP/s of the best of ``reps`` square matmuls (fp32 on CPU, bf16 on GPU)."""
    import torch

    cuda = device.type == "cuda"
    size = size or (8192 if cuda else 1024)
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for rep in range(reps + 1):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize()
        if rep:
            best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


def achieved(flops: float, seconds: float, peak_flops: float) -> dict[str, float]:
    """Achieved TFLOP/s and model FLOPs utilisation of ``flops`` done in ``seconds``."""
    rate = flops / max(seconds, 1e-9)
    return {"tflops": rate / 1e12, "mfu": rate / peak_flops}
