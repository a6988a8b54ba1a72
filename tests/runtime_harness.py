"""Helpers for the multi-process runtime tests: spawn gloo ranks and run engine scenarios.

A *scenario* is (name, config overrides, micro-batches). One process group runs all scenarios
of a test: each rank builds an Engine per scenario, runs one ``forward_backward`` and saves its
loss and parameter gradients (and, with pipeline stages, ``eval_loss`` of the same batches).
Scenarios whose overrides differ only in ``cad.*`` and ``parallel.*`` and that run the same
micro-batches share a *key*: they start from the same saved weights (or, with
``model.init_from``, each rank from that source) and are compared with one single-process
colocated reference run per key.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distca.batch import PackedBatch
from distca.profile.comm import free_port

ROOT = Path(__file__).resolve().parents[1]


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


def multiturn_docs(seed: int, lengths) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random conversations: alternating context/reply turns of random lengths."""
    rng = np.random.default_rng(seed)
    docs = []
    for n in lengths:
        reply = np.zeros(n, bool)
        at, is_reply = 0, False
        while at < n:
            run = int(rng.integers(1, max(2, n // 3)))
            reply[at:at + run] = is_reply
            at, is_reply = at + run, not is_reply
        docs.append((rng.integers(0, 256, n).astype(np.int64), reply))
    return docs


def full_gradients(step) -> dict[str, torch.Tensor]:
    """Every parameter's ``.grad`` of the whole model under TP=1/PP=1 names (collective over
    the workers: tensor shards and pipeline stages gathered)."""
    return step.role.gather({n: q.grad for n, q in step.model.named_parameters()})


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


def model_key(overrides, batches) -> str:
    """Short id of what decides the reference result: the overrides that shape the model and
    its weights (not cad/parallel) and the micro-batches."""
    kept = sorted(o for o in overrides if not o.startswith(("cad.", "parallel.")))
    digest = hashlib.sha1(" ".join(kept).encode())
    for b in batches:
        for array in (b.tokens, b.labels, b.doc_lengths, np.asarray(b.tokens_per_rank)):
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:10]


def _rank_main(rank: int, world: int, port: int, scenarios: list, outdir: str,
               reference: bool, grads: bool) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    from megatron.core import parallel_state

    from distca.config import load_config
    from distca.rank import make_rank
    from distca.roles import init_from_source

    out = Path(outdir)
    seen = set()
    for name, overrides, batches in scenarios:
        key = model_key(overrides, batches)
        if reference:
            if key in seen:
                continue
            overrides = [o for o in overrides if not o.startswith(("cad.", "parallel."))]
            overrides += ["cad.enabled=false", "parallel.dp=1"]
        cfg = load_config(ROOT / "recipes" / "tiny.yaml", list(overrides))
        engine = make_rank(cfg)
        server = engine.role.optimizer is None  # a dedicated attention server: no weights
        init = out / f"init.{key}.pt"
        if cfg.model.init_from:  # every rank, the reference too, reads the pretrained source
            init_from_source(engine.role, cfg.model.init_from)
        elif reference or key in seen:
            if not server:
                engine.load_full_model_state(torch.load(init))
        else:
            if not server:
                _randomize_sinks(engine.model)
                full = engine.full_model_state()  # TP shards and PP stages gathered on every rank
                if rank == 0:
                    torch.save(full, init)
            dist.barrier()
        seen.add(key)
        if reference:
            batches = [as_single_worker(b) for b in batches]
        stats = engine.forward_backward(batches)
        full_grads = full_gradients(engine) if grads and not server else {}
        if cfg.parallel.pp > 1:  # pipelines evaluate with their own forward-only schedule
            stats["eval_loss"] = engine.eval_loss(batches)
        who = f"ref.{key}" if reference else f"{name}.{rank}"
        torch.save({**stats, "grads": full_grads}, out / f"{who}.pt")
        dist.barrier()
        parallel_state.destroy_model_parallel()  # the next scenario may use another layout
    dist.destroy_process_group()


def run_ranks(world: int, scenarios: list, outdir: Path, reference: bool = False,
              grads: bool = True) -> None:
    """Run ``scenarios`` on ``world`` spawned gloo ranks (127.0.0.1 only); ``reference`` runs
    one single-process colocated reference per model key (``world`` must then be 1).
    ``grads=False`` keeps the losses only (gathering a real model's gradients on every rank
    costs a whole model's memory per rank)."""
    mp.spawn(_rank_main, args=(world, free_port(), scenarios, str(outdir), reference, grads),
             nprocs=world, join=True)


def load_result(outdir: Path, name: str, rank: int) -> dict:
    return torch.load(outdir / f"{name}.{rank}.pt")


def load_reference(outdir: Path, overrides, batches) -> dict:
    return torch.load(outdir / f"ref.{model_key(overrides, batches)}.pt")


def assert_parity(outdir: Path, scenarios: list, world: int, grad_tol: float = 1e-5) -> None:
    """Loss and every gradient of each of the ``world`` worker ranks equal the reference's
    (fp32, rel. error < 1e-5 for the loss, ``grad_tol`` for gradients)."""
    for name, overrides, batches in scenarios:
        ref = load_reference(outdir, overrides, batches)
        for rank in range(world):
            got = load_result(outdir, name, rank)
            assert abs(got["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), name
            if "eval_loss" in got:  # same weights, no dropout: the training loss
                assert abs(got["eval_loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), name
            assert got["grads"].keys() == ref["grads"].keys()
            # The plan really moved attention work (with one data-parallel worker per
            # stage and tensor rank there is no imbalance to remove).
            cad_on = [o for o in overrides if o.startswith("cad.enabled=")][-1] == "cad.enabled=true"
            if cad_on and got["imbalance_before"] > 1.0:
                assert got["imbalance"] < got["imbalance_before"], name
            for param, grad in ref["grads"].items():
                err = relative_error(got["grads"][param], grad)
                assert err < grad_tol, f"{name} rank {rank} {param}: relative error {err:.2e}"


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
