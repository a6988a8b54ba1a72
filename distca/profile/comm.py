"""``distca profile comm``: all-to-all bandwidth per message size on the current backend.

Starts ``world`` local processes (gloo on CPU, NCCL on GPU) that rendezvous on 127.0.0.1 and
time ``all_to_all_single`` for each message size. ``bytes`` is what one rank sends in one
exchange (split evenly over the peers); ``bus_GBps`` counts the bytes that leave each rank
(``bytes * (world-1)/world``) per second, the figure the simulator's link bandwidth models.
"""

from __future__ import annotations

import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distca.bootstrap import start_process_group
from distca.config import DistBackend


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, sizes: list[int], iters: int, out) -> None:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    device = torch.device("cuda") if cuda else torch.device("cpu")
    start_process_group(DistBackend.auto, rank, world, f"tcp://127.0.0.1:{port}",
                        interface="lo", timeout_s=120)
    try:
        rows = []
        for size in sizes:
            numel = max(world, size // 4 // world * world)  # float32, divisible by world
            send = torch.randn(numel, device=device)
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send)  # warm-up
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(iters):
                dist.all_to_all_single(recv, send)
            if cuda:
                torch.cuda.synchronize()
            elapsed = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
            nbytes = numel * 4
            seconds = float(elapsed)
            rows.append({"bytes": nbytes, "seconds": seconds,
                         "bus_GBps": nbytes * (world - 1) / world / seconds / 1e9})
        if rank == 0:
            out.put({"backend": dist.get_backend(), "world": world,
                     "device": torch.cuda.get_device_name() if cuda else "cpu", "rows": rows})
    finally:
        dist.destroy_process_group()


def profile_comm(world: int, sizes: list[int], iters: int) -> dict:
    """Run the measurement in ``world`` fresh processes; returns rank 0's table."""
    if world < 2:
        raise ValueError(f"--world must be >= 2 to measure an exchange, got {world}")
    if not sizes or min(sizes) < 1:
        raise ValueError("--sizes must be positive byte counts")
    if iters < 1:
        raise ValueError(f"--iters must be >= 1, got {iters}")
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world, free_port(), sizes, iters, out), nprocs=world,
                       join=True, start_method="spawn")
    return out.get()
