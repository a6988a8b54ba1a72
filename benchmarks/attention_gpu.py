"""Core attention on a CUDA GPU: the sink-aware flex path vs the plain flex kernel.

For each layout and sequence length, one process measures side by side (medians of CUDA-event
timings through ``triton.testing.do_bench``, which flushes the L2 between runs):

- ``plain``: ``flex_attention`` alone, compiled, on the same block mask, no LSE and no sink;
- ``sink``: ``core_attention(..., sinks=..., backend="flex")``: the same kernel with the LSE,
  the learnable sink applied after merging, the task-list bookkeeping and the autograd wrapper;
- ``sdpa``: ``scaled_dot_product_attention`` (torch's fused causal kernel) on the one-document
  layout, as a yardstick for the flex kernel itself.

TFLOP/s count only visible (query, key) pairs: 4·pairs·D·Hq forward, 2.5× that backward. The
device's matmul peak is measured in the same run (bf16 8192³). Also reported: the host time to
build the block mask from the task list (once per step in training).

    python benchmarks/attention_gpu.py --out benchmarks/results/attention_gpu.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import layout_tasks  # noqa: E402
from distca.scheduler import attention_flops_per_pair, task_pairs  # noqa: E402

from distca.attention import (
    core_attention,  # noqa: E402
    flex_backend,  # noqa: E402
)
from distca.attention.tasks import causal_document_tasks  # noqa: E402


def median_ms(fn, grad_to_none=None) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=50, rep=200, grad_to_none=grad_to_none,
                          return_mode="median"))


def matmul_peak_tflops(dtype: torch.dtype) -> float:
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=dtype) for _ in range(2))
    return 2 * 8192 ** 3 / median_ms(lambda: a @ b) / 1e9


def make_tasks(layout: str, seq: int):
    return causal_document_tasks([seq]) if layout == "one-doc" else layout_tasks(layout, seq)


def heads_first(x: torch.Tensor, rows: int) -> torch.Tensor:
    """(N, H, D) -> contiguous (1, H, rows, D), zero-padded: plain flex's input layout."""
    return flex_backend._padded(x, rows).transpose(0, 1).unsqueeze(0).contiguous()


def measure(layout: str, seq: int, heads: int, kv_heads: int, dim: int, dtype) -> dict:
    from torch.nn.attention.flex_attention import flex_attention

    tasks = make_tasks(layout, seq)
    gen = torch.Generator(device="cuda").manual_seed(seq)
    q = torch.randn(seq, heads, dim, device="cuda", dtype=dtype, generator=gen)
    k, v = (torch.randn(seq, kv_heads, dim, device="cuda", dtype=dtype, generator=gen)
            for _ in range(2))
    dout = torch.randn_like(q)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    with torch.no_grad():
        plain_lse = core_attention(q, k, v, tasks, None, None, backend="flex")[1]
    sinks = (plain_lse.float().median(0).values + torch.randn(heads, device="cuda")).requires_grad_()

    started = time.perf_counter()
    flex_backend._block_mask(make_tasks(layout, seq), torch.device("cuda"))
    torch.cuda.synchronize()
    mask_ms = (time.perf_counter() - started) * 1e3

    rows = flex_backend.padded_length(seq)
    block_mask = flex_backend._block_mask(tasks, q.device)
    padded = [heads_first(x.detach(), rows).requires_grad_() for x in leaves]
    plain_dout = heads_first(dout, rows)
    compiled = torch.compile(flex_attention, dynamic=False)

    def plain_fwd():
        with torch.no_grad():
            return compiled(*padded, block_mask=block_mask, enable_gqa=heads != kv_heads)

    def plain_fwd_bwd():
        compiled(*padded, block_mask=block_mask, enable_gqa=heads != kv_heads).backward(plain_dout)

    def sink_fwd():
        return core_attention(*leaves, tasks, None, None, sinks=sinks, backend="flex")

    def sink_fwd_bwd():
        out, _ = core_attention(*leaves, tasks, None, None, sinks=sinks, backend="flex")
        out.backward(dout)

    times = {name: median_ms(fn, grads) for name, fn, grads in [
        ("plain_fwd", plain_fwd, None), ("sink_fwd", sink_fwd, None),
        ("plain_fwd_bwd", plain_fwd_bwd, padded),
        ("sink_fwd_bwd", sink_fwd_bwd, [*leaves, sinks])]}
    if layout == "one-doc":
        sq, sk, sv = (heads_first(x.detach(), seq).requires_grad_() for x in leaves)
        sdout = heads_first(dout, seq)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        gqa = dict(enable_gqa=heads != kv_heads)
        with torch.no_grad():
            times["sdpa_fwd"] = median_ms(lambda: sdpa(sq, sk, sv, is_causal=True, **gqa))
        times["sdpa_fwd_bwd"] = median_ms(
            lambda: sdpa(sq, sk, sv, is_causal=True, **gqa).backward(sdout), [sq, sk, sv])
    pairs = sum(task_pairs(b - a, d - c, causal) for a, b, c, d, causal in tasks.rows)
    fwd_bwd_flops = pairs * attention_flops_per_pair(heads, dim)
    tflops = {name: fwd_bwd_flops / (3.5 if name.endswith("_fwd") else 1) / ms / 1e9
              for name, ms in times.items()}
    return dict(layout=layout, seq=seq, shape=f"{heads}/{kv_heads}x{dim}", tasks=len(tasks),
                mask_ms=mask_ms, times=times, tflops=tflops)


