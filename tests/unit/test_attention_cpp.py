"""The C++ CPU kernel at its tiling edges, against the float64 dense oracle.

The kernel works in 64-row tiles grouped four to a block (one packed tile serves four of the
other side), pads queries and the head dim to multiples of 16, transposes in 8 x 8 register
blocks and skips causally masked 6 x 16 micro-blocks (and the exp of hidden 8-query groups), so
lengths around 16, 64 and 256, head dims that are not multiples of 8 or 16, and tasks that
start mid-tile are where it can go wrong. Outputs of 2 MiB and more live on their own
huge-page mappings, which must read as zero wherever the kernel writes nothing.
"""

import pytest
import torch
from test_attention_core import check, split_tasks

from distca.attention import cpp_backend, make_task_list
from distca.attention.tasks import causal_document_tasks, multiturn_tasks

pytestmark = pytest.mark.usefixtures("cpp_extension")

EDGES = [1, 15, 17, 63, 64, 65, 129, 255, 256, 257]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_documents_at_tile_edges(dtype):
    check("cpp", causal_document_tasks(EDGES), heads=2, kv_heads=1, dim=24, dtype=dtype)


@pytest.mark.parametrize("dim", [8, 12, 30, 40, 72])
def test_head_dims_off_the_vector_width(dim):
    # 12 and 30 end mid 8 x 8 transpose block (query packing and the output write).
    check("cpp", causal_document_tasks([70, 1, 300]), heads=2, kv_heads=2, dim=dim)


def test_kv_range_split_mid_tile():
    # One 300-token causal document cut at 100 and 230 on both sides: the later query shards
    # see the earlier key shards in full, each task starting in the middle of a key tile.
    rows = [(100, 300, 0, 100, False), (230, 300, 100, 230, False), (0, 100, 0, 100, True),
            (100, 230, 100, 230, True), (230, 300, 230, 300, True)]
    check("cpp", make_task_list(*split_tasks(rows), 300, 300), heads=2, kv_heads=1, dim=32)


def test_query_shards_longer_than_their_keys():
    # Bottom-right causal with more queries than keys: the first 190 queries of the first task
    # see nothing; the second task's queries start mid-tile.
    rows = [(0, 260, 0, 70, True), (261, 400, 300, 420, True), (261, 400, 0, 50, False)]
    check("cpp", make_task_list(*split_tasks(rows), 400, 420), heads=3, kv_heads=1, dim=16)


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (3, 1)])
def test_gqa_across_blocks(heads, kv_heads):
    docs = [[(70, True), (200, False), (1, True), (30, False)], [(300, False)]]
    check("cpp", multiturn_tasks(docs), heads=heads, kv_heads=kv_heads, dim=16)


def test_huge_page_outputs_zero_where_no_task_writes():
    # 1024 x 4 x 128 float32 = 2 MiB: out, dq, dk and dv all take the huge-page path. Query rows
    # 700..760 are in no task; key rows 700..800 are seen by none.
    rows = [(0, 300, 0, 300, True), (300, 700, 300, 700, True), (760, 1024, 800, 1024, True),
            (760, 1024, 0, 300, False)]
    tasks = make_task_list(*split_tasks(rows), 1024, 1024)
    out, lse, leaves = check("cpp", tasks, heads=4, kv_heads=4, dim=128, sink_offsets=None)
    assert not out[700:760].any() and not leaves[0].grad[700:760].any()
    assert not leaves[1].grad[700:800].any() and not leaves[2].grad[700:800].any()
    q, k, v = (x.detach() for x in leaves)
    raw_out, raw_lse = cpp_backend.forward(q, k, v, tasks, 0.1)
    grads = cpp_backend.backward(torch.randn_like(q), q, k, v, raw_out, raw_lse, tasks, 0.1)
    for x in (raw_out, *grads):
        assert x.untyped_storage().data_ptr() % (2 << 20) == 0  # its own 2 MiB-aligned mapping
