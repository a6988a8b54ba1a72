"""A dedicated attention server runs the workers' step, so a collective added to the step
reaches it without server code (runtime redesign, issue 15).

The test double adds two collectives to :class:`distca.step.Step`: an all-reduce over the
exchange group in every micro-batch's forward (which dedicated servers belong to) and one over
the whole world after the step's backward. Two workers and one dedicated server run it (gloo,
127.0.0.1); the server joins both without any edit to the server role, and the training
numbers stay those of the plain step.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from runtime_harness import ROOT, free_port, skewed_batch

from distca.config import load_config
from distca.mesh import ProcessMesh
from distca.step import Step

OVERRIDES = ["parallel.dp=2", "trainer.seed=7", "cad.enabled=true", "cad.tolerance=0.1",
             "cad.min_shard_tokens=4", "cad.ping_pong=true", "cad.server_mode=dedicated",
             "cad.num_dedicated_servers=1", "attention.telemetry_interval=0"]


class StepWithMoreCollectives(Step):
    """The plain step plus two collectives a developer might add."""

    def __init__(self, cfg, mesh) -> None:
        self.exchange_counts: list[float] = []
        super().__init__(cfg, mesh)

    def forward(self, batch, plan, hidden_in=None, blocking=False):
        seen = torch.ones(1)
        dist.all_reduce(seen, group=self.mesh.exchange)  # every rank of the exchange joins
        self.exchange_counts.append(float(seen))
        return super().forward(batch, plan, hidden_in, blocking)

    def forward_backward(self, micro_batches):
        stats = super().forward_backward(micro_batches)
        ranks = torch.tensor([float(self.mesh.rank)])
        dist.all_reduce(ranks)
        stats["rank_sum"] = float(ranks)
        return stats


def _rank_main(rank: int, world: int, port: int, outdir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    cfg = load_config(ROOT / "recipes" / "tiny.yaml", OVERRIDES)
    batches = [skewed_batch(2, 64, [90, 1, 17, 1, 12], seed=1),
               skewed_batch(2, 64, [64, 1, 5, 8, 3, 9, 1, 20, 7], seed=2)]
    results = {}
    for cls in (Step, StepWithMoreCollectives):
        step = cls(cfg, ProcessMesh.build(cfg))
        if rank < 2:  # the same weights for both steps
            init = Path(outdir) / "init.pt"
            if cls is Step:
                if rank == 0:
                    torch.save(step.full_model_state(), init)
            dist.barrier()
            step.load_full_model_state(torch.load(init))
        else:
            dist.barrier()
        results[cls.__name__] = {**step.train_step(batches),
                                 "counts": getattr(step, "exchange_counts", None)}
    torch.save(results, Path(outdir) / f"{rank}.pt")
    dist.destroy_process_group()


def test_a_collective_added_to_the_step_reaches_the_dedicated_server(tmp_path):
    mp.spawn(_rank_main, args=(3, free_port(), str(tmp_path)), nprocs=3, join=True)
    for rank in range(3):
        got = torch.load(tmp_path / f"{rank}.pt")
        extra = got["StepWithMoreCollectives"]
        assert extra["rank_sum"] == 0 + 1 + 2
        # one exchange all-reduce per micro-batch, with all three ranks in it
        assert extra["counts"] == [3.0, 3.0]
        if rank < 2:  # the workers' numbers are those of the plain step
            plain = got["Step"]
            assert extra["loss"] == plain["loss"] and extra["grad_norm"] == plain["grad_norm"]
