"""The optimizer: a bf16 model is stepped through fp32 master weights, exactly as fp32 AdamW on
fp32 copies with the same gradients; its state survives a checkpoint round trip."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from distca.config import OptimConfig
from distca.optimizer import Optimizer, buckets
from distca.train.sharded_state import checkpoint_keys, load_state, save_state, write_whole

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


class _Role:
    """What a checkpoint reads of a worker role, for a plain list of parameters (no TP/PP)."""

    holds_weights, tied, layer_offset = True, None, 0

    def __init__(self, params: list[torch.nn.Parameter], group=None) -> None:
        import torch.distributed as dist

        self.params = params
        self.optimizer = Optimizer(params, CFG, group)
        self.model = torch.nn.ParameterList(params)
        self.model.config = SimpleNamespace(gated_linear_unit=False)
        rank = dist.get_rank() if group is not None else 0
        self.mesh = SimpleNamespace(tp_rank=0, tp=1, dp_rank=rank, is_first_stage=True)


def test_state_round_trip_continues_identically(tmp_path):
    role = _Role(_bf16_params(1))
    for step in range(2):
        _step(role.optimizer, _grads(role.params, step))
    save_state(role, tmp_path)
    assert {k.split("/")[0] for k in checkpoint_keys(tmp_path)} == {
        "model", "master", "exp_avg", "exp_avg_sq", "optim_step"}
    resumed = _Role(_bf16_params(9))  # other weights: all of them come from the checkpoint
    load_state(resumed, tmp_path)
    for step in (2, 3):
        _step(role.optimizer, _grads(role.params, step))
        _step(resumed.optimizer, _grads(resumed.params, step))
    for a, b in zip(role.optimizer.master + role.params,
                    resumed.optimizer.master + resumed.params):
        assert torch.equal(a.detach(), b.detach())


def test_weights_only_checkpoint_starts_a_fresh_optimizer(tmp_path):
    """An import holds fp32 weights and no optimizer state: the bf16 run's master copies take
    the fp32 values, not their bf16 rounding."""
    fp32 = [q.detach().float() + 1e-3 for q in _bf16_params(2)]
    write_whole(tmp_path, {str(i): q for i, q in enumerate(fp32)})
    role = _Role(_bf16_params(2))
    load_state(role, tmp_path)
    assert not role.optimizer.adamw.state
    for m, q, w in zip(role.optimizer.master, role.params, fp32):
        assert torch.equal(m, w.reshape(-1)) and torch.equal(q.detach(), w.to(torch.bfloat16))
    _step(role.optimizer, _grads(role.params, 0))


def _sliced_rank(rank: int, world: int, port: int, outdir: str, resume: bool) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    import distca.optimizer

    distca.optimizer.BUCKET = 7  # the write-back all-gathers many buckets of 2 a rank
    role = _Role(_bf16_params(3 if not resume else 8), dist.group.WORLD)
    assert sum(m.numel() for m in role.optimizer.master) <= -(-role.optimizer.total // world)
    if resume:  # the 3-rank slices of the checkpoint read as 2-rank slices
        load_state(role, Path(outdir) / "ckpt")
        _step(role.optimizer, _grads(role.params, 2))
        torch.save([q.detach() for q in role.params], f"{outdir}/rank{rank}.pt")
    else:
        for step in range(2):
            _step(role.optimizer, _grads(role.params, step))
        save_state(role, Path(outdir) / "ckpt")
    dist.destroy_process_group()


def test_data_parallel_slices_resume_in_another_slicing(tmp_path):
    """3 ranks each step a third of the flattened parameters (uneven: 152 elements, slices
    that start and end inside rows), save; 2 ranks load their halves and step on: the weights
    equal one optimizer's over everything."""
    import torch.multiprocessing as mp

    from distca.profile.comm import free_port

    for world, resume in ((3, False), (2, True)):
        mp.spawn(_sliced_rank, args=(world, free_port(), str(tmp_path), resume), nprocs=world,
                 join=True)
    params = _bf16_params(3)
    whole = Optimizer(params, CFG)
    for step in range(3):
        _step(whole, _grads(params, step))
    for rank in range(2):
        for got, want in zip(torch.load(tmp_path / f"rank{rank}.pt"), params):
            assert torch.equal(got, want.detach())


def test_buckets_cover_the_flat_parameters_once_in_order():
    cut = buckets([5, 1, 12], size=4)
    assert [sum(b - a for _, a, b in bucket) for bucket in cut] == [4, 4, 4, 4, 2]
    assert [p for bucket in cut for p in bucket] == [
        (0, 0, 4), (0, 4, 5), (1, 0, 1), (2, 0, 2), (2, 2, 6), (2, 6, 10), (2, 10, 12)]


def test_fp32_state_resumes_in_bf16(tmp_path):
    fp32 = _Role([torch.nn.Parameter(q.detach().float()) for q in _bf16_params(4)])
    _step(fp32.optimizer, _grads(fp32.params, 0))
    assert fp32.optimizer.master is None  # stepped in place
    save_state(fp32, tmp_path)
    bf16 = _Role(_bf16_params(5))
    load_state(bf16, tmp_path)
    for m, q in zip(bf16.optimizer.master, fp32.params):  # the fp32 values, not rounded
        assert torch.equal(m, q.detach().reshape(-1))
    for m, q in zip(bf16.optimizer.stepped, fp32.optimizer.stepped):
        a, b = bf16.optimizer.adamw.state[m], fp32.optimizer.adamw.state[q]
        assert torch.equal(a["exp_avg"], b["exp_avg"].reshape(-1)) and a["step"] == b["step"]
    _step(bf16.optimizer, _grads(bf16.params, 1))