def table(rows: list[dict], peak: float) -> list[str]:
    lines = ["| layout | S | Hq/Hkv×D | tasks | fwd plain TF/s | fwd sink TF/s | sink/plain | "
             "fwd+bwd plain TF/s | fwd+bwd sink TF/s | sink/plain | sink % of matmul peak | "
             "sdpa fwd / fwd+bwd TF/s | mask build ms |",
             "|" + "---|" * 13]
    for r in rows:
        t = r["tflops"]
        sdpa = (f"{t['sdpa_fwd']:.0f} / {t['sdpa_fwd_bwd']:.0f}" if "sdpa_fwd" in t else "–")
        lines.append(
            f"| {r['layout']} | {r['seq'] // 1024}K | {r['shape']} | {r['tasks']} | "
            f"{t['plain_fwd']:.0f} | {t['sink_fwd']:.0f} | {t['sink_fwd'] / t['plain_fwd']:.2f} | "
            f"{t['plain_fwd_bwd']:.0f} | {t['sink_fwd_bwd']:.0f} | "
            f"{t['sink_fwd_bwd'] / t['plain_fwd_bwd']:.2f} | "
            f"{100 * t['sink_fwd_bwd'] / peak:.0f}% | {sdpa} | {r['mask_ms']:.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--layouts", nargs="+", default=["causal", "short", "multiturn", "one-doc"])
    parser.add_argument("--shapes", nargs="+", default=["8/8x64", "32/8x128"],
                        help="Hq/Hkv x D, e.g. 8/8x64")
    parser.add_argument("--long", type=int, nargs="*", default=[131072],
                        help="extra lengths run for the causal and one-doc layouts only")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--append", action="store_true", help="add this run's table to --out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attention_gpu.py needs a CUDA device")
    dtype = torch.bfloat16
    torch._dynamo.config.recompile_limit = 256  # one compiled kernel per measured shape
    peak = matmul_peak_tflops(dtype)
    rows = []
    for shape in args.shapes:
        heads, rest = shape.split("/")
        kv_heads, dim = (int(x) for x in rest.split("x"))
        plan = [(layout, seq) for seq in args.seq for layout in args.layouts]
        plan += [(layout, seq) for seq in args.long for layout in ("causal", "one-doc")]
        for layout, seq in plan:
            rows.append(measure(layout, seq, int(heads), kv_heads, dim, dtype))
            print(table(rows[-1:], peak)[-1], flush=True)
    head = [f"## {torch.cuda.get_device_name()}, bf16, torch {torch.__version__}", "",
            f"Measured bf16 matmul peak (8192³): {peak:.0f} TFLOP/s. Command: "
            f"`python benchmarks/attention_gpu.py {' '.join(sys.argv[1:])}`", ""]
    text = "\n".join(head + table(rows, peak)) + "\n"
    print(text)
    if args.out:
        with args.out.open("a" if args.append else "w") as f:
            f.write(("\n" if args.append else "") + text)


if __name__ == "__main__":
    main()
