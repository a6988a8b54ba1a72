"""A 2-rank FocuSFT step (gloo, CAD on) equals one process stepping on the whole batch.

The batch has a multi-turn conversation longer than a worker's share, so both the inner and
the outer loop's attention cross ranks through the CA-task dispatch. A variant adapts three of
the four layers (the inner loop then runs two layers' attention) and adds a dedicated
attention server, which must join the inner loop's exchanges too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from runtime_harness import ROOT, as_single_worker, free_port, multiturn_docs, relative_error

from distca.data.chat import pack_conversations

T = 96  # tokens per worker; the 110-token conversation spans both
OVERRIDES = ["trainer.seed=7", "cad.enabled=true",
             "cad.tolerance=0.1", "cad.min_shard_tokens=4", "model.learnable_sinks=true"]


def _batches():
    """Two micro-batches: every rank, dedicated servers included, must interleave each
    micro-batch's plan with its inner loop as the workers do (a server that planned all
    micro-batches first hung here)."""
    return [pack_conversations(multiturn_docs(seed, [110, 1, 5, 8, 3, 9, 1, 20, 7]), 2, T)
            for seed in (3, 4)]


def _rank_main(rank: int, world: int, port: int, outdir: str, extra: list[str]) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    from distca.config import load_config
    from distca.rank import make_rank

    out = Path(outdir)
    servers = [o for o in extra if o.startswith("cad.")] if world > 1 else []
    model = [o for o in extra if not o.startswith("cad.")]
    cfg = load_config(ROOT / "recipes" / "tiny-focusft.yaml",
                      OVERRIDES + model + servers + [f"parallel.dp={min(world, 2)}"])
    engine = make_rank(cfg)
    if rank >= 2:  # a dedicated attention server: it only joins the workers' exchanges
        dist.barrier()
        engine.forward_backward(_batches())
        dist.destroy_process_group()
        return
    batches = _batches()
    if world == 1:
        engine.load_full_model_state(torch.load(out / "init.pt"))
        batches = [as_single_worker(b) for b in batches]
    else:
        with torch.no_grad():
            for name, p in engine.model.named_parameters():
                if name.endswith("sinks"):
                    p.copy_(torch.linspace(-3, 3, p.numel()))
        if rank == 0:  # the weights
            torch.save({k: v.detach() for k, v in engine.full_model_state().items()},
                       out / "init.pt")
        dist.barrier()
    stats = engine.forward_backward(batches)
    grads = {n: p.grad.detach().clone() for n, p in engine.model.named_parameters()}
    fast = [t.detach().clone() for t in engine.fast.tensors]
    torch.save({"stats": stats, "grads": grads, "fast": fast},
               out / f"{'ref' if world == 1 else rank}.pt")
    dist.destroy_process_group()


DEDICATED = ["cad.server_mode=dedicated", "cad.num_dedicated_servers=1"]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    [],
    # 3 of 4 layers adapted: 2 layers' attention in every inner step, served by the server too
    ["focusft.layer_fraction=0.75", *DEDICATED],
    # backtracking: the workers' accept/reject decisions must reach the server
    ["focusft.layer_fraction=0.75", "focusft.inner_backtrack=3", "focusft.inner_lr=60.0",
     *DEDICATED],
], ids=["two_ranks", "inner_attention_dedicated_server", "backtracking_dedicated_server"])
def test_two_rank_focusft_step_matches_single_process(tmp_path, extra):
    world = 3 if DEDICATED[0] in extra else 2
    for w in (world, 1):
        mp.spawn(_rank_main, args=(w, free_port(), str(tmp_path), extra), nprocs=w, join=True)
    ref = torch.load(tmp_path / "ref.pt")
    assert ref["stats"]["inner_loss_1"] < ref["stats"]["inner_loss_0"]
    if "inner_rejected" in ref["stats"]:
        assert ref["stats"]["inner_rejected"] > 0
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert got["stats"]["imbalance"] < got["stats"]["imbalance_before"]
        assert got["stats"].get("inner_rejected") == ref["stats"].get("inner_rejected")
        for key in ("loss", "inner_loss_0", "inner_loss_1"):
            assert abs(got["stats"][key] - ref["stats"][key]) <= 1e-5 * ref["stats"][key], key
        for g, r in zip(got["fast"], ref["fast"]):  # every rank holds the same adapted weights
            assert relative_error(g, r) < 1e-5
        for name, grad in ref["grads"].items():
            err = relative_error(got["grads"][name], grad)
            assert err < 1e-5, f"rank {rank} {name}: relative error {err:.2e}"
