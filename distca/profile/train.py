"""``distca profile train``: real training steps measured end to end, per rank.

The ranks are local processes (gloo on CPU, NCCL on GPU) rendezvousing on 127.0.0.1, each
running the same :class:`distca.step.Step` (or FocuSFT step) that ``distca train``'s Ray
workers run, on the batches the training driver would send (``make_dataset(cfg)``). After
``warmup`` steps, ``steps`` steps are timed plainly (tokens/s, model FLOPs utilisation,
attention imbalance before and after planning), then one more step runs under the torch
profiler for the per-rank breakdown and timeline (:mod:`distca.profile.breakdown`); its wall
time is reported separately because the profiler slows it down.

Model FLOPs and the peak are :mod:`distca.profile.flops` (what ``distca train`` logs too): the
peak is a measured square matmul on every rank at the same time (summed), or ``peak_tflops``
per rank when given.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distca.bootstrap import start_process_group
from distca.config import DistBackend, DistcaConfig
from distca.parallel.spans import recording
from distca.profile.breakdown import CATEGORIES, find_step_event, step_breakdown
from distca.profile.comm import free_port
from distca.profile.flops import achieved, measure_peak_flops, model_flops
from distca.rank import make_rank

STEP_EVENT = "distca.profile.train_step"


def _rank(rank: int, world: int, port: int, cfg: DistcaConfig, all_batches: list, warmup: int,
          peak_tflops: float | None, out, trace_dir: str | None) -> None:
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    else:
        torch.set_num_threads(max(1, int(cfg.ray.num_cpus_per_worker)))
    start_process_group(DistBackend.auto, rank, world, f"tcp://127.0.0.1:{port}", interface="lo")
    try:
        step = make_rank(cfg)
        device = step.device
        dist.barrier()
        peak = torch.tensor([peak_tflops * 1e12 if peak_tflops else measure_peak_flops(device)],
                            dtype=torch.float64, device=device)
        dist.all_reduce(peak)
        steps = []
        for i, batches in enumerate(all_batches[:-1]):
            dist.barrier()
            start = time.perf_counter()
            stats = step.train_step(batches)
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()  # a step ends when the slowest rank is done
            if i >= warmup:
                steps.append({"wall_s": time.perf_counter() - start, "loss": stats["loss"],
                              "imbalance_before": stats["imbalance_before"],
                              "imbalance_after": stats["imbalance"], "tokens": stats["tokens"]})
        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU]) as prof, recording() as clocks:
            with record_function(STEP_EVENT):
                step.train_step(all_batches[-1])
                if cuda:
                    torch.cuda.synchronize()
        if trace_dir:  # the profiled step for chrome://tracing or ui.perfetto.dev
            prof.export_chrome_trace(os.path.join(trace_dir, f"trace_rank{rank}.json"))
        breakdown = step_breakdown(find_step_event(prof.events(), STEP_EVENT), with_spans=True)
        breakdown["runtime_clocks_s"] = dict(clocks.seconds)
        gathered = [None] * world
        dist.all_gather_object(gathered, breakdown)
        if rank == 0:
            out.put({"steps": steps, "ranks": gathered, "peak_flops": float(peak),
                     "device": torch.cuda.get_device_name() if cuda else "cpu",
                     "backend": "nccl" if cuda else "gloo"})
    finally:
        dist.destroy_process_group()


def profile_train(cfg: DistcaConfig, steps: int, warmup: int = 1,
                  peak_tflops: float | None = None, trace_dir: str | None = None) -> dict:
    """Run ``warmup + steps + 1`` training steps on ``dp·tp·pp`` local ranks; returns the
    report (see :func:`summarise`). With ``trace_dir``, each rank writes the profiled step's
    Chrome/Perfetto trace there as ``trace_rank<r>.json``."""
    from distca.data import make_dataset
    from distca.train.worker import world_layout

    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got {steps}, {warmup}")
    world = len(world_layout(cfg))
    data = make_dataset(cfg)
    batches = [data.step_batches(s) for s in range(1, warmup + steps + 2)]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    procs = mp.start_processes(_rank, args=(world, free_port(), cfg, batches, warmup, peak_tflops,
                                            out, trace_dir),
                               nprocs=world, join=False, start_method="spawn")
    while not procs.join(timeout=1.0):  # raises if a rank fails
        if not out.empty():
            break
    raw = out.get()  # read before joining: the report may not fit in the pipe's buffer
    while not procs.join():
        pass
    flops = [model_flops(cfg, b) for b in batches[warmup:warmup + steps]]
    return summarise(raw, flops, world)


def summarise(raw: dict, step_flops: list[float], world: int) -> dict:
    """The JSON report: per-step rows, medians, MFU and the profiled step's per-rank breakdown
    (seconds and fraction of its wall time per category)."""
    steps = raw["steps"]
    for row, flops in zip(steps, step_flops):
        row["tokens_per_s"] = row["tokens"] / row["wall_s"]
        row["model_tflops"] = flops / 1e12
        row.update(achieved(flops, row["wall_s"], raw["peak_flops"]))
    ranks = []
    for r, b in enumerate(raw["ranks"]):
        ranks.append({"rank": r, "wall_s": b["wall_s"], "seconds": b["seconds"],
                      "fraction": {c: b["seconds"][c] / b["wall_s"] for c in CATEGORIES},
                      "runtime_clocks_s": b["runtime_clocks_s"]})
    median = {k: statistics.median(row[k] for row in steps)
              for k in ("wall_s", "tokens_per_s", "mfu", "imbalance_before", "imbalance_after")}
    return {"world": world, "device": raw["device"], "dist_backend": raw["backend"],
            "peak_tflops_total": raw["peak_flops"] / 1e12, "median": median, "steps": steps,
            "profiled_step": {"ranks": ranks, "note": "one extra step under the torch profiler; "
                              "its wall time includes the profiler's overhead"},
            "spans": [b["spans"] for b in raw["ranks"]]}

