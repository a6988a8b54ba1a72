"""Core attention on the CPU: cpp vs torch backends vs dense SDPA with a materialised mask.

For each sequence length and layout, every method runs in a fresh subprocess (so peak memory
is its own): one forward+backward with the resident-set high-water mark
reset (Linux ``/proc/self/clear_refs``) to measure peak memory above the inputs (measured
first, before warm-up, since later runs reuse freed heap pages). Ratios are
taken between methods of the same run. The dense path is skipped where its extrapolated need
(bytes per S² measured at the smallest size) exceeds ``--dense-limit-gib``; the table then
shows that computed need. After the memory run: the best of ``--reps`` timed forwards and
forward+backwards.

    python benchmarks/attention.py --seq 4096 16384 32768 --out benchmarks/results/attention.md

``--threads N`` sets torch's (and the cpp kernel's) thread count in every worker; on a shared
machine a 1-thread run's CPU times are the steadiest comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

HEADS, HEAD_DIM = 8, 64
METHODS = ("cpp", "torch", "dense")
LAYOUTS = ("causal", "short", "multiturn")


def layout_tasks(layout: str, seq: int):
    """Deterministic task lists: long-tail packed documents, or GLM multi-turn documents."""
    from distca.attention.tasks import causal_document_tasks, multiturn_tasks

    rng = np.random.default_rng(seq)
    if layout in ("causal", "short"):
        median, longest = (400, 4096) if layout == "causal" else (48, 256)
        lengths = []
        while sum(lengths) < seq:
            lengths.append(int(np.clip(rng.lognormal(np.log(median), 1.0), 16, longest)))
        lengths[-1] -= sum(lengths) - seq
        return causal_document_tasks([n for n in lengths if n > 0])
    docs, used = [], 0
    while used < seq:
        turns, doc_len = [], min(seq - used, int(rng.integers(1024, 4097)))
        left, context = doc_len, True
        while left > 0:
            n = min(left, int(np.clip(rng.lognormal(5.0, 0.8), 8, 1024)))
            turns.append((n, context))
            left, context = left - n, not context
        docs.append(turns)
        used += doc_len
    return multiturn_tasks(docs)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(seq: int, layout: str, method: str, reps: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    from distca.attention import core_attention
    from distca.attention.tasks import task_mask

    tasks = layout_tasks(layout, seq)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(seq, HEADS, HEAD_DIM, generator=gen).requires_grad_() for _ in range(3))
    grad = torch.randn(seq, HEADS, HEAD_DIM, generator=gen)

    def run(backward: bool):
        if method == "dense":
            mask = task_mask(tasks)
            out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                                 v.transpose(0, 1), attn_mask=mask)
            out = out.transpose(0, 1)
        else:
            out, _ = core_attention(q, k, v, tasks, None, None, backend=method)
        if backward:
            out.backward(grad)
            q.grad = k.grad = v.grad = None

    if method == "cpp":
        from distca.attention import cpp_backend

        cpp_backend.is_available()  # load the extension before measuring memory
    # Memory first: later runs reuse freed heap pages, which would hide the peak.
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    run(True)
    peak_mib = max(_rss_kib("VmHWM") - before, 0) / 1024
    times = {}
    for name, backward in (("fwd", False), ("fwdbwd", True)):
        wall = cpu = float("inf")
        for _ in range(reps):
            start, start_cpu = time.perf_counter(), time.process_time()
            if backward:
                run(True)
            else:
                with torch.no_grad():
                    run(False)
            wall = min(wall, time.perf_counter() - start)
            cpu = min(cpu, time.process_time() - start_cpu)
        times[f"{name}_s"], times[f"{name}_cpu_s"] = wall, cpu
    times["peak_mib"] = peak_mib
    times["tasks"] = len(tasks)
    return times


def table(results: dict, seqs, layouts, header: str) -> str:
    lines = [header, "",
             "| S | layout | tasks | method | fwd s | fwd+bwd s | fwd+bwd CPU s | "
             "fwd+bwd vs torch (wall / CPU) | peak MiB above inputs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for seq in seqs:
        for layout in layouts:
            torch_run = results.get((seq, layout, "torch"), {})
            base, base_cpu = torch_run.get("fwdbwd_s"), torch_run.get("fwdbwd_cpu_s")
            for method in METHODS:
                r = results.get((seq, layout, method))
                if r is None:
                    continue
                if "need_gib" in r:
                    lines.append(f"| {seq} | {layout} | | {method} | not run | not run | | "
                                 f"| needs ~{r['need_gib']:.0f} GiB |")
                    continue
                speed = (f"{base / r['fwdbwd_s']:.2f}x / {base_cpu / r['fwdbwd_cpu_s']:.2f}x"
                         if base else "")
                lines.append(f"| {seq} | {layout} | {r['tasks']} | {method} | {r['fwd_s']:.3f} | "
                             f"{r['fwdbwd_s']:.3f} | {r['fwdbwd_cpu_s']:.3f} | {speed} | "
                             f"{r['peak_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--dense-limit-gib", type=float, default=6.0)
    parser.add_argument("--out", help="also write the markdown table here")
    parser.add_argument("--worker", nargs=3, metavar=("SEQ", "LAYOUT", "METHOD"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        seq, layout, method = args.worker
        print(json.dumps(worker(int(seq), layout, method, args.reps, args.threads)))
        return

    import torch

    from distca.attention import cpp_backend

    load_before = os.getloadavg()
    results, dense_bytes_per_s2 = {}, None
    for seq in sorted(args.seq):
        for layout in args.layouts:
            for method in METHODS:
                if method == "dense" and dense_bytes_per_s2 is not None:
                    need = dense_bytes_per_s2 * seq * seq / 2**30
                    if need > args.dense_limit_gib:
                        results[(seq, layout, method)] = {"need_gib": need}
                        continue
                cmd = [sys.executable, __file__, "--reps", str(args.reps), "--threads",
                       str(args.threads), "--worker",
                       str(seq), layout, method]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                r = json.loads(done.stdout.strip().splitlines()[-1])
                results[(seq, layout, method)] = r
                if method == "dense" and dense_bytes_per_s2 is None:
                    dense_bytes_per_s2 = r["peak_mib"] * 2**20 / seq / seq
                print(seq, layout, method, r, flush=True)
    load_after = os.getloadavg()
    header = (
        f"# Core attention on the CPU ({HEADS} heads, D = {HEAD_DIM}, fp32)\n\n"
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores shared "
        f"with other engineers' jobs (load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after), torch {torch.__version__} with {args.threads} thread(s); cpp "
        f"kernel built with `{cpp_backend.compile_flags()}`. Times are "
        f"the best of {args.reps} runs, wall clock and process CPU time (all threads; less "
        f"sensitive to the other jobs); peak memory is the resident-set high-water "
        f"mark of one forward+backward above the inputs. `dense` is SDPA with a materialised "
        f"(S, S) bool mask; where it was not run, its need is extrapolated from the bytes per "
        f"S² it used at the smallest S. Layouts: `causal` = long-tail packed documents "
        f"(lognormal lengths, median 400, 16..4096 tokens); `short` = many short documents "
        f"(median 48, 16..256 tokens); `multiturn` = GLM masks of 1K-4K-token "
        f"documents with ~150-token alternating context/response turns."
    )
    text = table(results, sorted(args.seq), args.layouts, header)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
