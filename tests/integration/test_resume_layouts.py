"""A checkpoint resumes in another layout: the steps after it have the losses of the
uninterrupted run (fp32, 1e-4 relative), weights and AdamW state (ZeRO slices included)
being carried over through ``torch.distributed.checkpoint``, and the batches being the same
because ``data.pack_tokens`` fixes the packs that every layout's micro-batches are made of."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from runtime_harness import ROOT

from distca.profile.comm import free_port

COMMON = ["data.tokens_per_rank=64", "data.pack_tokens=64", "data.max_length=48",
          "cad.min_shard_tokens=8", "optim.lr=3e-3", "optim.warmup_fraction=0",
          "trainer.steps=4", "attention.telemetry_interval=0"]
SAVED_AT = 2
TIED = "model.tie_embeddings=true"


def _ranks(rank: int, world: int, port: int, overrides: list, out: str, resume: bool) -> None:
    """Without ``resume``: steps 1-4 from the recipe's initialisation, a checkpoint after step
    2; with it: that checkpoint loaded, steps 3-4. Rank 0 writes the losses."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    from distca.config import load_config
    from distca.data import make_dataset
    from distca.rank import make_rank
    from distca.train.checkpoint import begin_save, commit, rank_files
    from distca.train.sharded_state import load_state, save_state

    cfg = load_config(ROOT / "recipes" / "tiny.yaml", COMMON + overrides)
    step = make_rank(cfg)
    data = make_dataset(cfg)
    ckpt = Path(out) / "checkpoints"
    first = 1
    if resume:
        load_state(step.role, ckpt / f"step_{SAVED_AT:08d}")
        first, step.step = SAVED_AT + 1, SAVED_AT
    losses = {}
    for s in range(first, 5):
        losses[s] = step.train_step(data.step_batches(s))["loss"]
        if s == SAVED_AT and not resume:
            where = [str(begin_save(ckpt, s)) if rank == 0 else None]
            dist.broadcast_object_list(where)
            save_state(step.role, Path(where[0]))
            files = [None] * world
            dist.all_gather_object(files, rank_files(Path(where[0]), rank))
            if rank == 0:
                commit(Path(where[0]), s, {}, [e for f in files for e in f])
            dist.barrier()
    if rank == 0:
        (Path(out) / f"losses_{'resumed' if resume else 'whole'}.json").write_text(
            json.dumps(losses))
    dist.destroy_process_group()


def _world(overrides: list) -> int:
    from distca.config import load_config
    from distca.train.worker import world_layout

    return len(world_layout(load_config(ROOT / "recipes" / "tiny.yaml", COMMON + overrides)))


@pytest.mark.parametrize("before, after", [
    pytest.param(["parallel.dp=2"], ["parallel.dp=1", "parallel.tp=2", "data.micro_batches=2"],
                 id="dp2_to_tp2_mb2"),
    # tied embeddings: the last stage's copy reads the embedding's key and writes nothing
    pytest.param(["parallel.dp=1", "parallel.pp=2", "data.micro_batches=2", TIED],
                 ["parallel.dp=2", TIED], id="pp2_to_dp2_tied", marks=pytest.mark.slow),
    pytest.param(["parallel.dp=2", "cad.server_mode=dedicated", "cad.num_dedicated_servers=1",
                  TIED], ["parallel.dp=1", "data.micro_batches=2", "parallel.pp=2", TIED],
                 id="dp2_server_to_pp2_tied", marks=pytest.mark.slow),
])
def test_resume_in_another_layout_continues_the_run(before, after, tmp_path):
    for overrides, resume in ((before, False), (after, True)):
        world = _world(overrides)
        mp.spawn(_ranks, args=(world, free_port(), overrides, str(tmp_path), resume),
                 nprocs=world, join=True)
    whole = json.loads((tmp_path / "losses_whole.json").read_text())
    resumed = json.loads((tmp_path / "losses_resumed.json").read_text())
    assert whole.keys() == {"1", "2", "3", "4"} and resumed.keys() == {"3", "4"}
    for s in ("3", "4"):
        assert abs(resumed[s] - whole[s]) <= 1e-4 * abs(whole[s]), (s, resumed[s], whole[s])
    assert whole["4"] != whole["3"]  # the steps moved the weights: the check can fail
