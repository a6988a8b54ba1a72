"""core_attention against a float64 dense oracle, for every backend present (design §2-3)."""

import os

import pytest
import torch
from attention_reference import dense_attention
from distca.parallel.dispatch import merge_partials
from emulated_gpu_backends import EMULATED, gpu_backend_for

from distca.attention import (
    apply_sink,
    attention_backward,
    attention_forward,
    core_attention,
    make_task_list,
)
from distca.attention.core import _backend_module
from distca.attention.tasks import causal_document_tasks, multiturn_tasks, task_mask

CPU_BACKENDS = ("torch", "cpp")
GPU_BACKENDS = ("flash", "flex")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def placement(backend: str, dtype: torch.dtype = torch.float32) -> tuple[str, torch.dtype]:
    """(device, dtype) a test runs a backend on: the GPU kernels are 16-bit, so their float32
    cases run in bfloat16 (with the bfloat16 tolerance); emulated on the CPU, they keep it."""
    device = _backend_module(backend).DEVICES[0]
    if device == "cuda":
        return device, torch.bfloat16 if dtype == torch.float32 else dtype
    return device, dtype


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)), "-inf rows differ"
    return ((got - want)[finite].norm() / want[finite].norm().clamp_min(1e-30)).item()


def split_tasks(rows):
    """(q_ranges, kv_ranges, causal) from (a, b, c, d, causal) tuples."""
    return ([r[:2] for r in rows], [r[2:4] for r in rows], [r[4] for r in rows])


