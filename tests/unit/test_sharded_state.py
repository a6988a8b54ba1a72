"""The pieces a rank writes of whole tensors: ZeRO ranges and TP slices as rectangles, checked
by reassembling whole tensors from every rank's pieces on fresh random shapes; and the batches
of a step, which must not depend on how dp, tokens_per_rank and micro-batches split them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distca.data.dataset import Dataset
from distca.data.synthetic import SyntheticData
from distca.train.sharded_state import Placement, flat_rectangles


@pytest.mark.parametrize("seed", range(20))
def test_flat_ranges_become_rectangles_that_cover_them_once(seed):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(1, 9)),) if seed % 4 == 0 else tuple(rng.integers(1, 9, 2))
    n = int(np.prod(shape))
    lo, hi = sorted(rng.integers(0, n + 1, 2).tolist())
    covered = torch.zeros(shape, dtype=torch.int64)
    flat = torch.arange(n).reshape(shape)
    for a, b, offsets, sizes in flat_rectangles(shape, lo, hi):
        box = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
        covered[box] += 1
        # the rectangle's elements are the flat range [a, b), in order
        assert torch.equal(flat[box].reshape(-1), torch.arange(a, b))
    expected = torch.zeros(n, dtype=torch.int64)
    expected[lo:hi] = 1
    assert torch.equal(covered.reshape(-1), expected)
    assert len(flat_rectangles(shape, lo, hi)) <= 3


def _whole_from_ranks(whole: torch.Tensor, tp: int, dim: int, glu: bool, world: int):
    """Slice ``whole`` as megatron would over ``tp`` ranks, cut each rank's flattened slice into
    ``world`` ZeRO ranges, and put every range's pieces back by their whole offsets."""
    rebuilt = torch.full_like(whole, float("nan"))
    for t in range(tp):
        if glu:  # [gate_t; up_t]
            local = torch.cat([h.chunk(tp, 0)[t] for h in whole.chunk(2, 0)])
            place = Placement("w", tuple(local.shape), tuple(whole.shape), 0,
                              t * local.shape[0] // 2, local.shape[0] // 2)
        else:
            local = whole.chunk(tp, dim)[t]
            place = Placement("w", tuple(local.shape), tuple(whole.shape), dim,
                              t * local.shape[dim])
        n = local.numel()
        step = -(-n // world)
        for r in range(world):
            lo, hi = min(r * step, n), min((r + 1) * step, n)
            flat = local.reshape(-1)[lo:hi].clone()
            for offsets, piece in place.pieces(flat, lo, hi):
                box = tuple(slice(o, o + s) for o, s in zip(offsets, piece.shape))
                assert torch.isnan(rebuilt[box]).all(), "a piece written twice"
                rebuilt[box] = piece
    return rebuilt


@pytest.mark.parametrize("seed", range(12))
def test_tensor_parallel_and_zero_pieces_rebuild_the_whole_tensor(seed):
    rng = np.random.default_rng(100 + seed)
    tp, world = int(rng.choice([1, 2, 3])), int(rng.integers(1, 5))
    glu, dim = seed % 3 == 0, int(rng.integers(0, 2))
    rows = 2 * tp * int(rng.integers(1, 4)) if glu else tp * int(rng.integers(1, 5))
    cols = int(rng.integers(1, 7)) * (tp if dim == 1 and not glu else 1)
    whole = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    rebuilt = _whole_from_ranks(whole, tp, 0 if glu else dim, glu, world)
    assert torch.equal(rebuilt, whole)


def test_a_steps_tokens_do_not_depend_on_the_split():
    """The same global batch (1024 tokens) and packs (256): dp=4 x 256, dp=2 x 256 x 2
    micro-batches, dp=1 x 512 x 2, dp=1 x 1024: the step's documents and tokens are equal."""
    source = SyntheticData("pretrain", 200, 1000, seed=5)
    layouts = [(4, 256, 1), (2, 256, 2), (1, 512, 2), (1, 1024, 1), (2, 512, 1)]
    seen = []
    for dp, tokens, micro in layouts:
        batches = Dataset(source, dp, tokens, micro, pack_tokens=256).step_batches(3)
        assert all(b.tokens.size == dp * tokens for b in batches)
        seen.append((np.concatenate([b.tokens for b in batches]),
                     np.concatenate([b.labels for b in batches]),
                     np.concatenate([b.doc_lengths for b in batches])))
    for tokens, labels, docs in seen[1:]:
        assert np.array_equal(tokens, seen[0][0]) and np.array_equal(labels, seen[0][1])
        assert np.array_equal(docs, seen[0][2])
    # packs are never spanned; without pack_tokens a micro-batch is one pack, and documents
    # span the data-parallel ranks' boundaries
    ends = set(np.cumsum(seen[0][2]).tolist())
    assert {256, 512, 768} <= ends
    one_pack = Dataset(source, 4, 256, 1).step_batches(3)[0]
    assert not {256, 512, 768} <= set(np.cumsum(one_pack.doc_lengths).tolist())


def test_a_packs_padding_becomes_a_document_without_loss():
    from runtime_harness import multiturn_docs

    from distca.batch import IGNORE
    from distca.data.chat import pack_conversations
    from distca.data.packing import join_packs

    packs = [pack_conversations(multiturn_docs(seed, [40, 30]), 1, 100) for seed in (1, 2)]
    joined = join_packs(packs, 100)
    assert joined.doc_lengths.tolist() == [40, 30, 30, 40, 30]  # the first pack's padding
    assert (joined.labels[70:100] == IGNORE).all()
    assert joined.turn_lengths.sum() == 170 and not joined.turn_is_context[
        np.searchsorted(np.cumsum(joined.turn_lengths), 100)]
    assert np.array_equal(joined.tokens, np.concatenate([p.tokens for p in packs]))
