"""The optimizer: a bf16 model is stepped through fp32 master weights, exactly as fp32 AdamW on
fp32 copies with the same gradients; its state survives a checkpoint round trip."""

from __future__ import annotations

import pytest
import torch

from distca.config import OptimConfig
from distca.optimizer import Optimizer, buckets

CFG = OptimConfig(lr=1e-5, weight_decay=0.1)


def _bf16_params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(16, 8), (8,), (4, 4)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(torch.bfloat16)) for s in shapes]


def _step(opt: Optimizer, grads: list[torch.Tensor]) -> None:
    opt.zero_grad()
    for q, g in zip(opt.params, grads):
        if q.grad is None:
            q.grad = torch.zeros_like(q)
        q.grad.add_(g.to(q.dtype))
    opt.step(CFG.lr)


def _grads(params, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(q.shape, generator=gen).to(torch.bfloat16) for q in params]


def test_bf16_updates_below_resolution_accumulate_in_fp32_master_weights():
    params = _bf16_params(0)
    initial = [q.detach().clone() for q in params]
    opt = Optimizer(params, CFG)
    reference = [torch.nn.Parameter(q.detach().float()) for q in params]
    ref_opt = Optimizer(reference, CFG)  # all fp32: stepped in place
    assert ref_opt.master is None and opt.master is not None
    for step in range(3):
        grads = _grads(params, step)
        _step(opt, grads)
        _step(ref_opt, [g.float() for g in grads])
    for m, q, r, q0 in zip(opt.master, params, reference, initial):
        assert m.dtype == torch.float32 and torch.equal(m, r.detach().reshape(-1))
        assert torch.equal(q.detach(), r.detach().to(torch.bfloat16))
        # 3 steps of ~1e-5 are below bf16's resolution at |w| ~ 1: the master moved anyway
        assert bool((m != q0.float().reshape(-1)).all())
        assert (q.detach() == q0).float().mean() > 0.5  # stepping bf16 directly moves nothing
    for state in opt.adamw.state.values():
        assert state["exp_avg"].dtype == torch.float32


def test_state_round_trip_continues_identically():
    params = _bf16_params(1)
    opt = Optimizer(params, CFG)
    for step in range(2):
        _step(opt, _grads(params, step))
    saved = opt.state_dict()
    assert {k for k in saved if k.startswith("master.")} == {"master.0", "master.1", "master.2"}

    copies = [torch.nn.Parameter(q.detach().clone()) for q in params]
    resumed = Optimizer(copies, CFG)
    resumed.load_state_dict(saved)
    for step in (2, 3):
        _step(opt, _grads(params, step))
        _step(resumed, _grads(params, step))
    for a, b in zip(opt.master + params, resumed.master + copies):
        assert torch.equal(a.detach(), b.detach())


def test_checkpoint_without_master_weights_takes_the_model_values():
    """Checkpoints of bf16 runs from before master weights: bf16 moments, no master.*."""
    params = _bf16_params(2)
    old = {f"optim.{i}.{key}": torch.ones_like(q) for i, q in enumerate(params)
           for key in ("exp_avg", "exp_avg_sq")}
    old.update({f"optim.{i}.step": torch.tensor(5.0) for i in range(len(params))})
    opt = Optimizer(params, CFG)
    with torch.no_grad():
        params[0].add_(1.0)  # as if the model's weights were just loaded
    opt.load_state_dict(old)
    assert torch.equal(opt.master[0], params[0].detach().float().reshape(-1))
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.adamw.state.values())
    _step(opt, _grads(params, 0))


def _sliced_rank(rank: int, world: int, port: int, outdir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    import distca.optimizer

    distca.optimizer.BUCKET = 7  # the write-back all-gathers many buckets of 2 a rank
    params = _bf16_params(3)  # the same weights and (reduced) gradients on every rank
    sliced = Optimizer(params, CFG, dist.group.WORLD)
    assert sum(m.numel() for m in sliced.master) <= -(-sliced.total // world)
    for step in range(2):
        _step(sliced, _grads(params, step))
    saved = sliced.state_dict()
    copies = [torch.nn.Parameter(q.detach().clone()) for q in params]
    resumed = Optimizer(copies, CFG, dist.group.WORLD)
    resumed.load_state_dict(saved)
    _step(resumed, _grads(params, 2))
    torch.save([q.detach() for q in copies], f"{outdir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_data_parallel_slices_step_as_the_whole(tmp_path):
    """Each of 3 ranks steps a third of the flattened parameters (uneven: 152 elements) and
    all-gathers: the weights equal one optimizer's over everything, through a checkpoint."""
    import torch.multiprocessing as mp

    from distca.profile.comm import free_port

    mp.spawn(_sliced_rank, args=(3, free_port(), str(tmp_path)), nprocs=3, join=True)
    params = _bf16_params(3)
    whole = Optimizer(params, CFG)
    for step in range(3):
        _step(whole, _grads(params, step))
    for rank in range(3):
        for got, want in zip(torch.load(tmp_path / f"rank{rank}.pt"), params):
            assert torch.equal(got, want.detach())
    with pytest.raises(ValueError, match="another slicing"):
        Optimizer(_bf16_params(3), CFG).load_state_dict(
            {**whole.state_dict(), "optim.layout": torch.tensor([152, 3])})


def test_buckets_cover_the_flat_parameters_once_in_order():
    cut = buckets([5, 1, 12], size=4)
    assert [sum(b - a for _, a, b in bucket) for bucket in cut] == [4, 4, 4, 4, 2]
    assert [p for bucket in cut for p in bucket] == [
        (0, 0, 4), (0, 4, 5), (1, 0, 1), (2, 0, 2), (2, 2, 6), (2, 6, 10), (2, 10, 12)]


def test_fp32_state_resumes_in_bf16():
    fp32 = [torch.nn.Parameter(q.detach().float()) for q in _bf16_params(4)]
    opt = Optimizer(fp32, CFG)
    _step(opt, _grads(fp32, 0))
    bf16 = [torch.nn.Parameter(q.detach().to(torch.bfloat16)) for q in fp32]
    resumed = Optimizer(bf16, CFG)
    resumed.load_state_dict(opt.state_dict())  # same slicing, no master weights saved
    assert torch.equal(resumed.master[0], bf16[0].detach().float().reshape(-1))
    _step(resumed, _grads(bf16, 1))