def check(backend, tasks, heads=4, kv_heads=2, dim=32, dtype=torch.float32,
          sink_offsets=(-20.0, 0.0, 20.0, 3.0), lse_grad=True):
    """Forward and backward (q, k, v, sinks) of core_attention vs the float64 oracle."""
    device, dtype = placement(backend, dtype)
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    nq, nk = tasks.num_q, tasks.num_kv
    q = torch.randn(nq, heads, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(nk, kv_heads, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(nk, kv_heads, dim, generator=gen, dtype=torch.float64)
    # The oracle sees the inputs the kernel sees (rounded to dtype): the tolerance then measures
    # the kernel's arithmetic, not the rounding of its inputs.
    q, k, v = (x.to(dtype).double() for x in (q, k, v))
    mask = task_mask(tasks)
    sinks = None
    if sink_offsets is not None:
        # Offsets relative to the typical row log-sum-exp, so -20/+20 mean "negligible" and
        # "dominant" sink mass whatever the scale of the scores.
        _, plain = dense_attention(q, k, v, mask)
        typical = plain[torch.isfinite(plain[:, 0])].median(0).values
        offsets = torch.tensor(sink_offsets, dtype=torch.float64).repeat(heads)[:heads]
        sinks = (typical + offsets).float().double()
    leaves = [x.to(device, dtype).requires_grad_() for x in (q, k, v)]
    if sinks is not None:
        leaves.append(sinks.to(device, torch.float32).requires_grad_())
    out, lse = core_attention(*leaves[:3], tasks.q_ranges, tasks.kv_ranges, tasks.causal,
                              sinks=leaves[3] if sinks is not None else None, backend=backend)
    d_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype).double()
    d_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64) if lse_grad else None
    live = torch.isfinite(lse.cpu())
    grads = [d_out.to(device, out.dtype)]
    if lse_grad:
        grads.append(torch.where(live, d_lse.float(), 0.0).to(device))
    torch.autograd.backward([out, lse][: len(grads)], grads)

    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    if sinks is not None:
        ref_leaves.append(sinks.clone().requires_grad_())
    ref_out, ref_lse = dense_attention(*ref_leaves[:3], mask,
                                       ref_leaves[3] if sinks is not None else None)
    ref_grads = [d_out] + ([torch.where(torch.isfinite(ref_lse), d_lse, 0.0)] if lse_grad else [])
    torch.autograd.backward([ref_out, ref_lse][: len(ref_grads)], ref_grads)

    tol = TOL[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    results = {"out": rel_err(out.cpu(), ref_out), "lse": rel_err(lse.cpu(), ref_lse)}
    for name, got, want in zip("qkvs", leaves, ref_leaves):
        results[f"d{name}"] = rel_err(got.grad.cpu(), want.grad)
    if sinks is not None:
        # dsinks sums mixed-sign per-row terms, each carrying the rounding of O and L, so its
        # error is bounded relative to the sum of the terms' magnitudes, not to their sum: when
        # the terms cancel (a few % of fp32 random layouts), the latter is an ill-conditioned
        # yardstick whatever the kernel does.
        live = torch.isfinite(ref_lse)
        share = torch.where(live, torch.exp(ref_leaves[3] - ref_lse), 0.0).detach()
        terms = -(d_out * ref_out.detach()).sum(-1)
        if lse_grad:
            terms = terms + torch.where(live, d_lse, 0.0)
        magnitude = (terms * share).abs().sum(0).norm()
        results["ds"] = ((leaves[3].grad.cpu().double() - ref_leaves[3].grad).norm()
                         / magnitude).item()
    bad = {name: err for name, err in results.items() if not err < tol}
    assert not bad, f"seed {seed}, {dtype}: relative errors above {tol}: {bad}"
    return out, lse, leaves


GPU_PARAMS = [*(pytest.param(b, marks=pytest.mark.gpu) for b in GPU_BACKENDS), *EMULATED]


@pytest.fixture(params=[*CPU_BACKENDS, *GPU_PARAMS])
def backend(request):
    if request.param == "cpp":
        request.getfixturevalue("cpp_extension")
    if request.param in CPU_BACKENDS:
        return request.param
    return gpu_backend_for(request.param, request)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_documents(backend, dtype):
    check(backend, causal_document_tasks([1, 37, 5, 1, 64, 2]), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multiturn_masks(backend, dtype):
    tasks = multiturn_tasks([
        [(9, True), (6, False), (1, True), (12, False), (4, True), (1, False)],
        [(1, True)],
        [(3, False)],
        [(20, True), (17, False)],
    ])
    check(backend, tasks, dtype=dtype)


def test_query_range_split_into_tasks(backend):
    # One 61-token causal document, its queries cut into uneven shards; each shard sees
    # the document up to its own end (bottom-right causal).
    cuts = [0, 1, 14, 15, 40, 61]
    rows = [(a, b, 0, b, True) for a, b in zip(cuts, cuts[1:])]
    check(backend, make_task_list(*split_tasks(rows), 61, 61))


def test_kv_range_split_across_tasks(backend):
    # Document [0, 50): queries [30, 50) see [0, 11) and [11, 30) in full (two servers), and
    # [30, 50) causally; queries [0, 30) are one task. A bidirectional document [50, 70) has
    # its kv cut in three.
    rows = [(0, 30, 0, 30, True), (30, 50, 0, 11, False), (30, 50, 11, 30, False),
            (30, 50, 30, 50, True), (50, 70, 50, 53, False), (50, 70, 53, 54, False),
            (50, 70, 54, 70, False)]
    check(backend, make_task_list(*split_tasks(rows), 70, 70))


@pytest.mark.parametrize("heads,kv_heads", [(6, 1), (6, 3), (4, 4)])
def test_gqa(backend, heads, kv_heads):
    check(backend, causal_document_tasks([23, 9, 1]), heads=heads, kv_heads=kv_heads)


def test_rectangular_causal_tasks(backend):
    # Bottom-right alignment with |q| < |kv| and |q| > |kv| (first rows of the task see nothing).
    rows = [(0, 10, 0, 25, True), (10, 40, 25, 33, True), (40, 41, 33, 34, True)]
    check(backend, make_task_list(*split_tasks(rows), 41, 34))


@pytest.mark.parametrize("offsets", [(-20.0,), (0.0,), (20.0,)])
def test_sink_offsets(backend, offsets):
    check(backend, causal_document_tasks([17, 1, 30]), sink_offsets=offsets)


def test_without_sinks(backend):
    check(backend, causal_document_tasks([17, 1, 30]), sink_offsets=None)


def test_many_tiles(backend):
    # Lengths that cross the 64-row tiles of the cpp kernel at odd places, a query range cut
    # at non-multiples of 64, and long GLM turns.
    rows = [(0, 70, 0, 70, True), (70, 200, 0, 200, True), (200, 333, 200, 333, True)]
    check(backend, make_task_list(*split_tasks(rows), 333, 333), heads=2, kv_heads=1)
    check(backend, multiturn_tasks([[(130, True), (1, False), (77, True), (150, False)]]),
          heads=2, kv_heads=2, dim=48)


def test_head_dim_256(backend):
    check(backend, causal_document_tasks([20, 3]), heads=2, kv_heads=1, dim=256)


def test_tokens_in_no_task(backend):
    # Tokens [0, 3), [20, 24) and [40, 45) are in no task (padding between documents).
    rows = [(3, 20, 3, 20, True), (24, 40, 24, 40, False)]
    tasks = make_task_list(*split_tasks(rows), 45, 45)
    out, lse, leaves = check(backend, tasks)
    dead = ~tasks.coverage()
    assert dead.sum() == 12
    out, lse, dq = out.cpu(), lse.cpu(), leaves[0].grad.cpu()
    assert torch.all(out[dead] == 0) and torch.all(lse[dead] == float("-inf"))
    assert torch.all(dq[dead] == 0)


def test_sink_is_not_ignored(backend):
    """Fails if a backend drops the sink: output, lse and dsink must all feel it."""
    tasks = causal_document_tasks([24, 40])
    gen = torch.Generator().manual_seed(fresh_seed())
    device, dtype = placement(backend)
    q, k, v = (torch.randn(64, 2, 16, generator=gen).to(device, dtype) for _ in range(3))
    plain_out, plain_lse = core_attention(q, k, v, tasks, None, None, backend=backend)
    sinks = plain_lse[:, :].median(0).values.clone().requires_grad_()
    out, lse = core_attention(q, k, v, tasks, None, None, sinks=sinks, backend=backend)
    # At offset 0 about half of each row's mass goes to the sink.
    assert (out.norm() / plain_out.norm()) < 0.8
    assert torch.all(lse > plain_lse)
    out.square().sum().backward()
    assert torch.all(sinks.grad < 0), "more sink mass shrinks |out|: dsink must be negative"


def test_split_across_servers_matches_single_call(backend):
    """The runtime's path: forward per server, merge, sink; backward per server on the merge."""
    tasks = multiturn_tasks([[(8, True), (10, False), (5, True), (9, False)], [(13, False)]])
    rows = tasks.rows
    servers = [rows[0::2], rows[1::2]]
    gen = torch.Generator().manual_seed(fresh_seed())
    n = tasks.num_q
    device, dtype = placement(backend)
    q, k, v, d_out = (torch.randn(n, 4, 16, generator=gen).to(device, dtype) for _ in range(4))
    sinks = torch.randn(4, generator=gen).to(device)

    partial = [attention_forward(q, k, v, *split_tasks(r), backend=backend) for r in servers]
    every_row = torch.arange(n, device=device).repeat(len(partial))  # each partial: all rows
    merged_out, merged_lse = merge_partials(torch.cat([p[0] for p in partial]),
                                            torch.cat([p[1] for p in partial]), every_row, n)
    merged_out = merged_out.to(dtype)
    out, _ = apply_sink(merged_out, merged_lse, sinks)
    w = torch.sigmoid(merged_lse - sinks).nan_to_num(0.0).unsqueeze(-1)
    grads = [attention_backward((d_out * w).to(dtype), q, k, v, out, merged_lse, *split_tasks(r),
                                backend=backend) for r in servers]
    dq, dk, dv = (sum(g[i] for g in grads) for i in range(3))

    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_out, _ = core_attention(*leaves, tasks, None, None, sinks=sinks, backend=backend)
    ref_out.backward(d_out)
    # Same kernels, merged in another order: only rounding differs.
    tol = 1e-5 if dtype == torch.float32 else TOL[dtype]
    assert rel_err(out, ref_out) < (tol / 10 if dtype == torch.float32 else tol)
    for got, leaf in zip((dq, dk, dv), leaves):
        assert rel_err(got, leaf.grad) < tol


@pytest.mark.parametrize("q_ranges,kv_ranges,causal,match", [
    ([[0, 5]], [[0, 5], [0, 1]], [True], "kv_ranges has 2 tasks"),
    ([[0, 11]], [[0, 5]], [True], r"q_ranges\[0\] = \[0, 11\)"),
    ([[3, 2]], [[0, 5]], [True], r"q_ranges\[0\] = \[3, 2\)"),
    ([[0, 5]], [[-1, 5]], [True], r"kv_ranges\[0\] = \[-1, 5\)"),
    ([[0.0, 5.0]], [[0, 5]], [True], "integer tensor"),
    ([[0, 5, 1]], [[0, 5]], [True], r"shape \(T, 2\)"),
    ([[0, 5]], [[0, 5]], [True, False], r"causal must have shape \(1,\)"),
])
def test_bad_tasks_are_named(q_ranges, kv_ranges, causal, match):
    q = torch.randn(10, 2, 8)
    with pytest.raises(ValueError, match=match):
        core_attention(q, q, q, torch.tensor(q_ranges), torch.tensor(kv_ranges),
                       torch.tensor(causal), backend="torch")


def test_bad_tensors_are_named():
    q, kv = torch.randn(10, 4, 8), torch.randn(10, 3, 8)
    ranges = torch.tensor([[0, 10]])
    with pytest.raises(ValueError, match="multiple of kv heads"):
        core_attention(q, kv, kv, ranges, ranges, torch.tensor([True]))
    with pytest.raises(ValueError, match=r"sinks must be \(4,\)"):
        core_attention(q, q, q, ranges, ranges, torch.tensor([True]), sinks=torch.zeros(3))
    with pytest.raises(ValueError, match="backend must be"):
        core_attention(q, q, q, ranges, ranges, torch.tensor([True]), backend="cuda")
    with pytest.raises(ValueError, match="TaskList covers 12 query"):
        core_attention(q, q, q, causal_document_tasks([12]), None, None)


def random_layout(gen: torch.Generator) -> tuple[list, int]:
    """Random documents, each a causal document cut into query shards (bottom-right causal,
    its earlier keys sometimes on another "server") or a GLM multi-turn document."""
    rows, start = [], 0
    for _ in range(int(torch.randint(1, 5, (1,), generator=gen))):
        length = int(torch.randint(1, 90, (1,), generator=gen))
        if bool(torch.rand(1, generator=gen) < 0.5):
            cuts = sorted({0, length, *torch.randint(0, length, (2,), generator=gen).tolist()})
            for a, b in zip(cuts, cuts[1:]):
                split = int(torch.randint(0, a + 1, (1,), generator=gen))
                if 0 < split:
                    rows.append((start + a, start + b, start, start + split, False))
                rows.append((start + a, start + b, start + split, start + b, True))
        else:
            turn_start, context = 0, bool(torch.rand(1, generator=gen) < 0.5)
            while turn_start < length:
                end = min(length, turn_start + int(torch.randint(1, 30, (1,), generator=gen)))
                if turn_start:
                    rows.append((start + turn_start, start + end, start, start + turn_start, False))
                rows.append((start + turn_start, start + end, start + turn_start, start + end,
                             not context))
                turn_start, context = end, not context
        start += length + int(torch.randint(0, 3, (1,), generator=gen))  # padding gaps
    return rows, start


def test_random_layouts(backend):
    gen = torch.Generator().manual_seed(fresh_seed())
    for _ in range(3):
        rows, n = random_layout(gen)
        check(backend, make_task_list(*split_tasks(rows), n, n), heads=2, kv_heads=1, dim=16)


@pytest.mark.parametrize("offset", [-20.0, 0.0, 20.0])
def test_apply_sink_gradient_does_not_cancel(offset):
    """Autograd through apply_sink (the GPU graph path) keeps dsinks at a sink far below L."""
    gen = torch.Generator().manual_seed(fresh_seed())
    out = torch.randn(50, 3, 8, generator=gen, dtype=torch.float64)
    lse = torch.randn(50, 3, generator=gen, dtype=torch.float64) + 5.0
    lse[7] = float("-inf")
    sinks = torch.full((3,), 5.0 + offset, dtype=torch.float64)
    d_out = torch.randn(50, 3, 8, generator=gen, dtype=torch.float64)
    d_lse = torch.randn(50, 3, generator=gen, dtype=torch.float64)
    grads = []
    for dtype in (torch.float32, torch.float64):
        leaves = [x.to(dtype).requires_grad_() for x in (out, lse, sinks)]
        new_out, new_lse = apply_sink(*leaves)
        torch.autograd.backward([new_out, new_lse], [d_out.to(dtype),
                                                     torch.where(lse.isfinite(), d_lse, 0.0).to(dtype)])
        grads.append([x.grad for x in leaves])
    for got, want in zip(*grads):
        assert rel_err(got, want) < 1e-5
