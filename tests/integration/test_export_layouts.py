"""``export-hf`` from any layout: after one training step of a multi-rank run from
SmolLM2-135M-Instruct (tp=3 x pp=2, and dp=2 x pp=2), the checkpoint (each rank's pieces, ZeRO
slices, the tied embedding's copy on the last stage) exports to a directory transformers
loads, holding exactly the run's whole-model weights after the step (gathered from the live
ranks). Six ranks at most: each holds a copy of the gathered model, 24 GB hold no more."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from runtime_harness import ROOT, skewed_batch
from smollm2 import smollm2_hf_dir

from distca.profile.comm import free_port

pytestmark = pytest.mark.slow


def _train_one_step_and_save(rank: int, world: int, port: int, overrides: list, out: str) -> None:
    """One step from ``model.init_from`` on ``world`` gloo ranks, then a checkpoint written as
    the driver writes it (each rank its shard, rank 0 commits) and the gathered weights."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    from distca.config import load_config
    from distca.rank import make_rank
    from distca.roles import init_from_source
    from distca.train.checkpoint import begin_save, commit, rank_files
    from distca.train.run_dir import RunDir
    from distca.train.sharded_state import save_state

    cfg = load_config(ROOT / "recipes" / "tiny.yaml", overrides)
    step = make_rank(cfg)
    init_from_source(step.role, cfg.model.init_from)
    step.train_step([skewed_batch(cfg.parallel.dp, 64, [40, 1, 13], seed=4, vocab=49152)])
    full = step.full_model_state()
    run = RunDir(Path(out) / "run")
    where = [None]
    if rank == 0:
        torch.save(full, Path(out) / "expected.pt")
        run.write_config(cfg)
        where = [str(begin_save(run.checkpoints, 1))]
    dist.broadcast_object_list(where)
    save_state(step.role, Path(where[0]))
    entries = [None] * world
    dist.all_gather_object(entries, rank_files(Path(where[0]), rank))
    if rank == 0:
        commit(Path(where[0]), 1, {"restarts": 0, "seed": 0, "data_position": 1},
               [e for rank_entries in entries for e in rank_entries])
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("dp, tp, pp", [(1, 3, 2), (2, 1, 2)], ids=["tp3_pp2", "dp2_pp2"])
def test_export_after_one_step_in_any_layout(dp, tp, pp, tmp_path):
    import transformers
    from safetensors.torch import load_file

    from distca.cli import main
    from distca.config import load_config
    from distca.hf.weights import hf_from_megatron

    source = smollm2_hf_dir(tmp_path / "smollm2")
    overrides = [f"model.init_from={source}", f"parallel.dp={dp}", f"parallel.tp={tp}",
                 f"parallel.pp={pp}", "cad.min_shard_tokens=4", "optim.lr=1e-3",
                 "optim.warmup_fraction=0"]
    world = dp * tp * pp
    mp.spawn(_train_one_step_and_save, args=(world, free_port(), overrides, str(tmp_path)),
             nprocs=world, join=True)
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    m = load_config(ROOT / "recipes" / "tiny.yaml", overrides).model
    expected = hf_from_megatron(torch.load(tmp_path / "expected.pt"), m)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"),
                                                              dtype=torch.float32)
    got = model.state_dict()
    before = load_file(str(source / "model.safetensors"))
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert got["lm_head.weight"].data_ptr() == got["model.embed_tokens.weight"].data_ptr() or \
        torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])
    moved = [n for n in expected if not torch.equal(before[n], expected[n])]
    assert len(moved) == len(expected)  # the step changed every weight
