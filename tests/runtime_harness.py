"""Helpers for the multi-process runtime tests: spawn gloo ranks and run engine scenarios.

A *scenario* is (name, config overrides, batch seed, batch shape). Each spawned rank builds an
Engine per scenario, loads the scenario's initial weights when given, runs one
``forward_backward`` and saves its loss and parameter gradients; tests compare those files
between a multi-process run and a single-process colocated reference.
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distca.batch import PackedBatch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def skewed_batch(num_workers: int, tokens_per_worker: int, doc_lengths, seed: int,
                 vocab: int = 512) -> PackedBatch:
    """Packed batch of the given documents (padding after them), random tokens and labels."""
    rng = np.random.default_rng(seed)
    n = num_workers * tokens_per_worker
    docs = np.asarray(doc_lengths, dtype=np.int64)
    tokens = rng.integers(0, vocab, n)
    labels = rng.integers(0, vocab, n)
    labels[int(docs.sum()):] = -100
    labels[rng.random(n) < 0.1] = -100
    return PackedBatch(tokens, labels, docs, tokens_per_worker)


def as_single_worker(batch: PackedBatch) -> PackedBatch:
    """The same batch seen by one worker holding every token (the colocated reference)."""
    return PackedBatch(batch.tokens, batch.labels, batch.doc_lengths, batch.tokens.shape[0],
                       batch.turn_lengths, batch.turn_is_context)


def _randomize_sinks(model: torch.nn.Module) -> None:
    """Sink logits spread over about +-3 (a zero sink would hide sink bugs), same on all ranks."""
    gen = torch.Generator().manual_seed(11)
    for name, param in model.named_parameters():
        if name.endswith("core_attention.sinks"):
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=gen) * 3)


def _rank_main(rank: int, world: int, port: int, scenarios: list, outdir: str,
               reference: bool) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    from distca.config import load_config
    from distca.engine import Engine

    out = Path(outdir)
    for name, overrides, batches in scenarios:
        cfg = load_config(ROOT / "recipes" / "tiny.yaml", list(overrides))
        engine = Engine(cfg)
        init = out / f"{name}.init.pt"
        if reference:
            engine.load_state_dict(torch.load(init))
            batches = [as_single_worker(b) for b in batches]
        else:
            _randomize_sinks(engine.model)
            if rank == 0:
                torch.save(engine.state_dict(), init)
        stats = engine.forward_backward(batches)
        grads = {n: p.grad.detach().clone() for n, p in engine.model.named_parameters()}
        torch.save({**stats, "grads": grads}, out / f"{name}.{'ref' if reference else rank}.pt")
        dist.barrier()
    dist.destroy_process_group()


def run_ranks(world: int, scenarios: list, outdir: Path, reference: bool = False) -> None:
    """Run ``scenarios`` on ``world`` spawned gloo ranks (127.0.0.1 only)."""
    mp.spawn(_rank_main, args=(world, free_port(), scenarios, str(outdir), reference),
             nprocs=world, join=True)


def load_result(outdir: Path, name: str, who) -> dict:
    return torch.load(outdir / f"{name}.{who}.pt")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
